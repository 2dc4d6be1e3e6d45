"""Calibrate: set the range of every planned quantizer and turn it into qparams.

Activations: the float model (after folding) runs in ONNX Runtime on the calibration data and one
observer per quantized tensor streams its values; tensors that share a quantizer (concat inputs,
pooling in/out) merge their observers, so the shared range covers every member. Unless their ranges
differ by more than the target's `share_range_ratio`: one grid over a box offset in pixels and a
probability rounds the probability away, so the op that ties them runs float instead and each
member keeps its own range (the split is reported with the ratio).

`--calib best` chooses per quantizer among minmax, quantile, mse and kl, all computed from one
histogram pass: the range whose fake-quantized tensor gives its consumers' outputs the least
error, relative to their energy and summed over the consumers (each consumer's other inputs and
its weights in float, on the first `CHOICE_SAMPLES` calibration samples). A tensor's own MSE is what
the mse method minimises already; what matters is the error a clipped outlier or a coarse step
causes downstream, which the consumer's output shows and the tensor alone does not. Weights: an
observer of the `--weight-calib` method sees the whole constant, per channel on the planned axis;
a weight scale so small that its int32 bias (scale s_x * s_w) would overflow or be denormal is
raised until the bias fits, as ONNX Runtime's quantizer does (a channel whose weights are all but
zero: they round to zero either way, and its bias is all its output).
With `--encodings`, the qparams come from an AIMET encodings file instead (qpasses/encodings.py).
Run after `annotate`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper
from tqdm import tqdm

from qpasses.calibration.observers import OBSERVERS, HistogramObserver, Observer, as_method, make_observer
from qpasses.calibration.qparams import QParams, compute_qparams, constant_qparams
from qpasses.calibration.runner import feed_batch, observe, session
from qpasses.errors import CalibrationError
from qpasses.encodings import qparams_from
from qpasses.pass_infra import Pass, PassContext, QuantState
from qpasses.plan import QuantPlan

BEST = "best"  # the --calib value that chooses per quantizer
CHOICES = ("minmax", "quantile", "mse", "kl")  # what it chooses among (the order breaks ties)
CHOICE_SAMPLES = 16  # enough for a stable ranking; the choice's cost grows with them (see the README)
SAME_SCALE = 0.01  # candidates whose scales differ by less give the same error, within the estimate's noise
ACTIVATION_METHODS = (*OBSERVERS, BEST)  # what --calib takes
INT32_MAX = float(np.iinfo(np.int32).max)
MIN_BIAS_SCALE = float(np.finfo(np.float32).tiny / np.finfo(np.float32).eps)  # normal, with float32's full precision


class Calibrate(Pass):
    name = "calibrate"
    summary = "run the float model in ONNX Runtime on calibration data; ranges and qparams per quantizer"
    requires = ("plan", "float_model")

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        if ctx.encodings is not None:  # ranges decided elsewhere (AIMET, an earlier qpass run)
            qparams_from(ctx.encodings, state.plan, state.target)
            calibrate_weights(state, ctx)  # the constant inputs, which need no encoding
            return False
        calibrate_activations(state, ctx)
        calibrate_weights(state, ctx)
        raised = make_room_for_biases(state)
        if raised:
            state.notes.append(f"calibrate: raised the weight scale of {raised} channel(s) whose int32 bias would not "
                               f"fit its scale s_x * s_w (their weights are all but zero)")
        return False


def calibrate_activations(state: QuantState, ctx: PassContext) -> None:
    plan, target = state.plan, state.target
    if not plan.activations:
        return
    if ctx.data is None:
        raise CalibrationError("calibration data is required (--data: .npy/.npz, a directory, images or random)")
    best = ctx.calib_method == BEST

    def new() -> Observer:
        return HistogramObserver() if best else make_observer(ctx.calib_method, **ctx.calib_options)

    observers = {name: new() for name in plan.activations}
    samples = observe(state.float_model, observers, ctx.data, ctx.batch_size, ctx.max_samples, ctx.quiet)
    split_wide_shares(state, observers)
    plan = state.plan
    plan.calibration_samples = samples
    candidates: dict[str, dict[str, tuple]] = {}
    for anchor, members in plan.shares.items():
        merged = new()
        for name in members:
            merged.merge(observers[name])
        if best:
            candidates[anchor] = {m: as_method(merged, m, **ctx.calib_options).compute_range(target.activation)
                                  for m in CHOICES}
        else:
            plan.ranges[anchor] = merged.compute_range(target.activation)
    if best:
        plan.methods = choose_methods(state.float_model, plan, candidates, target.activation, ctx)
        plan.ranges.update((anchor, candidates[anchor][m]) for anchor, m in plan.methods.items())
    for anchor in plan.shares:
        plan.qparams[anchor] = compute_qparams(*plan.ranges[anchor], target.activation)


def _extent(observer: Observer) -> float:
    """The width of the range a tensor's own minmax grid would span (zero included)."""
    return float(np.max(observer.hi)) - min(float(np.min(observer.lo)), 0.0) if observer.lo is not None else 0.0


