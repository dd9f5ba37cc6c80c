"""The per-prompt trainer end to end on the built-in random-weight `tiny-sd` prior, on the CPU."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from trainers.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from trainers.config import load_train_config
from trainers.per_prompt import NonFiniteLossError, Trainer, reported_metrics, train
from trainers.priors.base import TrainingOutOfMemoryError

# Small but real: hash grid, nerfacc rendering, tiny-sd UNet + VAE + CLIP text encoder.
TINY = [
    "resolution=32",
    "geometry.encoding.n_levels=4",
    "geometry.encoding.log2_hashmap_size=12",
    "geometry.encoding.base_resolution=8",
    "renderer.num_samples_per_ray=24",
    "logging.log_every=5",
    "logging.turntable_frames=6",
    "logging.val_views=3",
]


def tiny_config(tmp_path, *extra):
    return load_train_config(None, [*TINY, f"output_dir={tmp_path}", *extra])


def test_twenty_step_asd_run_writes_checkpoint_render_grid_and_turntable(tmp_path, tiny_sd_prior):
    cfg = tiny_config(tmp_path / "run", "max_steps=20", "logging.checkpoint_every=10")
    logged, checkpoints, artifacts = [], [], []
    result = train(
        cfg,
        tiny_sd_prior,
        on_metrics=lambda step, m: logged.append((step, m)),
        on_checkpoint=lambda step, path: checkpoints.append((step, path)),
        on_artifact=lambda step, path: artifacts.append(path),
        progress=False,
    )
    train_logs = [(s, m) for s, m in logged if "train/loss" in m]
    assert [s for s, _ in train_logs] == [5, 10, 15, 20]
    assert all(np.isfinite(v) for _, m in train_logs for v in m.values())
    assert {"train/loss", "train/grad_norm", "train/t", "train/t_plus"} <= set(train_logs[-1][1])
    # "a red cube" is a reference-scene prompt: ground-truth metrics are reported at the end.
    assert {"eval/psnr", "eval/iou"} <= set(result.final_metrics)
    assert {name for _, m in logged for name in m} <= reported_metrics(cfg)
    assert [s for s, _ in checkpoints] == [10, 20]
    assert result.last_checkpoint == latest_checkpoint(tmp_path / "run" / "checkpoints")
    grid = iio.imread(next(p for p in artifacts if p.suffix == ".png"))
    assert (
        grid.shape[0] > 2 * 32 and grid.shape[1] > 3 * 32 and grid.std() > 1
    )  # two rows, three views, not blank
    turntable = iio.imread(tmp_path / "run" / "turntable.gif")
    assert turntable.shape[0] == 6 and turntable.shape[1:3] == (32, 32)


def test_resumed_run_ends_bit_for_bit_where_an_uninterrupted_one_does(tmp_path, tiny_sd_prior):
    full = train(tiny_config(tmp_path / "full", "max_steps=12"), tiny_sd_prior, progress=False)
    interrupted_cfg = tiny_config(tmp_path / "cut", "max_steps=12", "logging.checkpoint_every=5")

    class Killed(Exception):
        pass

    def kill_at_step_10(step, metrics):
        if step == 10:  # logged before step 10's checkpoint is written: the last one is step 5's
            raise Killed

    # The same 12-step run (the annealed t range spans all 12 steps), killed during step 10.
    with pytest.raises(Killed):
        train(interrupted_cfg, tiny_sd_prior, on_metrics=kill_at_step_10, progress=False)
    steps = [int(p.name.split("_")[1]) for p in list_checkpoints(tmp_path / "cut" / "checkpoints")]
    assert steps == [5]
    resumed = train(
        interrupted_cfg,
        tiny_sd_prior,
        resume_from=tmp_path / "cut" / "checkpoints" / "step_0000005",
        progress=False,
    )
    # Read as every resume reads them: plain data (weights_only), RNG states included.
    a = load_checkpoint(full.last_checkpoint)
    b = load_checkpoint(resumed.last_checkpoint)
    assert a["step"] == b["step"] == 12
    for key, value in a["renderer"].items():
        assert torch.equal(value, b["renderer"][key]), key


@pytest.mark.parametrize("method", ["sds", "csd", "vsd"])
def test_every_method_trains_a_few_steps(tmp_path, tiny_sd_prior, method):
    cfg = tiny_config(tmp_path, f"guidance.method={method}", "max_steps=2")
    trainer = Trainer(cfg, tiny_sd_prior)
    before = {k: v.clone() for k, v in trainer.field.state_dict().items()}
    metrics = trainer.training_step()
    trainer.training_step()
    trainer.close()
    assert np.isfinite(metrics["train/loss"])
    assert any(not torch.equal(before[k], v) for k, v in trainer.field.state_dict().items())


def test_vsd_leaves_the_shared_prior_as_it_found_it(tmp_path, tiny_sd_prior):
    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([500])
    emb = tiny_sd_prior.encode_text(["a red cube"])
    before = tiny_sd_prior.predict_noise(x, t, emb)
    trainer = Trainer(tiny_config(tmp_path, "guidance.method=vsd"), tiny_sd_prior)
    trainer.training_step()
    trainer.close()
    torch.testing.assert_close(tiny_sd_prior.predict_noise(x, t, emb), before)


def test_non_finite_loss_stops_with_the_step_and_the_term(tmp_path, tiny_sd_prior):
    trainer = Trainer(tiny_config(tmp_path), tiny_sd_prior)
    trainer.training_step()
    with torch.no_grad():  # a diverged model: its parameters went NaN
        for param in trainer.field.parameters():
            param.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"'guidance'.*step 1") as info:
        trainer.training_step()
    assert info.value.step == 1 and info.value.term == "guidance"
    trainer.close()


def exhausted(*args, **kwargs):
    """Stands in for the CUDA allocator running out (it raises torch.OutOfMemoryError)."""
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def assert_names_the_memory_keys(error: TrainingOutOfMemoryError, where: str) -> None:
    message = str(error)
    assert isinstance(error, torch.OutOfMemoryError)  # code catching OOM still catches it
    assert f"out of memory in {where}" in message and "Tried to allocate 2.00 GiB" in message
    for key in ("batch_size", "resolution", "prior.encoder=linear", "prior.image_size", "prior.dtype"):
        assert key in message


@pytest.mark.parametrize(
    "where,patched",
    [
        ("the forward pass of step 1 (the render)", lambda trainer: (trainer.renderer, "render")),
        ("the guidance of step 1", lambda trainer: (trainer.prior, "predict_noise")),
        ("the backward pass of step 1", lambda trainer: (torch.Tensor, "backward")),
        ("the optimizer step of step 1", lambda trainer: (trainer.optimizer, "step")),
    ],
)
def test_out_of_memory_anywhere_in_a_step_names_the_config_keys_that_reduce_memory(
    tmp_path, tiny_sd_prior, monkeypatch, where, patched
):
    trainer = Trainer(tiny_config(tmp_path), tiny_sd_prior)
    trainer.training_step()
    monkeypatch.setattr(*patched(trainer), exhausted)
    with pytest.raises(TrainingOutOfMemoryError) as caught:
        trainer.training_step()
    trainer.close()
    assert_names_the_memory_keys(caught.value, where)
