"""Engines: from a qpass Q/DQ model to something that runs, and its latency (`qpass compile`, `qpass bench`).

One module per engine, imported only when used (TensorRT and TVM are optional):
`onnxruntime` (CPU), `tensorrt` (NVIDIA GPU), `tvm` (x86 and ARM CPUs, a shared library). Each offers `compile_model(model, output, ...)`
returning a report with `to_json()`, and a `Runner(artifact, ...)` that `qpasses.bench` times.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from qpasses.errors import InputError

ENGINES = ("onnxruntime", "tensorrt", "tvm")
SUFFIX = {"onnxruntime": ".ort.onnx", "tensorrt": ".plan", "tvm": ".so"}
KIND = {"onnxruntime": "onnx", "tensorrt": "tensorrt", "tvm": "elf"}  # what each engine's artifact looks like


def engine(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def file_kind(path: Path) -> str:
    """What an artifact looks like from its first bytes: "elf" (a shared library), "tensorrt", or "onnx"."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from None
    if head.startswith(b"\x7fELF"):
        return "elf"
    if b"ftrt" in head[:32]:
        return "tensorrt"
    return "onnx"


def expect_kind(path: Path, engine_name: str) -> None:
    """A one-line error when the artifact was made for another engine."""
    kind = file_kind(path)
    if kind == KIND[engine_name]:
        return
    names = {"elf": "a shared library (a TVM module?)", "tensorrt": "a serialized TensorRT engine", "onnx": "an ONNX model"}
    hint = {"tensorrt": "--engine tensorrt", "onnx": "--engine onnxruntime, or build an engine with `qpass compile`",
            "elf": "--engine tvm"}[kind]
    raise InputError(f"{path} is {names[kind]}, not what --engine {engine_name} runs (use {hint})")
