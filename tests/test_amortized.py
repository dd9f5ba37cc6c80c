"""The amortized trainer without Ray: sharding, the prompt library and its embedding cache, the
generators, one process's training and exact resume, and the errors it gives before training."""

import collections
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.test_train import assert_names_the_memory_keys, exhausted
from trainers.amortized.config import load_amortized_config
from trainers.amortized.generators import Conv3DConfig, HyperINGPConfig, make_generator
from trainers.amortized.loop import (
    AmortizedTrainer,
    PromptLibraryError,
    epoch_batches,
    shard,
    steps_per_epoch,
    train,
)
from trainers.amortized.prompt_library import (
    GeneratorTextEncoder,
    PromptSource,
    TextEmbeddingCache,
    drop_duplicates,
    load_prompt_table,
)
from trainers.checkpoint import latest_checkpoint, load_checkpoint
from trainers.geometry.hash_grid import HashGridConfig
from trainers.priors.base import TrainingOutOfMemoryError
from trainers.reference.scenes import prompt_split
from trainers.reference.text_encoder import SceneTextEncoder, TextEncoderConfig

SMALL_GRID = {"n_levels": 4, "log2_hashmap_size": 10, "base_resolution": 4}
TINY = {
    "trainer": "amortized",
    "prompts": {"items": ["a red cube", "a blue ball", "a green cone"]},
    "prior": {"name": "tiny-sd"},
    "max_steps": 4,
    "batch_size": 2,
    "resolution": 16,
    "generator": {"kind": "hyper_ingp", "encoding": SMALL_GRID, "hidden_dim": 16, "hyper_hidden_dim": 16},
    "renderer": {"num_samples_per_ray": 8},
    "eval_prompts": {"n_train": 2, "held_out": ["a purple cylinder"]},
    "logging": {"log_every": 1, "checkpoint_every": 2, "val_views": 2, "turntable_frames": 3},
}


def tiny(tmp_path: Path, **overrides):
    base = {"output_dir": str(tmp_path / "run"), "text_cache.path": str(tmp_path / "text.arrow")}
    return load_amortized_config(TINY, {**base, **overrides})


class FakePrior:
    """Just a text encoder, as GeneratorTextEncoder sees a reference prior."""

    def __init__(self, seed: int = 0):
        self.text_encoder = SceneTextEncoder(TextEncoderConfig(seed=seed))


# -- sharding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n_prompts,batch_size", [(4, 1), (10, 3), (13, 2), (7, 4)])
def test_every_prompt_is_trained_exactly_once_per_epoch_across_ranks(world_size, n_prompts, batch_size):
    if n_prompts < world_size:
        pytest.skip("every rank needs a prompt")
    for epoch in range(3):
        trained = collections.Counter()
        per_rank_steps = set()
        for rank in range(world_size):
            batches = epoch_batches(n_prompts, rank, world_size, batch_size, epoch, seed=5)
            per_rank_steps.add(len(batches))
            for indices, weights in batches:
                assert len(indices) == len(weights) == batch_size
                trained.update(i for i, w in zip(indices, weights, strict=True) if w > 0)
        assert trained == collections.Counter(range(n_prompts))  # each prompt once, with weight 1
        # DDP needs every rank to take the same number of steps.
        assert per_rank_steps == {steps_per_epoch(n_prompts, world_size, batch_size)}


def test_sharding_uses_the_global_rank_so_a_second_node_trains_new_prompts():
    # 2 nodes x 2 GPUs: global ranks 0..3 over a world of 4 (not node-local ranks over 2).
    shards = [shard(8, rank, 4) for rank in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(8))
    assert shards[2] == [2, 6] and shards[0] == [0, 4]
    with pytest.raises(ValueError, match="rank 4 is outside the world of 4"):
        shard(8, 4, 4)


def test_epochs_shuffle_differently_but_reproducibly():
    a = epoch_batches(12, 0, 2, 3, epoch=0, seed=1)
    assert a == epoch_batches(12, 0, 2, 3, epoch=0, seed=1)
    assert a != epoch_batches(12, 0, 2, 3, epoch=1, seed=1)


# -- prompt library ------------------------------------------------------------------------------


def test_parquet_library_of_100k_prompts_loads_and_drops_duplicates_with_a_count(tmp_path):
    prompts = [f"prompt {i % 90_000}" for i in range(100_000)]
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "p.parquet")
    table = load_prompt_table(PromptSource(path=str(tmp_path / "p.parquet")))
    unique, dropped = drop_duplicates(table)
    assert dropped == 10_000 and unique.num_rows == 90_000
    assert unique.column("prompt").to_pylist()[:2] == ["prompt 0", "prompt 1"]  # first occurrences, in order


