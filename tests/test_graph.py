"""Loading and normalising models: the guarantees every pass relies on."""

import os
import stat

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models import build, export
from qpasses import graph as graph_io
from qpasses.errors import InputError, UnsupportedModelError


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        graph_io.load_model(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a protobuf\n" * 10)
    with pytest.raises(InputError, match="not"):
        graph_io.load_model(junk)


def test_invalid_graph_is_reported(tmp_path):
    node = helper.make_node("Relu", ["missing"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    with pytest.raises(InputError, match="invalid ONNX model"):
        graph_io.load_model(path)


def test_old_opset_is_upgraded_and_constants_become_initializers(tmp_path):
    path = export(build("mobilenetv2_block"), tmp_path / "m11.onnx", opset=11)
    raw = graph_io.load_model(path)
    assert graph_io.opset_of(raw) == 11 and any(n.op_type == "Constant" for n in raw.graph.node)
    model = graph_io.normalize(raw)
    assert graph_io.opset_of(model) == 13
    assert not any(n.op_type == "Constant" for n in model.graph.node)
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)


def dynamic_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_dynamic_dims_need_sizes():
    with pytest.raises(InputError, match=r"--input-shape x=Nx3xNxN"):
        graph_io.normalize(dynamic_model())
    model = graph_io.normalize(dynamic_model(), graph_io.parse_input_shapes(["x=2x3x8x8"]))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 8, 8]
    with pytest.raises(InputError, match="contradicts"):
        graph_io.normalize(dynamic_model(), {"x": [2, 4, 8, 8]})
    with pytest.raises(InputError, match="model inputs are x"):
        graph_io.normalize(dynamic_model(), {"image": [2, 3, 8, 8]})
    with pytest.raises(InputError, match="NAME=DIMxDIM"):
        graph_io.parse_input_shapes(["x=2x3xeightx8"])


def test_dynamic_batch_alone_is_kept(tmp_path):
    model = graph_io.normalize(graph_io.load_model(export(build("gemm_head"), tmp_path / "g.onnx")))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_quantized_models_are_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [1])
    graph = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s"], ["y"])], "g", [x], [y],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])])
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        graph_io.normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def test_save_is_atomic_and_deterministic(tmp_path):
    model = graph_io.normalize(graph_io.load_model(export(build("resnet_basic"), tmp_path / "r.onnx")))
    a, b = tmp_path / "out" / "a.onnx", tmp_path / "out" / "b.onnx"
    graph_io.save_model(model, a)
    graph_io.save_model(model, b)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in a.parent.iterdir()) == ["a.onnx", "b.onnx"]  # no temp files left
    np.testing.assert_equal(len(onnx.load(a).graph.node), len(model.graph.node))


def test_external_data_and_constant_node_weights_are_quantized(tmp_path):
    """Weights stored as Constant nodes and in an external data file are both found and quantized."""
    from qpasses.pass_infra import PassContext
    from qpasses.pipeline import quantize
    from qpasses.targets import load_target

    model = onnx.load(export(build("resnet_basic"), tmp_path / "r.onnx"))
    weights = [i for i in model.graph.initializer if i.name.endswith("weight")]
    for init in weights:
        model.graph.node.insert(0, helper.make_node("Constant", [], [init.name], value=init))
        model.graph.initializer.remove(init)
    path = tmp_path / "ext" / "r.onnx"
    path.parent.mkdir()
    onnx.save(model, path, save_as_external_data=True, location="r.data", size_threshold=0)
    assert (path.parent / "r.data").is_file()
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32))
    result = quantize(path, load_target("onnxruntime"), tmp_path / "calib.npy", PassContext(quiet=True))
    assert len(result.state.plan.weights) == sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
    assert not any("run time" in why for why in result.state.plan.float_nodes.values())
    assert not any(n.op_type == "Constant" for n in result.model.graph.node)


def test_identity_aliased_weights_become_initializers():
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 1, 1], [1.0, 2.0])
    nodes = [helper.make_node("Identity", ["w"], ["w_alias"]), helper.make_node("Conv", ["x", "w_alias"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], [w])
    model = graph_io.normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    assert "w_alias" in {i.name for i in model.graph.initializer}


def stale_value_info_model() -> onnx.ModelProto:
    """As Paddle exports it: opset 11, input -1x3x?x?, and value_info written for other sizes."""
    w = onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4, 32, 32])], [w],
                              value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT, [-1, 4, 32, 32])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def test_stale_value_info_is_inferred_anew_for_the_given_sizes():
    model = graph_io.normalize(stale_value_info_model(), {"x": [1, 3, 48, 192]})
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.output)}
    assert shapes["c"] == [1, 4, 48, 192] and shapes["y"] == [1, 4, 48, 192]
    onnx.checker.check_model(model)  # the graph output keeps a shape: the saved model loads again


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_permissions(tmp_path, mask):
    old = os.umask(mask)
    try:
        graph_io.write_all({tmp_path / "a.json": b"{}", tmp_path / "sub" / "b.onnx": b"\x08"})
    finally:
        os.umask(old)
    for path in (tmp_path / "a.json", tmp_path / "sub" / "b.onnx"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_a_failed_write_replaces_nothing(tmp_path):
    """Every file is staged before any is renamed: one that cannot be written leaves the others as they were."""
    kept, blocker = tmp_path / "kept.json", tmp_path / "file"
    kept.write_text("earlier")
    blocker.write_text("a file, not a directory")
    with pytest.raises(InputError, match="cannot write"):
        graph_io.write_all({kept: b"new", blocker / "x.json": b"{}"})
    assert kept.read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "kept.json"]  # no temp file left behind


def test_a_model_past_the_protobuf_limit_is_saved_with_external_data(tmp_path, monkeypatch):
    """Past 2 GB (here a lowered limit) the weights go to `<name>.data`; ONNX Runtime reads the pair back."""
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    monkeypatch.setattr(graph_io, "_EXTERNAL_DATA_LIMIT", 1000)
    graph_io.save_model(model, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx").stat().st_size < 1000 and len(model.graph.initializer[0].raw_data) == w.nbytes
    import onnxruntime as ort

    x = np.ones((1, 64), np.float32)
    np.testing.assert_array_equal(ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0], x @ w)
