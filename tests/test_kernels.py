"""The grouped GEMMs (zephyr_jax.kernels) against `jax.lax.ragged_dot`: forward and VJP.

The Pallas kernels run in Pallas' interpret mode here (no GPU); their Triton lowering for CUDA is
checked without a GPU. `scan_gmm` is the CPU path and runs natively.
"""

from __future__ import annotations

import numpy as np
import pytest

# ---------------------------------------------------------------------------------------------
# Shared cases: (M, K, N, group sizes, Pallas blocks)

GMM_CASES = {
    # name: (M, K, N, group sizes, blocks); rows past sum(sizes) must come out zero
    "uneven_with_empty_group": (64, 32, 48, [10, 0, 30, 24], dict(bm=16, bk=16, bn=16)),
    "rows_past_the_groups": (64, 32, 48, [10, 0, 30, 14], dict(bm=16, bk=16, bn=16)),
    "padded_to_blocks": (50, 20, 40, [7, 13, 0, 25], dict(bm=16, bk=16, bn=32)),
    "one_group": (128, 64, 64, [128], dict(bm=32, bk=16, bn=32)),
    "no_rows": (32, 32, 32, [0, 0, 0], dict(bm=16, bk=16, bn=16)),
}


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _kernel(name, blocks):
    from zephyr_jax.kernels import gmm, scan_gmm

    if name == "pallas":
        return lambda x, w, s: gmm(x, w, s, interpret=True, **blocks)
    return lambda x, w, s: scan_gmm(x, w, s, bm=blocks["bm"])  # the same row tiles


@pytest.mark.parametrize("kernel", ["pallas", "scan"])
@pytest.mark.parametrize("case", sorted(GMM_CASES))
def test_grouped_gemm_equals_ragged_dot_forward_and_grads(case, kernel):
    import jax
    import jax.numpy as jnp

    M, K, N, sizes, blocks = GMM_CASES[case]
    fn = _kernel(kernel, blocks)
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (M, K), jnp.float32)
    w = jax.random.normal(kw, (len(sizes), K, N), jnp.float32)
    dy = jax.random.normal(kd, (M, N), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    y, vjp = jax.vjp(lambda x, w: fn(x, w, group_sizes), x, w)
    y_ref, vjp_ref = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, group_sizes), x, w)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    if sum(sizes) == 0:
        assert not np.any(y) and not any(np.any(g) for g in vjp(dy))
        return
    assert not np.any(y[sum(sizes):])
    assert _rel_err(y, y_ref) <= 1e-5
    got, want = vjp(dy), vjp_ref(dy)
    assert not np.any(got[0][sum(sizes):])  # rows of no group get no gradient
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype and _rel_err(g, r) <= 1e-5


