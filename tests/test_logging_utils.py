"""RunLogger (JSONL + TensorBoard via tensorboardX) and the progress bar."""

from __future__ import annotations

import io

import numpy as np
import pytest

from zephyr_jax.logging_utils import (
    ProgressBar,
    RunLogger,
    expand_array_metric,
    read_metrics,
    read_tensorboard_scalars,
    tensorboard_tag,
)

SHARE_LE = np.array([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]], np.float32)


def _train_metrics(step: int) -> dict:
    return {
        "loss": 1.0 / step,
        "rewards/accuracies": np.float32(0.75),  # numpy scalars, as jax.device_get gives
        "learning_rate": 5e-6,
        "grad_norm": np.asarray(3.5, np.float32),
        "epoch": step / 10,
        "router/layer_{}/expert_{}_share": SHARE_LE,
    }


def test_jsonl_round_trip(tmp_path):
    with RunLogger(tmp_path, report_to="none", logging_steps=10) as logger:
        for step in (10, 20):
            logger.log(step, _train_metrics(step))
        logger.log(20, {"eval_rewards/accuracies": 0.5, "eval_loss": 0.9, "note": "eval"})
        # Flushed on every write: readable while the run is still going.
        assert len(read_metrics(tmp_path)) == 3

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [10, 20, 20]
    first = records[0]
    assert first["loss"] == pytest.approx(0.1)
    assert first["rewards/accuracies"] == 0.75 and isinstance(first["rewards/accuracies"], float)
    assert first["grad_norm"] == 3.5 and first["learning_rate"] == 5e-6 and first["epoch"] == 1.0
    np.testing.assert_array_equal(first["router/layer_{}/expert_{}_share"], SHARE_LE)
    assert records[2] == {
        "step": 20,
        "eval_rewards/accuracies": 0.5,
        "eval_loss": 0.9,
        "note": "eval",
    }
    assert not (tmp_path / "runs").exists()  # report_to="none": JSONL only


def test_tensorboard_event_file_reads_back(tmp_path):
    with RunLogger(tmp_path, logging_steps=10) as logger:
        logger.log_config({"learning_rate": 5e-6, "lr_scheduler_type": "inverse_sqrt"})
        logger.log(10, _train_metrics(10))
        logger.log(10, {"eval_rewards/accuracies": 0.5})
        logger.log(20, _train_metrics(20))

    assert len(list((tmp_path / "runs").glob("events.out.tfevents.*"))) == 1
    scalars = read_tensorboard_scalars(tmp_path / "runs")
    assert scalars["train/loss"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05))]
    assert scalars["train/rewards/accuracies"] == [(10, 0.75), (20, 0.75)]
    assert scalars["train/learning_rate"][0] == (10, pytest.approx(5e-6, rel=1e-6))
    assert scalars["eval/rewards/accuracies"] == [(10, 0.5)]
    assert scalars["train/router/layer_0/expert_3_share"] == [(10, 0.125), (20, 0.125)]
    assert scalars["train/router/layer_1/expert_0_share"][0] == (10, 0.25)
    assert len([t for t in scalars if t.startswith("train/router/")]) == SHARE_LE.size


