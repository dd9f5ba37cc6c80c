"""The paper's CLIP protocol: CLIP similarity and R@1 of rendered views against their prompts.

    clip_scores({"a red cube": images, "a blue sphere": images}, "openai/clip-vit-large-patch14")
      -> {"similarity": 0.29, "recall_at_1": 1.0, "per_prompt": {"a red cube": {...}, ...}}

The protocol (ScaleDreamer's evaluation, written from its description):
- the model is CLIP ViT-L/14 through transformers' CLIPTextModelWithProjection and
  CLIPVisionModelWithProjection; the image and text embeddings are the projected, L2-normalised ones;
- each image (a render in [0, 1]) is resized to the vision tower's input size (224) bilinearly and
  normalised with CLIP's mean and std;
- similarity: the cosine between each image and its own prompt's text, averaged over a prompt's images,
  then over prompts;
- R@1: an image is correct when its own prompt is the argmax of the cosine over all the prompts evaluated
  together; averaged per prompt, then over prompts. With one prompt it is undefined (its own text is the
  only candidate), and is reported as None with the reason.

The model is a hub id, a local directory holding a CLIP checkpoint, or "tiny-clip" (random weights built
on the machine, for tests); it is loaded once per process and device. Images are embedded in batches,
under no_grad, in fp16 on CUDA.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainers.config_base import ConfigError
from trainers.hub import HUB_ID, download_hint, hub_offline, hub_reachable
from trainers.priors.base import default_cache_dir, resolve_device

PAPER_CLIP = "openai/clip-vit-large-patch14"
TINY_CLIP = "tiny-clip"
SINGLE_PROMPT_R_AT_1 = (
    "R@1 is undefined for a single prompt: its own text is the only candidate, so every image would count "
    "as correct; evaluate two or more prompts together (e.g. the runs of a fan-out)"
)
# CLIP's normalisation, used when a checkpoint carries no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipModelError(ConfigError):
    """The CLIP model named cannot be found or is not a CLIP model. The message names the setting."""


@dataclass
class ClipModel:
    """The two towers of one CLIP checkpoint, frozen, with what preprocessing needs."""

    text: torch.nn.Module
    vision: torch.nn.Module
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    dtype: torch.dtype
    source: str

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> L2-normalised projected text embeddings [P, D], float32."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        tokens = {key: value.to(self.device) for key, value in tokens.items()}
        return F.normalize(self.text(**tokens).text_embeds.float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1] -> L2-normalised projected image embeddings [N, D], float32."""
        out = []
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start : start + batch_size].to(self.device))
            out.append(
                F.normalize(self.vision(pixel_values=pixels.to(self.dtype)).image_embeds.float(), dim=-1)
            )
        return torch.cat(out)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to the input size bilinearly (no crop: renders are square) and CLIP-normalise."""
        images = images.float()
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std


# ---------------------------------------------------------------------------------------------------
# The protocol's arithmetic, pure


def retrieval_scores(
    image_embeds: list[torch.Tensor], own: list[int], text_embeds: torch.Tensor
) -> list[dict[str, float | None]]:
    """Per group of images: {"similarity", "recall_at_1"} against the normalised `text_embeds` [P, D].

    `image_embeds[i]` [N_i, D] (normalised) are the images of group i, whose own prompt is row `own[i]`
    of `text_embeds`. R@1 is None when there is only one prompt (see SINGLE_PROMPT_R_AT_1).
    """
    scores = []
    for embeds, index in zip(image_embeds, own, strict=True):
        cosine = embeds.float() @ text_embeds.float().T  # [N_i, P]
        recall = None
        if len(text_embeds) > 1:
            recall = float((cosine.argmax(dim=1) == index).float().mean())
        scores.append({"similarity": float(cosine[:, index].mean()), "recall_at_1": recall})
    return scores


def mean_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def check_images(images_by_prompt: dict[str, torch.Tensor]) -> None:
    """Refuse what is not {prompt: float tensor [N, 3, H, W] in [0, 1]}, before any model is loaded."""
    if not images_by_prompt:
        raise ValueError("images_by_prompt is empty: give at least one prompt and its images")
    for prompt, images in images_by_prompt.items():
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"images_by_prompt: every key must be a non-empty prompt (got {prompt!r})")
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise ValueError(f"images_by_prompt[{prompt!r}] must be a float tensor [N, 3, H, W] in [0, 1]")
        if images.ndim != 4 or images.shape[1] != 3 or min(images.shape) == 0:
            raise ValueError(
                f"images_by_prompt[{prompt!r}] has shape {list(images.shape)}; expected [N, 3, H, W] with "
                "N >= 1 (channels first, RGB)"
            )
        low, high = float(images.min()), float(images.max())
        if not (math.isfinite(low) and math.isfinite(high)) or low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"images_by_prompt[{prompt!r}] has values in [{low:.4g}, {high:.4g}]; expected [0, 1]"
            )


def clip_scores(
    images_by_prompt: dict[str, torch.Tensor],
    model: str | os.PathLike[str] | ClipModel,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """CLIP similarity and R@1 of each prompt's images, then their means over prompts.

    Returns {"similarity", "recall_at_1", "per_prompt": {prompt: {"similarity", "recall_at_1"}}} and, when
    R@1 is undefined (a single prompt), "recall_at_1_undefined" with the reason.
    """
    check_images(images_by_prompt)
    clip = model if isinstance(model, ClipModel) else load_clip(model, device=device, cache_dir=cache_dir)
    prompts = list(images_by_prompt)
    text = clip.embed_texts(prompts)
    images = [clip.embed_images(images_by_prompt[p], batch_size) for p in prompts]
    return summarise(prompts, retrieval_scores(images, list(range(len(prompts))), text))


def summarise(names: list[str], scores: list[dict[str, float | None]]) -> dict[str, Any]:
    result: dict[str, Any] = {
        "similarity": mean_or_none([s["similarity"] for s in scores]),
        "recall_at_1": mean_or_none([s["recall_at_1"] for s in scores]),
        "per_prompt": dict(zip(names, scores, strict=True)),
    }
    if result["recall_at_1"] is None:
        result["recall_at_1_undefined"] = SINGLE_PROMPT_R_AT_1
    return result


# ---------------------------------------------------------------------------------------------------
# Loading, once per process


_LOADED: dict[tuple[str, str, str], ClipModel] = {}


def load_clip(
    name: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    setting: str = "evaluation.clip",
) -> ClipModel:
    """The CLIP `name` names (a hub id, a local directory or "tiny-clip"), loaded once per process and
    device; fp16 on CUDA. Errors name `setting` (the config key or CLI option that gave the name)."""
    device = resolve_device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    source, load_kwargs = resolve_clip(str(name), cache_dir=cache_dir, setting=setting)
    key = (source, str(device), str(dtype))
    if key not in _LOADED:
        _LOADED[key] = _load(source, load_kwargs, device, dtype, str(name), setting)
    return _LOADED[key]


def resolve_clip(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None, setting: str = "evaluation.clip"
) -> tuple[str, dict[str, Any]]:
    """-> (what to pass to from_pretrained, its keyword arguments), after checking that `name` is a CLIP
    checkpoint (config.json of model_type "clip"); reads no weights."""
    if name == TINY_CLIP:
        from trainers.evaluation.tiny_clip import build_tiny_clip

        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        return str(build_tiny_clip(root / TINY_CLIP)), {}
    path = Path(name).expanduser()
    if path.is_dir():
        _check_clip_config(path / "config.json", name, setting)
        return str(path), {}
    if path.exists() or not HUB_ID.match(name):
        raise ClipModelError(
            f"{setting}={name!r}: no such directory (and it is not a hub id of the form 'org/name'); use "
            f"{PAPER_CLIP!r} (the paper's), a local directory holding a CLIP checkpoint, or {TINY_CLIP!r}"
        )
    return _resolve_hub_id(name, setting)


def _check_clip_config(config_file: Path, name: str, setting: str) -> None:
    try:
        config = json.loads(Path(config_file).read_text())
    except (OSError, ValueError):
        raise ClipModelError(
            f"{setting}={name!r} is not a CLIP model: it has no readable config.json (a CLIP checkpoint "
            f"directory holds config.json, the weights and the tokenizer, as {PAPER_CLIP} does)"
        ) from None
    if config.get("model_type") != "clip":
        raise ClipModelError(
            f"{setting}={name!r} is not a CLIP model: its config.json has model_type "
            f"{config.get('model_type')!r}, not 'clip' (e.g. use {PAPER_CLIP!r} or a local copy of it)"
        )


def _resolve_hub_id(repo_id: str, setting: str) -> tuple[str, dict[str, Any]]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    local_only = hub_offline() or not hub_reachable()

    def unreachable(exc: Exception) -> ClipModelError:
        reason = "no such local directory, and the Hugging Face hub cannot be reached"
        if local_only:
            reason += " (offline, or HF_HUB_OFFLINE is set) and no cached copy was found"
        point = f"pass {setting} DIR" if setting.startswith("--") else f"set {setting}=DIR"
        return ClipModelError(f"{setting}={repo_id!r}: {reason}. {download_hint(repo_id, point)}")

    try:
        config_file = hf_hub_download(repo_id, "config.json", local_files_only=local_only)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:  # before EntryNotFoundError: a subclass
        raise unreachable(exc) from exc
    except (RepositoryNotFoundError, EntryNotFoundError) as exc:
        raise ClipModelError(
            f"{setting}={repo_id!r}: no such local directory, and no CLIP model by that name on the hub"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise unreachable(exc) from exc
    _check_clip_config(Path(config_file), repo_id, setting)
    return repo_id, {"local_files_only": local_only}


def _load(
    source: str,
    load_kwargs: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    name: str,
    setting: str,
) -> ClipModel:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    # Each tower is read from the full CLIP checkpoint, so the other tower's weights are "unexpected":
    # transformers' report of them (and its progress bars) is noise here.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        text = CLIPTextModelWithProjection.from_pretrained(source, dtype=dtype, **load_kwargs)
        vision = CLIPVisionModelWithProjection.from_pretrained(source, dtype=dtype, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **load_kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ClipModelError(f"{setting}={name!r}: cannot load it as a CLIP model: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    mean, std = _normalisation(source, load_kwargs)
    for module in (text, vision):
        module.requires_grad_(False)
        module.eval().to(device)
    return ClipModel(
        text=text,
        vision=vision,
        tokenizer=tokenizer,
        image_size=int(vision.config.image_size),
        mean=mean,
        std=std,
        device=device,
        dtype=dtype,
        source=source,
    )


def _normalisation(source: str, load_kwargs: dict[str, Any]) -> tuple[tuple, tuple]:
    """image_mean / image_std from preprocessor_config.json, else CLIP's own constants."""
    path = Path(source) / "preprocessor_config.json"
    if Path(source).is_dir() and not path.is_file():
        return CLIP_MEAN, CLIP_STD
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "preprocessor_config.json", **load_kwargs))
        except Exception:  # no such file anywhere: the checkpoint relies on CLIP's defaults
            return CLIP_MEAN, CLIP_STD
    config = json.loads(path.read_text())
    return tuple(config.get("image_mean", CLIP_MEAN)), tuple(config.get("image_std", CLIP_STD))


