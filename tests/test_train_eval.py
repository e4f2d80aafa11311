"""Splits, epochs and evaluation as HF Trainer + TRL count them: train / test splits by name,
gradient accumulation whose last step of an epoch is shorter, evaluation at epoch ends and of
every held-out pair on any number of devices, the learning rate logged at its step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zephyr_jax import data as zdata
from zephyr_jax import trainer
from zephyr_jax.train_config import load_train_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return zdata.load_tokenizer()


def test_splits_are_train_or_test_by_name_in_any_order(tok):
    """`dataset_splits: [test, train]` used to train on the test split (the first listed)."""
    want_train, want_eval = trainer.build_data(load_train_config(
        "configs/demo.yaml", ["--dataset_splits", "[train, test]"]), tok, 0, 1)
    got_train, got_eval = trainer.build_data(load_train_config(
        "configs/demo.yaml", ["--dataset_splits", "[test, train]"]), tok, 0, 1)
    assert len(got_train) > len(got_eval) > 0
    for got, want in ((got_train, want_train), (got_eval, want_eval)):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert all(np.array_equal(a[k], b[k]) for k in zdata.BATCH_KEYS)
    only_eval = load_train_config("configs/demo.yaml", ["--dataset_splits", "[test]"])
    with pytest.raises(trainer.ConfigError, match="names no train split"):
        trainer.build_data(only_eval, tok, 0, 1)


def test_eval_batches_give_every_pair_once_across_processes():
    examples = [{k: np.full(3 + i % 4, i + 1, np.int32) for k in zdata.BATCH_KEYS} for i in range(11)]
    for processes in (1, 2, 4):
        seen, shapes = [], set()
        per_process = [list(trainer.eval_batches(examples, 8, 16, 0, p, processes))
                       for p in range(processes)]
        assert len({len(b) for b in per_process}) == 1  # every process steps through all batches
        for batches in zip(*per_process, strict=True):
            assert [real for _, real in batches] == [batches[0][1]] * processes
            for batch, _ in batches:
                shapes.add(batch["chosen_input_ids"].shape)
                ids, mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]
                seen += [int(row[0]) - 1 for row, m in zip(ids, mask, strict=True) if m.any()]
                filler = ~mask.any(-1)
                assert (batch["chosen_labels"][filler] == -100).all()
        assert sorted(seen) == list(range(11)), processes
        assert shapes == {(8 // processes, 16)}, processes
    assert [real for _, real in trainer.eval_batches(examples, 8, 16, 0)] == [8, 3]
    with pytest.raises(ValueError, match="does not split into 3 equal blocks"):
        next(trainer.eval_batches(examples, 8, 16, 0, 0, 3))


def test_eval_on_3_devices_covers_every_pair_as_one_device_does():
    """The last global batch (4 pairs) is smaller than 6 = 2 per device x 3 devices and does
    not split over them: it used to raise. Filled up with empty pairs it gives, against the eval
    step on one device over the real pairs alone, the same metrics: the loss averaged over pairs
    (HF's evaluation loop), TRL's metrics over batches."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    proc = subprocess.run([sys.executable, "tests/eval_padding_main.py", "10", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n_examples"] == 10 and out["sizes"] == [6, 4]
    assert sorted(out["got"]) == sorted(out["want"])
    for key, want in out["want"].items():
        np.testing.assert_allclose(out["got"][key], want, rtol=1e-5, atol=1e-6, err_msg=key)


def _fitting_rows(tok, split: str, n: int, max_length: int, max_prompt_length: int) -> list:
    """The first `n` sample rows that survive tokenization at these lengths (none dropped)."""
    rows = list(zdata.load_preference_dataset(zdata.SAMPLE_DATA, split))
    keep = []
    for row in rows:
        examples, _ = zdata.tokenize_dataset([row], tok, max_length=max_length,
                                             max_prompt_length=max_prompt_length)
        if examples:
            keep.append(row)
        if len(keep) == n:
            return keep
    raise AssertionError(f"only {len(keep)} sample rows fit")


def test_accumulation_epochs_and_epoch_eval_on_two_devices(tmp_path, tok):
    """20 train pairs, 2 devices x 2 pairs = 5 micro-batches per epoch, 3 per optimizer step: HF
    runs 2 steps per epoch (3 + 2 micro-batches); this used to run 1 (and a 6th micro-batch
    from the next epoch in step 2). Evaluation every epoch over 5 held-out pairs in global
    batches of 4 (the second: 1 pair and 3 empty ones, which used to raise on 2 devices)."""
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 20), ("test", 5)):
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps(r) + "\n" for r in _fitting_rows(tok, split, n, 128, 96)))
    out = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run(
        [sys.executable, "-m", "zephyr_jax.train", "configs/demo.yaml", "--output_dir", str(out),
         "--dataset_mixer", json.dumps({str(data): 1.0}), "--per_device_train_batch_size", "2",
         "--gradient_accumulation_steps", "3", "--num_train_epochs", "2", "--logging_steps", "2",
         "--eval_strategy", "epoch", "--per_device_eval_batch_size", "2",
         "--save_strategy", "epoch", "--export_hf", "false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "loss" in r}
    evals = {r["step"]: r for r in rows if "eval_loss" in r}
    assert sorted(train) == [2, 4] and [train[s]["epoch"] for s in (2, 4)] == [1.0, 2.0]
    assert sorted(evals) == [2, 4]
    assert all(np.isfinite(r["eval_loss"]) for r in evals.values())
    # the window [1, 2] logs step 2's learning rate (HF), not the window's mean
    cfg = load_train_config("configs/demo.yaml")
    schedule, _ = trainer.make_tx(cfg, 4)
    assert train[2]["learning_rate"] == pytest.approx(float(schedule(1)), rel=1e-6)
    assert float(schedule(0)) != float(schedule(1))
    ckpts = out / "checkpoints"
    saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert saved == [2, 4]
    for step, micro in ((2, 5), (4, 10)):
        meta = json.loads((ckpts / str(step) / "meta" / "metadata").read_text())
        assert meta["data_state"]["iterator"]["next_index"] == micro, step
    # HF's records: eval with its epoch; at the end the summary of the session (train_loss the
    # mean of its steps' losses: here the two equal windows' means)
    assert [evals[s]["epoch"] for s in (2, 4)] == [1.0, 2.0]
    [summary] = [r for r in rows if "train_loss" in r]
    assert summary["step"] == 4 and summary["epoch"] == 2.0
    assert summary["train_loss"] == pytest.approx((train[2]["loss"] + train[4]["loss"]) / 2,
                                                  rel=1e-6)
    assert summary["train_steps_per_second"] > 0 and summary["train_samples_per_second"] > 0
    # the same command again: the run is done (resumes at its last step), and logs nothing new
    before = (out / "metrics.jsonl").read_text()
    again = subprocess.run(proc.args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.slow  # ~40 s: two short training runs
def test_a_fresh_start_over_an_old_log_starts_the_log_over(tmp_path):
    """No checkpoint (a run that died before its first save, or save_strategy no): the trainer
    starts at step 0 and used to append to the old metrics.jsonl, logging every step twice."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "zephyr_jax.train", "configs/demo.yaml", "--output_dir", str(out),
           "--max_steps", "4", "--logging_steps", "2", "--eval_steps", "2",
           "--per_device_train_batch_size", "2", "--save_strategy", "no", "--export_hf", "false"]
    rows = []
    for _ in range(2):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows.append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[0]] == [2, 2, 4, 4, 4]
    assert [r.get("loss") for r in rows[1]] == [r.get("loss") for r in rows[0]]  # deterministic
