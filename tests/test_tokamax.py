"""moe_impl="tokamax" with the real tokamax 0.0.17 (Python >= 3.12: skipped on CI's Python 3.11;
scripts/check_gpu_stack.sh runs it in a venv with the GPU image's versions).

tokamax's Mosaic-GPU kernels run only on a GPU, but they lower for CUDA without one: Mosaic GPU
builds each kernel, infers its register layouts and checks its shared memory while lowering. So,
pretending to be an H100 (conftest's `pretend_h100`), these check that every block config the bench times or the model runs makes a kernel
(forward, dx and dw) on the bench model's expert shapes, and count the kernels in the bench train
step under each remat policy. The VJP's numerics are checked with tokamax's own XLA op.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tokamax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from cuda_lowering import bench_step_text, lower_for_cuda  # noqa: E402

from zephyr_jax import bench  # noqa: E402
from zephyr_jax.config import MixtralConfig  # noqa: E402
from zephyr_jax.kernels import tokamax_gmm  # noqa: E402
from zephyr_jax.model import dispatch  # noqa: E402

MOSAIC = "custom_call @mosaic_gpu_v2("


def test_our_vjp_through_tokamax_ops_equals_ragged_dot():
    """`ops_matmul` with tokamax's XLA ragged-dot op in all three places (the Mosaic op's call
    signature, runnable here): forward and gradients equal `jax.lax.ragged_dot`, rows past the
    groups zero."""
    from tokamax._src.ops.ragged_dot import base

    matmul = tokamax_gmm.ops_matmul(base.RaggedDot(), base.RaggedDot(), base.RaggedDot())
    x = jax.random.normal(jax.random.key(0), (40, 16), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (4, 16, 24), jnp.float32)
    sizes = jnp.array([7, 0, 20, 5], jnp.int32)  # 32 of 40 rows in groups

    def loss(mm, x, w):
        return jnp.sum(jnp.sin(mm(x, w, sizes)))

    got = jax.value_and_grad(loss, argnums=(1, 2))(matmul, x, w)
    want = jax.value_and_grad(loss, argnums=(1, 2))(jax.lax.ragged_dot, x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(matmul(x, w, sizes)[32:], 0)


def _expert_shapes():
    cfg = MixtralConfig.preset("bench")
    pairs, seq = bench.default_shape("bench")
    rows = 2 * pairs * seq * cfg.num_experts_per_tok  # routed rows: [chosen; rejected] x top-k
    D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    return {"up": (rows, D, F, E), "down": (rows, F, D, E)}


CONFIGS = {"heuristics": None, **{bench._tile_name(t): t for t in bench.TOKAMAX_TILES},
           **{f"dispatch_{k}": v for k, v in dispatch.TOKAMAX_CONFIGS.items() if v is not None}}


@pytest.mark.parametrize("shape", ["up", "down"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_block_config_lowers_for_hopper(pretend_h100, name, shape):
    """Each config the bench times (and the dispatch runs) makes all three kernels on the bench
    model's expert GEMMs: one Mosaic-GPU call each for forward, dx and dw."""
    M, K, N, G = _expert_shapes()[shape]
    cfg = CONFIGS[name]
    matmul = tokamax_gmm.tokamax_matmul(cfg, cfg, cfg)
    sizes = jnp.full((G,), M // G, jnp.int32)

    def fwd_bwd(x, w):
        return jax.value_and_grad(lambda x, w: jnp.sum(matmul(x, w, sizes).astype(jnp.float32)),
                                  argnums=(0, 1))(x, w)

    x = jax.ShapeDtypeStruct((M, K), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((G, K, N), jnp.bfloat16)
    assert lower_for_cuda(fwd_bwd, x, w).count(MOSAIC) == 3


def test_a_block_config_past_shared_memory_fails_to_lower(pretend_h100):
    """The control: 128 x 128 x 128 tiles in 4 stages need 256 KiB of shared memory, more than
    Hopper's 227 KiB, and lowering says so (so a config the test passes does fit)."""
    cfg = {"block_m": 128, "block_n": 128, "block_k": 128, "num_stages": 4, "split_k": 1,
           "persistent": False, "grid_minor_dim": "M", "grid_tile_width": 1}
    M, K, N, G = _expert_shapes()["up"]
    matmul = tokamax_gmm.tokamax_matmul(cfg, cfg, cfg)
    sizes = jnp.full((G,), M // G, jnp.int32)
    x = jax.ShapeDtypeStruct((M, K), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((G, K, N), jnp.bfloat16)
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        lower_for_cuda(lambda x, w: matmul(x, w, sizes), x, w)


@pytest.mark.parametrize("policy, mosaic, cudnn_forwards", [
    ("none", 9, 1), ("save_matmuls", 9, 1), ("save_attention", 12, 1), ("full", 12, 2)])
def test_bench_step_lowers_and_remat_keeps_what_it_names(pretend_h100, policy, mosaic, cudnn_forwards):
    """The GPU bench's train step (bench model, tokamax experts, cuDNN attention; abstract
    parameters, nothing allocated) lowers for CUDA. In its one scanned layer: 3 expert GEMMs x
    (forward, dx, dw) = 9 Mosaic kernels, + 3 where the policy recomputes the MoE forward; cuDNN's
    attention forward once, twice where the policy recomputes attention."""
    _, cfg = bench.resolve_config("bench", "gpu", moe_impl="tokamax", remat=policy)
    assert cfg.attention_impl == "cudnn"
    text = bench_step_text(cfg)
    assert text.count(MOSAIC) == mosaic
    assert text.count("custom_call @__cudnn$fmhaSoftmax(") == cudnn_forwards
    assert text.count("custom_call @__cudnn$fmhaSoftmaxBackward(") == 1
