"""ONNX Runtime (CPU) as an engine: an offline-optimised model, what runs in integer, and latency.

`compile` applies ORT's graph optimisations once and saves the result, so a deployment loads a
fixed graph: the Q/DQ pairs fused into integer kernels (QLinearConv, QGemm, ...) at level
"extended" or "basic", plus hardware-specific layouts (NCHWc) at "all", which then only suits
CPUs like this one. The saved model carries `qpass.compiled` metadata, and `bench` runs such a
model with optimisations off, as it was compiled; any other model at level "all".

What stayed float is read from the optimised graph: an integer kernel, or a node whose data
inputs are all int8/uint8 (MaxPool, Reshape behind a QuantizeLinear), runs in integer; any other
node except Q/DQ runs in float and is listed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qpasses import graph as graph_io
from qpasses.calibration.runner import LEVELS, check_loads, optimized, ort_message
from qpasses.bench import cpu_description, has_vnni, seeded_inputs, static_shapes
from qpasses.errors import EngineError
from qpasses.ops import node_macs

from . import planned_int8

INTEGER_OPS = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul",
               "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearLeakyRelu", "QLinearSigmoid",
               "QLinearSoftmax", "QLinearReduceMean", "QLinearConvTranspose", "DynamicQuantizeMatMul",
               "MatMulIntegerToFloat", "QAttention"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# integer kernels whose activation x weight products AVX2 sums in int16 pairs: (x zero point, weight) inputs
U8S8_KERNELS = {"QLinearConv": (2, 3), "QLinearMatMul": (2, 3), "QGemm": (2, 3)}
METADATA_KEY = "qpass.compiled"


@dataclass
class CompileReport:
    engine: str
    input: str
    output: str
    opt_level: str
    onnxruntime: str
    device: str
    integer_nodes: dict[str, int] = field(default_factory=dict)  # op type -> count
    float_nodes: list[dict] = field(default_factory=list)  # {name, op}
    qdq_nodes: dict[str, int] = field(default_factory=dict)  # Q/DQ ORT left in place
    warnings: list[str] = field(default_factory=list)
    coverage: dict = field(default_factory=dict)  # Int8Coverage.to_json(): planned int8 vs what runs integer

    def to_json(self) -> dict:
        return {"schema": "qpass.compile", "version": 1, **asdict(self)}


def _options(level: ort.GraphOptimizationLevel, threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def _session(model: onnx.ModelProto | str, options: ort.SessionOptions) -> ort.InferenceSession:
    source = model if isinstance(model, str) else model.SerializeToString()
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EngineError(f"ONNX Runtime cannot load the model: {ort_message(exc)}") from None


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QDQ_OPS | INTEGER_OPS for n in model.graph.node)


def compile_model(model_path: Path, output: Path, opt_level: str = "extended") -> CompileReport:
    """Optimise `model_path` offline into `output` (atomically) and report what runs in integer."""
    model = graph_io.load_model(model_path)
    check_loads(model, str(model_path))
    with graph_io.writing(output):  # ORT writes the optimised model itself: to a temp file beside the output
        result = optimized(model, opt_level, output.parent)
    onnx.helper.set_model_props(result, {**{p.key: p.value for p in result.metadata_props},
                                         METADATA_KEY: f"onnxruntime {ort.__version__}, {opt_level}"})
    graph_io.save_model(result, output)
    report = CompileReport("onnxruntime", str(model_path), str(output), opt_level, ort.__version__, cpu_description())
    _describe(result, report)
    report.coverage = int8_coverage(model, result).to_json()
    if not is_quantized(model):
        report.warnings.append("the model has no Q/DQ: it runs entirely in float")
    return report


@dataclass
class PlannedNode:
    """A conv/matmul the Q/DQ model plans in int8 (a DequantizeLinear feeds its weight), and what ORT runs."""

    name: str
    op: str
    macs: int
    kernel: str  # the op ORT's optimised graph runs in its place
    reason: str = ""  # why it runs in float, when it does

    @property
    def integer(self) -> bool:
        return self.kernel in INTEGER_OPS


@dataclass
class Int8Coverage:
    """How much of what qpass planned in int8 ORT runs in integer kernels, by conv/matmul MACs,
    and the Q/DQ round trips that no integer kernel reads (pure overhead)."""

    nodes: list[PlannedNode]
    overhead: list[str]  # tensors quantized and at once dequantized, read by float ops only
    model_macs: int = 0  # every conv/matmul MAC of the model, planned int8 or not (float layers too)

    @property
    def share(self) -> float | None:
        total = sum(n.macs for n in self.nodes)
        return sum(n.macs for n in self.nodes if n.integer) / total if total else None

    @property
    def model_share(self) -> float | None:
        """The share of all the model's conv/matmul MACs that run in integer kernels: what a mixed
        model with layers kept float still runs in int8."""
        return sum(n.macs for n in self.nodes if n.integer) / self.model_macs if self.model_macs else None

    def to_json(self) -> dict:
        return {"int8_coverage": self.share, "model_int8_share": self.model_share, "planned": len(self.nodes),
                "integer": sum(n.integer for n in self.nodes), "macs": sum(n.macs for n in self.nodes),
                "float_nodes": [asdict(n) for n in self.nodes if not n.integer], "overhead_qdq": self.overhead}

    def summary(self) -> str:
        if self.share is None:
            return "no planned int8 conv/matmul"
        integer = sum(n.integer for n in self.nodes)
        text = (f"{100 * self.share:.1f}% of planned int8 conv/matmul MACs run in integer kernels "
                f"({integer} of {len(self.nodes)} nodes); {len(self.overhead)} Q/DQ pair(s) feed no integer kernel")
        if self.model_share is not None and self.model_share < self.share:
            text += f"; {100 * self.model_share:.1f}% of all the model's conv/matmul MACs"
        return text


def int8_coverage(model: onnx.ModelProto, runs: onnx.ModelProto | None = None) -> Int8Coverage:
    """Map every planned-int8 conv/matmul of the Q/DQ `model` to what ORT's optimised graph `runs`
    (built here at "extended" when not given): ORT keeps node names when it fuses."""
    runs = runs if runs is not None else optimized(model)
    counts = node_macs(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    kernels = {n.name: n.op_type for n in runs.graph.node}
    planned = []
    for node in planned_int8(model):
        entry = PlannedNode(node.name, node.op_type, counts[node.name], kernels.get(node.name, "(removed)"))
        if not entry.integer:
            entry.reason = _why_float(node, producer, readers.get(node.output[0], []), node.output[0] in outputs)
        planned.append(entry)
    inits = {i.name for i in runs.graph.initializer}
    run_readers: dict[str, list[str]] = {}
    for node in runs.graph.node:
        for name in node.input:
            run_readers.setdefault(name, []).append(node.op_type)
    overhead = sorted(n.input[0] for n in runs.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits
                      and all(op == "DequantizeLinear" for op in run_readers.get(n.output[0], [])))
    return Int8Coverage(planned, overhead, sum(counts.values()))


def _why_float(node: onnx.NodeProto, producer: dict, readers: list[onnx.NodeProto], is_output: bool) -> str:
    """Why ORT's QDQ fusion skipped a planned conv/matmul, read off the Q/DQ graph around it."""
    unquantized = [i for i in node.input[:2] if i not in producer or producer[i].op_type != "DequantizeLinear"]
    if unquantized and node.op_type == "MatMul" and unquantized[0] in producer:
        return f"input {unquantized[0]} is not quantized: ORT fuses MatMul when both inputs come from DequantizeLinear"
    if unquantized and node.input[0] in unquantized:
        return "its input is not quantized: ORT fuses only a DequantizeLinear -> op -> QuantizeLinear group"
    others = sorted({r.op_type for r in readers if r.op_type != "QuantizeLinear"})
    if others in (["Relu"], ["Clip"]) and len(readers) == 1 and not is_output:
        return (f"the {others[0]} between it and its QuantizeLinear stayed in ORT's graph (ORT drops it only into a "
                "QuantizeLinear that already saturates to its range), so the group did not match")
    if node.op_type != "MatMul" and (others or is_output):
        also = ", ".join(others + (["the model output"] if is_output else []))
        return (f"its output also goes to {also} unquantized: ORT fuses {node.op_type} only when one QuantizeLinear "
                f"is its output's only reader")
    if node.op_type != "MatMul" and not readers:
        return "its output is not quantized"
    if node.op_type != "MatMul" and len(readers) > 1:
        return f"{len(readers)} QuantizeLinear nodes read its output: ORT fuses only with exactly one"
    return f"ORT's fusion of {node.op_type} did not match (attributes, bias or types)"


