"""Every sharding decision in one place: the device mesh, logical -> mesh axis rules, placements.

Parameters carry logical axis names (`nnx.Param(..., logical_axes=("layers", "expert", "embed",
"mlp"))`); one rule table maps each logical name to mesh axes, MaxText-style. Nothing else in
the package names a mesh axis: the model, the MoE dispatch and the trainer ask this module.

The default topology is the Zephyr run: 4 hosts x 8 H100 (`--mesh 4x8` = data 4 x expert 8).

- `expert` (inside a node, over NVLink): the 8 experts of every layer, one per GPU; MoE
  tokens travel to their experts by all-to-all (see `model/expert_parallel.py`).
- everything else is FSDP over all 32 devices: the `embed` dim of every weight is split over
  (data, fsdp, expert), or over (data, fsdp) where `expert` already splits the tensor, so params,
  gradients and optimizer state all come to ~1/32 per device.
- the batch is split over (data, fsdp, expert): every device sees its own sequences.

Typical use::

    mesh = make_mesh(parse_mesh("4x8"))
    validate(mesh, cfg, global_batch=32)
    model = shard_model(model, mesh, DEFAULT_RULES)
    with use_mesh(mesh, DEFAULT_RULES):          # the MoE layers see the mesh here
        loss, grads = jitted_step(model, jax.device_put(batch, batch_sharding(mesh)))
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Outermost first: `data` spans hosts (slow network), `expert` and `tensor` stay inside a node.
MESH_AXES = ("data", "fsdp", "expert", "tensor")


class ShardingError(ValueError):
    """A mesh, rule table or config that cannot be sharded; the message names the setting."""


class ShardingFallbackWarning(UserWarning):
    """A tensor dim that the rules would split is kept whole (replicated) because it does not divide."""


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes, outermost first; -1 (at most one) takes all remaining devices.

    data: across hosts; splits the batch and (with the default rules) FSDP-shards params.
    fsdp: an extra pure FSDP axis (params + batch), for meshes that want one; 1 by default.
    expert: splits the experts of each layer; keep it inside one node (NVLink all-to-all).
    tensor: splits heads / mlp / vocab (Megatron style); 1 by default.
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            size = getattr(self, name)
            if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
                raise ShardingError(f"mesh.{name}: must be a positive integer or -1 (got {size!r})")
        if sum(getattr(self, n) == -1 for n in MESH_AXES) > 1:
            raise ShardingError(f"mesh: at most one axis may be -1 (got {self})")

    @property
    def axis_names(self) -> tuple[str, ...]:
        return MESH_AXES

    def shape(self, num_devices: int) -> tuple[int, ...]:
        """Axis sizes with -1 resolved for `num_devices` devices."""
        sizes = [getattr(self, n) for n in MESH_AXES]
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % fixed:
                raise ShardingError(
                    f"mesh: {num_devices} devices cannot be split by the fixed axes "
                    f"{_describe(self)} (product {fixed}); adjust mesh.* sizes")
            sizes = [num_devices // fixed if s == -1 else s for s in sizes]
        if math.prod(sizes) != num_devices:
            raise ShardingError(
                f"mesh: {_describe(self)} needs {math.prod(sizes)} devices, have {num_devices}; "
                "set one mesh axis to -1 or change the sizes")
        return tuple(sizes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "mesh config") -> MeshConfig:
        unknown = sorted(set(d) - set(MESH_AXES))
        if unknown:
            raise ShardingError(f"{source}: unknown mesh axis key(s) {unknown}; have {list(MESH_AXES)}")
        return cls(**d)


def _describe(mesh_cfg: MeshConfig) -> str:
    return " x ".join(f"{n}={getattr(mesh_cfg, n)}" for n in MESH_AXES)


def parse_mesh(spec: str) -> MeshConfig:
    """`--mesh` shorthand -> MeshConfig.

    "4x8" = data x expert (the 4 hosts x 8 GPUs default), "8" = data only,
    "2x2x4x1" = data x fsdp x expert x tensor, or named: "data=4,expert=8". Sizes may be -1.
    """
    text = spec.strip()
    try:
        if "=" in text:
            kv = dict(part.split("=", 1) for part in text.split(","))
            return MeshConfig.from_dict({k.strip(): int(v) for k, v in kv.items()},
                                        source=f"--mesh {spec!r}")
        sizes = [int(s) for s in re.split(r"[x*,]", text.lower())]
    except ValueError as e:
        if isinstance(e, ShardingError):
            raise
        raise ShardingError(f"--mesh {spec!r}: expected e.g. '4x8' or 'data=4,expert=8'") from None
    names = {1: ("data",), 2: ("data", "expert"), 4: MESH_AXES}.get(len(sizes))
    if names is None:
        raise ShardingError(f"--mesh {spec!r}: give 1 (data), 2 (data x expert) or 4 "
                            f"({' x '.join(MESH_AXES)}) sizes")
    return MeshConfig(**dict(zip(names, sizes, strict=True)))


def device_grid(devices: Sequence[Any], shape: Sequence[int]) -> np.ndarray:
    """Devices arranged as `shape`, ordered by (process_index, id) and reshaped.

    With the outermost axis slowest, the inner axes (expert, tensor) then cover consecutive
    devices of one process, i.e. one host, whenever their product divides the devices per host:
    the MoE all-to-all stays on NVLink and only FSDP traffic crosses hosts. On GPUs this is the
    grouping `mesh_utils.create_hybrid_device_mesh(..., process_is_granule=True)` gives (NVLink
    is uniform inside a node, so the order within a host does not matter); sorting is simpler
    and testable with fake devices.
    """
    ordered = sorted(devices, key=lambda d: (getattr(d, "process_index", 0), d.id))
    if len(ordered) != math.prod(shape):
        raise ShardingError(f"mesh: shape {tuple(shape)} needs {math.prod(shape)} devices, "
                            f"have {len(ordered)}")
    grid = np.empty(len(ordered), dtype=object)
    grid[:] = ordered
    return grid.reshape(tuple(shape))


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` with axes `MESH_AXES` (all of them, size-1 ones included) in Auto mode.

    Auto (not Explicit) axis types: the model is written for GSPMD propagation from the
    parameter and batch shardings, with the MoE block as the one manual (shard_map) region.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_cfg.shape(len(devices))
    grid = device_grid(devices, shape)
    _check_expert_groups_in_host(grid, mesh_cfg)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _check_expert_groups_in_host(grid: np.ndarray, mesh_cfg: MeshConfig) -> None:
    e = MESH_AXES.index("expert")
    groups = np.moveaxis(grid, e, -1).reshape(-1, grid.shape[e])
    for group in groups:
        if len({getattr(d, "process_index", 0) for d in group}) > 1:
            warnings.warn(f"mesh: expert axis ({mesh_cfg.expert}) spans several hosts; its "
                          "all-to-all leaves NVLink. Make mesh.expert * mesh.tensor divide the "
                          "devices per host.", stacklevel=3)
            return


# ----------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------

# Logical axis names used by the model's params (`model/mixtral.py` LAYER_PARAMS) and by the
# activations (`activation_*`). One entry per name; a tuple splits a dim over several mesh axes.
DEFAULT_RULES: Rules = (
    # activations
    ("activation_batch", ("data", "fsdp", "expert")),  # each device its own sequences
    ("activation_length", None),
    ("activation_embed", None),
    # parameters
    ("layers", None),  # scanned: every device walks through all layers
    ("vocab", "tensor"),
    # FSDP dim of every weight; where `expert` already splits the tensor (w1/w2/w3) the
    # leftover (data, fsdp) split it, so each device holds 1/32 of everything.
    ("embed", ("data", "fsdp", "expert")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),  # the E experts of a layer over the GPUs of a node
    ("expert_logits", None),
    ("norm", None),  # tiny; replicated
)


def normalize_rules(rules: Rules | Sequence[Sequence[Any]] | Mapping[str, Any]) -> Rules:
    """Rules as ((logical, tuple_of_mesh_axes_or_None), ...); accepts a YAML mapping or pair list.

    Raises ShardingError on a repeated logical name or a malformed entry.
    """
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    out: list[tuple[str, MeshAxes]] = []
    seen: set[str] = set()
    for item in items:
        if not (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2):
            raise ShardingError(f"sharding rules: entry {item!r} is not a (logical, mesh axes) pair")
        name, axes = item
        if not isinstance(name, str):
            raise ShardingError(f"sharding rules: logical name {name!r} is not a string")
        if name in seen:
            raise ShardingError(f"sharding rules: logical axis {name!r} appears twice")
        seen.add(name)
        if axes is None or axes == [] or axes == ():
            out.append((name, None))
        elif isinstance(axes, str):
            out.append((name, (axes,)))
        elif isinstance(axes, Sequence) and all(isinstance(a, str) for a in axes):
            if len(set(axes)) != len(axes):
                raise ShardingError(f"sharding rules: {name!r} -> {axes!r} repeats a mesh axis")
            out.append((name, tuple(axes)))
        else:
            raise ShardingError(f"sharding rules: {name!r} -> {axes!r}: expected a mesh axis name, "
                                "a list of them, or null")
    return tuple(out)


def rules_from_yaml(path_or_text: str) -> Rules:
    """Rules from a YAML file (or YAML text): a mapping `logical: mesh_axis | [axes] | null`,
    optionally under a top-level `sharding_rules:` key."""
    text = path_or_text
    if os.path.exists(path_or_text):
        with open(path_or_text) as fh:
            text = fh.read()
    data = yaml.safe_load(text) or {}
    if isinstance(data, Mapping) and "sharding_rules" in data:
        data = data["sharding_rules"]
    return normalize_rules(data)


def _rules_dict(rules) -> dict[str, tuple[str, ...] | None]:
    return dict(normalize_rules(rules))


def _mesh_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape) if mesh is not None else {}


def logical_to_spec(logical_axes: Sequence[str | None], rules, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, *, where: str = "") -> PartitionSpec:
    """PartitionSpec for a tensor whose dims have these logical names.

    Dims are resolved left to right; each takes its rule's mesh axes minus those an earlier dim
    already took (a mesh axis may split only one dim). With `mesh`, size-1 axes are dropped and,
    with `shape` too, a dim keeps the longest prefix of its axes whose product divides it; a dim
    that nothing divides is replicated with a ShardingFallbackWarning naming `where`.
    `None` as a logical name means "never split". Unknown logical names raise ShardingError.
    """
    table = _rules_dict(rules)
    sizes = _mesh_sizes(mesh)
    if shape is not None and len(shape) != len(logical_axes):
        raise ShardingError(f"{where or 'tensor'}: logical axes {tuple(logical_axes)} do not match "
                            f"shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ShardingError(f"{where or 'tensor'}: no sharding rule for logical axis {name!r}; "
                                f"add ({name!r}, null) to the rules to replicate it "
                                f"(rules have {sorted(table)})")
        axes = [a for a in (table[name] or ()) if a not in used]
        if mesh is not None:
            missing = [a for a in axes if a not in sizes]
            if missing:
                raise ShardingError(f"sharding rules: {name!r} -> {table[name]} names mesh axis "
                                    f"{missing[0]!r}, the mesh has {tuple(sizes)}")
            axes = [a for a in axes if sizes[a] > 1]
            if shape is not None:
                want = list(axes)
                while axes and shape[i] % math.prod(sizes[a] for a in axes):
                    axes.pop()
                if axes != want:
                    warnings.warn(
                        f"{where or 'tensor'}: dim {i} ({name!r}, size {shape[i]}) is not divisible "
                        f"by mesh axes {tuple(want)} (product "
                        f"{math.prod(sizes[a] for a in want)}); split over {tuple(axes) or 'nothing'}"
                        " instead", ShardingFallbackWarning, stacklevel=2)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:  # P(None, 'x', None) == P(None, 'x'); keep specs canonical
        spec.pop()
    return PartitionSpec(*spec)


# ----------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_shardings(model_or_state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings with the structure of `nnx.state(model, nnx.Param)`.

    Each Param's `logical_axes` metadata goes through `logical_to_spec`. Works on abstract
    models (`nnx.eval_shape`) too: only shapes are read.
    """
    state = (nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module)
             else model_or_state)

    def one(path, var):
        if not isinstance(var, nnx.Variable):
            return var
        name = _path_name(path)
        axes = var.get_metadata().get("logical_axes")
        shape = tuple(var.value.shape)
        if axes is None:
            raise ShardingError(f"param {name}: has no logical_axes metadata")
        spec = logical_to_spec(axes, rules, shape, mesh, where=f"param {name}")
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, state,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Move the model's params onto `mesh` as the rules say (in place; returns the model).

    For a model too large for one device, build it sharded instead (`init_sharded`).
    """
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model


def init_sharded(constructor, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Build `constructor()` (an nnx.Module with only Param state) directly sharded: each device
    materializes only its own shards."""
    abstract = nnx.eval_shape(constructor)
    graphdef, state = nnx.split(abstract)
    shardings = param_shardings(state, mesh, rules)

    def init():
        return nnx.state(constructor())

    return nnx.merge(graphdef, jax.jit(init, out_shardings=shardings)())


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of [B, T] batch arrays (token ids, masks, labels)."""
    return NamedSharding(mesh, logical_to_spec(("activation_batch", "activation_length"), rules,
                                               mesh=mesh))


def batch_axes(mesh, rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
    """Mesh axes (size > 1) that split the batch."""
    table, sizes = _rules_dict(rules), _mesh_sizes(mesh)
    if "activation_batch" not in table:
        raise ShardingError("sharding rules: need an 'activation_batch' rule")
    return tuple(a for a in (table["activation_batch"] or ()) if sizes.get(a, 1) > 1)


def expert_axes(mesh, rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
    """Mesh axes (size > 1) that split the experts of a layer."""
    table, sizes = _rules_dict(rules), _mesh_sizes(mesh)
    return tuple(a for a in (table.get("expert") or ()) if sizes.get(a, 1) > 1)


def validate(mesh: Mesh, cfg, global_batch: int, rules: Rules = DEFAULT_RULES) -> None:
    """Raise ShardingError naming the config keys when `cfg` and `global_batch` cannot run on
    `mesh` (rules naming missing mesh axes, batch or experts not divisible)."""
    sizes = _mesh_sizes(mesh)
    problems = []
    for name, axes in normalize_rules(rules):
        for a in axes or ():
            if a not in sizes:
                problems.append(f"sharding rule {name!r} names mesh axis {a!r}; mesh has "
                                f"{tuple(sizes)}")
    if problems:
        raise ShardingError("; ".join(problems))
    b_axes = batch_axes(mesh, rules)
    b = math.prod(sizes[a] for a in b_axes)
    if global_batch % b:
        problems.append(f"global_batch={global_batch} is not divisible by the batch mesh axes "
                        f"{' x '.join(f'mesh.{a}={sizes[a]}' for a in b_axes)} = {b}")
    e_axes = expert_axes(mesh, rules)
    x = math.prod(sizes[a] for a in e_axes)
    if x > 1:
        if cfg.num_local_experts % x:
            problems.append(f"model.num_local_experts={cfg.num_local_experts} is not divisible by "
                            f"the expert mesh axes {' x '.join(f'mesh.{a}={sizes[a]}' for a in e_axes)}"
                            f" = {x}")
    if problems:
        raise ShardingError("cannot shard: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Context: which mesh and rules the model runs under
# ----------------------------------------------------------------------------------------------

_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("zephyr_sharding_rules",
                                                                default=DEFAULT_RULES)


def active_rules() -> Rules:
    """Rules set by the innermost `use_rules` / `use_mesh` (DEFAULT_RULES otherwise)."""
    return _RULES.get()


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[Rules]:
    """Rules the MoE dispatch reads at trace time. Note: jit's cache does not key on them;
    trace a function under one rule table only."""
    token = _RULES.set(normalize_rules(rules))
    try:
        yield _RULES.get()
    finally:
        _RULES.reset(token)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[Mesh]:
    """`jax.set_mesh(mesh)` plus `use_rules(rules)`: the model traced inside runs expert-parallel
    when the rules' expert axes have size > 1."""
    with jax.set_mesh(mesh), use_rules(rules):
        yield mesh


