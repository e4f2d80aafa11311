"""Loader regressions: a row missing a key must not make the key vanish for every row; a broken
JSON line, a row that is no object and a value of another type than its column are named by
file, line and key; one file or one saved Dataset is never also the test split; folders any
other way `datasets.load_dataset` reads them load."""

from __future__ import annotations

import json
import os

import datasets
import pytest

from zephyr_jax.data import (
    SAMPLE_DATA,
    DatasetLoadError,
    load_mixture,
    load_preference_dataset,
    mix_datasets,
)


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


def _sample_rows(n: int) -> list[dict]:
    with open(os.path.join(SAMPLE_DATA, "train.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f][:n]


@pytest.mark.parametrize("case", ["int_content", "chosen_is_text", "unused_column", "row_is_a_list"])
def test_a_row_arrow_cannot_read_is_named_by_file_line_and_key(tmp_path, case):
    rows = _sample_rows(30)
    bad = rows[20]
    if case == "int_content":
        bad["chosen"][-1]["content"] = 5
        want = "(line 21): key 'chosen' = "
    elif case == "chosen_is_text":
        bad["chosen"] = "just text"
        want = "(line 21): key 'chosen' = \"just text\""
    elif case == "unused_column":  # a column nothing reads breaks the table all the same
        bad["rating_chosen"] = "high"
        want = "(line 21): key 'rating_chosen' = \"high\""
    else:
        rows[20] = [bad]
        want = "(line 21): a row must be a JSON object, found a list"
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetLoadError) as e:
        load_preference_dataset(str(path))
    assert str(e.value).startswith(f"{path} {want}"), str(e.value)


def test_one_file_or_saved_dataset_is_only_a_train_split(tmp_path):
    """Asked for "test", a single file or a single saved Dataset used to return its own rows:
    the run then evaluated on the pairs it trained on. They are the train split only (what
    `datasets.load_dataset` makes of one), and a test split is an error naming the way out."""
    rows = _sample_rows(10)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for spec in (path, tmp_path / "saved"):
        assert len(load_preference_dataset(str(spec), "train")) == 10
        assert len(load_preference_dataset(str(spec), "train_prefs")) == 10
        with pytest.raises(DatasetLoadError, match="read as the train split; split 'test'"):
            load_preference_dataset(str(spec), "test")
        with pytest.raises(DatasetLoadError, match="split 'test_prefs'"):
            mix_datasets({str(spec): 1.0}, ["train", "test_prefs"])


def test_a_hub_snapshot_folder_loads_as_load_dataset_reads_it(tmp_path):
    """A dataset downloaded with `hf download --repo-type dataset --local-dir` keeps the Hub's
    layout (data/<split>-00000-of-00001.parquet), which `datasets.load_dataset(folder)` reads."""
    rows = _sample_rows(12)
    (tmp_path / "snap" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows[:8]).to_parquet(
        str(tmp_path / "snap" / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(rows[8:]).to_parquet(
        str(tmp_path / "snap" / "data" / "test-00000-of-00001.parquet"))
    spec = str(tmp_path / "snap")
    assert list(load_preference_dataset(spec, "train")) == rows[:8]
    assert list(load_mixture({spec: 1.0}, "test", shuffle=False)) == [
        {k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows[8:]]
    with pytest.raises(DatasetLoadError, match="load_dataset.*failed"):
        load_preference_dataset(spec, "validation")