# ---------------------------------------------------------------------------------------------------
# The protocol's views


@torch.no_grad()
def orbit_renders(
    render_fn, n_views: int, elevation: float, camera_cfg, resolution: int, batch_size: int = 32
) -> torch.Tensor:
    """`n_views` renders [N, 3, H, W] in [0, 1] (CPU, float32) on the orbit at `elevation` degrees, evenly
    spaced in azimuth from the front, at camera_cfg's eval distance and field of view.

    `render_fn(cameras, width, height)` renders like `VolumeRenderer.render` (a dict with "rgb" [B,H,W,3]).
    """
    from trainers.cameras import CameraBatch, orbit_cameras

    azimuth = torch.linspace(-180.0, 180.0, n_views + 1)[:-1]
    cameras = orbit_cameras(elevation, azimuth, camera_cfg.eval_distance, camera_cfg.eval_fovy)
    out = []
    for start in range(0, n_views, batch_size):
        stop = min(start + batch_size, n_views)
        batch = CameraBatch(**{f.name: getattr(cameras, f.name)[start:stop] for f in fields(cameras)})
        rgb = render_fn(batch, resolution, resolution)["rgb"]
        out.append(rgb.detach().float().clamp(0, 1).permute(0, 3, 1, 2).cpu())
    return torch.cat(out)