def split_wide_shares(state: QuantState, observers: dict[str, Observer]) -> None:
    """Split every shared quantizer whose members' ranges differ by more than the target allows: the
    ops that tie its members run float, and each member becomes a quantizer of its own."""
    plan, target = state.plan, state.target
    wide = {}
    for anchor, members in plan.shares.items():
        extents = [e for m in members if (e := _extent(observers[m])) > 0]
        if len(extents) >= 2 and max(extents) > target.share_range_ratio * min(extents):
            wide[anchor] = max(extents) / min(extents)
    if not wide:
        return
    layer_of = plan.layer_of()
    ties: dict[str, float] = {}  # layer -> the ratio it would have tied
    for node in state.graph.nodes:
        rule = target.ops.get(node.op)
        if rule is None or not rule.share or node.name not in plan.quantized_nodes:
            continue
        touched = {t.name for t in [*node.inputs, *node.outputs]}
        for anchor, ratio in wide.items():
            if touched & set(plan.shares[anchor]):
                layer = layer_of.get(node.name, node.name)
                ties[layer] = max(ties.get(layer, 0.0), ratio)
    for layer, ratio in ties.items():
        plan = plan.keep_float([layer], f"its inputs' ranges differ {ratio:.0f}x: one shared grid would round the small "
                                        f"ones away (target rule share_range_ratio = {target.share_range_ratio:g})")
    members = {m for anchor in wide for m in state.plan.shares[anchor]}
    for name in members & set(plan.activations):
        plan.activations[name] = replace(plan.activations[name], share=name)
    plan.shares = {a: ms for a, ms in plan.shares.items() if a not in wide}
    plan.shares.update((m, [m]) for m in sorted(members & set(plan.activations)))
    state.plan = plan
    state.notes.append(f"calibrate: {len(wide)} shared quantizer(s) split (members' ranges up to "
                       f"{max(wide.values()):.0f}x apart); float: {', '.join(ties)}")


def calibrate_weights(state: QuantState, ctx: PassContext) -> None:
    """Qparams for every planned weight and constant input that has none yet (a weight read by two
    nodes is done once). A constant input takes the activation quantizer over its own values."""
    plan, target = state.plan, state.target
    tensors = {t.name: t for t in state.graph.tensors().values()}
    for c in plan.constants:
        if c.tensor not in plan.qparams:
            values = tensors[c.tensor].values
            plan.ranges[c.tensor] = (float(values.min()), float(values.max()))
            plan.qparams[c.tensor] = constant_qparams(values, target.activation)
    for w in plan.weights:
        if w.tensor in plan.qparams:
            continue
        quantizer = target.weight_quantizer(w.op_type)
        observer = make_observer(ctx.weight_calib, w.axis, **ctx.calib_options)
        observer.update(tensors[w.tensor].values)
        plan.ranges[w.tensor] = observer.compute_range(quantizer)
        plan.qparams[w.tensor] = compute_qparams(*plan.ranges[w.tensor], quantizer, w.axis)


