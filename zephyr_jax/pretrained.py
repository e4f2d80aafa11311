"""`from_pretrained`: build a ready Mixtral from a Hugging Face folder."""

from __future__ import annotations

import os
from typing import Any

from zephyr_jax.config import MixtralConfig
from zephyr_jax.hf_io.load import load_hf_params
from zephyr_jax.model import Mixtral, model_from_params


def from_pretrained(path: str | os.PathLike, **runtime: Any) -> Mixtral:
    """Load a Mixtral from an HF folder (config.json + safetensors, per-expert or fused experts).

    `runtime` sets our runtime fields, e.g. `dtype="bfloat16", moe_impl="dense"`.
    """
    path = os.fspath(path)
    cfg = MixtralConfig.from_hf(path, **runtime)
    cfg, params = load_hf_params(path, cfg)
    return model_from_params(cfg, params)
