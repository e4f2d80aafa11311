"""`from_pretrained` / `save_pretrained` across formats: HF folder, model checkpoint, trainer output_dir."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from test_convert_helpers import (
    assert_bitwise_equal,
    make_hf_model,
    read_tensors,
    save_hf,
    save_tokenizer,
)

import zephyr_jax as zj
from zephyr_jax import model_checkpoint as mc
from zephyr_jax.convert import main
from zephyr_jax.pretrained import save_pretrained

IDS = np.array([[1, 5, 9, 33, 2, 7, 60], [3, 3, 8, 50, 11, 0, 4]])


def _logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS)))


def _assert_same_params(a, b) -> None:
    """Bitwise-equal parameters (so equal logits, without paying for a forward)."""
    fa, fb = mc.flatten(zj.params_dict(a)), mc.flatten(zj.params_dict(b))
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), k


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A tiny HF model, saved per-expert and fused, plus its reference logits."""
    d = tmp_path_factory.mktemp("pretrained")
    model = make_hf_model(seed=1)
    with torch.no_grad():
        ref = model(torch.tensor(IDS)).logits.numpy()
    return model, save_hf(model, d / "hf"), save_hf(model, d / "fused", "fused"), ref


def test_every_format_gives_the_same_model(tmp_path, hf_pair):
    _, hf, fused, ref = hf_pair
    base = zj.from_pretrained(hf)
    got = _logits(base)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    _assert_same_params(zj.from_pretrained(fused), base)
    assert main(["hf-to-jax", "--hf", hf, "--out", str(tmp_path / "ckpt"), "--quiet"]) == 0
    from_ckpt = zj.from_pretrained(tmp_path / "ckpt")
    _assert_same_params(from_ckpt, base)
    np.testing.assert_array_equal(_logits(from_ckpt), got)
    model = zj.from_pretrained(tmp_path / "ckpt", moe_impl="dense", param_dtype="bfloat16")
    assert model.config.moe_impl == "dense" and model.layers["w1"].value.dtype == jnp.bfloat16


def test_save_pretrained_both_formats(tmp_path, hf_pair):
    hf_model, hf, _, ref = hf_pair
    model = zj.from_pretrained(hf)

    save_tokenizer(tmp_path / "tok")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    save_pretrained(model, tmp_path / "orbax", format="orbax", tokenizer=tokenizer)
    assert os.path.exists(tmp_path / "orbax" / "tokenizer.json")
    cfg, params = mc.load_model_checkpoint(tmp_path / "orbax")
    assert cfg.to_hf() == model.config.to_hf()
    _assert_same_params(zj.from_pretrained(tmp_path / "orbax"), model)

    save_pretrained(model, tmp_path / "hf_out", max_shard_size="10KB", tokenizer=tokenizer)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf_out").eos_token == "</s>"
    assert_bitwise_equal(hf, tmp_path / "hf_out")  # float32 params: the HF tensors exactly
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_out",
                                                               experts_implementation="eager")
    with torch.no_grad():
        assert np.array_equal(loaded(torch.tensor(IDS)).logits.numpy(), ref)

    # a params dict needs its config; an existing folder needs overwrite
    with pytest.raises(ValueError, match="config"):
        save_pretrained(zj.params_dict(model), tmp_path / "x")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_pretrained(zj.params_dict(model), tmp_path / "hf_out", config=model.config)
    save_pretrained(zj.params_dict(model), tmp_path / "hf_out", config=model.config,
                    fused_experts=True, overwrite=True)
    assert "model.layers.0.mlp.experts.down_proj" in read_tensors(tmp_path / "hf_out")
    with pytest.raises(ValueError, match="format"):
        save_pretrained(model, tmp_path / "y", format="pickle")


def _write_trainer_dir(root, steps_subdir, cfg, params_by_step: dict[int, dict]) -> None:
    """What the trainer writes: config.json at the root, CheckpointManager steps (at the root or
    in a subfolder) with a `params` item (StandardSave) beside other items."""
    os.makedirs(root)
    mc.write_config(str(root), cfg)
    with ocp.CheckpointManager(os.path.join(root, steps_subdir)) as mngr:
        for step, params in params_by_step.items():
            mngr.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave({"mu": jnp.zeros(3), "count": jnp.array(step)}),
                meta=ocp.args.JsonSave({"step": step})))
        mngr.wait_until_finished()