def make_room_for_biases(state: QuantState) -> int:
    """Raise weight scales so that every int32 bias b fits: |b| / (s_x s_w) <= INT32_MAX and
    s_x s_w >= MIN_BIAS_SCALE, per output channel. Returns how many channels were raised."""
    plan, target = state.plan, state.target
    tensors = {t.name: t for t in state.graph.tensors().values()}
    nodes = {n.name: n for n in state.graph.nodes}
    raised = 0
    for b in plan.biases:
        anchor = plan.quantizer_of(b.input_tensor)
        if anchor not in plan.qparams or b.weight_tensor not in plan.qparams:
            continue
        s_x = float(plan.qparams[anchor].scale)
        w_qp = plan.qparams[b.weight_tensor]
        bias = np.abs(tensors[b.tensor].values.astype(np.float64)).ravel()
        need = np.maximum(bias / (s_x * INT32_MAX), MIN_BIAS_SCALE / s_x)
        scale = w_qp.scale.astype(np.float64).ravel()
        if scale.size == 1:
            need = need.max(keepdims=True)
        elif scale.size != need.size:  # a grouped ConvTranspose: one weight scale per channel of a group
            need = need.reshape(-1, scale.size).max(axis=0)
        factor = np.where(scale < need, need / scale, 1.0)
        if np.all(factor == 1.0):
            continue
        raised += int(np.sum(factor > 1.0))
        op = nodes[b.node].op
        quantizer = target.weight_quantizer(op)
        lo, hi = (np.asarray(r, np.float64) for r in plan.ranges[b.weight_tensor])
        factor = factor.reshape(np.shape(lo)) if np.ndim(lo) else factor.max()
        plan.ranges[b.weight_tensor] = (lo * factor, hi * factor)
        plan.qparams[b.weight_tensor] = compute_qparams(lo * factor, hi * factor, quantizer, w_qp.axis)
    return raised


def choose_methods(float_model: onnx.ModelProto, plan: QuantPlan, candidates: dict[str, dict[str, tuple]],
                   quantizer, ctx: PassContext) -> dict[str, str]:
    """Per share anchor, the method of `candidates` whose range gives its consumers the least
    relative output error (see the module docstring). One ONNX Runtime model computes every
    candidate's error: next to the float graph, per candidate, a Q/DQ of each member tensor and a
    copy of each consumer reading it, reduced in-graph to a noise energy (so only scalars come back)."""
    nodes = {n.name: n for n in float_model.graph.node}
    graph = float_model.graph
    typed = onnx.shape_inference.infer_shapes(float_model).graph
    floats = {v.name for v in [*typed.value_info, *typed.output] if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    chosen: dict[str, str] = {}
    extra, initializers = [], []
    noise: dict[str, tuple[str, str, str]] = {}  # output name -> (anchor, method, the float tensor compared)
    signals: dict[str, str] = {}  # a compared float tensor -> its energy's output name
    for a, (anchor, ranges) in enumerate(candidates.items()):
        distinct = _distinct(ranges, quantizer)
        chosen[anchor] = distinct[0]
        if len(distinct) == 1:
            continue
        members = plan.shares[anchor]
        readers = sorted({c for m in members for c, _ in plan.activations[m].consumers
                          if c in nodes and not any(at.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                    for at in nodes[c].attribute)})
        for method in distinct:
            tag = f"qpass.choose/{a}/{method}"
            fake = _fake_quantized(tag, members, compute_qparams(*ranges[method], quantizer), extra, initializers)
            compared = []  # (float tensor, its counterpart computed from the fake-quantized members)
            for reader in readers:
                node = nodes[reader]
                copy = helper.make_node(node.op_type, [fake.get(i, i) for i in node.input],
                                        [f"{tag}/{reader}/{o}" if o else "" for o in node.output], domain=node.domain)
                copy.attribute.extend(node.attribute)
                extra.append(copy)
                compared += [(o, f"{tag}/{reader}/{o}") for o in node.output if o in floats]  # not a Shape's int64
            if not readers:  # read by no quantized node (a quantized model output): its own error
                compared = [(m, fake[m]) for m in members]
            for j, (exact, approx) in enumerate(compared):
                name = f"{tag}/noise{j}"
                extra += _energy(f"{tag}/{j}", exact, approx, name)
                noise[name] = (anchor, method, exact)
                if exact not in signals:
                    signals[exact] = f"qpass.choose/signal/{len(signals)}"
                    extra += _energy(signals[exact], exact, None, signals[exact])
    if not noise:
        return chosen
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in [*noise, *signals.values()]]
    model = helper.make_model(helper.make_graph([*graph.node, *extra], "choose", graph.input, outputs,
                                                [*graph.initializer, *initializers]),
                              opset_imports=float_model.opset_import, ir_version=float_model.ir_version)
    totals = _sums(model, [o.name for o in outputs], ctx)
    error: dict[tuple[str, str], float] = {}
    for name, (anchor, method, exact) in noise.items():
        signal = totals[signals[exact]]
        error[anchor, method] = error.get((anchor, method), 0.0) + (totals[name] / signal if signal > 0 else totals[name])
    for anchor in chosen:
        tried = [(e, i, m) for i, m in enumerate(CHOICES) if (e := error.get((anchor, m))) is not None]
        if tried:
            chosen[anchor] = min(tried)[2]
    return chosen


