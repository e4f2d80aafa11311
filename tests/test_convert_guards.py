"""Writers that must not lose data or lock others out: an output folder that is or holds its own
source is refused before anything is written (one inside it is fine); staged outputs get the mode a new folder
gets; bad config.json / --max-shard-size values are one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import stat

import jax
import numpy as np
import pytest
from test_convert_helpers import make_hf_model, read_tensors, save_hf, save_tokenizer

import zephyr_jax as zj
from zephyr_jax import model_checkpoint as mc
from zephyr_jax.config import ConfigError, MixtralConfig
from zephyr_jax.convert import main
from zephyr_jax.hf_io.safetensors_io import parse_size
from zephyr_jax.pretrained import save_pretrained


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny HF folder and its model checkpoint, made once; tests copy them (`tree`)."""
    d = tmp_path_factory.mktemp("guards")
    hf = save_hf(make_hf_model(), d / "hf")
    assert main(["hf-to-jax", "--hf", hf, "--out", str(d / "ckpt"), "--quiet"]) == 0
    return d


@pytest.fixture
def tree(tmp_path, sources):
    """tmp_path/m/{hf, ckpt} (fresh copies) and tmp_path/link -> m/hf."""
    shutil.copytree(sources, tmp_path / "m")
    os.symlink(tmp_path / "m" / "hf", tmp_path / "link")
    return tmp_path


