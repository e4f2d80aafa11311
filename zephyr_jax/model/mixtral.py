"""Flax NNX Mixtral: computes what transformers' MixtralForCausalLM computes.

Decoder layers are stored stacked (leading `layers` axis) and run with `jax.lax.scan`, so compile
time does not grow with depth. Every parameter carries `logical_axes` metadata; the sharding
module maps those names to mesh axes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from zephyr_jax.config import MixtralConfig
from zephyr_jax.model import names
from zephyr_jax.model.dispatch import get_dispatch
from zephyr_jax.model.layers import (
    apply_rope,
    attention_mask_BTS,
    embed_lookup,
    gqa_attention,
    rms_norm,
    rope_cos_sin,
)
from zephyr_jax.sharding import constrain

# name -> (logical axes, shape builder). Stacked layer parameters lead with "layers".
LAYER_PARAMS: dict[str, tuple[str, ...]] = {
    "input_norm": ("layers", "norm"),
    "wq": ("layers", "embed", "heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
    "post_attn_norm": ("layers", "norm"),
    "router": ("layers", "embed", "expert_logits"),
    "w1": ("layers", "expert", "embed", "mlp"),
    "w3": ("layers", "expert", "embed", "mlp"),
    "w2": ("layers", "expert", "mlp", "embed"),
}


def layer_param_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
    L, D, F = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    N, K, H, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.kv_head_dim, cfg.num_local_experts
    return {
        "input_norm": (L, D), "wq": (L, D, N, H), "wk": (L, D, K, H), "wv": (L, D, K, H),
        "wo": (L, N, H, D), "post_attn_norm": (L, D), "router": (L, D, E),
        "w1": (L, E, D, F), "w3": (L, E, D, F), "w2": (L, E, F, D),
    }


@struct.dataclass
class RouterStats:
    """What the routers did in one forward, over non-pad tokens.

    aux_loss: HF `load_balancing_loss_func` (unscaled; times `router_aux_loss_coef` in the loss).
    expert_counts_LE: (token, expert) assignments per layer and expert.
    entropy_L: mean router entropy per layer (nats).
    dropped: assignments dropped by a capacity-limited dispatch (0 when dropless).
    """

    aux_loss: jax.Array
    expert_counts_LE: jax.Array
    entropy_L: jax.Array
    dropped: jax.Array
    # per row, summed over layers: what `aux_loss` is made of, for the aux loss of a group of
    # rows alone (`group_aux_loss`: TRL with one preference pair per device)
    counts_BE: jax.Array
    prob_sum_BE: jax.Array
    valid_B: jax.Array


def group_aux_loss(stats: RouterStats, groups_GB: jax.Array) -> jax.Array:
    """HF `load_balancing_loss_func` of each group of rows alone: `groups_GB[g, b]` is 1 where row
    b is in group g. [G]; a group without non-pad tokens gets 0."""
    L, E = stats.expert_counts_LE.shape
    n_G = groups_GB @ stats.valid_B
    denom_G1 = jnp.maximum(L * n_G, 1.0)[:, None]
    tokens_per_expert_GE = (groups_GB @ stats.counts_BE) / denom_G1
    prob_per_expert_GE = (groups_GB @ stats.prob_sum_BE) / denom_G1
    return jnp.sum(tokens_per_expert_GE * prob_per_expert_GE, -1) * E


class KVCache(NamedTuple):
    """Preallocated per-layer keys/values [L, B, S, K, H], key validity [B, S] and write index."""

    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    valid_BS: jax.Array
    index: jax.Array  # scalar int32: where the next tokens are written


# The cache is laid out like the activations that fill it: rows over the batch axes (a batch
# smaller than those stays whole), kv heads over `tensor`. Without a mesh these are no-ops.
KV_AXES = ("layers", "activation_batch", "activation_length", "kv_heads", "head_dim")


def _constrain_cache(k_LBSKH, v_LBSKH, valid_BS):
    return (constrain(k_LBSKH, KV_AXES), constrain(v_LBSKH, KV_AXES),
            constrain(valid_BS, KV_AXES[1:3]))


def init_kv_cache(cfg: MixtralConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.kv_head_dim)
    dtype = dtype or jnp.dtype(cfg.dtype)
    return KVCache(*_constrain_cache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                     jnp.zeros((batch, max_len), bool)),
                   jnp.zeros((), jnp.int32))


def top_k_rows(x_NE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(x_NE, k)` as k rounds of argmax: the same values, indices and gradient
    (ties: the lower index first, as top_k), but made of reductions that any XLA backend splits
    over the token rows. XLA:CPU does not split its TopK: under a mesh it all-gathered every
    layer's router probabilities, [tokens of all devices, E], and ran top-k on all of them on
    every device. (XLA's GPU compiler lowers top_k to a sort, which it does split: the 141B
    step compiled for 4 x 8 H100s had no such all-gather before this either; there k argmax
    rounds replace a sort of [tokens, E] per layer.)"""
    iota_E = jnp.arange(x_NE.shape[-1])
    remaining_NE = x_NE
    weights, experts = [], []
    for _ in range(k):
        e_N = jnp.argmax(remaining_NE, axis=-1)
        weights.append(jnp.take_along_axis(x_NE, e_N[:, None], axis=-1)[:, 0])
        experts.append(e_N.astype(jnp.int32))
        remaining_NE = jnp.where(iota_E == e_N[:, None], -jnp.inf, remaining_NE)
    return jnp.stack(weights, axis=-1), jnp.stack(experts, axis=-1)


