"""Latency in ONNX Runtime (CPU): float vs qpass int8 vs onnxruntime.quantization int8 of the same model.

Models: the bundled example, the test zoo (tests/models.py, 16x16 inputs), a ResNet-18 at
224x224 (random weights: latency does not depend on them) and the real-model corpus
(tools/corpus.toml, calibrated and scored as tools/real_models.py does). Each int8 model is
calibrated on the same samples: qpass with `--target onnxruntime` (7-bit weights, safe on AVX2),
ORT's `quantize_static` after its recommended `quant_pre_process`, QDQ format, per-channel,
reduce_range (ORT's advice for CPUs without VNNI), the most faithful of `--ort-calibrators`
(MinMax by default); an opset-11 export is upgraded to
opset 13 first, which ORT's quantizer needs for per-channel weights. All are measured in one
session per setting, interleaved run by run (`qpasses.bench.measure`), with ORT's full
optimisations.

It prints: the ceiling the CPU sets (one 1024^3 matrix product in fp32 and in int8 u8·s8, u8·u8,
s8·s8: the GEMM kernels under Conv and QLinearConv; no int8 model beats float by more than that
ratio); what ORT runs of each int8 model (the share of its planned conv/matmul MACs in integer
kernels, the Q/DQ round trips no integer kernel reads or writes, its QuantizeLinear count) with
the fused model's fidelity against float (the corpus task metric, the worst output SQNR); then
median latencies and int8/float ratios; last, where the time goes in float and qpass int8
(ORT's profiler, per op type). `--kernels` adds qpass models for every integer kernel
form ORT has (u8·s8 with 8-bit weights, u8·u8, s8·s8), to choose the default per CPU.

Usage: python tools/bench_latency.py [--models ...] [--batches 1 8] [--runs 50] [--kernels] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter

from qpasses import graph as graph_io
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


def ort_quantize_static(model: Path, calib: dict[str, np.ndarray], output: Path, method: str = "MinMax") -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    count = len(next(iter(calib.values())))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{k: v[i:i + 1] for k, v in calib.items()} for i in range(count)])

        def get_next(self):
            return next(self.batches, None)

    prepared = output.with_suffix(".pre.onnx")
    if graph_io.opset_of(onnx.load(model, load_external_data=False)) < graph_io.MIN_OPSET:
        # opset 11 exports: ORT's quantizer writes per-channel DequantizeLinear with `axis`, which
        # needs opset 13, and ORT refuses its own output; a user upgrades first, as qpass does
        upgraded = output.with_suffix(".opset13.onnx")
        onnx.save(onnx.version_converter.convert_version(onnx.load(model), graph_io.MIN_OPSET), upgraded)
        model = upgraded
    try:
        quant_pre_process(str(model), str(prepared))
    except Exception:  # "Incomplete symbolic shape inference" on most real models: ORT's advice is to skip it
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))


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


def source_and_calibration(name: str, workdir: Path) -> tuple[Path, Path, object]:
    """A benchmark model (example, a zoo name, resnet18-224, or a corpus name), its calibration
    file (.npz keyed by input name) in `workdir`, and its evaluation data: the corpus harness's
    held-out data for a corpus model, else 16 samples the calibration does not see."""
    calib = workdir / f"{name}.calib.npz"
    rng = np.random.default_rng(0)
    if name in CORPUS:
        from fetch_models import default_cache, fetch
        from real_models import build_data

        source = fetch(name, CORPUS[name], default_cache())
        return (source, *build_data(name, CORPUS[name], source, workdir))
    if name == "example":
        digits = np.load(ROOT / "examples/digits/calib.npz")["input"]
        np.savez(calib, input=digits[:128])
        return ROOT / "examples" / "digits" / "model.onnx", calib, digits[128:144]
    if name == "resnet18-224":
        source = workdir / "resnet18.onnx"
        if not source.exists():
            build_model(source)
        data = rng.standard_normal((48, 3, 224, 224)).astype(np.float32)
        np.savez(calib, input=data[:32])
        return source, calib, data[32:]
    source = export(build(name), workdir / f"{name}.onnx")
    data = rng.standard_normal((144, *INPUT_SHAPE)).astype(np.float32)
    np.savez(calib, input=data[:128])
    return source, calib, data[128:]


# the integer kernel forms ORT has (`--kernels`), 8-bit weights unless said: label -> (target, TOML it adds)
KERNEL_TARGETS = {
    "u8·s8 7-bit": ("onnxruntime", ""),
    "u8·s8": ("onnxruntime-vnni", ""),
    "u8·u8": ("onnxruntime", '[weight]\nbits = 8\nsigned = false\nsymmetric = false\ngranularity = "per_channel"\n'),
    "s8·s8": ("onnxruntime-vnni", '[activation]\nbits = 8\nsigned = true\nsymmetric = false\ngranularity = "per_tensor"\n'),
}


def kernel_target(label: str, workdir: Path):
    base, extra = KERNEL_TARGETS[label]
    if not extra:
        return load_target(base)
    path = workdir / f"kernel-{list(KERNEL_TARGETS).index(label)}.toml"
    path.write_text(f'extends = "{base}"\nname = "{base}-{label}"\nsummary = "{label}"\n{extra}')
    return load_target(str(path))


@dataclass
class Case:
    """One benchmark model: its int8 variants, the input sizes to time them at, and what scores them."""

    models: dict[str, Path]
    sample_shapes: dict[str, list[int]]  # input -> shape of one sample, without the batch axis
    evals: object  # the corpus harness's evaluation data, or an array of samples
    entry: dict | None  # the corpus entry, None for the other models
    ort_method: str = ""  # the calibrator of the ORT model kept (the most faithful of those tried)

    def shapes(self, batch: int) -> dict[str, list[int]]:
        return {name: [batch, *shape] for name, shape in self.sample_shapes.items()}


def prepare(workdir: Path, names: list[str], kernels: bool, ort_methods: list[str]) -> dict[str, Case]:
    workdir.mkdir(parents=True, exist_ok=True)
    cases = {}
    for name in names:
        source, calib_path, evals = source_and_calibration(name, workdir)
        with np.load(calib_path) as data:
            calib = {k: data[k][:64] for k in data.files if k != "labels"}
        case = Case({"float": source}, {k: list(v.shape[1:]) for k, v in calib.items()}, evals, CORPUS.get(name))
        labels = list(KERNEL_TARGETS) if kernels else [next(iter(KERNEL_TARGETS))]
        for i, label in enumerate(labels):
            path = workdir / f"{name}.qpass-{i}.onnx"
            onnx.save(quantize(source, kernel_target(label, workdir), calib_path, PassContext(quiet=True)).model, path)
            case.models["qpass int8" if i == 0 else f"qpass {label}"] = path
        best = None  # (score, method, path) of ORT's most faithful calibrator
        for method in ort_methods:
            path = workdir / f"{name}.ort-{method}.onnx"
            try:
                ort_quantize_static(source, calib, path, method)
                check_loads(onnx.load(path), "its output")
            except Exception as exc:  # e.g. grouped ConvTranspose: ORT's quantizer mis-broadcasts the bias scale
                print(f"{name}: onnxruntime.quantization ({method}) failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            case.models["ort int8"] = path
            score = fidelity_score(case, "ort int8")
            print(f"{name}: ORT {method}: {score}", file=sys.stderr)
            if best is None or score > best[0]:
                best = (score, method, path)
        if best is not None:
            case.models["ort int8"], case.ort_method = best[2], best[1]
        cases[name] = case
    return cases


def fidelity(case: Case, label: str) -> tuple[str, float]:
    """(task metric, worst output SQNR dB) of one int8 model against the float one, both run by ORT
    with its optimisations, as deployed: the corpus harness's metric, or SQNR alone."""
    from real_models import float_session, run_batches, score, sqnr

    if case.entry is not None:
        metric, worst, _ = score(case.entry, case.models["float"], case.models[label], case.evals)
        return metric, worst
    name = next(iter(case.sample_shapes))
    ref, got = (run_batches(float_session(str(case.models[k])), name, case.evals, False) for k in ("float", label))
    return "-", min(sqnr(r, g) for r, g in zip(ref, got))


