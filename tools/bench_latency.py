"""Latency in ONNX Runtime (CPU): float vs qpass int8 vs onnxruntime.quantization int8 of the same model.

Models: the bundled example, the test zoo (tests/models.py, 16x16 inputs) and a ResNet-18 at
224x224 (random weights: latency does not depend on them), the conv-heavy case. Each int8 model
is calibrated on the same samples: qpass with `--target onnxruntime` (7-bit weights, safe on
AVX2), ORT's `quantize_static` after its recommended `quant_pre_process`, QDQ format, per-channel,
reduce_range (ORT's advice for CPUs without VNNI). All three are measured in one session per
setting, interleaved run by run (`qpasses.bench.measure`), loaded with ORT's full optimisations.

Usage: python tools/bench_latency.py [--models ...] [--runs 50] [--workdir /tmp/qpass-latency]
Prints a Markdown table of median latencies and the ratios float/qpass and ort-int8/qpass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

from qpasses.bench import cpu_description, measure
from qpasses.pass_infra import PassContext
from qpasses.pipeline import quantize
from qpasses.targets import load_target
from qpasses.targets.lower.onnxruntime import Runner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

from bench_calibration import build_model  # noqa: E402  (the same ResNet-18 at 224x224)
from models import INPUT_SHAPE, ZOO, build, export  # noqa: E402


def ort_quantize_static(model: Path, calib: np.ndarray, output: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    prepared = output.with_suffix(".pre.onnx")
    quant_pre_process(str(model), str(prepared))
    quantize_static(str(prepared), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def prepare(workdir: Path, names: list[str]) -> dict[str, dict[str, Path]]:
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    models = {}
    for name in names:
        if name == "example":
            source, calib = ROOT / "examples" / "digits" / "model.onnx", np.load(ROOT / "examples/digits/calib.npz")["input"][:128]
        elif name == "resnet18-224":
            source = workdir / "resnet18.onnx"
            if not source.exists():
                build_model(source)
            calib = rng.standard_normal((32, 3, 224, 224)).astype(np.float32)
        else:
            source = workdir / f"{name}.onnx"
            export(build(name), source)
            calib = rng.standard_normal((128, *INPUT_SHAPE)).astype(np.float32)
        np.save(workdir / f"{name}.calib.npy", calib)
        qpass_int8 = workdir / f"{name}.qpass.onnx"
        onnx.save(quantize(source, load_target("onnxruntime"), workdir / f"{name}.calib.npy", PassContext(quiet=True)).model,
                  qpass_int8)
        models[name] = {"float": source, "qpass int8": qpass_int8}
        try:
            ort_quantize_static(source, calib, workdir / f"{name}.ort.onnx")
            models[name]["ort int8"] = workdir / f"{name}.ort.onnx"
        except Exception as exc:  # e.g. grouped ConvTranspose: ORT's quantizer mis-broadcasts the bias scale
            print(f"{name}: onnxruntime.quantization failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["example", *sorted(ZOO), "resnet18-224"])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qpass-latency"))
    args = parser.parse_args()
    models = prepare(args.workdir, args.models)
    print(f"CPU: {cpu_description()}; ONNX Runtime CPU, median of {args.runs} interleaved runs\n")
    print("| model | batch | threads | float ms | qpass int8 ms | ort int8 ms | float / qpass | ort / qpass |")
    print("|---|---|---|---|---|---|---|---|")
    for name, paths in models.items():
        for batch in (1, 8):
            for threads in (1, 2):
                runners = {label: Runner(path, threads=threads, batch=batch) for label, path in paths.items()}
                runs = max(5, args.runs // 5) if name == "resnet18-224" and batch == 8 else args.runs
                lat = {k: v.median_ms for k, v in measure(runners, warmup=3, runs=runs, quiet=True).items()}
                ort = (f"{lat['ort int8']:.3f}", f"{lat['ort int8'] / lat['qpass int8']:.2f}") if "ort int8" in lat else ("failed", "-")
                print(f"| {name} | {batch} | {threads} | {lat['float']:.3f} | {lat['qpass int8']:.3f} | {ort[0]} | "
                      f"{lat['float'] / lat['qpass int8']:.2f} | {ort[1]} |", flush=True)


if __name__ == "__main__":
    main()