def route(x_ND: jax.Array, router_DE: jax.Array, top_k: int):
    """Softmax over all experts in float32, top-k, renormalize the k weights (HF MixtralTopKRouter)."""
    logits_NE = checkpoint_name(x_ND @ router_DE, names.ROUTER)
    probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
    weight_NK, expert_NK = top_k_rows(probs_NE, top_k)
    weight_NK = weight_NK / jnp.sum(weight_NK, axis=-1, keepdims=True)
    return probs_NE, weight_NK, expert_NK


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # By name (`checkpoint_name` below and in the dispatch), so that the expert GEMMs count even
    # where they are custom kernels, which "dots" cannot see (it knows only XLA dot_generals):
    # every projection and expert GEMM output is kept; norms, RoPE, softmax, SwiGLU and the
    # attention scores are recomputed (the scores are the [T, S] tensor not worth keeping).
    "save_matmuls": jax.checkpoint_policies.save_only_these_names(*names.MATMULS),
    # Attention's projections only: the MoE block is recomputed (its activations are the largest,
    # k or E x intermediate per token), at the cost of one more expert forward.
    "save_attention": jax.checkpoint_policies.save_only_these_names(*names.ATTENTION),
}


def _decoder_layer(cfg: MixtralConfig, p: dict, x_BTD, cos_BTH, sin_BTH, mask_BTS, token_valid_N,
                   kv=None):
    """One decoder layer. `kv` = (k_BSKH, v_BSKH, index) writes new keys at `index` (decoding)."""
    dtype = jnp.dtype(cfg.dtype)
    p = {k: v.astype(dtype) for k, v in p.items()}
    B, T, D = x_BTD.shape

    h_BTD = rms_norm(x_BTD, p["input_norm"], cfg.rms_norm_eps)
    q_BTNH = apply_rope(jnp.einsum("btd,dnh->btnh", h_BTD, p["wq"]), cos_BTH, sin_BTH)
    k_BTKH = apply_rope(jnp.einsum("btd,dkh->btkh", h_BTD, p["wk"]), cos_BTH, sin_BTH)
    v_BTKH = jnp.einsum("btd,dkh->btkh", h_BTD, p["wv"])
    q_BTNH, k_BTKH, v_BTKH = (checkpoint_name(a, names.QKV) for a in (q_BTNH, k_BTKH, v_BTKH))
    new_kv = None
    if kv is not None:
        k_cache, v_cache, index = kv
        k_BSKH = jax.lax.dynamic_update_slice(k_cache, k_BTKH.astype(k_cache.dtype), (0, index, 0, 0))
        v_BSKH = jax.lax.dynamic_update_slice(v_cache, v_BTKH.astype(v_cache.dtype), (0, index, 0, 0))
        new_kv = (k_BSKH, v_BSKH)
        k_BTKH, v_BTKH = k_BSKH.astype(dtype), v_BSKH.astype(dtype)
    impl = cfg.attention_impl
    if impl == "cudnn" and kv is not None:
        impl = "xla"  # decoding against a cache: not a right-padded square; small anyway
    attn_BTNH = gqa_attention(q_BTNH, k_BTKH, v_BTKH, mask_BTS, impl,
                              key_valid_BS=token_valid_N.reshape(B, T),
                              sliding_window=cfg.sliding_window)
    attn_BTNH = checkpoint_name(attn_BTNH, names.CONTEXT)
    x_BTD = x_BTD + checkpoint_name(jnp.einsum("btnh,nhd->btd", attn_BTNH, p["wo"]), names.ATTN_OUT)

    h_ND = rms_norm(x_BTD, p["post_attn_norm"], cfg.rms_norm_eps).reshape(B * T, D)
    probs_NE, weight_NK, expert_NK = route(h_ND, p["router"], cfg.num_experts_per_tok)
    y_ND, dropped = get_dispatch(cfg.moe_impl, cfg.moe_exchange)(
        h_ND, expert_NK, weight_NK, p["w1"], p["w3"], p["w2"], cfg.moe_capacity_factor)
    x_BTD = x_BTD + y_ND.reshape(B, T, D)

    valid_N = token_valid_N.astype(jnp.float32)
    E = probs_NE.shape[-1]
    # padding tokens' probabilities are zeroed with `where`, not only weighted by 0: a row with no
    # attended token at all (the evaluator's filler pairs) may come out of some attention kernels
    # as NaN, and NaN * 0 is NaN
    probs_NE = jnp.where(token_valid_N[:, None], probs_NE, 0.0)
    valid_BT = valid_N.reshape(B, T)
    stats = {
        "counts_BE": jnp.einsum("btke,bt->be", jax.nn.one_hot(expert_NK, E, dtype=jnp.float32)
                                .reshape(B, T, -1, E), valid_BT),
        "prob_sum_BE": jnp.einsum("bte,bt->be", probs_NE.reshape(B, T, E), valid_BT),
        "entropy_sum": jnp.sum(-jnp.sum(probs_NE * jnp.log(jnp.maximum(probs_NE, 1e-30)), -1) * valid_N),
        "dropped": dropped,
    }
    return x_BTD, stats, new_kv


