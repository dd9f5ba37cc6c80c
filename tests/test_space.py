"""The search space: Optuna distributions, samplers by name, and T_min < T_max by construction."""

import optuna
import pytest

from orchestrator.spec.space import (
    PROMPT_INDEX,
    T_GAP,
    T_MAX,
    T_MIN,
    corner_params,
    grid_values,
    make_sampler,
    optuna_space,
    resolve_params,
)
from orchestrator.spec.spec import SpecError, SweepSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)


def spec(**search) -> SweepSpec:
    return SweepSpec.model_validate(
        {"name": "s", "kind": "search", "trials": 4, "prompts": {"items": ["a cat"]}, "search": search}
    )


SPACE = {
    "guidance.eta": {"type": "float", "low": 0.0, "high": 1.0},
    "optimizer.lr_encoding": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": {"type": "int", "low": 1, "high": 4},
    "guidance.method": {"type": "categorical", "choices": ["asd", "sds"]},
}


def test_each_param_type_becomes_the_matching_optuna_distribution():
    space = optuna_space(spec(space=SPACE), num_prompts=1)
    assert space["guidance.eta"] == optuna.distributions.FloatDistribution(0.0, 1.0)
    assert space["optimizer.lr_encoding"] == optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    assert space["batch_size"] == optuna.distributions.IntDistribution(1, 4)
    assert space["guidance.method"] == optuna.distributions.CategoricalDistribution(["asd", "sds"])


def test_timestep_pair_always_samples_t_min_below_t_max():
    s = spec(timesteps={"t_min": [0.02, 0.5], "gap": [0.05, 0.45]})
    space = optuna_space(s, 1)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(200):
        trial = study.ask(space)
        resolved = resolve_params(trial.params)
        assert 0.0 <= resolved[T_MIN] < resolved[T_MAX] <= 1.0
        assert T_GAP not in resolved
        study.tell(trial, 0.0)


def test_an_annealed_timestep_search_keeps_t_min_below_t_max_at_every_step_of_every_sample():
    from trainers.guidance import GuidanceConfig

    s = spec(
        timesteps={
            "start": {"t_min": [0.3, 0.6], "gap": [0.2, 0.38]},
            "end": {"t_min": [0.02, 0.3], "gap": [0.1, 0.6]},
        }
    )
    space = optuna_space(s, 1)
    assert set(space) == {f"{key}.{end}" for key in (T_MIN, T_GAP) for end in ("start", "end")}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(100):
        trial = study.ask(space)
        resolved = resolve_params(trial.params)
        assert set(resolved) == {T_MIN, T_MAX}
        config = GuidanceConfig(t_min=resolved[T_MIN], t_max=resolved[T_MAX])
        config.check_timesteps(max_steps=1000)  # raises at the first step where T_min >= T_max
        study.tell(trial, 0.0)


def test_resolved_t_max_is_t_min_plus_gap():
    assert resolve_params({T_MIN: 0.1, T_GAP: 0.5, "guidance.eta": 0.2}) == {
        T_MIN: 0.1,
        T_MAX: 0.6,
        "guidance.eta": 0.2,
    }


def test_fanout_space_is_one_categorical_over_prompt_positions():
    s = SweepSpec.model_validate({"name": "f", "kind": "fanout", "prompts": {"items": ["a", "b", "c"]}})
    assert optuna_space(s, 3) == {PROMPT_INDEX: optuna.distributions.CategoricalDistribution([0, 1, 2])}
    assert resolve_params({PROMPT_INDEX: 2}) == {}


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("tpe", optuna.samplers.TPESampler),
        ("gp", optuna.samplers.GPSampler),
        ("random", optuna.samplers.RandomSampler),
    ],
)
def test_sampler_names_build_optuna_samplers(name, cls):
    assert isinstance(make_sampler(spec(space=SPACE, sampler=name), 1), cls)


def test_grid_sampler_enumerates_categoricals_ints_and_stepped_floats():
    s = spec(
        sampler="grid",
        space={
            "guidance.method": {"type": "categorical", "choices": ["asd", "sds"]},
            "batch_size": {"type": "int", "low": 1, "high": 3},
            "guidance.eta": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.1},
        },
    )
    assert grid_values(s) == {
        "guidance.method": ["asd", "sds"],
        "batch_size": [1, 2, 3],
        "guidance.eta": [0.0, 0.1, 0.2],
    }
    assert isinstance(make_sampler(s, 1), optuna.samplers.GridSampler)


def test_grid_sampler_refuses_a_continuous_float_naming_it():
    with pytest.raises(SpecError, match=r"search.space.guidance.eta: the grid sampler needs a finite grid"):
        grid_values(spec(sampler="grid", space={"guidance.eta": {"type": "float", "low": 0.0, "high": 1.0}}))


def test_corners_cover_the_bounds_and_every_choice():
    corners = corner_params(spec(space=SPACE))
    assert {c["guidance.eta"] for c in corners} == {0.0, 1.0}
    assert {c["guidance.method"] for c in corners} == {"asd", "sds"}
    assert {c["batch_size"] for c in corners} == {1, 4}
