"""Hugging Face checkpoints: the name map, checked safetensors reading, streaming conversion."""

from zephyr_jax.hf_io.load import load_hf_params
from zephyr_jax.hf_io.safetensors_io import CheckpointError
from zephyr_jax.hf_io.streaming import hf_to_jax, jax_to_hf, save_hf

__all__ = ["CheckpointError", "hf_to_jax", "jax_to_hf", "load_hf_params", "save_hf"]
