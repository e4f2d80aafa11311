"""`python -m zephyr_jax.convert`: HF -> orbax -> HF round trips, and transformers reading our export."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
import transformers
from test_convert_helpers import (
    TORCH_DTYPES,
    assert_bitwise_equal,
    index,
    make_hf_model,
    read_tensors,
    save_hf,
    save_tokenizer,
    shard_files,
)

from zephyr_jax import model_checkpoint as mc
from zephyr_jax.convert import main
from zephyr_jax.hf_io import mapping
from zephyr_jax.hf_io.safetensors_io import parse_size


def _run(*argv) -> None:
    assert main([*argv, "--quiet"]) == 0


@pytest.mark.parametrize(
    ("layout", "dtype"),
    [("per_expert", "float32"), ("fused", "float32"), ("per_expert", "bfloat16"),
     ("fused", "bfloat16"), ("per_expert", "float16")],
)
def test_round_trip_is_bitwise(tmp_path, layout, dtype):
    src = save_hf(make_hf_model(dtype), tmp_path / "hf", layout)
    assert len(index(src)["weight_map"]) > 1 and len(shard_files(src)) > 2  # really sharded
    _run("hf-to-jax", "--hf", src, "--out", str(tmp_path / "ckpt"))
    cfg, params = mc.load_model_checkpoint(tmp_path / "ckpt")
    assert cfg.param_dtype == dtype
    assert {str(x.dtype) for x in mc.flatten(params).values()} == {dtype}
    out = tmp_path / "back"
    _run("jax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out),
         "--max-shard-size", "12KB", *(["--fused-experts"] if layout == "fused" else []))
    assert_bitwise_equal(src, out)
    assert len(shard_files(out)) > 2
    assert set(index(out)["weight_map"]) == set(read_tensors(out))


def test_checkpoint_keeps_stacked_layout_chunked_per_layer(tmp_path):
    src = save_hf(make_hf_model(), tmp_path / "hf")
    _run("hf-to-jax", "--hf", src, "--out", str(tmp_path / "ckpt"))
    cfg, params = mc.load_model_checkpoint(tmp_path / "ckpt")
    ref = read_tensors(src)
    w1 = np.asarray(params["layers"]["w1"])
    assert w1.shape == (2, 4, 16, 24)  # [L, E, D, F]
    np.testing.assert_array_equal(w1[1, 3], ref["model.layers.1.block_sparse_moe.experts.3.w1.weight"].T)
    wq = np.asarray(params["layers"]["wq"])  # [L, D, N, H]
    np.testing.assert_array_equal(wq[0].reshape(16, -1).T, ref["model.layers.0.self_attn.q_proj.weight"])
    import orbax.checkpoint as ocp

    meta = mc.flatten(dict(ocp.PyTreeCheckpointer().metadata(tmp_path / "ckpt" / "params").item_metadata.tree))
    assert meta["layers/w1"].storage.chunk_shape == (1, 1, 16, 24)
    assert meta["layers/wq"].storage.chunk_shape == (1, 16, 2, 8)
    with open(tmp_path / "ckpt" / "config.json") as fh:
        assert json.load(fh)["dtype"] == "float32"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize(("fused", "dtype"), [(False, "float32"), (True, "float32"),
                                              (False, "bfloat16")])
def test_transformers_loads_export_without_warnings_and_logits_match(tmp_path, fused, dtype):
    hf_model = make_hf_model(dtype, seed=3)
    src = save_hf(hf_model, tmp_path / "hf")
    save_tokenizer(tmp_path / "tok")
    _run("hf-to-jax", "--hf", src, "--out", str(tmp_path / "ckpt"))
    out = tmp_path / "export"
    _run("jax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out), "--tokenizer",
         str(tmp_path / "tok"), *(["--fused-experts"] if fused else []))
    names = set(read_tensors(out))
    assert ("model.layers.0.mlp.experts.gate_up_proj" in names) == fused
    assert ("model.layers.0.block_sparse_moe.experts.0.w1.weight" in names) == (not fused)

    records = _Records()
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(records)
    try:
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
            out, output_loading_info=True, experts_implementation="eager")
    finally:
        tf_logger.removeHandler(records)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    bad = [m for m in records.messages
           if any(w in m.lower() for w in ("missing", "unexpected", "not initialized",
                                            "newly initialized", "not used"))]
    assert not bad, bad
    assert loaded.config.model_type == "mixtral"
    assert loaded.config.architectures == ["MixtralForCausalLM"]
    assert loaded.config.rope_parameters["rope_theta"] == 1e4 != transformers.MixtralConfig().rope_parameters["rope_theta"]
    assert loaded.dtype == TORCH_DTYPES[dtype]
    ids = torch.tensor([[1, 5, 9, 33, 2, 7, 60]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hf_model(ids).logits)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "</s>"
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)


def test_tokenizer_and_generation_config_travel_with_the_checkpoint(tmp_path):
    src = save_hf(make_hf_model(), tmp_path / "hf")
    save_tokenizer(src)
    _run("hf-to-jax", "--hf", src, "--out", str(tmp_path / "ckpt"))
    assert os.path.exists(tmp_path / "ckpt" / "tokenizer.json")
    _run("jax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with open(tmp_path / "hf" / f) as a, open(tmp_path / "out" / f) as b:
            assert a.read() == b.read(), f


def test_dtype_option_casts(tmp_path):
    src = save_hf(make_hf_model("float32"), tmp_path / "hf")
    _run("hf-to-jax", "--hf", src, "--out", str(tmp_path / "ckpt"), "--dtype", "bfloat16")
    cfg, params = mc.load_model_checkpoint(tmp_path / "ckpt")
    assert cfg.param_dtype == "bfloat16"
    _run("jax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "f16"),
         "--dtype", "float16")
    got, ref = read_tensors(tmp_path / "f16"), read_tensors(src)
    assert {str(v.dtype) for v in got.values()} == {"float16"}
    with open(tmp_path / "f16" / "config.json") as fh:
        assert json.load(fh)["dtype"] == "float16"
    name = "model.layers.1.self_attn.o_proj.weight"
    np.testing.assert_allclose(got[name], ref[name], rtol=1e-2, atol=1e-4)  # bf16 rounding


def test_shards_respect_max_shard_size(tmp_path):
    src = save_hf(make_hf_model(), tmp_path / "hf")
    _run("hf-to-jax", "--hf", src, "--out", str(tmp_path / "ckpt"))
    _run("jax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
         "--max-shard-size", "8KB")
    files = shard_files(tmp_path / "out")
    biggest = max(np.prod(s) * 4 for s in mapping.expected_tensors(
        mc.load_model_checkpoint(tmp_path / "ckpt")[0], "per_expert").values())
    assert len(files) > 3
    for f in files:
        data_bytes = os.path.getsize(tmp_path / "out" / f)
        assert data_bytes <= max(8000, biggest) + 8192  # + header
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert index(tmp_path / "out")["metadata"]["total_size"] == sum(
        v.nbytes for v in read_tensors(tmp_path / "out").values())
    # one shard: transformers' single-file name, no index
    _run("jax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "one"))
    assert shard_files(tmp_path / "one") == ["model.safetensors"]
    assert not os.path.exists(tmp_path / "one" / "model.safetensors.index.json")
    assert_bitwise_equal(tmp_path / "one", tmp_path / "out")


def test_parts_written_apart_make_the_same_folder(tmp_path, monkeypatch, capsys):
    """`--part I/N` (the trainer's multi-host export: one part per process): three parts written
    one after another into one folder give the files of the whole export byte for byte, and a
    part reads only the layers its shards hold."""
    src = save_hf(make_hf_model(num_hidden_layers=4), tmp_path / "hf")
    _run("hf-to-jax", "--hf", src, "--out", str(tmp_path / "ckpt"))
    ckpt, whole, parts = str(tmp_path / "ckpt"), tmp_path / "whole", tmp_path / "parts"
    _run("jax-to-hf", "--ckpt", ckpt, "--out", str(whole), "--max-shard-size", "12KB")
    parts.mkdir()
    layers_read = []
    plain_read = mc.ParamsReader.read

    def counting_read(self, key, layer=None):
        layers_read[-1].add(layer)
        return plain_read(self, key, layer)

    monkeypatch.setattr(mc.ParamsReader, "read", counting_read)
    for i in range(3):
        layers_read.append(set())
        _run("jax-to-hf", "--ckpt", ckpt, "--out", str(parts), "--max-shard-size", "12KB",
             "--part", f"{i}/3")
    assert sorted(os.listdir(parts)) == sorted(os.listdir(whole))
    for name in os.listdir(whole):
        assert (parts / name).read_bytes() == (whole / name).read_bytes(), name
    assert len(shard_files(whole)) >= 6
    for seen in layers_read:  # each part a run of the 4 layers, not all of them
        assert 0 < len(seen - {None}) < 4, layers_read
    assert set().union(*layers_read) == {None, 0, 1, 2, 3}
    capsys.readouterr()
    assert main(["jax-to-hf", "--ckpt", ckpt, "--out", str(tmp_path / "none"), "--part", "0/2",
                 "--quiet"]) == 1  # the shared folder must exist
    assert f"{tmp_path / 'none'}: the folder the parts share must exist" in capsys.readouterr().err
    for bad, why in (("2/2", "need 0 <= I < N"), ("1of2", "expected I/N")):
        with pytest.raises(SystemExit):
            main(["jax-to-hf", "--ckpt", ckpt, "--out", str(parts), "--part", bad])
        assert f"--part '{bad}': {why}" in capsys.readouterr().err


def test_progress_bar_counts_tensors_and_bytes(tmp_path, capsys):
    src = save_hf(make_hf_model(), tmp_path / "hf")
    assert main(["hf-to-jax", "--hf", src, "--out", str(tmp_path / "ckpt")]) == 0
    err = capsys.readouterr().err
    n = len(read_tensors(src))
    assert f"tensors {n}/{n}" in err and "hf-to-jax" in err and "B/s" in err
    assert main(["jax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o")]) == 0
    assert f"tensors {n}/{n}" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("12KB") == 12000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="parse"):
        parse_size("lots")


def test_eos_list_and_pad_survive_export_and_generation_stops_at_any_eos(tmp_path):
    """config.json's eos_token_id list and pad_token_id come back from hf -> ours -> hf whole
    (config.json and the generation_config.json made from it), and both transformers' generate
    on the export and ours stop at the list's second id, which one row emits."""
    import zephyr_jax as zj
    from zephyr_jax.config import MixtralConfig
    from zephyr_jax.generation import generate_ids

    # initializer_range 0.1: logits far enough apart for greedy float32 parity (tests/test_generate.py)
    hf_model = make_hf_model(seed=3, initializer_range=0.1, pad_token_id=0)
    # three rows and two EOS ids: a comparison of the rows' tokens with the ids cannot broadcast
    prompts, n_new = [[1, 7, 50], [1, 5, 9, 33, 17, 60, 4], [1, 64, 22, 40, 12]], 12

    def hf_greedy(model):
        P = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=n_new)
        return out[:, P:].tolist()

    hf_model.generation_config.eos_token_id = None
    free = hf_greedy(hf_model)
    stop = free[0][3]  # emitted by row 0 early on
    never = next(t for t in range(3, 67) if all(t not in row for row in free))
    eos = [never, stop]  # the id that stops is the second: a config keeping eos[0] misses it
    hf_model.config.eos_token_id = hf_model.generation_config.eos_token_id = eos
    src = save_hf(hf_model, tmp_path / "hf")
    os.remove(os.path.join(src, "generation_config.json"))  # the export must make its own
    _run("hf-to-jax", "--hf", src, "--out", str(tmp_path / "ckpt"))
    out = tmp_path / "back"
    _run("jax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out))
    with open(out / "config.json") as fh:
        config = json.load(fh)
    with open(out / "generation_config.json") as fh:
        generation = json.load(fh)
    assert (config["eos_token_id"], config["pad_token_id"]) == (eos, 0)
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (eos, 0)

    back = transformers.AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager")
    assert (back.generation_config.eos_token_id, back.generation_config.pad_token_id) == (eos, 0)
    want = hf_greedy(back)
    row = want[0]
    assert row.index(stop) == free[0].index(stop) < n_new - 1
    assert row[row.index(stop):] == [stop] + [0] * (len(row) - row.index(stop) - 1)  # then pads
    model = zj.from_pretrained(out)
    assert model.config.eos_token_id == tuple(eos) and model.config.pad_token_id == 0
    got = generate_ids(model, prompts, n_new, temperature=0.0, bucket=8,
                       eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id)
    assert got == want

    # model checkpoints saved before pad_token_id (and eos lists) were kept still load
    old = {k: v for k, v in config.items() if k != "pad_token_id"}
    old["eos_token_id"] = 2
    with open(tmp_path / "ckpt" / "config.json", "w") as fh:
        json.dump(old, fh)
    cfg = mc.load_model_config(tmp_path / "ckpt")
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.eos_token_ids) == (2, None, (2,))
    assert cfg == MixtralConfig.from_hf(cfg.to_hf())
