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
import torch
from torch import nn

from qpasses.bench import cpu_description, measure
from qpasses.pass_infra import PassContext
from qpasses.pipeline import quantize
from qpasses.targets import load_target
from qpasses.targets.lower.onnxruntime import Runner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from models import INPUT_SHAPE, ZOO, build, export  # noqa: E402


def resnet18() -> nn.Module:
    """ResNet-18 (He et al. 2016) layout: 7x7 stem, 4 stages of two basic blocks, 64-512 channels."""
    def block(cin: int, cout: int, stride: int) -> nn.Module:
        class Basic(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                          nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
                self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                             if stride != 1 or cin != cout else nn.Identity())

            def forward(self, x):
                return torch.relu(self.body(x) + self.skip(x))
        return Basic()

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    for cin, cout, stride in [(64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
                              (256, 512, 2), (512, 512, 1)]:
        layers.append(block(cin, cout, stride))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    return nn.Sequential(*layers).eval()


def export_resnet18(path: Path) -> None:
    torch.manual_seed(0)
    torch.onnx.export(resnet18(), torch.zeros(1, 3, 224, 224), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=13, dynamo=False)


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
                export_resnet18(source)
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
