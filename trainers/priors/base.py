"""The interface every diffusion prior offers to the guidance methods.

A prior is a frozen ε-prediction model with a noise schedule. Guidance only ever calls the methods below,
so a diffusers Stable Diffusion pipeline, the random-weight `tiny-sd` and the exact reference prior
(`trainers.reference.prior`) are interchangeable.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import field_validator, model_validator

from trainers.config_base import ConfigBase
from trainers.reference.config import REFERENCE_PRIORS, ReferencePriorConfig


class PriorConfig(ConfigBase):
    # "tiny-sd" (built-in random weights), "sd21-shaped" (random weights at SD 2.1-base's real size),
    # "reference" (exact prior of the procedural scenes), a hub id such as
    # "stabilityai/stable-diffusion-2-1-base", or a local directory in that layout.
    name: str = "tiny-sd"
    # The image size the prior takes (renders are resized to it); None: the prior's native size.
    image_size: int | None = None
    # How renders become a latent prior's x0 (pixel-space priors ignore it):
    # "vae": the authors' path. The render (64 px) is upsampled to image_size (512 for SD 2.1-base) and
    #   VAE-encoded to 64² latents; the gradient flows back through the encoder.
    # "linear": the cheap path. The render is resized to the latent size and mapped to latents by a fixed
    #   per-pixel linear map (SD's RGB<->latent approximation): no VAE in the step, so the encoder's
    #   forward and backward (about as costly as the UNet at 512 px) and its activations are gone; the
    #   latents carry colour but no texture detail, so the prior sees a cruder image.
    encoder: Literal["vae", "linear"] = "vae"
    # Fast paths. Each default is the fastest correct choice for the device, and a choice the device
    # cannot honour falls back with a FastPathFallback warning that says so (see `resolve_fast_paths`).
    # Weights and activations: "auto" = fp16 on CUDA (tensor cores, half the memory), fp32 elsewhere.
    # bf16 needs a GPU with bf16 (Ampere or newer); fp16/bf16 on the CPU run, but slower than fp32.
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    # Attention kernel: "sdpa" = PyTorch's scaled_dot_product_attention (flash / memory-efficient
    # kernels); "default" = whatever the checkpoint's processors are; "auto" = sdpa where torch has it.
    attention: Literal["auto", "sdpa", "default"] = "auto"
    # NHWC memory layout for the UNet and VAE convolutions; None (auto): on CUDA only, where tensor
    # cores want it (on the CPU it only adds layout conversions).
    channels_last: bool | None = None
    # Opt-in torch.compile of the UNet (minutes of compilation at the first steps; then faster steps).
    # Needs Triton on CUDA and a C++ compiler on the CPU; each change of input shape recompiles, and
    # VSD's LoRA switching on and off may recompile too.
    compile_unet: bool = False
    # Opt-in: replay the batched UNet call from CUDA graphs captured at its packed row count (one launch
    # instead of thousands; trainers/priors/cuda_graph.py). A call with fewer rows (a pack with an empty
    # slot) pads to the captured size; autograd through the UNet (VSD) runs eagerly. CUDA only: elsewhere
    # it falls back to the eager call with a FastPathFallback warning.
    cuda_graph: bool = False
    # Where built-in priors are written once and hub downloads are cached; None: ~/.cache/dreamsweep.
    cache_dir: str | None = None
    # Settings of `name: reference` (views cached per prompt, the unconditional set, ...); unused otherwise.
    reference: ReferencePriorConfig = ReferencePriorConfig()

    @model_validator(mode="before")
    @classmethod
    def _legacy_attention_key(cls, data: Any) -> Any:
        # Configs saved before the fast-path keys existed (checkpoints, `dreamsweep best` output) carry
        # `enable_memory_efficient_attention`; false meant neither SDPA nor channels-last.
        if isinstance(data, dict) and "enable_memory_efficient_attention" in data:
            data = dict(data)
            if not data.pop("enable_memory_efficient_attention"):
                data.setdefault("attention", "default")
                data.setdefault("channels_last", False)
        return data

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                "prior.name is empty: use 'tiny-sd', 'sd21-shaped', 'reference', a hub id or a local path"
            )
        if value.startswith("reference") and value not in REFERENCE_PRIORS:
            raise ValueError(
                f"prior.name={value!r} is no reference prior; use one of {', '.join(REFERENCE_PRIORS)}"
            )
        return value

    @field_validator("image_size")
    @classmethod
    def _image_size_positive(cls, value: int | None) -> int | None:
        # Divisibility depends on the prior's architecture and is checked when it is loaded.
        if value is not None and value <= 0:
            raise ValueError(
                "prior.image_size must be a positive number of pixels, or null for the native size"
            )
        return value


# ----------------------------------------------------------------------------------------------------
# Fast paths: what the config asks for, what the device can do, what is used


class FastPathFallback(UserWarning):
    """A fast path the config asked for is not available on this device; the run goes on without it."""


@dataclass(frozen=True)
class DeviceCapabilities:
    """What a device offers the prior's fast paths. `probe` reads it; tests construct it directly."""

    device_type: str  # "cuda", "cpu", "mps", ...
    bf16: bool  # bf16 arithmetic at full speed (CUDA: compute capability 8.0 or newer)
    sdpa: bool  # torch.nn.functional.scaled_dot_product_attention exists
    compile_blocker: str | None  # why torch.compile cannot run here; None when it can

    @classmethod
    def probe(cls, device: torch.device) -> DeviceCapabilities:
        bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return cls(
            device_type=device.type,
            bf16=bf16 or device.type == "cpu",  # the CPU computes bf16 (slowly), so honour the ask
            sdpa=hasattr(torch.nn.functional, "scaled_dot_product_attention"),
            compile_blocker=_compile_blocker(device),
        )


