"""Read a Hugging Face Mixtral folder (config.json + safetensors) into zephyr_jax parameters."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from safetensors import safe_open

from zephyr_jax.config import MixtralConfig
from zephyr_jax.hf_io import mapping


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the file and tensor."""


def _index(hf_dir: str) -> dict[str, str]:
    """tensor name -> safetensors file, from the index or by scanning the files."""
    idx_path = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(idx_path):
        with open(idx_path) as fh:
            weight_map = json.load(fh)["weight_map"]
        return {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        bins = glob.glob(os.path.join(hf_dir, "*.bin")) + glob.glob(os.path.join(hf_dir, "*.pt"))
        if bins:
            raise CheckpointError(f"{hf_dir}: only pickle checkpoints ({os.path.basename(bins[0])}); "
                                  "safetensors is required (pickle files are never loaded)")
        raise CheckpointError(f"{hf_dir}: no *.safetensors files")
    out = {}
    for f in files:
        with safe_open(f, "np") as st:
            for k in st.keys():
                out[k] = f
    return out


def load_hf_params(hf_dir: str, cfg: MixtralConfig | None = None) -> tuple[MixtralConfig, dict]:
    """Whole-model loader: numpy params in our layout (param_dtype of `cfg`)."""
    cfg = cfg or MixtralConfig.from_hf(hf_dir)
    where = _index(hf_dir)
    dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else None
    handles: dict[str, object] = {}

    def read(name: str, shape) -> np.ndarray:
        if name not in where:
            raise CheckpointError(f"{hf_dir}: missing tensor {name!r}")
        f = where[name]
        if f not in handles:
            handles[f] = safe_open(f, "np")
        x = handles[f].get_tensor(name)
        if tuple(x.shape) != tuple(shape):
            raise CheckpointError(f"{f}: tensor {name!r} has shape {tuple(x.shape)}, "
                                  f"config.json implies {tuple(shape)}")
        return x

    fused = mapping.FUSED_GATE_UP.format(l=0) in where
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    params: dict = {"layers": {}}
    for rule in mapping.rules_for(cfg):
        if rule.ours.startswith("layers/"):
            key = rule.ours.split("/", 1)[1]
            if fused and key in ("w1", "w3", "w2", "router"):
                continue
            if rule.per_expert:
                t = np.stack([np.stack([rule.to_ours(read(rule.hf.format(l=l, e=e), rule.hf_shape(cfg)), cfg)
                                        for e in range(E)]) for l in range(L)])
            else:
                t = np.stack([rule.to_ours(read(rule.hf.format(l=l), rule.hf_shape(cfg)), cfg)
                              for l in range(L)])
            params["layers"][key] = t
        else:
            params[rule.ours] = rule.to_ours(read(rule.hf, rule.hf_shape(cfg)), cfg)
    if fused:
        D, F = cfg.hidden_size, cfg.intermediate_size
        w1, w3, w2, router = [], [], [], []
        for l in range(L):
            a, b = mapping.fused_gate_up_to_ours(read(mapping.FUSED_GATE_UP.format(l=l), (E, 2 * F, D)), cfg)
            w1.append(a)
            w3.append(b)
            w2.append(mapping.fused_down_to_ours(read(mapping.FUSED_DOWN.format(l=l), (E, D, F))))
            router.append(read(mapping.FUSED_ROUTER.format(l=l), (E, D)).T)
        params["layers"].update(w1=np.stack(w1), w3=np.stack(w3), w2=np.stack(w2), router=np.stack(router))
    return cfg, params
