"""Compiling for an H100 without one (`python -m zephyr_jax.gpu_aot`): XLA's GPU compiler, with
Triton's verifier and code generation for our Pallas kernels, tokamax's Mosaic kernels and cuDNN's
attention call, where lowering alone (tests/test_gpu_lowering.py) stops short.

Needs jax's CUDA plugin and NVIDIA's libraries (`scripts/check_gpu_stack.sh` installs them beside
jax 0.11.2); CI has neither and checks only that the tool says so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from zephyr_jax.config import MixtralConfig
from zephyr_jax.gpu_aot import cuda_plugin_installed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA_PLUGIN = cuda_plugin_installed()
needs_plugin = pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs jax's CUDA plugin")


def _gpu_aot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zephyr_jax.gpu_aot", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def test_largest_array_reads_hlo_types():
    from zephyr_jax.gpu_aot import largest_array

    hlo = ("%p = bf16[8,2048]{1,0} parameter(0)\n"
           "%f = f32[16384,32000]{1,0} fusion(bf16[8,2048]{1,0} %p), kind=kLoop\n"
           "%s = (s32[], pred[4,4]) tuple()")
    assert largest_array(hlo) == ("f32[16384,32000]", 16384 * 32000 * 4)
    assert largest_array("%c = s32[] constant(0)") == ("s32[]", 4)


@pytest.mark.parametrize("flag, env, shown", [
    (["--mem-fraction", "1.5"], {}, "--mem-fraction must be a fraction in (0, 1], got 1.5"),
    ([], {"XLA_CLIENT_MEM_FRACTION": "most"}, "XLA_CLIENT_MEM_FRACTION must be a fraction"),
    (["--loss-chunk-size", "0"], {}, "gpu_aot: --loss-chunk-size must be >= 1, got 0"),
    (["--scan-layers", "maybe"], {}, "gpu_aot: --scan-layers must be true, false or true,false, "
                                     "got 'maybe'"),
])
def test_a_bad_memory_fraction_or_chunk_size_is_named(flag, env, shown):
    proc = subprocess.run([sys.executable, "-m", "zephyr_jax.gpu_aot", *flag], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert proc.returncode != 0 and shown in proc.stderr, proc.stderr[-2000:]


@pytest.mark.skipif(HAS_CUDA_PLUGIN, reason="jax's CUDA plugin is installed here")
def test_without_the_cuda_plugin_it_says_what_is_missing():
    proc = _gpu_aot("--moe-impl", "dense")
    assert proc.returncode != 0
    assert 'pip install "jax[cuda13]"' in proc.stderr + proc.stdout


@needs_plugin
def test_every_kernel_tile_candidate_compiles_for_h100():
    """Forward, dx and dw of each Pallas tile candidate `bench --gemm` times (and the dispatch's
    `PALLAS_TILES`), and of each tokamax block config where tokamax is installed, compiled for
    sm_90 on the bench's up-projection (32,768 rows, 2048 -> 5632, 8 experts): Triton's verifier
    and its shared-memory check (227 KiB) both run here. They caught a loop bound typed i1 and two
    candidates whose dx kernel needed 240-290 KiB in 3 stages."""
    code = """
import json, jax, jax.numpy as jnp
jax.config.update("jax_platforms", "cpu")
from jax.sharding import NamedSharding, PartitionSpec
from zephyr_jax import bench, gpu_aot
from zephyr_jax.kernels import gmm
from zephyr_jax.model import dispatch
gpu_aot.pretend()
mesh = gpu_aot.topology_mesh(gpu_aot.TARGETS["h100"])
on_gpu = NamedSharding(mesh, PartitionSpec())
x = jax.ShapeDtypeStruct((32768, 2048), jnp.bfloat16, sharding=on_gpu)
w = jax.ShapeDtypeStruct((8, 2048, 5632), jnp.bfloat16, sharding=on_gpu)
sizes = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=on_gpu)
cases = {"PALLAS_TILES": lambda x, w, s: gmm(x, w, s, interpret=False, **dispatch.PALLAS_TILES)}
for bm, bk, bn, nw, ns in bench.GMM_TILES:
    for l2 in (True, False):
        cases[f"gmm{(bm, bk, bn, nw, ns, l2)}"] = (
            lambda x, w, s, t=(bm, bk, bn, nw, ns, l2): gmm(
                x, w, s, bm=t[0], bk=t[1], bn=t[2], num_warps=t[3], num_stages=t[4],
                l2_order=t[5], interpret=False))
if dispatch.tokamax_available():
    for t in (None, *bench.TOKAMAX_TILES):
        cases[f"tokamax[{t and bench._tile_name(t)}]"] = dispatch.tokamax_matmul(t, t, t)
failed = {}
for name, matmul in cases.items():
    def fwd_bwd(x, w, s, matmul=matmul):
        y, vjp = jax.vjp(lambda x, w: matmul(x, w, s), x, w)
        return vjp(y)
    try:
        jax.jit(fwd_bwd).trace(x, w, sizes).lower().compile()
    except Exception as e:
        failed[name] = str(e)[:300]
