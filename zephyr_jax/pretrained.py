"""`from_pretrained` / `save_pretrained`: a ready Mixtral from, or to, either checkpoint format.

Formats: a HF folder (config.json + safetensors, per-expert or fused experts), a zephyr_jax model
checkpoint (config.json + orbax params/, see `zephyr_jax.model_checkpoint`), or a trainer
output_dir (its latest step's params).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from zephyr_jax import model_checkpoint as mc
from zephyr_jax.config import DTYPES, MixtralConfig
from zephyr_jax.hf_io.load import load_hf_params, load_hf_sharded
from zephyr_jax.hf_io.streaming import HFSource, save_hf
from zephyr_jax.model import Mixtral, model_from_params, params_dict

FORMATS = ("hf", "orbax")


def from_pretrained(path: str | os.PathLike, mesh=None, **runtime: Any) -> Mixtral:
    """Load a Mixtral from a HF folder or Hub id, a model checkpoint or a trainer output_dir.

    `runtime` sets our runtime fields, e.g. `dtype="bfloat16", moe_impl="dense"`. Parameters take
    `param_dtype`: float32 unless given; "auto" keeps the dtype stored in the checkpoint (as
    transformers' `dtype="auto"`); orbax checkpoints are cast while restoring.

    `mesh` (a `jax.sharding.Mesh`, a `sharding.MeshConfig`, or a `--mesh` string such as
    "expert=8" or "data=2,expert=4") places every parameter straight onto its devices by the
    default sharding rules (experts split over `expert`, the rest FSDP), for models too large for
    one device; `generate` then runs expert-parallel on that mesh by itself. With
    `moe_exchange="ragged"` the exchange is first compared with the padded one on the mesh
    (`expert_parallel.check_exchange`), as the trainer does.
    """
    shardings = None
    if mesh is not None:
        from zephyr_jax import sharding as zs

        mesh = as_mesh(mesh)
        cfg = config_of(path, **runtime)
        # the expert check (and the rules'), at load: an expert axis that does not divide the
        # experts used to load (weights replicated, with a warning) and fail at the first call;
        # a batch of one per batch shard passes the batch check, which generation sizes itself
        zs.validate(mesh, cfg, math.prod(mesh.shape[a] for a in zs.batch_axes(mesh)))
        shardings = zs.params_dict_shardings(cfg, mesh)
        if cfg.moe_exchange == "ragged":  # unproven on GPUs: checked on these devices first
            from zephyr_jax.model.expert_parallel import check_exchange

            check_exchange(mesh)
    return model_from_params(*load_params(path, shardings=shardings, **runtime))


def as_mesh(mesh):
    """A `jax.sharding.Mesh` from a Mesh, a `MeshConfig`, or a `--mesh` string."""
    import jax

    from zephyr_jax import sharding as zs

    if isinstance(mesh, jax.sharding.Mesh):
        return mesh
    if isinstance(mesh, str):
        mesh = zs.parse_mesh(mesh)
    if isinstance(mesh, zs.MeshConfig):
        return zs.make_mesh(mesh)
    raise TypeError(f"mesh must be a jax.sharding.Mesh, a MeshConfig or a string like 'expert=8', "
                    f"got {type(mesh).__name__}")


def config_of(path: str | os.PathLike, **runtime: Any) -> MixtralConfig:
    """The config `load_params(path, **runtime)` will return, without reading any weight."""
    path = resolve_path(path)
    runtime = _resolve_param_dtype(path, runtime)
    if _is_model_checkpoint(path):
        return mc.load_model_config(path, dtype=runtime["param_dtype"], **runtime)
    return MixtralConfig.from_hf(path, **runtime)


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
    its devices' blocks, never the model). `param_dtype="auto"` keeps the stored dtype."""
    path = resolve_path(path)
    runtime = _resolve_param_dtype(path, runtime)
    if _is_model_checkpoint(path):
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


def _resolve_param_dtype(path: str, runtime: dict) -> dict:
    """param_dtype: float32 when not given; "auto" -> the checkpoint's stored dtype, or where the
    stored dtypes differ, config.json's dtype (an error naming a tensor of each if it has none)."""
    runtime = dict(runtime)
    runtime.setdefault("param_dtype", "float32")
    if runtime["param_dtype"] != "auto":
        return runtime
    if _is_model_checkpoint(path):
        stored = mc.stored_dtypes(path)
    else:
        with HFSource(path, MixtralConfig.from_hf(path)) as src:
            stored = {k: np.dtype(v).name for k, v in src.leaf_dtypes().items()}
    kinds = sorted(set(stored.values()))
    if len(kinds) == 1:
        runtime["param_dtype"] = kinds[0]
        return runtime
    # Mixed (e.g. float32 norms): config.json's dtype decides, as in transformers' "auto".
    with open(os.path.join(path, "config.json")) as fh:
        hf = json.load(fh)
    declared = hf.get("dtype") or hf.get("torch_dtype")
    if declared not in DTYPES:
        first = {d: next(k for k, v in stored.items() if v == d) for d in kinds}
        raise ValueError(f"{path}: param_dtype='auto' found stored dtypes "
                         + ", ".join(f"{d} ({first[d]})" for d in kinds)
                         + f" and config.json names none of {DTYPES} as its dtype; pass "
                         "param_dtype explicitly")
    runtime["param_dtype"] = declared
    return runtime


def _is_model_checkpoint(path: str) -> bool:
    """Ours (orbax params, or a trainer output_dir), not a HF folder."""
    return os.path.isdir(path) and not _has_hf_weights(path)


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
