"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight `tiny-sd` pipeline, built once per test session (Stable Diffusion layout)."""
    from trainers.priors.tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("priors") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_prior(tiny_sd_dir: Path):
    """`tiny-sd` loaded through the same from_pretrained path as real weights, shared by the session."""
    from trainers.priors import PriorConfig, load_prior

    return load_prior(PriorConfig(name=str(tiny_sd_dir)), "cpu")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight `tiny-clip` (CLIP's layout, 224 px input), built once per test session."""
    from trainers.evaluation.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")
