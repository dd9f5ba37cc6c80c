"""The learned reference prior (`prior.name: reference-learned`): a diffusers UNet trained on the scenes.

The shipped weights are specified by what docs/learned_prior.md states: their class and config, how
much better than an untrained network of the same shape they predict the noise of a true render, that
the camera changes their answer, and that a missing or corrupt copy is refused with the fix.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from trainers.cameras import orbit_cameras
from trainers.config_base import ConfigError
from trainers.guidance import GuidanceConfig, add_noise, make_guidance
from trainers.priors import load_prior
from trainers.priors.base import PriorConfig
from trainers.reference.learned.data import DataConfig
from trainers.reference.learned.diagnostics import size_restoring
from trainers.reference.learned.model import (
    INFO_FILE,
    N_CAMERA_FEATURES,
    LearnedModelConfig,
    build_unet,
    camera_features,
)
from trainers.reference.learned.prior import SHIPPED_WEIGHTS, LearnedReferencePrior
from trainers.reference.scenes import render_scene

# docs/learned_prior.md, "What is shipped": the architecture of the shipped weights.
SHIPPED_CONFIG = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "cross_attention_dim": 64,
    "class_embed_type": "projection",
    "projection_class_embeddings_input_dim": N_CAMERA_FEATURES,
}
# docs/learned_prior.md: at t = 50 on true renders, the shipped weights' ε̂ has at most this fraction of
# the untrained network's mean squared error against the true noise.
MAX_ERROR_RATIO_AT_T50 = 0.1
# docs/learned_prior.md: at t = 800, asking the same noisy render at cameras 90° apart moves the
# denoised estimate by at least this much (mean absolute difference, images in [-1, 1]).
MIN_CAMERA_EFFECT = 0.05
# docs/learned_prior.md: asking a noisy render at fovy 45° and 65° (same pose) moves the denoised
# estimate by at least this much, towards the render at its own fovy.
MIN_FOVY_EFFECT = 0.05
# docs/learned_prior.md §5 "Object size": the CFG direction points an object drawn 1.25× too large back
# towards its true size by at least this fraction of the way, on average over SIZE_PROMPTS at t = 500.
MIN_SIZE_RESTORING = 0.1
SIZE_PROMPTS = ["a red cube", "a blue cone", "a green torus", "a yellow sphere"]
PROMPTS = ["a red cube", "a green torus beside a purple cone", "a pink capsule on top of a cyan cube"]


@pytest.fixture(scope="module")
def prior() -> LearnedReferencePrior:
    return load_prior(PriorConfig(name="reference-learned"), "cpu")


def true_renders(prompts, cameras, size=16):
    """Renders at 32 px resized to the prior's size, as guidance resizes the trainer's renders."""
    images = torch.cat([render_scene(p, cameras[i : i + 1], 32)["rgb"] for i, p in enumerate(prompts)])
    images = images.permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(images, (size, size), mode="bilinear", align_corners=False)


def cameras_for(n):
    return orbit_cameras(torch.linspace(0, 30, n), torch.linspace(-150, 150, n), 1.75, 50.0)


def test_the_shipped_weights_load_through_from_pretrained_as_the_documented_unet(prior):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    assert isinstance(prior.model, UNet2DConditionModel)
    assert isinstance(prior.scheduler, DDPMScheduler)
    config = dict(prior.model.config)
    for key, value in SHIPPED_CONFIG.items():
        assert (list(config[key]) if isinstance(value, list) else config[key]) == value, key
    assert prior.source == str(SHIPPED_WEIGHTS)
    assert prior.in_pixel_space and prior.camera_conditioned and prior.image_size == 16
    index = json.loads((SHIPPED_WEIGHTS / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    size = sum(f.stat().st_size for f in SHIPPED_WEIGHTS.rglob("*") if f.is_file())
    assert size <= 30 * 2**20
    # SD's noise schedule, so t and CFG scales mean what they mean for the exact priors
    from trainers.reference.prior import sd_noise_schedule

    assert torch.allclose(prior.alphas_cumprod, sd_noise_schedule(1000), atol=1e-6)


def test_at_t50_the_learned_eps_is_much_closer_to_the_true_noise_than_an_untrained_networks(prior):
    cameras = cameras_for(len(PROMPTS))
    x0 = true_renders(PROMPTS, cameras) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((len(PROMPTS),), 50, dtype=torch.long)
    x_t = add_noise(prior.alphas_cumprod, x0, noise, t)
    text = prior.encode_text(PROMPTS)
    labels = cameras.camera_vector()
    learned = (prior.predict_noise(x_t, t, text, labels) - noise).pow(2).mean()
    baseline = (prior.untrained().predict_noise(x_t, t, text, labels) - noise).pow(2).mean()
    assert learned <= MAX_ERROR_RATIO_AT_T50 * baseline, (float(learned), float(baseline))


def denoised_at_two_cameras(prior, prompt: str, cameras, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The true render of `prompt` at cameras[0], noised to t = 800 once, asked at both cameras: the two
    denoised estimates [2, 3, S, S] and the render [3, S, S], in [-1, 1]."""
    x0 = true_renders([prompt], cameras[torch.tensor([0])]) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([800, 800])
    x_t = add_noise(prior.alphas_cumprod, x0, noise, t[:1]).repeat(2, 1, 1, 1)
    eps = prior.predict_noise(x_t, t, prior.encode_text([prompt] * 2), cameras.camera_vector())
    alpha = prior.alphas_cumprod[800]
    return (x_t - (1 - alpha).sqrt() * eps) / alpha.sqrt(), x0[0]


