"""Diffusion priors: tiny-sd is built in the SD layout and loaded like real weights; errors name the field."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from trainers.config_base import ConfigError
from trainers.priors import default_cache_dir, load_prior, resolve_device, tiny_sd
from trainers.priors.base import PriorConfig
from trainers.priors.stable_diffusion import HubUnreachableError, StableDiffusionPrior
from trainers.priors.tiny_sd import build_tiny_sd

HUB_ID = "stabilityai/stable-diffusion-2-1-base"


@pytest.fixture(scope="module")
def prior(tiny_sd_dir: Path) -> StableDiffusionPrior:
    return StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cpu")


@pytest.fixture(scope="module")
def pixel_prior(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionPrior:
    directory = build_tiny_sd(tmp_path_factory.mktemp("pixel") / "tiny-sd-pixel", pixel_space=True)
    return StableDiffusionPrior.from_pretrained(directory, device="cpu")


@contextmanager
def count_calls(module: torch.nn.Module) -> Iterator[list[int]]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    handle = module.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------------
# tiny-sd on disk


def test_tiny_sd_is_saved_in_the_stable_diffusion_layout(tiny_sd_dir):
    index = json.loads((tiny_sd_dir / "model_index.json").read_text())
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_sd_dir / component).is_dir()
        assert index[component][0] in ("diffusers", "transformers")
    assert (tiny_sd_dir / "unet" / "config.json").exists()
    assert (tiny_sd_dir / "scheduler" / "scheduler_config.json").exists()


def test_tiny_sd_tokenizer_vocabulary_is_generated_byte_level_bpe(tiny_sd_dir):
    vocab = json.loads((tiny_sd_dir / "tokenizer" / "vocab.json").read_text())
    assert (tiny_sd_dir / "tokenizer" / "merges.txt").exists()
    assert "<|startoftext|>" in vocab and "<|endoftext|>" in vocab
    # every byte-level symbol and its end-of-word form: any text tokenizes without unknown tokens
    assert "a" in vocab and "a</w>" in vocab
    assert len(vocab) == 2 * 256 + 2


def test_building_tiny_sd_again_reuses_the_existing_build(tiny_sd_dir):
    weights = tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_sd(tiny_sd_dir) == tiny_sd_dir
    assert weights.stat().st_mtime_ns == before


def test_racing_builds_of_tiny_sd_leave_one_complete_copy_and_no_staging_dirs(tmp_path, monkeypatch):
    target = tmp_path / "tiny-sd"
    results, errors = [], []
    # Both builders finish writing before either moves its copy into place: a real race for the rename.
    both_written = threading.Barrier(2, timeout=60)
    write = tiny_sd._write_pipeline

    def write_then_wait(directory, pixel_space):
        write(directory, pixel_space)
        both_written.wait()

    monkeypatch.setattr(tiny_sd, "_write_pipeline", write_then_wait)

    def build():
        try:
            results.append(build_tiny_sd(target, pixel_space=True))
        except Exception as exc:  # collected so that the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == [target, target]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd"]
    assert StableDiffusionPrior.from_pretrained(target, device="cpu").in_pixel_space


def test_a_build_from_another_recipe_version_is_replaced(tmp_path):
    target = tmp_path / "tiny-sd"
    target.mkdir()
    (target / tiny_sd.RECIPE_FILE).write_text(json.dumps({"recipe_version": -1, "pixel_space": True}))
    build_tiny_sd(target, pixel_space=True)
    recipe = json.loads((target / tiny_sd.RECIPE_FILE).read_text())
    assert recipe["recipe_version"] == tiny_sd.RECIPE_VERSION
    assert (target / "unet" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd"]


def test_building_tiny_sd_leaves_the_callers_rng_untouched(tmp_path):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_tiny_sd(tmp_path / "tiny-sd", pixel_space=True)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_sd_weights_come_from_a_fixed_seed(tiny_sd_dir, tmp_path):
    other = build_tiny_sd(tmp_path / "tiny-sd")
    a = StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cpu")
    b = StableDiffusionPrior.from_pretrained(other, device="cpu")
    for (name, p), (_, q) in zip(a.unet.state_dict().items(), b.unet.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


# ----------------------------------------------------------------------------------------------------
# Loading


def test_prior_loads_through_from_pretrained_frozen_in_fp32_on_cpu(prior):
    assert prior.dtype == torch.float32 and prior.device == torch.device("cpu")
    assert not prior.in_pixel_space
    assert prior.image_size == 64  # unet sample_size 32 x VAE scale factor 2
    for module in (prior.unet, prior.vae, prior.text_encoder):
        assert not module.training
        assert all(not p.requires_grad for p in module.parameters())
        assert all(p.dtype == torch.float32 for p in module.parameters())


def test_alphas_cumprod_is_stable_diffusions_scaled_linear_schedule(prior):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1.0 - betas, dim=0).float()
    assert prior.num_train_timesteps == 1000
    assert prior.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(prior.alphas_cumprod, expected)
    torch.testing.assert_close(prior.alphas_cumprod, prior.scheduler.alphas_cumprod.float())


def test_load_prior_builds_tiny_sd_into_the_cache_dir_once(tiny_sd_dir, tmp_path):
    shutil.copytree(tiny_sd_dir, tmp_path / "tiny-sd")  # a cache that already holds the build
    loaded = load_prior(PriorConfig(name="tiny-sd", cache_dir=str(tmp_path)), device="cpu")
    assert isinstance(loaded, StableDiffusionPrior)
    assert Path(loaded.source) == tmp_path / "tiny-sd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd"]


def test_default_cache_dir_prefers_config_then_environment_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("DREAMSWEEP_CACHE", str(tmp_path / "env"))
    assert default_cache_dir(PriorConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert default_cache_dir(PriorConfig()) == tmp_path / "env"
    monkeypatch.delenv("DREAMSWEEP_CACHE")
    assert default_cache_dir(PriorConfig()) == Path.home() / ".cache" / "dreamsweep"


def test_resolve_device_auto_picks_cuda_only_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# The prior interface


def test_encode_text_gives_one_padded_embedding_per_prompt(prior):
    embeddings = prior.encode_text(["a hamburger", "", "a hamburger"])
    assert embeddings.shape == (3, 77, 32)
    assert torch.equal(embeddings[0], embeddings[2])
    assert not torch.allclose(embeddings[0], embeddings[1])


def test_encode_text_caches_embeddings_per_prompt(prior):
    with count_calls(prior.text_encoder) as calls:
        first = prior.encode_text(["a cached prompt", "another cached prompt"])
        assert calls[0] == 1  # both new prompts in one batch
        again = prior.encode_text(["another cached prompt", "a cached prompt"])
        assert calls[0] == 1
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])


def test_encode_text_truncates_prompts_longer_than_the_context(prior):
    assert prior.encode_text(["word " * 200]).shape == (1, 77, 32)


def test_encode_images_gives_float32_latents_at_the_vae_scale(prior):
    images = torch.rand(2, 3, 64, 64)
    latents = prior.encode_images(images)
    assert latents.shape == (2, 4, 32, 32) and latents.dtype == torch.float32


def test_encode_images_passes_gradients_back_to_the_renders(prior):
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    prior.encode_images(images).square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_encode_images_refuses_renders_not_at_the_prior_image_size(prior):
    with pytest.raises(ValueError, match="64"):
        prior.encode_images(torch.rand(1, 3, 48, 48))


def test_decode_gives_images_in_unit_range(prior):
    images = prior.decode(torch.randn(2, 4, 32, 32))
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0


def test_predict_noise_is_one_unet_forward_for_the_whole_batch(prior):
    x_t = torch.randn(6, 4, 32, 32)
    text = prior.encode_text(["a cat", ""] * 3)
    with torch.no_grad(), count_calls(prior.unet) as calls:
        eps = prior.predict_noise(x_t, torch.tensor([10, 10, 500, 500, 990, 990]), text)
    assert calls[0] == 1
    assert eps.shape == x_t.shape and eps.dtype == torch.float32


def test_predict_noise_is_deterministic_and_rows_are_independent(prior):
    x_t = torch.randn(3, 4, 32, 32)
    t = torch.tensor([20, 400, 900])
    text = prior.encode_text(["a cat", "a dog", ""])
    with torch.no_grad():
        first = prior.predict_noise(x_t, t, text)
        second = prior.predict_noise(x_t, t, text)
        row = prior.predict_noise(x_t[1:2], t[1:2], text[1:2])
    assert torch.equal(first, second)
    torch.testing.assert_close(first[1:2], row, rtol=1e-4, atol=1e-5)


def test_predict_noise_depends_on_text_and_timestep(prior):
    x_t = torch.randn(1, 4, 32, 32).repeat(3, 1, 1, 1)
    text = prior.encode_text(["a cat", "a dog", "a cat"])
    with torch.no_grad():
        eps = prior.predict_noise(x_t, torch.tensor([100, 100, 800]), text)
    assert not torch.allclose(eps[0], eps[1])
    assert not torch.allclose(eps[0], eps[2])


def test_predict_noise_passes_class_labels_to_the_unets_class_embedding(prior):
    time_dim = prior.unet.time_embedding.linear_2.out_features
    camera_embedding = torch.nn.Linear(16, time_dim)
    x_t = torch.randn(2, 4, 32, 32)
    t = torch.tensor([300, 300])
    text = prior.encode_text(["a cat", "a cat"])
    labels = torch.randn(2, 16)
    prior.unet.class_embedding = camera_embedding  # how VSD attaches its camera conditioning
    try:
        with torch.no_grad():
            eps = prior.predict_noise(x_t, t, text, class_labels=labels)
    finally:
        prior.unet.class_embedding = None
    assert not torch.allclose(eps[0], eps[1])  # same x_t, t and text: only the camera differs


def test_v_prediction_priors_are_converted_to_epsilon(tiny_sd_dir, tmp_path):
    directory = shutil.copytree(tiny_sd_dir, tmp_path / "tiny-sd-v")
    config_path = directory / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))
    v_prior = StableDiffusionPrior.from_pretrained(directory, device="cpu")
    x_t = torch.randn(2, 4, 32, 32)
    t = torch.tensor([50, 700])
    text = v_prior.encode_text(["a cat", ""])
    with torch.no_grad():
        v = v_prior.unet(x_t, t, encoder_hidden_states=text).sample
        eps = v_prior.predict_noise(x_t, t, text)
    alpha_bar = v_prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, alpha_bar.sqrt() * v + (1 - alpha_bar).sqrt() * x_t)


def test_a_scheduler_of_another_class_gives_the_same_noise_schedule(tiny_sd_dir, tmp_path, prior):
    from diffusers import PNDMScheduler

    directory = shutil.copytree(tiny_sd_dir, tmp_path / "tiny-sd-pndm")
    shutil.rmtree(directory / "scheduler")
    # SD 2.1-base ships a PNDM scheduler config; only its training betas matter to a prior.
    PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    ).save_pretrained(directory / "scheduler")
    pndm_prior = StableDiffusionPrior.from_pretrained(directory, device="cpu")
    torch.testing.assert_close(pndm_prior.alphas_cumprod, prior.alphas_cumprod)


def test_an_fp16_prior_computes_in_half_and_hands_out_float32(tiny_sd_dir):
    half = StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cpu", dtype="fp16")
    assert half.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in half.unet.parameters())
    images = torch.rand(1, 3, 64, 64, requires_grad=True)
    latents = half.encode_images(images)
    latents.sum().backward()
    assert latents.dtype == torch.float32 and images.grad.dtype == torch.float32
    with torch.no_grad():
        eps = half.predict_noise(latents.detach(), torch.tensor([500]), half.encode_text(["a cat"]))
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()


def test_pixel_space_prior_works_on_images_in_minus_one_to_one(pixel_prior):
    assert pixel_prior.in_pixel_space and pixel_prior.vae is None
    assert pixel_prior.image_size == 32  # the UNet's sample size: no VAE scale factor
    images = torch.rand(2, 3, 32, 32)
    x0 = pixel_prior.encode_images(images)
    torch.testing.assert_close(x0, images * 2 - 1)
    torch.testing.assert_close(pixel_prior.decode(x0), images)
    with torch.no_grad():
        eps = pixel_prior.predict_noise(x0, torch.tensor([10, 900]), pixel_prior.encode_text(["a cat", ""]))
    assert eps.shape == (2, 3, 32, 32)


def test_pixel_space_is_chosen_by_a_model_index_without_vae(tmp_path, tiny_sd_dir):
    directory = shutil.copytree(tiny_sd_dir, tmp_path / "no-vae-listed")
    index = json.loads((directory / "model_index.json").read_text())
    index["vae"] = [None, None]  # how save_pretrained records a missing component
    (directory / "model_index.json").write_text(json.dumps(index))
    # the vae/ folder is still on disk, but the index says the pipeline has none: the UNet (4 channels)
    # then cannot take RGB, which is reported instead of failing inside a forward
    with pytest.raises(ConfigError, match="prior.name"):
        StableDiffusionPrior.from_pretrained(directory, device="cpu")


# ----------------------------------------------------------------------------------------------------
# Errors that name the field


def test_a_missing_local_path_is_an_error_naming_prior_name(tmp_path):
    with pytest.raises(ConfigError, match="prior.name") as error:
        load_prior(PriorConfig(name=str(tmp_path / "no-such-model")), device="cpu")
    assert "no such directory" in str(error.value)


def test_a_directory_not_in_the_sd_layout_lists_what_it_lacks(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ConfigError, match="prior.name") as error:
        StableDiffusionPrior.from_pretrained(tmp_path, device="cpu")
    assert "text_encoder" in str(error.value) and "scheduler" in str(error.value)


def test_an_offline_hub_id_fails_fast_and_explains_how_to_use_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(HubUnreachableError) as error:
        load_prior(PriorConfig(name=HUB_ID, cache_dir=str(tmp_path)), device="cpu")
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "prior.name" in message and "cannot be reached" in message
    assert f"download {HUB_ID} --local-dir DIR" in message and "prior.name=DIR" in message


def test_an_unreachable_hub_without_the_offline_flag_also_fails_fast(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(HubUnreachableError, match="--local-dir"):
        load_prior(PriorConfig(name=HUB_ID, cache_dir=str(tmp_path)), device="cpu")
    assert time.monotonic() - start < 10  # huggingface_hub's own retries would take about 25 s


def test_an_image_size_the_unet_cannot_take_is_an_error_naming_prior_image_size(tiny_sd_dir):
    with pytest.raises(ConfigError, match="prior.image_size") as error:
        StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cpu", image_size=66)
    message = str(error.value)
    assert "multiple of 4" in message and "64" in message and "68" in message


def test_a_smaller_valid_image_size_is_accepted(tiny_sd_dir):
    small = StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cpu", image_size=32)
    assert small.image_size == 32
    assert small.encode_images(torch.rand(1, 3, 32, 32)).shape == (1, 4, 16, 16)


def test_prior_config_refuses_a_non_positive_image_size():
    with pytest.raises(ValueError, match="prior.image_size"):
        PriorConfig(image_size=0)


def test_reference_prior_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "trainers.reference.prior", None)  # as if the module were absent
    with pytest.raises(ConfigError, match="reference"):
        load_prior(PriorConfig(name="reference"), device="cpu")
