"""The training entry point end to end: demo learning, exact resume (kill -9 and SIGTERM),
and the clear errors for bad config, bad data and non-finite losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from zephyr_jax.model_checkpoint import load_model_checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--eval_strategy", "no",
         "--export_hf", "false", "--save_steps", "3", "--max_steps", "12"]


def train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "zephyr_jax.train", "configs/demo.yaml",
            "--output_dir", str(out), *extra]


def run_train(out: Path, *extra: str, timeout: int = 600, devices: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run(train_cmd(out, *extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"duplicate steps logged: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def final_params(out: Path) -> dict:
    _, params = load_model_checkpoint(str(out))
    return params


def assert_bitwise_equal(a: dict, b: dict) -> None:
    import jax

    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    proc = run_train(out, *QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_demo_learns_and_writes_every_artifact(tmp_path):
    """A shortened demo: eval reward accuracy on held-out pairs must be well above chance."""
    out = tmp_path / "demo"
    proc = run_train(out, "--max_steps", "60", "--eval_steps", "1000", "--save_steps", "1000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r for r in rows if "eval_rewards/accuracies" in r][-1]
    assert final_eval["eval_rewards/accuracies"] > 0.65, final_eval
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss",
                "log_odds_ratio", "log_odds_chosen", "learning_rate", "grad_norm",
                "router/expert_share", "router/entropy"):
        assert key in train_rows[-1], key
    assert np.asarray(train_rows[-1]["router/expert_share"]).shape == (2, 4)
    assert list((out / "checkpoints").iterdir()), "no checkpoint"
    assert list((out / "runs").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert (out / "config.json").exists() and (out / "train_config.yaml").exists()
    # --export_hf through the conversion code: transformers loads it
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf")
    assert hf.config.model_type == "mixtral"
    assert (out / "hf" / "tokenizer.json").exists()


@pytest.mark.xdist_group("straight_run")  # one worker builds the fixture once
def test_kill_9_then_resume_is_bitwise_identical(straight_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(out, *QUICK), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "3").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoints" / "12").exists(), "run finished before the kill"
    resumed = run_train(out, *QUICK)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert losses(out) == losses(straight_run)
    assert sorted(losses(out)) == list(range(1, 13))
    assert_bitwise_equal(final_params(out), final_params(straight_run))


@pytest.mark.xdist_group("straight_run")  # one worker builds the fixture once
def test_sigterm_saves_a_checkpoint_and_resumes(straight_run, tmp_path):
    out = tmp_path / "preempted"
    proc = subprocess.Popen(train_cmd(out, *QUICK), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "saved step" in stdout
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 12 and saved[-1] >= 4
    resumed = run_train(out, *QUICK)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == losses(straight_run)
    assert_bitwise_equal(final_params(out), final_params(straight_run))


CONFIG_ERRORS = [
    (["--learning_rat", "1e-3"], ["learning_rat", "did you mean 'learning_rate'"]),
    (["--max_prompt_length", "128"], ["max_prompt_length", "max_length=128"]),
    (["--mesh", "{data: 1, expert: 3}"], ["num_local_experts=4", "mesh.expert=3"]),
    (["--mesh", "{data: 2}"], ["mesh", "have 3"]),
    (["--per_device_train_batch_size", "0"], ["per_device_train_batch_size"]),
    (["--lr_scheduler_type", "warmup_cosine"], ["lr_scheduler_type"]),
    (["--export_max_shard_size", "5 gigs"], ["export_max_shard_size", "5GB"]),
    (["--export_max_shard_size", "0"], ["export_max_shard_size", "positive"]),
    (["--model_overrides", "{moe_exchange: sparse}"], ["moe_exchange", "padded"]),
]
# The entry point's `main` on each case in one process with 3 devices (one jax start-up, not six;
# `python -m zephyr_jax.train` is `sys.exit(main())`): exit code and stderr per case, and whether
# anything escaped `main` as an exception.
_ERRORS_DRIVER = """
import contextlib, io, json, sys, traceback
from zephyr_jax.train import main
out = []
for args in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(["configs/demo.yaml", "--output_dir", sys.argv[1], *args])
        except BaseException:
            rc = "raised"
            traceback.print_exc()
    out.append([rc, err.getvalue()])
