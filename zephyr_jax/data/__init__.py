"""Preference data for ORPO, as alignment-handbook + TRL prepared it for Zephyr 141B.

    tokenizer = load_tokenizer()                        # shipped Mixtral v1 + Zephyr template
    rows = load_mixture({SAMPLE_DATA: 1.0}, "train")   # or load_preference_dataset(spec, split)
    examples, report = tokenize_dataset(rows, tokenizer, max_length=2048, max_prompt_length=1792)
    print(report.summary())
    loader = PreferenceLoader(examples, batch_size=1, max_length=2048,
                              pad_token_id=tokenizer.pad_token_id, seed=42, num_epochs=3,
                              shard_index=jax.process_index(), shard_count=jax.process_count())
    batch = next(loader)   # {"chosen_input_ids": int32 [1, 2048], ...}; loader.get_state() to resume

Modules, one job each: `tokenizer` (load + chat template), `loading` (files, folders, Hub, the
handbook's mixer), `processing` (validate rows, handbook prompt/chosen/rejected split, render),
`tokenization` (TRL's `tokenize_row` with handbook-era truncation), `prepare` (rows -> examples),
`batching` (static-shape padding), `pipeline` (grain loader: shuffle, epochs, shards, resumable
state), `report` (counts and errors), `paths` (shipped assets).
"""

from zephyr_jax.data.batching import BATCH_KEYS, collate
from zephyr_jax.data.loading import (
    DatasetLoadError,
    load_mixture,
    load_preference_dataset,
    mix_datasets,
    splits_by_kind,
)
from zephyr_jax.data.paths import SAMPLE_DATA, TOKENIZER_DIR
from zephyr_jax.data.pipeline import PreferenceLoader
from zephyr_jax.data.prepare import tokenize_dataset
from zephyr_jax.data.processing import InvalidRow, PreferenceText, process_rows, render_row
from zephyr_jax.data.report import DataError, DataQualityError, DataReport
from zephyr_jax.data.tokenization import EXAMPLE_KEYS, LABEL_PAD, tokenize_row, tokenize_texts
from zephyr_jax.data.tokenizer import ZEPHYR_CHAT_TEMPLATE, load_tokenizer

__all__ = [
    "BATCH_KEYS",
    "EXAMPLE_KEYS",
    "LABEL_PAD",
    "SAMPLE_DATA",
    "TOKENIZER_DIR",
    "ZEPHYR_CHAT_TEMPLATE",
    "DataError",
    "DataQualityError",
    "DataReport",
    "DatasetLoadError",
    "InvalidRow",
    "PreferenceLoader",
    "PreferenceText",
    "collate",
    "load_mixture",
    "load_preference_dataset",
    "load_tokenizer",
    "mix_datasets",
    "process_rows",
    "render_row",
    "splits_by_kind",
    "tokenize_dataset",
    "tokenize_row",
    "tokenize_texts",
]
