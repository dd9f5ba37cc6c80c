"""`tiny-clip`: a random-weight CLIP in exactly the layout of `openai/clip-vit-large-patch14`, built here.

Like `tiny-sd` (trainers/priors/tiny_sd.py, whose generated tokenizer it reuses), it is made from small
configs with a fixed seed, written once with `save_pretrained` (config.json of model_type "clip",
model.safetensors, the tokenizer files, preprocessor_config.json), and then loaded through the same
`from_pretrained` path as the real model, so every code path of the CLIP evaluation runs on a CPU with
nothing to download. Its scores mean nothing; its input size (224) and preprocessing are CLIP's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from trainers.priors.tiny_sd import MAX_TEXT_LENGTH, make_tokenizer, move_into_place

# Bump when the recipe below changes: a cached build with another version is replaced.
RECIPE_VERSION = 1
RECIPE_FILE = "dreamsweep_tiny_clip.json"
IMAGE_SIZE = 224  # CLIP ViT-L/14's input size: the protocol's resize target
PATCH_SIZE = 32  # 7x7 patches: cheap on a CPU
HIDDEN = 32
PROJECTION = 16
SEED = 0


def build_tiny_clip(directory: str | os.PathLike[str]) -> Path:
    """Write the tiny CLIP into `directory` unless a build of this recipe is already there (atomic, as
    `build_tiny_sd`: readers never see a half-written model)."""
    target = Path(directory).expanduser()
    if _is_current_build(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-building-", dir=target.parent))
    try:
        _write_model(staging)
        move_into_place(staging, target, _is_current_build)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _is_current_build(target: Path) -> bool:
    try:
        return json.loads((target / RECIPE_FILE).read_text()) == {"recipe_version": RECIPE_VERSION}
    except (OSError, ValueError):
        return False


def _write_model(directory: Path) -> None:
    with tempfile.TemporaryDirectory() as vocab_dir:
        tokenizer = make_tokenizer(Path(vocab_dir))
        config = CLIPConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": HIDDEN,
                "intermediate_size": 2 * HIDDEN,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": MAX_TEXT_LENGTH,
                # The text embedding is read at the eos token: give the model this vocabulary's ids.
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                "projection_dim": PROJECTION,
            },
            vision_config={
                "image_size": IMAGE_SIZE,
                "patch_size": PATCH_SIZE,
                "hidden_size": HIDDEN,
                "intermediate_size": 2 * HIDDEN,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "projection_dim": PROJECTION,
            },
            # Also in each tower's config, as in the hub's CLIP repositories: the WithProjection classes
            # read their tower's config alone.
            projection_dim=PROJECTION,
        )
        # Model constructors draw their weights from torch's global RNG: fix it, and give the caller's
        # state back so that building the model never changes a training run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = CLIPModel(config).eval()
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(Path(vocab_dir) / name, directory / name)
    # CLIP's own preprocessing constants, in the file the hub's CLIP repositories carry them in
    # (written as JSON: the processor class would want torchvision only to save it).
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": IMAGE_SIZE},
        "do_center_crop": True,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    # Written last: its presence marks a complete build.
    (directory / RECIPE_FILE).write_text(json.dumps({"recipe_version": RECIPE_VERSION}) + "\n")