def _describe(model: onnx.ModelProto, report: CompileReport) -> None:
    """Fill the integer/float/QDQ node lists of the optimised graph."""
    inits = {i.name: i for i in model.graph.initializer}
    int8 = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    integer = {name for name, init in inits.items() if init.data_type in int8}
    saturating = []
    for node in model.graph.node:
        data = [i for i in node.input if i and i not in inits]
        if node.op_type in QDQ_OPS:
            report.qdq_nodes[node.op_type] = report.qdq_nodes.get(node.op_type, 0) + 1
            if node.op_type == "QuantizeLinear":
                integer.update(node.output)
        elif node.op_type in INTEGER_OPS or (data and all(i in integer for i in data)):
            report.integer_nodes[node.op_type] = report.integer_nodes.get(node.op_type, 0) + 1
            if node.op_type.startswith("QLinear") or node.op_type not in INTEGER_OPS:
                integer.update(node.output)
            if node.op_type in U8S8_KERNELS and _saturates(node, inits):
                saturating.append(node.name)
        else:
            report.float_nodes.append({"name": node.name, "op": node.op_type})
    report.integer_nodes = dict(sorted(report.integer_nodes.items()))
    if saturating and not has_vnni():
        report.warnings.append(
            f"{len(saturating)} integer kernel(s) multiply uint8 activations by weights beyond 7 bits, and this CPU "
            f"has no VNNI: their int16 pair sums saturate (first: {saturating[0]}); quantize with --target onnxruntime "
            "(7-bit weights)")