def test_the_shipped_reference_library_is_the_scene_split():
    library = json.loads(Path("sweeps/prompts/reference_scenes.json").read_text())
    split = prompt_split()
    assert library == {"train": split.train, "test": split.test}


def test_an_empty_library_is_refused_naming_the_field(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing here\n\n")
    cfg = tiny(tmp_path, **{"prompts": {"path": str(tmp_path / "empty.txt")}})
    with pytest.raises(PromptLibraryError, match="prompts: the source .*empty.txt' holds no prompts"):
        AmortizedTrainer(cfg, NO_PRIOR)


def test_a_duplicate_only_library_is_refused_when_workers_outnumber_its_prompts(tmp_path):
    cfg = tiny(tmp_path, **{"prompts.items": ["a red cube"] * 3, "data_parallel.num_workers": 2})
    with pytest.raises(PromptLibraryError, match=r"only 1 distinct prompt\(s\) \(2 duplicate\(s\) dropped\)"):
        AmortizedTrainer(cfg, NO_PRIOR, world_size=2)


def test_a_missing_split_is_refused_naming_the_splits_there(tmp_path):
    cfg = tiny(tmp_path, prompts={"path": "sweeps/prompts/magic3d_15.json", "split": "holdout"})
    with pytest.raises(
        PromptLibraryError, match="prompts.split: 'holdout' is not in magic3d_15.json; allowed test"
    ):
        AmortizedTrainer(cfg, NO_PRIOR)


class Unusable:
    def __getattr__(self, name):
        raise AssertionError("the prior was used before the prompt library was checked")


NO_PRIOR = Unusable()


# -- embedding cache -----------------------------------------------------------------------------


def test_cache_computes_once_then_reads_the_same_rows_memory_mapped(tmp_path):
    encoder = GeneratorTextEncoder(FakePrior())
    cache = TextEmbeddingCache(tmp_path / "c.arrow", encoder, batch_size=2)
    first = cache.get(["a red cube", "a blue ball", "a red cube"], progress=False)
    assert first.shape == (3, 16 * 64) and np.array_equal(first[0], first[2])
    again = TextEmbeddingCache(tmp_path / "c.arrow", encoder)
    calls = []
    encoder_encode = encoder.encode
    encoder.encode = lambda prompts: calls.append(prompts) or encoder_encode(prompts)
    second = again.get(["a blue ball", "a red cube"], progress=False)
    assert calls == []  # nothing recomputed
    assert np.array_equal(second, first[[1, 0]])
    assert isinstance(again.table.column("embedding").chunk(0).buffers()[-1], pa.Buffer)
    assert again.messages == []


def test_cache_built_by_another_encoder_is_rebuilt_with_a_message(tmp_path, caplog):
    path = tmp_path / "c.arrow"
    TextEmbeddingCache(path, GeneratorTextEncoder(FakePrior(seed=0))).get(["a red cube"], progress=False)
    other = GeneratorTextEncoder(FakePrior(seed=1))
    cache = TextEmbeddingCache(path, other)
    with caplog.at_level(logging.WARNING):
        rows = cache.get(["a red cube"], progress=False)
    assert "was built by encoder" in caplog.text and "rebuilding it" in caplog.text
    assert np.allclose(rows, other.encode(["a red cube"]).numpy())


def test_too_long_prompts_are_truncated_with_a_warning(caplog):
    encoder = GeneratorTextEncoder(FakePrior())
    long = "a red cube " * 10
    with caplog.at_level(logging.WARNING):
        from trainers.amortized.prompt_library import warn_truncated

        assert warn_truncated(encoder, [long, "a red cube"]) == [long]
    assert "longer than the text encoder's 16 tokens and are truncated" in caplog.text


def test_stable_diffusion_priors_condition_on_the_pooled_clip_output_and_flag_long_prompts(tiny_sd_prior):
    encoder = GeneratorTextEncoder(tiny_sd_prior)
    assert encoder.dim == tiny_sd_prior.text_encoder.config.hidden_size
    features = encoder.encode(["a red cube", "a blue ball"])
    assert features.shape == (2, encoder.dim) and not torch.allclose(features[0], features[1])
    long = "a very long prompt " * 40
    assert encoder.too_long([long, "a red cube"]) == [long]
    assert (
        len(encoder.encoder_id) == 16 and encoder.encoder_id != GeneratorTextEncoder(FakePrior()).encoder_id
    )


# -- generators ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        HyperINGPConfig(encoding=HashGridConfig(**SMALL_GRID), hidden_dim=8, hyper_hidden_dim=8),
        Conv3DConfig(channels=[8, 4], constant_channels=8, feature_dim=4, w_dim=16, noise_dim=8),
    ],
    ids=["hyper_ingp", "conv3d"],
)
def test_generators_give_each_prompt_its_own_field_and_train_end_to_end(cfg):
    torch.manual_seed(0)
    generator = make_generator(cfg, text_dim=12)
    with torch.no_grad():  # a trained grid: Instant-NGP starts its tables at ~1e-4, i.e. featureless
        for param in generator.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    text = torch.randn(2, 12)
    noise = torch.randn(2, generator.noise_dim) if generator.noise_dim else None
    codes = generator.codes(text, noise)
    points = torch.rand(50, 3) * 2 - 1
    (d0, rgb0), (d1, rgb1) = generator.query(points, codes, 0), generator.query(points, codes, 1)
    assert not torch.allclose(d0, d1)
    assert (
        d0.shape == (50,) and rgb0.shape == (50, 3) and (d0 >= 0).all() and ((rgb0 >= 0) & (rgb0 <= 1)).all()
    )
    assert not torch.allclose(rgb0, rgb1)  # different text, different field
    (d0.sum() + rgb1.sum()).backward()
    assert all(p.grad is not None for p in generator.parameters())