def test_the_camera_changes_the_prediction_towards_that_cameras_render(prior):
    """The same noisy render asked at its own camera and at one 90° away: the denoised estimates differ
    by more than MIN_CAMERA_EFFECT (docs/learned_prior.md: 0.50 for the shipped weights), and the one
    at the render's own camera is the closer to the true render."""
    cameras = orbit_cameras(15.0, torch.tensor([0.0, 90.0]), 1.75, 50.0)
    denoised, x0 = denoised_at_two_cameras(prior, "a green torus beside a purple cone", cameras, seed=1)
    assert (denoised[0] - denoised[1]).abs().mean() > MIN_CAMERA_EFFECT
    assert (denoised[0] - x0).abs().mean() < (denoised[1] - x0).abs().mean()


def test_the_fovy_changes_the_prediction_towards_that_fovys_render(prior):
    """The same noisy render asked at its own fovy and at a wider one (same pose): the denoised estimates
    differ by more than MIN_FOVY_EFFECT (docs: 0.24), and the one at the render's own fovy is the closer
    to it."""
    cameras = orbit_cameras(15.0, 30.0, 1.75, torch.tensor([45.0, 65.0]))
    denoised, x0 = denoised_at_two_cameras(prior, "a blue cone", cameras, seed=2)
    assert (denoised[0] - denoised[1]).abs().mean() > MIN_FOVY_EFFECT
    assert (denoised[0] - x0).abs().mean() < (denoised[1] - x0).abs().mean()


def test_the_cfg_direction_shrinks_an_object_drawn_too_large_back_towards_its_size(prior):
    """What made ASD at CFG 7.5 grow objects past the view (docs/learned_prior.md §5, "Object size").
    Each of SIZE_PROMPTS is drawn 1.25× too large (tan(fovy/2) × 0.8) at 4 azimuths, noised to t = 500
    and asked at its true camera. In the ring where the drawn and the true render disagree, the CFG
    direction x̂0_cond − x̂0_uncond must point back towards the true render (`size_restoring`): on average
    over the prompts by at least MIN_SIZE_RESTORING of that way's RMS length."""
    azimuths = torch.tensor([-120.0, -30.0, 60.0, 150.0])
    cameras = orbit_cameras(15.0, azimuths, 1.75, 55.0)
    larger = replace(cameras, fovy=2 * torch.atan(torch.tan(cameras.fovy / 2) * 0.8))
    restoring = []
    for prompt in SIZE_PROMPTS:
        true = true_renders([prompt] * 4, cameras) * 2 - 1
        drawn = true_renders([prompt] * 4, larger) * 2 - 1
        noise = torch.randn(drawn.shape, generator=torch.Generator().manual_seed(0))
        restoring.append(size_restoring(prior, prompt, true, drawn, cameras.camera_vector(), 500, noise))
    assert sum(restoring) / len(restoring) > MIN_SIZE_RESTORING, restoring