def fidelity_score(case: Case, label: str) -> tuple[float, float]:
    """What picks ORT's best calibrator: the corpus task metric (detections kept, exact text, agreement),
    then the worst output SQNR."""
    from real_models import score

    if case.entry is None:
        return (0.0, fidelity(case, label)[1])
    _, worst, numbers = score(case.entry, case.models["float"], case.models[label], case.evals)
    return (float(next(iter(numbers.values())) or 0.0), worst)


def coverage_table(cases: dict[str, Case]) -> None:
    """What ORT runs of each int8 model: the integer share of its planned conv/matmul MACs, the
    Q/DQ round trips no integer kernel reads or writes, the activation QuantizeLinear count, and
    the fidelity of the fused model."""
    print("| model | int8 | coverage | Q/DQ overhead | QuantizeLinear | task metric | worst SQNR dB |")
    print("|---|---|---|---|---|---|---|")
    for name, case in cases.items():
        for label in [k for k in case.models if k != "float"]:
            model = onnx.load(case.models[label])
            coverage = int8_coverage(model)
            metric, worst = fidelity(case, label)
            shown = f"ort ({case.ort_method})" if label == "ort int8" else label.removesuffix(" int8")
            print(f"| {name} | {shown} | {100 * (coverage.share or 0):.1f}% "
                  f"({sum(n.integer for n in coverage.nodes)}/{len(coverage.nodes)}) | {len(coverage.overhead)} | "
                  f"{sum(n.op_type == 'QuantizeLinear' for n in model.graph.node)} | {metric} | {worst:.1f} |", flush=True)
        if "ort int8" not in case.models:
            print(f"| {name} | ort | failed | | | | |")
    print()


