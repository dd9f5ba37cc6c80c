"""The sweep spec: one YAML schema for prompt fan-outs and searches, validated before Ray starts.

    spec = load_sweep_spec("sweeps/quickstart.yaml")          # SpecError names the field path

Two kinds from one schema:
- `fanout`: one fixed config (base + overrides) over many prompts, one trial per prompt;
- `search`: each trial is one config from `search.space`, evaluated on the whole prompt panel, its
  objective aggregated over the panel.

Every check that can be made without Ray is made here (including building the trainer's config at the
corners of the search space and checking the objective against the metrics the trainer reports), so
a bad spec fails in a second instead of after a cluster has started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from trainers.amortized.prompt_library import PromptSelection as PromptSelection  # re-exported
from trainers.amortized.prompt_library import PromptSource
from trainers.config_base import ConfigBase, ConfigError, build_config, load_yaml

# Keys the timestep pair owns: searched independently they could violate T_min < T_max.
TIMESTEP_KEYS = ("guidance.t_min", "guidance.t_max")


class SpecError(ConfigError):
    """A sweep spec that cannot run. The message names the field path, the value and what is allowed."""


# ---------------------------------------------------------------------------------------------------
# Prompts: the models live beside the reader, in trainers.amortized.prompt_library (the amortized
# trainer reads the same `prompts:` section), and are re-exported here.


# ---------------------------------------------------------------------------------------------------
# Search space


class FloatParam(ConfigBase):
    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> FloatParam:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log=true and step cannot be combined (Optuna samples one or the other)")
        return self


class IntParam(ConfigBase):
    type: Literal["int"] = "int"
    low: int
    high: int  # inclusive, as in Optuna
    log: bool = False
    step: int = 1

    @model_validator(mode="after")
    def _bounds(self) -> IntParam:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0 (got {self.low})")
        return self


class CategoricalParam(ConfigBase):
    type: Literal["categorical"] = "categorical"
    choices: list[Any]

    @field_validator("choices")
    @classmethod
    def _non_empty(cls, value: list[Any]) -> list[Any]:
        if len(value) < 1:
            raise ValueError("choices is empty: list at least one value")
        for choice in value:
            if not isinstance(choice, str | int | float | bool | type(None)):
                raise ValueError(f"choices must be numbers, strings, booleans or null (got {choice!r})")
        return value


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class TimestepPair(ConfigBase):
    """T_min and T_max searched together: T_max = T_min + gap, so T_min < T_max for every sample."""

    t_min: tuple[float, float]
    gap: tuple[float, float]

    @model_validator(mode="after")
    def _bounds(self) -> TimestepPair:
        (lo, hi), (gap_lo, gap_hi) = self.t_min, self.gap
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"t_min must be [low, high] with 0 <= low < high <= 1 (got {list(self.t_min)})")
        if not 0 < gap_lo < gap_hi:
            raise ValueError(
                f"gap must be [low, high] with 0 < low < high, so that T_min < T_max (got {list(self.gap)})"
            )
        if hi + gap_hi > 1:
            raise ValueError(
                f"t_min high + gap high = {hi + gap_hi:g} exceeds 1 (T_max is a fraction of the prior's timesteps)"
            )
        return self


class AnnealedTimesteps(ConfigBase):
    """The annealed range's two ends searched: T_min and T_max run linearly from `start` at the first step
    to `end` at the last; each end is a (T_min, gap) pair, so T_min < T_max at both ends, hence at
    every step."""

    start: TimestepPair
    end: TimestepPair


class SearchConfig(ConfigBase):
    space: dict[str, Param] = {}
    # {t_min, gap}: a constant range; {start: {t_min, gap}, end: {t_min, gap}}: an annealed one.
    timesteps: TimestepPair | AnnealedTimesteps | None = None
    sampler: Literal["tpe", "cmaes", "gp", "random", "grid"] = "tpe"
    seed: int = 0
    # TPE / GP random start-up trials (Optuna's n_startup_trials); None: Optuna's default.
    n_startup_trials: int | None = None

    @field_validator("space")
    @classmethod
    def _no_lone_timesteps(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in TIMESTEP_KEYS:
            if key in value:
                raise ValueError(
                    f"{key} cannot be searched on its own (T_min < T_max would not hold for every sample); "
                    "use search.timesteps: {t_min: [low, high], gap: [low, high]}"
                )
        return value

    def is_empty(self) -> bool:
        return not self.space and self.timesteps is None


# ---------------------------------------------------------------------------------------------------
# The rest


class Objective(ConfigBase):
    metric: str = "train/loss"
    mode: Literal["min", "max"] = "min"
    # How a search trial's panel of prompts becomes one number.
    aggregate: Literal["mean", "median", "min", "max"] = "mean"


class Resources(ConfigBase):
    # Fractions share a GPU between trials (e.g. 0.5: two trials per GPU).
    gpus: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    cpus: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    # The memory a worker may use, in GiB, for the check that a pack fits (trainers/memory.py) before
    # Ray starts; not reserved in Ray. gpu_memory_gb: one GPU's memory (80 for an H100 80GB), of which
    # a worker on a fraction of a GPU gets that fraction; memory_gb: host memory of a CPU worker.
    # None: unknown, not checked.
    gpu_memory_gb: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    memory_gb: float | None = Field(None, gt=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _something(self) -> Resources:
        if self.cpus == 0 and self.gpus == 0:
            raise ValueError("resources: a trial needs cpus > 0 or gpus > 0")
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise ValueError(f"resources.gpus above 1 must be a whole number (got {self.gpus})")
        return self


class Asha(ConfigBase):
    """ASHA over training steps (Ray's ASHAScheduler, time_attr = the trial's global step)."""

    grace_period: int = Field(10, ge=1)  # steps
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: int | None = None  # None: the trial's total steps


class Storage(ConfigBase):
    """Where the stores live; None: inside the workspace (SQLite files and a local directory).

    No URL needs a secret in it: each client takes its own from its standard place (PGPASSWORD or
    ~/.pgpass, MLFLOW_TRACKING_USERNAME/PASSWORD, the cloud SDKs' credential chains), and `${NAME}`
    is resolved from the environment where the store is used (orchestrator.spec.secrets). A URL with
    a literal password still works on this machine, but every record shows it as `***`."""

    optuna: str | None = None  # an Optuna storage URL, e.g. postgresql://user@host/db
    mlflow: str | None = None  # an MLflow tracking URI, e.g. http://mlflow:5000
    tune: str | None = None  # a Tune storage path: a shared file system or s3://bucket/prefix

    def redacted(self) -> dict[str, str]:
        from orchestrator.spec.secrets import redact_url

        return {k: redact_url(v) for k, v in self.model_dump().items() if v is not None}


class SweepSpec(ConfigBase):
    name: str
    # "amortized": each trial trains one generator on all `prompts` (a Ray Train run of
    # data_parallel.num_workers workers, each holding `resources`); kind must be "search".
    trainer: Literal["per-prompt", "amortized"] = "per-prompt"
    kind: Literal["fanout", "search"] = "search"
    # The trainer config: a YAML path (relative to the spec file) or an inline mapping; None: defaults.
    base: str | dict[str, Any] | None = None
    overrides: dict[str, Any] = {}  # dotted trainer keys -> values, applied on top of `base`
    prompts: PromptSource
    search: SearchConfig = SearchConfig()
    objective: Objective = Objective()
    trials: int | None = Field(None, ge=1)  # search: required; fanout: the number of prompts (may be omitted)
    max_concurrent: int = Field(1, ge=1)
    resources: Resources = Resources()
    early_stopping: Asha | None = None
    retries: int = Field(1, ge=0)  # re-runs of a failed trial, from its last checkpoint
    # Trials a worker trains at once behind one batched prior call (orchestrator/run/packed.py; the
    # README's "Packed trials"). 1: one trial per Ray Tune actor. Each member counts in max_concurrent.
    pack: int = Field(1, ge=1, strict=True)
    # Seeds per trial: a trial is its config trained with `replicates` seeds, as members of one pack,
    # and its objective their mean (the standard error beside it). Needs pack >= replicates.
    replicates: int = Field(1, ge=1, strict=True)
    # Workers of a packed sweep; None: ceil(max_concurrent / trials per worker).
    workers: int | None = Field(None, ge=1, strict=True)
    storage: Storage = Storage()
    # The Ray cluster: a clusters/*.yaml path or an inline mapping (see orchestrator.run.cluster).
    cluster: str | dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _name_usable(cls, value: str) -> str:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
        if not value or not set(value) <= allowed or value.startswith("."):
            raise ValueError(
                f"name {value!r} must be non-empty letters, digits, '-', '_' or '.' (it names files)"
            )
        return value

    @model_validator(mode="after")
    def _kind_consistent(self) -> SweepSpec:
        if self.kind == "search":
            if self.search.is_empty():
                raise ValueError(
                    "search.space: a search sweep needs at least one parameter (or search.timesteps)"
                )
            if self.trials is None:
                raise ValueError("trials: a search sweep needs the number of trials")
        elif not self.search.is_empty():
            raise ValueError(
                "search.space: a fanout sweep runs one fixed config; put fixed values in overrides"
            )
        return self

    @model_validator(mode="after")
    def _amortized_searches(self) -> SweepSpec:
        if self.trainer == "amortized" and self.kind != "search":
            raise ValueError(
                "kind: an amortized sweep trains one generator on all its prompts per trial; use kind: search"
            )
        if self.trainer == "amortized" and self.resources.gpus not in (0, 1):
            raise ValueError(
                f"resources.gpus: an amortized sweep's resources are per data-parallel worker, which holds "
                f"0 or 1 GPU (got {self.resources.gpus:g}); set data_parallel.num_workers for more GPUs"
            )
        return self

    @model_validator(mode="after")
    def _packs_fit(self) -> SweepSpec:
        if self.replicates > self.pack:
            raise ValueError(
                f"replicates: {self.replicates} seeds of a trial train as members of one pack, so pack "
                f"({self.pack}) must be at least replicates; set pack: {self.replicates} (or a multiple)"
            )
        if self.trainer == "amortized" and self.pack > 1:
            raise ValueError(
                "pack: an amortized trial is already a batch of prompts through one generator on its own "
                "data-parallel workers; packing applies to per-prompt sweeps (set pack: 1)"
            )
        return self

    @property
    def packed(self) -> bool:
        """Runs on packed workers (orchestrator/run/packed.py) rather than one Tune actor per trial."""
        return self.pack > 1 or self.replicates > 1

    @property
    def trials_per_worker(self) -> int:
        return self.pack // self.replicates

    def searched_keys(self) -> list[str]:
        keys = list(self.search.space)
        if self.search.timesteps is not None:
            keys += list(TIMESTEP_KEYS)
        return keys


# ---------------------------------------------------------------------------------------------------
# Loading and the checks that need the trainer and the prompt source


def load_sweep_spec(
    source: str | Path | dict[str, Any], name: str | None = None, check: bool = True
) -> SweepSpec:
    """A spec YAML path or mapping -> SweepSpec. Relative paths inside are resolved against the file's folder."""
    if isinstance(source, dict):
        data, where, root = dict(source), "the sweep spec", Path.cwd()
    else:
        path = Path(source)
        try:
            data = load_yaml(path)
        except ConfigError as exc:
            raise SpecError(str(exc)) from None
        except yaml.YAMLError as exc:
            raise SpecError(f"sweep spec {str(path)!r} is not valid YAML: {exc}") from None
        where, root = str(path), path.resolve().parent
    if name is not None:
        data["name"] = name
    try:
        spec = build_config(SweepSpec, data, where=where)
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    spec = _resolve_paths(spec, root)
    if check:
        check_spec(spec)
    return spec


def _resolve_paths(spec: SweepSpec, root: Path) -> SweepSpec:
    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (root / path).resolve())

    update: dict[str, Any] = {}
    if isinstance(spec.base, str):
        update["base"] = absolute(spec.base)
    if spec.prompts.path is not None:
        update["prompts"] = spec.prompts.model_copy(update={"path": absolute(spec.prompts.path)})
    if isinstance(spec.cluster, str) and ("/" in spec.cluster or spec.cluster.endswith(".yaml")):
        update["cluster"] = absolute(spec.cluster)
    return spec.model_copy(update=update)


