"""How much memory a worker needs for a pack of K per-prompt trials: an estimate from the config alone.

    estimate = estimate_pack_memory(config, pack=8, on_gpu=True)
    estimate.total_gib, estimate.most_members_within(24 * 2**30)

A packed worker holds one frozen prior and K members, and at each step every member's activations are
alive at once (all renders, one VAE encode over them, one prior call over all their rows, then one
backward). So the step's peak is

    runtime + prior weights + K × (3D model and optimizer + render + encoder + prior rows [+ VSD's LoRA])

Each term comes from the config, with constants measured on SD 2.1-base's architecture (`sd21-shaped`):

- **prior weights**: parameters × bytes of `prior.dtype` (auto: fp16 on a GPU, fp32 on the CPU). A hub
  id or local path is counted at SD 2.1-base's size (UNet, VAE and text encoder: 1.29 B parameters);
  `tiny-sd` and the reference priors are small and counted as `SMALL_PRIOR_BYTES`.
- **CLIP** (`evaluation.clip`, loaded once per worker): ViT-L/14's parameters in fp16 on a GPU, fp32 on
  the CPU; `tiny-clip` is small.
- **3D model and optimizer**: the field's and background's parameters (counted on the meta device, no
  memory) × 16 bytes: fp32 weight, gradient and Adam's two moments.
- **render**: the samples a step renders (batch × resolution² × `renderer.num_samples_per_ray`) × the
  bytes autograd keeps per sample, which follow the hash grid and MLP widths (measured on the CPU: 2,240
  bytes at the defaults). The occupancy grid renders fewer samples; this counts the uniform sampler's.
- **encoder** (`prior.encoder: vae`, latent priors only): the VAE encoder's activations kept for the
  backward, per pixel of `prior.image_size`² (512² native: 1.70 GiB a render in fp16).
- **prior rows**: the guidance method's rows per render (ASD 3, SDS and CSD 2) × the working memory of a
  no-grad UNet forward per row (85 MiB at 64² latents in fp16, flash/memory-efficient attention).
- **VSD**: its LoRA step keeps UNet activations for a backward (0.91 GiB a member, measured).
- **runtime**: the CUDA context and the caching allocator's slack on a GPU; Python, torch and the Ray
  worker on the CPU.

Against the one measurement on a GPU (docs/gpu_check_report.md: `sd21-shaped`, 64 px, ASD, fp16, the VAE
path, four 3D models alive side by side): the terms add up to 5.65 GiB of allocated memory, where the
H100 peaked at 5.61 GiB (torch's max allocated, without the runtime). `docs/packing.md` has the figures.

`tests/benchmarks/pack_memory_constants.py` measures the constants again (CPU, a minute). Pure: reads
the config, allocates nothing, needs no device. The sweep spec's check compares it with the
worker's memory (`resources.gpu_memory_gb` or `resources.memory_gb`) before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.config import TrainConfig
from trainers.reference.config import REFERENCE_PRIORS

GIB = 2**30
MIB = 2**20

# SD 2.1-base's parameters (trainers/priors/sd21_shaped.py: PARAMETER_COUNTS, the real model's sizes):
# UNet, kl-f8 VAE, OpenCLIP ViT-H text tower.
SD21_PARAMETERS = 865_910_724 + 83_653_863 + 340_387_840
SD_NATIVE_IMAGE_SIZE = 512
SD_LATENT_FACTOR = 8  # the VAE downsamples by 8: 512 px -> 64² latents
SMALL_PRIOR_BYTES = 256 * MIB  # tiny-sd (a 1M-parameter UNet) and the reference priors: weights and caches
CLIP_L14_PARAMETERS = 427_616_513  # openai/clip-vit-large-patch14 (the paper's evaluation CLIP)

# Measured on sd21-shaped's modules on the meta device (tensor sizes, no arithmetic), fp16:
# the VAE encoder's activations alive after its forward with autograd on, per input pixel (1,743 MiB at
# 512², 401 MiB at 256²; the backward adds 0.1 GiB at its peak);
VAE_ENCODE_BYTES_PER_PIXEL = 6_972
# the peak working memory of a no-grad UNet forward, per row at 64² latents (85, 255 and 1,020 MiB for
# 1, 3 and 12 rows), with attention that never holds the N×N scores (PyTorch's flash and
# memory-efficient SDPA kernels, the CUDA default); it scales with the latent area.
UNET_ROW_BYTES_64 = 85 * MIB
# VSD's LoRA step at 64² latents, fp16: its peak above SDS's on the H100 (6.52 - 5.61 GiB).
VSD_LORA_BYTES_64 = int(0.91 * GIB)

# Per rendered sample, what autograd keeps of the field (measured on the CPU by saved-tensor hooks over a
# training render, uniform sampler; 2,240 bytes at the default 16 levels, 2 features, 64 hidden units):
# 8 corner indices (int64) and weights (fp32) per hash level and its features, the MLP's hidden
# activations, and the ray's own compositing.
SAMPLE_BASE_BYTES = 64
SAMPLE_BYTES_PER_LEVEL = 8 * 8 + 8 * 4  # + 4 per feature of the level
SAMPLE_BYTES_PER_HIDDEN_UNIT = 8

ADAM_BYTES_PER_PARAMETER = 16  # fp32 weight, gradient, exp_avg, exp_avg_sq
GPU_RUNTIME_BYTES = 1 * GIB  # CUDA context (~0.5 GiB) and the caching allocator's slack
CPU_RUNTIME_BYTES = 1 * GIB  # Python, torch and the Ray worker process

PRIOR_ROWS = {"asd": 3, "sds": 2, "csd": 2, "vsd": 2, "supervised": 0}  # per render, one prior call


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of a worker's training-step peak: the shared parts once, each member's parts per member."""

    pack: int
    runtime: int
    prior: int
    clip: int  # the evaluation CLIP, once per worker
    model: int  # per member: the 3D model and its optimizer
    render: int  # per member
    encoder: int  # per member
    rows: int  # per member
    lora: int  # per member (VSD)

    @property
    def shared(self) -> int:
        return self.runtime + self.prior + self.clip

    @property
    def per_member(self) -> int:
        return self.model + self.render + self.encoder + self.rows + self.lora

    @property
    def total(self) -> int:
        return self.shared + self.pack * self.per_member

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def most_members_within(self, available: float) -> int:
        """The largest pack this worker's memory holds (0: not even one member)."""
        return max(0, int((available - self.shared) // max(1, self.per_member)))

    def describe(self) -> str:
        def gib(value: int) -> str:
            return f"{value / GIB:.2f}"

        parts = [
            ("3D model and optimizer", self.model),
            ("render", self.render),
            ("VAE encode", self.encoder),
            ("prior rows", self.rows),
            ("VSD LoRA", self.lora),
        ]
        member = ", ".join(f"{name} {gib(value)}" for name, value in parts if value)
        clip = f", CLIP {gib(self.clip)} GiB" if self.clip else ""
        return (
            f"about {gib(self.total)} GiB: the prior {gib(self.prior)} GiB once{clip}, runtime "
            f"{gib(self.runtime)} GiB, and {self.pack} × {gib(self.per_member)} GiB per member ({member})"
        )


def _dtype_bytes(dtype: str, on_gpu: bool) -> int:
    if dtype == "auto":
        return 2 if on_gpu else 4
    return 4 if dtype == "fp32" else 2


def _sd_size(name: str) -> bool:
    """A prior counted at SD 2.1-base's size: sd21-shaped, a hub id or a local path."""
    return name != "tiny-sd" and name not in REFERENCE_PRIORS


def model_parameters(config: TrainConfig) -> int:
    """The 3D model's and background's parameters, counted on the meta device (nothing allocated)."""
    import torch

    from trainers.geometry.implicit_volume import ImplicitVolume
    from trainers.rendering import Background

    geometry = config.geometry.model_copy(
        update={"encoding": config.geometry.encoding.model_copy(update={"backend": "torch"})}
    )
    with torch.device("meta"):
        modules = [ImplicitVolume(geometry), Background(config.background)]
    return sum(p.numel() for module in modules for p in module.parameters())


def estimate_pack_memory(config: TrainConfig, pack: int = 1, on_gpu: bool = True) -> MemoryEstimate:
    """The training-step peak of a worker that trains `pack` members of this config on one prior."""
    prior = config.prior
    sd = _sd_size(prior.name)
    dtype = _dtype_bytes(prior.dtype, on_gpu)
    half = dtype / 2  # the activation constants are fp16's
    image = prior.image_size or SD_NATIVE_IMAGE_SIZE
    latent_area = (image / SD_LATENT_FACTOR / 64) ** 2  # relative to 64² latents
    encoding = config.geometry.encoding
    per_sample = (
        SAMPLE_BASE_BYTES
        + encoding.n_levels * (SAMPLE_BYTES_PER_LEVEL + 4 * encoding.n_features_per_level)
        + SAMPLE_BYTES_PER_HIDDEN_UNIT * config.geometry.hidden_dim * config.geometry.n_hidden_layers
    )
    samples = config.batch_size * config.resolution**2 * config.renderer.num_samples_per_ray
    method = config.guidance.method
    return MemoryEstimate(
        pack=pack,
        runtime=GPU_RUNTIME_BYTES if on_gpu else CPU_RUNTIME_BYTES,
        prior=SD21_PARAMETERS * dtype if sd else SMALL_PRIOR_BYTES,
        clip=(
            0 if config.evaluation.clip in (None, "tiny-clip") else CLIP_L14_PARAMETERS * (2 if on_gpu else 4)
        ),
        model=model_parameters(config) * ADAM_BYTES_PER_PARAMETER,
        render=samples * per_sample,
        encoder=(
            int(config.batch_size * image**2 * VAE_ENCODE_BYTES_PER_PIXEL * half)
            if sd and prior.encoder == "vae"
            else 0
        ),
        rows=int(PRIOR_ROWS.get(method, 3) * config.batch_size * UNET_ROW_BYTES_64 * latent_area * half)
        if sd
        else 0,
        lora=int(VSD_LORA_BYTES_64 * latent_area * half) if sd and method == "vsd" else 0,
    )
