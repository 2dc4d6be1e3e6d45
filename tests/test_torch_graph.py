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


def _compare(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    graph = gs.import_onnx(model)
    values = {name: torch.as_tensor(v) for name, v in feeds.items()}
    with torch.no_grad():
        torch_graph.run(graph.nodes, values)
    for out, expected in zip(graph.outputs, session(model, optimize=False).run(None, feeds)):
        got = values[out.name].numpy()
        assert got.shape == expected.shape
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(expected).max()))), out.name


@pytest.mark.parametrize("model", ZOO_NAMES)
def test_the_zoo_runs_in_torch_as_in_onnx_runtime(zoo_dir, model):
    onnx_model = graph_io.normalize(graph_io.load_model(zoo_dir / f"{model}.onnx"))
    if torch_graph.unsupported(gs.import_onnx(onnx_model).nodes):
        pytest.skip(f"{model}: {torch_graph.unsupported(gs.import_onnx(onnx_model).nodes)}")  # ConvTranspose
    x = np.random.default_rng(0).standard_normal((3, *INPUT_SHAPE)).astype(np.float32)
    _compare(onnx_model, {"input": x})


def test_every_zoo_model_but_the_deconvolution_is_supported(zoo_dir):
    missing = {m: torch_graph.unsupported(gs.import_onnx(graph_io.normalize(graph_io.load_model(zoo_dir / f"{m}.onnx"))).nodes)
               for m in ZOO_NAMES}
    assert {m for m, why in missing.items() if why} == {"conv_transpose"}, missing


def test_the_example_runs_in_torch_as_in_onnx_runtime():
    model = graph_io.normalize(graph_io.load_model(EXAMPLE / "model.onnx"))
    _compare(model, {"input": np.load(EXAMPLE / "eval.npz")["input"][:8]})


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
    _compare(model, {"input": np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)})