print("RESULT " + json.dumps({"cases": sorted(cases), "failed": failed}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert len(result["cases"]) >= 13 and result["failed"] == {}, result["failed"]


@needs_plugin
def test_bench_step_compiles_for_h100_with_each_gpu_kernel(tmp_path):
    """The bench's train step with our Pallas kernels and, where tokamax is installed, tokamax's
    (cuDNN attention both), compiled for an H100: XLA's memory plan comes back per variant."""
    impls = "pallas,tokamax" if importlib.util.find_spec("tokamax") else "pallas"
    proc = _gpu_aot("--target", "h100", "--moe-impl", impls, "--remat", "save_matmuls",
                    "--dump-hlo", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["target"] == "NVIDIA H100 80GB HBM3" and result["mem_fraction"] == 0.75
    for row in result["variants"]:
        assert row["attention_impl"] == "cudnn"
        # the donated state (bf16 parameters and Adam moments, ~13.6 GiB) is read and written
        # in place; the step's activations come on top
        assert row["alias_bytes"] > 0.99 * row["output_bytes"]
        assert row["total_bytes"] > row["argument_bytes"] > 13 * 2**30
        # the roofline reading finds every GEMM of the real program, the grouped ones (Pallas'
        # Triton calls, tokamax's Mosaic GPU calls) and cuDNN's attention included: the FLOPs
        # it counts are the model's (6 x active parameters x tokens + attention) to within what
        # the analytic count leaves out, and no kernel is left with unknown FLOPs
        bound = row["roofline"]
        assert 0.98 <= bound["matmul"]["flops"] / bound["model_flops"] <= 1.1, bound
        assert bound["custom"]["kernels"] == 0, bound["top"]
        assert bound["memory"]["seconds"] > 0 and 0 < bound["mfu_bound"] < 1, bound
    # no [sequences, T, vocab] array anywhere in the compiled programs, not even in bf16: the
    # loss runs the LM head over 512-token chunks (issue 7: log-probs without a float32
    # [B, T, vocab] copy), as XLA's GPU compiler builds it
    from zephyr_jax.gpu_aot import hlo_arrays

    tokens = 2 * result["batch_pairs"] * result["seq_len"]
    for impl in impls.split(","):
        arrays = hlo_arrays((tmp_path / f"{impl}_save_matmuls.hlo.txt").read_text())
        vocab = {t: n for t, n in arrays.items() if ",32000]" in t or "[32000," in t}
        assert vocab and max(vocab.values()) < tokens * 32000 * 2, sorted(vocab)
        # no scatter over activations (the token permutations' backward passes are gathers; a
        # bf16 scatter-add is one scalar atomic per element) and no float scatter in bf16 (the
        # embedding's gradient is summed in float32); the router's [tokens, experts] remains
        hlo = (tmp_path / f"{impl}_save_matmuls.hlo.txt").read_text()
        scatters = re.findall(r"= (\w+)\[([\d,]*)\]\S* scatter\(", hlo)
        floats = [(t, dims) for t, dims in scatters if t in ("bf16", "f16", "f32")]
        assert floats and all(t == "f32" for t, _ in floats), floats
        D = MixtralConfig.preset("bench").hidden_size
        assert not [f for f in floats if f[1] in (f"{tokens},{D}", f"{2 * tokens},{D}")], floats
        # every matmul over the vocabulary (the LM head's forward, recompute and both backward
        # GEMMs) multiplies bf16 operands: XLA's GEMM fusions convert nothing to float32
        vocab_dots = _vocab_dot_operands(hlo)
        assert len(vocab_dots) >= 4 and all(ops == ("bf16", "bf16") for ops in vocab_dots), vocab_dots


def _vocab_dot_operands(hlo: str) -> list[tuple[str, str]]:
    """Operand dtypes of the `dot`s in the compiled program's GEMM fusions over the vocabulary."""
    found = []
    for head, body in re.findall(r"\n(%gemm_fusion\S* \([^)]*\) -> \S+) \{(.*?)\n\}", hlo, re.S):
        if "32000" not in head:
            continue
        types = dict(re.findall(r"%(\S+) = (\w+)\[", body))
        found += [(types.get(a), types.get(b)) for a, b in re.findall(r" dot\(%([^,]+), %([^)]+)\)", body)]
    return found


def _plan(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "zephyr_jax.plan", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


TINY_PLAN = ("configs/demo.yaml", "--mesh", "2x4", "--model_preset", "tiny", "--max_length", "64",
             "--max_prompt_length", "32", "--max_steps", "10", "--per_device_train_batch_size", "2")


def test_plan_for_gpus_refuses_the_cpu_only_flag():
    proc = _plan(*TINY_PLAN, "--target", "h100", "--without_cpu_hoisting")
    assert proc.returncode == 2 and "--without_cpu_hoisting" in proc.stderr


@needs_plugin
def test_plan_compiles_the_trainer_step_for_8_h100s():
    """`python -m zephyr_jax.plan --target h100`: the trainer's sharded step compiled by XLA's GPU
    compiler for 8 compile-only H100s (one host), with the same per-device split of the state
    as the CPU plan (tests/test_plan.py)."""
    from zephyr_jax.config import MixtralConfig

    proc = _plan(*TINY_PLAN, "--target", "h100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == 8 and r["compiled_for"].startswith("8 x NVIDIA H100")
    assert "XLA:GPU buffer assignment" in proc.stdout
    total_param_bytes = MixtralConfig.preset("tiny").num_params * 4  # float32
    b = r["per_device_bytes"]
    # every weight splits 8 ways on (data, expert); the norms (under 1 KiB) are replicated
    assert total_param_bytes / 8 <= b["params"] <= total_param_bytes / 8 + 1024
    assert b["total"] == b["argument"] + b["output"] - b["alias"] + b["temp"] > b["params"]
