"""The shipped sample set: capybara schema, reproducible, short, and carrying a learnable preference."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

from zephyr_jax.data import SAMPLE_DATA, load_tokenizer, tokenize_dataset

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "make_sample_data.py"
COLUMNS = [
    "source", "conversation", "original_response", "generation_prompt",
    "raw_generation_responses", "new_generations", "prompt", "chosen", "rejected",
    "rating_chosen", "rating_rejected", "chosen_model", "rejected_model",
]


def read(split):
    with open(os.path.join(SAMPLE_DATA, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def splits():
    return {"train": read("train"), "test": read("test")}


def is_str_list(v):
    return isinstance(v, list) and v and all(isinstance(x, str) for x in v)


def test_schema(splits):
    assert (len(splits["train"]), len(splits["test"])) == (400, 100)
    for row in splits["train"] + splits["test"]:
        assert list(row) == COLUMNS
        for key in ("source", "original_response", "prompt", "chosen_model", "rejected_model"):
            assert isinstance(row[key], str) and row[key]
        for key in ("generation_prompt", "raw_generation_responses", "new_generations"):
            assert is_str_list(row[key])
        assert all(list(turn) == ["input", "output"] for turn in row["conversation"])
        for side in ("chosen", "rejected"):
            assert all(list(m) == ["content", "role"] for m in row[side])
            assert row[side][-1]["role"] == "assistant"
        assert row["chosen"][:-1] == row["rejected"][:-1]
        assert row["chosen"][-1]["content"] != row["rejected"][-1]["content"]
        assert row["chosen"][-2] == {"content": row["prompt"], "role": "user"}
        assert row["conversation"][-1] == {"input": row["prompt"],
                                           "output": row["original_response"]}
        assert row["original_response"] == row["chosen"][-1]["content"]
        users = [m["content"] for m in row["chosen"] if m["role"] == "user"]
        assert users == [t["input"] for t in row["conversation"]]
        assert 1 <= row["rating_rejected"] < row["rating_chosen"] <= 5
        assert all(isinstance(row[k], int) for k in ("rating_chosen", "rating_rejected"))


def test_variety(splits):
    rows = splits["train"]
    multi_turn = sum(sum(m["role"] == "user" for m in r["chosen"]) > 1 for r in rows)
    with_system = sum(r["chosen"][0]["role"] == "system" for r in rows)
    multi_line = sum("\n" in r["chosen"][-1]["content"] for r in rows)
    assert multi_turn > 60 and with_system > 40 and multi_line > 10


def test_reproducible_and_held_out(splits):
    spec = importlib.util.spec_from_file_location("make_sample_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    train, test = module.make_splits(seed=0)
    assert {"train": train, "test": test} == splits
    key = lambda r: json.dumps([r["chosen"], r["rejected"]])
    assert not {key(r) for r in test} & {key(r) for r in train}


def test_short_and_learnable(splits):
    """All pairs fit 128 tokens, and even a unigram model of the chosen answers (what the NLL
    term alone learns first) prefers chosen over rejected on most held-out pairs."""
    tok = load_tokenizer()
    examples = {s: tokenize_dataset(splits[s], tok, max_length=128, max_prompt_length=96)[0]
                for s in splits}
    assert [len(examples[s]) for s in ("train", "test")] == [400, 100]  # nothing dropped
    lengths = [len(e[f"{side}_input_ids"]) for e in examples["train"] + examples["test"]
               for side in ("chosen", "rejected")]
    assert max(lengths) < 112 and np.mean(lengths) < 70

    counts = collections.Counter()
    for e in examples["train"]:
        counts.update(e["chosen_labels"][e["chosen_labels"] != -100].tolist())
    total, vocab = sum(counts.values()), len(tok)

    def mean_logp(labels):
        return np.mean([np.log((counts[t] + 0.1) / (total + 0.1 * vocab))
                        for t in labels[labels != -100].tolist()])

    wins = [mean_logp(e["chosen_labels"]) > mean_logp(e["rejected_labels"]) for e in examples["test"]]
    assert np.mean(wins) > 0.7
