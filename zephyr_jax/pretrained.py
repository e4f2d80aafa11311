"""`from_pretrained` / `save_pretrained`: a ready Mixtral from, or to, either checkpoint format.

Formats: a HF folder (config.json + safetensors, per-expert or fused experts), a zephyr_jax model
checkpoint (config.json + orbax params/, see `zephyr_jax.model_checkpoint`), or a trainer
output_dir (its latest step's params).
"""

from __future__ import annotations

import os
from typing import Any

from zephyr_jax import model_checkpoint as mc
from zephyr_jax.config import MixtralConfig
from zephyr_jax.hf_io.load import load_hf_params, load_hf_sharded
from zephyr_jax.hf_io.streaming import save_hf
from zephyr_jax.model import Mixtral, model_from_params, params_dict

FORMATS = ("hf", "orbax")


def from_pretrained(path: str | os.PathLike, **runtime: Any) -> Mixtral:
    """Load a Mixtral from a HF folder or Hub id, a model checkpoint or a trainer output_dir.

    `runtime` sets our runtime fields, e.g. `dtype="bfloat16", moe_impl="dense"`. Parameters take
    `param_dtype` (float32 unless given; orbax checkpoints are cast while restoring).
    """
    return model_from_params(*load_params(path, **runtime))


def resolve_path(path: str | os.PathLike) -> str:
    """A local folder as is; otherwise a Hugging Face Hub id, downloaded (config, safetensors,
    tokenizer files only: never pickles)."""
    path = os.fspath(path)
    if os.path.exists(path):
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*",
                                                       "*.jinja"])
    except Exception as e:  # offline, unknown repo, gated: say which and why
        raise FileNotFoundError(f"{path}: not a local folder, and fetching it from the Hugging "
                                f"Face Hub failed ({type(e).__name__}: {e})") from None


def load_params(path: str | os.PathLike, shardings=None, **runtime: Any) -> tuple[MixtralConfig, dict]:
    """(config, params) from any supported format. With `shardings` (a params-shaped tree of
    shardings), each parameter goes straight onto its devices: orbax checkpoints through orbax's
    sharded restore, HF folders block by block (`load_hf_sharded`: a host reads and holds only
    its devices' blocks, never the model)."""
    path = resolve_path(path)
    runtime.setdefault("param_dtype", "float32")
    if os.path.isdir(path) and not _has_hf_weights(path):
        return mc.load_model_checkpoint(path, shardings=shardings, dtype=runtime["param_dtype"],
                                        **runtime)
    import jax
    import jax.numpy as jnp

    cfg = MixtralConfig.from_hf(path, **runtime)
    # HF files keep their stored dtype; cast to param_dtype as the orbax path does, so a run that
    # starts from HF weights and one resumed from its checkpoint compile the same step.
    pdt = jnp.dtype(cfg.param_dtype)
    if shardings is not None:
        return load_hf_sharded(path, shardings, cfg, dtype=pdt)
    cfg, params = load_hf_params(path, cfg)
    return cfg, jax.tree.map(lambda x: x if x.dtype == pdt else x.astype(pdt), params)


def _has_hf_weights(path: str) -> bool:
    """A HF folder: safetensors (or pickles, which the HF loader refuses with a clear message)."""
    return any(f.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth"))
               for f in os.listdir(path))


def save_pretrained(model_or_params: Mixtral | dict, path: str | os.PathLike,
                    config: MixtralConfig | None = None, format: str = "hf", **kwargs: Any) -> None:
    """Save a model (or our params dict plus its `config`) as a HF folder or a model checkpoint.

    format="hf": kwargs of `zephyr_jax.hf_io.streaming.write_hf` (max_shard_size="5GB",
        fused_experts=False, dtype=None, tokenizer=None, overwrite=False).
    format="orbax": kwargs of `save_model_checkpoint` (tokenizer=None, overwrite=False).
    tokenizer: a transformers tokenizer or a folder of tokenizer files, saved alongside.
    The folder appears only when complete; an existing non-empty one needs overwrite=True.
    """
    if isinstance(model_or_params, Mixtral):
        params = params_dict(model_or_params)
        config = config or model_or_params.config
    else:
        params = model_or_params
        if config is None:
            raise ValueError("save_pretrained(params, ...) needs config=MixtralConfig(...)")
    if format == "hf":
        save_hf(params, config, path, **kwargs)
    elif format == "orbax":
        mc.save_model_checkpoint(path, config, params, **kwargs)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
