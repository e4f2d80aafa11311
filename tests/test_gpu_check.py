"""docs/gpu_check.sh, the one prepared GPU run, smoke-tested on CPU so it cannot rot unnoticed:
a GPU session is 15 minutes, and a script that fails there on a renamed flag wastes it."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("tokens_per_s", "mfu", "reference_tokens_per_s", "ratio", "device", "jax", "jaxlib",
            "torch", "transformers", "config", "batch_pairs", "seq_len", "moe_impl")


STEP_NAMES = ("gemm", "step", "unrolled", "attention", "tokamax_tiles", "remat", "loss_chunk")


def _run_gpu_check(out: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PLATFORM": "cpu", "CONFIG": "tiny",
           "STEP_IMPLS": "auto,dense",
           "UNROLLED_IMPLS": "auto",
           "ATTENTION": "xla", "BENCH_ARGS": "--batch-pairs 1 --seq-len 16 --steps 1 --warmup 0",
           **extra}
    env.pop("XLA_FLAGS", None)
    if "STEPS" not in extra:  # an exported STEPS would select steps here
        env.pop("STEPS", None)
    return subprocess.run(["bash", "docs/gpu_check.sh", "run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_gpu_check_gemm_and_step_write_the_issue_json(tmp_path):
    """The default run's part (~50 s): the two steps that are the bench CLI's acceptance tests,
    `--gemm` and the step `--reference hf` with a list, selected by STEPS; the whole script runs in
    the slow test below (~2-3 min: seven bench processes)."""
    proc = _run_gpu_check(tmp_path, STEPS="gemm,step")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "gpu_check.log").read_text()
    for name in ("gemm", "step"):
        assert f"== {name}: exit 0" in log, log[-3000:]
    for name in set(STEP_NAMES) - {"gemm", "step"}:
        assert f"== {name}: not in STEPS=gemm,step" in log, log[-3000:]
        assert not (tmp_path / f"{name}.json").exists()
    _check_gemm(tmp_path)
    _assert_same_step0(_check_step(tmp_path)["variants"])


def test_gpu_check_steps_selects_by_name_with_commas_or_spaces(tmp_path):
    """BUDGET_S=0: every selected step is reached and skipped for time (no bench runs), every other
    one is reported as not selected."""
    proc = _run_gpu_check(tmp_path, STEPS="unrolled, remat", BUDGET_S="0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "gpu_check.log").read_text()
    for name in STEP_NAMES:
        chosen = name in ("unrolled", "remat")
        assert (f"== {name}: skipped," in log) == chosen, (name, log[-3000:])
        assert (f"== {name}: not in STEPS=" in log) != chosen, (name, log[-3000:])


@pytest.mark.parametrize(("steps", "message"), [
    ("step,remats", "STEPS names 'remats', which is not a step"),
    (",", "STEPS=',' names no step"),
])
def test_gpu_check_refuses_steps_naming_no_step(tmp_path, steps, message):
    proc = _run_gpu_check(tmp_path, STEPS=steps)
    assert proc.returncode == 2
    assert message in proc.stderr and "steps: gemm step unrolled" in proc.stderr, proc.stderr
    assert not (tmp_path / "gpu_check.log").exists()  # refused before running anything


def test_a_step_not_on_the_gpu_stops_at_once(tmp_path):
    """On the GPU machine a jax that fell back to the CPU (its CUDA plugin failed to start) used
    to time the bench model on the host until the step's cap: now the bench stops at once."""
    proc = _run_gpu_check(tmp_path, STEPS="step", PLATFORM="gpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # the script goes on
    log = (tmp_path / "gpu_check.log").read_text()
    assert "bench --require-platform gpu: jax runs on cpu" in log, log[-3000:]
    assert "== step: exit 1" in log and "[bench] reference" not in log, log[-3000:]


@pytest.mark.slow
def test_gpu_check_runs_every_step_and_writes_json(tmp_path):
    """Every step of the script, as a GPU session runs it."""
    proc = _run_gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "gpu_check.log").read_text()
    for name in STEP_NAMES:
        assert f"== {name}: exit 0" in log, log[-3000:]
    _check_gemm(tmp_path)
    # no tokamax on this Python: the tile step keeps only its same-run dense baseline
    tiles = json.loads((tmp_path / "tokamax_tiles.json").read_text())
    assert [r["op"] for r in tiles["gemm"]] == ["dense_matmul_same_flops"]
    step = _check_step(tmp_path)
    # --remat as a list: one variant per policy, each with its own compiled-memory estimate
    remat = json.loads((tmp_path / "remat.json").read_text())
    assert [v["remat"] for v in remat["variants"]] == ["save_matmuls", "save_attention"]
    assert all(v["compiled_memory_bytes"] > 0 for v in remat["variants"])
    att = json.loads((tmp_path / "attention.json").read_text())
    assert [v["attention_impl"] for v in att["variants"]] == ["xla", "dot_product_attention"]
    chunk = json.loads((tmp_path / "loss_chunk.json").read_text())
    assert (step["loss_chunk_size"], chunk["loss_chunk_size"]) == (512, 2048)
    # the cross-check the GPU run relies on: same weights and batch, same step-0 numbers (remat
    # and the loss's chunking change what is stored, not what is computed; at 16 positions both
    # loss runs are one chunk, so this checks the flag's wiring: tests/test_orpo.py checks
    # chunked log-probs against unchunked ones)
    unrolled = json.loads((tmp_path / "unrolled.json").read_text())
    assert [(v["moe_impl"], v["scan_layers"]) for v in unrolled["variants"]] == [("auto", False)]
    assert all(v["scan_layers"] is True for v in step["variants"])
    _assert_same_step0(step["variants"] + att["variants"] + remat["variants"] + chunk["variants"]
                       + unrolled["variants"])


