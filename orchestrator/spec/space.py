"""A spec's search space -> Optuna distributions and sampler; Optuna params -> trainer overrides.

The Optuna parameter names are the dotted trainer keys themselves (`guidance.eta`), except for the
timestep pair, sampled as `guidance.t_min` and a gap `guidance.t_gap` so that T_max = T_min + gap is
above T_min by construction (a TPE or CMA-ES sampler never sees an infeasible region). An annealed
range samples such a pair for each end (`guidance.t_min.start`, `guidance.t_gap.start`, `.end`), and
both ends become the two-point schedules `guidance.t_min: [start, end]`, `guidance.t_max: [...]`.
A fan-out sweep is a grid over one parameter, `prompt_index`, so every sweep is an Optuna study.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from orchestrator.spec.spec import (
    AnnealedTimesteps,
    CategoricalParam,
    FloatParam,
    IntParam,
    SpecError,
    SweepSpec,
    TimestepPair,
)

PROMPT_INDEX = "prompt_index"
T_MIN, T_GAP, T_MAX = "guidance.t_min", "guidance.t_gap", "guidance.t_max"
ENDS = ("start", "end")


def timestep_ranges(timesteps: TimestepPair | AnnealedTimesteps) -> dict[str, tuple[float, float]]:
    """The Optuna parameters of a timestep search and their [low, high]."""
    if isinstance(timesteps, TimestepPair):
        return {T_MIN: timesteps.t_min, T_GAP: timesteps.gap}
    ranges = {}
    for end in ENDS:
        pair = getattr(timesteps, end)
        ranges[f"{T_MIN}.{end}"], ranges[f"{T_GAP}.{end}"] = pair.t_min, pair.gap
    return ranges


def optuna_space(spec: SweepSpec, num_prompts: int) -> dict[str, BaseDistribution]:
    if spec.kind == "fanout":
        return {PROMPT_INDEX: CategoricalDistribution(list(range(num_prompts)))}
    space: dict[str, BaseDistribution] = {}
    for key, param in spec.search.space.items():
        if isinstance(param, FloatParam):
            space[key] = FloatDistribution(param.low, param.high, log=param.log, step=param.step)
        elif isinstance(param, IntParam):
            space[key] = IntDistribution(param.low, param.high, log=param.log, step=param.step)
        else:
            space[key] = CategoricalDistribution(param.choices)
    if spec.search.timesteps is not None:
        for key, bounds in timestep_ranges(spec.search.timesteps).items():
            space[key] = FloatDistribution(*bounds)
    return space


def make_sampler(spec: SweepSpec, num_prompts: int) -> optuna.samplers.BaseSampler:
    search = spec.search
    seed = search.seed
    startup = {} if search.n_startup_trials is None else {"n_startup_trials": search.n_startup_trials}
    if spec.kind == "fanout":
        return optuna.samplers.GridSampler({PROMPT_INDEX: list(range(num_prompts))}, seed=seed)
    if search.sampler == "tpe":
        # constant_liar: concurrent trials see each other as pending, so they do not all sample one spot.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, **startup)
    if search.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **startup)
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, **startup)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler(grid_values(spec), seed=seed)


def grid_values(spec: SweepSpec) -> dict[str, list[Any]]:
    """Every parameter's finite grid (sampler: grid). Floats need a step."""
    grid: dict[str, list[Any]] = {}
    for key, param in spec.search.space.items():
        if isinstance(param, CategoricalParam):
            grid[key] = list(param.choices)
        elif isinstance(param, IntParam) and not param.log:
            grid[key] = list(range(param.low, param.high + 1, param.step))
        elif isinstance(param, FloatParam) and param.step is not None:
            count = int(round((param.high - param.low) / param.step)) + 1
            grid[key] = [round(param.low + i * param.step, 12) for i in range(count)]
        else:
            raise SpecError(
                f"search.space.{key}: the grid sampler needs a finite grid (choices, or a float with step)"
            )
    if spec.search.timesteps is not None:
        raise SpecError(
            "search.timesteps: the grid sampler cannot sample the continuous timestep pair; use tpe or random"
        )
    return grid


def resolve_params(params: dict[str, Any]) -> dict[str, Any]:
    """Optuna params -> dotted trainer overrides (the timestep gap becomes T_max; the two ends of an
    annealed range become two-point schedules)."""
    annealed = [f"{key}.{end}" for key in (T_MIN, T_GAP) for end in ENDS]
    overrides = {key: value for key, value in params.items() if key not in (T_GAP, PROMPT_INDEX, *annealed)}
    if T_GAP in params:
        overrides[T_MAX] = round(float(params[T_MIN]) + float(params[T_GAP]), 9)
    if f"{T_MIN}.start" in params:
        lows = [float(params[f"{T_MIN}.{end}"]) for end in ENDS]
        gaps = [float(params[f"{T_GAP}.{end}"]) for end in ENDS]
        overrides[T_MIN] = [round(low, 9) for low in lows]
        overrides[T_MAX] = [round(low + gap, 9) for low, gap in zip(lows, gaps, strict=True)]
    return overrides


def corner_params(spec: SweepSpec) -> list[dict[str, Any]]:
    """A few extreme points of the space (all lows, all highs, each categorical choice) for validation."""
    if spec.kind == "fanout" or spec.search.is_empty():
        return [{}]
    ranges: dict[str, list[Any]] = {}
    for key, param in spec.search.space.items():
        ranges[key] = list(param.choices) if isinstance(param, CategoricalParam) else [param.low, param.high]
    if spec.search.timesteps is not None:
        ranges |= {key: list(bounds) for key, bounds in timestep_ranges(spec.search.timesteps).items()}
    count = max(len(values) for values in ranges.values())
    return [{key: values[min(i, len(values) - 1)] for key, values in ranges.items()} for i in range(count)]
