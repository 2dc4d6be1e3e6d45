"""calibration.runner: the pruned copies that `observe` runs and the pieces `StepRunner` runs, against
the whole model in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import ModelProto, TensorProto, helper, numpy_helper

from qpasses.calibration.data import ArraySource
from qpasses.calibration.runner import StepRunner, only_outputs, reads, run_outputs, session


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


def chain_model(w2: float = 3.0, extra_node: bool = False):
    """x -> Mul(w1) -> Relu -> r; r -> Mul(w2) -> c; c + x (a skip from the input) -> s; s * k -> y,
    k from a Constant node; an If reads r from the enclosing scope and doubles it."""
    double = helper.make_graph([helper.make_node("Add", ["r", "r"], ["twice"])], "then", [],
                               [helper.make_tensor_value_info("twice", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Mul", ["x", "w1"], ["a"], name="layer1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "w2"], ["c"], name="layer2"),
             helper.make_node("Add", ["c", "x"], ["s"], name="skip"),
             helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(0.5))),
             helper.make_node("Mul", ["s", "k"], ["y"], name="scale"),
             helper.make_node("If", ["yes"], ["d"], name="branch", then_branch=double, else_branch=double)]
    if extra_node:
        nodes.append(helper.make_node("Neg", ["y"], ["n"]))
    inits = [numpy_helper.from_array(np.float32(-2.0), "w1"), numpy_helper.from_array(np.float32(w2), "w2"),
             numpy_helper.from_array(np.array(True), "yes")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3]),
                               helper.make_tensor_value_info("d", TensorProto.FLOAT, ["n", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


class Parts:
    def __init__(self):
        self.parts = []

    def update(self, x):
        self.parts.append(x)

    @property
    def value(self):
        return np.concatenate(self.parts)


def steps(x, optimize=True):
    return StepRunner(chain_model(), ArraySource({"x": [x]}), batch_size=2, max_samples=None, quiet=True,
                      optimize=optimize)


def test_steps_compute_what_the_whole_model_computes_and_keep_only_what_later_nodes_read():
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    r, c = np.maximum(-2 * x, 0), 3 * np.maximum(-2 * x, 0)
    for optimize in (True, False):
        runner = steps(x, optimize)
        first = {"r": Parts()}
        runner.advance(chain_model(), first)
        np.testing.assert_array_equal(first["r"].value, r)
        assert [len(p) for p in first["r"].parts] == [2, 2, 1]  # the source's batches of 2
        assert set(runner.left[0]) == {"x", "r"}  # the skip and layer2 still read x and r
        second = {"s": Parts(), "d": Parts()}
        runner.advance(chain_model(), second)
        np.testing.assert_allclose(second["s"].value, c + x, rtol=1e-6)
        np.testing.assert_array_equal(second["d"].value, 2 * r)  # the If read r from the steps' store
        assert set(runner.left[0]) == {"s"}  # nothing reads x, r, c or d (an output) any more
        last = {"y": Parts()}
        runner.advance(chain_model(), last)
        whole = ort.InferenceSession(chain_model().SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(last["y"].value, whole.run(["y"], {"x": x})[0], rtol=1e-6)
        assert runner.left[0] == {}


def test_a_step_uses_the_new_constants_of_the_nodes_it_runs_and_peek_keeps_nothing():
    x = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    runner = steps(x)
    runner.advance(chain_model(), {"r": Parts()})
    r = np.maximum(-2 * x, 0)
    peeked = {"c": Parts()}
    runner.peek(chain_model(w2=3.0), peeked)
    np.testing.assert_allclose(peeked["c"].value, 3 * r, rtol=1e-6)
    assert set(runner.left[0]) == {"x", "r"}  # c was not kept, so layer2 runs again below
    changed = {"c": Parts()}
    runner.advance(chain_model(w2=-1.0), changed)  # layer2 changed before it ran for good
    np.testing.assert_allclose(changed["c"].value, -r, rtol=1e-6)


def test_a_step_with_another_graph_is_refused():
    runner = steps(np.ones((2, 3), np.float32))
    runner.advance(chain_model(), {"r": Parts()})
    with pytest.raises(ValueError, match="same graph"):
        runner.advance(chain_model(extra_node=True), {"y": Parts()})


def time_major_model(batch: int | str) -> ModelProto:
    """x [N, 4, 3] -> y = Transpose(x) [4, N, 3] (a CTC head's time-major logits) and z = x summed [N, 3]."""
    nodes = [helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 2]),
             helper.make_node("ReduceSum", ["x", "axis"], ["z"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, batch, 3]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 3])],
                              [numpy_helper.from_array(np.array([1], np.int64), "axis")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("batch", ["N", 1])
def test_outputs_are_joined_along_their_batch_axis_also_when_it_is_not_the_first(batch):
    x = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
    y, z = run_outputs(time_major_model(batch), ArraySource({"x": [x]}), batch_size=2)
    np.testing.assert_array_equal(y, x.transpose(1, 0, 2))
    np.testing.assert_allclose(z, x.sum(1), rtol=1e-6)
