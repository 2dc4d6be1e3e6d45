"""AIMET/QNN encodings: the exported grid equals the Q/DQ model's own (scale * (u + offset) against
scale * (q - zero_point), read from the written model), export then import reproduces the model
byte for byte on every kind of target, and bad files are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import EXAMPLE
from test_cli import assert_one_line_error, qpass


def quantize(tmp_path, target: str, *extra) -> tuple:
    model, encodings = tmp_path / f"{target}.onnx", tmp_path / f"{target}.encodings.json"
    proc = qpass("quantize", EXAMPLE / "model.onnx", "-t", target, "-d", EXAMPLE / "calib.npz", "-o", model,
                 "--export-encodings", encodings, "-q", *extra)
    assert proc.returncode == 0, proc.stderr
    return model, json.loads(encodings.read_text())


def dequantize_params(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Tensor quantized -> (scale, zero point) of its QuantizeLinear (activations) or DequantizeLinear (weights)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            found[node.input[0]] = inits[node.input[1]], inits[node.input[2]]
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].dtype != np.int32:
            found[node.input[0].removesuffix(".quantized")] = inits[node.input[1]], inits[node.input[2]]
    return found


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime", "tvm-arm"])
def test_exported_grid_is_the_models_grid(tmp_path, target):
    model, encodings = quantize(tmp_path, target)
    params = dequantize_params(onnx.load(model))
    checked = 0
    for table in ("activation_encodings", "param_encodings"):
        for tensor, entries in encodings[table].items():
            if tensor not in params:
                continue
            scale, zero_point = (np.atleast_1d(v) for v in params[tensor])
            for i, entry in enumerate(entries):
                bits = entry["bitwidth"]  # 8, or 7 for the onnxruntime target's weights
                start = -(2 ** (bits - 1)) if zero_point.dtype == np.int8 else 0
                assert bits in (7, 8) and entry["scale"] == pytest.approx(float(scale[i]), rel=1e-7)
                for u in (0, 2 ** bits - 1):  # the grid's ends, both ways
                    aimet = entry["scale"] * (u + entry["offset"])
                    onnx_value = float(scale[i]) * (u + start - int(zero_point[i]))
                    assert aimet == pytest.approx(onnx_value, rel=1e-6, abs=1e-12)
                assert entry["min"] == pytest.approx(entry["scale"] * entry["offset"], rel=1e-6)
                checked += 1
    assert checked >= 10
    assert all(len(e) > 1 for e in encodings["param_encodings"].values()) == (target != "tvm-arm")  # per-channel


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime", "tvm-arm"])
def test_export_then_import_gives_the_same_model(tmp_path, target):
    model, _ = quantize(tmp_path, target)
    again = tmp_path / "again.onnx"
    proc = qpass("quantize", EXAMPLE / "model.onnx", "-t", target, "--encodings", tmp_path / f"{target}.encodings.json",
                 "-o", again, "-q")
    assert proc.returncode == 0, proc.stderr
    assert again.read_bytes() == model.read_bytes()


def test_bad_encodings_files(tmp_path):
    _, encodings = quantize(tmp_path, "tensorrt")
    args = ["quantize", EXAMPLE / "model.onnx", "-t", "tensorrt", "-o", tmp_path / "x.onnx", "--encodings"]
    path = tmp_path / "bad.json"
    path.write_text("{}")
    assert_one_line_error(qpass(*args, path), 2, "not an AIMET encodings file")
    dropped = dict(encodings, activation_encodings={})
    path.write_text(json.dumps(dropped))
    assert_one_line_error(qpass(*args, path), 2, "the encodings have no entry for")
    first = next(iter(encodings["param_encodings"]))
    encodings["param_encodings"][first][0]["bitwidth"] = 4
    path.write_text(json.dumps(encodings))
    assert_one_line_error(qpass(*args, path), 2, f"encoding of {first}: bitwidth [4, 8]")
    assert_one_line_error(qpass(*args, tmp_path / "missing.json"), 2, "missing.json")
    assert_one_line_error(qpass(*args, path, "--cle"), 2, "--encodings")
    assert not (tmp_path / "x.onnx").exists()
