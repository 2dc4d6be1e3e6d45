"""Latency measurement shared by every engine (`qpass bench`).

An engine gives a `Runner`: one call runs one inference on fixed inputs and returns its latency in
milliseconds, measured the engine's own way (wall clock for ONNX Runtime, CUDA events for
TensorRT, the device's timer for TVM). Here: warm-up, timed runs, statistics, and the comparison
model measured in the same session, interleaved run by run so that drift (frequency scaling,
other load) hits both alike and the speedup is a fair ratio.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from tqdm import tqdm

from qpasses.calibration.runner import input_specs
from qpasses.errors import EngineError, InputError

SCHEMA, VERSION = "qpass.bench", 1


class Runner(Protocol):
    device: str  # what ran it, e.g. the CPU or GPU name

    def __call__(self) -> float:
        """Run one inference; its latency in milliseconds."""
        ...


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    mean_ms: float
    std_ms: float
    runs: int

    @classmethod
    def of(cls, samples: list[float]) -> "Latency":
        a = np.asarray(samples, dtype=np.float64)
        return cls(*(float(v) for v in (np.median(a), np.percentile(a, 90), np.percentile(a, 99), a.min(), a.mean(),
                                        a.std())), runs=len(a))


@dataclass
class BenchResult:
    engine: str
    device: str
    settings: dict  # batch, threads, warmup, runs, and engine-specific ones
    models: dict[str, dict] = field(default_factory=dict)  # label -> {path, latency}
    speedup: float | None = None  # compare median / model median
    error: str | None = None  # why the measurement stopped early; `models` then holds the runs made before
    gates: dict | None = None  # with --max-latency: {max_latency, failed}

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "version": VERSION, **asdict(self)}


class IncompleteRun(EngineError):
    """A runner failed part-way (a board dropped off): `latency` holds the runs measured before."""

    def __init__(self, message: str, latency: dict[str, Latency]):
        super().__init__(message)
        self.latency = latency


def measure(runners: dict[str, Runner], warmup: int, runs: int, quiet: bool = False) -> dict[str, Latency]:
    """Warm every runner up, then time them interleaved, `runs` times each."""
    samples: dict[str, list[float]] = {label: [] for label in runners}
    with tqdm(total=runs * len(runners), desc="bench", unit="run", disable=True if quiet else None, leave=False) as bar:
        try:
            for run in runners.values():
                for _ in range(warmup):
                    run()
            for _ in range(runs):
                for label, run in runners.items():
                    samples[label].append(run())
                    bar.update(1)
        except EngineError as exc:
            raise IncompleteRun(str(exc), {label: Latency.of(s) for label, s in samples.items() if s}) from None
    return {label: Latency.of(s) for label, s in samples.items()}


@functools.cache
def _cpu() -> tuple[str, frozenset[str]]:
    """The CPU's model name and feature flags (from /proc/cpuinfo on Linux; best effort elsewhere).

    The x86 family and model numbers are added because virtual machines often report a bare name
    ("AMD EPYC") that hides the core generation, which decides int8 throughput."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            fields.setdefault(key, value)
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name, frozenset(fields.get("flags", fields.get("Features", "")).split())


def cpu_description() -> str:
    """Model name, core count and the int8-relevant ISA extensions."""
    name, flags = _cpu()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimddp", "i8mm") if f in flags]
    return f"{name}, {os.cpu_count()} logical cores" + (f", {' '.join(isa)}" if isa else "")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo), e.g. avx2, avx512_vnni; empty where unknown."""
    return _cpu()[1]


def has_vnni() -> bool:
    """Whether int8 dot products run without int16 saturation: VNNI on x86; ARM does not saturate."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return bool(_cpu()[1] & {"avx512_vnni", "avx_vnni"})


def format_bench(result: BenchResult) -> str:
    lines = [f"{result.engine} on {result.device}; " + ", ".join(f"{k} {v}" for k, v in result.settings.items())]
    lines.append(f"{'':10s} {'median ms':>10s} {'p90 ms':>10s} {'p99 ms':>10s} {'min ms':>10s}   path")
    for label, entry in result.models.items():
        lat = entry["latency"]
        lines.append(f"{label:10s} " + " ".join(f"{lat[k]:10.3f}" for k in ("median_ms", "p90_ms", "p99_ms", "min_ms"))
                     + f"   {entry['path']}")
    if result.speedup is not None:
        lines.append(f"speedup (compare median / model median): {result.speedup:.2f}x")
    if result.error:
        lines.append(f"incomplete: {result.error}")
    return "\n".join(lines)


def static_shapes(model: onnx.ModelProto, given: dict[str, list[int]], batch: int | None = None
                  ) -> dict[str, tuple[list[int], np.dtype]]:
    """Each input's concrete shape and dtype: sizes from `given` (--input-shape), a dynamic batch
    becomes `batch` (1 if None), other dynamic dims are an error; with a `batch`, a fixed batch
    must equal it."""
    shapes = {}
    for spec in input_specs(model):
        shape = list(given.get(spec.name, spec.shape))
        if shape and not (isinstance(shape[0], int) and shape[0] > 0):
            shape[0] = batch or 1
        elif shape and batch is not None and shape[0] != batch and spec.name not in given:
            raise InputError(f"input {spec.name} has a fixed batch of {shape[0]}; --batch-size {batch} does not fit")
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise InputError(f"input {spec.name} has dynamic dimensions {spec.shape}: give --input-shape {spec.name}=...")
        shapes[spec.name] = (shape, spec.dtype)
    return shapes


def seeded_inputs(shapes: dict[str, tuple[list[int], np.dtype]], seed: int) -> dict[str, np.ndarray]:
    """Reproducible inputs for timing: standard normal floats, zero integers (speed does not depend on them)."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) if np.issubdtype(dtype, np.floating) else np.zeros(shape)).astype(dtype)
            for name, (shape, dtype) in shapes.items()}
