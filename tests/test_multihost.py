"""Multi-process training: two local processes x 4 CPU devices (jax.distributed over 127.0.0.1,
gloo collectives) train like one process with 8 devices.

Both runs use the same mesh (data 2 x expert 4: `data` across the processes, the experts inside
each, as on the cluster) and the real CLI (`python -m zephyr_jax.train`, `distributed:` from the
command line). Each process loads its half of every global batch; checkpoints are written by
both; process 0 alone writes metrics.jsonl and the run files; each process exports its part of
the HF folder's files from the final checkpoint, and process 0 puts the folder in place.

Tolerance: the per-step token counts are equal (same batches); losses agree to 1e-6 relative
(measured: equal or 1 float32 ulp): the all-reduces over `data` sum in another order when they
cross processes (gloo) than inside one, so results may differ by float32 rounding, never more.
After 3 steps the weights agree to 1e-5 absolute (measured 3e-7): Adam's normalized step can
amplify a rounding difference of a near-zero gradient, but a lost or misplaced shard would move
weights by about the learning rate, 3e-4 per step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from zephyr_jax.config import ConfigError
from zephyr_jax.distributed import first_host, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["configs/demo.yaml", "--max_steps", "3", "--logging_steps", "1", "--eval_strategy", "no",
        "--save_strategy", "steps", "--save_steps", "1000", "--export_hf", "true",
        "--export_max_shard_size", "4MB",  # several files, so both processes export some
        "--report_to", "[jsonl]", "--per_device_train_batch_size", "1",
        "--dataset_splits", "[train]", "--mesh", "{data: 2, expert: 4}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: str, devices: int, distributed: str | None, log: str,
           extra: list[str] = ()) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
    env.pop("XLA_FLAGS", None)
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    cmd = [sys.executable, "-m", "zephyr_jax.train", *ARGS, *extra, "--output_dir", out]
    if distributed:
        cmd += ["--distributed", distributed]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait(procs, logs, timeout=600):
    for p, log in zip(procs, logs, strict=True):
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            rc = "timeout"
        assert rc == 0, f"{log} (exit {rc}):\n{open(log).read()[-4000:]}"


def _metrics(out: str) -> list[dict]:
    """The training records (not eval ones, nor the end-of-run summary)."""
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if "loss" in r]


def test_two_processes_train_like_one(tmp_path):
    from safetensors.numpy import load_file

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    port = _free_port()
    logs = [str(tmp_path / n) for n in ("one.log", "two_0.log", "two_1.log")]
    procs = [_start(one, 8, None, logs[0])]
    procs += [_start(two, 4, f"{{coordinator_address: '127.0.0.1:{port}', num_processes: 2, "
                             f"process_id: {i}}}", logs[1 + i]) for i in range(2)]
    _wait(procs, logs)

    a, b = _metrics(one), _metrics(two)
    print(json.dumps({"one_process_loss": [m["loss"] for m in a],
                      "two_processes_loss": [m["loss"] for m in b]}))
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]  # one writer
    for ma, mb in zip(a, b, strict=True):
        assert ma["num_tokens"] == mb["num_tokens"]  # the same global batch
        assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-6, abs=0), (ma["step"], ma, mb)
        assert mb["grad_norm"] == pytest.approx(ma["grad_norm"], rel=1e-6, abs=0)
    assert a[0]["loss"] != a[2]["loss"]  # it trained
    for name in ("config.json", "train_config.yaml"):
        assert os.path.exists(os.path.join(two, name))
    # both processes wrote the step-3 checkpoint together; process 0 exported from it
    assert os.listdir(os.path.join(two, "checkpoints")) == ["3"]
    files = sorted(f for f in os.listdir(os.path.join(one, "hf")) if f.endswith(".safetensors"))
    assert len(files) >= 2, files  # the single-process export, in memory
    # both processes wrote their part of the files into one staging folder, renamed into place
    assert sorted(f for f in os.listdir(os.path.join(two, "hf"))
                  if f.endswith(".safetensors")) == files
    assert not os.path.exists(os.path.join(two, ".hf.export-partial"))
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json"):
        assert os.path.exists(os.path.join(two, "hf", name)), name
    wa, wb = {}, {}
    for f in files:
        wa.update(load_file(os.path.join(one, "hf", f)))
        wb.update(load_file(os.path.join(two, "hf", f)))
    assert sorted(wa) == sorted(wb)
    worst = max(float(np.max(np.abs(wa[k] - wb[k]))) for k in wa)
    print(json.dumps({"max_abs_weight_diff": worst}))
    assert worst <= 1e-5, worst
    assert "[train] exported" in open(logs[1]).read()  # process 0 reports it
    assert "[train] exported" not in open(logs[2]).read()


@pytest.mark.slow  # ~60 s: three more training processes
def test_hosts_the_batch_axes_do_not_split_load_the_same_rows(tmp_path):
    """mesh {data: 1, tensor: 8} on 2 hosts x 4 devices: every device holds the whole batch, so
    both hosts must load the same rows. Each used to load its own half, which jax took for the
    whole batch: each host trained on part of it (loss, tokens and grad norm off, different on
    the two hosts) with no error."""
    extra = ["--mesh", "{data: 1, tensor: 8}", "--max_steps", "2", "--export_hf", "false"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    port = _free_port()
    logs = [str(tmp_path / n) for n in ("one.log", "two_0.log", "two_1.log")]
    procs = [_start(one, 8, None, logs[0], extra)]
    procs += [_start(two, 4, f"{{coordinator_address: '127.0.0.1:{port}', num_processes: 2, "
                             f"process_id: {i}}}", logs[1 + i], extra) for i in range(2)]
    _wait(procs, logs)
    a, b = _metrics(one), _metrics(two)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    for ma, mb in zip(a, b, strict=True):
        assert ma["num_tokens"] == mb["num_tokens"]  # the whole global batch, once
        assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-6, abs=0), (ma, mb)
        assert mb["grad_norm"] == pytest.approx(ma["grad_norm"], rel=1e-6, abs=0), (ma, mb)


def test_process_batch_blocks():
    """Which block of each global batch a host loads, from the rows its devices hold."""
    from zephyr_jax.sharding import ShardingError, batch_blocks

    full = set(range(8))
    # data parallel over hosts: disjoint halves, in the order of their rows
    halves = {0: {4, 5, 6, 7}, 1: {0, 1, 2, 3}}
    assert [batch_blocks(halves, {p: full for p in halves}, 8, 8, p) for p in (0, 1)] == [
        (1, 2), (0, 2)]
    # interleaved rows (jax maps a host's rows to its devices' slices in order): still a block
    assert batch_blocks({0: {0, 1, 4, 5}, 1: {2, 3, 6, 7}}, {0: full, 1: full}, 8, 8, 1) == (1, 2)
    # the batch axes do not span the hosts: one block, the same rows on both
    both = {0: set(range(8)), 1: set(range(8))}
    assert [batch_blocks(both, {0: full, 1: full}, 8, 8, p) for p in (0, 1)] == [(0, 1), (0, 1)]
    # four hosts, two blocks: pairs of hosts share one
    pairs = {0: {0, 1, 2, 3}, 1: {0, 1, 2, 3}, 2: {4, 5, 6, 7}, 3: {4, 5, 6, 7}}
    assert [batch_blocks(pairs, dict.fromkeys(pairs, full), 8, 8, p)
            for p in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    with pytest.raises(ShardingError, match="overlapping but unequal"):
        batch_blocks({0: {0, 1, 2, 3, 4, 5}, 1: {4, 5, 6, 7}}, {0: full, 1: full}, 8, 8, 0)
    with pytest.raises(ShardingError, match="activation_length"):
        batch_blocks(both, {0: {0, 1, 2, 3}, 1: {4, 5, 6, 7}}, 8, 8, 0)


@pytest.mark.slow  # ~40-60 s; the success path above runs the same agreement, with no failure
def test_a_failed_export_part_fails_both_and_keeps_the_previous_export(tmp_path):
    """Process 1's converter part dies (a `sitecustomize` on its PYTHONPATH exits the converter
    only): both processes stop with the error, the staging folder is gone, and the export that
    was there before (a marker file here) is untouched; the checkpoint is intact."""
    out, port = tmp_path / "run", _free_port()
    (out / "hf").mkdir(parents=True)
    (out / "hf" / "earlier.txt").write_text("an earlier export")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text(
        "import os, sys\nif 'jax-to-hf' in sys.argv:\n    os._exit(7)\n")
    logs = [str(tmp_path / f"p{i}.log") for i in range(2)]
    args = ["--max_steps", "1"]
    procs = []
    for i in range(2):
        if i == 1:
            os.environ["PYTHONPATH"], saved = str(broken), os.environ.get("PYTHONPATH")
        try:
            procs.append(_start(str(out), 4, f"{{coordinator_address: '127.0.0.1:{port}', "
                                f"num_processes: 2, process_id: {i}}}", logs[i], args))
        finally:
            if i == 1:
                os.environ.pop("PYTHONPATH")
                if saved is not None:
                    os.environ["PYTHONPATH"] = saved
    codes = [p.wait(timeout=600) for p in procs]
    texts = [open(log).read() for log in logs]
    assert codes == [2, 2], (codes, texts[0][-2000:], texts[1][-2000:])
    assert "succeeded here, another process failed" in texts[0], texts[0][-2000:]
    assert "part 1/2" in texts[1] and "failed here (exit 7)" in texts[1], texts[1][-2000:]
    assert os.listdir(out / "hf") == ["earlier.txt"]
    assert not (out / ".hf.export-partial").exists()
    assert os.listdir(out / "checkpoints") == ["1"]


@pytest.mark.slow
def test_sigterm_on_one_process_stops_both_at_the_same_step(tmp_path):
    """SLURM may deliver SIGTERM to the hosts a step apart: they must agree, save one checkpoint
    together and exit cleanly (not hang in mismatched collectives); then both resume from it."""
    import signal
    import time

    out, port = str(tmp_path / "run"), _free_port()
    logs = [str(tmp_path / f"p{i}.log") for i in range(2)]
    args = ["--max_steps", "200", "--save_strategy", "steps", "--save_steps", "1000",
            "--export_hf", "false"]
    procs = [_start(out, 4, f"{{coordinator_address: '127.0.0.1:{port}', num_processes: 2, "
                            f"process_id: {i}}}", logs[i], args) for i in range(2)]
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 600
    while not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 2):
        assert time.time() < deadline and all(p.poll() is None for p in procs), open(logs[0]).read()
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)  # process 1 only
    _wait(procs, logs)
    saved = [[line for line in open(log) if "[train] signal" in line] for log in logs]
    assert [len(s) for s in saved] == [1, 1], saved
    assert "signal on another process" in saved[0][0] and "signal 15" in saved[1][0]
    steps = os.listdir(os.path.join(out, "checkpoints"))
    assert len(steps) == 1 and 2 <= int(steps[0]) < 200
    for s in saved:  # the same step on both, written together
        assert f"saved step {steps[0]} " in s[0], saved

    # the same command again resumes both processes (each on its own data shard) and goes on
    stop = int(steps[0])
    port = _free_port()
    logs = [str(tmp_path / f"resume{i}.log") for i in range(2)]
    args[1] = str(stop + 1)  # --max_steps
    procs = [_start(out, 4, f"{{coordinator_address: '127.0.0.1:{port}', num_processes: 2, "
                            f"process_id: {i}}}", logs[i], args) for i in range(2)]
    _wait(procs, logs)
    for log in logs:
        assert f"resumed from {os.path.join(out, 'checkpoints')}/{stop}" in open(log).read()
    assert [m["step"] for m in _metrics(out)][-2:] == [stop, stop + 1]


# --------------------------------------------------------------------------- settings, no JAX


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "0",
         "SLURM_STEP_NODELIST": "gpu[017-020]", "SLURM_JOB_NODELIST": "gpu[001-020]",
         "SLURM_STEP_NUM_NODES": "4"}


def test_single_process_needs_no_initialization():
    assert resolve({}, {}) is None
    assert resolve({}, {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert resolve({"num_processes": 1}, {}) is None


def test_slurm_one_process_per_node_owns_all_its_gpus():
    s = resolve({}, SLURM)
    assert (s.num_processes, s.process_id) == (4, 3)
    assert s.coordinator_address == f"gpu017:{61440 + 4242 % 4096}"  # step's first node, JAX's port
    assert s.local_device_ids is None  # all 8 GPUs, not JAX's SLURM default of GPU #SLURM_LOCALID
    kw = s.initialize_kwargs()
    assert kw["cluster_detection_method"] == "deactivate" and kw["local_device_ids"] is None
    assert resolve({"coordinator_port": 7777}, SLURM).coordinator_address == "gpu017:7777"
    env = {**SLURM, "JAX_COORDINATOR_PORT": "5555"}
    assert resolve({}, env).coordinator_address == "gpu017:5555"
    no_step = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    assert resolve({}, no_step).coordinator_address.startswith("gpu001:")


def test_slurm_one_process_per_gpu_gets_its_gpu():
    env = {**SLURM, "SLURM_NTASKS": "32", "SLURM_PROCID": "13", "SLURM_LOCALID": "5"}
    s = resolve({}, env)
    assert (s.num_processes, s.process_id, s.local_device_ids) == (32, 13, (5,))


def test_config_wins_over_environment():
    env = {**SLURM, "JAX_COORDINATOR_ADDRESS": "envhost:1", "JAX_NUM_PROCESSES": "9"}
    s = resolve({"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1,
                 "local_device_ids": [0, 1]}, env)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == (
        "10.0.0.1:1234", 2, 1, (0, 1))
    s = resolve({}, {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2",
                     "JAX_PROCESS_ID": "0", "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"})
    assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == (
        "h:9", 2, 0, (0, 1, 2, 3))


@pytest.mark.parametrize("cfg, env, match", [
    ({"coordinator": "x:1"}, {}, "unknown key"),
    ({"num_processes": 2}, {}, "no process_id"),
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, {}, r"not in \[0, 2\)"),
    ({"num_processes": 2, "process_id": 0}, {}, "no coordinator_address"),
    ({"num_processes": 2, "process_id": 0, "coordinator_address": "h"}, {}, "needs a port"),
    ({"coordinator_address": "h:1"}, {}, "not num_processes"),
])
def test_bad_settings_name_the_key(cfg, env, match):
    with pytest.raises(ConfigError, match=match):
        resolve(cfg, env)


def test_first_host_of_slurm_node_lists():
    assert first_host("node001") == "node001"
    assert first_host("node[001-004]") == "node001"
    assert first_host("gpu[003-006,9],cpu1") == "gpu003"
    assert first_host("a-b-1,c2") == "a-b-1"
    assert first_host("n[7,9]") == "n7"
    # text after a bracket group, and several groups (SLURM expands them left to right): the
    # coordinator was "node01" and "rack1", hosts that do not exist
    assert first_host("node[01-02]-ib") == "node01-ib"
    assert first_host("rack[1-2]-node[01-04],login1") == "rack1-node01"
    for bad in ("", "node[01", "a]b", "[]x"):
        with pytest.raises(ConfigError, match="cannot find its first host"):
            first_host(bad)


def test_slurm_launch_script_parses_and_runs_the_recipe():
    script = os.path.join(ROOT, "scripts", "launch_slurm.sh")
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = open(script).read()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "CONFIG=${CONFIG:-configs/zephyr-141b-orpo.yaml}", "python -m zephyr_jax.train"):
        assert line in text, line