def _distinct(ranges: dict[str, tuple], quantizer) -> list[str]:
    """The methods worth comparing: one whose scale is within SAME_SCALE of an earlier one's is that one."""
    distinct, scales = [], []
    for method, value_range in ranges.items():
        scale = float(compute_qparams(*value_range, quantizer).scale)
        if all(abs(scale - s) > SAME_SCALE * s for s in scales):
            distinct.append(method)
            scales.append(scale)
    return distinct


def _fake_quantized(tag: str, members: list[str], qp: QParams, nodes: list, initializers: list) -> dict[str, str]:
    """Append Q/DQ nodes (and their constants) for each member tensor; returns member -> dequantized name."""
    initializers += [onnx.numpy_helper.from_array(qp.scale, f"{tag}/scale"),
                     onnx.numpy_helper.from_array(qp.zero_point, f"{tag}/zero_point")]
    narrow = (qp.qmin, qp.qmax) != _dtype_range(qp)  # fewer bits than the container: saturate first
    if narrow:
        lo, hi = ((np.array([qp.qmin, qp.qmax]) - float(qp.zero_point)) * float(qp.scale)).astype(np.float32)
        initializers += [onnx.numpy_helper.from_array(lo, f"{tag}/lo"), onnx.numpy_helper.from_array(hi, f"{tag}/hi")]
    fake = {}
    for member in members:
        source = member
        if narrow:
            source = f"{tag}/{member}/clipped"
            nodes.append(helper.make_node("Clip", [member, f"{tag}/lo", f"{tag}/hi"], [source]))
        fake[member] = f"{tag}/{member}"
        nodes += [helper.make_node("QuantizeLinear", [source, f"{tag}/scale", f"{tag}/zero_point"], [f"{tag}/{member}/q"]),
                  helper.make_node("DequantizeLinear", [f"{tag}/{member}/q", f"{tag}/scale", f"{tag}/zero_point"],
                                   [fake[member]])]
    return fake


def _sums(model: onnx.ModelProto, names: list[str], ctx: PassContext) -> dict[str, float]:
    """The scalar outputs `names`, summed over the first CHOICE_SAMPLES calibration samples."""
    totals = dict.fromkeys(names, 0.0)
    sess = session(model, optimize=False)
    batch, fixed = feed_batch(model, ctx.data, ctx.batch_size)
    limit = min(len(ctx.data), CHOICE_SAMPLES, ctx.max_samples or CHOICE_SAMPLES)
    if fixed:  # whole batches only; calibration ran, so there is at least one
        limit = max(batch, limit - limit % batch)
    with tqdm(total=limit, desc="choosing ranges", unit="sample", disable=True if ctx.quiet else None, leave=False) as bar:
        for feeds in ctx.data.batches(batch, limit):
            for name, value in zip(names, sess.run(names, feeds)):
                totals[name] += float(value)
            bar.update(1 if ctx.data.one_per_feed else len(next(iter(feeds.values()))))
    return totals


def _dtype_range(qp: QParams) -> tuple[int, int]:
    info = np.iinfo(qp.zero_point.dtype)
    return int(info.min), int(info.max)


def _energy(tag: str, exact: str, approx: str | None, output: str) -> list[onnx.NodeProto]:
    """Nodes computing sum((exact - approx)^2), or sum(exact^2) without `approx`, as a float scalar."""
    if approx is None:
        return [helper.make_node("ReduceSumSquare", [exact], [output], keepdims=0)]
    return [helper.make_node("Sub", [exact, approx], [f"{tag}/diff"]),
            helper.make_node("ReduceSumSquare", [f"{tag}/diff"], [output], keepdims=0)]
