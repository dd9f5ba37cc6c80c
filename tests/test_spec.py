"""Sweep specs: the shipped ones load, and every malformed spec is refused before Ray starts, with
the field path, the bad value and what is allowed in the message."""

import copy
from pathlib import Path

import pytest

from orchestrator.spec.spec import SpecError, load_sweep_spec

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"

GOOD = {
    "name": "t",
    "kind": "search",
    "base": {"max_steps": 4, "resolution": 32},
    "prompts": {"items": ["a red cube", "a blue ball"]},
    "search": {
        "space": {"guidance.eta": {"type": "float", "low": 0.0, "high": 1.0}},
        "timesteps": {"t_min": [0.02, 0.3], "gap": [0.3, 0.6]},
    },
    "objective": {"metric": "train/loss", "mode": "min"},
    "trials": 3,
}


def spec_with(path: str, value):
    data = copy.deepcopy(GOOD)
    node = data
    keys = path.split("/")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(keys[-1])
    else:
        node[keys[-1]] = value
    return data


DELETE = object()


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_validate(path):
    spec = load_sweep_spec(path)
    assert spec.name == path.stem


def test_a_good_spec_loads_with_its_searched_keys():
    spec = load_sweep_spec(GOOD)
    assert spec.searched_keys() == ["guidance.eta", "guidance.t_min", "guidance.t_max"]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("trails", 3, r"unknown config key 'trails'.*did you mean 'trials'"),
        ("trials", "many", r"trials: .*integer.*'many'"),
        ("trials", 0, r"trials: Input should be greater than or equal to 1 \(got 0\)"),
        ("resources", {"gpus": -1}, r"resources.gpus: Input should be greater than or equal to 0 \(got -1\)"),
        (
            "resources",
            {"cpus": -0.5},
            r"resources.cpus: Input should be greater than or equal to 0 \(got -0.5\)",
        ),
        (
            "search/sampler",
            "bayes",
            r"search.sampler: Input should be 'tpe', 'cmaes', 'gp', 'random' or 'grid' \(got 'bayes'\)",
        ),
        ("search/space", {}, None),  # with timesteps still there: allowed; see the empty-space test
        ("search/timesteps", {"t_min": [0.5, 0.6], "gap": [0.0, 0.1]}, r"search.timesteps.*gap.*0 < low"),
        ("search/timesteps", {"t_min": [0.5, 0.9], "gap": [0.1, 0.3]}, r"search.timesteps.*exceeds 1"),
        (
            "search/space/guidance.eta",
            {"type": "float", "low": 1.0, "high": 0.5},
            r"guidance.eta.*low \(1.0\) must be < high",
        ),
        (
            "search/space/guidance.eta",
            {"type": "normal", "low": 0.0},
            r"search.space.guidance.eta.*'float', 'int', 'categorical'",
        ),
        ("objective/mode", "maximise", r"objective.mode.*'min' or 'max'.*'maximise'"),
        ("max_concurrent", 0, r"max_concurrent: Input should be greater than or equal to 1 \(got 0\)"),
        ("retries", -1, r"retries: Input should be greater than or equal to 0 \(got -1\)"),
        ("prompts", {"items": []}, r"prompts.*items is empty"),
    ],
)
def test_malformed_field_is_refused_naming_its_path(path, value, expected):
    if expected is None:
        load_sweep_spec(spec_with(path, value))
        return
    with pytest.raises(SpecError, match=expected):
        load_sweep_spec(spec_with(path, value))


def test_empty_search_space_is_refused():
    data = spec_with("search", {"space": {}})
    with pytest.raises(SpecError, match=r"search.space: a search sweep needs at least one parameter"):
        load_sweep_spec(data)


def test_t_min_and_t_max_cannot_be_searched_independently():
    data = spec_with("search/space/guidance.t_max", {"type": "float", "low": 0.1, "high": 0.9})
    with pytest.raises(SpecError, match=r"guidance.t_max cannot be searched on its own.*search.timesteps"):
        load_sweep_spec(data)


def test_fixed_t_min_above_t_max_is_refused_by_the_trainer_config():
    data = spec_with("search/timesteps", DELETE)
    data["overrides"] = {"guidance.t_min": 0.9, "guidance.t_max": 0.5}
    with pytest.raises(SpecError, match=r"guidance.t_min \(0.9\) must be < guidance.t_max \(0.5\)"):
        load_sweep_spec(data)


def test_objective_the_trainer_never_reports_is_refused_with_the_metrics_it_does():
    data = spec_with("objective/metric", "train/lost")
    with pytest.raises(SpecError, match=r"objective.metric 'train/lost' is never reported.*train/loss"):
        load_sweep_spec(data)


def test_unknown_searched_trainer_key_suggests_the_closest():
    data = spec_with("search/space/guidance.etta", {"type": "float", "low": 0.0, "high": 1.0})
    with pytest.raises(
        SpecError, match=r"search.space.guidance.etta: not a trainer config key.*'guidance.eta'"
    ):
        load_sweep_spec(data)


