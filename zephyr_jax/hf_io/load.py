"""Read a whole Hugging Face Mixtral folder (config.json + safetensors) into zephyr_jax parameters."""

from __future__ import annotations

import numpy as np

from zephyr_jax.config import MixtralConfig
from zephyr_jax.hf_io import mapping
from zephyr_jax.hf_io.safetensors_io import CheckpointError
from zephyr_jax.hf_io.streaming import HFSource

__all__ = ["CheckpointError", "load_hf_params"]


def load_hf_params(hf_dir: str, cfg: MixtralConfig | None = None) -> tuple[MixtralConfig, dict]:
    """Whole-model loader: numpy params in our layout, in the dtypes stored on disk.

    Either HF layout (per-expert or fused experts); every name, shape and dtype is checked before
    any data is read (`CheckpointError` names the file and tensor). Peak memory is the model plus
    one layer: layers are read one at a time into preallocated stacked arrays.
    """
    with HFSource(hf_dir, cfg) as src:
        cfg = src.cfg
        params: dict = {"layers": {}}
        for g in mapping.groups(cfg):
            for key, x in src.produce(g).items():
                if g is None:
                    params[key] = x
                    continue
                name = key.split("/", 1)[1]
                if g == 0:
                    params["layers"][name] = np.empty((cfg.num_hidden_layers, *x.shape), x.dtype)
                params["layers"][name][g] = x
    return cfg, params