def check_spec(spec: SweepSpec) -> None:
    """The checks that read files or the trainer's schema. Raises SpecError with the field path."""
    from orchestrator.spec.prompts import load_prompts
    from orchestrator.spec.secrets import check_no_literal_secrets
    from orchestrator.spec.space import corner_params, resolve_params
    from trainers.config_base import valid_keys

    if isinstance(spec.base, str) and not Path(spec.base).is_file():
        raise SpecError(f"base: trainer config {spec.base!r} does not exist")
    check_no_literal_secrets(
        spec.storage, ["tune"], "and Tune's storage is written to by every worker with its own credentials"
    )
    try:
        prompts = load_prompts(spec.prompts)
    except (OSError, ValueError) as exc:
        raise SpecError(str(exc)) from None

    if spec.kind == "fanout" and spec.trials is not None and spec.trials != prompts.num_rows:
        raise SpecError(
            f"trials: a fanout sweep runs one trial per prompt ({prompts.num_rows} selected); "
            f"got trials={spec.trials} (omit it)"
        )
    config_class, load_config, reported_metrics = trainer_functions(spec.trainer)
    known = set(valid_keys(config_class))
    for key in spec.search.space:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SpecError(f"search.space.{key}: not a trainer config key{hint}")
        if key.split(".")[0] in ("prompt", "prompts", "output_dir"):
            raise SpecError(f"search.space.{key}: set by the sweep itself, it cannot be searched")
    for key in spec.overrides:
        if key.split(".")[0] in ("prompt", "prompts", "output_dir"):
            raise SpecError(f"overrides.{key}: set by the sweep itself (prompts come from `prompts`)")
    _check_written_paths(spec)

    first_prompt = str(prompts.column("prompt")[0])
    base = base_config_dict(spec)
    # Build the trainer's config at every corner of the space: a bad value or combination
    # (a learning rate below 0, a method the trainer lacks) fails now, with the trainer's own message.
    config = None
    corners = []
    for params in corner_params(spec):
        try:
            config = load_config(
                base, {**spec.overrides, **resolve_params(params), **sweep_keys(spec, first_prompt)}
            )
        except ConfigError as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            at = f" at the search-space corner {shown}" if shown else ""
            raise SpecError(f"overrides/search.space: the trainer refuses the config{at}: {exc}") from None
        corners.append(config)
    assert config is not None
    reported = reported_metrics(config)
    _check_clip_objective(spec, config, reported)
    if spec.packed and config.guidance.method == "vsd":
        raise SpecError(
            f"pack: {spec.pack} with guidance.method: vsd: VSD trains a LoRA of the prior per trial, which "
            "members of a pack cannot share; set pack: 1 (and replicates: 1) or use asd, sds or csd"
        )
    _check_pack_fits_memory(spec, corners)
    if spec.packed and "://" in (spec.storage.tune or "") and not spec.storage.tune.startswith("file://"):
        raise SpecError(
            f"storage.tune: {spec.storage.tune!r}: a packed sweep keeps its members' checkpoints on a file "
            "system (local, or a mount every node has); object stores are not supported for pack > 1 yet"
        )
    if spec.objective.metric not in reported:
        raise SpecError(
            f"objective.metric {spec.objective.metric!r} is never reported by the trainer for this config; "
            f"allowed: {', '.join(sorted(reported))}"
        )
    if spec.search.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise SpecError("search.sampler 'cmaes' needs the cmaes package: pip install cmaes") from None
    if spec.search.sampler == "grid":
        from orchestrator.spec.space import grid_values

        grid_values(spec)  # raises SpecError for parameters without a finite grid


