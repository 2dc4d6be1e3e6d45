"""The torch evaluation of ONNX graphs that block reconstruction differentiates, against ONNX Runtime
on whole models: the zoo, the bundled example and transformer blocks exported at opsets 13 and 17."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from conftest import EXAMPLE, ZOO_NAMES
from models import INPUT_SHAPE, Attention
from qpasses import graph as graph_io
from qpasses import torch_graph
from qpasses.calibration.runner import session


def _mismatches(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[str]:
    """The outputs whose torch value differs from ONNX Runtime's (shape, or beyond 1e-4 relative)."""
    graph = gs.import_onnx(model)
    values = {name: torch.as_tensor(v) for name, v in feeds.items()}
    with torch.no_grad():
        torch_graph.run(graph.nodes, values)
    wrong = []
    for out, expected in zip(graph.outputs, session(model, optimize=False).run(None, feeds)):
        got = values[out.name].numpy()
        if got.shape != expected.shape or not np.allclose(
                got, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(expected).max()))):
            wrong.append(out.name)
    return wrong


@pytest.mark.parametrize("model", [m for m in ZOO_NAMES if m != "conv_transpose"])  # ConvTranspose: no torch rule
def test_the_zoo_runs_in_torch_as_in_onnx_runtime(zoo_dir, model):
    onnx_model = graph_io.normalize(graph_io.load_model(zoo_dir / f"{model}.onnx"))
    x = np.random.default_rng(0).standard_normal((3, *INPUT_SHAPE)).astype(np.float32)
    assert not _mismatches(onnx_model, {"input": x})


def test_every_zoo_model_but_the_deconvolution_is_supported(zoo_dir):
    missing = {m: torch_graph.unsupported(gs.import_onnx(graph_io.normalize(graph_io.load_model(zoo_dir / f"{m}.onnx"))).nodes)
               for m in ZOO_NAMES}
    assert {m for m, why in missing.items() if why} == {"conv_transpose"}, missing


def test_the_example_runs_in_torch_as_in_onnx_runtime():
    model = graph_io.normalize(graph_io.load_model(EXAMPLE / "model.onnx"))
    assert not _mismatches(model, {"input": np.load(EXAMPLE / "eval.npz")["input"][:8]})


@pytest.mark.parametrize("opset", [13, 17])
def test_a_transformer_block_runs_in_torch_as_in_onnx_runtime(tmp_path, opset):
    """Opset 13 writes LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div, 17 as LayerNormalization; GELU as Erf."""
    torch.manual_seed(0)
    path = tmp_path / "attention.onnx"
    torch.onnx.export(Attention().eval(), (torch.randn(1, 3, 16, 16),), str(path), input_names=["input"],
                      output_names=["output"], opset_version=opset, dynamo=False, dynamic_axes={"input": {0: "N"}})
    model = graph_io.normalize(graph_io.load_model(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"Softmax", "Erf", "MatMul"} <= ops and ("LayerNormalization" in ops) == (opset == 17)
    assert not _mismatches(model, {"input": np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)})


def _single(op: str, inputs: dict[str, np.ndarray], constants: dict[str, np.ndarray], **attrs) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node(op, [*inputs, *constants], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in inputs.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


X = np.random.default_rng(2).standard_normal((2, 4, 7, 9)).astype(np.float32)


@pytest.mark.parametrize("op, constants, attrs", [
    ("Conv", {"w": np.random.default_rng(3).standard_normal((3, 4, 2, 2)).astype(np.float32)}, {"auto_pad": "SAME_UPPER"}),
    ("Conv", {"w": np.random.default_rng(3).standard_normal((3, 4, 2, 3)).astype(np.float32)},
     {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ("MaxPool", {}, {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ("Resize", {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)},
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
    ("Resize", {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)},
     {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}),
    ("Slice", {"s": np.array([1, 0], np.int64), "e": np.array([7, 9], np.int64), "a": np.array([2, 3], np.int64),
               "st": np.array([2, 3], np.int64)}, {}),
], ids=["conv-same-upper", "conv-same-lower-strided", "maxpool-same-upper", "resize-nearest", "resize-linear", "slice-steps"])
def test_padding_resizing_and_slicing_as_onnx_runtime_does(op, constants, attrs):
    model = _single(op, {"x": X}, constants, **attrs)
    assert torch_graph.unsupported(gs.import_onnx(model).nodes) is None
    assert not _mismatches(model, {"x": X})


def test_space_to_depth_as_onnx_runtime_does():
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 6)).astype(np.float32)
    assert not _mismatches(_single("SpaceToDepth", {"x": x}, {}, blocksize=2), {"x": x})
