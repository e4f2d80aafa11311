"""Bad input to the converter: each error names the file and tensor, exits 1 without a traceback,
and never leaves a half-written or clobbered output behind."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from test_convert_helpers import (
    index,
    make_hf_model,
    rewrite_shard,
    save_hf,
    set_index,
    shard_files,
)

from zephyr_jax.convert import main
from zephyr_jax.hf_io import hf_to_jax
from zephyr_jax.hf_io.streaming import HFSource

ROUTER = "model.layers.1.block_sparse_moe.gate.weight"
W1 = "model.layers.0.block_sparse_moe.experts.2.w1.weight"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf(make_hf_model(), tmp_path_factory.mktemp("src") / "hf")


@pytest.fixture
def hf(tmp_path, hf_dir):
    """A fresh copy of the tiny sharded HF folder to break."""
    import shutil

    return shutil.copytree(hf_dir, tmp_path / "hf")


def _file_of(path, name) -> str:
    return index(path)["weight_map"][name]


def _fails(capsys, argv, *fragments) -> str:
    capsys.readouterr()
    assert main([*argv, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)
    return err


def _to_jax(hf, tmp_path):
    return ["hf-to-jax", "--hf", str(hf), "--out", str(tmp_path / "ckpt")]


def test_missing_tensor(hf, tmp_path, capsys):
    f = _file_of(hf, W1)
    rewrite_shard(hf, f, lambda t: t.pop(W1))
    set_index(hf, lambda m: m.pop(W1))
    _fails(capsys, _to_jax(hf, tmp_path), "missing tensor", W1, str(hf))
    assert not os.path.exists(tmp_path / "ckpt")


def test_unexpected_tensor(hf, tmp_path, capsys):
    f = _file_of(hf, ROUTER)
    rewrite_shard(hf, f, lambda t: t.update({"model.layers.1.mlp.extra.weight": np.zeros(3, np.float32)}))
    set_index(hf, lambda m: m.update({"model.layers.1.mlp.extra.weight": f}))
    _fails(capsys, _to_jax(hf, tmp_path), "unexpected tensor", "model.layers.1.mlp.extra.weight", f)


def test_shape_not_matching_config(hf, tmp_path, capsys):
    cfg = json.loads((hf / "config.json").read_text())
    cfg["intermediate_size"] = 20
    (hf / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, _to_jax(hf, tmp_path), "model.layers.0.block_sparse_moe.experts.0.w1.weight",
           "(24, 16)", "(20, 16)", _file_of(hf, "model.layers.0.block_sparse_moe.experts.0.w1.weight"))


@pytest.mark.parametrize("dtype", [np.float64, np.int8])
def test_unsupported_dtype(hf, tmp_path, capsys, dtype):
    f = _file_of(hf, ROUTER)
    rewrite_shard(hf, f, lambda t: t.update({ROUTER: t[ROUTER].astype(dtype)}))
    _fails(capsys, _to_jax(hf, tmp_path), ROUTER, f, "F64" if dtype == np.float64 else "I8",
           "supported")


def test_mixed_dtypes_within_one_parameter(hf, tmp_path, capsys):
    f = _file_of(hf, ROUTER)
    rewrite_shard(hf, f, lambda t: t.update({ROUTER: t[ROUTER].astype(ml_dtypes.bfloat16)}))
    _fails(capsys, _to_jax(hf, tmp_path), ROUTER, f, "--dtype")
    # ... and --dtype resolves it
    assert main([*_to_jax(hf, tmp_path), "--dtype", "float32", "--quiet"]) == 0


def test_truncated_file(hf, tmp_path, capsys):
    f = shard_files(hf)[1]
    size = os.path.getsize(hf / f)
    with open(hf / f, "r+b") as fh:
        fh.truncate(size - 100)
    _fails(capsys, _to_jax(hf, tmp_path), f, "truncated or corrupt")


def test_corrupt_header(hf, tmp_path, capsys):
    f = shard_files(hf)[0]
    (hf / f).write_bytes(b"\x00\x01not a safetensors file at all" * 4)
    _fails(capsys, _to_jax(hf, tmp_path), f, "truncated or corrupt")


def test_index_names_tensor_its_file_lacks(hf, tmp_path, capsys):
    f = _file_of(hf, W1)
    rewrite_shard(hf, f, lambda t: t.pop(W1))
    _fails(capsys, _to_jax(hf, tmp_path), f, W1, "index")


def test_tensor_missing_from_index(hf, tmp_path, capsys):
    f = _file_of(hf, W1)
    set_index(hf, lambda m: m.pop(W1))
    _fails(capsys, _to_jax(hf, tmp_path), f, W1, "missing from model.safetensors.index.json")


def test_file_not_in_index(hf, tmp_path, capsys):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(hf / "model-00099-of-00099.safetensors"))
    _fails(capsys, _to_jax(hf, tmp_path), "model-00099-of-00099.safetensors", "not in")


def test_index_names_missing_file(hf, tmp_path, capsys):
    f = _file_of(hf, W1)
    os.remove(hf / f)
    _fails(capsys, _to_jax(hf, tmp_path), f, "does not exist")


def test_pickle_checkpoints_are_refused_never_unpickled(tmp_path, capsys):
    d = tmp_path / "bin"
    d.mkdir()
    make_hf_model().config.save_pretrained(d)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    _fails(capsys, _to_jax(d, tmp_path), "pytorch_model.bin", "safetensors is required")
    assert not marker.exists()


def test_existing_output_needs_overwrite_and_failures_keep_it(hf, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    _fails(capsys, _to_jax(hf, tmp_path), str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "previous"

    # a failure half way through (layer 1) leaves the previous output as it was, and no debris
    real = HFSource.read

    def flaky(self, name):
        if name.startswith("model.layers.1."):
            raise OSError("disk on fire")
        return real(self, name)

    monkeypatch.setattr(HFSource, "read", flaky)
    with pytest.raises(OSError, match="disk on fire"):
        hf_to_jax(hf, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]
    monkeypatch.setattr(HFSource, "read", real)

    assert main([*_to_jax(hf, tmp_path), "--overwrite", "--quiet"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "params"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]


def test_a_failure_is_raised_only_once_no_write_is_in_flight(hf, tmp_path, monkeypatch):
    """The first leaf to fail must not end the conversion while other leaves' TensorStore writes
    are in flight: TensorStore finishes them in its own threads after the caller has removed the
    staging folder, and they re-create it (CI saw `.ckpt.partial-*` left behind). Here every
    layer-1 write takes 0.3 s longer, and a read of layer 1 fails while another leaf's layer-1
    write is pending: every write issued must have finished when the error reaches the caller."""
    import asyncio
    import types

    import tensorstore

    from zephyr_jax import model_checkpoint as mc

    issued, finished = [], []

    class Slow:
        def __init__(self, t, index=None):
            self.t, self.index = t, index

        def __getitem__(self, index):
            return Slow(self.t[index], index)

        def write(self, x, **kw):
            if self.index in (None, 0):
                return self.t.write(x, **kw)

            async def slow():
                await self.t.write(x, **kw)
                await asyncio.sleep(0.3)
                finished.append(self.index)

            issued.append(self.index)
            return slow()

    async def open_slow(spec, **kw):
        return Slow(await tensorstore.open(spec, **kw))

    monkeypatch.setattr(mc, "ts", types.SimpleNamespace(open=open_slow, Spec=tensorstore.Spec))
    real, failed = HFSource.read, []

    def fails_once(self, name):
        if name.startswith("model.layers.1.") and issued and not failed:
            failed.append(name)
            raise OSError("disk on fire")
        return real(self, name)

    monkeypatch.setattr(HFSource, "read", fails_once)
    with pytest.raises(OSError, match="disk on fire"):
        hf_to_jax(hf, tmp_path / "ckpt", overwrite=True)
    assert failed and issued
    assert len(finished) == len(issued), f"{len(issued) - len(finished)} writes still in flight"
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_jax_to_hf_bad_checkpoints(hf, tmp_path, capsys):
    _fails(capsys, ["jax-to-hf", "--ckpt", str(hf), "--out", str(tmp_path / "o")],
           "neither a model checkpoint")
    assert main([*_to_jax(hf, tmp_path), "--quiet"]) == 0
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["hidden_size"] = 32
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, ["jax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o")],
           "'embed'", "(67, 16)", "(67, 32)")
    _fails(capsys, ["jax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"),
                    "--tokenizer", str(tmp_path)], "no tokenizer files")
    assert not os.path.exists(tmp_path / "o")


def test_cli_exit_code_and_message_without_traceback(tmp_path):
    """The real entry point, in a subprocess: status 1, one line on stderr."""
    r = subprocess.run([sys.executable, "-m", "zephyr_jax.convert", "hf-to-jax", "--hf",
                        str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "error:" in r.stderr and "nope" in r.stderr