def ambient_mesh():
    """The ambient mesh if one is set and none of its axes is manual (inside shard_map), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    if any(t == AxisType.Manual for t in mesh.axis_types):
        return None
    return mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules | None = None):
    """`with_sharding_constraint` by logical names under the ambient mesh; identity without one.

    For activations in model code, e.g. the residual stream at every layer boundary
    (("activation_batch", "activation_length", "activation_embed")): without it GSPMD may
    prefer the weights' FSDP split of `embed` and replicate the batch.
    """
    mesh = ambient_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(logical_axes, active_rules() if rules is None else rules, x.shape,
                           mesh, where="activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def gather_before_loop(w: jax.Array) -> jax.Array:
    """A weight used in every iteration of a loop (the LM head in the loss's chunk loop), whole
    on every device under the ambient mesh; identity without one.

    Left FSDP-sharded, XLA gathers it inside the loop, once per iteration, and reduce-scatters
    its gradient once per iteration too. In the 141B step compiled for 4 x 8 H100s (4 chunks of
    512 positions) the head ([6144, 32000] bf16, 0.37 GiB) was all-gathered 8 times per step and
    its float32 gradient reduce-scattered 4 times, across the hosts (~6.3 GB per device per
    step); gathered here, it is gathered once and its gradient all-reduced once after the loop
    (~2 GB), for 0.35 GiB more memory per device. (A custom VJP leaving the cotangent
    unconstrained kept the per-chunk reduce-scatters: XLA moves a loop accumulator's all-reduce
    out of the loop, not a reduce-scatter.)
    """
    return constrain(w, (None,) * w.ndim)


@dataclasses.dataclass(frozen=True)
class ExpertParallelPlan:
    """What the MoE dispatch needs to run expert-parallel: the mesh, the mesh axes that split the
    experts, and the mesh axes that split the tokens inside the MoE block (always including the
    expert axes, so each device of an expert group routes different tokens)."""

    mesh: Any  # jax.sharding.AbstractMesh or Mesh
    expert_axes: tuple[str, ...]
    token_axes: tuple[str, ...]

    @property
    def expert_size(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.expert_axes)

    @property
    def token_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.token_axes)


def expert_parallel_plan() -> ExpertParallelPlan | None:
    """The plan for the ambient mesh (`jax.set_mesh` / `use_mesh`), or None: no mesh, or the
    experts are not split (then the MoE runs as plain jnp code and GSPMD shards it)."""
    mesh = ambient_mesh()  # inside a shard_map the caller has already placed the data
    if mesh is None:
        return None
    rules = active_rules()
    e_axes = expert_axes(mesh, rules)
    if not e_axes:
        return None
    tokens = batch_axes(mesh, rules)
    tokens = tokens + tuple(a for a in e_axes if a not in tokens)
    return ExpertParallelPlan(mesh, e_axes, tokens)


# ----------------------------------------------------------------------------------------------
# Training state: parameters as a plain dict, optimizer state mirroring them
# ----------------------------------------------------------------------------------------------


def params_dict_shardings(model_cfg, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """NamedShardings shaped like `zephyr_jax.model.params_dict` (no weights allocated)."""
    from zephyr_jax.model import Mixtral

    abstract = nnx.eval_shape(lambda: Mixtral(model_cfg, rngs=nnx.Rngs(0)))
    return param_shardings(abstract, mesh, rules).to_pure_dict()


def mirror_shardings(tree, params_shardings: dict, mesh: Mesh):
    """Shardings for a pytree whose subtrees mirror the params (optimizer moments): a leaf whose
    key path ends with a parameter's path and has its rank takes that parameter's sharding;
    everything else (step counts, scalars) is replicated."""
    by_path = {}
    for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
        by_path[tuple(_key(k) for k in path)] = s
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        keys = tuple(_key(k) for k in path)
        for n in range(len(keys), 0, -1):
            s = by_path.get(keys[-n:])
            if s is not None and len(s.spec) <= len(getattr(leaf, "shape", ())):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def read_sharding(sharding: NamedSharding, shape: Sequence[int], whole_dims: int) -> NamedSharding:
    """The layout to read a layer-stacked parameter from files in, before resharding it to
    `sharding` (its training layout) over the interconnect.

    A file tensor holds one layer (and one expert) whole, so every process whose devices hold
    any columns of it must read all of it: on 4 hosts x 8 GPUs, where `data` splits the weights'
    hidden dim across the hosts, each host would read the whole model (Mixtral-8x22B: 282 GB per
    host, 4x the model from the file system). Here the mesh axes that split the dims a file
    tensor holds whole (the dims from `whole_dims` on; dim 0 is the layers) move onto the layer
    dim, in mesh order (the processes' axes first, as `make_mesh` lays them out), as long as the
    layer count divides them: then each file tensor is read by one process. Returns `sharding`
    itself where nothing moves (layers already split, or no axis fits).
    """
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    if spec[0] is not None:
        return sharding
    sizes = _mesh_sizes(sharding.mesh)

    def axes_of(entry) -> tuple[str, ...]:
        return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

    inner = {a for entry in spec[whole_dims:] for a in axes_of(entry)}
    moved: list[str] = []
    for a in sharding.mesh.axis_names:
        if a in inner and shape[0] % (math.prod(sizes[m] for m in moved) * sizes[a]) == 0:
            moved.append(a)
    if not moved:
        return sharding
    new = [tuple(moved) if len(moved) > 1 else moved[0]]
    for i, entry in enumerate(spec[1:], start=1):
        kept = axes_of(entry) if i < whole_dims else tuple(a for a in axes_of(entry) if a not in moved)
        new.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    while new and new[-1] is None:
        new.pop()
    return NamedSharding(sharding.mesh, PartitionSpec(*new))


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def process_batch_block(mesh: Mesh, rules: Rules = DEFAULT_RULES,
                        global_batch: int = 0) -> tuple[int, int]:
    """`(index, count)`: this process's rows of a global batch of `global_batch` rows are block
    `index` of `count` equal blocks (its loader's `shard_index`, `shard_count`).

    Processes whose devices hold the same rows (the batch mesh axes do not span them, e.g. a
    `tensor` axis across hosts) share a block and must load the same rows: one row set per
    process, as `jax.make_array_from_process_local_data` reads it, would silently train each
    on part of the batch. Raises ShardingError where the layout gives no such blocks."""
    spec = logical_to_spec(("activation_batch", "activation_length"), rules, mesh=mesh)
    sharding = NamedSharding(mesh, PartitionSpec(*spec))
    T = mesh.devices.size  # a length every mesh split divides
    rows: dict[int, set] = {}
    cols: dict[int, set] = {}
    for device, index in sharding.devices_indices_map((global_batch, T)).items():
        p = device.process_index
        rows.setdefault(p, set()).update(range(*index[0].indices(global_batch)))
        cols.setdefault(p, set()).update(range(*index[1].indices(T)))
    return batch_blocks(rows, cols, global_batch, T, jax.process_index())


def batch_blocks(rows_by_process: dict[int, set], cols_by_process: dict[int, set],
                 global_batch: int, length: int, me: int) -> tuple[int, int]:
    """`process_batch_block` from the rows and sequence positions each process's devices hold."""
    if any(len(c) != length for c in cols_by_process.values()):
        raise ShardingError("sharding_rules.activation_length splits the sequence across hosts; "
                            "each host must hold whole rows (split it within a host only)")
    blocks = sorted({frozenset(r) for r in rows_by_process.values()}, key=min)
    if (len({len(b) for b in blocks}) != 1 or sum(len(b) for b in blocks) != global_batch):
        raise ShardingError(
            f"the batch mesh axes give the {len(rows_by_process)} processes overlapping but "
            f"unequal parts of a batch of {global_batch}; make each host hold a whole share "
            "(mesh axes in sharding_rules.activation_batch over hosts, or none)")
    return blocks.index(frozenset(rows_by_process[me])), len(blocks)


def global_batch_array(local_BT: np.ndarray, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                       leading: int = 0, blocks: int | None = None) -> jax.Array:
    """This process's rows of a batch -> one global array split over the batch mesh axes.
    `leading` extra unsharded axes come first (gradient accumulation: [A, B, T]). `blocks`:
    the global batch is that many times this process's rows (`process_batch_block`; default
    one share per process, jax's inference)."""
    spec = logical_to_spec(("activation_batch", "activation_length"), rules, mesh=mesh)
    sharding = NamedSharding(mesh, PartitionSpec(*([None] * leading), *spec))
    shape = None
    if blocks is not None:
        shape = list(local_BT.shape)
        shape[leading] *= blocks
        shape = tuple(shape)
    return jax.make_array_from_process_local_data(sharding, local_BT, shape)
