"""A deployment target as data: the quantizers and graph rules one TOML file describes.

The file layout follows AIMET's runtime configuration (defaults, per-op-type rules, supergroups,
model input/output) and MQBench's per-backend quantizer table. Loading is strict: unknown keys,
wrong types and bad values are rejected with the exact field path, so a typo cannot silently
change what gets quantized. A file may start from another target with `extends = "NAME"`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx.defs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from qpasses.errors import InputError

BUILTIN_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Quantizer:
    """A uniform quantizer: r = scale * (q - zero_point), q in [qmin, qmax]."""

    bits: int = 8
    signed: bool | str = True  # True, False or "auto" (unsigned when the range is non-negative)
    symmetric: bool = True
    narrow_range: bool = False
    granularity: str = "per_tensor"  # "per_tensor" | "per_channel"
    scale: str = "float"  # "float" | "pow2"

    def qrange(self, signed: bool) -> tuple[int, int]:
        if signed:
            qmax = 2 ** (self.bits - 1) - 1
            return (-qmax if self.narrow_range else -qmax - 1), qmax
        return 0, 2**self.bits - 1 - int(self.narrow_range)

    def describe(self) -> str:
        sign = {True: "int", False: "uint", "auto": "(u)int"}[self.signed]
        parts = [f"{sign}{self.bits}", "symmetric" if self.symmetric else "asymmetric",
                 self.granularity.replace("_", "-")]
        if self.narrow_range:
            parts.append("narrow range")
        if self.scale == "pow2":
            parts.append("power-of-two scale")
        return ", ".join(parts)


@dataclass(frozen=True)
class OpRule:
    """How one op type is quantized: which activation inputs get Q/DQ, and scale sharing."""

    inputs: str | tuple[int, ...] = "all"  # "all" activation inputs, or explicit input indices
    share: bool = False  # inputs and output use one quantizer (concat, pooling, reshapes)
    weight_granularity: str | None = None  # overrides weight.granularity for this op type


@dataclass(frozen=True)
class TvmDevice:
    """The `[tvm]` table: the LLVM target TVM compiles for, and the C compiler that links the library."""

    llvm: dict[str, Any]  # e.g. {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    cross_compiler: str = ""  # e.g. "aarch64-linux-gnu-gcc"; empty: the host's compiler


@dataclass(frozen=True)
class Fusion:
    """The `[fusion]` table, for engines that turn DequantizeLinear -> op -> QuantizeLinear groups into
    integer kernels (ONNX Runtime's QDQ selectors): an op under [ops] runs in integer only when every
    input its rule names comes from a DequantizeLinear and, unless listed in `float_output`, a
    QuantizeLinear that nothing else bypasses reads its output. qpass then places exactly the Q/DQ
    such kernels read or write, and every reader of a quantized tensor reads its DequantizeLinear.
    A float constant among those inputs (the 3 of hard-swish's x + 3) is stored as an integer
    initializer with the activation quantizer, since the kernel reads every input as integers; a
    constant that 8 bits cannot hold within `constant_error` keeps its op float instead."""

    float_output: tuple[str, ...] = ()  # ops whose integer kernel may write float (QGemm, MatMulIntegerToFloat)
    decompose: tuple[str, ...] = ()  # ops rewritten into ops the engine fuses, before planning (qpasses.passes.decompose)
    constant_error: float = 0.01  # worst relative error of a constant input's element, quantized
    preoptimize: str = ""  # the engine's float rewrites to run before planning: "basic" (qpasses.passes.preoptimize)


@dataclass(frozen=True)
class CpuChoice:
    """One row of the `[cpu]` table: on a CPU with `feature`, `target` runs best, because `why`."""

    feature: str  # a /proc/cpuinfo flag: avx512_vnni, avx_vnni, avx2, asimddp
    target: str
    why: str


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    reference: str
    fold_batchnorm: bool
    bias: str  # "float" | "int32"
    weight_storage: str  # "float" (float weight -> Q -> DQ) | "int" (integer initializer -> DQ)
    quantize_model_input: bool
    quantize_model_output: bool
    weight: Quantizer
    activation: Quantizer
    ops: dict[str, OpRule]
    supergroups: tuple[tuple[str, ...], ...]
    float_ops: tuple[str, ...]
    float_tail: bool = True  # ops after the last conv/matmul on every path (decode, sigmoid, concat) stay float
    # a shared quantizer (concat inputs, pooling in/out) whose members' ranges differ by more than this
    # factor is split: the op that ties them runs float and each member keeps its own range
    share_range_ratio: float = 32.0
    tvm: TvmDevice | None = None  # where `qpass compile --engine tvm` builds for, if the target runs on TVM
    engine: str = ""  # the engine whose own optimised graph `quantize` reads back (int8 coverage): "onnxruntime"
    fusion: Fusion | None = None  # how the engine fuses Q/DQ groups, when it does (see Fusion)
    cpu: tuple[CpuChoice, ...] = ()  # which target each CPU runs best, first matching feature wins
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def weight_quantizer(self, op_type: str) -> Quantizer:
        rule = self.ops.get(op_type)
        if rule and rule.weight_granularity:
            return Quantizer(**{**self.weight.__dict__, "granularity": rule.weight_granularity})
        return self.weight


def _ratio(f: "_Fields") -> float:
    ratio = float(f.take("share_range_ratio", (float, int), Target.share_range_ratio))
    if not ratio >= 1.0:
        raise f.fail("share_range_ratio", "expected a factor of at least 1 (inf: never split)")
    return ratio


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_target(name_or_path: str) -> Target:
    """Load a shipped target by name or a user's target file by path."""
    path = _resolve(name_or_path)
    return _from_dict(_read(path, set()), str(path))


def _resolve(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists() or "/" in name_or_path:
        if not candidate.is_file():
            raise InputError(f"target file {name_or_path}: no such file")
        return candidate
    builtin = BUILTIN_DIR / f"{name_or_path}.toml"
    if not builtin.is_file():
        raise InputError(f"unknown target {name_or_path!r}; shipped targets: {', '.join(builtin_names())} "
                         "(or give the path of a target .toml file)")
    return builtin


def _read(path: Path, seen: set[Path]) -> dict[str, Any]:
    if path.resolve() in seen:
        raise InputError(f"{path}: 'extends' forms a cycle")
    seen.add(path.resolve())
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read target file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise InputError(f"{path}: extends: expected a target name or path")
    base_path = _resolve(base_name) if not (path.parent / base_name).is_file() else path.parent / base_name
    return _merge(_read(base_path, seen), data)


WHOLE_TABLES = ("llvm",)  # an LLVM target is replaced, not merged: an x86 target keeps no ARM triple


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in WHOLE_TABLES:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _Fields:
    """Typed, path-aware access to one TOML table; leftover keys are errors."""

    def __init__(self, data: Any, where: str, source: str):
        if not isinstance(data, dict):
            raise InputError(f"{source}: {where or 'file'}: expected a table")
        self.data, self.where, self.source = dict(data), where, source

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, message: str) -> InputError:
        return InputError(f"{self.source}: {self._path(key)}: {message}")

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise self.fail(key, "missing")
            return default
        value = self.data.pop(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise self.fail(key, f"expected {names}, got {value!r}")
        return value

    def choice(self, key: str, options: tuple[Any, ...], default: Any = ...) -> Any:
        value = self.take(key, tuple({type(o) for o in options}), default)
        if value not in options and not (default is not ... and value == default):
            raise self.fail(key, f"expected one of {', '.join(repr(o) for o in options)}, got {value!r}")
        return value

    def table(self, key: str, default: Any = ...) -> "_Fields":
        return _Fields(self.take(key, dict, default), self._path(key), self.source)

    def done(self) -> None:
        if self.data:
            raise self.fail(sorted(self.data)[0], "unknown field")


def _quantizer(f: _Fields) -> Quantizer:
    bits = f.take("bits", int, 8)
    if not 2 <= bits <= 8:
        raise f.fail("bits", f"expected 2..8, got {bits}")
    signed = f.take("signed", (bool, str), True)
    if signed not in (True, False, "auto"):
        raise f.fail("signed", f"expected true, false or \"auto\", got {signed!r}")
    q = Quantizer(
        bits=bits,
        signed=signed,
        symmetric=f.take("symmetric", bool),
        narrow_range=f.take("narrow_range", bool, False),
        granularity=f.choice("granularity", ("per_tensor", "per_channel")),
        scale=f.choice("scale", ("float", "pow2"), "float"),
    )
    f.done()
    return q


def _op_rule(op: str, f: _Fields) -> OpRule:
    inputs = f.take("inputs", (str, list), "all")
    if isinstance(inputs, str) and inputs != "all":
        raise f.fail("inputs", f"expected \"all\" or a list of input indices, got {inputs!r}")
    if isinstance(inputs, list):
        if not inputs or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in inputs):
            raise f.fail("inputs", "expected a non-empty list of input indices")
        count = _input_count(op)
        if count is not None and max(inputs) >= count:
            raise f.fail("inputs", f"{op} has {count} input(s) (indices 0..{count - 1}), got {inputs}")
        inputs = tuple(inputs)
    rule = OpRule(
        inputs=inputs,
        share=f.take("share", bool, False),
        weight_granularity=f.choice("weight_granularity", ("per_tensor", "per_channel"), None),
    )
    f.done()
    return rule


def _input_count(op: str) -> int | None:
    """How many inputs the ONNX op takes at most (None: variadic, or not an ONNX op)."""
    try:
        count = onnx.defs.get_schema(op).max_input
    except onnx.defs.SchemaError:
        return None
    return count if count < 2**16 else None


def _fusion(f: _Fields) -> Fusion:
    from qpasses.passes.decompose import DECOMPOSITIONS

    lists = {}
    for key in ("float_output", "decompose"):
        lists[key] = f.take(key, list, [])
        if not all(isinstance(o, str) for o in lists[key]):
            raise f.fail(key, "expected a list of op types")
    unknown = sorted(set(lists["decompose"]) - set(DECOMPOSITIONS))
    if unknown:
        raise f.fail("decompose", f"qpass cannot decompose {unknown[0]} (it can: {', '.join(DECOMPOSITIONS)})")
    error = f.take("constant_error", (float, int), Fusion.constant_error)
    if not 0 <= error < 1:
        raise f.fail("constant_error", "expected a relative error in [0, 1)")
    preoptimize = f.choice("preoptimize", ("basic",), "")  # the one level whose rewrites stay standard ONNX
    f.done()
    return Fusion(float_output=tuple(lists["float_output"]), decompose=tuple(lists["decompose"]), constant_error=error,
                  preoptimize=preoptimize)


def _cpu_choices(f: _Fields) -> tuple[CpuChoice, ...]:
    choices = []
    for feature in list(f.data):
        row = f.table(feature)
        choices.append(CpuChoice(feature, row.take("target", str), row.take("why", str)))
        row.done()
    f.done()
    return tuple(choices)


def _tvm_device(f: _Fields) -> TvmDevice:
    llvm = f.take("llvm", dict)
    if llvm.get("kind") != "llvm":
        raise f.fail("llvm", 'expected an LLVM target table with kind = "llvm"')
    device = TvmDevice(llvm=dict(llvm), cross_compiler=f.take("cross_compiler", str, ""))
    f.done()
    return device


def _from_dict(data: dict[str, Any], source: str) -> Target:
    f = _Fields(data, "", source)
    name = f.take("name", str)
    ops_table = f.table("ops")
    ops = {op: _op_rule(op, ops_table.table(op)) for op in sorted(ops_table.data)}
    supergroups = f.take("supergroups", list, [])
    for i, group in enumerate(supergroups):
        if not (isinstance(group, list) and len(group) >= 2 and all(isinstance(o, str) for o in group)):
            raise f.fail(f"supergroups[{i}]", "expected a list of two or more op types")
    float_ops = f.take("float_ops", list, [])
    if not all(isinstance(o, str) for o in float_ops):
        raise f.fail("float_ops", "expected a list of op types")
    target = Target(
        name=name,
        summary=f.take("summary", str),
        reference=f.take("reference", str, ""),
        fold_batchnorm=f.take("fold_batchnorm", bool, True),
        bias=f.choice("bias", ("float", "int32"), "float"),
        weight_storage=f.choice("weight_storage", ("float", "int")),
        quantize_model_input=f.take("quantize_model_input", bool, False),
        quantize_model_output=f.take("quantize_model_output", bool, False),
        weight=_quantizer(f.table("weight")),
        activation=_quantizer(f.table("activation")),
        ops=ops,
        supergroups=tuple(tuple(g) for g in supergroups),
        float_ops=tuple(float_ops),
        float_tail=f.take("float_tail", bool, True),
        share_range_ratio=_ratio(f),
        tvm=_tvm_device(f.table("tvm")) if "tvm" in f.data else None,
        engine=f.choice("engine", ("", "onnxruntime"), ""),
        fusion=_fusion(f.table("fusion")) if "fusion" in f.data else None,
        cpu=_cpu_choices(f.table("cpu", {})),
        source=source,
        raw=dict(data),
    )
    f.done()
    if target.activation.granularity != "per_tensor":
        raise InputError(f"{source}: activation.granularity: only per_tensor is supported for activations")
    if target.activation.bits != 8:
        raise InputError(f"{source}: activation.bits: activations are 8-bit (ONNX QuantizeLinear saturates to int8/uint8)")
    return target