def test_camera_features_read_elevation_azimuth_and_distance_from_the_c2w():
    cameras = orbit_cameras(
        torch.tensor([0.0, 30.0]), torch.tensor([90.0, -45.0]), torch.tensor([1.5, 2.0]), 50.0
    )
    f = camera_features(cameras.camera_vector())
    assert f.shape == (2, N_CAMERA_FEATURES)
    assert torch.allclose(f[:, 0], torch.tensor([1.0, -(0.5**0.5)]), atol=1e-5)  # sin(azimuth)
    assert torch.allclose(f[:, -2], torch.tensor([-1.0, 1.0]), atol=1e-5)  # distance, normalised


def test_camera_features_version_2_read_the_fovy_and_version_1_weights_still_get_theirs():
    cameras = orbit_cameras(15.0, 0.0, 1.75, torch.tensor([40.0, 55.0, 70.0]))
    f = camera_features(cameras.camera_vector())
    assert torch.allclose(f[:, -1], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-5)  # fovy, normalised
    # the first weights' features stop before the fovy, from a camera vector or a bare c2w
    v1 = camera_features(cameras.camera_vector(), version=1)
    assert torch.equal(v1, f[:, :-1]) and torch.equal(camera_features(cameras.c2w, version=1), v1)
    # version 2 cannot be computed without the fovy: the error says what to pass
    with pytest.raises(ValueError, match=r"camera_vector\(\)"):
        camera_features(cameras.c2w.reshape(3, 16))


def test_a_missing_weights_directory_is_refused_naming_the_key_and_how_to_retrain(tmp_path):
    cfg = PriorConfig(name="reference-learned", reference={"learned_weights": str(tmp_path / "nowhere")})
    with pytest.raises(
        ConfigError, match=r"prior.name='reference-learned'.*does not exist.*trainers.reference.learned.train"
    ):
        load_prior(cfg, "cpu")


@pytest.mark.parametrize("damage", ["truncated_weights", "no_unet_config", "bad_info"])
def test_a_corrupt_weights_directory_is_refused_naming_the_key_and_how_to_retrain(tmp_path, damage):
    copy = tmp_path / "weights"
    shutil.copytree(SHIPPED_WEIGHTS, copy)
    if damage == "truncated_weights":
        weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "no_unet_config":
        (copy / "unet" / "config.json").unlink()
    else:
        (copy / INFO_FILE).write_text("{not json")
    cfg = PriorConfig(name="reference-learned", reference={"learned_weights": str(copy)})
    with pytest.raises(
        ConfigError, match=r"prior.name='reference-learned'.*trainers.reference.learned.train"
    ):
        load_prior(cfg, "cpu")


def test_a_path_to_another_trained_copy_is_loaded(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(SHIPPED_WEIGHTS, copy)
    prior = load_prior(PriorConfig(name="reference-learned", reference={"learned_weights": str(copy)}), "cpu")
    assert prior.source == str(copy)


def test_an_image_size_other_than_the_weights_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"prior.image_size=32.*trained at 16 px"):
        load_prior(PriorConfig(name="reference-learned", image_size=32), "cpu")


@pytest.mark.parametrize("method", ["sds", "asd", "csd", "vsd"])
def test_guidance_passes_cameras_and_every_method_gets_finite_gradients(prior, method):
    asked = []
    predict = prior.predict_noise

    def spy(x_t, t, text_embeddings, class_labels=None):
        asked.append(class_labels)
        return predict(x_t, t, text_embeddings, class_labels=class_labels)

    prior.predict_noise = spy
    try:
        guidance = make_guidance(GuidanceConfig(method=method, cfg_scale=7.5), prior, max_steps=10)
        images = torch.rand(2, 3, 32, 32, requires_grad=True)
        cameras = orbit_cameras(10.0, torch.tensor([0.0, 90.0]), 1.75, 50.0)
        out = guidance(
            images,
            prior.encode_text(["a red cube, front view", "a red cube, side view"]),
            prior.encode_text([""]),
            step=0,
            generator=torch.Generator().manual_seed(0),
            camera_vectors=cameras.camera_vector(),
        )
        out.loss.backward()
        guidance.close()
    finally:
        del prior.predict_noise
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert asked and all(labels is not None for labels in asked)


