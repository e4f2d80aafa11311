"""Loading preference data from files, folders and the Hub, and the handbook's dataset mixer."""

from __future__ import annotations

import json
import os

import datasets
import numpy as np
import pytest

from zephyr_jax.data import (
    SAMPLE_DATA,
    DataError,
    DatasetLoadError,
    load_mixture,
    load_preference_dataset,
    mix_datasets,
)

CAPYBARA_COLUMNS = [
    "source", "conversation", "original_response", "generation_prompt",
    "raw_generation_responses", "new_generations", "prompt", "chosen", "rejected",
    "rating_chosen", "rating_rejected", "chosen_model", "rejected_model",
]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def train_rows():
    return read_jsonl(os.path.join(SAMPLE_DATA, "train.jsonl"))


def test_sample_folder(train_rows):
    train = load_preference_dataset(SAMPLE_DATA, "train")
    test = load_preference_dataset(SAMPLE_DATA, "test")
    assert (len(train), len(test)) == (400, 100)
    assert train.column_names == test.column_names == CAPYBARA_COLUMNS
    assert train[0] == train_rows[0]
    assert list(load_preference_dataset("sample", "test")) == list(test)  # the config alias
    with pytest.raises(DatasetLoadError, match="validation"):
        load_preference_dataset(SAMPLE_DATA, "validation")


def test_files_and_saved_datasets(tmp_path, train_rows):
    rows = train_rows[:20]
    ds = datasets.Dataset.from_list(rows)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(str(tmp_path / "dict"))
    ds.save_to_disk(str(tmp_path / "per_split" / "train"))
    for spec, split, n in [("rows.jsonl", "train", 20), ("rows.json", "train", 20),
                           ("rows.parquet", "train", 20), ("saved", "train", 20),
                           ("dict", "test", 5), ("dict", "train", 20), ("per_split", "train", 20)]:
        loaded = load_preference_dataset(str(tmp_path / spec), split)
        assert len(loaded) == n, spec
        assert loaded[n - 1] == rows[n - 1], spec
    with pytest.raises(DatasetLoadError, match="not 'validation'"):
        load_preference_dataset(str(tmp_path / "dict"), "validation")


def test_missing_paths_do_not_reach_the_hub(monkeypatch, tmp_path):
    def no_hub(*args, **kwargs):
        raise AssertionError("asked the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for spec in (str(tmp_path / "nope.jsonl"), str(tmp_path / "nope"), "./nope", "a/b/c"):
        with pytest.raises(DatasetLoadError, match="no such file"):
            load_preference_dataset(spec, "train")


def test_hub_path_and_offline_error(monkeypatch):
    calls = []

    def offline(name, **kwargs):
        calls.append((name, kwargs))
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetLoadError) as e:
        load_preference_dataset("argilla/distilabel-capybara-dpo-7k-binarized", "train")
    assert calls == [("argilla/distilabel-capybara-dpo-7k-binarized", {"split": "train"})]
    assert "Hugging Face Hub" in str(e.value) and "SAMPLE_DATA" in str(e.value)
    assert isinstance(e.value.__cause__, ConnectionError)

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, split: datasets.Dataset.from_list([{"x": name, "s": split}]))
    assert load_preference_dataset("org/name", "test")[0] == {"x": "org/name", "s": "test"}


def test_splits_sort_by_name_as_the_handbook_does():
    from zephyr_jax.data import splits_by_kind

    assert splits_by_kind(["test_prefs", "train_prefs", "train_gen", "test"]) == {
        "train": ["train_prefs", "train_gen"], "test": ["test_prefs", "test"]}
    assert splits_by_kind(["train"]) == {"train": ["train"]}


def test_mixer_matches_handbook_order(train_rows):
    """handbook mix_datasets: first int(frac * n) train rows, all test rows, each shuffled with
    seed 42 (datasets' shuffle = numpy default_rng(42).permutation)."""
    mixed = mix_datasets({SAMPLE_DATA: 0.5}, splits=["train", "test"])
    assert set(mixed) == {"train", "test"}
    train, test = mixed["train"], mixed["test"]
    assert train.column_names == ["prompt", "chosen", "rejected"]
    assert (len(train), len(test)) == (200, 100)
    perm = np.random.default_rng(42).permutation(200)
    expected = [{k: train_rows[j][k] for k in ("prompt", "chosen", "rejected")} for j in perm]
    assert list(train) == expected

    only_train = mix_datasets({SAMPLE_DATA: 1.0})  # the Zephyr recipe: dataset_splits [train]
    assert set(only_train) == {"train"} and len(only_train["train"]) == 400
    unshuffled = mix_datasets({SAMPLE_DATA: 0.1}, shuffle=False)["train"]
    assert [r["prompt"] for r in unshuffled] == [r["prompt"] for r in train_rows[:40]]
    # One split at a time (what the trainer calls): the same rows in the same order.
    assert list(load_mixture({SAMPLE_DATA: 0.5}, "train")) == expected
    assert list(load_mixture({SAMPLE_DATA: 0.5}, "test")) == list(test)


def test_mixer_concatenates_in_order(tmp_path, train_rows):
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows[::-1]))
    mixed = mix_datasets({SAMPLE_DATA: 0.25, str(other): 0.05}, shuffle=False)["train"]
    assert len(mixed) == 100 + 20
    assert mixed[100]["prompt"] == train_rows[-1]["prompt"]
    with pytest.raises(DataError, match="fractions"):
        mix_datasets({SAMPLE_DATA: 1.5})
    with pytest.raises(DataError, match="neither"):
        load_mixture({SAMPLE_DATA: 1.0}, "dev")
    with pytest.raises(DataError, match="empty"):
        load_mixture({}, "train")
    assert issubclass(DatasetLoadError, DataError)
