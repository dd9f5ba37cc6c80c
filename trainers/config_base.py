"""The typed-config machinery every module's config builds on.

Each component (geometry, renderer, camera, prior, guidance, ...) declares its own pydantic model
next to its code, as threestudio does; `trainers.config.TrainConfig` composes them. The models are the
one source of defaults: YAML files and `key=value` overrides only change fields.

pydantic is used (rather than plain dataclasses) for its type coercion and its error paths; the
"did you mean" for unknown keys is ours because pydantic does not suggest names.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="ConfigBase")
# A config or sweep spec is a page of YAML; a bigger file is a mistake (or an attack on memory), refused
# before it is parsed. Long prompt lists belong in a prompt file (prompts.path).
MAX_YAML_BYTES = 2 * 2**20


class ConfigError(ValueError):
    """A config that cannot be used. The message names the field path and what is allowed."""


class ConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# A schedule is a constant; [start_value, end_value]: linear from the first step to the last step of the
# run (ScaleDreamer's timestep annealing); or [start_value, end_value, start_step, end_step]: linear
# in between, held outside (threestudio's convention).
Schedule = float | list[float]


def schedule_value(schedule: Schedule, step: int, max_steps: int | None = None) -> float:
    if isinstance(schedule, int | float):
        return float(schedule)
    if len(schedule) == 2:
        if max_steps is None:
            raise ValueError(f"the schedule {schedule} runs over the whole run: give max_steps")
        schedule = [*schedule, 0, max_steps - 1]
    start_value, end_value, start_step, end_step = schedule
    if step <= start_step:
        return float(start_value)
    if step >= end_step:
        return float(end_value)
    frac = (step - start_step) / max(end_step - start_step, 1)
    return float(start_value + frac * (end_value - start_value))


def schedule_breakpoints(schedules: Iterable[Schedule], max_steps: int | None = None) -> list[int]:
    """The steps where piecewise-linear schedules can reach their extremes (and their differences)."""
    steps = {0}
    for schedule in schedules:
        if isinstance(schedule, list) and len(schedule) == 4:
            steps.update({int(schedule[2]), int(schedule[3])})
        elif isinstance(schedule, list) and max_steps is not None:
            steps.add(max_steps - 1)
    return sorted(steps)


def check_schedule(value: Schedule, field: str) -> Schedule:
    if isinstance(value, list) and len(value) not in (2, 4):
        raise ValueError(
            f"{field}: a schedule is a number, [start_value, end_value] over the run, or "
            f"[start_value, end_value, start_step, end_step]; got {value}"
        )
    return value


def schedule_range(schedule: Schedule) -> tuple[float, float]:
    """The values a schedule can take, for validation."""
    if isinstance(schedule, int | float):
        return float(schedule), float(schedule)
    return float(min(schedule[:2])), float(max(schedule[:2]))


# ---------------------------------------------------------------------------------------------------
# Overrides


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["guidance.eta=0.2", "camera.elevation_range=[0,30]"]` -> nested dict. Values are YAML."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. guidance.eta=0.2)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        set_dotted(nested, key, yaml.safe_load(raw) if raw.strip() else "")
    return nested


def set_dotted(target: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = target
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def get_dotted(source: Mapping[str, Any], dotted_key: str) -> Any:
    node: Any = source
    for part in dotted_key.split("."):
        node = node[part]
    return node


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{path}."))
        else:
            flat[path] = value
    return flat


# ---------------------------------------------------------------------------------------------------
# Validation with field paths and suggestions


def valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a config model accepts (leaves and sub-configs)."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(valid_keys(annotation, prefix=f"{path}."))
    return keys


def check_known_keys(model: type[BaseModel], data: Mapping[str, Any], where: str = "") -> None:
    """Refuse unknown keys, naming the closest valid one."""
    known = valid_keys(model)
    for key in flatten(data):
        # A value that is a dict for a leaf field is reported by pydantic; here only unknown names.
        parts = key.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if prefix in known:
                field_model = _model_at(model, prefix)
                if field_model is None:  # a leaf: deeper parts are part of its value
                    break
                continue
            close = difflib.get_close_matches(prefix, known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            location = f" in {where}" if where else ""
            raise ConfigError(f"unknown config key {prefix!r}{location}{hint}")


def _model_at(model: type[BaseModel], dotted: str) -> type[BaseModel] | None:
    node: Any = model
    for part in dotted.split("."):
        annotation = node.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        node = annotation
    return node


def check_no_nul(data: Any, path: str = "") -> None:
    """No string of a config holds a NUL byte: file systems, databases and C libraries each cut or
    refuse it differently, so it is refused here, naming the field."""
    if isinstance(data, str):
        if "\x00" in data:
            raise ConfigError(f"{path or '(config)'}: the value holds a NUL byte ({data!r})")
    elif isinstance(data, Mapping):
        for key, value in data.items():
            if isinstance(key, str) and "\x00" in key:
                raise ConfigError(f"{path + '.' if path else ''}{key!r}: the key holds a NUL byte")
            check_no_nul(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list | tuple):
        for i, value in enumerate(data):
            check_no_nul(value, f"{path}[{i}]")


def build_config(model: type[C], data: Mapping[str, Any], where: str = "") -> C:
    """Validate a nested dict into `model`, with errors that name the dotted field path."""
    check_no_nul(data)
    check_known_keys(model, data, where)
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def format_validation_error(exc: ValidationError, where: str = "") -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(config)"
        message = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{path}: {message}{shown}")
    head = f"invalid config{f' in {where}' if where else ''}: "
    return head + "; ".join(lines)


def config_source(source: str | Path | Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """A config's starting point: None (the defaults), a dict, or a YAML path; and how errors name it."""
    if source is None:
        return {}, "the defaults"
    if isinstance(source, Mapping):
        return dict(source), "the config"
    return load_yaml(source), str(source)


def overrides_tree(overrides: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Dotted overrides, as "a.b=1" strings or a {"a.b": 1} mapping, -> a nested dict."""
    if not isinstance(overrides, Mapping):
        return parse_overrides(overrides)
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        set_dotted(nested, key, value)
    return nested


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(
            f"config file {str(path)!r} is {size / 2**20:.1f} MiB, over the {MAX_YAML_BYTES // 2**20} MiB a "
            "config or sweep spec may be; put long prompt lists in a prompt file (prompts.path)"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data
