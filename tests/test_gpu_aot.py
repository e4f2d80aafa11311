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
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins") is not None and any(
    importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))
needs_plugin = pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs jax's CUDA plugin")


def _gpu_aot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zephyr_jax.gpu_aot", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(HAS_CUDA_PLUGIN, reason="jax's CUDA plugin is installed here")
def test_without_the_cuda_plugin_it_says_what_is_missing():
    proc = _gpu_aot("--moe-impl", "dense")
    assert proc.returncode != 0
    assert 'pip install "jax[cuda13]"' in proc.stderr + proc.stdout


@needs_plugin
def test_pallas_kernels_compile_for_h100():
    """Forward, dx and dw of our Pallas kernel through XLA's Triton pipeline for sm_90 (a select
    of two literals once lowered to an i1 loop bound that Triton's verifier rejected)."""
    code = """
import jax, jax.numpy as jnp
jax.config.update("jax_platforms", "cpu")
from jax.sharding import NamedSharding, PartitionSpec
from zephyr_jax import gpu_aot
from zephyr_jax.kernels import gmm
gpu_aot.pretend()
mesh, _ = gpu_aot.topology_mesh(gpu_aot.TARGETS["h100"])
on_gpu = NamedSharding(mesh, PartitionSpec())
x = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=on_gpu)
w = jax.ShapeDtypeStruct((4, 256, 384), jnp.bfloat16, sharding=on_gpu)
sizes = jax.ShapeDtypeStruct((4,), jnp.int32, sharding=on_gpu)
def fwd_bwd(x, w, sizes):
    y, vjp = jax.vjp(lambda x, w: gmm(x, w, sizes, interpret=False), x, w)
    return y, vjp(y)
text = jax.jit(fwd_bwd).trace(x, w, sizes).lower().compile().as_text()
print("TRITON_FUSIONS", text.count("__triton"))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRITON_FUSIONS" in proc.stdout


@needs_plugin
def test_bench_step_compiles_for_h100_with_each_gpu_kernel():
    """The bench's train step with our Pallas kernels and, where tokamax is installed, tokamax's
    (cuDNN attention both), compiled for an H100: XLA's memory plan comes back per variant."""
    impls = "pallas,tokamax" if importlib.util.find_spec("tokamax") else "pallas"
    proc = _gpu_aot("--target", "h100", "--moe-impl", impls, "--remat", "save_matmuls")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["target"] == "NVIDIA H100 80GB HBM3" and result["mem_fraction"] == 0.75
    for row in result["variants"]:
        assert row["attention_impl"] == "cudnn"
        # the donated state (bf16 parameters and Adam moments, ~13.6 GiB) is read and written
        # in place; the step's activations come on top
        assert row["alias_bytes"] > 0.99 * row["output_bytes"]
        assert row["total_bytes"] > row["argument_bytes"] > 13 * 2**30
