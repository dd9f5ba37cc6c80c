"""Prompt sources -> one Arrow table with columns `index` (position in the source) and `prompt`.

Sources: an inline list, a prompt-library JSON in the `{"train", "val", "test"}` format (MG15, DF415),
a text file (one prompt a line; blank lines and `#` comments skipped), or a table (.csv, .parquet,
.arrow/.feather) with a prompt column. Then one selection: the first N, a seeded sample of N, or
explicit indices. pyarrow reads the tables and does the selection (`Table.take`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.feather as pa_feather
import pyarrow.parquet as pa_parquet

from orchestrator.spec.spec import PromptSelection, PromptSource

SPLITS = ("train", "val", "test")


def load_prompts(source: PromptSource) -> pa.Table:
    """The selected prompts as a table (index, prompt). Raises ValueError naming the prompts field."""
    prompts = _read_source(source)
    if not prompts:
        raise ValueError(f"prompts: the source {_describe(source)} holds no prompts")
    table = pa.table(
        {"index": pa.array(range(len(prompts)), pa.int64()), "prompt": pa.array(prompts, pa.string())}
    )
    return table.take(pa.array(selected_indices(source.select, len(prompts)), pa.int64()))


def selected_indices(select: PromptSelection, count: int) -> list[int]:
    if select.first is not None:
        return list(range(min(select.first, count)))
    if select.sample is not None:
        if select.sample > count:
            raise ValueError(f"prompts.select.sample: {select.sample} asked, the source holds {count}")
        # A seeded sample kept in source order, so the panel reads like the library.
        return sorted(random.Random(select.seed).sample(range(count), select.sample))
    if select.indices is not None:
        if not select.indices:
            raise ValueError("prompts.select.indices is empty")
        bad = [i for i in select.indices if not 0 <= i < count]
        if bad:
            raise ValueError(f"prompts.select.indices: {bad} out of range, allowed 0..{count - 1}")
        return list(select.indices)
    return list(range(count))


def _read_source(source: PromptSource) -> list[str]:
    if source.items is not None:
        prompts = list(source.items)
    else:
        path = Path(source.path)
        if not path.is_file():
            raise ValueError(f"prompts.path: {str(path)!r} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".json":
            prompts = _read_library(path, source.split)
        elif suffix == ".txt":
            lines = (line.strip() for line in path.read_text().splitlines())
            prompts = [line for line in lines if line and not line.startswith("#")]
        elif suffix in (".csv", ".parquet", ".arrow", ".feather"):
            prompts = _read_table(path, source.column)
        else:
            raise ValueError(
                f"prompts.path: {path.name!r} has an unknown suffix; allowed .json, .txt, .csv, .parquet, .arrow"
            )
    blank = [i for i, prompt in enumerate(prompts) if not str(prompt).strip()]
    if blank:
        raise ValueError(f"prompts: empty prompt at position(s) {blank} of {_describe(source)}")
    return [str(prompt) for prompt in prompts]


def _read_library(path: Path, split: str) -> list[str]:
    try:
        library = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"prompts.path: {str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(library, dict) or not any(key in library for key in SPLITS):
        raise ValueError(
            f"prompts.path: {str(path)!r} is not a prompt library ({{'train', 'val', 'test'}} lists)"
        )
    if split not in library:
        raise ValueError(
            f"prompts.split: {split!r} is not in {path.name}; allowed {', '.join(sorted(library))}"
        )
    prompts = library[split]
    if not isinstance(prompts, list):
        raise ValueError(f"prompts.split: {path.name}[{split!r}] is not a list of prompts")
    return prompts


def _read_table(path: Path, column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table = pa_csv.read_csv(path)
    elif suffix == ".parquet":
        table = pa_parquet.read_table(path)
    else:
        table = pa_feather.read_table(path)
    if column not in table.column_names:
        raise ValueError(
            f"prompts.column: {column!r} is not a column of {path.name}; allowed {table.column_names}"
        )
    return [str(value) if value is not None else "" for value in table.column(column).to_pylist()]


def _describe(source: PromptSource) -> str:
    return "prompts.items" if source.items is not None else repr(source.path)
