"""The roofline reading of a compiled program (zephyr_jax/roofline.py): FLOPs and bytes per kernel,
loops counted their trip counts, slices and in-place updates counted as what they move."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from zephyr_jax import roofline

PEAK, BW = 1e12, 1e11


def test_a_scanned_matmul_counts_every_layer_and_only_the_slice_it_reads():
    """Compiled by XLA:CPU: a scan over L stacked [D, D] weights. The dots count L times; the
    kernel that takes layer i of the stack moves one [D, D] slice in and out, not the stack."""
    L, M, D = 6, 128, 256

    def f(ws, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    hlo = jax.jit(f).lower(jnp.ones((L, D, D)), jnp.ones((M, D))).compile().as_text()
    r = roofline.roofline(hlo, PEAK, BW)
    assert r["matmul"]["flops"] == L * 2 * M * D * D
    assert r["matmul"]["kernels"] == L
    ops = {t["op"]: t["seconds"] for t in r["top"]}
    slice_s = ops["fwd:jit(dynamic_index_in_dim)/dynamic_slice"]
    assert slice_s == pytest.approx(L * 2 * D * D * 4 / BW, rel=1e-3)  # whole stack: L x more
    assert r["seconds"] == pytest.approx(sum(r[k]["seconds"] for k in ("matmul", "memory", "custom")))
    assert r["matmul"]["seconds"] == pytest.approx(r["matmul"]["seconds_at_peak"])  # compute-bound
    assert "MFU at most" in roofline.summary(r, L * 2 * M * D * D)


# A GPU-compiled program's shapes of kernel, written out small: a loop of 4 trips holding a Triton
# GEMM fusion, a fusion that updates a stacked buffer in place, an asynchronous fusion, a Pallas
# grouped GEMM, a cuBLAS GEMM and an all-gather; the entry adds a copy.
_GPU_HLO = """\
HloModule step, is_scheduled=true

