"""Calibration benchmark: qpass's six methods against onnxruntime.quantization's calibrators.

Same model, same data, one run, each case in its own process (peak RSS is that process's own):
a ResNet-18-style network at 224x224 (random weights, BatchNorm folded at export) and N random
calibration samples (512 by default), batches of 16, per-channel QDQ output for ORT. Reports wall
time and peak RSS per case and the ratios the calibration issue asks for: every qpass method's
peak RSS over ORT MinMax's, histogram methods' time over ORT Entropy's, MinMax's time over ORT
MinMax's; and how far qpass's KL ranges are from what ORT's Entropy returns through quantize_static.

Usage: python tools/bench_calibration.py [--samples 512] [--workdir /tmp/qpass-bench] [--cases ...]
Needs torch (the test extra) to build the model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

QPASS_METHODS = ["minmax", "quantile", "mse", "kl", "norm", "meanstd"]
ORT_METHODS = ["MinMax", "Entropy", "Percentile"]
BATCH = 16


def build_model(path: Path) -> None:
    import torch
    from torch import nn

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        class Basic(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                          nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
                self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                             if stride != 1 or cin != cout else nn.Identity())

            def forward(self, x):
                return torch.relu(self.body(x) + self.down(x))
        return Basic()

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    widths = [(64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1)]
    layers += [block(*w) for w in widths] + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    model = nn.Sequential(*layers).eval()
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=13, dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False)


def run_case(case: str, workdir: Path) -> dict:
    """Body of one child process: quantize once, report the activation ranges it chose."""
    kind, method = case.split(":")
    model, data, out = workdir / "resnet18.onnx", workdir / "calib.npy", workdir / f"{kind}-{method}.onnx"
    start = time.perf_counter()
    if kind == "qpass":
        from qpasses import graph as graph_io
        from qpasses.pass_infra import PassContext
        from qpasses.pipeline import quantize
        from qpasses.targets import load_target

        result = quantize(model, load_target("onnxruntime"), data, PassContext(calib_method=method, batch_size=BATCH, quiet=True),
                          holdout=0)
        graph_io.save_model(result.model, out)
        ranges = {k: [float(v) for v in r] for k, r in result.state.plan.ranges.items() if k in result.state.plan.shares}
    else:
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.x = np.load(data, mmap_mode="r")
                self.i = 0

            def get_next(self):
                if self.i >= len(self.x):
                    return None
                batch = {"input": np.ascontiguousarray(self.x[self.i:self.i + BATCH])}
                self.i += BATCH
                return batch

        quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        calibrate_method=getattr(CalibrationMethod, method))
        ranges = {}
    return {"case": case, "seconds": time.perf_counter() - start, "ranges": ranges}


def measure(case: str, workdir: Path) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", case, "--workdir", str(workdir)], stdout=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = proc.stdout.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{case} failed with exit code {proc.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_gb"] = usage.ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux
    return result


def ort_ranges(path: Path) -> dict[str, float]:
    """Per-tensor activation amax from an ORT QDQ model: scale * (qmax - zp) for u8 Q nodes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits and inits[node.input[1]].ndim == 0:
            scale, zp = float(inits[node.input[1]]), int(inits[node.input[2]])
            out[node.input[0]] = scale * (255 - zp)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qpass-bench"))
    parser.add_argument("--cases", nargs="*", default=[f"ort:{m}" for m in ORT_METHODS] + [f"qpass:{m}" for m in QPASS_METHODS])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, args.workdir)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (args.workdir / "resnet18.onnx").exists():
        build_model(args.workdir / "resnet18.onnx")
    data = args.workdir / "calib.npy"
    if not data.exists() or np.load(data, mmap_mode="r").shape[0] != args.samples:
        np.save(data, np.random.default_rng(0).standard_normal((args.samples, 3, 224, 224)).astype(np.float32))
    results = {}
    for case in args.cases:
        results[case] = measure(case, args.workdir)
        print(f"{case:16s} {results[case]['seconds']:8.1f} s {results[case]['peak_rss_gb']:6.2f} GB", file=sys.stderr, flush=True)
    report(results, args)


def report(results: dict, args) -> None:
    base_rss = results.get("ort:MinMax", {}).get("peak_rss_gb")
    print(f"\nResNet-18-style, 224x224, {args.samples} random samples, batch {BATCH}, this machine ({os.cpu_count()} cores)\n")
    print("| case | wall s | peak RSS GB | RSS / ORT MinMax | time / ORT Entropy | time / ORT MinMax |")
    print("|---|---|---|---|---|---|")
    for case, r in results.items():
        ratios = []
        for key, field in (("ort:MinMax", "peak_rss_gb"), ("ort:Entropy", "seconds"), ("ort:MinMax", "seconds")):
            ratios.append(f"{r[field] / results[key][field]:.2f}" if key in results else "-")
        print(f"| {case} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | " + " | ".join(ratios) + " |")
    if "qpass:kl" in results and "ort:Entropy" in results:
        ort = ort_ranges(args.workdir / "ort-Entropy.onnx")
        ours = {k: v[1] for k, v in results["qpass:kl"]["ranges"].items()}
        minmax = ort_ranges(args.workdir / "ort-MinMax.onnx")
        common = sorted(set(ort) & set(ours))
        if common:
            kl_vs_ort = np.array([ours[k] / ort[k] for k in common])
            ort_vs_minmax = np.array([ort[k] / minmax[k] for k in common if k in minmax])
            print(f"\nKL ranges: qpass kl hi / ORT Entropy hi over {len(common)} tensors: median {np.median(kl_vs_ort):.3f}, "
                  f"min {kl_vs_ort.min():.3f}, max {kl_vs_ort.max():.3f}; ORT Entropy / ORT MinMax: median "
                  f"{np.median(ort_vs_minmax):.3f} (ORT's Entropy through quantize_static returns the MinMax range)")
    if base_rss is None:
        print("\n(no ORT MinMax case: ratios not computed)")


if __name__ == "__main__":
    main()
