"""Latency of the TVM engine on this CPU: TVM int8 vs TVM float vs ONNX Runtime int8 vs ONNX Runtime float.

Models: the bundled example, the test zoo's ResNet and MobileNet blocks (tests/models.py, 16x16
inputs) and a ResNet-18 at 224x224 (random weights: latency does not depend on them). For TVM the
float model and qpass's `tvm-x86` int8 model are compiled with `qpass compile --engine tvm`
(schedules included), the int8 one with each integer kernel: "TVM int8" is the target's best
(`--int-kernel auto`: pmaddwd int16 pairs with the default x86-64-v3; vpdpbusd with `--mcpu` of a
VNNI CPU, e.g. sapphirerapids), "int32-mul" the portable one
(`integer`), "exact-float" float32 FMA where the sums provably stay exact (`float-exact`). For
ONNX Runtime the int8 model is qpass's `onnxruntime` target (u8 activations and 7-bit weights: its
fastest safe int8 form on this AVX2 CPU), loaded with ORT's full optimisations. At one thread all of them run in one session, interleaved run by run
(`qpasses.bench.measure`); with more threads each is measured on its own, one after the other,
because both runtimes' idle worker threads spin and would steal the cores from the other's runs.
Batch 1.

Usage: python tools/bench_tvm.py [--models ...] [--threads 1 2] [--runs 50] [--workdir /tmp/qpass-tvm-bench]
                                 [--mcpu LLVM_CPU] [--no-kernels]
Prints the compile times, then a Markdown table of medians and the ratios the TVM issue names:
TVM float / TVM int8 (> 1: int8 pays) and ORT int8 / TVM int8 (>= 1: TVM int8 no slower than ORT).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import tvm

from qpasses.bench import cpu_description, measure
from qpasses.pass_infra import PassContext
from qpasses.pipeline import quantize
from qpasses.targets import load_target
from qpasses.targets.lower import onnxruntime as ort_engine, tvm as tvm_engine
from qpasses.targets.lower.tvm_schedule import int_kernel_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import source_and_calibration  # noqa: E402  (the same models and calibration data)

MODELS = ["example", "resnet_basic", "resnet_bottleneck", "mobilenetv2_block", "resnet18-224"]


def prepare(name: str, workdir: Path, mcpu: str | None,
            kernels: bool = True) -> tuple[dict[str, tuple[str, Path]], dict[str, float], dict]:
    """The six artifacts of one model ({label: (engine, path)}), the TVM build seconds and the input
    shapes (a dynamic size is the calibration data's, at batch 1)."""
    source, calib, _ = source_and_calibration(name, workdir)
    with np.load(calib) as data:
        shapes = {k: [1, *data[k].shape[1:]] for k in data.files}
    artifacts, build_seconds = {}, {}
    for target in ("tvm-x86", "onnxruntime"):
        model = quantize(source, load_target(target), calib, PassContext(quiet=True)).model
        onnx.save(model, workdir / f"{name}.{target}.onnx")
    int8 = workdir / f"{name}.tvm-x86.onnx"
    builds = [("tvm int8", int8, "auto"), ("tvm int8 int32-mul", int8, "integer"),
              ("tvm int8 exact-float", int8, "float-exact"), ("tvm float", source, "auto")]
    for label, model, kernel in builds if kernels else builds[::3]:
        library = workdir / f"{name}.{label.replace(' ', '-')}.so"
        start = time.perf_counter()
        tvm_engine.compile_model(model, library, target="tvm-x86", int_kernel=kernel, mcpu=mcpu, input_shapes=shapes)
        build_seconds[label] = time.perf_counter() - start
        artifacts[label] = ("tvm", library)
    artifacts["ort int8"] = ("onnxruntime", workdir / f"{name}.onnxruntime.onnx")
    artifacts["ort float"] = ("onnxruntime", source)
    return artifacts, build_seconds, shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qpass-tvm-bench"))
    parser.add_argument("--no-kernels", action="store_true",
                        help="only the target's best int8 kernel: skip the int32-mul and exact-float builds")
    parser.add_argument("--mcpu", help="LLVM CPU for every TVM build (default: the tvm-x86 target's, x86-64-v3)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    llvm = tvm_engine.llvm_config(load_target("tvm-x86").tvm.llvm, args.mcpu)
    kernel = int_kernel_for("auto", tvm.target.Target(llvm))
    print(f"CPU: {cpu_description()}; LLVM CPU {llvm.get('mcpu')}: TVM int8 runs the {kernel} kernel; batch 1, "
          f"median of {args.runs} interleaved runs\n")
    prepared = {}
    print("| model | TVM int8 compile s | int32-mul compile s | exact-float compile s | TVM float compile s |\n"
          "|---|---|---|---|---|")
    for name in args.models:
        artifacts, seconds, shapes = prepare(name, args.workdir, args.mcpu, not args.no_kernels)
        prepared[name] = (artifacts, shapes)
        cells = [seconds.get(k) for k in ("tvm int8", "tvm int8 int32-mul", "tvm int8 exact-float", "tvm float")]
        print(f"| {name} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |", flush=True)
    print("\n| model | threads | TVM int8 ms | int32-mul ms | exact-float ms | TVM float ms | ORT int8 ms | ORT float ms | "
          "TVM float / TVM int8 | ORT int8 / TVM int8 | TVM float / exact-float | ORT int8 / exact-float |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
    engines = {"tvm": tvm_engine, "onnxruntime": ort_engine}
    for name, (artifacts, shapes) in prepared.items():
        for threads in args.threads:
            runners = {label: engines[kind].Runner(path, threads=threads, input_shapes=shapes)
                       for label, (kind, path) in artifacts.items()}
            if threads == 1:
                lat = {k: v.median_ms for k, v in measure(runners, warmup=5, runs=args.runs, quiet=True).items()}
            else:  # idle pools spin: interleaved, each engine's spinning threads would slow the other's runs
                lat = {k: measure({k: r}, warmup=5, runs=args.runs, quiet=True)[k].median_ms for k, r in runners.items()}
            exact = lat.get("tvm int8 exact-float", float("nan"))
            cells = [lat["tvm int8"], lat.get("tvm int8 int32-mul", float("nan")), exact, lat["tvm float"],
                     lat["ort int8"], lat["ort float"]]
            ratios = [lat["tvm float"] / lat["tvm int8"], lat["ort int8"] / lat["tvm int8"], lat["tvm float"] / exact,
                      lat["ort int8"] / exact]
            print(f"| {name} | {threads} | " + " | ".join(f"{c:.3f}" for c in cells) + " | "
                  + " | ".join(f"{r:.2f}" for r in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
