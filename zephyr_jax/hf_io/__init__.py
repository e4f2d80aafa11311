"""Hugging Face checkpoints: the name map, reading and (later) writing safetensors."""
