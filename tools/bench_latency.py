"""Latency in ONNX Runtime (CPU): float vs qpass int8 vs onnxruntime.quantization int8 of the same model.

Models: the bundled example, the test zoo (tests/models.py, 16x16 inputs), a ResNet-18 at
224x224 (random weights: latency does not depend on them), the conv-heavy case, and the corpus. Each int8 model
is calibrated on the same samples: qpass with `--target onnxruntime` (7-bit weights, safe on
AVX2), ORT's `quantize_static` after its recommended `quant_pre_process`, QDQ format, per-channel,
reduce_range (ORT's advice for CPUs without VNNI). All three are measured in one session per
setting, interleaved run by run (`qpasses.bench.measure`), loaded with ORT's full optimisations.

It first measures the ceiling the CPU sets: one 1024^3 matrix product with constant weights in
fp32 (MatMul) and in int8 (MatMulInteger u8·s8, u8·u8, s8·s8), the GEMM kernels under Conv and
QLinearConv. No int8 model can beat float by more than the int8/fp32 throughput ratio printed there.

Models also include the real-model corpus (tools/corpus.toml, calibrated as tools/real_models.py
does), and for every int8 model the table says what ORT runs of it: the share of its planned
conv/matmul MACs in integer kernels and the Q/DQ round trips no integer kernel reads or writes.

Usage: python tools/bench_latency.py [--models ...] [--batches 1 8] [--runs 50] [--workdir /tmp/qpass-latency]
Prints Markdown tables: kernel throughput, int8 coverage, then median latencies and the int8/float
ratios of qpass and of ORT's quantize_static.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qpasses.bench import IncompleteRun, cpu_description, measure
from qpasses.calibration.runner import check_loads
from qpasses.errors import QpassError
from qpasses.pass_infra import PassContext
from qpasses.pipeline import quantize
from qpasses.targets import load_target
from qpasses.targets.lower.onnxruntime import Runner, int8_coverage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

from bench_calibration import build_model  # noqa: E402  (the same ResNet-18 at 224x224)
from models import INPUT_SHAPE, ZOO, build, export  # noqa: E402

# corpus models with one image-like input (the VAD's recurrent state and the refused model stay out)
CORPUS = {name: entry for name, entry in tomllib.loads((ROOT / "tools" / "corpus.toml").read_text()).items()
          if entry["task"] not in ("refused", "vad")}


def ort_quantize_static(model: Path, calib: dict[str, np.ndarray], output: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    count = len(next(iter(calib.values())))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{k: v[i:i + 1] for k, v in calib.items()} for i in range(count)])

        def get_next(self):
            return next(self.batches, None)

    prepared = output.with_suffix(".pre.onnx")
    quant_pre_process(str(model), str(prepared))
    quantize_static(str(prepared), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


GEMM_KERNELS = {"fp32": ("MatMul", np.float32, np.float32), "u8·s8": ("MatMulInteger", np.uint8, np.int8),
                "u8·u8": ("MatMulInteger", np.uint8, np.uint8), "s8·s8": ("MatMulInteger", np.int8, np.int8)}


def gemm_model(op: str, a_type: type, b_type: type, size: int, path: Path) -> Path:
    """A (size x size) @ B (size x size) with B a constant, as weights are in a conv or gemm layer."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    b = rng.integers(-64, 64, (size, size)) if b_type is not np.float32 else rng.standard_normal((size, size))
    out = np.float32 if op == "MatMul" else np.int32
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])], "gemm",
        [helper.make_tensor_value_info("a", helper.np_dtype_to_tensor_dtype(np.dtype(a_type)), [size, size])],
        [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(np.dtype(out)), [size, size])],
        [numpy_helper.from_array(np.abs(b).astype(b_type) if b_type is np.uint8 else b.astype(b_type), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    return path


def kernel_ceiling(workdir: Path, runs: int, size: int = 1024) -> None:
    """Print GOP/s of ORT's fp32 and int8 GEMM kernels, measured interleaved in one session per thread count."""
    print("| threads | " + " | ".join(f"{k} GOP/s" for k in GEMM_KERNELS) + " | u8·s8 / fp32 |")
    print("|---|" + "---|" * (len(GEMM_KERNELS) + 1))
    paths = {k: gemm_model(*spec, size, workdir / f"gemm-{i}.onnx") for i, (k, spec) in enumerate(GEMM_KERNELS.items())}
    for threads in (1, 2):
        lat = measure({k: Runner(p, threads=threads, input_shapes={"a": [size, size]}) for k, p in paths.items()}, warmup=2, runs=max(5, runs // 5), quiet=True)
        gops = {k: 2 * size ** 3 / (v.median_ms * 1e6) for k, v in lat.items()}
        print(f"| {threads} | " + " | ".join(f"{g:.1f}" for g in gops.values()) + f" | {gops['u8·s8'] / gops['fp32']:.2f} |",
              flush=True)
    print()


def source_and_calibration(name: str, workdir: Path) -> tuple[Path, Path]:
    """A benchmark model (example, a zoo name, resnet18-224, or a corpus name) and its calibration
    file (.npz keyed by input name), in `workdir`."""
    calib = workdir / f"{name}.calib.npz"
    rng = np.random.default_rng(0)
    if name in CORPUS:
        from fetch_models import default_cache, fetch
        from real_models import build_data

        source = fetch(name, CORPUS[name], default_cache())
        return source, build_data(name, CORPUS[name], source, workdir)[0]
    if name == "example":
        np.savez(calib, input=np.load(ROOT / "examples/digits/calib.npz")["input"][:128])
        return ROOT / "examples" / "digits" / "model.onnx", calib
    if name == "resnet18-224":
        source = workdir / "resnet18.onnx"
        if not source.exists():
            build_model(source)
        np.savez(calib, input=rng.standard_normal((32, 3, 224, 224)).astype(np.float32))
        return source, calib
    source = export(build(name), workdir / f"{name}.onnx")
    np.savez(calib, input=rng.standard_normal((128, *INPUT_SHAPE)).astype(np.float32))
    return source, calib


@dataclass
class Case:
    """One benchmark model: its int8 variants and the input sizes to time them at."""

    models: dict[str, Path]
    sample_shapes: dict[str, list[int]]  # input -> shape of one sample, without the batch axis

    def shapes(self, batch: int) -> dict[str, list[int]]:
        return {name: [batch, *shape] for name, shape in self.sample_shapes.items()}


def prepare(workdir: Path, names: list[str]) -> dict[str, Case]:
    workdir.mkdir(parents=True, exist_ok=True)
    cases = {}
    for name in names:
        source, calib_path = source_and_calibration(name, workdir)
        with np.load(calib_path) as data:
            calib = {k: data[k][:64] for k in data.files if k != "labels"}
        qpass_int8 = workdir / f"{name}.qpass.onnx"
        onnx.save(quantize(source, load_target("onnxruntime"), calib_path, PassContext(quiet=True)).model,
                  qpass_int8)
        case = Case({"float": source, "qpass int8": qpass_int8}, {k: list(v.shape[1:]) for k, v in calib.items()})
        try:
            ort_quantize_static(source, calib, workdir / f"{name}.ort.onnx")
            check_loads(onnx.load(workdir / f"{name}.ort.onnx"), "its output")  # opset 11: per-channel DQ is invalid
            case.models["ort int8"] = workdir / f"{name}.ort.onnx"
        except Exception as exc:  # e.g. grouped ConvTranspose: ORT's quantizer mis-broadcasts the bias scale
            print(f"{name}: onnxruntime.quantization failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        cases[name] = case
    return cases


def coverage_table(cases: dict[str, Case]) -> None:
    """What ORT runs of each int8 model: the integer share of its planned conv/matmul MACs and the
    Q/DQ round trips no integer kernel reads or writes."""
    print("| model | qpass int8 coverage | qpass Q/DQ overhead | ort int8 coverage | ort Q/DQ overhead |")
    print("|---|---|---|---|---|")
    for name, case in cases.items():
        cells = []
        for label in ("qpass int8", "ort int8"):
            if label not in case.models:
                cells += ["failed", "-"]
                continue
            coverage = int8_coverage(onnx.load(case.models[label]))
            cells += [f"{100 * (coverage.share or 0):.1f}% ({sum(n.integer for n in coverage.nodes)}/{len(coverage.nodes)})",
                      str(len(coverage.overhead))]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["example", *sorted(ZOO), "resnet18-224", *CORPUS],
                        help="example, zoo names, resnet18-224, corpus names (tools/corpus.toml)")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qpass-latency"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_description()}; ONNX Runtime CPU, median of {args.runs} interleaved runs\n")
    kernel_ceiling(args.workdir, args.runs)
    cases = prepare(args.workdir, args.models)
    coverage_table(cases)
    print("| model | batch | threads | float ms | qpass int8 ms | ort int8 ms | qpass int8 / float | ort int8 / float |")
    print("|---|---|---|---|---|---|---|---|")
    for name, case in cases.items():
        for batch in args.batches:
            for threads in (1, 2):
                heavy = name in ("resnet18-224", *CORPUS) and batch > 1
                runs = max(5, args.runs // 5) if heavy else args.runs
                try:
                    runners = {label: Runner(path, threads=threads, batch=batch, input_shapes=case.shapes(batch))
                               for label, path in case.models.items()}
                    lat = {k: v.median_ms for k, v in measure(runners, warmup=3, runs=runs, quiet=True).items()}
                except (QpassError, IncompleteRun) as exc:  # e.g. a model exported with a fixed batch of 1
                    print(f"| {name} | {batch} | {threads} | {str(exc)[:80]} | | | | |", flush=True)
                    continue
                ort = (f"{lat['ort int8']:.3f}", f"{lat['ort int8'] / lat['float']:.2f}") if "ort int8" in lat else ("failed", "-")
                print(f"| {name} | {batch} | {threads} | {lat['float']:.3f} | {lat['qpass int8']:.3f} | {ort[0]} | "
                      f"{lat['qpass int8'] / lat['float']:.2f} | {ort[1]} |", flush=True)


if __name__ == "__main__":
    main()