def test_pallas_gmm_work_items_cover_each_row_once():
    import jax.numpy as jnp

    from zephyr_jax.kernels.grouped_gemm import group_bounds, work_items

    M, bm = 96, 16
    for sizes in ([96, 0, 0], [5, 0, 40, 17], [0, 0, 0], [16, 16, 16, 16, 16, 16], [1] * 7):
        starts, ends = group_bounds(jnp.asarray(sizes, jnp.int32), M)
        group, tile = work_items(starts, ends, M, bm)
        assert group.shape == (M // bm + len(sizes),)
        covered = np.zeros(M, int)
        for g, t in zip(np.asarray(group), np.asarray(tile), strict=True):
            rows = np.arange(t * bm, (t + 1) * bm)
            covered[rows[(rows >= starts[g]) & (rows < ends[g])]] += 1
        assert (covered == 1).all(), sizes


@pytest.mark.parametrize("l2_order", [True, False])
def test_pallas_gmm_lowers_through_triton_for_cuda(triton_target, l2_order):
    """No GPU needed: Pallas' Triton lowering (where unsupported ops fail) of forward and VJP,
    in both launch orders."""
    import re

    import jax
    import jax.numpy as jnp

    from zephyr_jax.kernels import gmm

    x = jnp.zeros((512, 256), jnp.bfloat16)
    w = jnp.zeros((4, 256, 384), jnp.bfloat16)
    sizes = jnp.asarray([100, 0, 300, 112], jnp.int32)

    def fwd_bwd(x, w):
        y, vjp = jax.vjp(lambda x, w: gmm(x, w, sizes, l2_order=l2_order, interpret=False), x, w)
        return y, vjp(y)

    text = jax.jit(fwd_bwd).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 3


# ---------------------------------------------------------------------------------------------
# scan_gmm beyond the shared cases: bf16 and odd tiles


@pytest.mark.parametrize("bm", [8, 16, 64, 256])
def test_scan_gmm_any_row_tile_and_jit(bm):
    """Tiles smaller than, equal to and larger than the groups (M shrinks bm for small inputs);
    under jit with traced group sizes, as the MoE dispatch calls it."""
    import jax
    import jax.numpy as jnp

    from zephyr_jax.kernels import scan_gmm

    M, K, N = 37, 12, 20
    sizes = jnp.asarray([3, 17, 0, 9, 8], jnp.int32)
    x = jax.random.normal(jax.random.key(2), (M, K))
    w = jax.random.normal(jax.random.key(3), (5, K, N))

    def loss(f, x, w, s):
        return jnp.sum(jnp.sin(f(x, w, s)))

    got = jax.jit(jax.value_and_grad(lambda x, w, s: loss(lambda *a: scan_gmm(*a, bm=bm), x, w, s),
                                     argnums=(0, 1)))(x, w, sizes)
    want = jax.value_and_grad(lambda x, w, s: loss(jax.lax.ragged_dot, x, w, s),
                              argnums=(0, 1))(x, w, sizes)
    assert _rel_err(got[0], want[0]) <= 1e-5
    for g, r in zip(got[1], want[1], strict=True):
        assert _rel_err(g, r) <= 1e-5


def test_scan_gmm_on_cpu_multiplies_only_the_tiles_of_routed_rows(monkeypatch):
    """An expert-parallel receive buffer is mostly rows past the groups (3/4 on 4 x 8); on CPU
    scan_gmm's loops stop after the last group's tiles: 16 routed rows of 64 in 16-row tiles
    are 2 work items (the tile two groups share, once per group), so 2 matmuls forward and 2 + 2
    backward (dx, dw), where a loop over every item (6: 4 tiles + one spare per group) runs 6 and
    12. Counted as they execute, and the values still those of ragged_dot."""
    import jax
    import jax.numpy as jnp

    from zephyr_jax.kernels import scan_gmm

    runs = []
    einsum = jnp.einsum

    def counting_einsum(*args, **kwargs):
        jax.debug.callback(lambda: runs.append(1))
        return einsum(*args, **kwargs)

    monkeypatch.setattr(jnp, "einsum", counting_einsum)
    sizes = jnp.asarray([10, 6], jnp.int32)
    x = jax.random.normal(jax.random.key(2), (64, 8))
    w = jax.random.normal(jax.random.key(3), (2, 8, 16))
    y = jax.block_until_ready(jax.jit(lambda x, w: scan_gmm(x, w, sizes, bm=16))(x, w))
    assert len(runs) == 2, len(runs)
    assert _rel_err(y, jax.lax.ragged_dot(x, w, sizes)) <= 1e-6
    runs.clear()
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(scan_gmm(x, w, sizes, bm=16))),
                             argnums=(0, 1)))(x, w)
    jax.block_until_ready(grads)
    assert len(runs) == 2 + 2 + 2, len(runs)  # forward again (residual), dx, dw


