"""MoE dispatch: run each token through its top-k experts' SwiGLU and combine.

One narrow interface, several implementations chosen by `MixtralConfig.moe_impl`:

    dispatch(x_ND, expert_NK, weight_NK, w1_EDF, w3_EDF, w2_EFD, capacity_factor)
        -> (y_ND, dropped)

- "dense": every expert on every token (the reference; E/k times the expert FLOPs);
- grouped (dropless): sort the (token, expert) assignments by expert and run grouped GEMMs:
  "ragged" (`jax.lax.ragged_dot`), "scan" (a matmul loop, the CPU path), "pallas" (our Triton
  kernels, GPU), "tokamax" (tokamax's Mosaic-GPU ragged_dot, optional dependency);
- "capacity": a fixed number of rows per expert and one batched einsum; drops what does not fit;
- "auto" (the default): chosen per platform at trace time, see `auto_impl`.

`dropped` counts (token, expert) assignments that were not computed: always 0 for the dropless
implementations. Weights are combined in float32, as HF does.

Expert ids >= E mean "no expert" (padding): the dropless implementations give such rows zero
output, which the expert-parallel path relies on for the empty slots of its exchange buffers.

`get_dispatch(name)` is mesh-aware: traced under a mesh whose expert axis is split (see
`zephyr_jax.sharding.use_mesh`), it runs the expert-parallel version (`expert_parallel.py`), which
routes tokens to the devices holding their experts and uses these local implementations there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from types import MappingProxyType

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from zephyr_jax import sharding
from zephyr_jax.kernels import gmm, scan_gmm
from zephyr_jax.kernels.tokamax_gmm import available as tokamax_available
from zephyr_jax.kernels.tokamax_gmm import tokamax_matmul
from zephyr_jax.model import names
from zephyr_jax.model.layers import keeping_inputs

DispatchFn = Callable[..., tuple[jax.Array, jax.Array]]


def _swiglu_plain(h1: jax.Array, h3: jax.Array) -> jax.Array:
    return jax.nn.silu(h1) * h3


# Autodiff of silu(h1) * h3 keeps three [rows, F] intermediates besides h1 and h3 (silu(h1),
# sigmoid(h1) and its derivative), each copied into the layer loop's residual stack: 2.1 GiB per
# layer instead of 0.7 in the bench step (pallas, compiled for an H100). Keeping only h1 and h3
# and recomputing the rest inside the backward's one elementwise kernel gives the same values.
_swiglu = keeping_inputs(_swiglu_plain)


# tags for the named remat policies (zephyr_jax/model/names.py); no-ops otherwise
def _gate_up(h: jax.Array) -> jax.Array:
    return checkpoint_name(h, names.EXPERT_IN)


def _down(h: jax.Array) -> jax.Array:
    return checkpoint_name(h, names.EXPERT_OUT)


def dense(x_ND, expert_NK, weight_NK, w1_EDF, w3_EDF, w2_EFD, capacity_factor=None):
    """Reference: every expert on every token, masked by the routing weights. E times the FLOPs."""
    E = w1_EDF.shape[0]
    combine_NE = jnp.einsum("nk,nke->ne", weight_NK.astype(jnp.float32),
                            jax.nn.one_hot(expert_NK, E, dtype=jnp.float32))
    h_ENF = _swiglu(_gate_up(jnp.einsum("nd,edf->enf", x_ND, w1_EDF)),
                    _gate_up(jnp.einsum("nd,edf->enf", x_ND, w3_EDF)))
    out_END = _down(jnp.einsum("enf,efd->end", h_ENF, w2_EFD))
    y_ND = jnp.einsum("end,ne->nd", out_END.astype(jnp.float32), combine_NE)
    return y_ND.astype(x_ND.dtype), jnp.zeros((), jnp.int32)


def _sort_by_expert(expert_NK: jax.Array, E: int):
    """Order the N*K (token, slot) assignments by expert; returns (order_M, inverse_M, group_sizes_E).

    Row m of the expert-ordered rows is assignment order_M[m] (token order_M[m] // K);
    inverse_M[a] is where assignment a went. Ids >= E ("no expert") sort last and are left out of
    group_sizes_E (bincount drops them), so `ragged_dot` gives their rows zeros.
    """
    N, K = expert_NK.shape
    flat_M = expert_NK.reshape(-1)
    order_M = jnp.argsort(flat_M, stable=True)
    group_sizes_E = jnp.bincount(flat_M, length=E).astype(jnp.int32)
    return order_M, inverse_permutation(order_M), group_sizes_E


def inverse_permutation(order_M: jax.Array) -> jax.Array:
    M = order_M.shape[0]
    return jnp.zeros_like(order_M).at[order_M].set(
        jnp.arange(M, dtype=order_M.dtype), unique_indices=True)


# Whether `take_rows` runs its backward pass as a gather through the inverse permutation (True)
# or keeps autodiff's form (False), by platform (read at trace time). GPUs: the gather (autodiff's
# scatter-add is one scalar atomic add per element on XLA:GPU; speed unmeasured until a GPU run).
# XLA:CPU: autodiff's form, which the CPU bench step ran 2-3% faster (small config, alternating
# runs: 918 / 901 ms against 940 / 931 ms median).
GATHER_BACKWARD = MappingProxyType({"cpu": False})


def take_rows(copies: int, x_ND: jax.Array, source_M: jax.Array, inverse_M: jax.Array) -> jax.Array:
    """`x_ND[source_M // copies]`, where each row of x_ND is taken `copies` times (M = N * copies;
    copies = 1: a permutation) and `inverse_M` inverts `source_M` (inverse_M[source_M[m]] = m).

    Where `GATHER_BACKWARD` says so, its backward pass is a gather through `inverse_M` and a float32
    sum over each row's copies. Autodiff's backward of `x_ND[idx]` is a scatter-add into x_ND's
    gradient instead: on a GPU one scalar atomic add per element (seen in the bench step compiled
    for an H100: a bf16 [N, D] scatter-add per layer), summing the copies in x's dtype.
    """
    if GATHER_BACKWARD.get(jax.default_backend(), True):
        return _take_rows(copies, x_ND, source_M, inverse_M)
    if copies == 1:  # the same permutation as a scatter, whose transpose is a gather
        return jnp.zeros_like(x_ND).at[inverse_M].set(x_ND, unique_indices=True)
    return x_ND[source_M // copies]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _take_rows(copies, x_ND, source_M, inverse_M):
    return x_ND[source_M // copies]


def _take_rows_fwd(copies, x_ND, source_M, inverse_M):
    return x_ND[source_M // copies], (source_M, inverse_M)


def _take_rows_bwd(copies, residuals, d_MD):
    source_M, inverse_M = residuals
    M, D = d_MD.shape
    d_NKD = d_MD[inverse_M].reshape(M // copies, copies, D)
    if copies == 1:
        d_ND = d_NKD[:, 0]
    else:
        d_ND = jnp.sum(d_NKD.astype(jnp.float32), axis=1).astype(d_MD.dtype)
    return d_ND, None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _combine(out_sorted_MD, order_M, inverse_M, weight_NK, dtype):
    """Back to (token, slot) order, then sum_k weight * out in float32."""
    N, K = weight_NK.shape
    out_MD = take_rows(1, out_sorted_MD, inverse_M, order_M)
    return _weighted_sum(out_MD.reshape(N, K, -1), weight_NK).astype(dtype)


def _weighted_sum_plain(out_NKD: jax.Array, weight_NK: jax.Array) -> jax.Array:
    return jnp.einsum("nkd,nk->nd", out_NKD.astype(jnp.float32), weight_NK.astype(jnp.float32))


# sum_k weight[n, k] * out[n, k, :] in float32, as HF combines the experts. Its backward pass
# keeps `out_NKD` in its own dtype and redoes the cast, instead of keeping the float32 copy plain
# autodiff saves (twice the bytes: 2 GiB at the bench shapes); same values.
_weighted_sum = keeping_inputs(_weighted_sum_plain)


# The block configs moe_impl="tokamax" runs (forward, dx, dw): tokamax's heuristics until a GPU
# measures better ones (`bench --gemm` times TOKAMAX_TILES; docs/gpu_check.sh).
TOKAMAX_CONFIGS = MappingProxyType({"fwd": None, "dx": None, "dw": None})
# The tiles moe_impl="pallas" runs (forward and dx; dw), `gmm`'s defaults until a GPU measures
# better ones (`bench --gemm` times bench.GMM_TILES, dx and dw apart).
PALLAS_TILES = MappingProxyType({"bm": 128, "bk": 64, "bn": 128, "num_warps": 8, "num_stages": 3,
                                 "dw_tiles": (128, 64, 128), "l2_order": True})


# scan_gmm's rows per tile by platform: each tile is one dense [bm, K] x [K, N] matmul, and each
# group wastes at most one partial tile. CPU: 256 (bench --gemm, docs/PERFORMANCE.md); elsewhere
# larger matmuls keep a GPU busy: 512, unmeasured until the GPU check times 256 / 512 / 1024.
SCAN_ROWS = MappingProxyType({"cpu": 256})
SCAN_ROWS_ACCELERATOR = 512


def _scan_matmul(x_MK, w_GKN, group_sizes_G):
    bm = SCAN_ROWS.get(jax.default_backend(), SCAN_ROWS_ACCELERATOR)
    return scan_gmm(x_MK, w_GKN, group_sizes_G, bm=bm)


# Grouped GEMMs equal to `jax.lax.ragged_dot(x_MK, w_GKN, group_sizes_G)` (forward and VJP, rows
# past the groups zero); each makes a dropless dispatch below.
GROUPED_MATMULS: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "ragged": jax.lax.ragged_dot,  # XLA's lowering: native on TPU, slow on GPU and CPU
    "scan": _scan_matmul,  # a loop of dense matmuls (zephyr_jax/kernels/scan_gmm.py): the CPU path
    "pallas": functools.partial(gmm, **PALLAS_TILES),  # Pallas/Triton (kernels/grouped_gemm.py)
    "tokamax": tokamax_matmul(**TOKAMAX_CONFIGS),
}


def grouped(matmul) -> DispatchFn:
    """The dropless dispatch through `matmul`: sort assignments by expert, grouped GEMMs, unsort."""

    def dispatch(x_ND, expert_NK, weight_NK, w1_EDF, w3_EDF, w2_EFD, capacity_factor=None):
        E = w1_EDF.shape[0]
        K = expert_NK.shape[1]
        order_M, inverse_M, group_sizes_E = _sort_by_expert(expert_NK, E)
        xs_MD = take_rows(K, x_ND, order_M, inverse_M)
        h_MF = _swiglu(_gate_up(matmul(xs_MD, w1_EDF, group_sizes_E)),
                       _gate_up(matmul(xs_MD, w3_EDF, group_sizes_E)))
        out_MD = _down(matmul(h_MF, w2_EFD, group_sizes_E))
        return _combine(out_MD, order_M, inverse_M, weight_NK, x_ND.dtype), jnp.zeros((), jnp.int32)

    return dispatch


def capacity(x_ND, expert_NK, weight_NK, w1_EDF, w3_EDF, w2_EFD, capacity_factor=1.25):
    """Fixed capacity C = ceil(factor * N * K / E) per expert and one batched einsum.

    Fast where grouped GEMMs are slow, but assignments past an expert's capacity are dropped
    (they contribute zero) and counted in `dropped`. Not dropless: never the default.
    """
    N, K = expert_NK.shape
    E, D, _ = w1_EDF.shape
    C = max(1, math.ceil(capacity_factor * N * K / E))
    flat_M = expert_NK.reshape(-1)
    onehot_ME = jax.nn.one_hot(flat_M, E, dtype=jnp.int32)
    pos_M = jnp.sum(jnp.cumsum(onehot_ME, axis=0) * onehot_ME, axis=-1) - 1
    keep_M = pos_M < C
    slot_M = jnp.where(keep_M, flat_M * C + pos_M, E * C)  # E*C is a discard row
    # each token K times in a row (its gradient a sum over the K copies, not a scatter-add)
    x_MD = jnp.broadcast_to(x_ND[:, None], (N, K, D)).reshape(N * K, D)
    buf_SD = jnp.zeros((E * C + 1, D), x_ND.dtype).at[slot_M].set(x_MD)
    xs_ECD = buf_SD[: E * C].reshape(E, C, D)
    h_ECF = _swiglu(_gate_up(jnp.einsum("ecd,edf->ecf", xs_ECD, w1_EDF)),
                    _gate_up(jnp.einsum("ecd,edf->ecf", xs_ECD, w3_EDF)))
    out_ECD = _down(jnp.einsum("ecf,efd->ecd", h_ECF, w2_EFD))
    out_SD = jnp.concatenate([out_ECD.reshape(E * C, D), jnp.zeros((1, D), out_ECD.dtype)])
    out_NKD = out_SD[slot_M].reshape(N, K, D).astype(jnp.float32)
    y_ND = jnp.einsum("nkd,nk->nd", out_NKD, weight_NK.astype(jnp.float32))
    return y_ND.astype(x_ND.dtype), jnp.sum(~keep_M).astype(jnp.int32)


DISPATCH: dict[str, DispatchFn] = {
    "dense": dense, "capacity": capacity, **{k: grouped(m) for k, m in GROUPED_MATMULS.items()}}
ragged = DISPATCH["ragged"]


def auto_impl(platform: str, dtype="bfloat16") -> str:
    """What moe_impl="auto" runs on `platform` ("cpu", "gpu"/"cuda"/"rocm", "tpu") for expert
    GEMMs computed in `dtype`.

    Chosen from measurements (docs/PERFORMANCE.md, ../shared/PERF.md), all dropless:
    - cpu: "scan", 3.4-6x the rate of XLA:CPU's ragged_dot forward and backward (`bench --gemm`);
    - gpu: "tokamax" where installed and the dtype is bf16 / fp16, all its kernels take (PERF.md,
      H200: 333 / 248 TFLOP/s forward / backward against
      105 / 85 for ragged_dot); otherwise "dense": E/k times the expert FLOPs, but at dense-matmul
      rate (823 TFLOP/s there), i.e. ~200 TFLOP/s of useful work at top-2 of 8, about twice
      ragged_dot, at E/k times the expert activation memory. Our Pallas kernel ("pallas") is not
      the default until it is measured on a GPU (docs/gpu_check.sh does);
    - anything else (TPU): "ragged", XLA's native grouped matmul there.
    """
    if platform == "cpu":
        return "scan"
    if platform in ("gpu", "cuda", "rocm"):
        half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        return "tokamax" if platform != "rocm" and half and tokamax_available() else "dense"
    return "ragged"


def resolve(name: str, platform: str | None = None, dtype="bfloat16") -> str:
    """The implementation `name` stands for: itself, or auto's choice for `platform` (default: JAX's
    default backend, where jit places the computation; the ambient mesh may be abstract) and
    `dtype`, the expert GEMMs' compute dtype."""
    if name != "auto":
        return name
    return auto_impl(platform or jax.default_backend(), dtype)


def get_dispatch(name: str, exchange: str = "padded") -> DispatchFn:
    """The `name` implementation, run expert-parallel when traced under an expert-split mesh,
    with tokens exchanged the `exchange` way (`config.MOE_EXCHANGES`)."""
    if name != "auto" and name not in DISPATCH:
        raise ValueError(f"unknown moe_impl {name!r}; have {sorted(DISPATCH)} and 'auto'")

    def dispatch(x_ND, expert_NK, weight_NK, w1_EDF, w3_EDF, w2_EFD, capacity_factor=1.25):
        # decided at trace time: the ambient mesh is part of jit's cache key
        impl = resolve(name, dtype=x_ND.dtype)
        plan = sharding.expert_parallel_plan()
        if plan is None:
            return DISPATCH[impl](x_ND, expert_NK, weight_NK, w1_EDF, w3_EDF, w2_EFD, capacity_factor)
        from zephyr_jax.model.expert_parallel import expert_parallel  # it imports this module

        return expert_parallel(impl, plan, x_ND, expert_NK, weight_NK, w1_EDF, w3_EDF, w2_EFD,
                               capacity_factor, exchange)

    return dispatch
