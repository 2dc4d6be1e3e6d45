"""Kernel efficiency of the TVM engine per conv layer: achieved GMAC/s against this CPU's peak.

    python tools/bench_tvm_layers.py [--models resnet18-224 ...] [--runs 30] [--workdir DIR] [--mcpu LLVM_CPU]

Each model is quantized for `tvm-x86` (as tools/bench_tvm.py does); every distinct conv of it
(input shape, weights, strides, pads, groups) is cut out of the Q/DQ model with its quantizers
(float in -> Q -> DQ -> Conv [-> Relu/Clip] -> Q -> DQ -> float out: what `qpass compile` lowers to
one integer conv with its requantize) and compiled alone, int8 with the default integer kernel and
its float original, and both are timed at one thread, interleaved (`qpasses.bench.measure`, median
of `--runs`). MACs are `ops.node_macs`; efficiency is GMAC/s over the peak of the instruction the
kernel uses (tools/bench_peak.py, measured in the same run: int16 pairs for pmaddwd, vpdpbusd for
the VNNI kernels, fp32 FMA for float, on zmm where the LLVM CPU has AVX-512). Models: tools/bench_latency.py's (`source_and_calibration`: resnet18-224, zoo names,
corpus names). Run on a quiet machine (`uptime` below 0.5).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import tvm
from onnx import helper
from tvm.target.codegen import target_has_features

from qpasses.bench import cpu_description, measure
from qpasses.ops import node_macs
from qpasses.pass_infra import PassContext
from qpasses.pipeline import quantize
from qpasses.targets import load_target
from qpasses.targets.lower import tvm as tvm_engine
from qpasses.targets.lower.tvm_schedule import int_kernel_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import source_and_calibration  # noqa: E402
from bench_peak import measure as measure_peaks  # noqa: E402

ACTIVATIONS = {"Relu", "Clip"}  # fused into the conv's requantize by the lowering
PEAK_OF = {"pmaddwd": "int16 pairs ymm", "vnni256": "u8*s8 ymm (vnni)", "vnni512": "u8*s8 zmm (vnni)",
           "integer": "int16 pairs ymm"}  # the integer kernel -> the bench_peak row it is measured against


@dataclass
class Layer:
    """One distinct conv of a model: a Q/DQ model of it alone, its float original, and how often it occurs."""

    name: str
    signature: str
    macs: int
    int8: onnx.ModelProto
    float: onnx.ModelProto
    count: int = 1


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _signature(node: onnx.NodeProto, shapes: dict[str, list[int]], weights: dict[str, list[int]]) -> str:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    w = weights.get(node.input[1]) or shapes.get(node.input[1])
    return (f"in {'x'.join(str(d or 1) for d in shapes[node.input[0]])} w {'x'.join(map(str, w))} "
            f"s{attrs.get('strides', [1, 1])[0]} g{attrs.get('group', 1)}")


def conv_layers(qdq: onnx.ModelProto, source: onnx.ModelProto) -> list[Layer]:
    """The distinct convs of the Q/DQ model, each cut out with its quantizers, and the same cut of
    the float model (the conv and its activation)."""
    qdq = onnx.shape_inference.infer_shapes(qdq)
    source = onnx.shape_inference.infer_shapes(source)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*qdq.graph.value_info, *qdq.graph.input, *qdq.graph.output]}
    weights = {i.name: list(i.dims) for i in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    readers = _consumers(qdq)
    float_names = {n.name for n in source.graph.node}
    layers: dict[str, Layer] = {}
    macs = node_macs(qdq)
    for node in qdq.graph.node:
        if node.op_type != "Conv" or node.input[0] not in producer or node.name not in float_names:
            continue
        dq = producer[node.input[0]]
        q = producer.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue  # a float conv: not an integer kernel
        tail = node
        while len(readers.get(tail.output[0], [])) == 1 and readers[tail.output[0]][0].op_type in ACTIVATIONS:
            tail = readers[tail.output[0]][0]
        out_q = [r for r in readers.get(tail.output[0], []) if r.op_type == "QuantizeLinear"]
        out_dq = [r for r in readers.get(out_q[0].output[0], []) if r.op_type == "DequantizeLinear"] if out_q else []
        if not out_dq:
            continue
        signature = _signature(node, shapes, weights)
        if signature in layers:
            layers[signature].count += 1
            continue
        int8 = onnx.utils.Extractor(qdq).extract_model([q.input[0]], [out_dq[0].output[0]])
        original = onnx.utils.Extractor(source).extract_model([q.input[0]], [tail.output[0]])
        layers[signature] = Layer(node.name, signature, macs[node.name], int8, original)
    return list(layers.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet18-224"])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qpass-tvm-layers"))
    parser.add_argument("--mcpu", help="LLVM CPU for every TVM build (default: the tvm-x86 target's, x86-64-v3)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message="Renaming name")  # TVM's importer, once per cut
    peaks = measure_peaks(100_000_000)
    llvm = tvm.target.Target(tvm_engine.llvm_config(load_target("tvm-x86").tvm.llvm, args.mcpu))
    kernel = int_kernel_for("auto", llvm)
    int_row, float_row = PEAK_OF[kernel], "fp32 fma zmm" if target_has_features("avx512f", llvm) else "fp32 fma ymm"
    int_peak, float_peak = peaks[int_row]["macs_per_ns"], peaks[float_row]["macs_per_ns"]
    print(f"CPU: {cpu_description()}; LLVM CPU {llvm.attrs.get('mcpu')}, int8 kernel {kernel}; one thread, batch 1, "
          f"median of {args.runs} interleaved runs; peaks: {int_row} {int_peak:.1f} GMAC/s, {float_row} "
          f"{float_peak:.1f} GMAC/s\n")
    print("| model | conv | count | MMAC | int8 ms | int8 GMAC/s | % of int8 peak | float ms | float GMAC/s | "
          "% of FMA peak | float / int8 |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        source_path, calib, _ = source_and_calibration(name, args.workdir)
        qdq = quantize(source_path, load_target("tvm-x86"), calib, PassContext(quiet=True)).model
        for i, layer in enumerate(conv_layers(qdq, onnx.load(source_path))):
            runners = {}
            for kind, model in (("int8", layer.int8), ("float", layer.float)):
                path = args.workdir / f"{name}.{i}.{kind}.onnx"
                onnx.save(model, path)
                library = path.with_suffix(".so")
                tvm_engine.compile_model(path, library, target="tvm-x86", mcpu=args.mcpu)
                runners[kind] = tvm_engine.Runner(library, threads=1)
            if not runners["int8"].quantized:
                raise SystemExit(f"bench_tvm_layers: {name} {layer.name}: the cut did not lower to an integer conv")
            ms = {k: v.median_ms for k, v in measure(runners, warmup=5, runs=args.runs, quiet=True).items()}
            gmacs = {k: layer.macs / (ms[k] * 1e6) for k in ms}
            print(f"| {name} | {layer.signature} | {layer.count} | {layer.macs / 1e6:.1f} | {ms['int8']:.3f} | "
                  f"{gmacs['int8']:.1f} | {100 * gmacs['int8'] / int_peak:.0f}% | {ms['float']:.3f} | "
                  f"{gmacs['float']:.1f} | {100 * gmacs['float'] / float_peak:.0f}% | {ms['float'] / ms['int8']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
