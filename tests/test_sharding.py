"""Sharding rules, meshes and placements, in one process on one CPU device.

Meshes here are `AbstractMesh`es (or fake device lists): the rules only read axis sizes, so the
full-size 32-device layout is checked without 32 devices and without allocating weights.
Multi-device numerics live in test_sharding_multidevice.py (subprocesses).
"""

from __future__ import annotations

import collections
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from zephyr_jax import Mixtral, MixtralConfig
from zephyr_jax import sharding as zs
from zephyr_jax.model import dispatch
from zephyr_jax.model.mixtral import LAYER_PARAMS


def abstract_mesh(data=4, fsdp=1, expert=8, tensor=1) -> AbstractMesh:
    return AbstractMesh((data, fsdp, expert, tensor), zs.MESH_AXES,
                        axis_types=(AxisType.Auto,) * 4)


MESH_4x8 = abstract_mesh()


# --- logical_to_spec ----------------------------------------------------------------------------


def test_default_rules_on_the_4x8_mesh():
    spec = lambda axes, shape=None: zs.logical_to_spec(axes, zs.DEFAULT_RULES, shape, MESH_4x8)
    # experts over the node, the rest of the FSDP split over hosts
    assert spec(LAYER_PARAMS["w1"]) == P(None, "expert", "data")
    assert spec(LAYER_PARAMS["w2"]) == P(None, "expert", None, "data")
    # non-expert weights: embed over all 32 devices
    assert spec(LAYER_PARAMS["wq"]) == P(None, ("data", "expert"))
    assert spec(LAYER_PARAMS["wo"]) == P(None, None, None, ("data", "expert"))
    assert spec(("vocab", "embed")) == P(None, ("data", "expert"))
    assert spec(LAYER_PARAMS["input_norm"]) == P()
    assert zs.batch_sharding.__name__  # exists; its spec:
    assert spec(("activation_batch", "activation_length")) == P(("data", "expert"))


def test_without_a_mesh_all_rule_axes_are_kept():
    assert zs.logical_to_spec(LAYER_PARAMS["w1"], zs.DEFAULT_RULES) == P(
        None, "expert", ("data", "fsdp"), "tensor")


def test_a_mesh_axis_splits_at_most_one_dim_of_a_tensor():
    meshes = [MESH_4x8, abstract_mesh(2, 2, 2, 4), abstract_mesh(1, 1, 1, 1)]
    for mesh in meshes:
        for axes in [*LAYER_PARAMS.values(), ("vocab", "embed"), ("embed", "vocab")]:
            spec = zs.logical_to_spec(axes, zs.DEFAULT_RULES, mesh=mesh)
            used = [a for d in spec if d is not None for a in (d if isinstance(d, tuple) else (d,))]
            assert len(used) == len(set(used)), (axes, spec)


def test_indivisible_dims_fall_back_to_a_divisible_prefix_then_replication():
    with pytest.warns(zs.ShardingFallbackWarning, match=r"dim 1 \('embed', size 12\)"):
        # 12 is not divisible by data*expert = 32, but by data = 4
        assert zs.logical_to_spec(("layers", "embed"), zs.DEFAULT_RULES, (2, 12), MESH_4x8,
                                  where="param x") == P(None, "data")
    with pytest.warns(zs.ShardingFallbackWarning, match="param y"):
        assert zs.logical_to_spec(("embed",), zs.DEFAULT_RULES, (6,), MESH_4x8,
                                  where="param y") == P()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert zs.logical_to_spec(("embed",), zs.DEFAULT_RULES, (64,), MESH_4x8) == P(
            ("data", "expert"))


def test_rule_errors_are_clear():
    with pytest.raises(zs.ShardingError, match="no sharding rule for logical axis 'bogus'"):
        zs.logical_to_spec(("bogus",), zs.DEFAULT_RULES)
    with pytest.raises(zs.ShardingError, match="names mesh axis 'model'"):
        zs.logical_to_spec(("embed",), (("embed", "model"),), mesh=MESH_4x8)
    with pytest.raises(zs.ShardingError, match="'embed' appears twice"):
        zs.normalize_rules((("embed", "data"), ("embed", None)))
    with pytest.raises(zs.ShardingError, match="repeats a mesh axis"):
        zs.normalize_rules((("embed", ("data", "data")),))
    with pytest.raises(zs.ShardingError, match="not a \\(logical, mesh axes\\) pair"):
        zs.normalize_rules(("embed",))
    with pytest.raises(zs.ShardingError, match="do not match shape"):
        zs.logical_to_spec(("embed",), zs.DEFAULT_RULES, (4, 4), MESH_4x8)


