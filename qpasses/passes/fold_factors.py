"""Fold scalar factors: a Mul by a positive scalar between two quantized tensors costs nothing.

    y -> Q(s1) -> DQ -> Mul(c) -> Q(s2, z2) -> DQ(s2, z2)   =>   y -> Q(s2 / c, z2) -> DQ(s2, z2)

One rounding instead of two, and no kernel for the factor (hard-swish's 1/6, HardSigmoid's alpha).
A factor whose input pair is a shared quantizer (the output of a Transpose or Reshape that keeps
its input's scale, as attention's q * d**-0.25 reads) stays: the folded scale would break the tie,
and the engine would run the shared op in float.
The QuantizeLinear and DequantizeLinear of the pair then differ in scale, so this runs after
everything that reads a Q/DQ pair as one tensor's value (`realize`, analysis, AdaRound): last, on
targets whose engine fuses Q/DQ groups (`[fusion]`), and on `analyze`'s mixed model.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qpasses.pass_infra import Pass, PassContext, QuantState


class FoldScalarFactors(Pass):
    name = "fold-scalar-factors"
    summary = "fold a Mul by a positive scalar between two Q/DQ pairs into the QuantizeLinear's scale"
    requires = ("plan",)

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        folded = fold_scalar_factors(state.graph)
        if not folded:
            return False
        state.graph.cleanup().toposort()
        plan = state.plan  # replaced, not edited: snapshots taken before this pass keep theirs
        state.plan = replace(plan, quantized_nodes=[n for n in plan.quantized_nodes if n not in folded],
                             fused_nodes={**plan.fused_nodes, **folded})
        state.notes.append(f"{self.name}: {len(folded)} scalar factor(s) folded into the scale of the "
                           "QuantizeLinear after them")
        return True


def folded(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its scalar factors folded (for a Q/DQ model built by `realize`)."""
    graph = gs.import_onnx(model)
    if not fold_scalar_factors(graph):
        return model
    return gs.export_onnx(graph.cleanup().toposort(), do_type_check=False)


def _scalar_factor(tensor: gs.Tensor) -> float | None:
    """The value of a positive scalar constant, stored as is or behind a DequantizeLinear."""
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values, np.float64)
    elif len(tensor.inputs) == 1 and tensor.inputs[0].op == "DequantizeLinear" and all(
            isinstance(i, gs.Constant) for i in tensor.inputs[0].inputs):
        q, scale, zp = (np.asarray(i.values, np.float64) for i in tensor.inputs[0].inputs)
        values = (q - zp) * scale
    else:
        return None
    return float(values.ravel()[0]) if values.size == 1 and np.isfinite(values).all() and values.ravel()[0] > 0 else None


def _only_reader(tensor: gs.Tensor, op: str, outputs: set[str]) -> gs.Node | None:
    """The one node reading `tensor`, if it is an `op` and the tensor is no model output."""
    if tensor.name in outputs or len(tensor.outputs) != 1 or tensor.outputs[0].op != op:
        return None
    return tensor.outputs[0]


def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 and tensor.inputs[0].op == op else None


def _shared(q: gs.Node) -> bool:
    """Whether the QuantizeLinear's scale is a quantizer other tensors are tied to (read by more
    than one Q/DQ pair)."""
    return len(q.inputs[1].outputs) > 2


def fold_scalar_factors(graph: gs.Graph) -> dict[str, str]:
    """Fold every foldable factor in place; returns each folded Mul -> the node whose output now
    carries the factor in its QuantizeLinear's scale."""
    outputs = {t.name for t in graph.outputs}
    folded = {}
    for mul in [n for n in graph.nodes if n.op == "Mul" and len(n.inputs) == 2]:
        for idx in (0, 1):
            x, factor = mul.inputs[idx], _scalar_factor(mul.inputs[1 - idx])
            dq = _producer(x, "DequantizeLinear")
            q = _producer(dq.inputs[0], "QuantizeLinear") if dq is not None else None
            q_out = _only_reader(mul.outputs[0], "QuantizeLinear", outputs)
            if (factor is None or q is None or q_out is None or not isinstance(q_out.inputs[1], gs.Constant)
                    or _only_reader(x, "Mul", outputs) is None or _only_reader(dq.inputs[0], "DequantizeLinear", outputs) is None):
                continue
            if _shared(q):
                continue
            y = q.inputs[0]
            q_out.inputs[0] = y
            q_out.inputs[1] = gs.Constant(f"{q_out.name}.scale", np.asarray(q_out.inputs[1].values / np.float64(factor), np.float32))
            mul.outputs.clear()
            folded[mul.name] = y.inputs[0].name if y.inputs else y.name
            break
    return folded
