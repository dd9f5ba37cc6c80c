"""Prompt libraries as one Arrow table, and the cache of their text embeddings.

    table = load_prompt_table(PromptSource(path="sweeps/prompts/magic3d_15.json", split="train"))
    table, dropped = drop_duplicates(table)
    features = TextEmbeddingCache(path, encoder).get(table.column("prompt").to_pylist())

Sources: an inline list, a prompt-library JSON in the `{"train", "val", "test"}` format (MG15, DF415),
a text file (one prompt a line; blank lines and `#` comments skipped), or a table (.csv, .parquet,
.arrow/.feather) with a prompt column. Then one selection: the first N, a seeded sample of N, or
explicit indices. The sweep orchestrator reads its prompts through this module too.

The cache holds what the amortized generator is conditioned on (one vector per prompt, see
`GeneratorTextEncoder`), computed once in batches, in an Arrow IPC file read memory-mapped. The file
records the id of the encoder that wrote it; a file written by another encoder is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.feather as pa_feather
import pyarrow.parquet as pa_parquet
import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from trainers.config_base import ConfigBase

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Bounds that keep a bad prompt source from exhausting memory (every source is read whole). A prompt is
# read by a text encoder of 77 tokens (CLIP) or fewer, so 2,000 characters is far past any useful one;
# 256 MiB holds millions of useful prompts.
MAX_PROMPT_CHARS = 2_000
MAX_SOURCE_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------------------------------
# Where prompts come from (the sweep spec's `prompts:` section uses these same models)


class PromptSelection(ConfigBase):
    """At most one of: the first N, a seeded sample of N, explicit indices (into the source's order)."""

    first: int | None = Field(None, ge=1)
    sample: int | None = Field(None, ge=1)
    seed: int = 0
    indices: list[int] | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> PromptSelection:
        given = [name for name in ("first", "sample", "indices") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"prompts.select: give one of first, sample, indices (got {', '.join(given)})")
        return self


class PromptSource(ConfigBase):
    """Inline `items`, or a `path` to a library JSON ({"train","val","test"}), a .txt, .csv, .parquet or .arrow."""

    items: list[str] | None = None
    path: str | None = None
    split: str = "train"  # library JSON only
    column: str = "prompt"  # table files only
    select: PromptSelection = PromptSelection()

    @model_validator(mode="after")
    def _one_source(self) -> PromptSource:
        if (self.items is None) == (self.path is None):
            raise ValueError(
                "prompts: give either items (an inline list) or path (a library JSON, .txt, .csv, .parquet)"
            )
        if self.items is not None and not self.items:
            raise ValueError("items is empty: list at least one prompt")
        return self


def load_prompt_table(source: PromptSource) -> pa.Table:
    """The selected prompts as a table (index: position in the source, prompt). ValueError names the field."""
    prompts = _read_source(source)
    if not prompts:
        raise ValueError(f"prompts: the source {_describe(source)} holds no prompts")
    table = pa.table({"index": pa.array(range(len(prompts)), pa.int64()), "prompt": prompts})
    return table.take(pa.array(selected_indices(source.select, len(prompts)), pa.int64()))


def drop_duplicates(table: pa.Table) -> tuple[pa.Table, int]:
    """The first occurrence of every prompt, in order, and how many rows were dropped."""
    prompts = table.column("prompt").combine_chunks()
    # index_in of each prompt in the column itself is the position of its first occurrence.
    first = pc.index_in(prompts, value_set=prompts)
    keep = pc.equal(first, pa.array(np.arange(len(prompts), dtype=np.int32)))
    unique = table.filter(keep)
    return unique, table.num_rows - unique.num_rows


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


def _read_source(source: PromptSource) -> pa.Array:
    if source.items is not None:
        prompts = pa.array([str(p) for p in source.items], pa.string())
    else:
        path = Path(source.path)
        if not path.is_file():
            raise ValueError(f"prompts.path: {str(path)!r} does not exist")
        _check_source_size(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            prompts = pa.array(_read_library(path, source.split), pa.string())
        elif suffix == ".txt":
            lines = (line.strip() for line in path.read_text().splitlines())
            prompts = pa.array([line for line in lines if line and not line.startswith("#")], pa.string())
        elif suffix in (".csv", ".parquet", ".arrow", ".feather"):
            prompts = _read_table(path, source.column)
        else:
            raise ValueError(
                f"prompts.path: {path.name!r} has an unknown suffix; allowed .json, .txt, .csv, .parquet, .arrow"
            )
    # Vectorised, so that 100k prompts from Parquet stay well under a second.
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(prompts.fill_null(""))), 0)
    if pc.any(blank).as_py():
        positions = np.flatnonzero(blank.to_numpy(zero_copy_only=False))[:10].tolist()
        raise ValueError(f"prompts: empty prompt at position(s) {positions} of {_describe(source)}")
    too_long = pc.greater(pc.utf8_length(prompts.fill_null("")), MAX_PROMPT_CHARS)
    if pc.any(too_long).as_py():
        positions = np.flatnonzero(too_long.to_numpy(zero_copy_only=False))[:10].tolist()
        raise ValueError(
            f"prompts: prompt(s) at position(s) {positions} of {_describe(source)} are longer than "
            f"{MAX_PROMPT_CHARS:,} characters (a text encoder reads 77 tokens); shorten them"
        )
    nul = pc.match_substring(prompts.fill_null(""), "\x00")
    if pc.any(nul).as_py():
        positions = np.flatnonzero(nul.to_numpy(zero_copy_only=False))[:10].tolist()
        raise ValueError(
            f"prompts: prompt(s) at position(s) {positions} of {_describe(source)} hold a NUL byte"
        )
    return prompts


