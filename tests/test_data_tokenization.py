"""Tokenized examples equal TRL's ORPO `tokenize_row`, with the handbook-era truncation and filter.

TRL 1.x (installed) still has `tokenize_row`/`build_tokenized_answer`; its steps before truncation
are the handbook-era ones, so it is the oracle for untruncated rows. Its truncation changed (no
`max_prompt_length`), so the handbook-era truncation is re-applied here, written independently
from its description, on top of TRL's untruncated output.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from zephyr_jax.data import (
    SAMPLE_DATA,
    PreferenceText,
    load_preference_dataset,
    load_tokenizer,
    process_rows,
    tokenize_dataset,
    tokenize_row,
    tokenize_texts,
)
from zephyr_jax.data.tokenization import EXAMPLE_KEYS, tokenize_ids

ORPOTrainer = pytest.importorskip("trl.experimental.orpo").ORPOTrainer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def sample_texts(tok):
    rows = list(load_preference_dataset(SAMPLE_DATA, "test"))
    texts, _ = process_rows(rows, tok)
    return texts


# Plain-text pairs where the prompt's last token merges with the answer ("ma" + "t" -> "mat"),
# TRL's `build_tokenized_answer` special case, and answers already ending in EOS.
MERGE_TEXTS = [
    PreferenceText("The cat sat on the ma", "t.", "ts and rugs."),
    PreferenceText("Say hello in French: bon", "jour", "soir</s>"),
    PreferenceText("<|user|>\nHi</s>\n", "<|assistant|>\nHello</s>", "<|assistant|>\nNo"),
]


def trl_tokenize(tok, text: PreferenceText, max_length: int = 10**6) -> dict[str, list[int]]:
    """TRL's ORPOTrainer.tokenize_row, driven without building a trainer."""
    ns = SimpleNamespace(processing_class=tok, is_encoder_decoder=False, max_length=max_length,
                         padding_value=tok.pad_token_id)
    ns.build_tokenized_answer = lambda p, a: ORPOTrainer.build_tokenized_answer(ns, p, a)
    feature = {"prompt": text.prompt, "chosen": text.chosen, "rejected": text.rejected}
    return ORPOTrainer.tokenize_row(ns, feature)


def handbook_truncate(full: dict, max_length: int, max_prompt_length: int) -> dict:
    """TRL 0.8 (handbook era) truncation of an untruncated tokenize_row output."""
    parts = {}
    for side in ("chosen", "rejected"):
        ids, labels = full[f"{side}_input_ids"], full[f"{side}_labels"]
        n_prompt = next(i for i, v in enumerate(labels) if v != -100)
        parts[side] = [list(ids[:n_prompt]), list(ids[n_prompt:])]
    longer = max(len(answer) for _, answer in parts.values())
    prompt = list(full["prompt_input_ids"])
    if len(prompt) + longer > max_length:
        prompt = prompt[len(prompt) - min(len(prompt), max_prompt_length):]
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side, (p, a) in parts.items():
        if len(p) + longer > max_length:
            p = p[len(p) - min(len(p), max_prompt_length):]
        if len(p) + longer > max_length:
            a = a[: max_length - max_prompt_length]
        out[f"{side}_input_ids"] = p + a
        out[f"{side}_attention_mask"] = [1] * (len(p) + len(a))
        out[f"{side}_labels"] = [-100] * len(p) + a
    return out


def as_lists(example: dict) -> dict:
    assert set(example) == set(EXAMPLE_KEYS)
    assert all(v.dtype == np.int32 and v.ndim == 1 for v in example.values())
    return {k: v.tolist() for k, v in example.items()}


def test_untruncated_rows_equal_trl(tok, sample_texts):
    for text in sample_texts + MERGE_TEXTS:
        ours = tokenize_row(text, tok, max_length=4096, max_prompt_length=2048)
        assert as_lists(ours) == {k: list(v) for k, v in trl_tokenize(tok, text).items()}, text


def test_merge_case_is_exercised(tok):
    text = MERGE_TEXTS[0]
    prompt_ids = tok(text.prompt, add_special_tokens=False)["input_ids"]
    full_ids = tok(text.prompt + text.chosen, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] != prompt_ids  # the last prompt token merged
    ours = as_lists(tokenize_row(text, tok, max_length=64, max_prompt_length=32))
    assert len(ours["prompt_input_ids"]) == len(prompt_ids)  # BOS + prompt minus merged token