def _constrain_activations(x_BTD):
    """Keep the residual stream split over the batch axes (a no-op without a mesh): without it the
    compiler was seen replicating the batch of a full-size step."""
    return constrain(x_BTD, ("activation_batch", "activation_length", "activation_embed"))


def _as_param(path, a):
    """`a`, one layer's slice of a layer parameter (or its cotangent), constrained to that
    parameter's sharding; `path` ends in the parameter's key."""
    return constrain(a, LAYER_PARAMS[path[-1].key][1:])


def _recompute_in_order(layer, policy):
    """`layer` under the remat `policy` when the layers are unrolled: it keeps what
    `jax.checkpoint(layer, policy=policy)` keeps (the policy's saved names and its inputs) and
    recomputes the rest in its backward pass, which runs strictly after the next layer's.

    A scan orders the layers' backward passes by itself. Unrolled, XLA orders them only by data,
    and `optimization_barrier` (`prevent_cse`'s too) is removed before scheduling. So the 141B
    recipe on 4 x 8 H100s compiled to 241 GiB per device against 51 scanned: recomputations moved
    into the forward pass (XLA:CPU), the forward's gathered weights reused in the backward, and
    weight-gradient work of many layers deferred to the end (docs/PERFORMANCE.md, "Unrolled
    layers under full remat"). Three data dependences, each through an exact zero XLA cannot fold:
    every residual waits for the cotangent; the weights come through a dynamic slice at an index
    from it (an added zero was moved past the weights' all-gather); the input's cotangent waits
    for this layer's weight gradients. Values are unchanged (+-0 added, index 0).

    The weight cotangents are constrained to their parameters' sharding: unconstrained (they pass
    through the stack and slice), XLA all-reduced them where the scan reduce-scatters. Their zero
    comes from each one's sum: from one entry, XLA gathered the scattered gradients back. So the
    recipe unrolled compiles to 42.7 GiB per device (scanned: 51.0) with the scan's all-gathers,
    one more reduce-scatter and the zeros' scalar all-reduces, and under `save_attention` to 47.9
    (scanned: 58.3; through plain `jax.checkpoint` it would not fit). Left: each layer's reduce-scatters finish before the next layer's backward starts.
    """

    def exact_zero(v):
        # +-0 from the scalar v, whatever its value (nan_to_num: never inf * 0 = nan)
        return jnp.nan_to_num(v.astype(jnp.float32)) * 0

    @jax.custom_vjp
    def wrapped(x, xs):
        return layer(x, xs)

    def fwd(x, xs):
        out, vjp_fn = jax.vjp(jax.checkpoint(layer, policy=policy), x, xs)
        # xs again: its leaves are among vjp_fn's (the recomputation's inputs), at no cost; bwd
        # reads their shapes to tell the weights from the saved activations
        return out, (vjp_fn, xs)

    def bwd(saved, g):
        vjp_fn, xs = saved
        zero = exact_zero(g[0].reshape(-1)[0])  # g[0]: the cotangent of the layer's output x
        index = zero.astype(jnp.int32)
        weights = {(a.shape, a.dtype) for a in jax.tree.leaves(xs)}

        def tie(a):
            # every residual, the policy's saved activations too: left free, a recomputation
            # starting from them (the attention scores from the saved q and k) need not wait,
            # and XLA:CPU's tiny 6-layer step kept 6.35 MiB against 4.33 (docs/PERFORMANCE.md)
            if (a.shape, a.dtype) in weights:  # a new, unsharded axis
                return jax.lax.dynamic_index_in_dim(jnp.stack([a, a]), index, axis=0, keepdims=False)
            if jnp.issubdtype(a.dtype, jnp.floating):
                return a + zero.astype(a.dtype)
            return a

        dx, dxs = jax.tree.map(tie, vjp_fn)(g)
        dxs = jax.tree_util.tree_map_with_path(_as_param, dxs)  # reduce-scattered, not all-reduced
        # a sum reads each device's shard (plus a scalar all-reduce); one entry gathered them all
        done = sum(exact_zero(jnp.sum(d, dtype=jnp.float32)) for d in jax.tree.leaves(dxs)
                   if jnp.issubdtype(d.dtype, jnp.floating))
        return dx + done.astype(dx.dtype), dxs

    wrapped.defvjp(fwd, bwd)
    return wrapped