def test_hyper_ingp_last_bias_starts_at_zero():
    generator = make_generator(HyperINGPConfig(encoding=HashGridConfig(**SMALL_GRID)), text_dim=4)
    assert torch.count_nonzero(generator.hypernet[-1].bias) == 0


def test_conv3d_uses_fixed_noise_at_test_time():
    cfg = Conv3DConfig(channels=[4], constant_channels=4, feature_dim=4, w_dim=8, noise_dim=4)
    generator = make_generator(cfg, text_dim=3)
    text = torch.randn(1, 3)
    assert torch.equal(generator.codes(text), generator.codes(text))
    assert not torch.equal(generator.codes(text), generator.codes(text, torch.randn(1, 4)))


# -- training ------------------------------------------------------------------------------------


def test_training_writes_metrics_grids_turntable_and_resumes_bit_for_bit(tmp_path, tiny_sd_prior):
    straight = tiny(tmp_path / "a")
    result = train(straight, tiny_sd_prior, progress=False)
    out = Path(straight.output_dir)
    assert (out / "metrics.yaml").exists() and (out / "turntable.gif").stat().st_size > 0
    grid = out / "validation" / "step_0000004.png"
    import imageio.v3 as iio

    image = iio.imread(grid)
    # rows: 2 training prompts + 1 held-out prompt, each 16 px + padding; columns: 2 views.
    assert image.shape == (3 * 18 + 2, 2 * 18 + 2, 3) and image.std() > 0
    assert (out / "validation" / "step_0000004.txt").read_text().splitlines()[2] == "a purple cylinder"
    assert result.final_metrics["train/epoch"] == 2.0  # 3 prompts, 2 a step: 2 steps an epoch

    class Killed(Exception):
        pass

    def die_after_first_checkpoint(step, path):
        raise Killed

    resumed = tiny(tmp_path / "b")
    with pytest.raises(Killed):  # the same run, stopped right after its checkpoint at step 2
        train(resumed, tiny_sd_prior, progress=False, on_checkpoint=die_after_first_checkpoint)
    again = train(resumed, tiny_sd_prior, resume_from="latest", progress=False)
    assert again.final_metrics["train/resumed_at_step"] == 2
    a = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(Path(resumed.output_dir) / "checkpoints"))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_clip_scores_the_test_split_with_r_at_1_among_its_prompts(tmp_path, tiny_sd_prior, tiny_clip_dir):
    from trainers.amortized.loop import reported_metrics
    from trainers.config_base import ConfigError

    library = tmp_path / "library.json"  # as DF415's: the test split is (here: part of) the training prompts
    library.write_text(
        json.dumps({"train": TINY["prompts"]["items"], "test": ["a red cube", "a green cone"]})
    )
    clip = {"evaluation.clip": str(tiny_clip_dir), "evaluation.views": 3, "eval_prompts.test_split": "test"}
    config = tiny(tmp_path, prompts={"path": str(library)}, max_steps=2, **clip)
    expected = {"eval/test/clip_similarity", "eval/test/clip_r_at_1", "eval/held_out/clip_similarity"}
    assert expected | {"eval/clip_similarity", "eval/clip_r_at_1"} <= reported_metrics(config)
    seen = []
    result = train(config, tiny_sd_prior, progress=False, on_metrics=lambda step, m: seen.append(m))
    final = result.final_metrics
    assert -1 <= final["eval/test/clip_similarity"] <= 1 and -1 <= final["eval/held_out/clip_similarity"] <= 1
    # R@1 over the split's 2 prompts: each of the 3 views of each prompt counts, so a multiple of 1/6
    assert final["eval/test/clip_r_at_1"] * 6 == pytest.approx(round(final["eval/test/clip_r_at_1"] * 6))
    assert "eval/held_out/clip_r_at_1" not in final  # one held-out prompt: R@1 is undefined
    assert any("eval/test/clip_similarity" in m for m in seen)  # reported, as the sweep's objective is
    with pytest.raises(ConfigError, match="eval_prompts.test_split='test' scores a split"):
        tiny(tmp_path, **{"eval_prompts.test_split": "test"})  # inline prompts, no CLIP model


