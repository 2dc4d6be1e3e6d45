"""Static conformance of a Q/DQ ONNX model to a target file (`qpass check`); no engine needed.

The model's Q/DQ pairs are read back into quantized edges (consumer, input index) with their
scale, zero point and axis, and the pairs are stripped to recover the float graph. The target's
rules, applied to that graph (`annotate.build_plan`), say which edges must be quantized; the two
are compared, and every quantizer is checked against what the target file promises:

- placement: a quantized layer needs every input the target quantizes ("missing-qdq"); a Q/DQ on
  an edge the target leaves float is "extra-qdq" (inside a supergroup it breaks the fusion, on an
  op without an int8 rule the engine runs it in float anyway). A planned layer with no Q/DQ at all
  runs in float: mixed precision, reported, not a violation;
- quantizers: positive finite scales ("scale"), powers of two where the target asks ("pow2"), zero
  point 0 where symmetric ("zero-point"), int8 vs uint8 ("signedness"), weight integers inside
  the target's range, e.g. [-127, 127] for narrow range or [-8, 7] at 4 bits ("weight-range"),
  per-channel scales on the output-channel axis or one per-tensor scale ("granularity");
- shared quantizers (concat inputs, pooling): equal scale and zero point ("shared-scale");
- biases: int32 with scale s_input * s_weight where the target says int32, float otherwise ("bias");
- constant inputs of a fused op (the 3 of x + 3): integers with the activation quantizer.

Works for models qpass did not write (e.g. onnxruntime.quantization's QDQ output).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qpasses import graph as graph_io
from qpasses.errors import InputError, UnsupportedModelError
from qpasses.ops import BIASED_OPS, WEIGHTED_OPS, weight_axis
from qpasses.passes.annotate import build_plan, match_supergroups
from qpasses.plan import Edge, QuantPlan

from .schema import Quantizer, Target


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: {self.rule}: {self.message}"


@dataclass
class CheckResult:
    target: str
    violations: list[Violation] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)  # planned layers the model runs in float
    quantized_edges: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class _QDQ:
    """One DequantizeLinear feeding an edge: its parameters and, for constants, the integers."""

    source: str  # the float tensor that was quantized (the Q input), or the stored constant
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    ints: np.ndarray | None  # integer values of a constant (weight, bias); None for activations


def _array(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


@dataclass
class _Read:
    edges: dict[Edge, _QDQ] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)  # model outputs behind a Q/DQ pair
    problems: list[Violation] = field(default_factory=list)


def _read_qdq(graph: gs.Graph) -> _Read:
    """Quantized edges of the graph; then the pairs are removed so the graph is the float model again."""
    read = _Read()
    edges, problems = read.edges, read.problems
    outputs = {t.name for t in graph.outputs}
    for dq in [n for n in graph.nodes if n.op == "DequantizeLinear"]:
        x, out = dq.inputs[0], dq.outputs[0]
        scale = _array(dq.inputs[1])
        zp = _array(dq.inputs[2]) if len(dq.inputs) > 2 else None
        if scale is None:
            problems.append(Violation("scale", dq.name, "the scale is computed at run time, not a constant"))
            continue
        if zp is None:
            zp = np.zeros_like(scale, dtype=np.asarray(x.values).dtype if isinstance(x, gs.Constant) else np.uint8)
        axis = int(dq.attrs.get("axis", 1)) if scale.ndim == 1 else None
        q = x.inputs[0] if isinstance(x, gs.Variable) and x.inputs and x.inputs[0].op == "QuantizeLinear" else None
        if isinstance(x, gs.Constant):  # integer weight or bias
            source, ints, float_value = x, np.asarray(x.values), _dequantize(np.asarray(x.values), scale, zp, axis)
        elif q is not None:
            source = q.inputs[0]
            ints = _quantize(np.asarray(source.values), scale, zp, axis) if isinstance(source, gs.Constant) else None
            float_value = source
        else:
            problems.append(Violation("extra-qdq", dq.name, "a DequantizeLinear without a QuantizeLinear or constant input"))
            continue
        info = _QDQ(source.name, scale, zp, axis, ints)
        replacement = float_value if isinstance(float_value, gs.Tensor) else gs.Constant(f"{source.name}.float", float_value)
        for consumer in list(out.outputs):
            for idx, tensor in enumerate(consumer.inputs):
                if tensor is out:
                    edges[(consumer.name, idx)] = info
                    consumer.inputs[idx] = replacement
        if out.name in outputs:  # a quantized model output: the float tensor takes its place and name
            read.outputs.append(out.name)
            replacement.name = out.name
            graph.outputs = [replacement if t is out else t for t in graph.outputs]
        dq.outputs.clear()
    graph.cleanup().toposort()
    return read


def _dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None) -> np.ndarray:
    shape = _broadcast(q.ndim, axis)
    return np.asarray((q.astype(np.float64) - zp.astype(np.float64).reshape(shape)) * scale.reshape(shape), np.float32)


def _quantize(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None) -> np.ndarray:
    """QuantizeLinear's integers, before saturation (so an out-of-range weight shows)."""
    shape = _broadcast(w.ndim, axis)
    return np.round(w.astype(np.float64) / scale.astype(np.float64).reshape(shape)) + zp.astype(np.float64).reshape(shape)


