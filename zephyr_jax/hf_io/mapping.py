"""Declarative map between zephyr_jax parameters and Hugging Face Mixtral tensor names.

Our parameters (see `zephyr_jax.model.mixtral.LAYER_PARAMS`) are stacked over layers and, for
experts, over experts. Each rule names one HF tensor (with `{l}` for the layer, `{e}` for the
expert), the leaves of ours it holds, and two small transforms between the HF tensor and the
matching *slices* of those leaves: `leaf[l]` for a per-layer rule, `leaf[l, e]` for a per-expert
rule, the whole leaf for a global one. HF Linear weights are [out, in]; ours are [in, ...out] so
einsums read left to right.

Two HF layouts exist (REFERENCE.md): "per_expert" (the public Mixtral/Zephyr checkpoints and
transformers' save default) and "fused" (transformers 5's `save_original_format=False`). Everything
that reads or writes HF names goes through `LAYOUTS`; the helpers below turn one layer at a time,
which is what lets conversion stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from zephyr_jax.config import MixtralConfig


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF name; {l} = layer, {e} = expert
    ours: tuple[str, ...]  # our leaves it holds: "embed", "final_norm", "lm_head", "layers/<name>"
    to_ours: Callable[[np.ndarray, MixtralConfig], tuple[np.ndarray, ...]]  # one slice per `ours`
    to_hf: Callable[[tuple[np.ndarray, ...], MixtralConfig], np.ndarray]
    hf_shape: Callable[[MixtralConfig], tuple[int, ...]]

    @property
    def per_layer(self) -> bool:
        return "{l}" in self.hf

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf


def _c(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x)


def _one(f: Callable[[np.ndarray, MixtralConfig], np.ndarray]):
    """Lift a one-leaf transform to the tuple form rules use."""
    return lambda x, cfg: (f(x, cfg),)


def _same(x, cfg):
    return x


def _T(x, cfg):
    return _c(x.T)


def _heads_in(n: Callable[[MixtralConfig], int]):
    """HF [n*H, D] <-> ours [D, n, H] (q/k/v projections)."""
    return (_one(lambda x, cfg: _c(x.T).reshape(cfg.hidden_size, n(cfg), cfg.kv_head_dim)),
            lambda p, cfg: _c(p[0].reshape(cfg.hidden_size, -1).T))


_q = _heads_in(lambda c: c.num_attention_heads)
_kv = _heads_in(lambda c: c.num_key_value_heads)


def _o_to_ours(x, cfg):  # HF [D, N*H] -> ours [N, H, D]
    return _c(x.T).reshape(cfg.num_attention_heads, cfg.kv_head_dim, cfg.hidden_size)


def _o_to_hf(p, cfg):
    return _c(p[0].reshape(-1, cfg.hidden_size).T)


def _gate_up_to_ours(x_E2FD, cfg):  # HF [E, 2F, D]: w1 rows then w3 rows -> ours 2 x [E, D, F]
    F = cfg.intermediate_size
    return _c(x_E2FD[:, :F, :].transpose(0, 2, 1)), _c(x_E2FD[:, F:, :].transpose(0, 2, 1))


def _gate_up_to_hf(p, cfg):
    w1_EDF, w3_EDF = p
    return _c(np.concatenate([w1_EDF, w3_EDF], axis=2).transpose(0, 2, 1))


def _swap_last(x, cfg):  # HF down_proj [E, D, F] <-> ours w2 [E, F, D]
    return _c(x.transpose(0, 2, 1))


def _d(c):
    return c.hidden_size


def _nh(c):
    return c.num_attention_heads * c.kv_head_dim


def _kh(c):
    return c.num_key_value_heads * c.kv_head_dim


_SAME, _TR = (_one(_same), lambda p, cfg: p[0]), (_one(_T), lambda p, cfg: _T(p[0], cfg))
P = "model.layers.{l}."

_COMMON: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed",), *_SAME, lambda c: (c.vocab_size, _d(c))),
    Rule("model.norm.weight", ("final_norm",), *_SAME, lambda c: (_d(c),)),
    Rule("lm_head.weight", ("lm_head",), *_TR, lambda c: (c.vocab_size, _d(c))),
    Rule(P + "input_layernorm.weight", ("layers/input_norm",), *_SAME, lambda c: (_d(c),)),
    Rule(P + "post_attention_layernorm.weight", ("layers/post_attn_norm",), *_SAME,
         lambda c: (_d(c),)),
    Rule(P + "self_attn.q_proj.weight", ("layers/wq",), *_q, lambda c: (_nh(c), _d(c))),
    Rule(P + "self_attn.k_proj.weight", ("layers/wk",), *_kv, lambda c: (_kh(c), _d(c))),
    Rule(P + "self_attn.v_proj.weight", ("layers/wv",), *_kv, lambda c: (_kh(c), _d(c))),
    Rule(P + "self_attn.o_proj.weight", ("layers/wo",), _one(_o_to_ours), _o_to_hf,
         lambda c: (_d(c), _nh(c))),
)

LAYOUTS: dict[str, tuple[Rule, ...]] = {
    # The public Mixtral / Zephyr checkpoints; transformers' save default.
    "per_expert": _COMMON + (
        Rule(P + "block_sparse_moe.gate.weight", ("layers/router",), *_TR,
             lambda c: (c.num_local_experts, _d(c))),
        Rule(P + "block_sparse_moe.experts.{e}.w1.weight", ("layers/w1",), *_TR,
             lambda c: (c.intermediate_size, _d(c))),
        Rule(P + "block_sparse_moe.experts.{e}.w3.weight", ("layers/w3",), *_TR,
             lambda c: (c.intermediate_size, _d(c))),
        Rule(P + "block_sparse_moe.experts.{e}.w2.weight", ("layers/w2",), *_TR,
             lambda c: (_d(c), c.intermediate_size)),
    ),
    # transformers 5's `save_pretrained(..., save_original_format=False)`.
    "fused": _COMMON + (
        Rule(P + "mlp.gate.weight", ("layers/router",), *_TR,
             lambda c: (c.num_local_experts, _d(c))),
        Rule(P + "mlp.experts.gate_up_proj", ("layers/w1", "layers/w3"), _gate_up_to_ours,
             _gate_up_to_hf,
             lambda c: (c.num_local_experts, 2 * c.intermediate_size, _d(c))),
        Rule(P + "mlp.experts.down_proj", ("layers/w2",), _one(_swap_last),
             lambda p, cfg: _swap_last(p[0], cfg),
             lambda c: (c.num_local_experts, _d(c), c.intermediate_size)),
    ),
}
DEFAULT_LAYOUT = "per_expert"

# Our leaves stacked over experts (axis 1 of the leaf, axis 0 of one layer's slice).
EXPERT_LEAVES = ("layers/w1", "layers/w3", "layers/w2")

# Buffers some exporters leave in checkpoints; they carry no weights and are skipped on read.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def rules_for(cfg: MixtralConfig, layout: str = DEFAULT_LAYOUT) -> tuple[Rule, ...]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown HF layout {layout!r}; have {sorted(LAYOUTS)}")
    return tuple(r for r in LAYOUTS[layout]
                 if not ("lm_head" in r.ours and cfg.tie_word_embeddings))


def _names(rule: Rule, cfg: MixtralConfig, layer: int | None) -> Iterator[tuple[str, int | None]]:
    """(HF name, expert) for one rule at one layer (`layer` None for global rules)."""
    if rule.per_expert:
        for e in range(cfg.num_local_experts):
            yield rule.hf.format(l=layer, e=e), e
    elif rule.per_layer:
        yield rule.hf.format(l=layer), None
    else:
        yield rule.hf, None


def groups(cfg: MixtralConfig) -> list[int | None]:
    """The units conversion streams through: None (global tensors), then each layer."""
    return [None, *range(cfg.num_hidden_layers)]


def _group_rules(cfg: MixtralConfig, layout: str, layer: int | None) -> Iterator[Rule]:
    return (r for r in rules_for(cfg, layout) if r.per_layer == (layer is not None))


def group_names(cfg: MixtralConfig, layout: str, layer: int | None) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor in one group (global tensors for `layer` None)."""
    return {name: tuple(rule.hf_shape(cfg))
            for rule in _group_rules(cfg, layout, layer) for name, _ in _names(rule, cfg, layer)}


