"""BatchNorm folding: the folded model computes what the unfolded one does (ORT, optimisations off)."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from conftest import ZOO_NAMES
from models import INPUT_SHAPE
from qpasses import graph as graph_io
from qpasses.calibration.runner import session
from qpasses.pass_infra import PassContext, QuantState
from qpasses.passes.fold_batchnorm import FoldBatchNorm
from qpasses.targets import load_target


def fold(model: onnx.ModelProto) -> QuantState:
    state = QuantState(graph=gs.import_onnx(model), target=load_target("tensorrt"))
    FoldBatchNorm()(state, PassContext(quiet=True))
    return state


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(model, optimize=False).run(None, {model.graph.input[0].name: x})[0]


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_folding_preserves_outputs(zoo_dir, name):
    model = graph_io.normalize(graph_io.load_model(zoo_dir / f"{name}.onnx"))
    bns = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    state = fold(model)
    folded = state.model()
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert len(state.bn_records) == bns  # every zoo BN follows a weighted op
    x = np.random.default_rng(1).standard_normal((3, *INPUT_SHAPE)).astype(np.float32)
    ref, got = run(model, x), run(folded, x)
    # tolerance: float32 re-association of the folded weights, relative to the output's magnitude
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))


def test_records_keep_the_original_statistics(zoo_dir):
    model = graph_io.normalize(graph_io.load_model(zoo_dir / "resnet_basic.onnx"))
    originals = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    record = fold(model).bn_records[bn.output[0]]
    np.testing.assert_array_equal(record["mean"], originals[bn.input[3]])
    np.testing.assert_array_equal(record["var"], originals[bn.input[4]])
    assert record["producer"] and record["bn"] == bn.name


def bn_after_relu_model() -> onnx.ModelProto:
    """Relu -> BN: no weighted producer, so the BN must become Mul + Add."""
    rng = np.random.default_rng(0)
    c = 4
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [c], v) for n, v in
             [("g", rng.uniform(0.5, 1.5, c)), ("b", rng.uniform(-1, 1, c)), ("m", rng.uniform(-1, 1, c)), ("v", rng.uniform(0.5, 2, c))]]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["y"], name="bn", epsilon=1e-3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c, 5, 5])], inits)
    return graph_io.normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def test_unfoldable_bn_becomes_mul_add():
    model = bn_after_relu_model()
    state = fold(model)
    folded = state.model()
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Mul", "Add"]
    assert any("Mul + Add" in note for note in state.notes)
    x = np.random.default_rng(2).standard_normal((2, 4, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run(folded, x), run(model, x), rtol=1e-5, atol=1e-5)


def matmul_bn_model() -> onnx.ModelProto:
    """MatMul with a constant [K, N] weight followed by BatchNormalization over N."""
    rng = np.random.default_rng(3)
    k, n = 6, 4
    inits = [helper.make_tensor("B", TensorProto.FLOAT, [k, n], rng.standard_normal(k * n))]
    inits += [helper.make_tensor(name, TensorProto.FLOAT, [n], v) for name, v in
              [("g", rng.uniform(0.5, 1.5, n)), ("b", rng.uniform(-1, 1, n)), ("m", rng.uniform(-1, 1, n)), ("v", rng.uniform(0.5, 2, n))]]
    nodes = [helper.make_node("MatMul", ["x", "B"], ["h"], name="mm"),
             helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], inits)
    return graph_io.normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def test_matmul_folds_with_a_shift_add():
    model = matmul_bn_model()
    state = fold(model)
    folded = state.model()
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]
    assert state.bn_records["y"]["producer"] == "mm"
    x = np.random.default_rng(4).standard_normal((5, 6)).astype(np.float32)
    np.testing.assert_allclose(run(folded, x), run(model, x), rtol=1e-5, atol=1e-5)