def test_resume_appends_without_duplicating(tmp_path):
    # First run logs steps 10..50, then "crashes" after its checkpoint at step 30.
    with RunLogger(tmp_path, logging_steps=10) as logger:
        for step in range(10, 60, 10):
            logger.log(step, {"loss": float(step)})
    # A crash mid-write leaves a torn last line.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 60, "lo')

    with RunLogger(tmp_path, logging_steps=10, resume_step=30) as logger:
        for step in range(40, 80, 10):
            logger.log(step, {"loss": step + 0.5})

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60, 70]
    assert [r["loss"] for r in records] == [10.0, 20.0, 30.0, 40.5, 50.5, 60.5, 70.5]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")

    # Two event files; TensorBoard's purge hides the first run's steps >= 31.
    assert len(list((tmp_path / "runs").glob("events.out.tfevents.*"))) == 2
    loss = read_tensorboard_scalars(tmp_path / "runs")["train/loss"]
    assert loss == [
        (10, 10.0),
        (20, 20.0),
        (30, 30.0),
        (40, 40.5),
        (50, 50.5),
        (60, 60.5),
        (70, 70.5),
    ]

    # Reopening without resume_step just appends (e.g. an eval-only pass on the same output_dir).
    with RunLogger(tmp_path, report_to=(), logging_steps=10) as logger:
        logger.log(70, {"eval_loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path)][-2:] == [70, 70]


def test_a_fresh_start_drops_an_earlier_runs_records(tmp_path):
    """The trainer passes resume_step=0 when no checkpoint exists (a run that died before its
    first save, or save_strategy no): its log starts over instead of repeating steps 1..N."""
    first = RunLogger(tmp_path, report_to="tensorboard", logging_steps=1)
    for step in (1, 2, 3):
        first.log(step, {"loss": float(step)})
    first.close()
    again = RunLogger(tmp_path, report_to="tensorboard", logging_steps=1, resume_step=0)
    for step in (1, 2):
        again.log(step, {"loss": 10.0 + step})
    again.close()
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 11.0), (2, 12.0)]
    assert read_tensorboard_scalars(tmp_path / "runs")["train/loss"] == [(1, 11.0), (2, 12.0)]


def test_resume_after_caller_truncated_the_file(tmp_path):
    """The trainer may cut metrics.jsonl back to its checkpoint itself and pass no resume_step:
    TensorBoard's purge then starts after the file's last step."""
    with RunLogger(tmp_path, logging_steps=10) as logger:
        for step in range(10, 60, 10):
            logger.log(step, {"loss": float(step)})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))  # back to step 30

    with RunLogger(tmp_path, logging_steps=10) as logger:
        logger.log(40, {"loss": 40.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30, 40]
    loss = read_tensorboard_scalars(tmp_path / "runs")["train/loss"]
    assert loss == [(10, 10.0), (20, 20.0), (30, 30.0), (40, 40.5)]


def test_should_log_and_options(tmp_path):
    logger = RunLogger(tmp_path, report_to="none", logging_steps=10, logging_first_step=True)
    assert [s for s in range(1, 31) if logger.should_log(s)] == [1, 10, 20, 30]
    logger.close()
    logger.close()  # idempotent
    assert not RunLogger(tmp_path, report_to="none", logging_steps=0).should_log(10)

    with pytest.raises(ValueError, match="report_to.*wandb.*tensorboard"):
        RunLogger(tmp_path, report_to=("tensorboard", "wandb"))
    with RunLogger(tmp_path / "j", report_to=("jsonl",)) as logger:  # enabled on process 0
        assert logger.enabled
        with pytest.raises(TypeError, match=r"\(step, metrics\)"):
            logger.log({"loss": 1.0}, 10)
    assert not (tmp_path / "j" / "runs").exists()

    off = RunLogger(tmp_path / "other_host", enabled=False)
    off.log(10, {"loss": 1.0})
    bar = off.progress(total=10)
    assert bar._bar.disable
    bar.close()
    off.close()
    assert not (tmp_path / "other_host").exists()


def test_tags_and_array_expansion():
    assert tensorboard_tag("loss") == "train/loss"
    assert tensorboard_tag("rewards/margins") == "train/rewards/margins"
    assert tensorboard_tag("eval_rewards/accuracies") == "eval/rewards/accuracies"
    assert expand_array_metric("share", [0.5, 0.5]) == {"share/0": 0.5, "share/1": 0.5}
    assert expand_array_metric("l{}/e{}", [[1, 2]]) == {"l0/e0": 1.0, "l0/e1": 2.0}
    assert expand_array_metric("x", [[1, 2]]) == {"x/0/0": 1.0, "x/0/1": 2.0}


def test_progress_bar_shows_step_loss_lr_tokens_and_eta():
    out = io.StringIO()
    bar = ProgressBar(100, initial_step=40, file=out, mininterval=0)
    bar.update(41, loss=0.6931, lr=5e-6, tokens=65_536)
    bar.update(42, loss=0.5, lr=4.9e-6, tokens=65_536)
    bar.write("eval done")
    bar.close()
    text = out.getvalue()
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert "42/100" in last and "loss=0.5000" in last and "lr=4.900e-06" in last
    assert "tok/s=" in last
    assert "<" in last  # tqdm's elapsed<remaining (ETA)
    assert "eval done" in text