@pytest.mark.parametrize("steps_subdir", ["", "checkpoints"])
def test_trainer_output_dir_loads_latest_step(tmp_path, hf_pair, steps_subdir):
    _, hf, _, _ = hf_pair
    model = zj.from_pretrained(hf)
    params = zj.params_dict(model)
    later = jax.tree.map(lambda x: x * 0.5, params)
    _write_trainer_dir(tmp_path / "run", steps_subdir, model.config, {10: params, 20: later})

    cfg, got = mc.load_model_checkpoint(tmp_path / "run")
    assert cfg.num_hidden_layers == model.config.num_hidden_layers
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(later), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _assert_same_params(zj.from_pretrained(tmp_path / "run"),
                        zj.model_from_params(model.config, later))

    # jax-to-hf straight from the trainer's output_dir
    assert main(["jax-to-hf", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf"),
                 "--quiet"]) == 0
    save_pretrained(later, tmp_path / "ref", config=model.config)
    assert_bitwise_equal(tmp_path / "ref", tmp_path / "hf")
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")  # made from config.json
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(zj.MixtralConfig.preset("tiny").to_hf()))
    with pytest.raises(mc.ModelCheckpointError, match="neither"):
        zj.from_pretrained(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(mc.ModelCheckpointError, match="config.json"):
        mc.load_model_checkpoint(tmp_path)


def test_hf_weights_take_param_dtype(tmp_path):
    """HF files keep their dtype on disk; load_params casts to param_dtype like the orbax path."""
    import torch
    import transformers

    from zephyr_jax.pretrained import load_params

    hf_cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, num_local_experts=2)
    transformers.MixtralForCausalLM(hf_cfg).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    _, p32 = load_params(tmp_path / "hf")
    _, p16 = load_params(tmp_path / "hf", param_dtype="bfloat16")
    import jax

    assert {str(x.dtype) for x in jax.tree.leaves(p32)} == {"float32"}
    assert {str(x.dtype) for x in jax.tree.leaves(p16)} == {"bfloat16"}
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16), strict=True):
        assert (a.astype("bfloat16") == b).all()  # bf16 -> f32 is exact

    # "auto": the stored dtype (bf16 here), as transformers' dtype="auto"
    cfg_auto, p_auto = load_params(tmp_path / "hf", param_dtype="auto")
    assert cfg_auto.param_dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(p_auto)} == {"bfloat16"}
    mc.save_model_checkpoint(tmp_path / "ckpt32", cfg32 := load_params(tmp_path / "hf")[0], p32)
    assert load_params(tmp_path / "ckpt32", param_dtype="auto")[0].param_dtype == "float32"
    # stored dtypes that differ (float32 norms): config.json's dtype decides; without one, an
    # error naming a tensor of each dtype
    from test_convert_helpers import rewrite_shard, shard_files

    def norms_to_f32(tensors):
        tensors.update({k: v.astype(np.float32) for k, v in tensors.items() if "norm" in k})

    for f in shard_files(tmp_path / "hf"):
        rewrite_shard(tmp_path / "hf", f, norms_to_f32)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert load_params(tmp_path / "hf", param_dtype="auto")[0].param_dtype == "bfloat16"
    del config["dtype"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"bfloat16 \(embed\), float32 \(final_norm\)"):
        load_params(tmp_path / "hf", param_dtype="auto")

    # The trainer's path: with shardings, blocks go straight to their devices, cast the same way
    # (tests/test_hf_sharded_load.py covers meshes across processes).
    from zephyr_jax import sharding as sh

    mesh = sh.make_mesh(sh.MeshConfig())
    shardings = sh.params_dict_shardings(cfg32, mesh)
    _, placed = load_params(tmp_path / "hf", shardings=shardings)
    for a, b, s in zip(jax.tree.leaves(p32), jax.tree.leaves(placed), jax.tree.leaves(shardings),
                       strict=True):
        assert isinstance(b, jax.Array) and b.sharding == s and b.dtype == a.dtype
        np.testing.assert_array_equal(np.asarray(b), a)


def test_a_mesh_whose_expert_axis_does_not_divide_the_experts_fails_at_load(tmp_path):
    """It used to load (the experts left replicated, with a warning) and fail at the first call."""
    import subprocess
    import sys

    from test_convert_helpers import make_hf_model, save_hf

    path = save_hf(make_hf_model(num_local_experts=3, num_experts_per_tok=2), tmp_path / "hf")
    code = ("import jax; jax.config.update('jax_platforms', 'cpu'); "
            "jax.config.update('jax_num_cpu_devices', 2)\n"
            "import zephyr_jax\n"
            "from zephyr_jax.sharding import ShardingError\n"
            "try:\n"
            f"    zephyr_jax.from_pretrained({str(path)!r}, mesh='expert=2')\n"
            "except ShardingError as e:\n"
            "    print('REFUSED', e)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED" in proc.stdout and "num_local_experts=3 is not divisible" in proc.stdout, (
        proc.stdout + proc.stderr[-2000:])