def _broadcast(ndim: int, axis: int | None) -> list[int]:
    shape = [1] * ndim
    if axis is not None:
        shape[axis % ndim] = -1
    return shape


def check_model(model: onnx.ModelProto, target: Target) -> CheckResult:
    """Every way the Q/DQ model breaks the target's rules, in graph order."""
    ops = {n.op_type for n in model.graph.node}
    if "DequantizeLinear" not in ops:
        raise InputError("the model has no DequantizeLinear: not a Q/DQ model (give `check` the quantized model)")
    operators = sorted(ops & (graph_io.QUANTIZED_OPS - {"QuantizeLinear", "DequantizeLinear"}))
    if operators:
        raise UnsupportedModelError(f"the model uses {', '.join(operators)}: `check` reads the Q/DQ format, "
                                    "not integer operators")
    graph = gs.import_onnx(graph_io.infer_shapes(model))
    read = _read_qdq(graph)
    actual = read.edges
    plan = build_plan(graph, target)
    nodes = {n.name: n for n in graph.nodes}
    result = CheckResult(target.name, read.problems, quantized_edges=len(actual))
    _check_placement(plan, read, nodes, graph, target, result)
    constants = {(c.node, c.input_index) for c in plan.constants}  # checked as activations are
    for (name, idx), qdq in actual.items():
        node = nodes.get(name)
        is_weight = node is not None and idx == 1 and node.op in WEIGHTED_OPS and qdq.ints is not None
        is_bias = qdq.ints is not None and not is_weight and (name, idx) not in constants
        if is_bias:
            continue  # checked with its layer below
        quantizer = target.weight_quantizer(node.op) if is_weight else target.activation
        result.violations += _check_quantizer(qdq, quantizer, name, weight_of=node if is_weight else None)
    if result.float_layers:  # a float concat or pool ties nothing (a split shared quantizer)
        plan = build_plan(graph, target, frozenset(n for layer in result.float_layers for n in plan.members(layer)))
    _check_shares(plan, actual, result)
    _check_biases(plan, actual, nodes, target, result)
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    result.violations.sort(key=lambda v: (order.get(v.node, len(order)), v.rule, v.message))
    return result


def _check_placement(plan: QuantPlan, read: _Read, nodes: dict[str, gs.Node], graph: gs.Graph,
                     target: Target, result: CheckResult) -> None:
    actual = read.edges
    expected: dict[str, set[Edge]] = {}  # layer -> edges the target quantizes
    layer_of = plan.layer_of()
    for act in plan.activations.values():
        for edge in act.consumers:
            expected.setdefault(layer_of.get(edge[0], edge[0]), set()).add(edge)
    for w in [*plan.weights, *plan.constants]:
        expected.setdefault(layer_of.get(w.node, w.node), set()).add((w.node, w.input_index))
    for layer in plan.layers():
        edges = expected.get(layer, set())
        present = {e for e in edges if e in actual}
        if not present:
            result.float_layers.append(layer)
            continue
        for node, idx in sorted(edges - present):
            result.violations.append(Violation("missing-qdq", node, f"input {idx} ({nodes[node].inputs[idx].name}) of "
                                               f"{nodes[node].op} is not quantized; {target.name} quantizes it"))
    wanted = set().union(*expected.values()) if expected else set()
    _, inner = match_supergroups(graph, target)
    for edge in actual:
        node_name, idx = edge
        node = nodes[node_name]
        if edge in wanted or (node.op in BIASED_OPS and idx == WEIGHTED_OPS[node.op].bias_input):
            continue  # biases: _check_biases
        if edge in inner:
            why = "it sits inside a supergroup (" + " + ".join(_group_of(plan, node_name)) + ") and breaks its fusion"
        elif node.op not in target.ops or node.op in target.float_ops:
            why = f"{target.name} has no int8 rule for {node.op}: it runs in float, the Q/DQ only adds work"
        elif layer_of.get(node_name, node_name) in result.float_layers:
            continue  # a float layer's stray edge is reported as the layer's missing inputs would be
        else:
            why = f"{target.name} does not quantize this input of {node.op}"
        result.violations.append(Violation("extra-qdq", node_name, f"input {idx} ({node.inputs[idx].name}) is quantized; {why}"))
    for name in plan.model_outputs:
        if name not in read.outputs:
            result.violations.append(Violation("missing-qdq", name, f"{target.name} quantizes the model outputs; this one is float"))
    for name in read.outputs:
        if name not in plan.model_outputs:
            result.violations.append(Violation("extra-qdq", name, f"{target.name} keeps the model outputs float"))


def _group_of(plan: QuantPlan, node: str) -> list[str]:
    return next((g for g in plan.groups if node in g), [node])


