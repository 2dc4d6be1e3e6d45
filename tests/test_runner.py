"""calibration.runner: the pruned copies that `observe` runs, against the whole model in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qpasses.calibration.runner import only_outputs, reads, session


def branchy_model():
    """x -> Relu -> r; an If reads r from the enclosing scope; a Sigmoid branch nobody asks for."""
    then = helper.make_graph([helper.make_node("Mul", ["r", "two"], ["picked"])], "then", [],
                             [helper.make_tensor_value_info("picked", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["r"], ["negated"])], "else", [],
                              [helper.make_tensor_value_info("negated", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("If", ["yes"], ["i"], name="branch", then_branch=then, else_branch=other),
             helper.make_node("Add", ["i", "x"], ["y"], name="add"),
             helper.make_node("Sigmoid", ["x"], ["s"], name="unused")]
    inits = [numpy_helper.from_array(np.float32(2.0), "two"), numpy_helper.from_array(np.array(True), "yes")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_subgraph_reads_from_the_enclosing_scope():
    model = branchy_model()
    assert reads(model.graph.node[1]) == {"yes", "r", "two"}


def test_only_the_nodes_the_asked_tensors_need_are_kept_and_they_compute_the_same():
    model = branchy_model()
    pruned = only_outputs(model, ["i", "r"])
    assert [n.name for n in pruned.graph.node] == ["relu", "branch"]
    assert [o.name for o in pruned.graph.output] == ["i", "r"]
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    whole = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session(pruned, optimize=False).run(["i", "r"], {"x": x})
    np.testing.assert_array_equal(got[1], np.maximum(x, 0))
    np.testing.assert_array_equal(got[0], 2 * np.maximum(x, 0))
    np.testing.assert_array_equal(whole.run(["y"], {"x": x})[0], got[0] + x)
