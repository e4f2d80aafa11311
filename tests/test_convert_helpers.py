"""Helpers (no tests): tiny HF Mixtrals saved by transformers, folder comparisons, file surgery."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers
from safetensors import safe_open

TINY = dict(vocab_size=67, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=32, rope_theta=1e4)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_hf_model(dtype: str = "float32", seed: int = 0, **overrides) -> transformers.MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(**{**TINY, **overrides}, experts_implementation="eager")
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 1.0: make them distinct so transposition bugs show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(TORCH_DTYPES[dtype])


def save_hf(model, path, layout: str = "per_expert", max_shard_size: str = "12KB") -> str:
    """Save with transformers, really sharded; layout "fused" = save_original_format=False."""
    kwargs = {"save_original_format": False} if layout == "fused" else {}
    model.save_pretrained(path, max_shard_size=max_shard_size, **kwargs)
    return os.fspath(path)


def save_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(40)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


def shard_files(path) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


def read_tensors(path) -> dict[str, np.ndarray]:
    out = {}
    for f in shard_files(path):
        with safe_open(os.path.join(path, f), "np") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def assert_bitwise_equal(a_dir, b_dir) -> None:
    a, b = read_tensors(a_dir), read_tensors(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def index(path) -> dict:
    with open(os.path.join(path, "model.safetensors.index.json")) as fh:
        return json.load(fh)


def rewrite_shard(path, file: str, change) -> None:
    """Rewrite one shard with `change(dict of tensors)` applied, via safetensors' own writer."""
    from safetensors.numpy import save_file

    full = os.path.join(path, file)
    with safe_open(full, "np") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}
    change(tensors)
    save_file(tensors, full, metadata={"format": "pt"})


def set_index(path, change) -> None:
    idx = index(path)
    change(idx["weight_map"])
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump(idx, fh)
