"""Dense building blocks of a Mixtral decoder layer: RMSNorm, RoPE, grouped-query attention.

Pure functions over arrays; shapes are in the names (B batch, T query length, S key length,
D hidden, N query heads, K kv heads, G = N // K, H head dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite rather than -inf so a fully masked row (a left-pad query) gives a uniform softmax, not NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rms_norm(x_BTD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
    """HF MixtralRMSNorm: normalize in float32, cast back, then scale."""
    x32 = x_BTD.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + eps)).astype(x_BTD.dtype)
    return weight_D.astype(x_BTD.dtype) * normed


def rope_cos_sin(positions_BT: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """Rotary tables [B, T, H] in HF's non-interleaved (rotate_half) layout, computed in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    return jnp.cos(emb_BTH).astype(dtype), jnp.sin(emb_BTH).astype(dtype)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    return x_BTNH * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]


def attention_mask_BTS(
    query_index_T: jax.Array,
    key_valid_BS: jax.Array,
    sliding_window: int | None,
) -> jax.Array:
    """Causal (by sequence index, as HF), key-padding and optional sliding-window mask."""
    key_index_S = jnp.arange(key_valid_BS.shape[1])
    allowed_TS = key_index_S[None, :] <= query_index_T[:, None]
    if sliding_window is not None:
        allowed_TS &= key_index_S[None, :] > query_index_T[:, None] - sliding_window
    return allowed_TS[None, :, :] & key_valid_BS[:, None, :].astype(bool)


def gqa_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BTS: jax.Array,
    impl: str = "xla",
) -> jax.Array:
    """Softmax attention with K kv heads shared by groups of N // K query heads; returns [B,T,N,H]."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    scale = H**-0.5
    if impl == "dot_product_attention":
        # cuDNN flash attention on GPU; XLA elsewhere. GQA is native (N a multiple of K).
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None, :, :], scale=scale
        )
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * scale
    scores_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], scores_BKGTS, _MASK_VALUE)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)
