"""Model configuration: a frozen dataclass with Hugging Face's Mixtral field names.

Architecture fields round-trip through `from_hf` / `to_hf` (config.json). Runtime fields (dtypes,
MoE dispatch, remat) are ours and never written to config.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import yaml

MOE_IMPLS = ("auto", "dense", "ragged", "scan", "pallas", "tokamax", "capacity")
MOE_EXCHANGES = ("padded", "ragged")  # see zephyr_jax.model.expert_parallel
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_matmuls", "save_attention")
ATTENTION_IMPLS = ("xla", "dot_product_attention", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")

# config.json keys that carry no architecture we model; accepted and dropped by `from_hf`. Keys
# starting with "_" (transformers' own bookkeeping: "_name_or_path", "_attn_implementation_autoset"
# of transformers 4.48-4.51, ...) are dropped too, as transformers itself does not read them as
# model settings.
_HF_IGNORED = frozenset(
    {
        "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
        "attention_dropout", "initializer_range", "output_router_logits_in_generate",
        "return_dict", "output_hidden_states", "output_attentions",
        "pretraining_tp",
        "layer_types", "mlp_bias", "attention_bias", "auto_map", "chunk_size_feed_forward",
        "is_encoder_decoder", "tie_encoder_decoder", "problem_type", "id2label", "label2id",
        "task_specific_params", "finetuning_task", "tokenizer_class", "prefix", "sep_token_id",
        "decoder_start_token_id", "cross_attention_hidden_size", "add_cross_attention",
        "is_decoder", "bad_words_ids", "num_beams", "max_length", "min_length", "do_sample",
        "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
        "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "num_return_sequences",
        "early_stopping", "diversity_penalty", "num_beam_groups", "forced_bos_token_id",
        "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
        "suppress_tokens", "begin_suppress_tokens", "torchscript", "output_scores",
        "return_dict_in_generate", "tf_legacy_loss", "use_bfloat16", "pruned_heads",
        "chunk_size",
    }
)


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    # --- architecture (Hugging Face MixtralConfig names) ---
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    router_jitter_noise: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    # One id or several (a list in config.json, kept as a tuple here so the config stays
    # hashable); generation stops at any of them, as transformers' generate does.
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # --- runtime (ours; not in config.json) ---
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    moe_impl: str = "auto"  # per platform; see zephyr_jax.model.dispatch.auto_impl
    moe_capacity_factor: float = 1.25  # only for moe_impl="capacity"
    # expert parallelism's token exchange: "padded" (static worst case) or "ragged" (routed rows
    # only; unmeasured on GPUs); see zephyr_jax.model.expert_parallel
    moe_exchange: str = "padded"
    remat: str = "none"
    attention_impl: str = "xla"
    # the decoder layers as one `jax.lax.scan` (compile time independent of depth) or unrolled
    # (each layer its own code: no per-layer residual copies into loop-carried stacks, which
    # a scan's backward pass needs; compiles grow with depth: the 141B recipe's 4x8 plan takes
    # 4 min unrolled against 43 s on 2 cores, for 42.7 against 51.0 GiB per device under
    # remat "full", 47.9 against 58.3 under "save_attention": docs/PERFORMANCE.md). MaxText's
    # `scan_layers`.
    scan_layers: bool = True

    def __post_init__(self):
        def need(cond: bool, field: str, msg: str):
            if not cond:
                raise ConfigError(f"MixtralConfig.{field}: {msg} (got {getattr(self, field)!r})")

        if isinstance(self.eos_token_id, list):  # from JSON / YAML; a list cannot be hashed
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "num_local_experts",
                  "num_experts_per_tok", "max_position_embeddings"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f,
                 "must be a positive integer")
        if self.head_dim is None:
            need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
                 f"must divide hidden_size={self.hidden_size} when head_dim is not set")
        else:
            need(isinstance(self.head_dim, int) and self.head_dim > 0, "head_dim",
                 "must be a positive integer or null")
        need(self.kv_head_dim % 2 == 0, "head_dim" if self.head_dim else "hidden_size",
             f"RoPE needs an even head dimension, got {self.kv_head_dim}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"must divide num_attention_heads={self.num_attention_heads}")
        need(self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok",
             f"top-k cannot exceed num_local_experts={self.num_local_experts}")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (Mixtral's SwiGLU) is supported")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.sliding_window is None or (isinstance(self.sliding_window, int)
                                             and self.sliding_window > 0),
             "sliding_window", "must be a positive integer or null")
        need(self.router_aux_loss_coef >= 0, "router_aux_loss_coef", "must be >= 0")
        need(self.router_jitter_noise == 0, "router_jitter_noise",
             "jitter noise is not supported (Mixtral ships 0)")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}")
        need(self.moe_impl in MOE_IMPLS, "moe_impl", f"must be one of {MOE_IMPLS}")
        need(self.moe_impl != "tokamax" or self.dtype in ("bfloat16", "float16"), "moe_impl",
             f"'tokamax' computes in bfloat16/float16 only, and dtype is {self.dtype!r} "
             "('auto' picks another implementation for float32)")
        need(self.moe_capacity_factor > 0, "moe_capacity_factor", "must be > 0")
        need(self.moe_exchange in MOE_EXCHANGES, "moe_exchange", f"must be one of {MOE_EXCHANGES}")
        need(self.remat in REMAT_POLICIES, "remat", f"must be one of {REMAT_POLICIES}")
        need(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
             f"must be one of {ATTENTION_IMPLS}")
        need(isinstance(self.scan_layers, bool), "scan_layers", "must be true or false")
        need(self.eos_token_id is None or _is_token_id(self.eos_token_id)
             or (isinstance(self.eos_token_id, tuple) and len(self.eos_token_id) > 0
                 and all(_is_token_id(t) for t in self.eos_token_id)),
             "eos_token_id", "must be a token id, a non-empty list of them, or null")
        need(self.pad_token_id is None or _is_token_id(self.pad_token_id), "pad_token_id",
             "must be a token id or null")

    # --- derived ---
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every EOS id (none when eos_token_id is null): what generation stops at."""
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else eos

    @property
    def kv_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def num_params(self) -> int:
        d, f, e, v = self.hidden_size, self.intermediate_size, self.num_local_experts, self.vocab_size
        h, kv, dh = self.num_attention_heads, self.num_key_value_heads, self.kv_head_dim
        attn = d * h * dh * 2 + d * kv * dh * 2
        layer = attn + d * e + 3 * e * d * f + 2 * d
        return self.num_hidden_layers * layer + v * d * (1 if self.tie_word_embeddings else 2) + d

    @property
    def num_active_params(self) -> int:
        """Parameters a token touches (top-k experts), embeddings counted once for the head."""
        d, f, k = self.hidden_size, self.intermediate_size, self.num_experts_per_tok
        h, kv, dh = self.num_attention_heads, self.num_key_value_heads, self.kv_head_dim
        attn = d * h * dh * 2 + d * kv * dh * 2
        layer = attn + d * self.num_local_experts + 3 * k * d * f + 2 * d
        return self.num_hidden_layers * layer + self.vocab_size * d * 2 + d

    def replace(self, **changes: Any) -> MixtralConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"MixtralConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    # --- Hugging Face config.json ---
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | os.PathLike, **runtime: Any) -> MixtralConfig:
        """Build from a config.json dict (or a path to config.json / its folder)."""
        source = "config dict"
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            try:
                with open(path) as fh:
                    hf = json.load(fh)
            except FileNotFoundError:
                raise ConfigError(f"{path}: config.json not found") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object of config keys, got "
                              f"{type(hf).__name__} {json.dumps(hf)[:80]}")
        model_type = hf.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise ConfigError(f"{source}: model_type is {model_type!r}; only 'mixtral' is supported")
        hf = dict(hf)
        if hf.get("quantization_config"):
            raise ConfigError(f"{source}: quantized checkpoints are not supported")
        # transformers 5 nests rope_theta in rope_parameters; 4.x kept it top level (+ rope_scaling).
        rope = hf.pop("rope_parameters", None) or {}
        scaling = hf.pop("rope_scaling", None)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if scaling or rope_type != "default":
            raise ConfigError(f"{source}: rope scaling {scaling or rope!r} is not supported "
                              "(Mixtral uses plain RoPE)")
        if "rope_theta" in rope:
            hf.setdefault("rope_theta", rope["rope_theta"])
        arch = {f.name for f in dataclasses.fields(cls)} - _RUNTIME_FIELDS
        kwargs = {}
        for key, value in hf.items():
            if key in arch:
                kwargs[key] = value
            elif not (key.startswith("_") or key in _HF_IGNORED):
                raise ConfigError(f"{source}: unknown Mixtral config key {key!r}")
        try:
            return cls(**kwargs, **runtime)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in _RUNTIME_FIELDS}
        if out["head_dim"] is None:
            out["head_dim"] = self.kv_head_dim
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        out.update(model_type="mixtral", architectures=["MixtralForCausalLM"],
                   dtype=self.param_dtype, initializer_range=0.02, attention_dropout=0.0,
                   use_cache=True)
        return out

    # --- YAML ---
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model config") -> MixtralConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown model key(s) {unknown}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> MixtralConfig:
        with open(path) as fh:
            d = yaml.safe_load(fh) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping of MixtralConfig fields")
        return cls.from_dict(d, source=os.fspath(path))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MixtralConfig:
        """A config shipped in configs/model/NAME.yaml (tiny, demo, bench, mixtral-8x22b, ...)."""
        path = os.path.join(CONFIG_DIR, "model", f"{name}.yaml")
        if not os.path.exists(path):
            have = sorted(p[:-5] for p in os.listdir(os.path.join(CONFIG_DIR, "model")))
            raise ConfigError(f"no model preset {name!r}; have {have}")
        return cls.from_yaml(path).replace(**overrides)


def _is_token_id(x: Any) -> bool:
    # Any int: some published configs carry -1 ("none"), which transformers accepts too.
    return isinstance(x, int) and not isinstance(x, bool)


_RUNTIME_FIELDS = frozenset(
    {"dtype", "param_dtype", "moe_impl", "moe_capacity_factor", "moe_exchange", "remat",
     "attention_impl", "scan_layers"}
)

# Presets live in the repository's configs/ (the package is installed editable, as the README says).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