def latency_table(cases: dict[str, Case], batches: list[int], runs: int) -> None:
    labels = list(dict.fromkeys(k for c in cases.values() for k in c.models if k != "float"))
    print("| model | batch | threads | float ms | " + " | ".join(f"{k} ms" for k in labels) + " | "
          + " | ".join(f"{k} / float" for k in labels) + " |")
    print("|---|---|---|---|" + "---|" * (2 * len(labels)))
    for name, case in cases.items():
        for batch in batches:
            for threads in (1, 2):
                heavy = name in ("resnet18-224", *CORPUS) and batch > 1
                try:
                    runners = {label: Runner(path, threads=threads, batch=batch, input_shapes=case.shapes(batch))
                               for label, path in case.models.items()}
                    lat = {k: v.median_ms for k, v in measure(runners, warmup=3, runs=max(5, runs // 5) if heavy else runs,
                                                              quiet=True).items()}
                except (QpassError, IncompleteRun) as exc:  # e.g. a model exported with a fixed batch of 1
                    print(f"| {name} | {batch} | {threads} | {str(exc)[:80]} |" + " |" * (2 * len(labels)), flush=True)
                    continue
                times = [f"{lat[k]:.3f}" if k in lat else "failed" for k in labels]
                ratios = [f"{lat[k] / lat['float']:.2f}" if k in lat else "-" for k in labels]
                print(f"| {name} | {batch} | {threads} | {lat['float']:.3f} | " + " | ".join(times + ratios) + " |",
                      flush=True)
    print()


def profile(path: Path, shapes: dict[str, list[int]], workdir: Path, runs: int = 10) -> dict[str, float]:
    """Mean ms per run spent in each op type of ORT's optimised graph, 1 thread (ORT's profiler,
    whose file goes to `workdir`)."""
    import json

    import onnxruntime as ort

    from qpasses.bench import seeded_inputs, static_shapes

    options = ort.SessionOptions()
    options.enable_profiling, options.intra_op_num_threads = True, 1
    options.profile_file_prefix = str(workdir / f"profile-{path.stem}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = seeded_inputs(static_shapes(onnx.load(path, load_external_data=False), shapes, 1), 0)
    session.run(None, feeds)  # the first run allocates; the profile counts it, so it is one run more
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            times[op] = times.get(op, 0.0) + event["dur"] / 1000 / (runs + 1)
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def profile_table(cases: dict[str, Case], workdir: Path) -> None:
    """Where the time goes, float against qpass int8 at batch 1, 1 thread: the op types of ORT's
    optimised graph, so a model whose int8 is not faster shows which kernels cost it."""
    print("| model | float: ms by op type | qpass int8: ms by op type |")
    print("|---|---|---|")
    for name, case in cases.items():
        cells = []
        for label in ("float", "qpass int8"):
            times = profile(case.models[label], case.shapes(1), workdir)
            top = ", ".join(f"{op} {ms:.3f}" for op, ms in list(times.items())[:5])
            cells.append(f"{sum(times.values()):.3f} total: {top}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["example", *sorted(ZOO), "resnet18-224", *CORPUS],
                        help="example, zoo names, resnet18-224, corpus names (tools/corpus.toml)")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--kernels", action="store_true",
                        help="also quantize for every integer kernel form ORT has (u8·s8 7/8-bit, u8·u8, s8·s8)")
    parser.add_argument("--ort-calibrators", nargs="*", default=["MinMax"], choices=["MinMax", "Percentile", "Entropy"],
                        help="ORT's calibrators to try; the most faithful is timed (Percentile and Entropy keep every "
                             "batch in memory)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qpass-latency"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_description()}; ONNX Runtime CPU, median of {args.runs} interleaved runs\n")
    kernel_ceiling(args.workdir, args.runs)
    cases = prepare(args.workdir, args.models, args.kernels, args.ort_calibrators)
    coverage_table(cases)
    latency_table(cases, args.batches, args.runs)
    profile_table(cases, args.workdir)


if __name__ == "__main__":
    main()