def _check_source_size(path: Path) -> None:
    """Refuse a prompt file too large to read whole, before reading it (for Parquet, by the size its
    metadata says it has uncompressed: a compressed file can be small and expand to gigabytes)."""
    size = path.stat().st_size
    if path.suffix.lower() == ".parquet":
        try:
            metadata = pa_parquet.ParquetFile(path).metadata
            size = max(
                size, sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
            )
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"prompts.path: {str(path)!r} is not a readable Parquet file ({exc})") from None
    if size > MAX_SOURCE_BYTES:
        raise ValueError(
            f"prompts.path: {str(path)!r} is {size / 2**20:,.0f} MiB, over the {MAX_SOURCE_BYTES // 2**20} MiB "
            f"a prompt source may hold (prompts of at most {MAX_PROMPT_CHARS:,} characters); split it, or "
            "select fewer prompts into a file of their own"
        )


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
    return [str(prompt) for prompt in prompts]


def _read_table(path: Path, column: str) -> pa.Array:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table = pa_csv.read_csv(path)
    elif suffix == ".parquet":
        table = pa_parquet.read_table(path, columns=None)
    else:
        table = pa_feather.read_table(path)
    if column not in table.column_names:
        raise ValueError(
            f"prompts.column: {column!r} is not a column of {path.name}; allowed {table.column_names}"
        )
    values = table.column(column).combine_chunks()
    return values if values.type == pa.string() else pc.cast(values, pa.string())


def _describe(source: PromptSource) -> str:
    return "prompts.items" if source.items is not None else repr(source.path)


# ---------------------------------------------------------------------------------------------------
# The generator's text conditioning


