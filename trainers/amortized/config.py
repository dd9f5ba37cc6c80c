"""The amortized trainer's config: the per-prompt trainer's component configs, a generator instead of
one field, a prompt library instead of one prompt, and the data-parallel layout.

    cfg = load_amortized_config("sweeps/configs/amortized_reference_cpu.yaml", ["guidance.eta=0.2"])

A YAML whose `trainer` is `amortized` is this config; `dreamsweep train` dispatches on that key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from trainers.amortized.generators import GeneratorConfig, HyperINGPConfig
from trainers.amortized.prompt_library import PromptSource
from trainers.cameras import CameraConfig
from trainers.config import LossConfig
from trainers.config_base import ConfigBase, build_config, config_source, deep_merge, overrides_tree
from trainers.evaluation.config import EvaluationConfig
from trainers.guidance import GuidanceConfig
from trainers.priors.base import PriorConfig
from trainers.rendering import BackgroundConfig, RendererConfig

TRAINER = "amortized"


class AmortizedOptimizerConfig(ConfigBase):
    # ScaleDreamer: Adam, betas (0, 0.99), lr 4e-3 for the generator and 1e-3 for the background.
    lr_generator: float = Field(4e-3, ge=0.0)
    lr_background: float = Field(1e-3, ge=0.0)
    betas: tuple[float, float] = (0.0, 0.99)
    eps: float = 1e-15


class TextCacheConfig(ConfigBase):
    # The Arrow IPC file of the generator's text embeddings; None: in the prior's cache directory,
    # one file per prior name, so the trials of a sweep (and later runs) share it.
    path: str | None = None
    batch_size: int = Field(256, ge=1)  # prompts encoded at once when the cache is built


class EvalPromptsConfig(ConfigBase):
    """Which prompts the validation grids and the final evaluation look at."""

    n_train: int = Field(4, ge=0)  # the first N training prompts
    # Prompts never trained on (e.g. held-out reference combinations): evaluated like the training ones.
    held_out: list[str] = []
    # The reference benchmark: add its first N held-out (unseen colour-shape) prompts automatically.
    n_reference_held_out: int = Field(0, ge=0)
    # A split of the training library (`prompts.path`) that the CLIP evaluation scores as a whole:
    # eval/test/clip_similarity, and eval/test/clip_r_at_1 (each view's own prompt the nearest of the
    # split's). "test" is the paper's protocol (DF415's test split is its 415 training prompts).
    test_split: str | None = None
    n_test: int | None = Field(None, ge=1)  # the split's first N prompts; None: all of them


class AmortizedLoggingConfig(ConfigBase):
    log_every: int = Field(10, ge=1)
    val_every: int = Field(0, ge=0)  # 0: only at the end
    eval_every: int = Field(0, ge=0)  # ground-truth metrics during training (reference prior); 0: at the end
    checkpoint_every: int = Field(100, ge=0)  # 0: only at the end
    keep_checkpoints: int = Field(2, ge=1)
    val_views: int = Field(4, ge=1)
    turntable_frames: int = Field(24, ge=1)
    turntable_format: str = "gif"
    eval_views: int = Field(8, ge=1)


class DataParallelConfig(ConfigBase):
    """How many Ray Train workers share the prompts (each one rank of the DDP group)."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"  # auto: when the cluster has GPUs
    cpus_per_worker: float = Field(1.0, gt=0.0)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with CUDA, gloo without
    max_failures: int = Field(1, ge=0)  # worker-group restarts from the last checkpoint


class AmortizedConfig(ConfigBase):
    trainer: Literal["amortized"] = TRAINER
    prompts: PromptSource = PromptSource(items=["a red cube", "a blue sphere"])
    negative_prompt: str = ""
    seed: int = 0
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(4, ge=1)  # prompts per step per worker, one view each
    resolution: int = Field(64, ge=2)
    device: str = "auto"
    output_dir: str = "outputs/amortized"

    generator: GeneratorConfig = HyperINGPConfig()
    text_cache: TextCacheConfig = TextCacheConfig()
    prior: PriorConfig = PriorConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    renderer: RendererConfig = RendererConfig(estimator="uniform")
    background: BackgroundConfig = BackgroundConfig()
    camera: CameraConfig = CameraConfig()
    optimizer: AmortizedOptimizerConfig = AmortizedOptimizerConfig()
    loss: LossConfig = LossConfig()
    logging: AmortizedLoggingConfig = AmortizedLoggingConfig()
    eval_prompts: EvalPromptsConfig = EvalPromptsConfig()
    # CLIP similarity (and R@1) of the evaluation prompts' orbit renders, as the per-prompt trainer's
    # `evaluation` section; at the end, and every `evaluation.every` steps.
    evaluation: EvaluationConfig = EvaluationConfig()
    data_parallel: DataParallelConfig = DataParallelConfig()

    @model_validator(mode="after")
    def _timesteps_ordered_at_every_step(self) -> AmortizedConfig:
        self.guidance.check_timesteps(self.max_steps)
        return self

    @model_validator(mode="after")
    def _usable(self) -> AmortizedConfig:
        if self.resolution % 2:
            raise ValueError(f"resolution must be even (got {self.resolution}); e.g. resolution=64")
        if self.generator.background_hyper_dim and self.background.kind != "env_map":
            raise ValueError(
                "generator.background_hyper_dim > 0 writes an environment map per prompt: it needs "
                f"background.kind=env_map (got {self.background.kind!r}), or set it to 0"
            )
        if self.eval_prompts.test_split and (self.prompts.path is None or not self.evaluation.clip):
            raise ValueError(
                f"eval_prompts.test_split={self.eval_prompts.test_split!r} scores a split of the prompt "
                "library with CLIP: it needs prompts.path (a library JSON with that split) and "
                "evaluation.clip (e.g. openai/clip-vit-large-patch14)"
            )
        if self.renderer.estimator == "occgrid":
            raise ValueError(
                "renderer.estimator='occgrid' keeps one occupancy grid per field; a generator draws a "
                "different field for every prompt: use renderer.estimator=uniform"
            )
        return self


def is_amortized(data: Mapping[str, Any]) -> bool:
    return data.get("trainer") == TRAINER


def load_amortized_config(
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> AmortizedConfig:
    """A YAML path or a dict, then dotted overrides (strings "a.b=1" or a {"a.b": 1} mapping).

    A relative `prompts.path` in a YAML file is read against the file's folder."""
    data, where = config_source(source)
    if source is not None and not isinstance(source, Mapping):
        path = (data.get("prompts") or {}).get("path")
        if isinstance(path, str) and not Path(path).expanduser().is_absolute():
            candidate = Path(source).resolve().parent / path
            if candidate.exists():
                data["prompts"] = {**data["prompts"], "path": str(candidate)}
    nested = overrides_tree(overrides)
    if nested:
        where = f"{where} with overrides"
    merged = deep_merge(data, nested)
    # A new prompt source replaces the old one instead of merging into it (items and path exclude
    # each other).
    if "prompts" in nested and ({"items", "path"} & set(nested["prompts"])) and "prompts" in data:
        merged["prompts"] = {**{k: v for k, v in data["prompts"].items() if k not in ("items", "path")}}
        merged["prompts"] |= nested["prompts"]
    return build_config(AmortizedConfig, merged, where=where)