def _saturates(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    x_zp, w = (node.input[i] if len(node.input) > i else "" for i in U8S8_KERNELS[node.op_type])
    if x_zp not in inits or w not in inits or inits[x_zp].data_type != onnx.TensorProto.UINT8:
        return False
    weights = onnx.numpy_helper.to_array(inits[w])
    return weights.dtype == np.int8 and weights.size > 0 and int(np.abs(weights.astype(np.int16)).max()) > 64


class Runner:
    """One ORT session on fixed random inputs; a call times one run (wall clock, ms)."""

    def __init__(self, path: Path, threads: int = 0, batch: int = 1, input_shapes: dict[str, list[int]] | None = None,
                 seed: int = 0):
        model = graph_io.load_model(path)
        compiled = any(p.key == METADATA_KEY for p in model.metadata_props)
        level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if compiled else LEVELS["all"]
        self.session = _session(str(path), _options(level, threads))
        self.feeds = seeded_inputs(static_shapes(model, input_shapes or {}, batch), seed)
        self.device = cpu_description()
        self.quantized = is_quantized(model)

    def __call__(self) -> float:
        start = time.perf_counter()
        try:
            self.session.run(None, self.feeds)
        except Exception as exc:
            raise EngineError(f"ONNX Runtime failed: {str(exc).splitlines()[0]}") from None
        return 1000.0 * (time.perf_counter() - start)