class GeneratorTextEncoder:
    """Prompts -> one conditioning vector each [N, dim], from the prior's own text encoder.

    - Stable Diffusion priors (tiny-sd, SD 2.1): the pooled output of the CLIP text model (1024-d for
      SD 2.1), as ScaleDreamer conditions Hyper-iNGP and the 3DConv-net.
    - The reference prior: its `SceneTextEncoder` token sequence, flattened (16 x 64 = 1024-d), which
      keeps word order ("a red cube on top of a blue sphere" differs from its mirror).

    The prior's `encode_text` is not used: the reference prior renders every prompt it is asked about,
    which is the guidance's business, not the cache's. Too-long prompts are truncated with a warning.
    """

    def __init__(self, prior: Any):
        self.prior = prior
        encoder = getattr(prior, "text_encoder", None)
        if encoder is None:
            raise TypeError(f"{type(prior).__name__} has no text_encoder to condition the generator on")
        self.encoder = encoder
        self.is_scene_encoder = hasattr(encoder, "word_vector")
        if self.is_scene_encoder:
            self.max_length = encoder.cfg.max_length
            self.dim = encoder.cfg.max_length * encoder.cfg.dim
        else:
            config = encoder.config
            self.max_length = min(prior.tokenizer.model_max_length, config.max_position_embeddings)
            self.dim = int(config.hidden_size)  # CLIPTextModel pools at the EOS token, unprojected
        self._id: str | None = None

    @property
    def encoder_id(self) -> str:
        """An id of the encoder's weights: two encoders with different weights never share a cache."""
        if self._id is None:
            digest = hashlib.sha256()
            if self.is_scene_encoder:
                digest.update(b"scene-text-encoder:v1:")
                digest.update(self.encoder.cfg.model_dump_json().encode())
            else:
                digest.update(type(self.encoder).__name__.encode())
                digest.update(self.encoder.config.to_json_string().encode())
                # Every tensor's name, shape and a strided sample of its values: a full pass over the
                # 340M weights of SD 2.1's encoder would cost seconds per worker for no extra safety.
                for name, tensor in sorted(self.encoder.state_dict().items()):
                    flat = tensor.detach().reshape(-1)
                    stride = max(1, flat.numel() // 4096)
                    sample = flat[::stride].float().cpu().numpy()
                    digest.update(f"{name}:{tuple(tensor.shape)}".encode())
                    digest.update(sample.tobytes())
            self._id = digest.hexdigest()[:16]
        return self._id

    def too_long(self, prompts: Sequence[str]) -> list[str]:
        """The prompts the encoder truncates."""
        if self.is_scene_encoder:
            from trainers.reference.text_encoder import tokenize

            return [p for p in prompts if len(tokenize(p)) > self.max_length]
        lengths = self.prior.tokenizer(list(prompts), truncation=False, return_length=True)["length"]
        return [p for p, n in zip(prompts, lengths, strict=True) if n > self.max_length]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[N, dim] float32 on the CPU."""
        prompts = list(prompts)
        if self.is_scene_encoder:
            return self.encoder.encode(prompts).reshape(len(prompts), -1).float()
        tokens = self.prior.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        device = next(self.encoder.parameters()).device
        output = self.encoder(tokens.input_ids.to(device))
        return output.pooler_output.float().cpu()


def warn_truncated(encoder: GeneratorTextEncoder, prompts: Sequence[str]) -> list[str]:
    """Log (and return) the prompts longer than the encoder takes: they are truncated, not refused."""
    long = encoder.too_long(prompts)
    if long:
        log.warning(
            "%d prompt(s) are longer than the text encoder's %d tokens and are truncated to them "
            "(the rest of the text does not condition the generator), e.g. %r",
            len(long),
            encoder.max_length,
            long[0][:120],
        )
    return long


# ---------------------------------------------------------------------------------------------------
# The embedding cache


class TextEmbeddingCache:
    """An Arrow IPC file of (prompt, embedding) rows, written by one encoder (its id in the metadata).

    `get(prompts)` returns their embeddings [N, dim], computing (in batches, with a progress bar) and
    appending those not yet cached. The file is replaced atomically, so trials of a sweep that share
    it never read half a file; two writers racing only recompute. Reads are memory-mapped.
    """

    def __init__(self, path: str | Path, encoder: GeneratorTextEncoder, batch_size: int = 256):
        self.path = Path(path).expanduser()
        self.encoder = encoder
        self.batch_size = batch_size
        self.table: pa.Table | None = None
        self.messages: list[str] = []  # what happened to the file (rebuilt, extended), for the run's log

    def _read(self) -> pa.Table | None:
        if not self.path.exists():
            return None
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(self.path), "r"))
            table = reader.read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            self._say(f"text-embedding cache {self.path} is unreadable ({exc}): rebuilding it")
            return None
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("encoder_id") != self.encoder.encoder_id or int(meta.get("dim", -1)) != self.encoder.dim:
            self._say(
                f"text-embedding cache {self.path} was built by encoder {meta.get('encoder_id')!r} "
                f"(dim {meta.get('dim')}), this run's prior has {self.encoder.encoder_id!r} "
                f"(dim {self.encoder.dim}): rebuilding it"
            )
            return None
        return table

    def _say(self, message: str) -> None:
        self.messages.append(message)
        log.warning(message)

    def get(self, prompts: Sequence[str], progress: bool = True) -> np.ndarray:
        prompts_array = pa.array(list(prompts), pa.string())
        if self.table is None:
            self.table = self._read()
        missing = self._missing(prompts_array)
        if len(missing):
            computed = self._compute(missing, progress)
            new = self._as_table(missing, computed)
            self.table = new if self.table is None else pa.concat_tables([self.table, new])
            self._write(self.table)
            self.table = self._read()  # back to the memory-mapped copy
        return self.lookup(prompts_array)

    def _missing(self, prompts: pa.Array) -> list[str]:
        unique = pc.unique(prompts)
        if self.table is None:
            return unique.to_pylist()
        present = pc.is_in(unique, value_set=self.table.column("prompt").combine_chunks())
        return unique.filter(pc.invert(present)).to_pylist()

    def lookup(self, prompts: pa.Array | Sequence[str]) -> np.ndarray:
        """Embeddings [N, dim] float32 of cached prompts, in the order asked."""
        assert self.table is not None
        if not isinstance(prompts, pa.Array):
            prompts = pa.array(list(prompts), pa.string())
        rows = pc.index_in(prompts, value_set=self.table.column("prompt").combine_chunks())
        if rows.null_count:
            raise KeyError(f"{rows.null_count} prompt(s) are not in the text-embedding cache {self.path}")
        matrix = self.matrix()
        return matrix[rows.to_numpy()]

    def matrix(self) -> np.ndarray:
        """All cached embeddings [rows, dim], a zero-copy view of the memory-mapped file."""
        column = self.table.column("embedding")
        chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        return chunk.values.to_numpy(zero_copy_only=False).reshape(len(chunk), self.encoder.dim)

    def _compute(self, prompts: list[str], progress: bool) -> np.ndarray:
        warn_truncated(self.encoder, prompts)
        out = np.empty((len(prompts), self.encoder.dim), dtype=np.float32)
        started = time.perf_counter()
        with tqdm(
            total=len(prompts), desc="text embeddings", disable=not progress, dynamic_ncols=True
        ) as bar:
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start : start + self.batch_size]
                out[start : start + len(batch)] = self.encoder.encode(batch).numpy()
                bar.update(len(batch))
        self.messages.append(
            f"text-embedding cache {self.path}: encoded {len(prompts)} prompt(s) in "
            f"{time.perf_counter() - started:.1f} s"
        )
        return out

    def _as_table(self, prompts: list[str], embeddings: np.ndarray) -> pa.Table:
        values = pa.array(embeddings.reshape(-1), pa.float32())
        column = pa.FixedSizeListArray.from_arrays(values, self.encoder.dim)
        return pa.table({"prompt": pa.array(prompts, pa.string()), "embedding": column})

    def _write(self, table: pa.Table) -> None:
        schema = table.schema.with_metadata(
            {"encoder_id": self.encoder.encoder_id, "dim": str(self.encoder.dim)}
        )
        table = table.replace_schema_metadata(schema.metadata).combine_chunks()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, self.path)