def _check_pack_fits_memory(spec: SweepSpec, configs: list) -> None:
    """A worker's `pack` members (at the search space's hungriest corner) must fit the memory that
    `resources` says a worker has (trainers/memory.py estimates it from the config). Per-prompt sweeps
    whose spec states the memory; others are not checked."""
    from trainers.memory import GIB, estimate_pack_memory

    on_gpu = spec.resources.gpus > 0
    stated = spec.resources.gpu_memory_gb if on_gpu else spec.resources.memory_gb
    if spec.trainer != "per-prompt" or stated is None:
        return
    if on_gpu:
        share = min(spec.resources.gpus, 1.0)  # a worker's pack lives on one GPU, or on its fraction
        key = "resources.gpu_memory_gb"
        where = f"{key}: {stated:g}" + (f" × resources.gpus: {share:g}" if share < 1 else "")
    else:
        share, key = 1.0, "resources.memory_gb"
        where = f"{key}: {stated:g}"
    available = stated * share * GIB
    estimate = max((estimate_pack_memory(c, spec.pack, on_gpu) for c in configs), key=lambda e: e.total)
    if estimate.total <= available:
        return
    most = estimate.most_members_within(available)
    if most >= spec.replicates:
        fix = f"lower pack to {most - most % spec.replicates} (the most that fits"
        fix += f", a multiple of replicates: {spec.replicates})" if spec.replicates > 1 else ")"
    else:
        fix = f"lower pack and replicates (not even {max(1, spec.replicates)} member(s) fit)"
    raise SpecError(
        f"pack: {spec.pack} members on one worker need {estimate.describe()}, more than the worker's "
        f"{available / GIB:.1f} GiB ({where}). {fix[0].upper()}{fix[1:]}; or shrink each member: "
        "prior.encoder: linear, prior.image_size, resolution, renderer.num_samples_per_ray, batch_size; "
        f"or, if the worker has more memory, set {key} to it (the estimate: trainers/memory.py)"
    )