def _layer_loop(body, x, xs, scan: bool):
    """`jax.lax.scan(body, x, xs)`, or the same loop unrolled in Python (each layer's slices
    static, its outputs stacked at the end) when `scan` is False."""
    if scan:
        return jax.lax.scan(body, x, xs)
    ys = []
    for i in range(jax.tree.leaves(xs)[0].shape[0]):
        x, y = body(x, jax.tree.map(lambda a, i=i: a[i], xs))
        ys.append(y)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)


class Mixtral(nnx.Module):
    """Mixtral causal LM.

    `model(input_ids, attention_mask)` -> logits [B, T, vocab];
    `model(..., return_stats=True)` -> (logits, RouterStats) from the same forward.
    """

    def __init__(self, config: MixtralConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdt = jnp.dtype(config.param_dtype)
        std = 0.02  # HF initializer_range
        D, V = config.hidden_size, config.vocab_size

        def normal(shape):
            return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(pdt)

        self.embed = nnx.Param(normal((V, D)), logical_axes=("vocab", "embed"))
        self.layers = nnx.Dict({
            name: nnx.Param(jnp.ones(shape, pdt) if name.endswith("norm") else normal(shape),
                            logical_axes=LAYER_PARAMS[name])
            for name, shape in layer_param_shapes(config).items()
        })
        self.final_norm = nnx.Param(jnp.ones((D,), pdt), logical_axes=("norm",))
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(normal((D, V)), logical_axes=("embed", "vocab"))

    # --- pieces, for memory-lean losses and generation ---
    def head_DV(self) -> jax.Array:
        w = self.embed.value.T if self.config.tie_word_embeddings else self.lm_head.value
        return w.astype(jnp.dtype(self.config.dtype))

    def backbone(self, input_ids_BT, attention_mask_BT=None, positions_BT=None, cache: KVCache | None = None):
        """Final-normed hidden states [B, T, D], RouterStats, and the updated cache (if given)."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        B, T = input_ids_BT.shape
        if attention_mask_BT is None:
            attention_mask_BT = jnp.ones((B, T), bool)
        attention_mask_BT = attention_mask_BT.astype(bool)
        offset = cache.index if cache is not None else 0
        if positions_BT is None:
            # HF's default: positions are sequence indices, whatever the padding.
            positions_BT = jnp.broadcast_to(offset + jnp.arange(T), (B, T))
        query_index_T = offset + jnp.arange(T)
        if cache is not None:
            key_valid_BS = jax.lax.dynamic_update_slice(cache.valid_BS, attention_mask_BT, (0, offset))
        else:
            key_valid_BS = attention_mask_BT
        mask_BTS = attention_mask_BTS(query_index_T, key_valid_BS, cfg.sliding_window)
        cos_BTH, sin_BTH = rope_cos_sin(positions_BT, cfg.kv_head_dim, cfg.rope_theta, dtype)
        token_valid_N = attention_mask_BT.reshape(-1)

        x_BTD = _constrain_activations(embed_lookup(self.embed.value, input_ids_BT).astype(dtype))
        layer_params = {k: v.value for k, v in self.layers.items()}

        def body(x, xs):
            if cache is None:
                p, kv = xs, None
            else:
                p, k_c, v_c = xs
                kv = (k_c, v_c, offset)
            x = _constrain_activations(x)
            x, stats, new_kv = _decoder_layer(cfg, p, x, cos_BTH, sin_BTH, mask_BTS, token_valid_N, kv)
            return x, (stats, new_kv)

        if cfg.remat != "none" and not cfg.scan_layers:
            body = _recompute_in_order(body, _REMAT_POLICIES[cfg.remat])
        elif cfg.remat != "none":
            # inside a scan XLA cannot merge the recomputation with the forward pass (unrolled it
            # did, and undid the remat: the compiled H100 bench step kept every residual)
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        xs = layer_params if cache is None else (layer_params, cache.k_LBSKH, cache.v_LBSKH)
        x_BTD, (stats, new_kv) = _layer_loop(body, x_BTD, xs, cfg.scan_layers)

        h_BTD = rms_norm(x_BTD, self.final_norm.value, cfg.rms_norm_eps)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(*_constrain_cache(new_kv[0], new_kv[1], key_valid_BS),
                                cache.index + T)
        return h_BTD, self._router_stats(stats, token_valid_N), new_cache

    def _router_stats(self, stats, token_valid_N) -> RouterStats:
        counts_LE = jnp.sum(stats["counts_BE"], 1)
        L, E = counts_LE.shape
        n_valid = jnp.maximum(jnp.sum(token_valid_N.astype(jnp.float32)), 1.0)
        tokens_per_expert_E = jnp.sum(counts_LE, 0) / (L * n_valid)
        prob_per_expert_E = jnp.sum(stats["prob_sum_BE"], (0, 1)) / (L * n_valid)
        aux = jnp.sum(tokens_per_expert_E * prob_per_expert_E) * E
        B = stats["counts_BE"].shape[1]
        return RouterStats(aux_loss=aux, expert_counts_LE=counts_LE,
                           entropy_L=stats["entropy_sum"] / n_valid,
                           dropped=jnp.sum(stats["dropped"]),
                           counts_BE=jnp.sum(stats["counts_BE"], 0),
                           prob_sum_BE=jnp.sum(stats["prob_sum_BE"], 0),
                           valid_B=jnp.sum(token_valid_N.reshape(B, -1).astype(jnp.float32), -1))

    def __call__(self, input_ids_BT, attention_mask_BT=None, positions_BT=None, *, return_stats=False):
        h_BTD, stats, _ = self.backbone(input_ids_BT, attention_mask_BT, positions_BT)
        logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, self.head_DV())
        return (logits_BTV, stats) if return_stats else logits_BTV


def params_dict(model: Mixtral) -> dict:
    """The model's parameters as a plain nested dict {embed, layers: {...}, final_norm, lm_head}."""
    out = {"embed": model.embed.value, "final_norm": model.final_norm.value,
           "layers": {k: v.value for k, v in model.layers.items()}}
    if not model.config.tie_word_embeddings:
        out["lm_head"] = model.lm_head.value
    return out


def model_from_params(config: MixtralConfig, params: dict) -> Mixtral:
    """Build a Mixtral holding `params` (arrays in our layout), without random initialization."""
    model = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    expected = jax.tree.map(lambda x: (tuple(x.shape)), params_dict(model))
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    if jax.tree.structure(expected) != jax.tree.structure(got):
        raise ValueError(f"parameter names differ from the model's: expected {sorted(flatten_params(expected))}, "
                         f"got {sorted(flatten_params(got))}")
    pdt = jnp.dtype(config.param_dtype)
    for name, shape in flatten_params(expected).items():
        if flatten_params(got)[name] != shape:
            raise ValueError(f"parameter {name!r} has shape {flatten_params(got)[name]}, config implies {shape}")
    model.embed.value = jnp.asarray(params["embed"], pdt)
    model.final_norm.value = jnp.asarray(params["final_norm"], pdt)
    for k in model.layers:
        model.layers[k].value = jnp.asarray(params["layers"][k], pdt)
    if not config.tie_word_embeddings:
        model.lm_head.value = jnp.asarray(params["lm_head"], pdt)
    return model


def flatten_params(tree: dict, prefix: str = "") -> dict:
    """{'layers': {'wq': x}} -> {'layers/wq': x}: the names errors and checkpoints use."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_params(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
