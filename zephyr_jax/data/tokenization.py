"""Texts -> token ids, labels and masks, exactly as the handbook-era TRL `ORPOTrainer.tokenize_row`.

The steps (TRL 0.8.x, which the Zephyr 141B run used; TRL 1.x's
`trl.experimental.orpo.ORPOTrainer.tokenize_row` still does steps 1-3 the same way):

1. the prompt is tokenized without special tokens; prompt + answer is tokenized as one text and
   split at the prompt's length, one token earlier when the tokenizer merged the prompt's last
   token into the answer (`build_tokenized_answer`); the bare prompt keeps the shorter of the
   chosen/rejected prompt lengths;
2. BOS is put in front of each prompt and EOS after each answer unless already there;
3. labels = input_ids with the prompt positions set to -100; attention masks are all ones;
4. truncation, with `longer` = the longer answer's length:
   if prompt + longer > max_length, every prompt keeps its last `max_prompt_length` tokens
   (truncation_mode "keep_end"); if still prompt + longer > max_length, both answers keep their
   first `max_length - max_prompt_length` tokens (an answer cut this way loses its EOS).
   TRL 1.x dropped `max_prompt_length`: it only cuts each answer to `max_length - len(prompt)`.

Before TRL, the handbook's `run_orpo.py` drops rows whose prompt, tokenized with the default
special tokens (so BOS included), is not shorter than `max_prompt_length`. After that filter a
prompt never needs cutting, so in practice only step 4's answer cut applies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zephyr_jax.data.processing import PreferenceText
from zephyr_jax.data.report import DataReport

LABEL_PAD = -100
"""TRL's `label_pad_token_id`: label positions that carry no loss."""

EXAMPLE_KEYS = (
    "prompt_input_ids", "prompt_attention_mask",
    "chosen_input_ids", "chosen_attention_mask", "chosen_labels",
    "rejected_input_ids", "rejected_attention_mask", "rejected_labels",
)
"""The keys of one tokenized example (each a 1-D int32 numpy array, unpadded)."""

# Reasons a valid row is dropped (the keys of `DataReport.dropped`).
PROMPT_TOO_LONG = "prompt_too_long"
TOKENIZER_MISMATCH = "tokenizer_mismatch"
# Truncations counted in `DataReport.truncated`.
PROMPT_TRUNCATED = "prompt_truncated"
ANSWER_TRUNCATED = "answer_truncated"


class DroppedRow(ValueError):
    """A row TRL would refuse (it raises); `reason` is a key of `DataReport.dropped`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _split_answer(prompt_ids: list[int], full_ids: list[int]) -> tuple[list[int], list[int]]:
    """TRL's `build_tokenized_answer` on ids: (prompt part, answer part) of enc(prompt + answer)."""
    if len(full_ids) < len(prompt_ids):
        raise DroppedRow(TOKENIZER_MISMATCH)
    start = len(prompt_ids)
    if prompt_ids != full_ids[:start]:
        start -= 1  # the prompt's last token merged with the answer's first
    return full_ids[:start], full_ids[start:]


