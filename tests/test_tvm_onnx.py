"""ONNX rewrites for TVM's frontend: an unrolled LSTM and an inlined static `If` compute what ONNX
Runtime computes on the original graph (ORT's own LSTM and If are the reference); what cannot be
rewritten is refused with a reason, and Q/DQ nodes are never folded."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qpasses.calibration.runner import session
from qpasses.errors import UnsupportedModelError
from qpasses.targets.lower.tvm_onnx import importable

RNG = np.random.default_rng(0)


def const(name: str, shape, scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def lstm_model(steps: int = 5, batch: int = 2, size: int = 3, hidden: int = 4, direction: str = "forward",
               layout: int = 0, bias: bool = True, state: bool = True, opset: int = 13, **attrs) -> onnx.ModelProto:
    dirs = 2 if direction == "bidirectional" else 1
    x_shape = [batch, steps, size] if layout else [steps, batch, size]
    s_shape = [batch, dirs, hidden] if layout else [dirs, batch, hidden]
    inits = [const("W", (dirs, 4 * hidden, size)), const("R", (dirs, 4 * hidden, hidden))]
    inputs = ["x", "W", "R", "B" if bias else "", "", "h0" if state else "", "c0" if state else ""]
    if bias:
        inits.append(const("B", (dirs, 8 * hidden)))
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    if state:
        graph_inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, s_shape) for n in ("h0", "c0")]
    node = helper.make_node("LSTM", inputs, ["y", "yh", "yc"], hidden_size=hidden, direction=direction,
                            **({"layout": layout} if layout else {}), **attrs)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "yh", "yc")]
    graph = helper.make_graph([node], "lstm", graph_inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def feeds_for(model: onnx.ModelProto, shapes: dict | None = None) -> dict[str, np.ndarray]:
    feeds = {}
    for value in model.graph.input:
        shape = (shapes or {}).get(value.name) or [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = RNG.standard_normal(shape).astype(np.float32)
    return feeds


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return session(model, optimize=False).run(None, feeds)


def shapes_of(feeds: dict) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in feeds.items()}


@pytest.mark.parametrize("options", [
    {},
    {"direction": "reverse"},
    {"direction": "bidirectional", "bias": False, "state": False},
    {"steps": 1, "batch": 1, "opset": 11},  # opset 11: Split and Unsqueeze take attributes there
])
def test_unrolled_lstm_matches_ort_lstm(options):
    model = lstm_model(**options)
    feeds = feeds_for(model)
    rewritten = importable(model, shapes_of(feeds))
    assert "LSTM" not in {n.op_type for n in rewritten.graph.node}
    onnx.checker.check_model(rewritten)
    for got, want in zip(run(rewritten, feeds), run(model, feeds)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_batch_major_lstm_matches_the_sequence_major_one():
    """layout = 1 (opset 14): ORT has no kernel for it, so the reference is the same LSTM with layout 0
    on the transposed inputs."""
    model = lstm_model(direction="bidirectional", opset=14)
    major = onnx.ModelProto()
    major.CopyFrom(model)
    major.graph.node[0].attribute.append(helper.make_attribute("layout", 1))
    for value in major.graph.input:
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_value, dims[1].dim_value = dims[1].dim_value, dims[0].dim_value
    feeds = feeds_for(model)
    swapped = {k: np.ascontiguousarray(np.swapaxes(v, 0, 1)) for k, v in feeds.items()}
    y, yh, yc = run(importable(major, shapes_of(swapped)), swapped)
    want_y, want_yh, want_yc = run(model, feeds)
    np.testing.assert_allclose(y, want_y.transpose(2, 0, 1, 3), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(yh, np.swapaxes(want_yh, 0, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(yc, np.swapaxes(want_yc, 0, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attrs,reason", [({"clip": 1.0}, "clip"), ({"input_forget": 1}, "input_forget"),
                                          ({"activations": ["Sigmoid", "Relu", "Tanh"]}, "activations")])
def test_lstm_variants_it_does_not_write_out_are_refused(attrs, reason):
    model = lstm_model(**attrs)
    with pytest.raises(UnsupportedModelError, match=f"LSTM .*{reason}"):
        importable(model, shapes_of(feeds_for(model)))


def branch(name: str, nodes: list, out: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def shape_if_model() -> onnx.ModelProto:
    """x [N, 4]: N == 1 doubles x, and inside that branch a nested If on x's width adds 1; else x + 3.
    Both conditions come from Shape, as exporters write them."""
    c = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v)))  # noqa: E731
    inner = helper.make_node("If", ["wide"], ["inner"],
                             then_branch=branch("t2", [c("one", np.float32(1)), helper.make_node("Add", ["doubled", "one"], ["t2o"])], "t2o"),
                             else_branch=branch("e2", [helper.make_node("Identity", ["doubled"], ["e2o"])], "e2o"))
    then = branch("t", [c("two", np.float32(2)), helper.make_node("Mul", ["x", "two"], ["doubled"]),
                        helper.make_node("Gather", ["shape", "i1"], ["width"]),
                        helper.make_node("Equal", ["width", "four"], ["wide"]), inner,
                        helper.make_node("Identity", ["inner"], ["to"])], "to")
    other = branch("e", [c("three", np.float32(3)), helper.make_node("Add", ["x", "three"], ["eo"])], "eo")
    nodes = [c("i0", np.int64(0)), c("i1", np.int64(1)), c("n1", np.int64(1)), c("four", np.int64(4)),
             helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "i0"], ["rows"]),
             helper.make_node("Equal", ["rows", "n1"], ["single"]),
             helper.make_node("If", ["single"], ["y"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "ifs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("rows", [1, 3])
def test_if_on_shapes_is_inlined_with_the_branch_ort_takes(rows):
    model = shape_if_model()
    feeds = {"x": RNG.standard_normal((rows, 4)).astype(np.float32)}
    rewritten = importable(model, shapes_of(feeds))
    assert "If" not in {n.op_type for n in rewritten.graph.node}
    onnx.checker.check_model(rewritten)
    np.testing.assert_array_equal(run(rewritten, feeds)[0], run(model, feeds)[0])
    expected = feeds["x"] * 2 + 1 if rows == 1 else feeds["x"] + 3
    np.testing.assert_allclose(run(rewritten, feeds)[0], expected, rtol=1e-6)


def test_if_on_an_input_value_is_refused():
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"],
                          then_branch=branch("t", [helper.make_node("Neg", ["x"], ["t"])], "t"),
                          else_branch=branch("e", [helper.make_node("Identity", ["x"], ["e"])], "e"))],
        "flagged", [helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
                    helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedModelError, match="branch on input values"):
        importable(model, {"flag": [], "x": [2]})


def test_dequantize_nodes_are_not_folded_and_other_models_are_untouched():
    """A Q/DQ weight next to a static If keeps its DequantizeLinear: the integer lowering matches on it."""
    model = shape_if_model()
    w = numpy_helper.from_array(np.arange(16, dtype=np.int8).reshape(4, 4), "wq")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "ws")
    model.graph.initializer.extend([w, scale])
    model.graph.node.extend([helper.make_node("DequantizeLinear", ["wq", "ws"], ["wf"]),
                             helper.make_node("MatMul", ["y", "wf"], ["z"])])
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    rewritten = importable(model, {"x": [1, 4]})
    assert [n.op_type for n in rewritten.graph.node].count("DequantizeLinear") == 1
    plain = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "plain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])]))
    assert importable(plain, {"x": [3]}) is plain  # neither If nor LSTM: nothing to rewrite


def test_an_identity_of_a_shape_is_bypassed_and_tvm_imports_the_model():
    """Paddle exports pass shapes through Identity nodes, which TVM 0.27's Identity converter refuses
    ("cannot handle ShapeExpr inputs"); bypassed, the model computes what ORT computes on the original."""
    from tvm.relax.frontend.onnx import from_onnx

    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Identity", ["shape"], ["same"]),
             helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["r2"]),
             helper.make_node("Reshape", ["r2", "same"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]),
                              opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(Exception, match="ShapeExpr"):
        from_onnx(model, shape_dict={"x": [2, 3]})
    rewritten = importable(model, {"x": [2, 3]})
    assert "Identity" not in {n.op_type for n in rewritten.graph.node}
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    assert np.array_equal(session(rewritten).run(None, {"x": x})[0], session(model).run(None, {"x": x})[0])
    from_onnx(rewritten, shape_dict={"x": [2, 3]})