# Trainer keys naming a file or folder a trial writes to (besides its own folder, which the sweep sets).
WRITTEN_PATH_KEYS = ("text_cache.path", "prior.cache_dir")


def _check_written_paths(spec: SweepSpec) -> None:
    """A trial writes only in its own folder and the caches: a written path in the spec's overrides or
    search space that climbs out with `..` is refused (a cache goes where it is named, absolutely)."""
    from trainers.config_base import flatten

    candidates = [(f"overrides.{k}", v) for k, v in flatten(spec.overrides).items()]
    for key, param in spec.search.space.items():
        for choice in getattr(param, "choices", []):
            candidates.append((f"search.space.{key}", choice))
    for field, value in candidates:
        key = (
            field.split(".", 1)[1] if field.startswith("overrides.") else field.removeprefix("search.space.")
        )
        if key in WRITTEN_PATH_KEYS and isinstance(value, str) and ".." in Path(value).parts:
            raise SpecError(
                f"{field}: {value!r} climbs out of its folder with '..'; give the cache an absolute path "
                "(e.g. on a mount every node has)"
            )


def trainer_functions(trainer: str):
    """(config class, config loader, reported-metrics function) of the trainer a spec names."""
    if trainer == "amortized":
        from trainers.amortized.config import AmortizedConfig, load_amortized_config
        from trainers.amortized.loop import reported_metrics

        return AmortizedConfig, load_amortized_config, reported_metrics
    from trainers.config import TrainConfig, load_train_config
    from trainers.per_prompt import reported_metrics

    return TrainConfig, load_train_config, reported_metrics


