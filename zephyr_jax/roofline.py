"""A roofline reading of a compiled GPU program: for each kernel it launches, its FLOPs and the
bytes it moves to and from device memory, and the least time either allows.

    python -m zephyr_jax.gpu_aot --target h100 --moe-impl dense,pallas   # prints it per variant

Nothing runs: this reads the HLO text XLA compiled for the GPU (`gpu_aot`, without one). A
kernel takes at least max(FLOPs / peak FLOP/s, bytes / memory bandwidth); summed over the step
(loops counted their trip counts) that bounds the step time from below, and the model FLOPs over
it bounds MFU from above. Real kernels reach neither peak, so a measured step is slower; what
this shows without a GPU is where the step's time must go: how much of it the matmuls need at
peak, and which memory-bound kernels (named by the jax operation they came from) add to it.

Bytes are what a kernel reads and writes in device memory: its operands and results, except
that a fusion operand used only through slices counts the slices (one layer of a stacked
weight), and an operand updated in place (dynamic-update-slice at the fusion's root) counts
only the update. Caches and re-reads inside a kernel are not modelled.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from zephyr_jax.hlo_text import (
    Instruction,
    Module,
    arrays,
    dot_flops,
    loop_totals,
    parse,
    type_bytes,
)

# instructions that launch nothing: bookkeeping, control flow (their bodies are measured), and the
# `*-done` halves of asynchronous pairs (the `*-start` half is the kernel)
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
         "call", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
         "domain", "async-start", "async-update", "async-done"}
_COLLECTIVES = {"all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                "ragged-all-to-all", "collective-broadcast", "send", "recv"}
_SLICES = {"dynamic-slice", "slice"}


@dataclass(frozen=True)
class Kernel:
    flops: float
    bytes: float
    kind: str  # "matmul" (counted FLOPs), "memory", "custom" (FLOPs unknown), "collective"
    label: str  # the jax operation it came from (metadata op_name, shortened)


def _label(ins: Instruction) -> str:
    m = re.search(r'op_name="([^"]*)"', ins.rest)
    if not m:
        return ins.op
    # "jit(train_step)/transpose(jvp())/while/body/eval_jaxpr/gmm_t/pallas_call": the
    # transform prefix says forward or backward; the tail names the operation
    parts = m.group(1).split("/")
    direction = "bwd" if any(p.startswith("transpose(") for p in parts) else "fwd"
    tail = [p for p in parts[1:] if p not in ("while", "body", "cond", "eval_jaxpr", "closed_call")
            and not p.startswith(("transpose(", "jvp(", "checkpoint", "remat"))]
    return f"{direction}:{'/'.join(tail[-3:])}"


def _users(body: list[Instruction]) -> dict[str, list[Instruction]]:
    users: dict[str, list[Instruction]] = {}
    for ins in body:
        for o in ins.operands():
            users.setdefault(o, []).append(ins)
    return users


def _body_flops(comp: str, module: Module) -> float:
    """FLOPs of a fusion's body: its dots, and the custom calls some fusions wrap (tokamax's
    Mosaic GPU kernels are custom calls inside kCustom fusions)."""
    total = 0.0
    for ins in module.computations.get(comp, []):
        if ins.op == "dot":
            total += dot_flops(ins, module)
        elif ins.op == "custom-call":
            total += _custom_call_flops(ins, module)
        elif ins.op == "fusion":
            total += _body_flops(ins.attr("calls"), module)
    return total


def _read_bytes(param: str, users: dict[str, list[Instruction]], module: Module,
                in_place: set[str]) -> float:
    """Bytes a fusion reads of one operand: the slices taken of it when it is only sliced
    (through bitcasts), nothing when it is the buffer updated in place, else all of it."""
    if param in in_place:
        return 0.0
    sliced, frontier = 0.0, [param]
    while frontier:
        name = frontier.pop()
        for u in users.get(name, []):
            if u.op == "bitcast":
                frontier.append(u.name)
            elif u.op in _SLICES and u.operands()[0] == name:
                sliced += type_bytes(u.type)
            else:
                return float(type_bytes(module.types[param]))
    return sliced


def _fusion_bytes(ins: Instruction, module: Module) -> float:
    body = module.computations.get(ins.attr("calls"), [])
    users = _users(body)
    params = {int(re.match(r"(\d+)", i.rest).group(1)): i.name for i in body if i.op == "parameter"}
    root = next((i for i in body if i.root), None)
    outs = [root] if root is not None else []
    if root is not None and root.op == "tuple":
        by_name = {i.name: i for i in body}
        outs = [by_name[o] for o in root.operands() if o in by_name]
    written, in_place = 0.0, set()
    for out in outs:
        if out.op == "dynamic-update-slice":
            target, update = out.operands()[:2]
            in_place.add(target)  # an operand, or a buffer the fusion fills: only the update moves
            written += type_bytes(module.types[update])
        else:
            written += type_bytes(out.type)
    read = sum(_read_bytes(p, users, module, in_place) for p in params.values())
    return read + written


def _grouped_gemm_flops(ins: Instruction, module: Module) -> float:
    """A custom kernel's FLOPs if its operands and result are those of a grouped GEMM: one
    [groups, a, b] float array (the experts' weights, or their gradient) and a [rows, a] or
    [rows, b] float array: 2 x rows x a x b (every row through one group's matrix). Else 0."""
    floating = ("bf16", "f16", "f32")
    floats = [d for o in ins.operands() for t, d in arrays(module.types.get(o, "")) if t in floating]
    floats += [d for t, d in arrays(ins.type) if t in floating]
    cubes = [s for s in floats if len(s) == 3]
    if len(cubes) != 1:
        return 0.0
    _, a, b = cubes[0]
    rows = [s[0] for s in floats if len(s) == 2 and s[1] in (a, b)]
    return 2.0 * max(rows) * a * b if rows else 0.0


def _gemm_custom_call_flops(ins: Instruction, module: Module) -> float:
    """FLOPs of a cuBLAS / cuBLASLt GEMM custom call (result: the product, then a workspace)."""
    lhs = module.dims(ins.operands()[0]) or []
    cd = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.rest)
    k = math.prod(lhs[int(i.strip('" '))] for i in cd.group(1).split(",") if i.strip()) if cd else 1
    out = math.prod(arrays(ins.type)[0][1]) if arrays(ins.type) else 0
    return 2.0 * out * k


def _attention_flops(ins: Instruction, target: str) -> float:
    """FLOPs of a cuDNN fused attention call: its [B, H, Tq, Tk] score shape times the head dim,
    2 matmuls forward and 5 backward (the scores recomputed, then dV, dP, dQ, dK), halved under
    a causal mask (flash attention skips the masked tiles)."""
    m = re.search(r'"intermediate_tensor_shape":\s*\{[^{}]*?"dimensions":\s*\[([^\]]*)\]', ins.rest)
    out = arrays(ins.type)
    if not m or not out:
        return 0.0
    scores = math.prod(int(d.strip('" ')) for d in m.group(1).split(",") if d.strip())
    matmuls = 5 if "Backward" in target else 2
    causal = 0.5 if re.search(r'"mask_type":\s*"[A-Z_]*CAUSAL', ins.rest) else 1.0
    return 2.0 * scores * out[0][1][-1] * matmuls * causal


def _target(ins: Instruction) -> str:
    m = re.search(r'custom_call_target="([^"]+)"', ins.rest)
    return m.group(1) if m else ""


def _custom_call_flops(ins: Instruction, module: Module) -> float:
    """FLOPs of a custom call: cuBLAS GEMMs and cuDNN attention from their configs, other
    kernels (Pallas, Mosaic GPU) when their shapes are a grouped GEMM's; else 0 (unknown)."""
    target = _target(ins)
    if "cublas" in target:
        return _gemm_custom_call_flops(ins, module)
    if "cudnn$fmha" in target:
        return _attention_flops(ins, target)
    return _grouped_gemm_flops(ins, module)


def kernel(ins: Instruction, module: Module) -> Kernel | None:
    """The kernel an instruction launches (None if it launches none)."""
    op = ins.op
    if op in _FREE or op.endswith("-done"):
        return None
    label = _label(ins)
    if op.removesuffix("-start") in _COLLECTIVES:
        return Kernel(0.0, float(type_bytes(ins.type)), "collective", label)
    if op in ("fusion", "fusion-start"):
        flops = _body_flops(ins.attr("calls"), module)
        wraps_kernel = any(i.op == "custom-call" for i in module.computations.get(ins.attr("calls"), []))
        kind = "matmul" if flops else "custom" if wraps_kernel else "memory"
        return Kernel(flops, _fusion_bytes(ins, module), kind, label)
    operand_bytes = sum(type_bytes(module.types.get(o, "")) for o in ins.operands())
    if op == "custom-call":
        flops = _custom_call_flops(ins, module)
        return Kernel(flops, operand_bytes + type_bytes(ins.type), "matmul" if flops else "custom",
                      f"{label} [{_target(ins)}]")
    if op == "dot":
        return Kernel(dot_flops(ins, module), operand_bytes + type_bytes(ins.type), "matmul", label)
    if op == "dynamic-update-slice":
        return Kernel(0.0, 2.0 * type_bytes(module.types.get(ins.operands()[1], "")), "memory", label)
    if op in _SLICES:
        return Kernel(0.0, 2.0 * type_bytes(ins.type), "memory", label)
    return Kernel(0.0, operand_bytes + type_bytes(ins.type), "memory", label)


def roofline(hlo: str | Module, peak_flops: float, bandwidth: float, top: int = 12) -> dict:
    """The step's least time by kernel kind, and its `top` costliest operations (summed over their
    kernels and loop trips), from a compiled GPU program's HLO text."""
    module = parse(hlo) if isinstance(hlo, str) else hlo

    def measure(ins, mod):
        k = kernel(ins, mod)
        if k is None:
            return {}
        if k.kind == "collective":  # the interconnect's time, not device memory's
            return {"collective/bytes": k.bytes, "collective/count": 1.0}
        t = max(k.flops / peak_flops, k.bytes / bandwidth)
        return {f"{k.kind}/s": t, f"{k.kind}/count": 1.0, f"{k.kind}/flops": k.flops,
                f"{k.kind}/bytes": k.bytes, f"op/{k.kind}/{k.label}": t}

    totals = loop_totals(module, measure, kernel_bodies=False)
    kinds = ("matmul", "memory", "custom")
    out = {"peak_flops": peak_flops, "bandwidth_bytes_per_s": bandwidth,
           "seconds": sum(totals.get(f"{k}/s", 0.0) for k in kinds),
           "kernels": int(sum(totals.get(f"{k}/count", 0.0) for k in kinds))}
    for k in kinds:
        out[k] = {"seconds": totals.get(f"{k}/s", 0.0), "kernels": int(totals.get(f"{k}/count", 0)),
                  "flops": totals.get(f"{k}/flops", 0.0), "bytes": totals.get(f"{k}/bytes", 0.0)}
    out["matmul"]["seconds_at_peak"] = out["matmul"]["flops"] / peak_flops
    if "collective/count" in totals:
        out["collective"] = {"count": int(totals["collective/count"]),
                             "bytes": totals["collective/bytes"]}
    ops = sorted(((key.split("/", 2)[1], key.split("/", 2)[2], t) for key, t in totals.items()
                  if key.startswith("op/")), key=lambda x: -x[2])
    out["top"] = [{"kind": kind, "op": label, "seconds": t} for kind, label, t in ops[:top]]
    return out


def summary(r: dict, model_flops: float) -> str:
    """One line: the least step time, its parts, and the MFU it allows."""
    s = r["seconds"]
    return (f"roofline {s * 1e3:.1f} ms = matmul {r['matmul']['seconds'] * 1e3:.1f} "
            f"({r['matmul']['kernels']} kernels) + memory-bound {r['memory']['seconds'] * 1e3:.1f} "
            f"({r['memory']['kernels']}) + custom, FLOPs unknown {r['custom']['seconds'] * 1e3:.1f} "
            f"({r['custom']['kernels']}); MFU at most {model_flops / (r['peak_flops'] * s):.1%}"
            if s > 0 else "roofline: no kernels")