def test_the_training_bank_composes_true_renders_of_any_prompt_at_its_cameras():
    from trainers.reference.basis import all_layouts, render_basis
    from trainers.reference.learned.data import SceneBank, layout_cameras

    cfg = DataConfig(cameras_per_layout=2)
    layouts = all_layouts()
    g = next(i for i, lay in enumerate(layouts) if lay.name == "torus beside cone")
    cameras = [layout_cameras(cfg, i) for i in range(len(layouts))]
    maps = torch.zeros(len(layouts), 2, 3, 16, 16)  # only the layout under test is rendered (fast)
    rendered = render_basis(layouts[g], cameras[g], 32)
    maps[g] = torch.nn.functional.interpolate(rendered, (16, 16), mode="bilinear", align_corners=False)
    labels = [["front", "side"]] * len(layouts)
    bank = SceneBank(maps, torch.stack([c.camera_vector() for c in cameras]), labels, cfg)
    k = bank.prompts[g].index("a green torus beside a purple cone")
    truth = true_renders(["a green torus beside a purple cone"], cameras[g][torch.tensor([0])])[0]
    assert (bank.image(g, 0, k) - truth).abs().max() < 1e-4
    batch = bank.sample(64, torch.Generator().manual_seed(0))
    assert batch.images.shape == (64, 3, 16, 16) and batch.cameras.shape == (64, 17)
    assert "" in batch.prompts and any(p.endswith(" view") for p in batch.prompts)
    assert sum(p == "" for p in batch.prompts) < 20  # uncond_prob 0.1


def test_guidance_asks_the_prior_about_a_render_exactly_as_the_prior_was_trained_on_it(prior):
    """Per-prompt training hands the prior what its training batches held: the same pixels (the trainer's
    32 px render resized to 16 px, in [-1, 1]), the same camera encoding, the same empty prompt for the
    unconditional rows and the same noise schedule. docs/learned_prior.md §5 rules these out as the
    cause of the CFG 7.5 failure; this keeps them ruled out."""
    from trainers.config import TrainConfig
    from trainers.per_prompt import TextConditioning
    from trainers.reference.basis import all_layouts, render_basis
    from trainers.reference.learned.data import SceneBank, layout_cameras
    from trainers.reference.learned.train import training_noise_schedule
    from trainers.reference.text_encoder import SceneTextEncoder

    prompt = "a yellow cylinder on top of a pink cube"
    cfg = DataConfig(cameras_per_layout=1)
    layouts = all_layouts()
    g = next(i for i, lay in enumerate(layouts) if lay.name == "cylinder on top of cube")
    cameras = [layout_cameras(cfg, i) for i in range(len(layouts))]
    maps = torch.zeros(len(layouts), 1, 3, 16, 16)
    maps[g] = torch.nn.functional.interpolate(
        render_basis(layouts[g], cameras[g], 32), (16, 16), mode="bilinear", align_corners=False
    )
    bank = SceneBank(maps, torch.stack([c.camera_vector() for c in cameras]), [["front"]] * len(layouts), cfg)
    trained_on = bank.image(g, 0, bank.prompts[g].index(prompt)) * 2 - 1  # as Batch.images holds it

    guidance = make_guidance(GuidanceConfig(method="asd"), prior, max_steps=10)
    render = render_scene(prompt, cameras[g], 32)["rgb"].permute(0, 3, 1, 2)  # what the trainer renders
    asked = guidance.to_prior_input(render)[0]
    assert asked.shape == trained_on.shape
    assert (asked - trained_on).abs().max() < 1e-4

    # the camera: guidance's class_labels are the camera vectors (c2w, fovy) the bank's batches carry
    assert torch.equal(cameras[g].camera_vector(), bank.cameras[g, :1])
    # the unconditional rows: per-prompt training's negative prompt encodes as training's "" did
    uncond = TextConditioning(prior, TrainConfig(prompt=prompt, prior=PriorConfig(name="reference-learned")))
    trained_uncond = SceneTextEncoder(prior.config.text_encoder).encode([""])
    assert torch.equal(uncond.uncond.cpu(), trained_uncond) and not trained_uncond.any()
    # the noise schedule: guidance noises with the scheduler the weights ship, training with this one
    assert torch.allclose(prior.alphas_cumprod.cpu(), training_noise_schedule(), atol=1e-6)