def test_rules_from_yaml():
    text = """
sharding_rules:
  activation_batch: [data, expert]
  embed: [data, expert]
  expert: expert
  mlp: null
"""
    rules = zs.rules_from_yaml(text)
    assert rules == (("activation_batch", ("data", "expert")), ("embed", ("data", "expert")),
                     ("expert", ("expert",)), ("mlp", None))
    as_yaml = {k: list(v) if v else None for k, v in zs.normalize_rules(zs.DEFAULT_RULES)}
    assert zs.normalize_rules(as_yaml) == zs.normalize_rules(zs.DEFAULT_RULES)


# --- mesh -------------------------------------------------------------------------------------


def test_parse_mesh_shorthands():
    assert zs.parse_mesh("4x8") == zs.MeshConfig(data=4, expert=8)
    assert zs.parse_mesh("8") == zs.MeshConfig(data=8)
    assert zs.parse_mesh("2x1x4x1") == zs.MeshConfig(data=2, fsdp=1, expert=4, tensor=1)
    assert zs.parse_mesh("data=-1, expert=8") == zs.MeshConfig(data=-1, expert=8)
    for bad, msg in [("4x8x2", "give 1"), ("four", "expected e.g."), ("data=2,model=4", "model"),
                     ("0x8", "mesh.data"), ("-1x-1", "at most one axis")]:
        with pytest.raises(zs.ShardingError, match=msg):
            zs.parse_mesh(bad)


def test_mesh_shape_fills_minus_one_and_names_the_fields():
    assert zs.MeshConfig(data=-1, expert=8).shape(32) == (4, 1, 8, 1)
    assert zs.MeshConfig(data=4, expert=8).shape(32) == (4, 1, 8, 1)
    with pytest.raises(zs.ShardingError, match="needs 32 devices, have 16"):
        zs.MeshConfig(data=4, expert=8).shape(16)
    with pytest.raises(zs.ShardingError, match="cannot be split"):
        zs.MeshConfig(data=-1, expert=3).shape(32)


FakeDevice = collections.namedtuple("FakeDevice", "id process_index")


def test_device_grid_keeps_each_expert_group_inside_one_host():
    # 4 hosts x 8 devices, listed in a scrambled order
    devs = [FakeDevice(h * 8 + i, h) for h in range(4) for i in range(8)]
    rng = np.random.default_rng(0)
    devs = [devs[i] for i in rng.permutation(len(devs))]
    grid = zs.device_grid(devs, (4, 1, 8, 1))
    for d in range(4):
        group = grid[d, 0, :, 0]
        assert {x.process_index for x in group} == {d}
        assert [x.id for x in group] == list(range(d * 8, d * 8 + 8))


def test_make_mesh_on_the_local_devices():
    mesh = zs.make_mesh(zs.MeshConfig(data=-1))
    assert mesh.axis_names == zs.MESH_AXES
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "expert": 1, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(zs.ShardingError, match="needs"):
        zs.make_mesh(zs.MeshConfig(data=jax.device_count(), expert=2))


# --- validate ---------------------------------------------------------------------------------


def test_validate_names_the_config_keys():
    cfg = MixtralConfig.preset("tiny", num_local_experts=8)
    zs.validate(MESH_4x8, cfg, global_batch=64)
    with pytest.raises(zs.ShardingError, match=r"global_batch=30 .*mesh\.data=4 x mesh\.expert=8"):
        zs.validate(MESH_4x8, cfg, global_batch=30)
    with pytest.raises(zs.ShardingError, match=r"model\.num_local_experts=6 .*mesh\.expert=8"):
        zs.validate(MESH_4x8, cfg.replace(num_local_experts=6), global_batch=32)
    with pytest.raises(zs.ShardingError, match="names mesh axis 'model'"):
        zs.validate(MESH_4x8, cfg, 32, rules=(*zs.DEFAULT_RULES[:-1], ("norm", "model")))


