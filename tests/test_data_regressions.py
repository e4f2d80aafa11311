"""Loader regressions: a row missing a key must not make the key vanish for every row, and a
broken JSON line is named by file and line."""

from __future__ import annotations

import json

import pytest

from zephyr_jax.data import DatasetLoadError, load_preference_dataset


def test_missing_key_in_first_rows_keeps_the_column(tmp_path):
    rows = [{"prompt": "p", "rejected": [{"role": "user", "content": "a"}]},
            {"prompt": "q", "chosen": [{"role": "user", "content": "b"}],
             "rejected": [{"role": "user", "content": "c"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_preference_dataset(str(path))
    assert ds[0]["chosen"] is None
    assert ds[1]["chosen"] == [{"role": "user", "content": "b"}]


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p"}\n{"prompt": oops}\n')
    with pytest.raises(DatasetLoadError, match=r"d\.jsonl:2: not valid JSON"):
        load_preference_dataset(str(path))
