"""A sweep's prompts: the `prompts:` section of a spec -> one Arrow table (`index`, `prompt`).

The reading itself (library JSON, text, CSV, Parquet, Arrow; first-N / sample / indices) lives in
`trainers.amortized.prompt_library`, which the amortized trainer uses for its own prompt libraries;
this module only names it for the orchestrator. A sweep keeps duplicate prompts (a fan-out trains
each row), the amortized trainer drops them.
"""

from __future__ import annotations

from trainers.amortized.prompt_library import SPLITS, load_prompt_table, selected_indices

load_prompts = load_prompt_table

__all__ = ["SPLITS", "load_prompts", "selected_indices"]