def _check_quantizer(qdq: _QDQ, quantizer: Quantizer, node: str, weight_of: gs.Node | None) -> list[Violation]:
    found = []
    what = f"{'weight' if weight_of is not None else 'activation'} {qdq.source}"
    scale, zp = qdq.scale.astype(np.float64), qdq.zero_point
    if not np.all(np.isfinite(scale) & (scale > 0)):
        found.append(Violation("scale", node, f"{what} has a scale that is not positive and finite"))
    elif quantizer.scale == "pow2" and not np.all(np.log2(scale) == np.round(np.log2(scale))):
        found.append(Violation("pow2", node, f"{what} has a scale that is not a power of two"))
    signed = zp.dtype == np.int8
    if quantizer.signed != "auto" and signed != bool(quantizer.signed) or zp.dtype not in (np.int8, np.uint8):
        found.append(Violation("signedness", node, f"{what} is {zp.dtype}, the target wants {quantizer.describe()}"))
    qmin, qmax = quantizer.qrange(signed)
    if quantizer.symmetric and np.any(zp != 0):
        found.append(Violation("zero-point", node, f"{what} has zero point {int(np.ravel(zp)[np.argmax(np.ravel(zp) != 0)])}; "
                                                   "the target is symmetric (zero point 0)"))
    if weight_of is not None:
        ints = qdq.ints
        if ints.size and (ints.min() < qmin or ints.max() > qmax):
            found.append(Violation("weight-range", node, f"{what} uses integers {int(ints.min())}..{int(ints.max())}, "
                                                         f"outside [{qmin}, {qmax}] ({quantizer.describe()})"))
        if quantizer.granularity == "per_channel":
            axis = weight_axis(weight_of)
            channels = ints.shape[axis]
            if qdq.axis is None or qdq.axis % ints.ndim != axis or qdq.scale.size != channels:
                found.append(Violation("granularity", node, f"{what} needs {channels} per-channel scales on axis {axis}"))
        elif qdq.scale.size != 1:
            found.append(Violation("granularity", node, f"{what} has per-channel scales; the target is per-tensor"))
    elif qdq.scale.size != 1:
        found.append(Violation("granularity", node, f"{what} has {qdq.scale.size} scales; activations are per-tensor"))
    return found


def _check_shares(plan: QuantPlan, actual: dict[Edge, _QDQ], result: CheckResult) -> None:
    by_source: dict[str, _QDQ] = {}
    for qdq in actual.values():
        by_source.setdefault(qdq.source, qdq)
    for anchor, members in plan.shares.items():
        seen = [(m, by_source[m]) for m in members if m in by_source]
        for member, qdq in seen[1:]:
            first, ref = seen[0]
            if not (np.array_equal(qdq.scale, ref.scale) and np.array_equal(qdq.zero_point, ref.zero_point)):
                consumers = sorted({e[0] for e, q in actual.items() if q is qdq})
                result.violations.append(Violation("shared-scale", consumers[0] if consumers else member,
                                                   f"{member} and {first} must share one quantizer (scale "
                                                   f"{float(qdq.scale.ravel()[0]):.6g} vs {float(ref.scale.ravel()[0]):.6g})"))


def _check_biases(plan: QuantPlan, actual: dict[Edge, _QDQ], nodes: dict[str, gs.Node], target: Target,
                  result: CheckResult) -> None:
    planned = {b.node for b in plan.biases}
    for name, node in nodes.items():
        if node.op not in BIASED_OPS or len(node.inputs) <= WEIGHTED_OPS[node.op].bias_input:
            continue
        bias = actual.get((name, WEIGHTED_OPS[node.op].bias_input))
        if bias is None:
            if target.bias == "int32" and name in planned and (name, 1) in actual and (name, 0) in actual:
                result.violations.append(Violation("bias", name, f"{target.name} wants an int32 bias; it is float"))
            continue
        if target.bias != "int32":
            result.violations.append(Violation("bias", name, f"{target.name} keeps biases float; this one is quantized"))
            continue
        if bias.zero_point.dtype != np.int32 or np.any(bias.zero_point != 0):
            result.violations.append(Violation("bias", name, "the bias is not int32 with zero point 0"))
            continue
        x, w = actual.get((name, 0)), actual.get((name, 1))
        if x is None or w is None:
            result.violations.append(Violation("bias", name, "an int32 bias needs a quantized input and weight"))
            continue
        s_w = WEIGHTED_OPS[node.op].per_output_channel(w.scale.astype(np.float64), bias.scale.size)
        expected = x.scale.astype(np.float64) * s_w
        if expected.size not in (1, bias.scale.size) or not np.allclose(bias.scale.ravel(), expected.ravel(), rtol=1e-6, atol=0):
            result.violations.append(Violation("bias", name, "the int32 bias scale is not s_input * s_weight"))


def format_check(result: CheckResult) -> str:
    lines = [str(v) for v in result.violations]
    if result.float_layers:
        lines.append(f"runs in float (no Q/DQ): {len(result.float_layers)} layer(s): " + ", ".join(result.float_layers))
    verdict = "conforms to" if result.ok else f"{len(result.violations)} violation(s) of"
    lines.append(f"{verdict} {result.target} ({result.quantized_edges} quantized edges checked)")
    return "\n".join(lines)