def sweep_keys(spec: SweepSpec, prompt: str) -> dict[str, Any]:
    """The trainer keys the sweep itself sets: the prompt (per-prompt), or the whole prompt source and
    each data-parallel worker's resources (amortized)."""
    if spec.trainer == "amortized":
        return {
            "prompts": spec.prompts.model_dump(mode="json", exclude_none=True),
            "data_parallel.cpus_per_worker": spec.resources.cpus,
            "data_parallel.use_gpu": spec.resources.gpus > 0,
        }
    return {"prompt": prompt}


def _check_clip_objective(spec: SweepSpec, config: Any, reported: set[str]) -> None:
    """The CLIP objectives' own errors: which setting is missing, rather than the list of metrics."""
    from trainers.evaluation import CLIP_R_AT_1, CLIP_SIMILARITY

    metric = spec.objective.metric
    if metric == CLIP_R_AT_1 and metric not in reported:  # an amortized trial ranks its evaluation prompts
        raise SpecError(
            f"objective.metric {CLIP_R_AT_1!r} is not a trial's metric: R@1 ranks a set of prompts, so a "
            f"fan-out computes it over its finished trials at the end; use {CLIP_SIMILARITY!r} per trial"
        )
    if metric == CLIP_SIMILARITY and metric not in reported:
        raise SpecError(
            f"objective.metric {CLIP_SIMILARITY!r} needs a CLIP model: set evaluation.clip in base or "
            "overrides (openai/clip-vit-large-patch14, the paper's; a local copy of it; tiny-clip on a CPU)"
        )
    if metric == CLIP_SIMILARITY and spec.early_stopping is not None and not config.evaluation.every:
        raise SpecError(
            f"early_stopping: ASHA judges trials on {CLIP_SIMILARITY!r} while they train, but it is only "
            "computed at the end; set evaluation.every (steps) in base or overrides, e.g. the checkpoint "
            "interval"
        )


def base_config_dict(spec: SweepSpec) -> dict[str, Any]:
    if spec.base is None:
        return {}
    if isinstance(spec.base, dict):
        return dict(spec.base)
    return load_yaml(spec.base)


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """The spec as a record (the workspace's spec.yaml, MLflow's spec.json, a Ray Job's upload): its
    store URLs as written, `${NAME}` references unresolved and any literal password shown as `***`."""
    data = spec.model_dump(mode="json", exclude_none=True)
    data["storage"] = spec.storage.redacted()
    return data


def save_spec(spec: SweepSpec, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
