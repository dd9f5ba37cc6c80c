"""A pack must fit its worker's memory: trainers/memory.py estimates a worker's training-step peak from
the config (the prior once, each member's 3D model, render, VAE encode and prior rows), and the sweep
spec is refused before Ray starts when `pack` members would not fit the memory its `resources` state."""

from pathlib import Path

import pytest

from orchestrator.spec.spec import SpecError, check_spec, load_sweep_spec
from trainers.config import load_train_config
from trainers.memory import GIB, estimate_pack_memory

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
# The GPU check's configuration (docs/gpu_check_report.md): SD 2.1-base's size, 64 px, ASD, fp16, the VAE.
SD_SIZE = {"prior.name": "sd21-shaped", "resolution": 64, "guidance.method": "asd"}


def sd_spec(pack: int, resources: dict, **extra) -> dict:
    return {
        "name": "sd",
        "kind": "search",
        "overrides": SD_SIZE,
        "prompts": {"items": ["a red cube"]},
        "search": {"space": {"guidance.eta": {"type": "float", "low": 0.0, "high": 1.0}}},
        "trials": 64,
        "max_concurrent": 64,
        "pack": pack,
        "resources": resources,
        **extra,
    }


def test_the_estimate_of_the_measured_gpu_run_lands_near_its_peak():
    """The H100 peaked at 5.61 GiB allocated (torch's max; the four methods' 3D models alive side by
    side in that benchmark). The estimate of that run, without the CUDA runtime: within 2 %."""
    estimate = estimate_pack_memory(load_train_config(None, SD_SIZE), pack=1, on_gpu=True)
    measured = 5.61 * GIB
    benchmark = estimate.total - estimate.runtime + 3 * estimate.model  # 3 more 3D models alive
    assert benchmark == pytest.approx(measured, rel=0.02)
    assert estimate.prior == pytest.approx(2.42 * GIB, rel=0.01)  # "memory after loading: 2.42 GiB"


def test_members_add_up_and_the_prior_is_counted_once():
    config = load_train_config(None, SD_SIZE)
    one, eight = (estimate_pack_memory(config, pack=k) for k in (1, 8))
    assert eight.total - one.total == 7 * one.per_member
    assert eight.prior == one.prior and eight.shared == one.shared


def test_each_member_follows_its_render_size_and_its_guidance_rows():
    base = estimate_pack_memory(load_train_config(None, SD_SIZE))
    bigger = estimate_pack_memory(load_train_config(None, {**SD_SIZE, "resolution": 128}))
    sds = estimate_pack_memory(load_train_config(None, {**SD_SIZE, "guidance.method": "sds"}))
    linear = estimate_pack_memory(load_train_config(None, {**SD_SIZE, "prior.encoder": "linear"}))
    assert bigger.render == 4 * base.render  # resolution² × samples per ray
    assert sds.rows * 3 == base.rows * 2  # SDS's 2 rows against ASD's 3 (uncond, cond, cond at t+Δt)
    assert linear.encoder == 0 < base.encoder  # no VAE in the step
    fp32 = estimate_pack_memory(load_train_config(None, {**SD_SIZE, "prior.dtype": "fp32"}))
    assert fp32.prior == 2 * base.prior


def test_pack_1_at_sd_size_fits_an_h100():
    load_sweep_spec(sd_spec(1, {"gpus": 1, "gpu_memory_gb": 80}))


def test_pack_64_at_sd_size_on_a_24_gib_gpu_is_refused_naming_pack_the_memory_key_and_the_fix():
    with pytest.raises(SpecError) as refused:
        load_sweep_spec(sd_spec(64, {"gpus": 1, "gpu_memory_gb": 24}))
    message = str(refused.value)
    assert message.startswith("pack: 64 members on one worker need about ")
    assert "(resources.gpu_memory_gb: 24)" in message
    most = estimate_pack_memory(load_train_config(None, SD_SIZE)).most_members_within(24 * GIB)
    assert 1 <= most < 64 and f"Lower pack to {most} (the most that fits)" in message
    for fix in ("prior.encoder: linear", "resolution", "renderer.num_samples_per_ray", "batch_size"):
        assert fix in message
    load_sweep_spec(sd_spec(most, {"gpus": 1, "gpu_memory_gb": 24}))  # and that pack is accepted


def test_a_worker_on_a_fraction_of_a_gpu_gets_that_fraction_of_its_memory():
    fits_whole = sd_spec(8, {"gpus": 1, "gpu_memory_gb": 40})
    load_sweep_spec(fits_whole)
    with pytest.raises(SpecError, match=r"resources\.gpu_memory_gb: 40 × resources\.gpus: 0\.5"):
        load_sweep_spec(sd_spec(8, {"gpus": 0.5, "gpu_memory_gb": 40}))


def test_replicates_are_members_so_the_suggested_pack_is_a_multiple_of_them():
    with pytest.raises(
        SpecError, match=r"Lower pack to 6 \(the most that fits, a multiple of replicates: 3\)"
    ):
        load_sweep_spec(sd_spec(9, {"gpus": 1, "gpu_memory_gb": 24}, replicates=3))


def test_a_cpu_worker_is_checked_against_its_stated_host_memory():
    cpu = {**SD_SIZE, "device": "cpu"}
    spec = {**sd_spec(2, {"cpus": 2, "memory_gb": 8}), "overrides": cpu}
    with pytest.raises(SpecError, match=r"\(resources\.memory_gb: 8\)"):  # fp32 on the CPU: 2 × 4.8 GiB
        load_sweep_spec(spec)
    load_sweep_spec({**spec, "resources": {"cpus": 2, "memory_gb": 32}})


def test_without_a_stated_memory_nothing_is_refused():
    load_sweep_spec(sd_spec(64, {"gpus": 1}))  # the worker's memory is unknown: not checked


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_fits_the_workers_it_is_written_for(path):
    """The quickstarts on a CPU worker with 2 GiB; the MG15 sweeps on an 80 GiB GPU (their share of it)."""
    spec = load_sweep_spec(path, check=False)
    key, size = ("gpu_memory_gb", 80) if spec.resources.gpus > 0 else ("memory_gb", 2)
    stated = spec.model_copy(update={"resources": spec.resources.model_copy(update={key: size})})
    check_spec(stated)


def test_the_sd_parameter_count_is_sd21_shaped_s():
    from trainers.memory import SD21_PARAMETERS
    from trainers.priors.sd21_shaped import PARAMETER_COUNTS

    assert SD21_PARAMETERS == sum(PARAMETER_COUNTS.values())


def test_dreamsweep_submit_refuses_a_pack_too_big_before_ray_starts(tmp_path, capsys, monkeypatch):
    import yaml

    import orchestrator.run.sweep
    from orchestrator.cli import main

    def no_ray(cluster):
        raise AssertionError("Ray was started for a pack that does not fit")

    monkeypatch.setattr(orchestrator.run.sweep, "init_ray", no_ray)
    path = tmp_path / "sd.yaml"
    path.write_text(yaml.safe_dump(sd_spec(64, {"gpus": 1, "gpu_memory_gb": 24})))
    assert main(["submit", str(path), "--workspace", str(tmp_path / "ws")]) == 2
    assert "pack: 64 members on one worker need about" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()  # nothing registered, no store created


@pytest.mark.parametrize("key", ["gpu_memory_gb", "memory_gb"])
def test_a_stated_memory_must_be_positive(key):
    with pytest.raises(SpecError, match=rf"resources\.{key}: Input should be greater than 0"):
        load_sweep_spec(sd_spec(1, {"gpus": 1, key: 0}))
