"""The prior's fast paths (dtype, attention, channels-last, torch.compile), its image path, and its OOM message.

Every CUDA-only branch is a decision made by `resolve_fast_paths` from a `DeviceCapabilities`, so the
decisions are specified here on the CPU with the capabilities of GPUs this machine does not have.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from trainers.config_base import ConfigError, build_config
from trainers.guidance import GuidanceConfig, make_guidance
from trainers.priors import base
from trainers.priors.base import (
    DeviceCapabilities,
    FastPathFallback,
    FastPaths,
    PriorConfig,
    TrainingOutOfMemoryError,
    resolve_fast_paths,
)
from trainers.priors.stable_diffusion import LATENT_TO_RGB, StableDiffusionPrior, _freeze

H100 = DeviceCapabilities(device_type="cuda", bf16=True, sdpa=True, compile_blocker=None)
T4 = DeviceCapabilities(device_type="cuda", bf16=False, sdpa=True, compile_blocker=None)  # pre-Ampere
CPU = DeviceCapabilities(device_type="cpu", bf16=True, sdpa=True, compile_blocker=None)
OLD_TORCH = DeviceCapabilities(device_type="cuda", bf16=True, sdpa=False, compile_blocker="no torch.compile")


def resolve(caps: DeviceCapabilities, **asked) -> FastPaths:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a decision that needs no fallback must not warn
        return resolve_fast_paths(PriorConfig(**asked), caps)


# ----------------------------------------------------------------------------------------------------
# Defaults: the fastest correct choice per device


def test_defaults_on_cuda_are_fp16_sdpa_and_channels_last_without_compile():
    assert resolve(H100) == FastPaths(torch.float16, "sdpa", channels_last=True, compile_unet=False)


def test_defaults_on_the_cpu_are_fp32_sdpa_and_the_default_layout():
    assert resolve(CPU) == FastPaths(torch.float32, "sdpa", channels_last=False, compile_unet=False)


def test_explicit_choices_the_device_can_honour_are_kept_without_a_message():
    assert resolve(H100, dtype="bf16").dtype == torch.bfloat16
    assert resolve(CPU, dtype="fp16").dtype == torch.float16
    assert resolve(H100, dtype="fp32").dtype == torch.float32
    assert resolve(H100, attention="default").attention == "default"
    assert resolve(CPU, channels_last=True).channels_last
    assert not resolve(H100, channels_last=False).channels_last
    assert resolve(H100, compile_unet=True).compile_unet


# ----------------------------------------------------------------------------------------------------
# Fallbacks: a message that names the key, and a run that goes on


@pytest.mark.parametrize(
    "caps, asked, field, expected",
    [
        (T4, {"dtype": "bf16"}, "prior.dtype=bf16", {"dtype": torch.float16}),
        (OLD_TORCH, {"attention": "sdpa"}, "prior.attention=sdpa", {"attention": "default"}),
        (OLD_TORCH, {"compile_unet": True}, "prior.compile_unet=true", {"compile_unet": False}),
    ],
)
def test_a_fast_path_the_device_cannot_honour_falls_back_with_a_message_naming_the_key(
    caps, asked, field, expected
):
    with pytest.warns(FastPathFallback, match=field) as record:
        fast = resolve_fast_paths(PriorConfig(**asked), caps)
    assert len(record) == 1
    assert {key: getattr(fast, key) for key in expected} == expected
    assert len(fast.fallbacks) == 1 and field in fast.fallbacks[0]


def test_auto_attention_quietly_uses_the_default_processors_where_torch_lacks_sdpa():
    assert resolve(OLD_TORCH).attention == "default"


def test_torch_compile_is_blocked_on_the_cpu_without_a_compiler_and_on_cuda_without_triton(monkeypatch):
    monkeypatch.setattr(base.shutil, "which", lambda name: None)
    assert "C++ compiler" in base._compile_blocker(torch.device("cpu"))
    monkeypatch.setattr(base.importlib.util, "find_spec", lambda name: None)
    assert "Triton" in base._compile_blocker(torch.device("cuda"))


@pytest.mark.parametrize("has_bf16", [True, False])
def test_probing_a_cuda_device_asks_torch_whether_it_has_bf16(monkeypatch, has_bf16):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: has_bf16)
    monkeypatch.setattr(base, "_compile_blocker", lambda device: None)
    caps = DeviceCapabilities.probe(torch.device("cuda"))
    assert caps.device_type == "cuda" and caps.bf16 is has_bf16


def test_probing_the_cpu_finds_sdpa_and_bf16():
    caps = DeviceCapabilities.probe(torch.device("cpu"))
    assert caps.device_type == "cpu" and caps.sdpa and caps.bf16


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"dtype": "fp8"}, "dtype"),
        ({"attention": "flash"}, "attention"),
        ({"encoder": "taesd"}, "encoder"),
        ({"compile_unet": "sometimes"}, "compile_unet"),
    ],
)
def test_invalid_fast_path_values_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        build_config(PriorConfig, overrides)


def test_configs_saved_with_the_old_attention_switch_still_load():
    assert PriorConfig(enable_memory_efficient_attention=True) == PriorConfig()
    old_off = PriorConfig(enable_memory_efficient_attention=False)
    assert old_off.attention == "default" and old_off.channels_last is False


# ----------------------------------------------------------------------------------------------------
# What loading does with the decision


def test_sdpa_replaces_pinned_legacy_attention_and_default_leaves_it(tiny_sd_dir):
    for attention, expected in (("sdpa", AttnProcessor2_0), ("default", AttnProcessor)):
        prior = StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cpu")
        prior.unet.set_attn_processor(AttnProcessor())  # a checkpoint pinned to the legacy processor
        _freeze(prior.unet, torch.device("cpu"), "unet", FastPaths(torch.float32, attention, False, False))
        assert {type(p) for p in prior.unet.attn_processors.values()} == {expected}


def test_channels_last_puts_the_convolutions_in_nhwc_and_keeps_the_prediction(tiny_sd_dir):
    plain = StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cpu")
    nhwc = StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cpu", channels_last=True)
    assert nhwc.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x_t, t, text = torch.randn(2, 4, 32, 32), torch.tensor([10, 900]), plain.encode_text(["a cat", ""])
    with torch.no_grad():
        torch.testing.assert_close(nhwc.predict_noise(x_t, t, text), plain.predict_noise(x_t, t, text))


def test_compile_unet_compiles_the_unet_in_place_so_vsd_still_reaches_its_modules(tiny_sd_dir, monkeypatch):
    monkeypatch.setattr(base, "_compile_blocker", lambda device: None)
    prior = StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cpu", compile_unet=True)
    # nn.Module.compile: the same module object, compiled at its first forward (not run here: minutes)
    assert prior.unet._compiled_call_impl is not None
    assert hasattr(prior.unet, "class_embedding") and prior.describe()["compile_unet"] is True


def test_the_first_call_of_a_compiled_unet_runs_under_the_node_lock_and_later_calls_do_not(
    tiny_sd_dir, monkeypatch, tmp_path
):
    from trainers.priors import stable_diffusion

    monkeypatch.setattr(base, "_compile_blocker", lambda device: None)
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kwargs: None
    )  # eager: seconds, not minutes
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    locked = []
    real_lock = stable_diffusion.node_lock

    def recording_lock(path, what, **kwargs):
        locked.append((path, what))
        return real_lock(path, what, **kwargs)

    monkeypatch.setattr(stable_diffusion, "node_lock", recording_lock)
    prior = StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cpu", compile_unet=True)
    x_t, t, text = torch.randn(2, 4, 32, 32), torch.tensor([500, 20]), prior.encode_text(["a", "b"])
    with torch.no_grad():
        prior.predict_noise(x_t, t, text)
        prior.predict_noise(x_t, t, text)
    assert len(locked) == 1 and "compiled UNet" in locked[0][1]
    assert locked[0][0] == tmp_path / "dreamsweep-unet-compile.lock"  # beside Inductor's cache


def test_a_bf16_prior_on_the_cpu_computes_in_bf16_and_hands_out_float32(tiny_sd_dir):
    prior = StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cpu", dtype="bf16")
    assert prior.dtype == torch.bfloat16
    with torch.no_grad():
        eps = prior.predict_noise(torch.randn(1, 4, 32, 32), torch.tensor([500]), prior.encode_text(["a"]))
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()


# ----------------------------------------------------------------------------------------------------
# The image path


def test_the_default_vae_path_upsamples_the_render_and_passes_gradients_through_the_encoder(tiny_sd_prior):
    assert tiny_sd_prior.encoder == "vae" and tiny_sd_prior.input_size == tiny_sd_prior.image_size == 64
    guidance = make_guidance(GuidanceConfig(method="sds"), tiny_sd_prior)
    render = torch.rand(1, 3, 16, 16, requires_grad=True)
    x0 = guidance.to_prior_input(render)
    assert x0.shape == (1, 4, 32, 32)  # 16 px -> 64 px -> VAE (factor 2) -> 32² latents
    x0.square().sum().backward()
    assert render.grad is not None and render.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def linear_prior(tiny_sd_dir) -> StableDiffusionPrior:
    return StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cpu", encoder="linear")


def test_the_linear_path_takes_renders_at_the_latent_size_and_never_runs_the_vae(linear_prior):
    assert linear_prior.input_size == linear_prior.image_size // linear_prior.vae_scale_factor == 32
    guidance = make_guidance(GuidanceConfig(method="sds"), linear_prior)
    calls = []
    handle = linear_prior.vae.register_forward_pre_hook(lambda *_: calls.append(1))
    linear_prior.vae.encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    render = torch.rand(2, 3, 64, 64, requires_grad=True)
    x0 = guidance.to_prior_input(render)
    handle.remove()
    assert x0.shape == (2, 4, 32, 32) and not calls
    x0.sum().backward()
    assert render.grad.abs().sum() > 0


def test_the_linear_map_inverts_sds_latent_preview_map(linear_prior):
    images = torch.rand(1, 3, 32, 32)
    latents = linear_prior.encode_images(images)
    back = torch.einsum("blhw,lc->bchw", latents, torch.tensor(LATENT_TO_RGB))
    torch.testing.assert_close((back + 1) / 2, images, atol=1e-5, rtol=0)


def test_renders_at_the_wrong_size_for_the_linear_path_name_the_size_it_takes(linear_prior):
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\] \(the latent size \(prior.encoder=linear\)\)"):
        linear_prior.encode_images(torch.rand(1, 3, 64, 64))


# ----------------------------------------------------------------------------------------------------
# Out of memory


class _OutOfMemory(torch.nn.Module):
    """Stands in for a module that exhausts the GPU (the CUDA allocator raises torch.OutOfMemoryError)."""

    def forward(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_out_of_memory_names_the_config_keys_that_reduce_memory(tiny_sd_dir, part):
    prior = StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cpu")
    if part == "unet":
        prior.unet = _OutOfMemory()
        where = "the UNet forward"

        def call():
            return prior.predict_noise(torch.randn(1, 4, 32, 32), torch.tensor([1]), torch.randn(1, 77, 32))

    else:
        prior.vae.encoder = _OutOfMemory()
        where = "the VAE encoder (prior.encoder=vae)"

        def call():
            return prior.encode_images(torch.rand(1, 3, 64, 64))

    with pytest.raises(TrainingOutOfMemoryError) as caught:
        call()
    message = str(caught.value)
    assert isinstance(caught.value, torch.OutOfMemoryError)  # code catching OOM still catches it
    assert (
        f"out of memory in {where.replace(chr(92), '')}" in message
        and "Tried to allocate 2.00 GiB" in message
    )
    for key in ("batch_size", "prior.encoder=linear", "prior.image_size", "resolution", "prior.dtype"):
        assert key in message