# --- placements -------------------------------------------------------------------------------


def test_full_size_8x22b_param_shardings_on_32_devices():
    """Every param of the real model gets a valid, divisible spec under the default rules, and
    each device holds ~1/32 of the bytes (only the norms, 0.0005% of the model, replicate)."""
    cfg = MixtralConfig.preset("mixtral-8x22b")
    model = nnx.eval_shape(lambda: Mixtral(cfg, rngs=nnx.Rngs(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", zs.ShardingFallbackWarning)
        shardings = zs.param_shardings(model, MESH_4x8)
    state = nnx.state(model, nnx.Param)
    sizes = dict(MESH_4x8.shape)
    total = per_device = 0
    flat_state = dict(jax.tree_util.tree_leaves_with_path(state))
    for path, sh in jax.tree_util.tree_leaves_with_path(shardings):
        var = flat_state[path]
        shape, spec = var.shape, sh.spec
        used = []
        for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
            axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            assert dim % math.prod(sizes[a] for a in axes) == 0, (path, shape, spec)
            used += axes
        assert len(used) == len(set(used)), (path, spec)
        nbytes = math.prod(shape) * var.dtype.itemsize
        total += nbytes
        per_device += math.prod(sh.shard_shape(shape)) * var.dtype.itemsize
    assert total == cfg.num_params * 2  # bf16
    assert per_device == pytest.approx(total / 32, rel=1e-3)
    layers = shardings["layers"]
    assert layers["w1"].spec == P(None, "expert", "data")
    assert layers["w1"].shard_shape((56, 8, 6144, 16384)) == (56, 1, 1536, 16384)


def test_read_layout_puts_the_hosts_on_the_layers():
    """`read_sharding` for Mixtral-8x22B on 4 x 8: `data` (the hosts) moves from the hidden dim
    to the 56 layers, so each host reads its 14 layers' file tensors and nothing else; `expert`
    (inside a host) stays, as 56 layers do not split 32 ways."""
    cfg = MixtralConfig.preset("mixtral-8x22b")
    model = nnx.eval_shape(lambda: Mixtral(cfg, rngs=nnx.Rngs(0)))
    layers = zs.param_shardings(model, MESH_4x8).to_pure_dict()["layers"]
    shapes = {k: v.shape for k, v in nnx.state(model, nnx.Param).to_pure_dict()["layers"].items()}
    read = {k: zs.read_sharding(s, shapes[k], 2 if k in ("w1", "w2", "w3") else 1)
            for k, s in layers.items()}
    assert read["w1"].spec == read["w2"].spec == P("data", "expert")
    assert read["w1"].shard_shape(shapes["w1"]) == (14, 1, 6144, 16384)  # whole file tensors
    assert read["wq"].spec == P("data", "expert")  # the host's 8 GPUs share its reads
    assert read["wo"].spec == P("data", None, None, "expert")
    assert read["input_norm"] is layers["input_norm"]  # replicated: nothing to move
    for k, s in read.items():
        assert s.shard_shape(shapes[k])[0] in (14, 56), k


def test_read_layout_moves_what_the_layer_count_divides():
    mesh = abstract_mesh(data=2, expert=4)
    wq = jax.sharding.NamedSharding(mesh, P(None, ("data", "expert")))
    assert zs.read_sharding(wq, (8, 64, 4, 16), 1).spec == P(("data", "expert"))
    assert zs.read_sharding(wq, (6, 64, 4, 16), 1).spec == P("data", "expert")
    assert zs.read_sharding(wq, (5, 64, 4, 16), 1) is wq
    w1 = jax.sharding.NamedSharding(mesh, P(None, "expert", "data"))
    assert zs.read_sharding(w1, (8, 4, 64, 32), 2).spec == P("data", "expert")
    # already split over the layers (user rules): left as it is
    by_layer = jax.sharding.NamedSharding(mesh, P("data", None, "expert"))
    assert zs.read_sharding(by_layer, (8, 64, 4), 1) is by_layer


def test_shard_model_and_batch_sharding_on_one_device():
    cfg = MixtralConfig.preset("tiny")
    model = Mixtral(cfg, rngs=nnx.Rngs(0))
    mesh = zs.make_mesh(zs.MeshConfig(data=-1))
    before = model(jnp.ones((1, 4), jnp.int32))
    zs.shard_model(model, mesh)
    assert model.layers["w1"][...].sharding.mesh.shape == mesh.shape
    assert jnp.array_equal(model(jnp.ones((1, 4), jnp.int32)), before)
    assert zs.batch_sharding(mesh).spec == P()  # size-1 axes split nothing
    sharded = zs.init_sharded(lambda: Mixtral(cfg, rngs=nnx.Rngs(0)), mesh)
    # same draws; jit may fuse the 0.02 * normal scaling differently (last-bit differences)
    np.testing.assert_allclose(sharded.layers["w1"][...], model.layers["w1"][...], rtol=1e-6)


# --- dispatch hooks ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["dense", "ragged", "scan", "pallas"])
def test_local_dispatch_gives_zero_for_no_expert_ids(impl):
    """Expert ids >= E are the expert-parallel buffers' empty slots: zero output, zero grads."""
    ks = jax.random.split(jax.random.key(0), 4)
    E, D, F = 3, 8, 12
    x = jax.random.normal(ks[0], (5, D))
    w1, w3 = jax.random.normal(ks[1], (E, D, F)), jax.random.normal(ks[2], (E, D, F))
    w2 = jax.random.normal(ks[3], (E, F, D))
    expert = jnp.array([[0], [E], [2], [E], [1]])
    y, dropped = dispatch.DISPATCH[impl](x, expert, jnp.ones((5, 1)), w1, w3, w2)
    assert jnp.all(y[jnp.array([1, 3])] == 0) and int(dropped) == 0
    y_ref, _ = dispatch.dense(x, jnp.array([[0], [0], [2], [0], [1]]), jnp.ones((5, 1)), w1, w3, w2)
    np.testing.assert_allclose(y[jnp.array([0, 2, 4])], y_ref[jnp.array([0, 2, 4])], rtol=1e-5,
                               atol=1e-5)


def test_expert_parallel_plan_follows_the_ambient_mesh_and_rules():
    assert zs.expert_parallel_plan() is None
    with jax.sharding.use_abstract_mesh(MESH_4x8):
        plan = zs.expert_parallel_plan()
        assert plan.expert_axes == ("expert",) and plan.token_axes == ("data", "expert")
        assert plan.expert_size == 8 and plan.token_shards == 32
        # batch rule without the expert axis: the MoE block still splits tokens over it
        rules = tuple((k, "data") if k == "activation_batch" else (k, v)
                      for k, v in zs.DEFAULT_RULES)
        with zs.use_rules(rules):
            assert zs.expert_parallel_plan().token_axes == ("data", "expert")
    with jax.sharding.use_abstract_mesh(abstract_mesh(32, 1, 1, 1)):
        assert zs.expert_parallel_plan() is None  # experts not split: plain local dispatch


def test_get_dispatch_without_a_mesh_is_the_local_implementation():
    ks = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(ks[0], (6, 8))
    expert = jnp.array([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3]])
    w = jax.nn.softmax(jax.random.normal(ks[1], (6, 2)), -1)
    w1, w3 = jax.random.normal(ks[2], (4, 8, 12)), jax.random.normal(ks[3], (4, 8, 12))
    w2 = jax.random.normal(ks[4], (4, 12, 8))
    for impl in ("dense", "ragged", "capacity"):
        got = dispatch.get_dispatch(impl)(x, expert, w, w1, w3, w2, 2.0)
        want = dispatch.DISPATCH[impl](x, expert, w, w1, w3, w2, 2.0)
        assert jnp.array_equal(got[0], want[0]) and int(got[1]) == int(want[1])
    jaxpr = str(jax.make_jaxpr(dispatch.get_dispatch("ragged"))(x, expert, w, w1, w3, w2))
    assert "shard_map" not in jaxpr and "all_to_all" not in jaxpr