def _assert_same_step0(variants: list[dict]) -> None:
    for key in ("loss_step0", "grad_norm_step0"):
        values = [v[key] for v in variants]
        assert max(values) - min(values) <= 1e-5 * max(abs(x) for x in values), (key, values)


def _check_gemm(tmp_path: Path) -> None:
    # the gemm step is `python -m zephyr_jax.bench --gemm` (the CLI's --gemm acceptance test)
    rows = {r["op"]: r for r in json.loads((tmp_path / "gemm.json").read_text())["gemm"]}
    timed = ("dense_matmul_same_flops", "batched_einsum_capacity", "ragged_dot", "scan_gmm[bm=128]",
             "scan_gmm[bm=256]")
    assert set(rows) >= {*timed, "ragged_dot_skewed", "scan_gmm_skewed"}
    assert not any(op.startswith("pallas") for op in rows)  # interpret mode is not timed
    for op in timed:
        assert rows[op]["fwd_tflops"] > 0 and rows[op]["bwd_tflops"] > 0, rows[op]
    for op in ("scan_gmm[bm=128]", "scan_gmm[bm=256]"):  # kernels: dx and dw also timed apart
        assert rows[op]["dx_tflops"] > 0 and rows[op]["dw_tflops"] > 0, rows[op]
    assert "dx_tflops" not in rows["ragged_dot"]
    # the expert-parallel receive buffer's row: a quarter routed, its rate counted on those rows
    quarter = rows["scan_gmm_quarter_routed"]
    assert quarter["useful_fraction"] == 0.25 and quarter["bwd_tflops"] > 0, quarter
    assert all(v <= 1e-5 for k, v in quarter.items() if k.endswith("_vs_ragged_dot")), quarter
    assert "useful_fraction" not in rows["scan_gmm[bm=256]"]


def _check_step(tmp_path: Path) -> dict:
    # the step: `python -m zephyr_jax.bench --reference hf` with a list of implementations, whose
    # last line is the issue's JSON
    step = json.loads((tmp_path / "step.json").read_text())
    assert set(REQUIRED) <= set(step)
    for key in ("tokens_per_s", "mfu", "reference_tokens_per_s", "ratio"):
        assert isinstance(step[key], float) and math.isfinite(step[key]) and step[key] > 0, key
    assert step["ratio"] == pytest.approx(step["tokens_per_s"] / step["reference_tokens_per_s"])
    assert step["config"] == "tiny" and step["moe_impl"] == "auto"
    assert step["moe_impl_resolved"] == "scan"  # the CPU's choice
    assert (step["batch_pairs"], step["seq_len"], step["tokens_per_step"]) == (1, 16, 32)
    assert all(step[k] for k in ("jax", "jaxlib", "torch", "transformers", "device"))
    assert step["peak_memory_bytes"] > 0 and step["reference_peak_memory_bytes"] > 0
    # what the ratio is against: on a CPU the reference runs eager by design, not as a fallback
    assert (step["reference_compiled"], step["reference_fallback"]) == (False, False)
    assert "partial" not in step  # the whole result, not a partial line
    # every implementation listed is timed against the one reference
    assert [v["moe_impl"] for v in step["variants"]] == ["auto", "dense"]
    for v in step["variants"]:
        assert v["tokens_per_s"] > 0
        assert v["ratio"] == pytest.approx(v["tokens_per_s"] / step["reference_tokens_per_s"])
    return step