def _compile_blocker(device: torch.device) -> str | None:
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if sys.platform == "win32":
        return "torch.compile's inductor backend does not run on Windows"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (inductor generates Triton kernels on CUDA)"
        return None
    if device.type == "cpu":
        if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
            return "no C++ compiler on PATH (inductor compiles C++ kernels on the CPU)"
        return None
    return f"torch.compile is not set up for {device.type} devices here"


@dataclass(frozen=True)
class FastPaths:
    """The fast paths a prior is loaded with, after `resolve_fast_paths`."""

    dtype: torch.dtype
    attention: Literal["sdpa", "default"]
    channels_last: bool
    compile_unet: bool
    cuda_graph: bool = False
    fallbacks: tuple[str, ...] = ()  # one sentence per asked-for path that the device could not honour


def resolve_fast_paths(cfg: PriorConfig, caps: DeviceCapabilities) -> FastPaths:
    """Pure decision: the config's asks against the device's capabilities. Warns once per fallback."""
    cuda = caps.device_type == "cuda"
    fallbacks: list[str] = []

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(cfg.dtype)
    if dtype is None:  # auto
        dtype = torch.float16 if cuda else torch.float32
    elif dtype is torch.bfloat16 and not caps.bf16:
        dtype = torch.float16 if cuda else torch.float32
        fallbacks.append(
            f"prior.dtype=bf16: this {caps.device_type} device has no bf16 arithmetic (CUDA needs compute "
            f"capability 8.0+); using {str(dtype).removeprefix('torch.')}. Set prior.dtype=fp16 to silence this"
        )

    attention: Literal["sdpa", "default"] = "sdpa" if caps.sdpa else "default"
    if cfg.attention == "default":
        attention = "default"
    elif cfg.attention == "sdpa" and not caps.sdpa:
        fallbacks.append(
            f"prior.attention=sdpa: torch {torch.__version__} has no scaled_dot_product_attention; using the "
            "checkpoint's own attention. Upgrade torch, or set prior.attention=default to silence this"
        )

    channels_last = cuda if cfg.channels_last is None else cfg.channels_last

    compile_unet = cfg.compile_unet
    if compile_unet and caps.compile_blocker:
        compile_unet = False
        fallbacks.append(
            f"prior.compile_unet=true: {caps.compile_blocker}; the UNet runs uncompiled. Set "
            "prior.compile_unet=false to silence this"
        )

    cuda_graph = cfg.cuda_graph and cuda
    if cfg.cuda_graph and not cuda:
        fallbacks.append(
            f"prior.cuda_graph=true: CUDA graphs need a CUDA device, and this one is {caps.device_type}; the "
            "UNet runs eagerly. Set prior.cuda_graph=false to silence this"
        )

    for message in fallbacks:
        warnings.warn(message, FastPathFallback, stacklevel=3)
    return FastPaths(dtype, attention, channels_last, compile_unet, cuda_graph, tuple(fallbacks))


