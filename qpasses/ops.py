"""The weighted ops, described once: which input is the weight, which the bias, and which weight axis
holds the output channels. Annotate, BN folding and re-calibration, Q/DQ insertion, bias correction
and `qpass check` all read it from here.

    Conv           W [C_out, C_in/g, k...]        output channels on axis 0
    ConvTranspose  W [C_in, C_out/g, k...]        axis 1 holds C_out/g: channel (row // (C_in/g)) * C_out/g + j
    Gemm           B [K, N], or [N, K] (transB)   axis 1, or 0 with transB
    MatMul         B [..., K, N]                  the last axis; no bias input
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class WeightedOp:
    op: str
    bias_input: int | None  # the optional bias, None when the op has none
    weight_input: int = 1

    def weight_axis(self, attrs: dict, weight_rank: int) -> int:
        """The weight axis that per-channel quantization runs along."""
        if self.op == "Conv":
            return 0
        if self.op == "ConvTranspose":
            return 1
        if self.op == "Gemm":
            return 0 if attrs.get("transB", 0) else 1
        return weight_rank - 1

    def channel_index(self, attrs: dict, weight_shape: tuple[int, ...]) -> np.ndarray:
        """The output channel of every weight element, as an integer array that broadcasts against
        the weight: `w * s[channel_index]` scales each output channel c by s[c]."""
        rank = len(weight_shape)
        if self.op == "ConvTranspose":
            groups = int(attrs.get("group", 1))
            cin_g, cout_g = weight_shape[0] // groups, weight_shape[1]
            index = (np.arange(weight_shape[0]) // cin_g)[:, None] * cout_g + np.arange(cout_g)[None, :]
            return index.reshape(*index.shape, *[1] * (rank - 2))
        axis = self.weight_axis(attrs, rank)
        shape = [1] * rank
        shape[axis] = weight_shape[axis]
        return np.arange(weight_shape[axis]).reshape(shape)

    def per_output_channel(self, values: np.ndarray, channels: int) -> np.ndarray:
        """Per-axis values (e.g. weight scales) spread to every output channel: a grouped
        ConvTranspose repeats its C_out/g values for each group."""
        values = np.asarray(values)
        if values.ndim == 1 and values.size != channels and channels % values.size == 0:
            return np.tile(values, channels // values.size)
        return values


WEIGHTED_OPS: dict[str, WeightedOp] = {
    "Conv": WeightedOp("Conv", bias_input=2),
    "ConvTranspose": WeightedOp("ConvTranspose", bias_input=2),
    "Gemm": WeightedOp("Gemm", bias_input=2),
    "MatMul": WeightedOp("MatMul", bias_input=None),
}
BIASED_OPS = tuple(name for name, op in WEIGHTED_OPS.items() if op.bias_input is not None)


def weight_axis(node: gs.Node) -> int:
    """The output-channel axis of a weighted node's weight."""
    spec = WEIGHTED_OPS[node.op]
    return spec.weight_axis(node.attrs, len(node.inputs[spec.weight_input].shape))


def macs(op: str, attrs: dict, input_shapes: list[tuple[int, ...]], output_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one weighted op: output elements times the length of the sum behind
    each, read off the weight, whose shape is always known (ConvTranspose: input elements times its
    fan-out). An unknown shape (an empty tuple) counts 0."""
    x, w = input_shapes
    outputs = int(np.prod(output_shape, dtype=np.int64)) if output_shape else 0
    if op == "Conv":
        return outputs * int(np.prod(w[1:], dtype=np.int64))
    if op == "ConvTranspose":
        return int(np.prod(x, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64)) if x else 0
    if op == "Gemm":
        return outputs * w[1 if attrs.get("transB", 0) else 0] if w else 0
    return outputs * (w[-2] if len(w) >= 2 else x[-1] if x else 0)  # MatMul


def node_macs(model: onnx.ModelProto) -> dict[str, int]:
    """The multiply-accumulates of every conv/gemm/matmul node of `model`, by node name, from its
    inferred static sizes (a symbolic dimension counts as 1: a batch of one)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    sizes = {v.name: tuple(d.dim_value if d.HasField("dim_value") else 1 for d in v.type.tensor_type.shape.dim)
             for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    sizes.update((i.name, tuple(i.dims)) for i in model.graph.initializer)
    return {node.name: macs(node.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute},
                            [sizes.get(i, ()) for i in node.input[:2]], sizes.get(node.output[0], ()))
            for node in model.graph.node if node.op_type in WEIGHTED_OPS}
