"""Folding scalar factors into the QuantizeLinear's scale: the integers are numpy's single rounding,
and only a positive factor between two quantized tensors that nothing else reads is folded."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from qpasses.calibration.runner import session
from qpasses.passes.fold_factors import fold_scalar_factors


def chain(factor: float = 0.25, also_read: bool = False) -> onnx.ModelProto:
    """y -> Q(0.05, 128) -> DQ -> Mul(factor, stored as uint8 or int8) -> Q(0.0125, 120) -> DQ -> out;
    with `also_read`, the dequantized y is a second output too."""
    c = lambda name, v, dtype=np.float32: numpy_helper.from_array(np.array(v, dtype), name)  # noqa: E731
    stored = (c("kq", 255, np.uint8), c("kz", 0, np.uint8)) if factor > 0 else (c("kq", -127, np.int8), c("kz", 0, np.int8))
    nodes = [helper.make_node("QuantizeLinear", ["y", "s1", "z1"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s1", "z1"], ["ydq"]),
             helper.make_node("DequantizeLinear", ["kq", "ks", "kz"], ["k"]),
             helper.make_node("Mul", ["ydq", "k"], ["m"], name="times"),
             helper.make_node("QuantizeLinear", ["m", "s2", "z2"], ["mq"]),
             helper.make_node("DequantizeLinear", ["mq", "s2", "z2"], ["out"])]
    inits = [c("s1", 0.05), c("z1", 128, np.uint8), *stored, c("ks", abs(factor) / (255 if factor > 0 else 127)),
             c("s2", 0.0125), c("z2", 120, np.uint8)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1000]) for n in ["out", "ydq"][:1 + also_read]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1000])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    graph = gs.import_onnx(model)
    folded = fold_scalar_factors(graph)
    return gs.export_onnx(graph.cleanup().toposort()), folded


def test_a_scalar_factor_between_two_quantized_tensors_folds_into_the_scale():
    model, folded = fold(chain())
    assert folded == {"times": "y"} and [n.op_type for n in model.graph.node] == ["QuantizeLinear", "DequantizeLinear"]
    y = np.random.default_rng(0).uniform(-6, 6, 1000).astype(np.float32)
    factor = np.float64(np.float32(0.25 / 255)) * 255  # the stored factor, as DequantizeLinear gives it
    expected = 0.0125 * (np.clip(np.round(y / np.float32(0.0125 / factor)) + 120, 0, 255) - 120)
    np.testing.assert_allclose(session(model, optimize=False).run(None, {"y": y})[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"factor": -0.25}, {"also_read": True}], ids=["negative factor", "y read elsewhere"])
def test_what_the_scale_cannot_carry_stays(kwargs):
    model, folded = fold(chain(**kwargs))
    assert not folded and "Mul" in [n.op_type for n in model.graph.node]


def test_a_factor_after_a_shared_quantizer_stays():
    """Attention's q * d**-0.25 after a Transpose that keeps its input's scale: folding would give the
    Transpose's output a scale of its own, and ORT would run the Transpose in float."""
    c = lambda name, v, dtype=np.float32: numpy_helper.from_array(np.array(v, dtype), name)  # noqa: E731
    nodes = [helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s1", "z1"], ["xdq"]),
             helper.make_node("Transpose", ["xdq"], ["y"], perm=[1, 0]),
             helper.make_node("QuantizeLinear", ["y", "s1", "z1"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s1", "z1"], ["ydq"]),
             helper.make_node("Mul", ["ydq", "k"], ["m"], name="times"),
             helper.make_node("QuantizeLinear", ["m", "s2", "z2"], ["mq"]),
             helper.make_node("DequantizeLinear", ["mq", "s2", "z2"], ["out"])]
    inits = [c("s1", 0.05), c("z1", 128, np.uint8), c("k", 0.35), c("s2", 0.02), c("z2", 128, np.uint8)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [8, 4])], inits)
    model, folded = fold(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert not folded and "Mul" in [n.op_type for n in model.graph.node]