def test_scan_gmm_bfloat16_accumulates_in_float32():
    import jax
    import jax.numpy as jnp

    from zephyr_jax.kernels import scan_gmm

    M, K, N = 64, 256, 32
    sizes = jnp.asarray([20, 44], jnp.int32)
    x = jax.random.normal(jax.random.key(4), (M, K)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(5), (2, K, N)).astype(jnp.bfloat16)
    y = scan_gmm(x, w, sizes, bm=16)
    exact = jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), sizes)
    assert y.dtype == jnp.bfloat16
    # one bf16 rounding of a float32-accumulated sum (bf16 eps 2^-8), not 256 of them
    assert _rel_err(y, exact) <= 2**-8
    dx, dw = jax.grad(lambda x, w: jnp.sum(scan_gmm(x, w, sizes, bm=16).astype(jnp.float32)),
                      argnums=(0, 1))(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    dw_exact = jax.grad(lambda w: jnp.sum(jax.lax.ragged_dot(x.astype(jnp.float32), w, sizes)))(
        w.astype(jnp.float32))
    assert _rel_err(dw, dw_exact) <= 2**-8


@pytest.mark.parametrize("kernel", ["pallas", "scan"])
def test_grouped_gemm_rejects_mismatched_operands(kernel):
    """A group count that does not match the weights would misassign rows silently: refused,
    with the shapes named; so are a K mismatch and float group sizes."""
    import jax.numpy as jnp

    fn = _kernel(kernel, dict(bm=16, bk=16, bn=16))
    x, w = jnp.zeros((32, 16)), jnp.zeros((3, 16, 16))
    with pytest.raises(ValueError, match=r"group_sizes \(2,\).*one per group of w \(3, 16, 16\)"):
        fn(x, w, jnp.asarray([16, 16], jnp.int32))
    with pytest.raises(ValueError, match=r"group_sizes \(3,\) float32 must be integers"):
        fn(x, w, jnp.asarray([16.0, 16.0, 0.0]))
    with pytest.raises(ValueError, match=r"x \(32, 8\) must be \[M, K\].*same K"):
        fn(jnp.zeros((32, 8)), w, jnp.asarray([16, 16, 0], jnp.int32))


def test_scan_gmm_rejects_a_bad_tile():
    import jax.numpy as jnp

    from zephyr_jax.kernels import scan_gmm

    with pytest.raises(ValueError, match="bm .* positive integer, got 0"):
        scan_gmm(jnp.zeros((8, 4)), jnp.zeros((1, 4, 4)), jnp.asarray([8], jnp.int32), bm=0)


@pytest.mark.parametrize("l2_order", [True, False])
@pytest.mark.parametrize("case", ["uneven_with_empty_group", "padded_to_blocks"])
def test_pallas_gmm_dw_tiles_and_launch_order(case, l2_order):
    """The dw kernel takes its own (rows, K, N) blocks: padding fits both kernels' blocks; either
    launch order (which program runs which block) gives ragged_dot's output and gradients."""
    import jax
    import jax.numpy as jnp

    from zephyr_jax.kernels import gmm

    M, K, N, sizes, _ = GMM_CASES[case]
    kx, kw, kd = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (M, K), jnp.float32)
    w = jax.random.normal(kw, (len(sizes), K, N), jnp.float32)
    dy = jax.random.normal(kd, (M, N), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    fn = lambda x, w: gmm(x, w, group_sizes, bm=16, bk=16, bn=16, dw_tiles=(32, 16, 64),  # noqa: E731
                          l2_order=l2_order, interpret=True)
    y, vjp = jax.vjp(fn, x, w)
    y_ref, vjp_ref = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, group_sizes), x, w)
    assert _rel_err(y, y_ref) <= 1e-5
    for g, r in zip(vjp(dy), vjp_ref(dy), strict=True):
        assert g.shape == r.shape and _rel_err(g, r) <= 1e-5


def test_pallas_gmm_rejects_blocks_that_are_not_powers_of_two():
    import jax.numpy as jnp

    from zephyr_jax.kernels import gmm

    x, w, sizes = jnp.zeros((32, 16)), jnp.zeros((1, 16, 16)), jnp.asarray([32], jnp.int32)
    with pytest.raises(ValueError, match=r"block bm=96 must be a power of two >= 16"):
        gmm(x, w, sizes, bm=96, interpret=True)
    with pytest.raises(ValueError, match=r"block dw_tiles\[2\]=8 must be a power of two >= 16"):
        gmm(x, w, sizes, dw_tiles=(16, 16, 8), interpret=True)


def _fake_tokamax(monkeypatch):
    """A stand-in for tokamax 0.0.17 (not installable on Python 3.11; tests/test_tokamax.py runs
    the real one where it is) with the modules, names and call signatures `tokamax_gmm` uses; its
    op is `jax.lax.ragged_dot_general` and records its config and dimension numbers, so the wiring
    (not tokamax's kernels) is what is checked here."""
    import dataclasses
    import enum
    import sys
    import types

    import jax
    import jax.numpy as jnp

    calls = []

    class MatmulDimension(enum.IntEnum):
        M = 0
        N = 1

    @dataclasses.dataclass(frozen=True)
    class Config:
        block_m: int
        block_n: int
        block_k: int
        num_stages: int
        split_k: int
        persistent: bool = True
        grid_minor_dim: MatmulDimension = MatmulDimension.N
        grid_tile_width: int = 1

    def dims(contract, ragged, group):
        return jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(contract, ([], [])), lhs_ragged_dimensions=ragged,
            rhs_group_dimensions=group)

    base = types.SimpleNamespace(
        DEFAULT_RAGGED_DOT_DIM_NUMS=dims(([1], [1]), [0], [0]),
        TRANS_RHS_RAGGED_DOT_DIM_NUMS=dims(([1], [2]), [0], [0]),
        RAGGED_CONTRACTING_DOT_DIM_NUMS=dims(([0], [0]), [0], []))

    @dataclasses.dataclass(frozen=True)
    class PallasMosaicGpuRaggedDot:
        config: Config | None = None
        bypass_device_check: bool = False

        def __call__(self, lhs, rhs, *, group_sizes, ragged_dot_dimension_numbers,
                     preferred_element_type=None, manual_axis_type=None):
            calls.append((self, ragged_dot_dimension_numbers))
            out = jax.lax.ragged_dot_general(lhs, rhs, group_sizes, ragged_dot_dimension_numbers,
                                             preferred_element_type=preferred_element_type)
            if ragged_dot_dimension_numbers.rhs_group_dimensions:  # rows out: as tokamax leaves
                past_M = jnp.arange(out.shape[0]) >= jnp.sum(group_sizes)  # them, not zero
                out = jnp.where(past_M[:, None], 1.0, out).astype(out.dtype)
            return out

    mods = {
        "tokamax": types.ModuleType("tokamax"),
        "tokamax._src": types.ModuleType("tokamax._src"),
        "tokamax._src.ops": types.ModuleType("tokamax._src.ops"),
        "tokamax._src.ops.ragged_dot": types.ModuleType("tokamax._src.ops.ragged_dot"),
        "tokamax._src.ops.ragged_dot.base": base,
        "tokamax._src.ops.ragged_dot.pallas_mosaic_gpu": types.SimpleNamespace(
            PallasMosaicGpuRaggedDot=PallasMosaicGpuRaggedDot, Config=Config),
        "tokamax._src.ops.ragged_dot.pallas_mosaic_gpu_common": types.SimpleNamespace(
            MatmulDimension=MatmulDimension),
    }
    mods["tokamax"]._src = mods["tokamax._src"]
    mods["tokamax._src"].ops = mods["tokamax._src.ops"]
    mods["tokamax._src.ops"].ragged_dot = mods["tokamax._src.ops.ragged_dot"]
    for name in ("base", "pallas_mosaic_gpu", "pallas_mosaic_gpu_common"):
        setattr(mods["tokamax._src.ops.ragged_dot"], name, mods[f"tokamax._src.ops.ragged_dot.{name}"])
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return calls, MatmulDimension, base


