"""Where the shipped data assets live inside the installed package."""

from __future__ import annotations

import pathlib

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"
TOKENIZER_DIR = str(ASSETS / "tokenizer")
"""The Mixtral v1 tokenizer built by `scripts/build_tokenizer.py` (tokenizer.json, no sentencepiece)."""
SAMPLE_DATA = str(ASSETS / "sample")
"""A small preference set in the capybara schema (`train.jsonl`, `test.jsonl`), made by
`scripts/make_sample_data.py`; pass it to `load_preference_dataset` as a spec."""