def tokenize_ids(
    prompt_ids: Sequence[int],
    chosen_full_ids: Sequence[int],
    rejected_full_ids: Sequence[int],
    *,
    bos_token_id: int,
    eos_token_id: int,
    max_length: int,
    max_prompt_length: int,
) -> tuple[dict[str, np.ndarray], set[str]]:
    """`tokenize_row` from already tokenized texts (no special tokens): enc(prompt),
    enc(prompt + chosen), enc(prompt + rejected). Returns the example and the truncations made."""
    prompt_ids = list(prompt_ids)
    c_prompt, c_answer = _split_answer(prompt_ids, list(chosen_full_ids))
    r_prompt, r_answer = _split_answer(prompt_ids, list(rejected_full_ids))
    prompt = prompt_ids[: min(len(c_prompt), len(r_prompt))]
    num_diff = sum(a != b for a, b in zip(c_prompt, r_prompt, strict=False))
    if num_diff > 1 or abs(len(c_prompt) - len(r_prompt)) > 1:
        raise DroppedRow(TOKENIZER_MISMATCH)  # TRL: "might only differ on the last token"

    def with_bos(ids):
        return ids if ids and ids[0] == bos_token_id else [bos_token_id, *ids]

    def with_eos(ids):
        return ids if ids and ids[-1] == eos_token_id else [*ids, eos_token_id]

    prompt, c_prompt, r_prompt = with_bos(prompt), with_bos(c_prompt), with_bos(r_prompt)
    c_answer, r_answer = with_eos(c_answer), with_eos(r_answer)

    truncated = set()
    longer = max(len(c_answer), len(r_answer))

    def cut_prompt(ids):  # truncation_mode="keep_end"
        if len(ids) + longer <= max_length:
            return ids
        if len(ids) > max_prompt_length:
            truncated.add(PROMPT_TRUNCATED)
        return ids[-max_prompt_length:]

    def cut_answer(prompt_part, ids):
        if len(prompt_part) + longer <= max_length:
            return ids
        if len(ids) > max_length - max_prompt_length:
            truncated.add(ANSWER_TRUNCATED)
        return ids[: max_length - max_prompt_length]

    prompt, c_prompt, r_prompt = cut_prompt(prompt), cut_prompt(c_prompt), cut_prompt(r_prompt)
    c_answer, r_answer = cut_answer(c_prompt, c_answer), cut_answer(r_prompt, r_answer)

    def arr(ids):
        return np.asarray(ids, dtype=np.int32)

    example = {"prompt_input_ids": arr(prompt), "prompt_attention_mask": np.ones(len(prompt), np.int32)}
    for side, p, a in (("chosen", c_prompt, c_answer), ("rejected", r_prompt, r_answer)):
        example[f"{side}_input_ids"] = arr(p + a)
        example[f"{side}_attention_mask"] = np.ones(len(p) + len(a), np.int32)
        example[f"{side}_labels"] = arr([LABEL_PAD] * len(p) + a)
    return example, truncated


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got "
                         f"max_prompt_length={max_prompt_length}, max_length={max_length}")


def tokenize_row(
    text: PreferenceText, tokenizer, *, max_length: int, max_prompt_length: int
) -> dict[str, np.ndarray]:
    """One pair -> one example (TRL's `tokenize_row`, handbook era). No prompt-length filter:
    `tokenize_texts` applies that. Raises `DroppedRow` where TRL would raise."""
    _check_lengths(max_length, max_prompt_length)

    def enc(s):
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    example, _ = tokenize_ids(
        enc(text.prompt), enc(text.prompt + text.chosen), enc(text.prompt + text.rejected),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        max_length=max_length, max_prompt_length=max_prompt_length)
    return example


def tokenize_texts(
    texts: Sequence[PreferenceText],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    report: DataReport | None = None,
) -> tuple[list[dict[str, np.ndarray]], DataReport]:
    """Pairs -> examples: the handbook's prompt-length filter, then TRL's `tokenize_row`.

    Rows whose prompt (tokenized with BOS, as the handbook measured it) has
    `>= max_prompt_length` tokens are dropped and counted as `prompt_too_long`.
    `report` (a fresh one by default) gets the drop and truncation counts and `kept`.
    """
    _check_lengths(max_length, max_prompt_length)
    if report is None:
        report = DataReport(rows=len(texts))
    if not texts:  # the tokenizer's batch call fails on an empty list
        report.kept = 0
        return [], report
    prompts = [t.prompt for t in texts]
    # Batched calls: the fast tokenizer encodes a list in parallel, the same ids as one by one.
    measured = tokenizer(prompts)["input_ids"]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    chosen_ids = tokenizer([t.prompt + t.chosen for t in texts], add_special_tokens=False)["input_ids"]
    rejected_ids = tokenizer([t.prompt + t.rejected for t in texts], add_special_tokens=False)["input_ids"]

    examples = []
    for i in range(len(texts)):
        if len(measured[i]) >= max_prompt_length:
            report.dropped[PROMPT_TOO_LONG] += 1
            continue
        try:
            example, truncated = tokenize_ids(
                prompt_ids[i], chosen_ids[i], rejected_ids[i],
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                max_length=max_length, max_prompt_length=max_prompt_length)
        except DroppedRow as e:
            report.dropped[e.reason] += 1
            continue
        report.truncated.update(truncated)
        examples.append(example)
    report.kept = len(examples)
    return examples, report
