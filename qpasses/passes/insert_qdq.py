"""Insert QuantizeLinear/DequantizeLinear pairs as the calibrated plan says.

    x -> consumer                 =>  x -> Q -> DQ -> consumer  (only the planned consumers)
    W (float) -> Conv             =>  W_int8 -> DQ -> Conv       (weight_storage = "int")
                                  or  clip(W) -> Q -> DQ -> Conv  (weight_storage = "float")
    b (float) -> Conv             =>  b_int32 -> DQ(scale = s_x * s_w) -> Conv   (bias = "int32")
    c (float) -> Add              =>  c_uint8 -> DQ -> Add     (a constant input of a fused kernel)

Tensors that share a quantizer reference the same scale and zero-point initializers, so the
sharing is visible in the file. Float weights are clipped to the quantizer's range first, which
keeps a narrow-range weight within [-127, 127] although QuantizeLinear saturates at -128.
Run after `calibrate`.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qpasses import graph as graph_io
from qpasses.calibration.qparams import QParams, on_axis, quantize
from qpasses.ops import WEIGHTED_OPS
from qpasses.pass_infra import Pass, PassContext, QuantState
from qpasses.plan import QuantPlan
from qpasses.targets.schema import Target

INT32 = np.iinfo(np.int32)


class InsertQDQ(Pass):
    name = "insert-qdq"
    summary = "insert QuantizeLinear/DequantizeLinear pairs for the calibrated plan"
    requires = ("plan",)

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        graph, plan, target = state.graph, state.plan, state.target
        nodes = {n.name: n for n in graph.nodes}
        tensors = graph.tensors()
        params: dict[str, tuple[gs.Constant, gs.Constant]] = {}

        def qparam_constants(key: str, qp: QParams) -> tuple[gs.Constant, gs.Constant]:
            if key not in params:
                params[key] = (gs.Constant(f"{key}.scale", qp.scale), gs.Constant(f"{key}.zero_point", qp.zero_point))
            return params[key]

        for act in plan.activations.values():
            qp = plan.qparams[act.share]
            scale, zp = qparam_constants(act.share, qp)
            dq = _qdq(graph, tensors[act.tensor], scale, zp, qp.zero_point.dtype)
            for node_name, idx in act.consumers:
                nodes[node_name].inputs[idx] = dq

        weight_outputs: dict[str, gs.Variable] = {}
        for w in plan.weights:
            node = nodes[w.node]
            if w.tensor not in weight_outputs:
                qp = plan.qparams[w.tensor]
                scale, zp = qparam_constants(w.tensor, qp)
                const = tensors[w.tensor]
                if target.weight_storage == "int":
                    weight_outputs[w.tensor] = _stored_int(graph, const, qp, scale, zp)
                else:
                    clipped = gs.Constant(f"{w.tensor}.clipped", _clip(const.values, qp))
                    weight_outputs[w.tensor] = _qdq(graph, clipped, scale, zp, qp.zero_point.dtype, qp.axis)
            node.inputs[w.input_index] = weight_outputs[w.tensor]

        constant_outputs: dict[str, gs.Variable] = {}
        for c in plan.constants:  # always stored as integers: the fused kernel reads them so
            if c.tensor not in constant_outputs:
                qp = plan.qparams[c.tensor]
                constant_outputs[c.tensor] = _stored_int(graph, tensors[c.tensor], qp, *qparam_constants(c.tensor, qp))
            nodes[c.node].inputs[c.input_index] = constant_outputs[c.tensor]

        bias_users = {b.tensor: len(tensors[b.tensor].outputs) for b in plan.biases}
        for b in plan.biases:
            node = nodes[b.node]
            # a bias several nodes share gets one int32 copy per node: their input scales differ
            base = b.tensor if bias_users[b.tensor] == 1 else f"{b.tensor}@{b.node}"
            s_x = plan.qparams[plan.quantizer_of(b.input_tensor)].scale
            w_qp = plan.qparams[b.weight_tensor]
            bias = tensors[b.tensor].values
            s_w = WEIGHTED_OPS[node.op].per_output_channel(w_qp.scale.astype(np.float64), bias.size)
            scale = np.asarray(s_x.astype(np.float64) * s_w, dtype=np.float32)
            q = np.clip(np.round(bias.astype(np.float64) / np.broadcast_to(scale, bias.shape)), INT32.min, INT32.max)
            axis = 0 if scale.ndim == 1 else None
            stored = gs.Constant(f"{base}.quantized", q.astype(np.int32))
            bias_params = (gs.Constant(f"{base}.scale", scale), gs.Constant(f"{base}.zero_point", np.zeros_like(scale, dtype=np.int32)))
            node.inputs[WEIGHTED_OPS[node.op].bias_input] = _dq(graph, stored, *bias_params, axis, bias.dtype, base)

        for name in plan.model_outputs:
            anchor = plan.quantizer_of(name)
            _quantize_output(graph, tensors[name], *qparam_constants(anchor, plan.qparams[anchor]),
                             plan.qparams[anchor].zero_point.dtype)
        graph.cleanup().toposort()
        return True


def realize(float_model: onnx.ModelProto, target: Target, plan: QuantPlan) -> onnx.ModelProto:
    """The Q/DQ model of a float model and a calibrated plan (e.g. one with layers kept in float)."""
    state = QuantState(graph=gs.import_onnx(float_model), target=target, plan=plan)
    InsertQDQ().run(state, PassContext(quiet=True))
    return graph_io.infer_shapes(state.model())


def _clip(w: np.ndarray, qp: QParams) -> np.ndarray:
    scale = on_axis(qp.scale.astype(np.float64), qp.axis, w.ndim)
    zp = on_axis(qp.zero_point.astype(np.float64), qp.axis, w.ndim)
    return np.clip(w, (qp.qmin - zp) * scale, (qp.qmax - zp) * scale).astype(w.dtype)


def _attrs(axis: int | None) -> dict:
    return {} if axis is None else {"axis": axis}


def _stored_int(graph: gs.Graph, const: gs.Constant, qp: QParams, scale: gs.Constant, zp: gs.Constant) -> gs.Variable:
    """A float constant stored as its integers, read through a DequantizeLinear."""
    stored = gs.Constant(f"{const.name}.quantized", quantize(const.values, qp))
    return _dq(graph, stored, scale, zp, qp.axis, const.dtype, const.name)


def _dq(graph: gs.Graph, x: gs.Tensor, scale: gs.Constant, zp: gs.Constant, axis: int | None, dtype,
        base: str | None = None) -> gs.Variable:
    base = base or x.name
    out = gs.Variable(f"{base}.dq", dtype=dtype, shape=x.shape)
    graph.nodes.append(gs.Node("DequantizeLinear", f"{base}.DequantizeLinear", _attrs(axis), [x, scale, zp], [out]))
    return out


def _qdq(graph: gs.Graph, x: gs.Tensor, scale: gs.Constant, zp: gs.Constant, qdtype, axis: int | None = None) -> gs.Variable:
    q = gs.Variable(f"{x.name}.q", dtype=qdtype, shape=x.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{x.name}.QuantizeLinear", _attrs(axis), [x, scale, zp], [q]))
    return _dq(graph, q, scale, zp, axis, x.dtype, x.name)


def float_output_name(output: str) -> str:
    """The name a quantized model output's float value takes: the output keeps its own name."""
    return f"{output}.float"


def _quantize_output(graph: gs.Graph, out: gs.Variable, scale: gs.Constant, zp: gs.Constant, qdtype) -> None:
    """Quantize a model output while keeping its name: the float tensor is renamed."""
    name = out.name
    out.name = float_output_name(name)
    dq = _qdq(graph, out, scale, zp, qdtype)
    dq.name = name
    graph.outputs = [dq if t is out else t for t in graph.outputs]
