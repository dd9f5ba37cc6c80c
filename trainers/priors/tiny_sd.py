"""`tiny-sd`: a random-weight pipeline in exactly the Stable Diffusion layout, built on the machine.

It lets the whole trainer run on a CPU with nothing to download: the components are real diffusers /
transformers classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDPMScheduler)
made from tiny configs with a fixed seed, written with `save_pretrained` once, and then loaded through
the same `StableDiffusionPrior.from_pretrained` path as real weights, so that path is what the tests cover.
Its outputs mean nothing; its shapes, dtypes, schedule and file layout are those of SD 2.1-base.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

# Imported at module level, not inside the builders: diffusers' lazy module is not thread-safe on first
# access (two threads building at once can fail to import a class), while Python's import lock makes
# importing this module safe. This module is itself only imported when tiny-sd is built or loaded.
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Bump when the recipe below changes: a cached build with another version is replaced.
RECIPE_VERSION = 1
RECIPE_FILE = "dreamsweep_tiny_sd.json"

MAX_TEXT_LENGTH = 77  # CLIP's context length, as in SD
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
TEXT_HIDDEN = 32
LATENT_CHANNELS = 4
LATENT_IMAGE_SIZE = 64  # VAE scale factor 2 -> 32x32 latents
PIXEL_IMAGE_SIZE = 32  # the pixel-space variant denoises images directly, so it is kept smaller
SEED = 0


def build_tiny_sd(directory: str | os.PathLike[str], *, pixel_space: bool = False) -> Path:
    """Write the tiny pipeline into `directory` unless a build of this recipe is already there.

    The build goes into a temporary sibling directory that is renamed into place, so a reader never sees
    a half-written pipeline and two processes racing to build it both end up using one complete copy.
    `pixel_space=True` leaves out the VAE (model_index.json has no vae): a pixel-space prior.
    """
    target = Path(directory).expanduser()
    if _is_current_build(target, pixel_space):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-building-", dir=target.parent))
    try:
        _write_pipeline(staging, pixel_space)
        move_into_place(staging, target, lambda path: _is_current_build(path, pixel_space))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _is_current_build(target: Path, pixel_space: bool) -> bool:
    try:
        recipe = json.loads((target / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return recipe == _recipe(pixel_space)


def _recipe(pixel_space: bool) -> dict[str, object]:
    return {"recipe_version": RECIPE_VERSION, "pixel_space": pixel_space}


def move_into_place(staging: Path, target: Path, is_current: Callable[[Path], bool]) -> None:
    """Rename a finished build from `staging` to `target`, replacing a stale build (`is_current` false)
    and accepting one that a concurrent process put there first. Shared with the tiny CLIP."""
    try:
        os.rename(staging, target)
        return
    except OSError:
        pass  # the target exists: another process won the race, or it is a stale build
    if is_current(target):
        return
    # A stale or broken build: move it aside (one rename, so readers see old or new, never a mix), retry.
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}-stale-", dir=target.parent))
    try:
        os.rename(target, trash / target.name)
    except FileNotFoundError:
        pass  # someone else moved it already
    try:
        os.rename(staging, target)
    except OSError:
        if not is_current(target):
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _write_pipeline(directory: Path, pixel_space: bool) -> None:
    with tempfile.TemporaryDirectory() as vocab_dir:
        tokenizer = make_tokenizer(Path(vocab_dir))
        # Model constructors draw their initial weights from torch's global RNG: fix it, and give the
        # caller's RNG state back so that building the cache never changes a training run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            text_encoder = make_text_encoder(tokenizer)
            vae = None if pixel_space else make_vae()
            unet = make_unet(pixel_space)
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=make_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(directory, safe_serialization=True)
        # Recent transformers save only tokenizer.json; SD's layout (and older transformers' slow
        # tokenizer) also has the vocabulary files, so they are kept beside it.
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(Path(vocab_dir) / name, directory / "tokenizer" / name)
    if pixel_space:
        # save_pretrained records the missing VAE as [null, null]; drop the key so the index says what the
        # directory holds (the loader accepts either form).
        index_path = directory / "model_index.json"
        index = json.loads(index_path.read_text())
        index.pop("vae", None)
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    # Written last: its presence marks a complete build.
    (directory / RECIPE_FILE).write_text(json.dumps(_recipe(pixel_space)) + "\n")


def make_tokenizer(directory: Path):
    """A CLIP byte-level BPE tokenizer whose vocabulary is generated, not downloaded.

    The vocabulary is CLIP's base symbols: the 256 byte-level characters, each also in its end-of-word
    form, plus the two special tokens. With no merges every word becomes one token per character: fine for
    random weights, and any prompt still tokenizes to the same ids on every machine.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = alphabet + [char + END_OF_WORD for char in alphabet] + [BOS_TOKEN, EOS_TOKEN]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({symbol: i for i, symbol in enumerate(symbols)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(directory, model_max_length=MAX_TEXT_LENGTH)


def make_text_encoder(tokenizer):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        projection_dim=TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TEXT_LENGTH,
        # The pooled output is read at the eos token: give the model the ids this vocabulary uses.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def make_vae():
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),  # two blocks: scale factor 2
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=LATENT_IMAGE_SIZE,
    ).eval()


def make_unet(pixel_space: bool):
    channels = 3 if pixel_space else LATENT_CHANNELS
    sample_size = PIXEL_IMAGE_SIZE if pixel_space else LATENT_IMAGE_SIZE // 2
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def make_scheduler():
    # Stable Diffusion's training schedule.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
