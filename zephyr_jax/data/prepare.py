"""Rows -> tokenized examples in one call: validate and render, filter, tokenize, report."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from zephyr_jax.data.processing import process_rows
from zephyr_jax.data.report import DataReport
from zephyr_jax.data.tokenization import tokenize_texts


def tokenize_dataset(
    rows: Iterable[Any],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    max_bad_fraction: float = 0.05,
    auto_insert_empty_system_msg: bool = True,
    source: str = "data",
) -> tuple[list[dict[str, np.ndarray]], DataReport]:
    """Raw rows -> ORPO examples, as handbook `run_orpo.py` + TRL's `ORPOTrainer` prepared them.

    `process_rows` (validate, prompt/chosen/rejected split, chat template), then `tokenize_texts`
    (drop prompts of `>= max_prompt_length` tokens, TRL `tokenize_row` with handbook-era
    truncation). Returns the examples (dicts of 1-D int32 arrays, keys `EXAMPLE_KEYS`) and one
    `DataReport`; `report.summary()` is a printable line.

    Raises `DataQualityError` when more than `max_bad_fraction` of the rows are malformed.
    """
    texts, report = process_rows(
        rows, tokenizer, auto_insert_empty_system_msg=auto_insert_empty_system_msg,
        max_bad_fraction=max_bad_fraction, source=source)
    return tokenize_texts(texts, tokenizer, max_length=max_length,
                          max_prompt_length=max_prompt_length, report=report)
