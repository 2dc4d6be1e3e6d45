"""Decompose: every rewrite computes what the op it replaces computes (numpy reference, ORT with
optimisations off), and leaves alone what it cannot rewrite exactly."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from qpasses.calibration.runner import session
from qpasses.pass_infra import PassContext, QuantState
from qpasses.passes.decompose import Decompose
from qpasses.targets import load_target

X = np.random.default_rng(0).uniform(-8, 8, (2, 3, 4, 4)).astype(np.float32)


def single_op(op: str, constant: np.ndarray | None = None, **attrs) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(constant, "c")] if constant is not None else []
    node = helper.make_node(op, ["x", "c"] if constant is not None else ["x"], ["y"], name="op", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(X.shape))], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def decompose(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    state = QuantState(graph=gs.import_onnx(model), target=load_target("onnxruntime"))
    changed = Decompose()(state, PassContext(quiet=True)).modified
    return state.model(), changed


def run(model: onnx.ModelProto) -> np.ndarray:
    return session(model, optimize=False).run(None, {"x": X})[0]


def hard_sigmoid(x, alpha, beta):
    return np.clip(alpha * x.astype(np.float64) + beta, 0, 1)


CASES = {
    "div by a scalar": (single_op("Div", np.array(6, np.float32)), X / 6.0),
    "div by a channel vector": (single_op("Div", np.array([2, -4, 0.5], np.float32).reshape(1, 3, 1, 1)),
                                X / np.array([2, -4, 0.5]).reshape(1, 3, 1, 1)),
    "hard-sigmoid, default alpha/beta": (single_op("HardSigmoid"), hard_sigmoid(X, 0.2, 0.5)),
    "hard-sigmoid, as torch writes it": (single_op("HardSigmoid", alpha=1 / 6, beta=0.5), hard_sigmoid(X, 1 / 6, 0.5)),
    "hard-swish": (single_op("HardSwish"), X * hard_sigmoid(X, 1 / 6, 0.5)),
}


@pytest.mark.parametrize("case", CASES)
def test_rewrite_matches_the_op(case):
    model, expected = CASES[case]
    rewritten, changed = decompose(model)
    assert changed and {n.op_type for n in rewritten.graph.node} <= {"Mul", "Add", "Clip"}
    # tolerance: a few float32 roundings of values up to 8 (x / c against x * (1 / c), the split sums)
    np.testing.assert_allclose(run(rewritten), expected, rtol=0, atol=4e-6)
    np.testing.assert_allclose(run(model), expected, rtol=0, atol=4e-6)  # the reference is ORT's own op


@pytest.mark.parametrize("model", [single_op("Div", np.array([1, 0, 2], np.float32).reshape(1, 3, 1, 1)),
                                   single_op("HardSigmoid", alpha=-0.2)], ids=["div by zero", "negative alpha"])
def test_what_has_no_exact_rewrite_stays(model):
    rewritten, changed = decompose(model)
    assert not changed and [n.op_type for n in rewritten.graph.node] == [model.graph.node[0].op_type]


def test_a_division_by_a_tensor_computed_at_run_time_stays():
    graph = helper.make_graph([helper.make_node("Div", ["x", "x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    assert not decompose(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]))[1]
