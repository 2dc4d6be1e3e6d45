"""An independent fake-quantization reference for a quantization plan.

The float (folded) model is evaluated node by node with ONNX's pure-numpy reference evaluator;
every edge, weight and bias the plan quantizes is fake-quantized here with the textbook formula
q = clip(round(x / s) + z, qmin, qmax), x_hat = (q - z) * s, written again on purpose rather than
imported from qpasses, so that the Q/DQ graph can be checked against it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from qpasses.plan import QuantPlan


def fake_quant(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int, axis: int | None = None) -> np.ndarray:
    scale = np.asarray(scale, np.float32)
    zero_point = np.asarray(zero_point).astype(np.float32)
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    q = np.clip(np.rint(x / scale) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).astype(np.float32)


def evaluate(float_model: onnx.ModelProto, plan: QuantPlan, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    values: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in float_model.graph.initializer}
    values.update(feeds)
    for w in plan.weights:
        qp = plan.qparams[w.tensor]
        values[w.tensor] = fake_quant(values[w.tensor], qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis)
    quantized_edges = {(node, idx): tensor for tensor, act in plan.activations.items() for node, idx in act.consumers}
    bias_of = {b.node: b for b in plan.biases}
    for node in float_model.graph.node:
        inputs = []
        for idx, name in enumerate(node.input):
            if not name:
                inputs.append(None)
                continue
            x = values[name]
            if (node.name, idx) in quantized_edges:
                qp = plan.qparams[plan.quantizer_of(quantized_edges[(node.name, idx)])]
                x = fake_quant(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax)
            if node.name in bias_of and idx == 2:
                b = bias_of[node.name]
                s_x = plan.qparams[plan.quantizer_of(b.input_tensor)].scale.astype(np.float64)
                s_w = plan.qparams[b.weight_tensor].scale.astype(np.float64)
                if s_w.ndim == 1 and s_w.size != x.size:
                    s_w = np.tile(s_w, x.size // s_w.size)
                s_b = (s_x * s_w).astype(np.float32)
                x = (np.rint(x.astype(np.float64) / s_b) * s_b).astype(np.float32)
            inputs.append(x)
        names = [f"in{i}" if n else "" for i, n in enumerate(node.input)]
        proto = onnx.NodeProto()
        proto.CopyFrom(node)
        del proto.input[:]
        proto.input.extend(names)
        feeds_n = {n: v for n, v in zip(names, inputs) if n}
        if node.op_type == "ConvTranspose" and any(a.name == "group" and a.i > 1 for a in node.attribute):
            outs = _run_in_ort(proto, feeds_n)  # onnx.reference mishandles grouped ConvTranspose
        else:
            outs = ReferenceEvaluator(proto).run(None, feeds_n)
        for name, value in zip(node.output, outs):
            values[name] = value
    return [values[o.name] for o in float_model.graph.output]


def _run_in_ort(node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    graph = onnx.helper.make_graph(
        [node], "node",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()],
        [onnx.helper.make_empty_tensor_value_info(o) for o in node.output])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)
