"""Declarative map between zephyr_jax parameters and Hugging Face Mixtral tensor names.

Our parameters (see `zephyr_jax.model.mixtral.LAYER_PARAMS`) are stacked over layers and, for
experts, over experts. Each rule names the HF tensor(s) for one slice and two small transforms.
HF Linear weights are [out, in]; ours are [in, ...out] so einsums read left to right.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from zephyr_jax.config import MixtralConfig


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str  # key in our params: "embed", "final_norm", "lm_head" or "layers/<name>"
    hf: str  # HF name, with {l} for the layer and {e} for the expert
    per_expert: bool
    to_ours: Callable[[np.ndarray, MixtralConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, MixtralConfig], np.ndarray]
    hf_shape: Callable[[MixtralConfig], tuple[int, ...]]


def _T(x, cfg):
    return np.ascontiguousarray(x.T)


def _same(x, cfg):
    return x


def _heads_in(n: Callable[[MixtralConfig], int]):
    """HF [n*H, D] <-> ours [D, n, H] (q/k/v projections)."""
    return (lambda x, cfg: np.ascontiguousarray(x.T).reshape(cfg.hidden_size, n(cfg), cfg.kv_head_dim),
            lambda x, cfg: np.ascontiguousarray(x.reshape(cfg.hidden_size, -1).T))


_q = _heads_in(lambda c: c.num_attention_heads)
_kv = _heads_in(lambda c: c.num_key_value_heads)


def _o_to_ours(x, cfg):  # HF [D, N*H] -> ours [N, H, D]
    return np.ascontiguousarray(x.T).reshape(cfg.num_attention_heads, cfg.kv_head_dim, cfg.hidden_size)


def _o_to_hf(x, cfg):
    return np.ascontiguousarray(x.reshape(-1, cfg.hidden_size).T)


def _d(c):
    return c.hidden_size


def _nh(c):
    return c.num_attention_heads * c.kv_head_dim


def _kh(c):
    return c.num_key_value_heads * c.kv_head_dim


P = "model.layers.{l}."
# Per-expert layout (the public Mixtral / Zephyr checkpoints; transformers' save default).
RULES: tuple[Rule, ...] = (
    Rule("embed", "model.embed_tokens.weight", False, _same, _same, lambda c: (c.vocab_size, _d(c))),
    Rule("final_norm", "model.norm.weight", False, _same, _same, lambda c: (_d(c),)),
    Rule("lm_head", "lm_head.weight", False, _T, _T, lambda c: (c.vocab_size, _d(c))),
    Rule("layers/input_norm", P + "input_layernorm.weight", False, _same, _same, lambda c: (_d(c),)),
    Rule("layers/post_attn_norm", P + "post_attention_layernorm.weight", False, _same, _same,
         lambda c: (_d(c),)),
    Rule("layers/wq", P + "self_attn.q_proj.weight", False, *_q, lambda c: (_nh(c), _d(c))),
    Rule("layers/wk", P + "self_attn.k_proj.weight", False, *_kv, lambda c: (_kh(c), _d(c))),
    Rule("layers/wv", P + "self_attn.v_proj.weight", False, *_kv, lambda c: (_kh(c), _d(c))),
    Rule("layers/wo", P + "self_attn.o_proj.weight", False, _o_to_ours, _o_to_hf,
         lambda c: (_d(c), _nh(c))),
    Rule("layers/router", P + "block_sparse_moe.gate.weight", False, _T, _T,
         lambda c: (c.num_local_experts, _d(c))),
    Rule("layers/w1", P + "block_sparse_moe.experts.{e}.w1.weight", True, _T, _T,
         lambda c: (c.intermediate_size, _d(c))),
    Rule("layers/w3", P + "block_sparse_moe.experts.{e}.w3.weight", True, _T, _T,
         lambda c: (c.intermediate_size, _d(c))),
    Rule("layers/w2", P + "block_sparse_moe.experts.{e}.w2.weight", True, _T, _T,
         lambda c: (_d(c), c.intermediate_size)),
)

# transformers 5's fused layout (`save_pretrained(..., save_original_format=False)`): the router
# moves to mlp.gate, and each layer's experts are one tensor each.
FUSED_ROUTER = P + "mlp.gate.weight"
FUSED_GATE_UP = P + "mlp.experts.gate_up_proj"  # [E, 2F, D]: w1 rows then w3 rows
FUSED_DOWN = P + "mlp.experts.down_proj"  # [E, D, F]


def fused_gate_up_to_ours(x_E2FD: np.ndarray, cfg: MixtralConfig) -> tuple[np.ndarray, np.ndarray]:
    F = cfg.intermediate_size
    return (np.ascontiguousarray(x_E2FD[:, :F, :].transpose(0, 2, 1)),
            np.ascontiguousarray(x_E2FD[:, F:, :].transpose(0, 2, 1)))


def fused_gate_up_to_hf(w1_EDF: np.ndarray, w3_EDF: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([w1_EDF, w3_EDF], axis=2).transpose(0, 2, 1))


def fused_down_to_ours(x_EDF: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x_EDF.transpose(0, 2, 1))


def fused_down_to_hf(w2_EFD: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w2_EFD.transpose(0, 2, 1))


def rules_for(cfg: MixtralConfig) -> tuple[Rule, ...]:
    return tuple(r for r in RULES if not (r.ours == "lm_head" and cfg.tie_word_embeddings))
