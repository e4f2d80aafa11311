"""Dense building blocks of a Mixtral decoder layer: RMSNorm, RoPE, grouped-query attention.

Pure functions over arrays; shapes are in the names (B batch, T query length, S key length,
D hidden, N query heads, K kv heads, G = N // K, H head dim).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from zephyr_jax.model import names

# Finite rather than -inf so a fully masked row (a left-pad query) gives a uniform softmax, not NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _rms_norm(x_BTD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
    x32 = x_BTD.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + eps)).astype(x_BTD.dtype)
    # HF scales in x's dtype: weight * normed rounded once, which the float32 product rounded to
    # x's dtype equals. Multiplying in float32 makes the weight's gradient (a sum over every token)
    # accumulate in float32, as torch's reductions do; in bf16 it lost ~4x more (1.2% of the
    # largest entry over 16k tokens, against 0.3% for one rounding)
    return (weight_D.astype(jnp.float32) * normed.astype(jnp.float32)).astype(x_BTD.dtype)


def rms_norm(x_BTD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
    """HF MixtralRMSNorm: normalize in float32, cast back, then scale.

    Its backward pass keeps the input in its own dtype and redoes the float32 cast and the row
    statistics (`keeping_inputs`), instead of keeping the float32 copy of the input plain
    autodiff saves (2 x [B, T, D] float32 per layer: 2 GiB at the bench shapes, bf16)."""
    return keeping_inputs(functools.partial(_rms_norm, eps=eps))(x_BTD, weight_D)


def keeping_inputs(fn):
    """`fn` (of arrays) whose backward pass keeps only its inputs and runs autodiff of `fn` on
    them: the same values and gradients, with `fn`'s intermediates (e.g. a float32 copy of a bf16
    input) recomputed instead of kept. A custom VJP rather than `jax.checkpoint`: nested in a
    layer's remat policy, the checkpoint cost XLA 2.7 GiB more under `save_attention` (ragged,
    bench step compiled for an H100)."""

    @jax.custom_vjp
    def wrapped(*args):
        return fn(*args)

    def wrapped_fwd(*args):
        return fn(*args), args

    def wrapped_bwd(args, d_out):
        return jax.vjp(fn, *args)[1](d_out)

    wrapped.defvjp(wrapped_fwd, wrapped_bwd)
    return wrapped


@jax.custom_vjp
def embed_lookup(table_VD: jax.Array, ids_BT: jax.Array) -> jax.Array:
    """`table_VD[ids_BT]`, whose table gradient is summed in float32 and rounded once.

    Autodiff's gradient is a scatter-add in the table's dtype: with bf16 parameters a token that
    fills half a batch got its row summed in bf16, 10-17% off the exact sum (CPU; on a GPU also in
    atomic-add order). torch's CUDA embedding backward sums in `acc_type` (float for bf16).
    """
    return jnp.take(table_VD, ids_BT, axis=0)


def _embed_lookup_fwd(table_VD, ids_BT):
    # the table's shape and dtype travel as an empty array: residuals must be JAX types
    return jnp.take(table_VD, ids_BT, axis=0), (ids_BT, jnp.zeros((table_VD.shape[0], 0), table_VD.dtype))


def _embed_lookup_bwd(residuals, d_BTD):
    ids_BT, tag_V0 = residuals
    d_VD = jnp.zeros((tag_V0.shape[0], d_BTD.shape[-1]), jnp.float32)
    d_VD = d_VD.at[ids_BT].add(d_BTD.astype(jnp.float32))
    return d_VD.astype(tag_V0.dtype), None


embed_lookup.defvjp(_embed_lookup_fwd, _embed_lookup_bwd)


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
    *,
    key_valid_BS: jax.Array | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Softmax attention with K kv heads shared by groups of N // K query heads; returns [B,T,N,H].

    impl "xla": einsums and a masked softmax (any mask). "dot_product_attention": jax's
    `jax.nn.dot_product_attention` with the same mask (its XLA path: jax picks cuDNN only when
    asked). "cudnn": cuDNN's fused flash attention (NVIDIA GPUs, bf16/fp16), causal with per-row
    lengths instead of a mask; it needs `key_valid_BS` right-padded (valid tokens first, as the
    trainer's batches are) and T == S (no KV cache). A row that is not right-padded comes out NaN,
    so a wrong mask fails loudly (the trainer stops on a non-finite loss) instead of silently.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    scale = H**-0.5
    if impl == "cudnn":
        return _cudnn_attention(q_BTNH, k_BSKH, v_BSKH, key_valid_BS, sliding_window, scale)
    if impl == "dot_product_attention":
        # GQA is native (N a multiple of K)
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


def right_padded_lengths(key_valid_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(lengths_B, ok_B): valid-token counts, and whether each row is valid-first-then-padding."""
    valid_BS = key_valid_BS.astype(bool)
    lengths_B = jnp.sum(valid_BS, axis=-1).astype(jnp.int32)
    expected_BS = jnp.arange(valid_BS.shape[1])[None, :] < lengths_B[:, None]
    return lengths_B, jnp.all(valid_BS == expected_BS, axis=-1)


def _cudnn_attention(q_BTNH, k_BSKH, v_BSKH, key_valid_BS, sliding_window, scale):
    B, T = q_BTNH.shape[:2]
    if key_valid_BS is None or k_BSKH.shape[1] != T:
        raise ValueError("attention_impl='cudnn' needs the key mask and T == S (no KV cache); "
                         "generation uses the 'xla' path")
    lengths_B, ok_B = right_padded_lengths(key_valid_BS)
    window = None if sliding_window is None else (sliding_window - 1, 0)
    out_BTNH = _cudnn_flash(q_BTNH, k_BSKH, v_BSKH, lengths_B, scale, window)
    return jnp.where(ok_B[:, None, None, None], out_BTNH, jnp.nan).astype(q_BTNH.dtype)


def with_named_residuals(fn, name: str):
    """`fn` (of arrays) with its VJP residuals tagged `checkpoint_name(name)`.

    A custom-VJP op (cuDNN's attention) keeps residuals that are neither dots nor named, so under
    every remat policy but "none" its whole forward ran again in the backward pass, even where its
    output was saved by name (tests/test_model.py counts the cuDNN calls). Named, a policy that
    saves `name` keeps them. Numerics are `fn`'s own: the backward is `fn`'s VJP."""

    @jax.custom_vjp
    def wrapped(*args):
        return fn(*args)

    def wrapped_fwd(*args):
        out, fn_vjp = jax.vjp(fn, *args)
        return out, jax.tree.map(lambda r: checkpoint_name(r, name), fn_vjp)

    def wrapped_bwd(fn_vjp, d_out):
        return fn_vjp(d_out)

    wrapped.defvjp(wrapped_fwd, wrapped_bwd)
    return wrapped


def _cudnn_flash(q_BTNH, k_BSKH, v_BSKH, lengths_B, scale, window):
    def attend(q_BTNH, k_BSKH, v_BSKH, lengths_B):
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, scale=scale, is_causal=True, query_seq_lengths=lengths_B,
            key_value_seq_lengths=lengths_B, local_window_size=window, implementation="cudnn")

    return with_named_residuals(attend, names.ATTENTION_KERNEL)(q_BTNH, k_BSKH, v_BSKH, lengths_B)
