"""The input pipeline: seeded, sharded, resumable batches of preference pairs, on grain.

Order: epoch e visits the examples in a grain global shuffle seeded `seed + e` (grain's
`MapDataset.shuffle(seed).repeat(num_epochs)`). Each epoch is cut into global batches of
`batch_size * shard_count` consecutive examples (with `drop_remainder`, the epoch's leftover
examples are skipped, so every step has the same shape). Process `shard_index` takes rows
`[shard_index * batch_size, (shard_index + 1) * batch_size)` of every global batch, so the
processes of a multi-host run see disjoint parts of the same global batch at every step.

With length buckets, a step's padded length is the smallest bucket that holds the longest pair
of its *global* batch, so all processes agree on the shape.

The state (`get_state`) is grain's iterator state plus a fingerprint of the settings; restoring
it into a loader built the same way resumes at exactly the next batch.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from zephyr_jax.data import batching

DEFAULT_PAD_ID = 2  # the shipped tokenizer's pad: eos, as the handbook set it


class PreferenceLoader:
    """Iterates dicts of numpy int32 arrays [batch_size, length] (see `zephyr_jax.data.batching`).

    Args:
      examples: tokenized examples (`tokenize_dataset`).
      batch_size: examples per batch on this process (global batch = batch_size * shard_count).
      max_length: the padded length (the largest bucket); None: the longest example's length,
        so the whole run has one shape.
      pad_token_id: input id at padded positions: the tokenizer's pad id (the default is the
        shipped tokenizer's, = eos). Padded positions are masked out of attention and loss, so
        the value only changes what the model reads there.
      seed: shuffle seed; epoch e uses `seed + e`.
      num_epochs: passes over the data; None repeats forever.
      shard_index, shard_count: this process and the number of processes (e.g.
        `jax.process_index()`, `jax.process_count()`).
      shuffle: False keeps the examples' order (evaluation).
      drop_remainder: drop each epoch's last partial global batch (static shapes). False keeps
        it as a smaller batch; only allowed with one shard.
      length_buckets: optional padded lengths below `max_length` to bound padding; each one is
        one more compiled shape.
      num_threads, prefetch: grain's background reading (threads, batches buffered).
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, np.ndarray]],
        batch_size: int,
        *,
        max_length: int | None = None,
        pad_token_id: int = DEFAULT_PAD_ID,
        seed: int = 42,
        num_epochs: int | None = 1,
        shard_index: int = 0,
        shard_count: int = 1,
        shuffle: bool = True,
        drop_remainder: bool = True,
        length_buckets: Sequence[int] | None = None,
        num_threads: int = 1,
        prefetch: int = 4,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
        if not drop_remainder and shard_count > 1:
            raise ValueError("drop_remainder=False needs shard_count=1: a partial global batch "
                             "cannot be split evenly across processes")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
        self._examples = examples
        self.batch_size = batch_size
        self.shard_index, self.shard_count = shard_index, shard_count
        self.global_batch_size = batch_size * shard_count
        self.num_epochs = num_epochs
        self.seed = seed
        self.pad_token_id = pad_token_id
        self._lengths = np.array([batching.example_length(e) for e in examples], dtype=np.int64)
        longest = int(self._lengths.max()) if len(examples) else 1
        if max_length is None:
            max_length = longest
        elif longest > max_length:
            raise ValueError(f"an example has {longest} tokens > max_length={max_length}")
        self.max_length = max_length
        self.buckets = batching.length_buckets(max_length, length_buckets)

        n = len(examples)
        if drop_remainder:
            self.steps_per_epoch = n // self.global_batch_size
        else:
            self.steps_per_epoch = math.ceil(n / self.global_batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} examples make no global batch of {self.global_batch_size}")

        order = grain.MapDataset.range(n)
        if shuffle:
            order = order.shuffle(seed=seed)
        self._order = order.repeat(num_epochs)  # element e * n + k: epoch e's k-th example
        num_steps = sys.maxsize if num_epochs is None else self.steps_per_epoch * num_epochs
        steps = grain.MapDataset.range(num_steps).map(self._batch)
        read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._dataset = steps.to_iter_dataset(read)
        self._iterator = iter(self._dataset)

    @property
    def num_steps(self) -> int | None:
        """Batches in all epochs (None when repeating forever)."""
        return None if self.num_epochs is None else self.steps_per_epoch * self.num_epochs

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices of the global batch at `step` (all processes)."""
        epoch, b = divmod(step, self.steps_per_epoch)
        n = len(self._examples)
        start = b * self.global_batch_size
        stop = min(start + self.global_batch_size, n)
        return np.array([self._order[epoch * n + k] for k in range(start, stop)], dtype=np.int64)

    def _batch(self, step: int) -> dict[str, np.ndarray]:
        indices = self.global_indices(step)
        length = batching.bucket_length(int(self._lengths[indices].max()), self.buckets)
        local = indices[self.shard_index * self.batch_size: (self.shard_index + 1) * self.batch_size]
        return batching.collate([self._examples[i] for i in local], length, self.pad_token_id)

    def __iter__(self) -> PreferenceLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def _fingerprint(self) -> dict:
        return {"num_examples": len(self._examples), "batch_size": self.batch_size,
                "shard_index": self.shard_index, "shard_count": self.shard_count,
                "seed": self.seed, "num_epochs": self.num_epochs,
                "steps_per_epoch": self.steps_per_epoch, "buckets": list(self.buckets)}

    def get_state(self) -> dict:
        """A JSON-serializable state: `set_state` on a loader built alike resumes here."""
        return {"iterator": self._iterator.get_state(), "config": self._fingerprint()}

    def set_state(self, state: Mapping) -> None:
        """Restores `get_state()`; raises ValueError if the loader was built differently."""
        mine = self._fingerprint()
        theirs = dict(state["config"])
        if theirs != mine:
            diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
            raise ValueError(f"loader state was saved with other settings (saved, now): {diff}")
        self._iterator.set_state(dict(state["iterator"]))

    @property
    def step(self) -> int:
        """Index of the next batch this loader returns."""
        return int(self._iterator.get_state()["next_index"])