def test_truncated_rows_equal_handbook_trl(tok, sample_texts):
    max_length, max_prompt_length = 48, 32
    n_prompt_cut = n_answer_cut = 0
    for text in sample_texts + MERGE_TEXTS:
        full = trl_tokenize(tok, text)
        expected = handbook_truncate(full, max_length, max_prompt_length)
        ours = as_lists(tokenize_row(text, tok, max_length=max_length,
                                     max_prompt_length=max_prompt_length))
        assert ours == expected, text
        assert len(ours["chosen_input_ids"]) <= max_length
        n_prompt_cut += len(ours["chosen_input_ids"]) < len(full["chosen_input_ids"]) and \
            ours["chosen_input_ids"][0] != tok.bos_token_id
        n_answer_cut += ours["chosen_input_ids"][-1] != tok.eos_token_id
    assert n_prompt_cut > 10 and n_answer_cut > 10  # both truncation paths ran


def test_tokenize_texts_filters_long_prompts_like_the_handbook(tok, sample_texts):
    texts = sample_texts + MERGE_TEXTS
    # run_orpo.py: keep rows whose prompt, tokenized with default special tokens, is shorter.
    measured = [len(tok(t.prompt)["input_ids"]) for t in texts]
    max_prompt_length = sorted(measured)[len(measured) // 2]  # a length some prompts have exactly
    max_length = max_prompt_length + 24
    examples, report = tokenize_texts(texts, tok, max_length=max_length,
                                      max_prompt_length=max_prompt_length)
    kept = [t for t, n in zip(texts, measured, strict=True) if n < max_prompt_length]
    assert 0 < len(kept) < len(texts)
    assert report.dropped == {"prompt_too_long": len(texts) - len(kept)}
    assert report.kept == len(examples) == len(kept)
    for text, ex in zip(kept, examples, strict=True):
        assert as_lists(ex) == handbook_truncate(trl_tokenize(tok, text), max_length,
                                                 max_prompt_length)
    assert report.truncated["answer_truncated"] > 0
    assert "prompt_truncated" not in report.truncated  # the filter leaves no prompt to cut


def test_tokenize_dataset_from_rows(tok, sample_texts):
    rows = list(load_preference_dataset(SAMPLE_DATA, "test"))
    bad = {"chosen": [{"role": "user", "content": "Hi"}], "rejected": None}
    examples, report = tokenize_dataset([*rows, bad], tok, max_length=64, max_prompt_length=40,
                                        source="test split")
    expected, _ = tokenize_texts(sample_texts, tok, max_length=64, max_prompt_length=40)
    assert [as_lists(e) for e in examples] == [as_lists(e) for e in expected]
    assert (report.source, report.rows, report.kept) == ("test split", 101, len(expected))
    assert report.invalid == {"missing_key": 1} and report.num_dropped == 101 - 1 - len(expected)


def test_truncation_by_hand():
    """keep_end prompt truncation drops BOS; the answer cut drops EOS (handbook-era quirks)."""
    prompt = [10, 11, 12, 13, 14]
    kw = dict(bos_token_id=1, eos_token_id=2, max_prompt_length=4)
    ex, cuts = tokenize_ids(prompt, prompt + [20, 21, 22], prompt + [30], max_length=8, **kw)
    assert ex["chosen_input_ids"].tolist() == [11, 12, 13, 14, 20, 21, 22, 2]
    assert ex["chosen_labels"].tolist() == [-100] * 4 + [20, 21, 22, 2]
    assert ex["rejected_input_ids"].tolist() == [11, 12, 13, 14, 30, 2]
    assert ex["prompt_input_ids"].tolist() == [11, 12, 13, 14]
    assert cuts == {"prompt_truncated"}
    ex, cuts = tokenize_ids(prompt, prompt + [20, 21, 22], prompt + [30], max_length=7, **kw)
    assert ex["chosen_input_ids"].tolist() == [11, 12, 13, 14, 20, 21, 22]
    assert ex["rejected_input_ids"].tolist() == [11, 12, 13, 14, 30, 2]
    assert ex["rejected_labels"].tolist() == [-100] * 4 + [30, 2]
    assert cuts == {"prompt_truncated", "answer_truncated"}
    ex, cuts = tokenize_ids(prompt, prompt + [20], prompt + [30], max_length=16, **kw)
    assert ex["chosen_input_ids"].tolist() == [1, 10, 11, 12, 13, 14, 20, 2] and not cuts


def test_length_arguments_are_checked(tok, sample_texts):
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_texts(sample_texts[:2], tok, max_length=32, max_prompt_length=32)
