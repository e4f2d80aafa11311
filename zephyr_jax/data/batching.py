"""Examples -> fixed-shape numpy batches (static shapes: one compile per length bucket).

A batch is a dict of int32 arrays, each [batch, length]:
`chosen_input_ids`, `chosen_attention_mask`, `chosen_labels`,
`rejected_input_ids`, `rejected_attention_mask`, `rejected_labels`.
Chosen and rejected share one length (TRL pads both to one length to run them as one batch).
Padding is on the right: input ids = `pad_token_id`, attention 0, labels -100.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from zephyr_jax.data.tokenization import LABEL_PAD

BATCH_KEYS = (
    "chosen_input_ids", "chosen_attention_mask", "chosen_labels",
    "rejected_input_ids", "rejected_attention_mask", "rejected_labels",
)


def example_length(example: Mapping[str, np.ndarray]) -> int:
    """Tokens the example needs: the longer of its chosen and rejected sequences."""
    return max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))


def length_buckets(max_length: int, buckets: Sequence[int] | None) -> tuple[int, ...]:
    """Sorted padded lengths to choose from; always ends with `max_length`."""
    if not buckets:
        return (max_length,)
    out = sorted({int(b) for b in buckets if b < max_length} | {max_length})
    if out[0] <= 0:
        raise ValueError(f"length buckets must be positive, got {list(buckets)}")
    return tuple(out)


def bucket_length(longest: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `longest` tokens."""
    for b in buckets:
        if longest <= b:
            return b
    raise ValueError(f"an example has {longest} tokens, more than the largest bucket {buckets[-1]}")


def collate(
    examples: Sequence[Mapping[str, np.ndarray]], length: int, pad_token_id: int
) -> dict[str, np.ndarray]:
    """Pads `examples` on the right to `length` and stacks them into a batch."""
    pad = {"input_ids": pad_token_id, "attention_mask": 0, "labels": LABEL_PAD}
    batch = {k: np.full((len(examples), length), pad[k.split("_", 1)[1]], np.int32) for k in BATCH_KEYS}
    for i, ex in enumerate(examples):
        for k in BATCH_KEYS:
            v = ex[k]
            if len(v) > length:
                raise ValueError(f"{k} has {len(v)} tokens, more than the batch length {length}")
            batch[k][i, : len(v)] = v
    return batch