%gemm_body (p0: bf16[64,128], p1: bf16[128,256]) -> bf16[64,256] {
  %p0 = bf16[64,128]{1,0} parameter(0)
  %p1 = bf16[128,256]{1,0} parameter(1)
  ROOT %d = bf16[64,256]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%dus_body (q0: f32[4,64,256], q1: bf16[64,256], q2: s32[]) -> f32[4,64,256] {
  %q0 = f32[4,64,256]{2,1,0} parameter(0)
  %q1 = bf16[64,256]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %c = f32[64,256]{1,0} convert(%q1)
  %b = f32[1,64,256]{2,1,0} bitcast(%c)
  %z = s32[] constant(0)
  ROOT %u = f32[4,64,256]{2,1,0} dynamic-update-slice(%q0, %b, %q2, %z, %z)
}

%slice_body (r0: bf16[4,128,256], r1: s32[]) -> bf16[128,256] {
  %r0 = bf16[4,128,256]{2,1,0} parameter(0)
  %r1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %s = bf16[1,128,256]{2,1,0} dynamic-slice(%r0, %r1, %z, %z), dynamic_slice_sizes={1,128,256}
  ROOT %bc = bf16[128,256]{1,0} bitcast(%s)
}

%body (t: (s32[], bf16[64,128], bf16[4,128,256], f32[4,64,256])) -> (s32[], bf16[64,128], bf16[4,128,256], f32[4,64,256]) {
  %t = (s32[], bf16[64,128]{1,0}, bf16[4,128,256]{2,1,0}, f32[4,64,256]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = bf16[64,128]{1,0} get-tuple-element(%t), index=1
  %ws = bf16[4,128,256]{2,1,0} get-tuple-element(%t), index=2
  %acc = f32[4,64,256]{2,1,0} get-tuple-element(%t), index=3
  %fs = ((bf16[4,128,256]{2,1,0}, s32[]), bf16[128,256]{1,0}, u32[]) fusion-start(%ws, %i), kind=kLoop, calls=%slice_body, metadata={op_name="jit(step)/while/body/jit(dynamic_index_in_dim)/dynamic_slice"}
  %w = bf16[128,256]{1,0} fusion-done(%fs)
  %y = bf16[64,256]{1,0} fusion(%x, %w), kind=kCustom, calls=%gemm_body, metadata={op_name="jit(step)/while/body/bd,df->bf/dot_general"}
  %acc2 = f32[4,64,256]{2,1,0} fusion(%acc, %y, %i), kind=kLoop, calls=%dus_body, metadata={op_name="jit(step)/transpose(jvp())/while/body/dynamic_update_slice"}
  %g = bf16[64,256]{1,0} custom-call(%x, %ws), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/while/body/gmm/pallas_call"}
  ROOT %o = (s32[], bf16[64,128]{1,0}, bf16[4,128,256]{2,1,0}, f32[4,64,256]{2,1,0}) tuple(%i, %x, %ws, %acc2)
}

%cond (c: (s32[], bf16[64,128], bf16[4,128,256], f32[4,64,256])) -> pred[] {
  %c = (s32[], bf16[64,128]{1,0}, bf16[4,128,256]{2,1,0}, f32[4,64,256]{2,1,0}) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %four = s32[] constant(4)
  ROOT %lt = pred[] compare(%ci, %four), direction=LT
}

ENTRY %main (a: bf16[64,128], w: bf16[4,128,256], m: bf16[32,64], n: bf16[64,16]) -> f32[4,64,256] {
  %a = bf16[64,128]{1,0} parameter(0)
  %w = bf16[4,128,256]{2,1,0} parameter(1)
  %m = bf16[32,64]{1,0} parameter(2)
  %n = bf16[64,16]{1,0} parameter(3)
  %zero = s32[] constant(0)
  %init = f32[4,64,256]{2,1,0} constant({...})
  %t0 = (s32[], bf16[64,128]{1,0}, bf16[4,128,256]{2,1,0}, f32[4,64,256]{2,1,0}) tuple(%zero, %a, %w, %init)
  %loop = (s32[], bf16[64,128]{1,0}, bf16[4,128,256]{2,1,0}, f32[4,64,256]{2,1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %r = f32[4,64,256]{2,1,0} get-tuple-element(%loop), index=3
  %cb = (bf16[32,16]{1,0}, s8[1024]{0}) custom-call(%m, %n), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %ag = bf16[256,128]{1,0} all-gather(%a), dimensions={0}, replica_groups={{0,1,2,3}}
  ROOT %out = f32[4,64,256]{2,1,0} copy(%r)
}
"""


def test_gpu_kernels_flops_and_bytes():
    k = {t["op"]: t["seconds"] for t in roofline.roofline(_GPU_HLO, PEAK, BW, top=20)["top"]}
    r = roofline.roofline(_GPU_HLO, PEAK, BW)
    gemm_flops = 2 * 64 * 128 * 256
    grouped_flops = 2 * 64 * 128 * 256  # [64, 128] rows, each through one [128, 256] matrix
    cublas_flops = 2 * 32 * 16 * 64
    assert r["matmul"]["flops"] == 4 * (gemm_flops + grouped_flops) + cublas_flops
    assert r["matmul"]["kernels"] == 4 * 2 + 1
    # the asynchronous slice: one [128, 256] bf16 layer in and out per trip (and its s32 index),
    # not the stack
    assert k["fwd:jit(dynamic_index_in_dim)/dynamic_slice"] == pytest.approx(
        4 * (2 * 128 * 256 * 2 + 4) / BW, rel=1e-9)
    # the in-place update: reads the bf16 [64, 256] input (and the index), writes its f32 row of
    # the buffer
    assert k["bwd:dynamic_update_slice"] == pytest.approx(
        4 * (64 * 256 * 2 + 4 + 64 * 256 * 4) / BW, rel=1e-9)
    # the copy moves its f32 [4, 64, 256] in and out, once (it is outside the loop)
    assert k["copy"] == pytest.approx(2 * 4 * 64 * 256 * 4 / BW, rel=1e-9)
    # the all-gather is the interconnect's: counted apart, not in the device-memory time
    assert r["collective"] == {"count": 1, "bytes": 256 * 128 * 2}
    assert r["kernels"] == 4 * 4 + 2
    assert r["custom"]["kernels"] == 0  # the Pallas call's FLOPs were read from its shapes


def test_a_custom_kernel_of_unknown_shape_counts_its_bytes_only():
    hlo = _GPU_HLO.replace("custom-call(%x, %ws)", "custom-call(%x, %x)")
    r = roofline.roofline(hlo, PEAK, BW)
    assert r["custom"]["kernels"] == 4 and r["custom"]["flops"] == 0
    assert r["custom"]["bytes"] == 4 * (2 * 64 * 128 * 2 + 64 * 256 * 2)
