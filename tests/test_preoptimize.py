"""Preoptimize: ONNX Runtime's own float rewrites run before planning, compute what the model
computed (numpy reference), keep names and opset imports, and leave the quantized model running
the ops the float one runs in ORT."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from qpasses import graph as graph_io
from qpasses.calibration.runner import session
from qpasses.pass_infra import PassContext, QuantState
from qpasses.passes.preoptimize import Preoptimize
from qpasses.pipeline import quantize
from qpasses.targets import load_target
from qpasses.targets.lower.onnxruntime import int8_coverage, optimized

RNG = np.random.default_rng(0)
X = RNG.uniform(-1, 1, (16, 3, 8, 8)).astype(np.float32)
W = (RNG.standard_normal((8, 12, 3, 3)) * 0.3).astype(np.float32)
MIX = (RNG.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32)


def focus_stem(path):
    """YOLOX's stem as exported at opset 11: four strided Slice pairs (rows, then columns) and a Concat."""
    ints = lambda name, *v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    inits = [ints("z", 0), ints("o", 1), ints("end", 1 << 30), ints("two", 2), ints("h", 2), ints("w", 3),
             numpy_helper.from_array(W, "weight"), numpy_helper.from_array(MIX, "mix")]
    nodes, parts = [], []
    for row, col in ((0, 0), (1, 0), (0, 1), (1, 1)):
        r, c = f"r{row}{col}", f"s{row}{col}"
        nodes += [helper.make_node("Slice", ["x", "zo"[row], "end", "h", "two"], [r], name=f"rows{row}{col}"),
                  helper.make_node("Slice", [r, "zo"[col], "end", "w", "two"], [c], name=f"cols{row}{col}")]
        parts.append(c)
    nodes += [helper.make_node("Concat", parts, ["stacked"], name="focus", axis=1),
              helper.make_node("Conv", ["stacked", "weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"], name="relu"),
              helper.make_node("Conv", ["r", "mix"], ["out"], name="mix")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 4, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), path)
    np.save(path.with_suffix(".npy"), X)
    return path


def reference(x: np.ndarray) -> np.ndarray:
    """The stem in numpy: space-to-depth in the exporter's block order, a 3x3 conv, Relu, a 1x1 conv."""
    stacked = np.concatenate([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], axis=1)
    padded = np.pad(stacked.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # N, C, 4, 4, 3, 3
    return np.einsum("nchw,oc->nohw", np.maximum(np.einsum("nchwij,ocij->nohw", windows, W), 0), MIX[:, :, 0, 0])


def preoptimized(path) -> tuple[onnx.ModelProto, onnx.ModelProto, QuantState]:
    model = graph_io.normalize(graph_io.load_model(path))
    state = QuantState(graph=gs.import_onnx(model), target=load_target("onnxruntime"))
    assert Preoptimize()(state, PassContext(quiet=True)).modified
    return model, state.model(), state


def test_the_focus_stem_becomes_space_to_depth_and_computes_the_same(tmp_path):
    before, after, state = preoptimized(focus_stem(tmp_path / "m.onnx"))
    ops = [n.op_type for n in after.graph.node]
    assert "Slice" not in ops and "SpaceToDepth" in ops and "Concat" not in ops, ops
    got = session(after, optimize=False).run(None, {"x": X})[0]
    np.testing.assert_allclose(got, reference(X), rtol=0, atol=2e-5)  # float32 accumulation over 108 products
    assert {"conv", "relu"} <= {n.name for n in after.graph.node}  # the nodes ORT did not rewrite keep their names
    assert list(after.opset_import) == list(before.opset_import)  # not the ORT domains its saved model imports
    assert state.notes == ["preoptimize: ONNX Runtime's basic rewrites replaced 1 Concat, 8 Slice with 1 Gather, "
                           "1 SpaceToDepth"]


def test_the_quantized_stem_runs_what_float_ort_runs(tmp_path):
    """Without the pass, Q/DQ around the Slices hides the stem from ORT's rewrite: the int8 model ran
    eight Slices that the float model does not (YOLOX in the corpus: about 1 ms against 0.5)."""
    source = focus_stem(tmp_path / "m.onnx")
    result = quantize(source, load_target("onnxruntime"), source.with_suffix(".npy"), PassContext(quiet=True))
    runs = [n.op_type for n in optimized(result.model).graph.node]
    assert "Slice" not in runs and "SpaceToDepth" in runs, runs
    assert int8_coverage(result.model).share == 1.0
    got = session(result.model).run(None, {"x": X})[0]
    assert 10 * np.log10(np.sum(reference(X) ** 2) / np.sum((got - reference(X)) ** 2)) > 30  # measured 37.4 dB
    tensorrt = quantize(source, load_target("tensorrt"), source.with_suffix(".npy"), PassContext(quiet=True))
    assert "Slice" in {n.op_type for n in tensorrt.model.graph.node}  # an engine with its own rewrites: left alone


def test_a_constant_add_and_mul_after_a_conv_fold_into_it(tmp_path):
    """Paddle exports: a conv without bias, then a per-channel Mul and Add (a BatchNorm written out).
    ORT folds both into the conv in float; planned as they came, they would cost a QLinearMul and a
    QLinearAdd."""
    scale = RNG.uniform(0.5, 2, (1, 8, 1, 1)).astype(np.float32)
    shift = RNG.uniform(-1, 1, (1, 8, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "scale"], ["m"], name="scale"),
             helper.make_node("Add", ["m", "shift"], ["out"], name="shift")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, 4, 4])],
                              [numpy_helper.from_array(W, "weight"), numpy_helper.from_array(scale, "scale"),
                               numpy_helper.from_array(shift, "shift")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    x = RNG.uniform(-1, 1, (4, 12, 4, 4)).astype(np.float32)
    before, after, _ = preoptimized(tmp_path / "m.onnx")
    assert [n.op_type for n in after.graph.node] == ["Conv"]
    expected = session(before, optimize=False).run(None, {"x": x})[0]
    np.testing.assert_allclose(session(after, optimize=False).run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_a_model_without_a_rewrite_is_left_as_it_is(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "weight"], ["out"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, 2, 2])],
                              [numpy_helper.from_array(W, "weight")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    model = graph_io.normalize(graph_io.load_model(tmp_path / "m.onnx"))
    state = QuantState(graph=gs.import_onnx(model), target=load_target("onnxruntime"))
    assert not Preoptimize()(state, PassContext(quiet=True)).modified and state.notes == []