print(json.dumps(out))
"""


def test_config_errors_fail_before_compiling_and_name_the_key(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    proc = subprocess.run([sys.executable, "-c", _ERRORS_DRIVER, str(tmp_path / "bad"),
                           json.dumps([args for args, _ in CONFIG_ERRORS])], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (args, needles), (rc, stderr) in zip(CONFIG_ERRORS, results, strict=True):
        assert rc == 2, (args, rc, stderr[-3000:])
        for needle in needles:
            assert needle in stderr, (args, stderr[-3000:])
        assert "Traceback" not in stderr, (args, stderr[-3000:])
    assert not (tmp_path / "bad" / "checkpoints").exists()  # no step ran, nothing was saved


def test_bad_data_beyond_threshold_is_a_clear_error(tmp_path):
    from zephyr_jax.data import SAMPLE_DATA

    rows = [json.loads(line) for line in open(os.path.join(SAMPLE_DATA, "train.jsonl"))][:40]
    for r in rows[:4]:  # 10% bad: a missing key and a conversation ending in a user turn
        del r["chosen"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    proc = run_train(tmp_path / "out", "--dataset_mixer", json.dumps({str(data): 1.0}),
                     "--dataset_splits", "[train]")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "4 of 40 rows are invalid" in proc.stderr and "max_bad_row_fraction" in proc.stderr
    assert "missing_key=4" in proc.stderr


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = run_train(out, "--learning_rate", "1e30", "--lr_scheduler_type", "constant",
                     "--max_grad_norm", "0", "--save_steps", "1", "--logging_steps", "1",
                     "--per_device_train_batch_size", "2", "--eval_strategy", "no",
                     "--max_steps", "20")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is not finite" in proc.stderr and "step " in proc.stderr
    bad_step = int(proc.stderr.split("error: step ", 1)[1].split(":", 1)[0])
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == bad_step - 1, (saved, bad_step)
    params = final_params(out)
    import jax

    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(params))


def test_starts_from_a_hf_folder_on_a_mesh(tmp_path):
    """The recipe's start (model_name_or_path = a HF Mixtral) on 4 devices, experts split: the
    weights load block by block onto the mesh (`load_hf_sharded`) and, after one step, come back
    out of the HF export bit for bit: the demo's inverse_sqrt warmup (as HF's) gives step 0 a
    learning rate of 0, so a step changes no weight; a wrong block would. The MoE exchanges
    tokens the ragged way here (moe_exchange, emulated on CPU), which the trainer first checks
    against the padded exchange on the mesh."""
    from test_convert_helpers import make_hf_model, read_tensors, save_hf

    hf = save_hf(make_hf_model(seed=6, vocab_size=32000, hidden_size=32, intermediate_size=48),
                 tmp_path / "hf", max_shard_size="200KB")
    out = tmp_path / "run"
    proc = run_train(out, "--model_preset", "null", "--model_name_or_path", hf,
                     "--mesh", "{data: 2, expert: 2}", "--model_overrides", "{moe_exchange: ragged}",
                     "--max_steps", "1", "--per_device_train_batch_size",
                     "1", "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
                     "--dataset_splits", "[train]", devices=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "moe_exchange ragged agrees with the padded exchange" in proc.stdout, proc.stdout
    assert np.isfinite(losses(out)[1])
    want, got = read_tensors(hf), read_tensors(out / "hf")
    assert sorted(got) == sorted(want)
    for name, x in want.items():
        np.testing.assert_array_equal(got[name], x, err_msg=name)