def test_a_few_training_steps_lower_the_loss_and_write_a_loadable_weights_directory(tmp_path):
    import numpy as np

    from trainers.reference.learned.data import bank_path
    from trainers.reference.learned.train import TrainSettings, train

    settings = TrainSettings(
        steps=12,
        batch_size=8,
        lr=2e-3,
        warmup=5,
        model=LearnedModelConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=16),
        data=DataConfig(cameras_per_layout=1),
    )
    # A bank of random maps stands in for the rendered one (rendering 78 layouts takes minutes).
    bank = bank_path(tmp_path / "cache", settings.data, 16)
    bank.parent.mkdir(parents=True)
    np.savez(bank, maps=np.random.default_rng(0).random((78, 1, 3, 16, 16), dtype=np.float32) * 0.5)
    summary = train(
        settings,
        tmp_path / "w",
        tmp_path / "ck",
        tmp_path / "cache",
        torch.device("cpu"),
        checkpoint_every=10,
        save_every=1000,
        progress=False,
        log_every=3,
    )
    losses = [json.loads(line)["loss"] for line in (tmp_path / "ck" / "loss.jsonl").read_text().splitlines()]
    assert summary["steps"] == 12 and sum(losses[-2:]) < sum(losses[:2])
    prior = LearnedReferencePrior.from_pretrained(tmp_path / "w")
    assert prior.info["trained_steps"] == 12

    def resume(s: TrainSettings) -> dict:
        return train(
            s, tmp_path / "w", tmp_path / "ck", tmp_path / "cache", torch.device("cpu"), progress=False
        )

    # resuming a finished run does no more steps and keeps the step count
    assert resume(settings)["steps"] == 12
    # a larger step target trains on from the checkpoint; another training setting is refused
    assert resume(settings.model_copy(update={"steps": 15}))["steps"] == 15
    assert LearnedReferencePrior.from_pretrained(tmp_path / "w").info["trained_steps"] == 15
    with pytest.raises(SystemExit, match="other settings"):
        resume(settings.model_copy(update={"steps": 20, "lr": 1e-3}))


def test_a_warm_start_copies_every_matching_tensor_and_leaves_only_new_blocks_fresh(tmp_path):
    from trainers.reference.learned.model import save_weights
    from trainers.reference.learned.train import warm_start

    small = dict(block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=16)
    source_cfg = LearnedModelConfig(**small)
    source = build_unet(source_cfg, seed=1)
    save_weights(source, source_cfg, tmp_path / "w", {"trained_steps": 0})
    # the same network with text attention at the first (full-resolution) block too
    target = build_unet(
        LearnedModelConfig(
            **small, cross_attention=(True, True, True), only_cross_attention=(True, False, False)
        ),
        seed=2,
    )
    result = warm_start(target, tmp_path / "w")
    trained, now = source.state_dict(), target.state_dict()
    assert set(result["copied"]) == set(trained)
    assert all(torch.equal(now[k], trained[k]) for k in trained)
    assert result["fresh"] and all(
        k.startswith(("down_blocks.0.attentions.", "up_blocks.2.attentions.")) for k in result["fresh"]
    )
    # the new blocks start as the identity: the warm-started network predicts what the source does
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([100, 700])
    text, cams = torch.randn(2, 16, 64), torch.randn(2, N_CAMERA_FEATURES)
    with torch.no_grad():
        assert torch.allclose(
            target(x, t, text, class_labels=cams).sample,
            source(x, t, text, class_labels=cams).sample,
            atol=1e-5,
        )


def test_a_warm_start_onto_camera_features_with_the_fovy_predicts_what_the_source_did(tmp_path):
    """Weights trained on version 1 camera features (no fovy) warm-start a version 2 network: the camera
    embedding's first layer gains one input with zero weight, so the predictions start unchanged."""
    from trainers.reference.learned.model import save_weights
    from trainers.reference.learned.train import warm_start

    cfg = LearnedModelConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=16)
    source = build_unet(cfg, seed=3, camera_features_version=1)
    save_weights(source, cfg, tmp_path / "w", {"trained_steps": 0})
    target = build_unet(cfg, seed=4)
    result = warm_start(target, tmp_path / "w")
    assert result["fresh"] == [] and "class_embedding.linear_1.weight" in result["copied"]
    cameras = orbit_cameras(15.0, torch.tensor([0.0, 90.0]), 1.75, torch.tensor([40.0, 70.0])).camera_vector()
    x, t, text = torch.randn(2, 3, 16, 16), torch.tensor([100, 700]), torch.randn(2, 16, 64)
    with torch.no_grad():
        before = source(x, t, text, class_labels=camera_features(cameras, version=1)).sample
        after = target(x, t, text, class_labels=camera_features(cameras)).sample
    assert torch.allclose(after, before, atol=1e-5)
