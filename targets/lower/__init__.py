"""Engines: from a qpass Q/DQ model to something that runs, and its latency (`qpass compile`, `qpass bench`).

One module per engine, imported only when used (TensorRT and TVM are optional):
`onnxruntime` (CPU), `tensorrt` (NVIDIA GPU), `tvm` (x86 and ARM CPUs, a shared library). Each offers `compile_model(model, output, ...)`
returning a report with `to_json()`, and a `Runner(artifact, ...)` that `qpasses.bench` times.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import onnx

from qpasses.errors import InputError
from qpasses.ops import WEIGHTED_OPS

ENGINES = ("onnxruntime", "tensorrt", "tvm")
SUFFIX = {"onnxruntime": ".ort.onnx", "tensorrt": ".plan", "tvm": ".so"}
KIND = {"onnxruntime": "onnx", "tensorrt": "tensorrt", "tvm": "elf"}  # what each engine's artifact looks like
# how the TVM engine runs integer convs (`tvm_schedule.int_kernel_for`); here so the CLI need not import TVM
INT_KERNELS = ("auto", "integer", "pmaddwd", "vnni256", "vnni512", "sdot", "float-exact")


def planned_int8(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The conv/gemm/matmul nodes a Q/DQ model plans in int8: their weight (a MatMul's second
    operand) comes from a DequantizeLinear. What every engine's report checks against."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    return [n for n in model.graph.node if n.op_type in WEIGHTED_OPS and len(n.input) > 1
            and producer.get(n.input[1]) == "DequantizeLinear"]


def sidecar(library: Path) -> Path:
    """The `.json` beside a TVM library that records its inputs and compile report."""
    return library.with_name(library.name + ".json")


def engine(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def file_kind(path: Path) -> str:
    """What an artifact looks like from its first bytes: "elf" (a shared library), "tensorrt", "onnx"
    (a protobuf whose first field is ir_version, as every ONNX writer puts it), or "unknown"."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from None
    if head.startswith(b"\x7fELF"):
        return "elf"
    if b"ftrt" in head[:32]:
        return "tensorrt"
    return "onnx" if head[:1] == b"\x08" else "unknown"


def expect_kind(path: Path, engine_name: str) -> None:
    """A one-line error when the artifact was made for another engine, or is not whole."""
    kind = file_kind(path)
    if kind == "unknown":
        raise InputError(f"{path} is neither an ONNX model, a TensorRT engine nor a shared library")
    if kind == KIND[engine_name]:
        problem = elf_problem(path) if kind == "elf" else None
        if problem:  # loading it would crash the process (SIGBUS) instead of failing
            raise InputError(f"{path} is a damaged shared library: {problem}; build it again with `qpass compile`")
        return
    names = {"elf": "a shared library (a TVM module?)", "tensorrt": "a serialized TensorRT engine", "onnx": "an ONNX model"}
    hint = {"tensorrt": "--engine tensorrt", "onnx": "--engine onnxruntime, or build an engine with `qpass compile`",
            "elf": "--engine tvm"}[kind]
    raise InputError(f"{path} is {names[kind]}, not what --engine {engine_name} runs (use {hint})")


def elf_problem(path: Path) -> str | None:
    """Why an ELF file cannot be whole (a header, section or loaded segment past its end), or None.
    `dlopen` maps a truncated library and the first touch of a missing page kills the process."""
    data = path.read_bytes()
    size = len(data)
    if size < 64 or data[4] not in (1, 2) or data[5] not in (1, 2):
        return "its ELF header is cut short"
    wide, order = data[4] == 2, "little" if data[5] == 1 else "big"

    def field(offset: int, width: int) -> int:
        return int.from_bytes(data[offset:offset + width], order)

    phoff, shoff = (field(0x20, 8), field(0x28, 8)) if wide else (field(0x1C, 4), field(0x20, 4))
    base = 0x36 if wide else 0x2A
    phentsize, phnum, shentsize, shnum = (field(base + 2 * i, 2) for i in range(4))
    if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size:
        return f"its header tables end past the file's {size} bytes"
    for i in range(phnum):  # PT_LOAD segments: p_offset + p_filesz
        entry = phoff + i * phentsize
        offset, filesz = (field(entry + 8, 8), field(entry + 0x20, 8)) if wide else (field(entry + 4, 4), field(entry + 16, 4))
        if field(entry, 4) == 1 and offset + filesz > size:
            return f"a loaded segment ends at byte {offset + filesz}, past the file's {size}"
    for i in range(shnum):  # sections with contents (not SHT_NOBITS): sh_offset + sh_size
        entry = shoff + i * shentsize
        offset, length = (field(entry + 0x18, 8), field(entry + 0x20, 8)) if wide else \
            (field(entry + 0x10, 4), field(entry + 0x14, 4))
        if field(entry + 4, 4) != 8 and offset + length > size:
            return f"a section ends at byte {offset + length}, past the file's {size}"
    return None
