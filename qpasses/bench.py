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
from tqdm import tqdm

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

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "version": VERSION, **asdict(self)}


def measure(runners: dict[str, Runner], warmup: int, runs: int, quiet: bool = False) -> dict[str, Latency]:
    """Warm every runner up, then time them interleaved, `runs` times each."""
    samples: dict[str, list[float]] = {label: [] for label in runners}
    for run in runners.values():
        for _ in range(warmup):
            run()
    with tqdm(total=runs * len(runners), desc="bench", unit="run", disable=True if quiet else None, leave=False) as bar:
        for _ in range(runs):
            for label, run in runners.items():
                samples[label].append(run())
                bar.update(1)
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
    return "\n".join(lines)