def test_space_corner_the_trainer_refuses_is_reported_with_the_corner():
    data = spec_with("search/space/guidance.cfg_scale", {"type": "float", "low": -5.0, "high": 10.0})
    with pytest.raises(SpecError, match=r"corner.*guidance.cfg_scale=-5.0.*cfg_scale must be >= 0"):
        load_sweep_spec(data)


def test_fanout_refuses_a_search_space_and_a_wrong_trial_count():
    data = spec_with("kind", "fanout")
    with pytest.raises(SpecError, match=r"search.space: a fanout sweep runs one fixed config"):
        load_sweep_spec(data)
    data.pop("search")
    with pytest.raises(SpecError, match=r"trials: a fanout sweep runs one trial per prompt \(2 selected\)"):
        load_sweep_spec(data)
    data.pop("trials")
    assert load_sweep_spec(data).kind == "fanout"


def test_search_needs_a_trial_count():
    with pytest.raises(SpecError, match=r"trials: a search sweep needs the number of trials"):
        load_sweep_spec(spec_with("trials", DELETE))


def test_missing_base_file_is_named(tmp_path):
    with pytest.raises(SpecError, match=r"base: trainer config .*nope.yaml.* does not exist"):
        load_sweep_spec(spec_with("base", str(tmp_path / "nope.yaml")))


def test_yaml_file_relative_paths_resolve_against_the_spec_folder(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    (tmp_path / "spec.yaml").write_text(
        "name: rel\nkind: fanout\nprompts: {path: prompts.txt}\nobjective: {metric: train/loss}\n"
    )
    spec = load_sweep_spec(tmp_path / "spec.yaml")
    assert spec.prompts.path == str(tmp_path / "prompts.txt")


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parents[1].glob("sweeps/*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_sweep_spec_validates(path):
    spec = load_sweep_spec(path)
    assert spec.name == path.stem and spec.prompts is not None


# -- the CLIP objective ------------------------------------------------------------------------------


def clip_objective_spec(**overrides):
    data = spec_with("objective", {"metric": "eval/clip_similarity", "mode": "max"})
    data["overrides"] = dict(overrides)
    return data


def test_a_clip_similarity_objective_validates_only_when_a_clip_model_is_configured():
    with pytest.raises(SpecError, match=r"'eval/clip_similarity' needs a CLIP model: set evaluation.clip"):
        load_sweep_spec(clip_objective_spec())
    spec = load_sweep_spec(clip_objective_spec(**{"evaluation.clip": "tiny-clip"}))
    assert spec.objective.metric == "eval/clip_similarity"
    # In the base config as well as in overrides (as the shipped SD specs set it).
    data = clip_objective_spec()
    data["base"] = {**GOOD["base"], "evaluation": {"clip": "openai/clip-vit-large-patch14"}}
    assert load_sweep_spec(data).objective.mode == "max"


def test_r_at_1_is_refused_as_a_trials_objective_and_asha_needs_clip_while_training():
    data = spec_with("objective", {"metric": "eval/clip_r_at_1", "mode": "max"})
    with pytest.raises(SpecError, match="R@1 ranks a set of prompts"):
        load_sweep_spec(data)
    data = clip_objective_spec(**{"evaluation.clip": "tiny-clip"})
    data["early_stopping"] = {"grace_period": 2}
    with pytest.raises(SpecError, match="set evaluation.every"):
        load_sweep_spec(data)
    data["overrides"]["evaluation.every"] = 2
    assert load_sweep_spec(data).early_stopping.grace_period == 2


def test_the_shipped_stable_diffusion_specs_optimise_clip_similarity():
    for name in ("mg15-eta-cfg", "mg15-fanout"):
        spec = load_sweep_spec(SWEEPS / f"{name}.yaml")
        assert (spec.objective.metric, spec.objective.mode) == ("eval/clip_similarity", "max")
        assert spec.base["evaluation"]["clip"] == "openai/clip-vit-large-patch14"


def test_the_df415_spec_is_the_papers_amortized_3dconv_setting_scored_by_clip_on_the_test_split():
    from orchestrator.spec.spec import base_config_dict, sweep_keys, trainer_functions
    from trainers.amortized.loop import reported_metrics, test_prompts

    spec = load_sweep_spec(SWEEPS / "df415-3dconv.yaml")
    assert spec.trainer == "amortized" and spec.resources.gpus == 1  # per data-parallel worker
    assert (spec.objective.metric, spec.objective.mode) == ("eval/test/clip_similarity", "max")
    _, load_config, _ = trainer_functions("amortized")
    config = load_config(base_config_dict(spec), sweep_keys(spec, ""))
    assert config.prior.name == "stabilityai/stable-diffusion-2-1-base" and config.generator.kind == "conv3d"
    assert config.data_parallel.num_workers > 1 and config.evaluation.clip == "openai/clip-vit-large-patch14"
    assert "eval/test/clip_r_at_1" in reported_metrics(config)  # R@1 over the test prompts, at the end
    assert len(test_prompts(config)) == 415