def _snapshot(root) -> dict[str, bytes | None]:
    """Every folder (None) and file (its bytes) under `root`, symlinks not followed."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = (os.readlink(path).encode() if os.path.islink(path)
                                                else open(path, "rb").read())
    return out


# (command, --out relative to tmp_path, source it overlaps, how); all run with --overwrite.
OVERLAPS = [
    ("hf-to-jax", "m/hf", "m/hf", "is"),
    ("hf-to-jax", "link", "m/hf", "is"),  # a symlink to the source
    ("hf-to-jax", "m", "m/hf", "contains"),
    ("jax-to-hf", "m/ckpt", "m/ckpt", "is"),
    ("jax-to-hf", "m/ckpt/params", "m/ckpt/params", "is"),
    ("jax-to-hf", "m", "m/ckpt", "contains"),  # e.g. the output_dir holding the checkpoints
]


@pytest.mark.parametrize(("command", "out", "source", "how"), OVERLAPS)
def test_output_overlapping_its_source_is_refused_and_nothing_changes(tree, capsys, command, out,
                                                                      source, how):
    before = _snapshot(tree)
    flag = "--hf" if command == "hf-to-jax" else "--ckpt"
    src = "m/hf" if command == "hf-to-jax" else "m/ckpt"
    capsys.readouterr()
    assert main([command, flag, str(tree / src), "--out", str(tree / out), "--overwrite",
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"{tree / out}: the output {how} the source {tree / source}" in err, err
    assert _snapshot(tree) == before  # nothing deleted, nothing staged, no debris


def test_an_output_inside_its_source_is_written(tree):
    """`--ckpt run --out run/hf` is what the trainer's own export does, and harmless: the
    readers read the source's named files, never the new folder."""
    ckpt, hf = tree / "m" / "ckpt", tree / "m" / "hf"
    assert main(["jax-to-hf", "--ckpt", str(ckpt), "--out", str(ckpt / "hf"), "--quiet"]) == 0
    assert main(["hf-to-jax", "--hf", str(hf), "--out", str(hf / "ckpt"), "--quiet"]) == 0
    want, got = read_tensors(hf), read_tensors(ckpt / "hf")
    assert sorted(got) == sorted(want)
    for name, x in want.items():
        np.testing.assert_array_equal(got[name], x, err_msg=name)
    _, want_params = mc.load_model_checkpoint(str(ckpt))
    _, got_params = mc.load_model_checkpoint(str(hf / "ckpt"))
    for x, y in zip(jax.tree.leaves(want_params), jax.tree.leaves(got_params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_parts_may_not_write_into_their_source_but_may_stage_inside_it(tree, capsys):
    """`--part` writes into --out in place: --out must not be the checkpoint, its params, or a
    folder holding them. The trainer's multi-process export stages its parts in
    `output_dir/.hf.export-partial`, inside the --ckpt it reads: that stays allowed."""
    ckpt = tree / "m" / "ckpt"
    before = _snapshot(tree)
    for out, source, how in ((ckpt, ckpt, "is"), (ckpt / "params", ckpt / "params", "is"),
                             (tree / "m", ckpt, "contains")):
        capsys.readouterr()
        assert main(["jax-to-hf", "--ckpt", str(ckpt), "--out", str(out), "--part", "0/1",
                     "--quiet"]) == 1
        err = capsys.readouterr().err
        assert f"{out}: the output {how} the source {source}" in err, err
        assert _snapshot(tree) == before
    (ckpt / ".hf.export-partial").mkdir()
    assert main(["jax-to-hf", "--ckpt", str(ckpt), "--out", str(ckpt / ".hf.export-partial"),
                 "--part", "0/1", "--quiet"]) == 0
    assert (ckpt / ".hf.export-partial" / "model.safetensors").is_file()


@pytest.mark.parametrize("format", ["hf", "orbax"])
def test_save_pretrained_refuses_to_replace_its_tokenizer_folder(tmp_path, sources, format):
    model = zj.from_pretrained(sources / "hf")
    tok = tmp_path / "tok"
    save_tokenizer(tok)
    (tok / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    with pytest.raises(mc.ModelCheckpointError, match=f"{tok}: the output is the source {tok}"):
        save_pretrained(model, tok, format=format, tokenizer=str(tok), overwrite=True)
    assert _snapshot(tmp_path) == before


def test_staged_outputs_get_the_mode_of_a_new_folder(tmp_path, sources):
    """tempfile.mkdtemp's 0700 staging folder, renamed into place, locked everyone else out of
    exports (and an --overwrite turned a 755 folder 700): under umask 022 they are 755."""
    old = os.umask(0o022)
    try:
        assert main(["hf-to-jax", "--hf", str(sources / "hf"), "--out", str(tmp_path / "ckpt"),
                     "--quiet"]) == 0
        (tmp_path / "hf").mkdir(mode=0o755)
        (tmp_path / "hf" / "old.txt").write_text("replaced")
        assert main(["jax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out",
                     str(tmp_path / "hf"), "--overwrite", "--quiet"]) == 0
        os.umask(0o027)  # the mode follows the umask, it is not a fixed 0755
        with mc.staged_dir(tmp_path / "other") as tmp:
            assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o750
    finally:
        os.umask(old)
    assert not (tmp_path / "hf" / "old.txt").exists()
    for out in ("ckpt", "hf"):
        assert stat.S_IMODE(os.stat(tmp_path / out).st_mode) == 0o755, out
    assert stat.S_IMODE(os.stat(tmp_path / "other").st_mode) == 0o750


def test_private_config_keys_are_ignored_public_unknown_ones_refused(tmp_path):
    good = MixtralConfig.preset("tiny").to_hf()
    # written by transformers 4.48-4.51 into real checkpoints' config.json
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**good, "_attn_implementation_autoset": True,
                                "_name_or_path": "org/model"}))
    assert MixtralConfig.from_hf(path) == MixtralConfig.from_hf(good)
    with pytest.raises(ConfigError, match=f"{path}: unknown Mixtral config key 'num_experts_typo'"):
        path.write_text(json.dumps({**good, "num_experts_typo": 3}))
        MixtralConfig.from_hf(path)


def test_config_json_that_is_not_an_object_is_a_one_line_error(tmp_path, sources, capsys):
    hf = shutil.copytree(sources / "hf", tmp_path / "hf")
    (hf / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        MixtralConfig.from_hf(hf)
    capsys.readouterr()
    assert main(["hf-to-jax", "--hf", str(hf), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {hf / 'config.json'}: expected a JSON object of config keys, "
                   "got list [1, 2]\n")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("size", ["5IB", "5I"])
def test_max_shard_size_with_a_bare_i_is_a_usage_error(tmp_path, capsys, size):
    with pytest.raises(ValueError, match=f"cannot parse size '{size}'"):
        parse_size(size)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["jax-to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o"),
              "--max-shard-size", size])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --max-shard-size: cannot parse size '{size}'" in err
    assert "Traceback" not in err