def expected_tensors(cfg: MixtralConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the layout holds for `cfg`, with its shape, in group order."""
    return {name: shape for g in groups(cfg) for name, shape in group_names(cfg, layout, g).items()}


_ROUTERS = {layout: next(r.hf.format(l=0) for r in rules if "layers/router" in r.ours)
            for layout, rules in LAYOUTS.items()}


def detect_layout(names: Iterable[str]) -> str:
    """Which layout a set of HF names uses, judged by layer 0's router."""
    names = set(names)
    found = [layout for layout, router in _ROUTERS.items() if router in names]
    if len(found) != 1:
        raise ValueError(f"cannot tell the expert layout: expected exactly one of "
                         f"{sorted(_ROUTERS.values())}, found {found or 'neither'}")
    return found[0]


def group_to_ours(cfg: MixtralConfig, layout: str, layer: int | None,
                  read: Callable[[str], np.ndarray],
                  leaves: Iterable[str] | None = None,
                  experts: range | None = None) -> dict[str, np.ndarray]:
    """Our slices for one group: `leaf[layer]` per layer leaf, whole leaves for `layer` None.

    `read(hf_name)` returns the HF tensor (already checked against `rule.hf_shape`); only the
    tensors holding `leaves` (default: all of the group's) are read. `experts` (a contiguous range)
    keeps only those experts of the expert-stacked leaves (`EXPERT_LEAVES`, axis 0 of a layer
    slice); in the per-expert layout the other experts' tensors are not read at all.
    """
    leaves = None if leaves is None else set(leaves)
    if experts is not None and (experts.step != 1 or not 0 <= experts.start < experts.stop
                                <= cfg.num_local_experts):
        raise ValueError(f"experts must be a contiguous range within 0..{cfg.num_local_experts}, "
                         f"got {experts}")
    out: dict[str, np.ndarray] = {}
    for rule in _group_rules(cfg, layout, layer):
        wanted = [(i, leaf) for i, leaf in enumerate(rule.ours) if leaves is None or leaf in leaves]
        if not wanted:
            continue
        for name, e in _names(rule, cfg, layer):
            if e is not None and experts is not None and e not in experts:
                continue
            part = rule.to_ours(read(name), cfg)
            for i, leaf in wanted:
                x = part[i]
                if e is None:
                    if experts is not None and leaf in EXPERT_LEAVES:  # fused: all experts in one
                        x = np.ascontiguousarray(x[experts.start:experts.stop])
                    out[leaf] = x
                    continue
                # fill the [E, ...] slice in place: no second copy of the layer
                j = e - (0 if experts is None else experts.start)
                if j == 0:
                    n = cfg.num_local_experts if experts is None else len(experts)
                    out[leaf] = np.empty((n, *x.shape), x.dtype)
                out[leaf][j] = x
    return out


def group_to_hf(cfg: MixtralConfig, layout: str, layer: int | None,
                ours: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """HF tensors of one group from our slices (the inverse of `group_to_ours`), in the order of
    `group_names`."""
    for rule in _group_rules(cfg, layout, layer):
        for name, e in _names(rule, cfg, layer):
            parts = tuple(ours[leaf] if e is None else ours[leaf][e] for leaf in rule.ours)
            yield name, rule.to_hf(parts, cfg)


def group_leaves(cfg: MixtralConfig, layout: str, layer: int | None) -> list[str]:
    """Our leaves one group holds."""
    return sorted({leaf for rule in _group_rules(cfg, layout, layer) for leaf in rule.ours})


def tensors_of_leaves(cfg: MixtralConfig, layout: str) -> dict[str, list[str]]:
    """Our leaf -> the HF tensor names holding (a part of) it."""
    out: dict[str, list[str]] = {}
    for g in groups(cfg):
        for rule in _group_rules(cfg, layout, g):
            for name, _ in _names(rule, cfg, g):
                for leaf in rule.ours:
                    out.setdefault(leaf, []).append(name)
    return out


def hf_dtypes(cfg: MixtralConfig, layout: str, leaf_dtypes: dict[str, np.dtype]) -> dict[str, np.dtype]:
    """Dtype of each HF tensor written from leaves of the given dtypes."""
    return {name: np.result_type(*(leaf_dtypes[leaf] for leaf in rule.ours))
            for g in groups(cfg) for rule in _group_rules(cfg, layout, g)
            for name, _ in _names(rule, cfg, g)}
