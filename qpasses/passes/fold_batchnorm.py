"""Fold inference-mode BatchNormalization into the weighted op before it (MQBench sec. 3.2).

    Conv(x, W, b) -> BN(gamma, beta, mean, var, eps)   =>   Conv(x, W * s, (b - mean) * s + beta)
    with s = gamma / sqrt(var + eps), applied along the op's output channels:
    Conv: W axis 0; ConvTranspose: W axis 1 within each group; Gemm: B's N axis (alpha, beta
    absorbed); MatMul (2-D output): B's last axis, with the shift added by a new Add.

A BN whose producer cannot absorb it (not a weighted op, a weight computed at run time, or an
output read by another node) becomes x * s + t (Mul, Add), so that quantization sees the same
element-wise ops an engine would run, and the reason is noted. The original statistics of every
folded BN are kept in `state.bn_records`, keyed by the folded op's output, for BN re-calibration.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qpasses.ops import WEIGHTED_OPS
from qpasses.pass_infra import Pass, PassContext, QuantState



class FoldBatchNorm(Pass):
    name = "fold-batchnorm"
    summary = "fold BatchNormalization into Conv/ConvTranspose/Gemm/MatMul; others become Mul+Add"

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        graph = state.graph
        changed = False
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            stats = _statistics(bn)
            if stats is None:
                state.notes.append(f"{bn.name}: BatchNormalization left as is (training mode or non-constant statistics)")
                continue
            producer = _foldable_producer(graph, bn)
            if producer is not None:
                _fold_into(graph, producer, bn, stats)
                state.bn_records[bn.outputs[0].name] = {"bn": bn.name, "producer": producer.name, **stats}
                bn.outputs.clear()
            elif not _to_mul_add(graph, bn, stats):
                state.notes.append(f"{bn.name}: BatchNormalization kept (input rank unknown)")
                continue
            else:
                state.notes.append(f"{bn.name}: no foldable producer, rewritten as Mul + Add")
            changed = True
        if changed:
            graph.cleanup().toposort()
        return changed


def _statistics(bn: gs.Node) -> dict | None:
    if bn.attrs.get("training_mode", 0) or any(o.outputs for o in bn.outputs[1:]):
        return None
    params = bn.inputs[1:5]
    if len(params) != 4 or not all(isinstance(p, gs.Constant) for p in params):
        return None
    gamma, beta, mean, var = (p.values.astype(np.float64) for p in params)
    return {"gamma": gamma, "beta": beta, "mean": mean, "var": var, "eps": float(bn.attrs.get("epsilon", 1e-5))}


def _foldable_producer(graph: gs.Graph, bn: gs.Node) -> gs.Node | None:
    x = bn.inputs[0]
    if not x.inputs or len(x.outputs) != 1 or x in graph.outputs:
        return None
    producer = x.inputs[0]
    if producer.op not in WEIGHTED_OPS or len(producer.inputs) < 2 or not isinstance(producer.inputs[1], gs.Constant):
        return None
    if producer.op == "MatMul" and (len(producer.inputs[1].shape) != 2 or len(x.shape or []) != 2):
        return None
    return producer


def _scale_shift(stats: dict) -> tuple[np.ndarray, np.ndarray]:
    s = stats["gamma"] / np.sqrt(stats["var"] + stats["eps"])
    return s, stats["beta"] - stats["mean"] * s


def _own_constant(node: gs.Node, idx: int, values: np.ndarray) -> None:
    """Set input `idx` of `node` to `values`, without touching a constant other nodes share."""
    old = node.inputs[idx]
    if len(old.outputs) > 1:
        node.inputs[idx] = gs.Constant(f"{old.name}.{node.name}", values.astype(old.values.dtype))
    else:
        old.values = values.astype(old.values.dtype)


def _fold_into(graph: gs.Graph, producer: gs.Node, bn: gs.Node, stats: dict) -> None:
    s, t = _scale_shift(stats)
    w = producer.inputs[1].values.astype(np.float64)
    dtype = producer.inputs[1].values.dtype
    bias = None
    if len(producer.inputs) > 2 and isinstance(producer.inputs[2], gs.Constant):
        bias = producer.inputs[2].values.astype(np.float64)

    spec = WEIGHTED_OPS[producer.op]
    scaled = w * s[spec.channel_index(producer.attrs, w.shape)]
    if producer.op in ("Conv", "ConvTranspose"):
        w = scaled
        new_bias = (bias if bias is not None else 0.0) * s + t
    elif producer.op == "Gemm":
        alpha, beta = float(producer.attrs.get("alpha", 1.0)), float(producer.attrs.get("beta", 1.0))
        w = alpha * scaled
        new_bias = (beta * bias if bias is not None else 0.0) * s + t
        producer.attrs["alpha"], producer.attrs["beta"] = 1.0, 1.0
    else:  # MatMul: scale B's columns, add the shift after it
        _own_constant(producer, 1, scaled)
        out = bn.outputs[0]
        mid = gs.Variable(f"{producer.outputs[0].name}.matmul", dtype=out.dtype, shape=out.shape)
        producer.outputs[0] = mid
        graph.nodes.append(gs.Node("Add", f"{bn.name}.shift", inputs=[mid, gs.Constant(f"{bn.name}.shift", t.astype(dtype))],
                                   outputs=[out]))
        return
    _own_constant(producer, 1, w)
    if bias is not None:
        _own_constant(producer, 2, np.broadcast_to(new_bias, np.broadcast_shapes(bias.shape, s.shape)).copy())
    else:
        producer.inputs.append(gs.Constant(f"{producer.name}.bias", np.asarray(new_bias, dtype=dtype)))
    producer.outputs[0] = bn.outputs[0]


def _to_mul_add(graph: gs.Graph, bn: gs.Node, stats: dict) -> bool:
    x, y = bn.inputs[0], bn.outputs[0]
    if x.shape is None:
        return False
    s, t = _scale_shift(stats)
    bshape = (-1, *[1] * (len(x.shape) - 2))
    dtype = x.dtype or np.float32
    mid = gs.Variable(f"{bn.name}.scaled", dtype=dtype, shape=x.shape)
    graph.nodes.append(gs.Node("Mul", f"{bn.name}.scale", inputs=[x, gs.Constant(f"{bn.name}.scale", s.reshape(bshape).astype(dtype))], outputs=[mid]))
    graph.nodes.append(gs.Node("Add", f"{bn.name}.shift", inputs=[mid, gs.Constant(f"{bn.name}.shift", t.reshape(bshape).astype(dtype))], outputs=[y]))
    bn.outputs.clear()
    return True