def test_tokamax_matmul_passes_block_configs_to_all_three_kernels(monkeypatch):
    import jax
    import jax.numpy as jnp

    from zephyr_jax.model import dispatch

    calls, dims, base = _fake_tokamax(monkeypatch)
    x = jax.random.normal(jax.random.key(0), (10, 4), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (3, 4, 5), jnp.float32)
    sizes = jnp.array([2, 0, 5], jnp.int32)  # 7 of 10 rows in groups

    def loss(matmul, x, w):
        return jnp.sum(jnp.sin(matmul(x, w, sizes)))

    # no configs: tokamax's heuristics for all three kernels; forward and VJP equal ragged_dot's,
    # rows past the groups zero (in y and in dx)
    y, (dx, dw) = jax.value_and_grad(loss, argnums=(1, 2))(dispatch.tokamax_matmul(), x, w)
    want_y, (want_dx, want_dw) = jax.value_and_grad(loss, argnums=(1, 2))(jax.lax.ragged_dot, x, w)
    np.testing.assert_allclose(y, want_y, rtol=1e-6)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(dispatch.tokamax_matmul()(x, w, sizes)[7:], 0)
    assert [d for _, d in calls[:3]] == [base.DEFAULT_RAGGED_DOT_DIM_NUMS,
                                         base.TRANS_RHS_RAGGED_DOT_DIM_NUMS,
                                         base.RAGGED_CONTRACTING_DOT_DIM_NUMS]
    assert all(op.config is None and op.bypass_device_check for op, _ in calls)

    fwd = {"block_m": 128, "block_n": 64, "block_k": 128, "num_stages": 4, "split_k": 1,
           "persistent": False, "grid_minor_dim": "M", "grid_tile_width": 2}
    dw_cfg = {**fwd, "block_k": 64, "grid_minor_dim": "N"}
    calls.clear()
    jax.grad(loss, argnums=(1, 2))(dispatch.tokamax_matmul(fwd, None, dw_cfg), x, w)
    (fwd_op, _), (dx_op, _), (dw_op, _) = calls
    assert fwd_op.config.block_m == 128 and fwd_op.config.grid_minor_dim is dims.M
    assert fwd_op.config.persistent is False and fwd_op.config.grid_tile_width == 2
    assert dx_op.config is None  # dx: tokamax's heuristics
    assert dw_op.config.block_k == 64 and dw_op.config.grid_minor_dim is dims.N
    # a mistyped field is named, with the kernel it was meant for
    with pytest.raises(ValueError, match=r"dw kernel: unknown field\(s\) \['blok_k'\]"):
        dispatch.tokamax_matmul(fwd, None, {**fwd, "blok_k": 64})(x, w, sizes)
    # the dispatch's default is tokamax's heuristics for all three until a GPU measures better
    assert dict(dispatch.TOKAMAX_CONFIGS) == {"fwd": None, "dx": None, "dw": None}
