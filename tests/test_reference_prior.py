"""The exact reference prior (MMSE denoiser of scene renders) and the scene-prompt text encoder."""

from __future__ import annotations

import math

import pytest
import torch

import trainers.reference.basis as basis
import trainers.reference.scenes as scenes
from trainers.cameras import orbit_cameras, view_dependent_prompt
from trainers.guidance import GuidanceConfig, add_noise, make_guidance
from trainers.priors.base import PriorConfig
from trainers.reference.prior import (
    VOCABULARY,
    CameraConditionedReferencePrior,
    ReferencePrior,
    ReferencePriorConfig,
)
from trainers.reference.scenes import all_prompts
from trainers.reference.text_encoder import SceneTextEncoder, TextEncoderConfig, tokenize

SIZE = 16
UNCOND = ["a blue sphere", "a green torus", "a yellow cone"]


def small_config(**overrides) -> ReferencePriorConfig:
    return ReferencePriorConfig(**{"n_views": 12, "uncond_prompts": UNCOND, **overrides})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reference-cache")


@pytest.fixture(scope="module")
def prior(cache_dir) -> ReferencePrior:
    cfg = PriorConfig(name="reference", image_size=SIZE, cache_dir=str(cache_dir))
    return ReferencePrior.from_config(cfg, "cpu", small_config())


def noised(prior, x0, t, seed=0):
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.full((x0.shape[0],), t, dtype=torch.long)
    return add_noise(prior.alphas_cumprod, x0, noise, t), t, noise


def denoised(prior, x_t, t, eps):
    alpha = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    return (x_t - (1 - alpha).sqrt() * eps) / alpha.sqrt()


def render(prior, prompt, index=0, size=SIZE):
    return prior.bank(prompt).images[index : index + 1].view(1, 3, size, size)


# -- the text encoder ----------------------------------------------------------------------------------


def test_text_encoder_is_deterministic_across_instances_and_empty_prompt_is_zero():
    a = SceneTextEncoder().encode(["a red cube", ""])
    b = SceneTextEncoder().encode(["a red cube", ""])
    assert a.shape == (2, TextEncoderConfig().max_length, TextEncoderConfig().dim)
    assert torch.equal(a, b)
    assert a[1].abs().sum() == 0 and a[0].abs().sum() > 0


def test_text_encoder_keeps_word_order_and_shares_word_vectors_across_prompts():
    encoder = SceneTextEncoder()
    swapped = encoder.encode(["a red cube on top of a blue sphere", "a blue cube on top of a red sphere"])
    assert not torch.allclose(swapped[0], swapped[1])
    # "purple" at the same position contributes the same vector whatever the shape after it.
    e = encoder.encode(["a purple torus", "a purple cube"])
    assert torch.equal(e[0, 1], e[1, 1]) and not torch.equal(e[0, 2], e[1, 2])


def test_text_encoder_seed_changes_the_vocabulary():
    a = SceneTextEncoder(TextEncoderConfig(seed=0)).encode(["a red cube"])
    b = SceneTextEncoder(TextEncoderConfig(seed=1)).encode(["a red cube"])
    assert not torch.allclose(a, b)


def test_every_grammar_prompt_with_any_view_suffix_decodes_back_from_its_embedding():
    encoder = SceneTextEncoder()
    prompts = all_prompts()[::37]
    prompts += [view_dependent_prompt(p, label) for p in prompts[:10] for label in scenes.VIEW_LABELS]
    decoded = encoder.decode(encoder.encode(prompts + [""]), VOCABULARY)
    assert decoded[:-1] == [" ".join(tokenize(p)) for p in prompts]
    assert decoded[-1] == ""


def test_text_encoder_config_names_the_field_it_refuses():
    with pytest.raises(ValueError, match="dim"):
        TextEncoderConfig(dim=63)
    with pytest.raises(ValueError, match="max_length"):
        TextEncoderConfig(max_length=0)


# -- the interface ---------------------------------------------------------------------------------------


def test_prior_offers_the_diffusion_prior_interface_in_pixel_space(prior):
    assert prior.in_pixel_space and prior.unet is None
    assert prior.image_size == SIZE and prior.num_train_timesteps == 1000
    acp = prior.alphas_cumprod
    assert acp.shape == (1000,) and (acp[1:] < acp[:-1]).all() and 0 < acp[-1] < acp[0] < 1
    images = torch.rand(2, 3, SIZE, SIZE)
    x0 = prior.encode_images(images)
    assert x0.min() >= -1 and x0.max() <= 1
    assert torch.allclose(prior.decode(x0), images, atol=1e-6)


def test_encode_text_refuses_text_outside_the_scene_grammar(prior):
    with pytest.raises(ValueError, match="not a scene prompt"):
        prior.encode_text(["a photo of an astronaut riding a horse"])


def test_renders_are_cached_under_the_cache_dir_so_a_second_prior_does_not_render_again(
    prior, cache_dir, monkeypatch
):
    prior.encode_text(["a red cube"])
    assert prior.cache_dir.is_relative_to(cache_dir)
    assert list(prior.cache_dir.glob("basis/cube-*.npy"))

    def fail(*args, **kwargs):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(basis, "render_basis", fail)
    again = ReferencePrior(SIZE, prior.cache_dir, "cpu", small_config())
    assert torch.equal(again.bank("a red cube").images, prior.bank("a red cube").images)


@pytest.mark.parametrize(
    "prompt",
    ["a red cube", "a blue sphere on top of an orange cylinder", "a pink cone beside a cyan cone"],
)
def test_a_layouts_basis_maps_compose_into_the_true_render_of_every_colouring(prompt):
    cameras = scenes.reference_cameras(3)
    layout, colours = basis.layout_of(prompt)
    maps = basis.render_basis(layout, cameras, 12)
    composed = basis.compose(maps.double(), colours, scenes.SceneConfig().background_color)
    truth = scenes.render_scene(prompt, cameras, 12)["rgb"]
    assert torch.allclose(composed.float(), truth, atol=1e-5)


def test_the_library_is_every_grammar_prompt_in_78_layouts():
    layouts = basis.all_layouts()
    prompts = [layout.spec(colours).prompt for layout in layouts for colours in layout.colourings()]
    assert len(layouts) == 78 and sorted(prompts) == sorted(all_prompts())


# -- the closed form --------------------------------------------------------------------------------------


def test_mmse_eps_matches_an_independent_gaussian_posterior_computation(prior):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3 * 4 * 4, generator=generator) * 2 - 1
    log_prior = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    x_t = torch.randn(2, 3, 4, 4, generator=generator)
    t = torch.tensor([300, 600])
    eps = prior.mmse_eps(x_t, t, images, log_prior)
    for row in range(2):
        a = prior.alphas_cumprod[t[row]].double()
        likelihood = torch.distributions.Normal(a.sqrt() * images.double(), (1 - a).sqrt())
        log_post = likelihood.log_prob(x_t[row].reshape(1, -1).double()).sum(dim=1) + log_prior[0].double()
        posterior_mean = torch.softmax(log_post, dim=0) @ images.double()
        expected = (x_t[row].reshape(-1).double() - a.sqrt() * posterior_mean) / (1 - a).sqrt()
        assert torch.allclose(eps[row].reshape(-1).double(), expected, atol=1e-4)


def test_a_single_image_distribution_recovers_the_true_noise_at_every_timestep(prior):
    x0 = torch.rand(1, 3, 4, 4) * 2 - 1
    for t in (1, 20, 500, 999):
        x_t, t_batch, noise = noised(prior, x0, t)
        eps = prior.mmse_eps(x_t, t_batch, x0.reshape(1, -1), torch.zeros(1, 1))
        assert torch.allclose(eps, noise, atol=1e-3)


def test_conditional_denoising_pulls_towards_the_prompts_renders_unconditional_does_not(prior):
    cube, sphere = prior.encode_text(["a red cube", "a blue sphere"])
    uncond = prior.encode_text([""])[0]
    x_t, t, _ = noised(prior, render(prior, "a blue sphere"), 250)
    rows = torch.stack([cube, uncond])
    x_hat = denoised(
        prior,
        x_t.repeat(2, 1, 1, 1),
        t.repeat(2),
        prior.predict_noise(x_t.repeat(2, 1, 1, 1), t.repeat(2), rows),
    )
    cube_renders, sphere_renders = prior.bank("a red cube").images, prior.bank("a blue sphere").images

    def nearest(x, bank):
        return torch.cdist(x.reshape(1, -1), bank).min().item()

    assert nearest(x_hat[0], cube_renders) < 0.1 * nearest(x_hat[0], sphere_renders)
    assert nearest(x_hat[1], sphere_renders) < 0.1 * nearest(x_hat[1], cube_renders)


def test_rows_mixed_by_guidance_are_denoised_each_against_its_own_prompt(prior):
    cond = prior.encode_text(["a red cube", "a red cube, back view"])
    uncond = prior.encode_text([""])
    x_t, t, _ = noised(prior, torch.rand(4, 3, SIZE, SIZE) * 2 - 1, 400)
    mask = torch.tensor([True, False, True, False])
    rows = torch.where(mask.view(-1, 1, 1), cond.repeat(2, 1, 1), uncond.expand(4, -1, -1))
    together = prior.predict_noise(x_t, t, rows)
    one_by_one = torch.cat(
        [prior.predict_noise(x_t[i : i + 1], t[i : i + 1], rows[i : i + 1]) for i in range(4)]
    )
    # Up to float32 rounding: BLAS sums a 2-row product in another order than a 1-row one.
    assert torch.allclose(together, one_by_one, atol=5e-5)
    assert not torch.allclose(together[0], together[1])


def test_view_suffix_keeps_only_renders_with_that_view_label(prior):
    weights = prior.view_log_prior("a red cube back view", None)[0]
    is_back = torch.tensor([label == "back" for label in prior.labels])
    assert is_back.any() and (~is_back).any()
    assert torch.isfinite(weights[is_back]).all() and torch.isinf(weights[~is_back]).all()
    # No render is labelled "overhead" under the default elevations: all views stay, not none.
    assert torch.isfinite(prior.view_log_prior("a red cube overhead view", None)).all()


def test_camera_labels_favour_renders_seen_from_near_the_asked_camera(cache_dir):
    prior = CameraConditionedReferencePrior(SIZE, cache_dir, "cpu", small_config(camera_sharpness=20.0))
    asked = orbit_cameras(10.0, 0.0, 1.75, 50.0).c2w.reshape(1, 16)
    weights = prior.view_log_prior("a red cube", asked)[0]
    cosine = prior.directions @ torch.nn.functional.normalize(asked.view(4, 4)[:3, 3], dim=0)
    assert weights.argmax() == cosine.argmax()


def test_unconditional_distribution_is_fixed_and_weighs_every_prompt_equally(prior):
    fresh = ReferencePrior(SIZE, prior.cache_dir, "cpu", small_config())
    before = fresh.uncond_set()
    fresh.encode_text(["a red cube, front view"])
    uncond = fresh.uncond_set()
    # Asking about a new prompt leaves it unchanged: a cached prior answers the same in any trial order.
    assert uncond is before
    weights = uncond.log_weights.exp()  # [layouts, views, colourings]
    assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-9)
    per_prompt = weights.sum(dim=1)[weights.sum(dim=1) > 0]
    assert len(per_prompt) == len(UNCOND)
    assert torch.allclose(per_prompt, torch.full_like(per_prompt, 1 / len(UNCOND)))


def test_the_default_unconditional_set_is_the_whole_library_and_contains_each_conditional_prompts_renders(
    cache_dir,
):
    prior = ReferencePrior(8, cache_dir, "cpu", ReferencePriorConfig(n_views=2))
    uncond = prior.uncond_set()
    assert sum(1 for names in uncond.prompts for name in names if name) == len(all_prompts())
    for prompt in (
        "a red cube",
        "a purple torus beside a yellow capsule",
        "a cyan cone on top of a cyan cube",
    ):
        g, k = uncond.find(prompt)
        assert torch.equal(uncond.images(g, k), prior.conditional_set(prompt).images(0, 0))
        # So on a render of the prompt, the unconditional and conditional predictions agree at low t.
        x0 = render(prior, prompt, 1, size=8)
        x_t, t, noise = noised(prior, x0, 1)
        cond, empty = prior.encode_text([prompt, ""])
        eps = prior.predict_noise(x_t.repeat(2, 1, 1, 1), t.repeat(2), torch.stack([cond, empty]))
        assert torch.allclose(eps[0], eps[1], atol=1e-3) and torch.allclose(eps[0], noise[0], atol=1e-3)


def test_the_priors_answers_do_not_depend_on_the_order_prompts_were_first_asked(cache_dir):
    prompts = ["a red cube", "a blue sphere", "a green torus beside a purple cone"]
    first = ReferencePrior(SIZE, cache_dir, "cpu", small_config())
    second = ReferencePrior(SIZE, cache_dir, "cpu", small_config())
    first.encode_text(prompts)
    second.encode_text(prompts[::-1])
    rows = torch.cat([first.encode_text(prompts), first.encode_text([""])])
    x_t, t, _ = noised(first, torch.rand(4, 3, SIZE, SIZE) * 2 - 1, 300)
    assert torch.equal(first.predict_noise(x_t, t, rows), second.predict_noise(x_t, t, rows))


def test_the_basis_denoiser_equals_the_closed_form_on_the_explicit_renders(prior):
    uncond = prior.uncond_set()
    entries = [(g, k) for g, names in enumerate(uncond.prompts) for k, name in enumerate(names) if name]
    images = torch.cat([uncond.images(g, k).reshape(12, -1) for g, k in entries]).float() * 2 - 1
    log_prior = torch.full((1, len(images)), -math.log(len(images)))
    empty = prior.encode_text([""])
    for t in (1, 20, 500, 980):
        x_t, t_batch, _ = noised(
            prior, images[5].view(1, 3, SIZE, SIZE) + 0.3 * torch.randn(1, 3, SIZE, SIZE), t
        )
        exact = prior.mmse_eps(x_t, t_batch, images, log_prior)
        assert torch.allclose(prior.predict_noise(x_t, t_batch, empty), exact, atol=1e-4)


# -- the camera-conditioned prior ------------------------------------------------------------------------


def test_with_a_sharp_camera_weighting_the_camera_conditioned_denoiser_is_that_views_closed_form(cache_dir):
    prior = CameraConditionedReferencePrior(SIZE, cache_dir, "cpu", small_config(camera_sharpness=1e4))
    cond = prior.encode_text(["a green torus beside a purple cone"])
    bank = prior.bank("a green torus beside a purple cone")
    view = 7
    asked = prior.cameras.c2w[view].reshape(1, 16)
    x_t, t, _ = noised(prior, torch.rand(1, 3, SIZE, SIZE) * 2 - 1, 600)
    single_image = prior.mmse_eps(x_t, t, bank.images[view : view + 1], torch.zeros(1, 1))
    assert torch.allclose(prior.predict_noise(x_t, t, cond, class_labels=asked), single_image, atol=1e-4)


def test_the_camera_conditioned_prior_refuses_a_call_without_cameras_and_the_text_prior_one_with(cache_dir):
    mv = CameraConditionedReferencePrior(SIZE, cache_dir, "cpu", small_config())
    x_t, t, _ = noised(mv, torch.rand(1, 3, SIZE, SIZE), 300)
    with pytest.raises(ValueError, match="camera-conditioned.*class_labels"):
        mv.predict_noise(x_t, t, mv.encode_text(["a red cube"]))
    text_only = ReferencePrior(SIZE, cache_dir, "cpu", small_config())
    with pytest.raises(ValueError, match="reference-mv"):
        text_only.predict_noise(
            x_t, t, text_only.encode_text(["a red cube"]), class_labels=torch.eye(4).view(1, 16)
        )


@pytest.mark.parametrize("method", ["sds", "csd", "asd", "vsd"])
def test_guidance_passes_each_renders_camera_to_every_call_of_the_camera_conditioned_prior(cache_dir, method):
    prior = CameraConditionedReferencePrior(SIZE, cache_dir, "cpu", small_config())
    asked: list[torch.Tensor] = []
    predict = prior.predict_noise

    def spy(x_t, t, text_embeddings, class_labels=None):
        asked.append(class_labels)
        return predict(x_t, t, text_embeddings, class_labels=class_labels)

    prior.predict_noise = spy
    cameras = orbit_cameras(10.0, torch.tensor([0.0, 90.0]), 1.75, 50.0)
    guidance = make_guidance(GuidanceConfig(method=method, t_min=0.02, t_max=0.98), prior)
    cond = prior.encode_text(["a red cube", "a red cube"])
    guidance(
        torch.rand(2, 3, SIZE, SIZE),
        cond,
        prior.encode_text([""]),
        step=0,
        generator=torch.Generator().manual_seed(0),
        cameras=cameras,
    )
    assert asked and all(labels is not None for labels in asked)
    for labels in asked:  # rows are [uncond, cond(, cond at t+Δt)] blocks of the batch, in order
        assert torch.equal(labels, cameras.camera_vector().repeat(len(labels) // 2, 1))
    guidance.close()


def test_guidance_without_cameras_is_refused_by_a_camera_conditioned_prior(cache_dir):
    prior = CameraConditionedReferencePrior(SIZE, cache_dir, "cpu", small_config())
    guidance = make_guidance(GuidanceConfig(method="asd"), prior, max_steps=10)
    with pytest.raises(ValueError, match="camera-conditioned"):
        guidance(
            torch.rand(1, 3, SIZE, SIZE),
            prior.encode_text(["a red cube"]),
            prior.encode_text([""]),
            step=0,
            generator=torch.Generator().manual_seed(0),
        )


# -- with the guidance methods ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sds", "csd", "asd", "vsd"])
def test_every_guidance_method_runs_on_the_reference_prior_with_finite_gradients(prior, method):
    guidance = make_guidance(GuidanceConfig(method=method, cfg_scale=7.5), prior, max_steps=10)
    images = torch.rand(2, 3, 24, 24, requires_grad=True)  # resized to the prior's size by guidance
    cond = prior.encode_text(["a red cube, front view", "a red cube, side view"])
    out = guidance(
        images,
        cond,
        prior.encode_text([""]),
        step=0,
        generator=torch.Generator().manual_seed(0),
        camera_vectors=orbit_cameras(10.0, torch.tensor([0.0, 90.0]), 1.75, 50.0).camera_vector(),
    )
    out.loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    guidance.close()


def test_sds_on_the_reference_prior_turns_an_image_of_the_wrong_scene_into_the_prompts_scene(prior):
    # The unconditional distribution holds both scenes, as the default (all single objects) does.
    prior = ReferencePrior(SIZE, prior.cache_dir, "cpu", small_config(uncond_prompts=[*UNCOND, "a red cube"]))
    cond = prior.encode_text(["a red cube"])
    uncond = prior.encode_text([""])
    guidance = make_guidance(GuidanceConfig(method="sds", cfg_scale=7.5, t_min=0.02, t_max=0.5), prior)
    images = ((render(prior, "a blue sphere", 3) + 1) / 2).clone().requires_grad_(True)
    optimizer = torch.optim.SGD([images], lr=0.05)
    cube = (prior.bank("a red cube").images + 1) / 2

    def distance_to_cube():
        return torch.cdist(images.detach().reshape(1, -1), cube).min().item()

    before = distance_to_cube()
    generator = torch.Generator().manual_seed(0)
    for step in range(60):
        optimizer.zero_grad()
        guidance(images, cond, uncond, step=step, generator=generator).loss.backward()
        optimizer.step()
        with torch.no_grad():
            images.clamp_(0, 1)
    assert distance_to_cube() < 0.5 * before


def test_reference_config_names_the_field_it_refuses():
    with pytest.raises(ValueError, match="view_leak"):
        ReferencePriorConfig(view_leak=2.0)
    with pytest.raises(ValueError, match="uncond_prompts"):
        ReferencePriorConfig(uncond_prompts="everything")
    with pytest.raises(ValueError, match="n_views"):
        ReferencePriorConfig(n_views=0)


def test_trainer_config_keys_reach_the_reference_prior(cache_dir):
    from trainers.config import load_train_config
    from trainers.priors import load_prior

    cfg = load_train_config(
        None,
        [
            "prior.name=reference",
            f"prior.cache_dir={cache_dir}",
            f"prior.image_size={SIZE}",
            "prior.reference.n_views=5",
            "prior.reference.uncond_prompts=[a blue sphere]",
        ],
    )
    prior = load_prior(cfg.prior, "cpu")
    assert prior.cfg.n_views == 5 and prior.cfg.uncond_prompts == ["a blue sphere"]
    assert len(prior.bank("a red cube").images) == 5


def test_an_unknown_reference_prior_name_is_refused_naming_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"prior.name='reference-3d'.*reference, reference-mv"):
        PriorConfig(name="reference-3d")


# -- the supervised ceiling ------------------------------------------------------------------------------


def test_supervised_guidance_pulls_the_render_straight_to_the_true_render_at_the_same_camera(prior):
    from trainers.reference.supervised import ground_truth_target

    cameras = orbit_cameras(10.0, torch.tensor([0.0, 120.0]), 1.75, 50.0)
    target = ground_truth_target("a red cube", SIZE)
    guidance = make_guidance(GuidanceConfig(method="supervised"), prior, max_steps=10, target_fn=target)
    truth = target(cameras)
    images = torch.rand(2, 3, SIZE, SIZE)
    generator = torch.Generator().manual_seed(0)
    empty = prior.encode_text([""])
    out = guidance(images, empty.expand(2, -1, -1), empty, step=0, generator=generator, cameras=cameras)
    assert torch.allclose(out.grad, (images - truth) * 2, atol=1e-6)  # in the prior's [-1, 1] units
    at_truth = guidance(truth, empty.expand(2, -1, -1), empty, step=0, generator=generator, cameras=cameras)
    assert at_truth.grad.abs().max() < 1e-6


def test_supervised_needs_a_prompt_with_a_ground_truth(prior):
    with pytest.raises(ValueError, match="supervised.*ground"):
        make_guidance(GuidanceConfig(method="supervised"), prior, max_steps=10)
