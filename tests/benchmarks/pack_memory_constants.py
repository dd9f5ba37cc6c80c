"""Measure the constants of trainers/memory.py again (CPU only, about a minute; nothing is downloaded).

    python tests/benchmarks/pack_memory_constants.py

- VAE encode: sd21-shaped's AutoencoderKL on the meta device (sizes without arithmetic), fp16, input
  with autograd on: the bytes of the tensors alive after the forward (what the backward needs), and the
  peak through the backward. -> VAE_ENCODE_BYTES_PER_PIXEL
- UNet rows: sd21-shaped's UNet on the meta device, fp16, no grad: the peak of live tensors for 1, 3 and
  12 rows at 64² latents, with attention that never holds the N×N scores (as CUDA's flash and
  memory-efficient SDPA kernels; the meta device would otherwise take the math path). -> UNET_ROW_BYTES_64
- Render: the bytes autograd keeps over one training render (tiny-sd, uniform sampler) at two
  resolutions, per rendered sample, for the default field, 8 hash levels and 128 hidden units. ->
  SAMPLE_BASE_BYTES, SAMPLE_BYTES_PER_LEVEL, SAMPLE_BYTES_PER_HIDDEN_UNIT
"""

from __future__ import annotations

import tempfile
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2**20


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors the ops inside return, while they are alive; `peak` is the most at once."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor._base is None:
                size = tensor.numel() * tensor.element_size()
                self.live += size
                weakref.finalize(tensor, self._free, size)
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def prior_modules() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from trainers.priors.sd21_shaped import UNET_CONFIG, VAE_CONFIG

    with torch.device("meta"):
        vae = AutoencoderKL(**VAE_CONFIG).to(torch.float16).requires_grad_(False)
        for size in (256, 512):
            x = torch.randn(1, 3, size, size, dtype=torch.float16, requires_grad=True)
            with LiveBytes() as live:
                latents = vae.encode(x).latent_dist.mean
                after_forward = live.live
                latents.float().sum().backward()
            print(
                f"VAE encode {size}²: {after_forward / MIB:.0f} MiB alive after the forward "
                f"({after_forward / size**2:.0f} bytes a pixel), {live.peak / MIB:.0f} MiB at the backward's peak"
            )
        sdpa = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: torch.empty(
            *q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device
        )
        try:
            unet = UNet2DConditionModel(**UNET_CONFIG).to(torch.float16)
            for rows in (1, 3, 12):
                x = torch.randn(rows, 4, 64, 64, dtype=torch.float16)
                text = torch.randn(rows, 77, 1024, dtype=torch.float16)
                with torch.no_grad(), LiveBytes() as live:
                    unet(x, torch.full((rows,), 500), text)
                print(f"UNet no-grad, {rows} row(s) at 64² latents: peak {live.peak / MIB:.0f} MiB")
        finally:
            F.scaled_dot_product_attention = sdpa


def render_bytes(overrides: list[str], resolution: int, cache: str) -> int:
    from trainers.config import load_train_config
    from trainers.per_prompt import Trainer

    config = load_train_config(
        None,
        [
            f"resolution={resolution}",
            "prior.name=tiny-sd",
            f"prior.cache_dir={cache}",
            "renderer.estimator=uniform",
            "renderer.num_samples_per_ray=64",
            *overrides,
        ],
    )
    trainer = Trainer(config)
    total = [0]

    def keep(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        trainer.render_step()
    return total[0]


def render(cache: str) -> None:
    for overrides in ([], ["geometry.encoding.n_levels=8"], ["geometry.hidden_dim=128"]):
        small, large = (render_bytes(overrides, r, cache) for r in (32, 64))
        per_sample = (large - small) / ((64**2 - 32**2) * 64)
        print(f"render {overrides or 'defaults'}: {per_sample:.0f} bytes a sample")


if __name__ == "__main__":
    prior_modules()
    with tempfile.TemporaryDirectory() as cache:
        render(cache)
