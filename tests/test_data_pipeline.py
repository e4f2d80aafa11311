"""Static-shape batches and the grain loader: shuffling, epochs, shards, resumable state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zephyr_jax.data import BATCH_KEYS, LABEL_PAD, PreferenceLoader, collate

PAD = 2


def make_examples(n: int, seed: int = 0, max_len: int = 30) -> list[dict[str, np.ndarray]]:
    """Synthetic examples; token 1000 + i marks example i so batches can be traced back."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, c, r = rng.integers(2, 10), rng.integers(1, 10), rng.integers(1, max_len - 10)
        ex = {}
        for side, a in (("chosen", c), ("rejected", r)):
            ids = np.concatenate([[1, 1000 + i], rng.integers(3, 900, p + a - 2)]).astype(np.int32)
            ex[f"{side}_input_ids"] = ids
            ex[f"{side}_attention_mask"] = np.ones_like(ids)
            ex[f"{side}_labels"] = np.where(np.arange(len(ids)) < p, LABEL_PAD, ids).astype(np.int32)
        out.append(ex)
    return out


def ids_of(batch) -> list[int]:
    return [int(x) - 1000 for x in batch["chosen_input_ids"][:, 1]]


def loader(examples, batch_size=4, **kw):
    kw.setdefault("max_length", 32)
    return PreferenceLoader(examples, batch_size, pad_token_id=PAD, **kw)


def test_collate_pads_statically():
    examples = make_examples(3)
    batch = collate(examples, 32, PAD)
    assert set(batch) == set(BATCH_KEYS)
    for v in batch.values():
        assert v.shape == (3, 32) and v.dtype == np.int32
    for i, ex in enumerate(examples):
        for side in ("chosen", "rejected"):
            n = len(ex[f"{side}_input_ids"])
            np.testing.assert_array_equal(batch[f"{side}_input_ids"][i, :n], ex[f"{side}_input_ids"])
            np.testing.assert_array_equal(batch[f"{side}_labels"][i, :n], ex[f"{side}_labels"])
            assert (batch[f"{side}_input_ids"][i, n:] == PAD).all()
            assert (batch[f"{side}_attention_mask"][i, n:] == 0).all()
            assert (batch[f"{side}_attention_mask"][i, :n] == 1).all()
            assert (batch[f"{side}_labels"][i, n:] == LABEL_PAD).all()
    with pytest.raises(ValueError, match="more than the batch length"):
        collate(examples, 5, PAD)


def test_one_epoch_is_a_permutation_and_epochs_reshuffle():
    examples = make_examples(24)
    dl = loader(examples, batch_size=4, seed=7, num_epochs=3)
    assert dl.steps_per_epoch == 6 and dl.num_steps == 18
    batches = list(dl)
    assert len(batches) == 18
    epochs = [sum((ids_of(b) for b in batches[e * 6:(e + 1) * 6]), []) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(24))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(24))
    again = [ids_of(b) for b in loader(examples, batch_size=4, seed=7, num_epochs=3)]
    assert again == [ids_of(b) for b in batches]  # deterministic
    other = [ids_of(b) for b in loader(examples, batch_size=4, seed=8, num_epochs=3)]
    assert other != again


def test_drop_remainder_and_no_shuffle():
    examples = make_examples(10)
    dl = loader(examples, batch_size=4, num_epochs=2)
    assert dl.steps_per_epoch == 2 and len(list(dl)) == 4  # 2 leftovers skipped each epoch
    batches = list(loader(examples, batch_size=4, shuffle=False, drop_remainder=False))
    assert [ids_of(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches[-1]["chosen_input_ids"].shape == (2, 32)


def test_shards_are_disjoint_and_cover_each_global_batch():
    examples = make_examples(37)
    count, per = 4, 2
    shards = [list(loader(examples, batch_size=per, seed=3, num_epochs=2, shard_index=i,
                          shard_count=count)) for i in range(count)]
    single = loader(examples, batch_size=per * count, seed=3, num_epochs=2)
    assert all(len(s) == single.num_steps == 2 * (37 // 8) for s in shards)
    for step, global_batch in enumerate(single):
        parts = [ids_of(shards[i][step]) for i in range(count)]
        assert sum(parts, []) == ids_of(global_batch)  # process i holds rows [i*per, (i+1)*per)
        assert len(set(sum(parts, []))) == per * count
        for i in range(count):
            assert shards[i][step]["chosen_input_ids"].shape == (per, 32)


def test_resume_from_saved_state_gives_the_same_batches():
    examples = make_examples(30)
    kw = dict(batch_size=4, seed=1, num_epochs=3, shard_index=1, shard_count=2)
    reference = [ids_of(b) for b in loader(examples, **kw)]
    dl = loader(examples, **kw)
    for _ in range(5):  # crosses the epoch boundary (3 steps per epoch)
        next(dl)
    state = json.loads(json.dumps(dl.get_state()))  # JSON round trip, as a checkpoint would
    assert dl.step == 5
    rest = [ids_of(b) for b in dl]
    resumed = loader(examples, **kw)
    resumed.set_state(state)
    assert [ids_of(b) for b in resumed] == rest == reference[5:]
    with pytest.raises(ValueError, match="other settings"):
        loader(examples, **{**kw, "seed": 2}).set_state(state)


def test_length_buckets_follow_the_global_batch():
    examples = make_examples(40, max_len=30)
    buckets = (8, 16, 24)
    for step_batches in zip(*[loader(examples, batch_size=2, max_length=32, length_buckets=buckets,
                                     shard_index=i, shard_count=2, seed=5) for i in range(2)],
                            strict=True):
        lengths = {b["chosen_input_ids"].shape[1] for b in step_batches}
        assert len(lengths) == 1  # all processes agree on the shape
        (length,) = lengths
        longest = max(int(b[f"{s}_attention_mask"].sum(1).max()) for b in step_batches
                      for s in ("chosen", "rejected"))
        assert length in (8, 16, 24, 32) and longest <= length
        assert length == 8 or longest > {16: 8, 24: 16, 32: 24}[length]


def test_bad_arguments():
    examples = make_examples(8)
    with pytest.raises(ValueError, match="no global batch"):
        loader(examples, batch_size=4, shard_count=3)
    with pytest.raises(ValueError, match="shard_count=1"):
        loader(examples, batch_size=2, shard_count=2, drop_remainder=False)
    with pytest.raises(ValueError, match="max_length"):
        loader(examples, batch_size=2, max_length=8)


def test_defaults_pad_to_the_longest_example():
    examples = make_examples(12)
    longest = max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in examples)
    dl = PreferenceLoader(examples, batch_size=4)
    assert dl.max_length == longest
    batch = next(dl)
    assert batch["chosen_input_ids"].shape == (4, longest)
    assert batch["chosen_input_ids"][batch["chosen_attention_mask"] == 0].tolist() == \
        [2] * int((batch["chosen_attention_mask"] == 0).sum())  # pad = eos of the shipped tokenizer


def test_repeat_forever():
    dl = loader(make_examples(8), batch_size=4, num_epochs=None)
    assert dl.num_steps is None
    seen = [ids_of(next(dl)) for _ in range(10)]
    assert all(sorted(seen[i] + seen[i + 1]) == list(range(8)) for i in range(0, 10, 2))