def test_occupancy_grid_rendering_is_refused_for_a_generator(tmp_path):
    from trainers.config_base import ConfigError

    with pytest.raises(ConfigError, match="renderer.estimator=uniform"):
        tiny(tmp_path, **{"renderer.estimator": "occgrid"})


# -- the command line ----------------------------------------------------------------------------


def test_cli_trains_an_amortized_config_and_generates_a_turntable_for_an_unseen_prompt(tmp_path, capsys):
    import imageio.v3 as iio
    import yaml

    from orchestrator.cli import main

    config_file = tmp_path / "amortized.yaml"
    config_file.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    overrides = [f"output_dir={run}", f"text_cache.path={tmp_path / 'text.arrow'}", "max_steps=2"]
    assert main(["train", str(config_file), *overrides]) == 0
    assert (run / "metrics.yaml").exists()

    unseen = "a purple teapot made of glass"
    assert unseen not in TINY["prompts"]["items"]
    assert main(["generate", str(run), unseen, "--output", str(tmp_path / "t.gif"), "--frames", "4"]) == 0
    printed = capsys.readouterr().out
    assert "generator forward" in printed and "ms" in printed
    frames = iio.imread(tmp_path / "t.gif")
    assert frames.shape == (4, 16, 16, 3)
    assert frames.std() > 1.0  # not one flat colour


def test_cli_train_refuses_a_bad_library_before_training(tmp_path, capsys):
    import yaml

    from orchestrator.cli import main

    config_file = tmp_path / "amortized.yaml"
    config_file.write_text(
        yaml.safe_dump({**TINY, "prompts": {"path": "sweeps/prompts/magic3d_15.json", "split": "x"}})
    )
    assert main(["train", str(config_file), f"output_dir={tmp_path / 'run'}"]) == 2
    assert "prompts.split: 'x' is not in magic3d_15.json" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("name", ["amortized_reference_cpu", "amortized_tiny_cpu"])
def test_shipped_amortized_configs_load_and_read_their_libraries(name):
    from trainers.amortized.loop import read_prompts

    cfg = load_amortized_config(f"sweeps/configs/{name}.yaml")
    prompts, dropped = read_prompts(cfg)
    assert cfg.trainer == "amortized" and dropped == 0
    assert len(prompts) == (200 if name == "amortized_reference_cpu" else 15)


def test_a_hyper_background_gives_each_prompt_its_own_backdrop(tmp_path, tiny_sd_prior):
    cfg = tiny(tmp_path, **{"generator.background_hyper_dim": 8, "max_steps": 1})
    trainer = AmortizedTrainer(cfg, tiny_sd_prior, progress=False)
    with torch.no_grad():
        for param in trainer.model.background.parameters():
            param.add_(torch.randn_like(param))
    trainer.training_step()  # trains through it
    assert all(p.grad is not None for p in trainer.model.background.parameters())
    cameras = trainer.validation_cameras()
    views = trainer.render_prompts(["a red cube", "a blue ball"], cameras)
    n = len(cameras)
    # The empty corners of the image are pure background: different per prompt.
    corner = views["rgb"][:, 0, 0]
    assert not torch.allclose(corner[:n], corner[n:])


def test_out_of_memory_in_the_backward_names_the_config_keys_that_reduce_memory(
    tmp_path, tiny_sd_prior, monkeypatch
):
    trainer = AmortizedTrainer(tiny(tmp_path), tiny_sd_prior, progress=False)
    monkeypatch.setattr(torch.Tensor, "backward", exhausted)
    with pytest.raises(TrainingOutOfMemoryError) as caught:
        trainer.training_step()
    assert_names_the_memory_keys(caught.value, "the backward pass of step 0")
