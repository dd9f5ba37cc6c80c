"""sd21-shaped: SD 2.1-base's exact architecture with random weights, built once and loaded like real weights.

How the size is checked without making CI slow: the published parameter counts are asserted on the meta
device (the project's configs, no memory, under a second), and the real-size shape flow of a step (64 px
render -> 512 px -> VAE -> 64² latents -> one batched UNet forward) runs on meta tensors too. One test
module builds the real 2.5 GB pipeline once (about a minute), loads it through `load_prior` /
`from_pretrained` in fp16 (half the memory of fp32) and asserts the same counts, and the stored weights,
on the loaded modules; the build is deleted when the module ends.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from trainers.config_base import ConfigError
from trainers.guidance import GuidanceConfig, make_guidance
from trainers.priors import PriorConfig, load_prior
from trainers.priors import sd21_shaped as sd21
from trainers.priors.stable_diffusion import StableDiffusionPrior, check_image_size
from trainers.priors.tiny_sd import make_scheduler, make_tokenizer

PUBLISHED = {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}


def test_the_configs_have_sd21_base_published_parameter_counts():
    assert sd21.count_parameters_on_meta() == PUBLISHED == sd21.PARAMETER_COUNTS


def test_the_unet_config_is_sd21_base():
    config = sd21.UNET_CONFIG
    assert config["block_out_channels"] == [320, 640, 1280, 1280]
    assert config["cross_attention_dim"] == 1024 and config["use_linear_projection"] is True
    # 5/10/20/20 heads of 64 channels each
    heads = config["attention_head_dim"]
    assert [width // n for width, n in zip(config["block_out_channels"], heads, strict=True)] == [64] * 4


def _meta_prior() -> StableDiffusionPrior:
    tokenizer = make_tokenizer(Path(tempfile.mkdtemp()))
    with torch.device("meta"):
        unet, vae, text_encoder = sd21.make_unet(), sd21.make_vae(), sd21.make_text_encoder(tokenizer)
    return StableDiffusionPrior(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=make_scheduler(),
        image_size=check_image_size(None, sd21.UNET_CONFIG, sd21.VAE_CONFIG),
        device=torch.device("meta"),
        dtype=torch.float32,
    )


def test_at_real_size_a_64px_render_is_upsampled_to_512_and_encoded_to_64x64_latents():
    prior = _meta_prior()
    assert prior.image_size == 512 and prior.vae_scale_factor == 8
    guidance = make_guidance(GuidanceConfig(method="asd"), prior)
    x0 = guidance.to_prior_input(torch.empty(2, 3, 64, 64, device="meta"))
    assert x0.shape == (2, 4, 64, 64)
    # ASD's one batched forward: [uncond, cond, cond at t+Δt] for each render
    eps = prior.predict_noise(
        torch.empty(6, 4, 64, 64, device="meta"),
        torch.full((6,), 500, device="meta"),
        torch.empty(6, 77, 1024, device="meta"),
    )
    assert eps.shape == (6, 4, 64, 64)


def test_an_image_size_off_the_vae_and_unet_factor_names_the_key_and_valid_sizes():
    with pytest.raises(ConfigError, match=r"prior.image_size=500 .* multiple of 64.* 448, 512"):
        check_image_size(500, sd21.UNET_CONFIG, sd21.VAE_CONFIG)
    assert check_image_size(256, sd21.UNET_CONFIG, sd21.VAE_CONFIG) == 256


# ----------------------------------------------------------------------------------------------------
# The real build (one per module)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("sd21-cache")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)  # 2.5 GB: not left for pytest's kept temp dirs


@pytest.fixture(scope="module")
def loaded(cache_dir: Path) -> StableDiffusionPrior:
    # image_size=64 (8² latents) keeps the forward below cheap; the weights are the full-size ones.
    return load_prior(
        PriorConfig(name="sd21-shaped", cache_dir=str(cache_dir), dtype="fp16", image_size=64), "cpu"
    )


def test_sd21_shaped_builds_into_the_cache_dir_in_the_stable_diffusion_layout(loaded, cache_dir):
    directory = cache_dir / "sd21-shaped"
    index = json.loads((directory / "model_index.json").read_text())
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (directory / component).is_dir()
        assert index[component][0] in ("diffusers", "transformers")
    with safe_open(directory / "unet" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        assert weights.get_slice("conv_in.weight").get_dtype() == "F16"  # stored in fp16: 2.5 GB, not 5


def test_sd21_shaped_loads_through_from_pretrained_with_the_published_parameter_counts(loaded):
    assert isinstance(loaded, StableDiffusionPrior)
    counts = {name: sum(p.numel() for p in getattr(loaded, name).parameters()) for name in PUBLISHED}
    assert counts == PUBLISHED
    assert loaded.dtype == torch.float16 and not any(p.requires_grad for p in loaded.unet.parameters())
    assert loaded.image_size == 64 and loaded.vae_scale_factor == 8  # as configured (the fixture asks 64)


def test_the_loaded_weights_are_the_stored_ones(loaded, cache_dir):
    directory = cache_dir / "sd21-shaped"
    with safe_open(directory / "unet" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        stored = weights.get_tensor("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    loaded_weight = loaded.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert stored.shape == (640, 1024)  # cross-attention keys from the 1024-d text embeddings
    assert torch.equal(loaded_weight, stored) and stored.float().std() > 0


def test_building_sd21_shaped_again_reuses_the_build(loaded, cache_dir):
    weights = cache_dir / "sd21-shaped" / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert sd21.build_sd21_shaped(cache_dir / "sd21-shaped", progress=False) == cache_dir / "sd21-shaped"
    assert weights.stat().st_mtime_ns == before
