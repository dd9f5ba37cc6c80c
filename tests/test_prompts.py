"""Prompt sources become one Arrow table (index, prompt), with a selection applied."""

import json

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.feather as pa_feather
import pyarrow.parquet as pa_parquet
import pytest

from orchestrator.spec.prompts import load_prompts
from orchestrator.spec.spec import PromptSource

PROMPTS = [f"prompt number {i}" for i in range(10)]


def source(**kwargs) -> PromptSource:
    return PromptSource.model_validate(kwargs)


def test_inline_prompts_keep_their_order_and_positions():
    table = load_prompts(source(items=PROMPTS[:3]))
    assert table.column_names == ["index", "prompt"]
    assert table.column("prompt").to_pylist() == PROMPTS[:3]
    assert table.column("index").to_pylist() == [0, 1, 2]


def test_library_json_reads_the_requested_split(tmp_path):
    path = tmp_path / "lib.json"
    path.write_text(json.dumps({"train": PROMPTS[:4], "val": PROMPTS[4:6], "test": PROMPTS[6:]}))
    assert load_prompts(source(path=str(path), split="val")).column("prompt").to_pylist() == PROMPTS[4:6]


def test_shipped_magic3d_library_loads_fifteen_train_prompts():
    from pathlib import Path

    lib = Path(__file__).resolve().parents[1] / "sweeps" / "prompts" / "magic3d_15.json"
    assert load_prompts(source(path=str(lib))).num_rows == 15


def test_unknown_split_names_the_splits_that_exist(tmp_path):
    path = tmp_path / "lib.json"
    path.write_text(json.dumps({"train": PROMPTS, "test": PROMPTS}))
    with pytest.raises(ValueError, match=r"prompts.split.*'nope'.*test, train"):
        load_prompts(source(path=str(path), split="nope"))


def test_text_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\na cat\n\n  a dog  \n")
    assert load_prompts(source(path=str(path))).column("prompt").to_pylist() == ["a cat", "a dog"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".arrow"])
def test_table_files_read_the_prompt_column(tmp_path, suffix):
    table = pa.table({"id": list(range(5)), "text": PROMPTS[:5]})
    path = tmp_path / f"p{suffix}"
    {".csv": pa_csv.write_csv, ".parquet": pa_parquet.write_table, ".arrow": pa_feather.write_feather}[
        suffix
    ](table, path)
    assert load_prompts(source(path=str(path), column="text")).column("prompt").to_pylist() == PROMPTS[:5]


def test_missing_column_lists_the_columns(tmp_path):
    path = tmp_path / "p.parquet"
    pa_parquet.write_table(pa.table({"text": PROMPTS}), path)
    with pytest.raises(ValueError, match=r"prompts.column.*'prompt'.*text"):
        load_prompts(source(path=str(path)))


def test_first_n_selection_takes_the_head():
    table = load_prompts(source(items=PROMPTS, select={"first": 3}))
    assert table.column("index").to_pylist() == [0, 1, 2]


def test_seeded_sample_is_reproducible_ordered_and_depends_on_the_seed():
    a = load_prompts(source(items=PROMPTS, select={"sample": 4, "seed": 1})).column("index").to_pylist()
    b = load_prompts(source(items=PROMPTS, select={"sample": 4, "seed": 1})).column("index").to_pylist()
    others = {
        tuple(
            load_prompts(source(items=PROMPTS, select={"sample": 4, "seed": s})).column("index").to_pylist()
        )
        for s in range(2, 8)
    }
    assert a == b and a == sorted(a) and len(set(a)) == 4
    assert others - {tuple(a)}


def test_explicit_indices_select_those_prompts_in_that_order():
    table = load_prompts(source(items=PROMPTS, select={"indices": [7, 2]}))
    assert table.column("prompt").to_pylist() == [PROMPTS[7], PROMPTS[2]]
    assert table.column("index").to_pylist() == [7, 2]


def test_out_of_range_indices_are_refused_with_the_allowed_range():
    with pytest.raises(ValueError, match=r"prompts.select.indices.*\[12\].*0..9"):
        load_prompts(source(items=PROMPTS, select={"indices": [1, 12]}))


def test_two_selection_rules_at_once_are_refused():
    with pytest.raises(ValueError, match="one of first, sample, indices"):
        source(items=PROMPTS, select={"first": 2, "sample": 2})


def test_an_empty_prompt_is_refused_with_its_position():
    with pytest.raises(ValueError, match=r"empty prompt at position\(s\) \[1\]"):
        load_prompts(source(items=["a cat", "  "]))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(source(path=str(tmp_path / "nope.json")))
