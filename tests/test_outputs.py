"""Every path a command reads and writes: what is refused before any work, and how outputs land."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qpasses.errors import InputError
from qpasses.outputs import Files, companions


def external_model(path):
    """A model whose weight lives in `w.bin` beside it."""
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    onnx.save(helper.make_model(graph), path, save_as_external_data=True, location="w.bin", size_threshold=0)
    return path


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x08\x07 a model")
    return path


@pytest.mark.parametrize("spelling", ["symlink", "hard link", "dot"])
def test_an_input_under_another_name_is_still_the_input(tmp_path, model, spelling, monkeypatch):
    other = tmp_path / "other.json"
    if spelling == "symlink":
        other.symlink_to(model)
    elif spelling == "hard link":
        os.link(model, other)
    else:
        monkeypatch.chdir(tmp_path)
        other = type(tmp_path)("./sub/../m.onnx")
        (tmp_path / "sub").mkdir()
    with pytest.raises(InputError, match="is the input model; qpass never overwrites its inputs"):
        Files({"the input model": model}, {"--report": other}, force=True)


def test_companions_are_inputs_and_outputs_too(tmp_path, model):
    library = tmp_path / "q.so"
    library.write_bytes(b"\x7fELF")
    (tmp_path / "q.so.json").write_text("{}")
    with pytest.raises(InputError, match="q.so.json, which belongs to the model"):
        Files({"the model": library}, {"--report": tmp_path / "q.so.json"}, force=True)
    with pytest.raises(InputError, match="-o's companion out.so.json and --report both name"):
        Files({}, {"-o": tmp_path / "out.so", "--report": tmp_path / "out.so.json"})
    weights = external_model(tmp_path / "ext.onnx")
    assert companions(weights) == [tmp_path / "w.bin"]
    with pytest.raises(InputError, match="w.bin, which belongs to the input model"):
        Files({"the input model": weights}, {"-o": tmp_path / "w.bin"}, force=True)


def test_existing_outputs_need_force_and_parents_must_be_directories(tmp_path, model):
    report = tmp_path / "r.json"
    report.write_text("earlier")
    with pytest.raises(InputError, match="exists; pass --force"):
        Files({"the input model": model}, {"--report": report})
    Files({"the input model": model}, {"--report": report}, force=True)
    with pytest.raises(InputError, match=f"{model} is not a directory"):
        Files({}, {"--report": model / "r.json"})
    Files({"the --data file": "random:8"}, {"-o": tmp_path / "new" / "deeper" / "o.onnx"})  # created when written