# ----------------------------------------------------------------------------------------------------
# Out of memory


# The config keys that shrink a step's memory, biggest effect first.
MEMORY_KEYS = (
    "batch_size (renders per step; every prior forward scales with it)",
    "prior.encoder=linear (no VAE encoder activations kept for the backward at image_size)",
    "prior.image_size (e.g. 256: 4x fewer latents for the VAE and the UNet)",
    "resolution (the render size: rays, samples and the renderer's activations)",
    "prior.dtype=fp16 or bf16 (half the weights and activations)",
    "renderer.num_samples_per_ray",
)


class TrainingOutOfMemoryError(torch.OutOfMemoryError):
    """torch's out-of-memory error from a training step (prior, render, backward or optimizer step),
    with the config keys that reduce memory in its message."""


@contextmanager
def out_of_memory_hint(where: str) -> Iterator[None]:
    """Re-raise an out-of-memory error from `where` naming the config keys that reduce memory."""
    try:
        yield
    except TrainingOutOfMemoryError:
        raise
    except torch.OutOfMemoryError as exc:
        keys = "\n  ".join(MEMORY_KEYS)
        raise TrainingOutOfMemoryError(
            f"out of memory in {where}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}\n"
            f"To use less memory, lower one of these config keys:\n  {keys}"
        ) from exc


def default_cache_dir(cfg: PriorConfig | None = None) -> Path:
    """cfg.cache_dir, else $DREAMSWEEP_CACHE, else ~/.cache/dreamsweep."""
    chosen = (cfg.cache_dir if cfg else None) or os.environ.get("DREAMSWEEP_CACHE") or "~/.cache/dreamsweep"
    return Path(chosen).expanduser()


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """None or "auto": CUDA when present, else the CPU; anything else as torch reads it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class DiffusionPrior:
    """What guidance needs from a prior. Subclasses fill these in."""

    num_train_timesteps: int
    alphas_cumprod: torch.Tensor  # [T], float32, on `device`
    image_size: int  # the (square) image size the prior takes
    in_pixel_space: bool  # True: x0 are images scaled to [-1, 1]; False: VAE latents
    device: torch.device
    dtype: torch.dtype
    unet: torch.nn.Module | None = None  # for VSD's LoRA; None when the prior has no UNet
    # True: every predict_noise call takes each row's camera (flattened c2w) as `class_labels`.
    camera_conditioned: bool = False

    @property
    def input_size(self) -> int:
        """The (square) render size `encode_images` takes: `image_size` unless the prior says otherwise."""
        return self.image_size

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> conditioning embeddings [N, L, D] (the empty string is the unconditional one)."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Renders [B, 3, H, W] in [0, 1] at `input_size` -> x0 (latents, or pixels in [-1, 1]), float32."""
        raise NotImplementedError

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 -> images [B, 3, H, W] in [0, 1]."""
        raise NotImplementedError

    def predict_noise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_embeddings: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One batched forward: ε̂(x_t, t, text) for every row, returned as float32."""
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "image_size": self.image_size,
            "in_pixel_space": self.in_pixel_space,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }
