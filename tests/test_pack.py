"""Packed trials on one worker: K runs stepped behind one shared prior call each compute what they
compute alone (fp32, CPU), whatever their hyperparameters, prompts, seeds and step counts; one
member's NaN fails that member alone; and each pack step makes one encode and one prior call.

On the reference benchmark (`reference-mv`, the quickstart's prior, 16 px) and on `tiny-sd` (the
Stable Diffusion layout: VAE encoder, UNet, CLIP text encoder)."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.config import load_train_config
from trainers.pack import Pack, train_packed
from trainers.per_prompt import TrainingRun, train
from trainers.priors import load_prior
from trainers.step import NonFiniteLossError

STEPS = 20
# Members differ in everything a sweep varies: prompt, seed, η, CFG, the t schedule.
MEMBERS = [
    {"prompt": "a red cube", "seed": 0, "guidance.eta": 0.1, "guidance.cfg_scale": 7.5},
    {"prompt": "a green torus", "seed": 1, "guidance.eta": 0.4, "guidance.cfg_scale": 2.0},
    {
        "prompt": "a red cube",
        "seed": 2,
        "guidance.method": "sds",
        "guidance.cfg_scale": 20.0,
        "guidance.t_min": 0.2,
        "guidance.t_max": 0.8,
    },
]
UNCOND = ["a red cube", "a green torus", "a blue sphere", "a yellow cone"]


def reference_config(tmp_path, cache_dir, name, **overrides):
    keys = {
        "device": "cpu",
        "max_steps": STEPS,
        "resolution": 16,
        "prior.image_size": 16,
        "prior.cache_dir": str(cache_dir),
        "prior.reference.uncond_prompts": UNCOND,
        "renderer.num_samples_per_ray": 16,
        "logging.log_every": 1,
        "logging.checkpoint_every": 0,
        "logging.turntable_frames": 4,
        "logging.val_views": 2,
        "output_dir": str(tmp_path / name),
        **overrides,
    }
    return load_train_config("sweeps/configs/reference_cpu.yaml", keys)


def tiny_config(tmp_path, tiny_sd_dir, name, **overrides):
    keys = {
        "prior.name": str(tiny_sd_dir),
        "max_steps": STEPS,
        "resolution": 32,
        "geometry.encoding.n_levels": 4,
        "geometry.encoding.log2_hashmap_size": 12,
        "geometry.encoding.base_resolution": 8,
        "renderer.num_samples_per_ray": 16,
        "logging.log_every": 1,
        "logging.checkpoint_every": 0,
        "logging.turntable_frames": 4,
        "logging.val_views": 2,
        "output_dir": str(tmp_path / name),
        **overrides,
    }
    return load_train_config(None, keys)


class Recorder:
    """A run's losses by step, as its on_metrics callback sees them."""

    def __init__(self):
        self.losses: dict[int, float] = {}
        self.final: dict[str, float] = {}

    def __call__(self, step, metrics):
        if "train/loss" in metrics:
            self.losses[step] = metrics["train/loss"]


def solo(config, prior) -> Recorder:
    recorder = Recorder()
    recorder.final = train(config, prior, on_metrics=recorder, progress=False).final_metrics
    return recorder


def together(configs, prior) -> tuple[list, list[Recorder]]:
    """Train `configs` as one pack: each run's event and its recorded losses."""
    recorders = [Recorder() for _ in configs]
    runs = [
        TrainingRun(cfg, prior, on_metrics=recorder, progress=False)
        for cfg, recorder in zip(configs, recorders, strict=True)
    ]
    return train_packed(runs), recorders


def assert_same_run(packed: Recorder, alone: Recorder) -> None:
    assert sorted(packed.losses) == list(range(1, STEPS + 1))
    assert sorted(packed.losses) == sorted(alone.losses)
    for step, loss in alone.losses.items():
        assert packed.losses[step] == pytest.approx(loss, rel=1e-4, abs=1e-9), f"step {step}"


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("reference-cache")


@pytest.fixture(scope="module")
def reference_prior(tmp_path_factory, reference_cache):
    cfg = reference_config(tmp_path_factory.mktemp("unused"), reference_cache, "x")
    prior = load_prior(cfg.prior, "cpu")
    prior.encode_text(UNCOND)  # every prompt seen once: the same state for solo and packed runs
    return prior


def test_each_packed_member_computes_what_it_computes_alone_on_the_reference_prior(
    tmp_path, reference_cache, reference_prior
):
    configs = [reference_config(tmp_path, reference_cache, f"solo{i}", **m) for i, m in enumerate(MEMBERS)]
    alone = [solo(cfg, reference_prior) for cfg in configs]

    packed = [reference_config(tmp_path, reference_cache, f"packed{i}", **m) for i, m in enumerate(MEMBERS)]
    events, recorders = together(packed, reference_prior)

    for event, recorder, reference in zip(events, recorders, alone, strict=True):
        assert not event.failed, event.error
        assert_same_run(recorder, reference)
        # Ground truth at held-out views: the packed model is the solo model.
        assert event.result.final_metrics["eval/psnr"] == pytest.approx(
            reference.final["eval/psnr"], abs=0.05
        )
    # The members really differ (else the comparison above proves little).
    assert len({round(a.final["eval/psnr"], 3) for a in alone}) == len(MEMBERS)


def test_each_packed_member_computes_what_it_computes_alone_on_tiny_sd(tmp_path, tiny_sd_dir, tiny_sd_prior):
    members = [
        {"prompt": "a red cube", "seed": 0, "guidance.eta": 0.1, "guidance.cfg_scale": 7.5},
        {"prompt": "a blue chair", "seed": 3, "guidance.eta": 0.5, "guidance.cfg_scale": 30.0},
    ]
    configs = [tiny_config(tmp_path, tiny_sd_dir, f"solo{i}", **m) for i, m in enumerate(members)]
    alone = [solo(cfg, tiny_sd_prior) for cfg in configs]
    packed = [tiny_config(tmp_path, tiny_sd_dir, f"packed{i}", **m) for i, m in enumerate(members)]
    events, recorders = together(packed, tiny_sd_prior)
    assert not any(event.failed for event in events)
    for recorder, reference in zip(recorders, alone, strict=True):
        assert_same_run(recorder, reference)


class Counted:
    """Counts a prior's encode and ε̂ calls and the rows of each."""

    def __init__(self, prior):
        self.prior, self.encodes, self.calls = prior, [], []
        self._encode, self._predict = prior.encode_images, prior.predict_noise

    def __enter__(self):
        def encode(images):
            self.encodes.append(images.shape[0])
            return self._encode(images)

        def predict(x_t, *args, **kwargs):
            self.calls.append(x_t.shape[0])
            return self._predict(x_t, *args, **kwargs)

        self.prior.encode_images, self.prior.predict_noise = encode, predict
        return self

    def __exit__(self, *exc):
        del self.prior.encode_images, self.prior.predict_noise


def test_a_pack_step_makes_one_encode_and_one_prior_call_over_every_members_rows(
    tmp_path, reference_cache, reference_prior
):
    pack = Pack()
    for i, member in enumerate(MEMBERS):
        config = reference_config(tmp_path, reference_cache, f"m{i}", **member)
        pack.add(i, TrainingRun(config, reference_prior, progress=False))
    with Counted(reference_prior) as counted:
        pack.step()
        pack.step()
    # ASD asks 3 rows per render (uncond, cond, cond at t+Δt), SDS 2; batch_size 1 each.
    assert counted.calls == [3 + 3 + 2] * 2
    assert counted.encodes == [3] * 2
    for key in list(pack.members):
        pack.remove(key)


def test_a_member_that_joins_a_running_pack_computes_what_it_computes_alone(
    tmp_path, reference_cache, reference_prior
):
    """Members at different steps: a freed slot is refilled while the others go on."""
    late = MEMBERS[1]
    alone = solo(reference_config(tmp_path, reference_cache, "solo", **late), reference_prior)
    pack = Pack()
    first = reference_config(tmp_path, reference_cache, "first", **MEMBERS[0], max_steps=STEPS + 7)
    pack.add("first", TrainingRun(first, reference_prior, progress=False))
    for _ in range(7):
        assert pack.step() == {}
    recorder = Recorder()
    config = reference_config(tmp_path, reference_cache, "late", **late)
    pack.add("late", TrainingRun(config, reference_prior, on_metrics=recorder, progress=False))
    events = {}
    while pack:
        events |= pack.step()
    assert set(events) == {"first", "late"} and not any(e.failed for e in events.values())
    assert_same_run(recorder, alone)


def test_a_member_whose_loss_goes_nan_fails_alone_and_the_others_compute_what_they_compute_alone(
    tmp_path, reference_cache, reference_prior
):
    healthy = MEMBERS[0]
    alone = solo(reference_config(tmp_path, reference_cache, "solo", **healthy), reference_prior)
    recorder = Recorder()
    pack = Pack()
    pack.add(
        "healthy",
        TrainingRun(
            reference_config(tmp_path, reference_cache, "healthy", **healthy),
            reference_prior,
            on_metrics=recorder,
            progress=False,
        ),
    )
    sick = TrainingRun(reference_config(tmp_path, reference_cache, "sick", **MEMBERS[1]), reference_prior)
    pack.add("sick", sick)
    assert pack.step() == {}
    with torch.no_grad():  # a diverged model: its parameters went NaN
        for param in sick.trainer.field.parameters():
            param.fill_(math.nan)
    events = pack.step()
    assert set(events) == {"sick"}
    assert isinstance(events["sick"].error, NonFiniteLossError) and events["sick"].error.step == 1
    while pack:
        events |= pack.step()
    assert not events["healthy"].failed
    assert_same_run(recorder, alone)


def test_members_must_share_the_workers_prior(tmp_path, reference_cache, reference_prior, tiny_sd_prior):
    pack = Pack()
    pack.add(
        "a", TrainingRun(reference_config(tmp_path, reference_cache, "a"), reference_prior, progress=False)
    )
    other = TrainingRun(reference_config(tmp_path, reference_cache, "b"), tiny_sd_prior, progress=False)
    with pytest.raises(ValueError, match="share the worker's prior"):
        pack.add("b", other)
    other.close()
    pack.remove("a")
