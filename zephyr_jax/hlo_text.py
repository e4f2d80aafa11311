"""Read a compiled program's HLO text (`compiled.as_text()`): its computations, instructions and
array types, and sums over the instructions that run, with loops counted their trip counts.

Used by `plan` (the step's dot FLOPs and collectives), `gpu_aot` (its arrays) and `roofline`
(its kernels' FLOPs and bytes). Only the text is read; nothing is compiled here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_HLO_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
# result types: an array, or a tuple nesting tuples and layouts such as {1,0:S(1)} (3 deep)
_HLO_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%([\w.\-]+) = (\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\)|\S+?)(?:\{[^}]*\})? "
    r"([\w\-]+)\((.*)$")
ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
            "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY_TYPE = re.compile(r"([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


@dataclass(frozen=True)
class Instruction:
    name: str
    op: str
    type: str  # the result type as printed: an array such as bf16[8,128] or a tuple of them
    rest: str  # operands and attributes, as printed after the opening parenthesis
    root: bool

    def operands(self) -> list[str]:
        """Names of the operands (the instruction's argument list, before its attributes)."""
        depth, end = 1, len(self.rest)
        for i, ch in enumerate(self.rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                end = i
                break
        return re.findall(r"%([\w.\-]+)", self.rest[:end])

    def attr(self, key: str) -> str | None:
        """A `key=%name` attribute (calls, body, condition, to_apply), or None."""
        m = re.search(rf"\b{key}=%([\w.\-]+)", self.rest)
        return m.group(1) if m else None


@dataclass
class Module:
    computations: dict[str, list[Instruction]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)  # every instruction's result type, by name
    entry: str | None = None

    def dims(self, name: str) -> list[int] | None:
        """The dimensions of an array-typed instruction's result (None for a tuple)."""
        m = re.match(r"^[a-z0-9]+\[([0-9,]*)\]", self.types.get(name, ""))
        return [int(d) for d in m.group(1).split(",") if d] if m else None


def parse(hlo_text: str) -> Module:
    module = Module()
    cur = None
    for line in hlo_text.splitlines():
        m = _HLO_COMPUTATION.match(line)
        if m and not line.startswith(" "):
            cur = module.computations.setdefault(m.group(2), [])
            module.entry = m.group(2) if m.group(1) else module.entry
            continue
        m = _HLO_INSTRUCTION.match(line)
        if m and cur is not None:
            name, typ, op, rest = m.groups()
            module.types[name] = typ
            cur.append(Instruction(name, op, typ, rest, line.lstrip().startswith("ROOT ")))
    return module


def arrays(typ: str) -> list[tuple[str, list[int]]]:
    """(dtype, dims) of every array in a type (one for an array, each leaf of a tuple)."""
    return [(t, [int(d) for d in shape.split(",") if d]) for t, shape in _ARRAY_TYPE.findall(typ)]


def type_bytes(typ: str) -> int:
    """Bytes of every array in a type together (a tuple's leaves summed)."""
    return sum(math.prod(d) * ITEMSIZE.get(t, 4) for t, d in arrays(typ))


def largest_array_bytes(typ: str) -> int:
    return max((math.prod(d) * ITEMSIZE.get(t, 4) for t, d in arrays(typ)), default=0)


def dot_flops(ins: Instruction, module: Module) -> float:
    """2 x output elements x contracted size of a `dot` instruction."""
    lhs = ins.operands()[0]
    cd = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.rest)
    lhs_dims = module.dims(lhs) or []
    k = math.prod(lhs_dims[int(i)] for i in cd.group(1).split(",") if i) if cd else 1
    return 2.0 * math.prod(module.dims(ins.name) or []) * k


def loop_totals(hlo: str | Module, measure, *, kernel_bodies: bool = True) -> dict[str, float]:
    """Sum `measure(instruction, module) -> {key: amount}` over a compiled HLO module's
    instructions, with while loops counted `known_trip_count` times (once where unknown),
    conditionals by their largest branch, and called computations (calls, maps, async wrappers)
    inlined. So are fusions' bodies and reductions' `to_apply` unless `kernel_bodies` is False:
    then only what runs as kernels is measured, a fusion as the one kernel it is."""
    module = parse(hlo) if isinstance(hlo, str) else hlo
    memo: dict[str, dict[str, float]] = {}

    def add(into: dict, more: dict, times: float = 1.0) -> None:
        for k, v in more.items():
            into[k] = into.get(k, 0.0) + v * times

    def total(comp: str) -> dict[str, float]:
        if comp not in memo:
            memo[comp] = {}  # recursion guard
            acc: dict[str, float] = {}
            for ins in module.computations.get(comp, []):
                add(acc, measure(ins, module))
                if ins.op == "while":
                    n = re.search(r'known_trip_count":\{"n":"(\d+)"', ins.rest)
                    add(acc, total(ins.attr("body")), int(n.group(1)) if n else 1)
                elif ins.op == "conditional":
                    branches = re.search(r"branch_computations=\{([^}]*)\}", ins.rest)
                    if branches:
                        sums = [total(b.strip().lstrip("%")) for b in branches.group(1).split(",")]
                        for k in {k for d in sums for k in d}:
                            acc[k] = acc.get(k, 0.0) + max(d.get(k, 0.0) for d in sums)
                else:
                    keys = ("calls", "to_apply") if kernel_bodies else ("calls",)
                    if not kernel_bodies and ins.op in ("fusion", "fusion-start"):
                        keys = ()
                    for key in keys:
                        for c in re.findall(rf"\b{key}=%([\w.\-]+)", ins.rest):
                            add(acc, total(c))
            memo[comp] = acc
        return memo[comp]

    return total(module.entry) if module.entry else {}
