"""`qpass quantize --report`: the JSON record agrees with the model it describes and is deterministic."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest

from conftest import EXAMPLE
from test_cli import assert_one_line_error, qpass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The example quantized twice with the same options, each with its report."""
    root = tmp_path_factory.mktemp("report")
    out = []
    for i in range(2):
        model, report = root / f"m{i}.onnx", root / f"r{i}.json"
        proc = qpass("quantize", EXAMPLE / "model.onnx", "-t", "tvm-arm", "--data", EXAMPLE / "calib.npz",
                     "--cle", "--bias-correction", "-o", model, "--report", report, "-q")
        assert proc.returncode == 0, proc.stderr
        out.append((model, json.loads(report.read_text())))
    return out


def test_the_report_describes_the_written_model(runs):
    model_path, report = runs[0]
    assert (report["schema"], report["version"]) == ("qpass.quantize", 1)
    assert report["input"]["sha256"] == hashlib.sha256((EXAMPLE / "model.onnx").read_bytes()).hexdigest()
    assert report["output"]["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert report["target"]["name"] == "tvm-arm" and report["target"]["activation"]["scale"] == "pow2"

    model = onnx.load(model_path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    activations = report["tensors"]["activations"]
    assert activations
    for name, entry in activations.items():  # the scale each Q/DQ pair really uses
        np.testing.assert_array_equal(inits[f"{entry['quantizer']}.scale"], np.float32(entry["scale"]))
        assert np.log2(entry["scale"]).is_integer()  # tvm-arm: power-of-two scales
        lo, hi = entry["range"]
        assert lo <= hi
    weights = report["tensors"]["weights"]
    assert weights
    for name, entry in weights.items():
        np.testing.assert_array_equal(inits[f"{name}.scale"], np.float32(entry["scale"]))
        assert entry["qmin"] <= min(np.ravel(entry["zero_point"])) and max(np.ravel(entry["zero_point"])) <= entry["qmax"]

    dq = sum(n.op_type == "DequantizeLinear" for n in model.graph.node)
    assert dq >= len(activations) + len(weights)
    assert set(report["nodes"]["quantized"]) <= {n.name for n in model.graph.node}

    decisions = {d["technique"]: d for d in report["techniques"]["decisions"]}
    assert set(decisions) == {"cle", "bias_correction"}
    for d in decisions.values():
        assert d["kept"] == (d["applied"] and d["after_db"] >= d["before_db"])
    assert report["techniques"]["requested"]["bias_correction"] == "empirical"
    assert report["conformance"]["violations"] == [] and report["conformance"]["target"] == "tvm-arm"
    fidelity = report["fidelity"]
    assert fidelity["worst_sqnr_db"] == min(fidelity["sqnr_db"].values()) > 20
    assert report["calibration"]["samples"] > 0 and report["calibration"]["held_back"] > 0
    assert set(report["timings"]) >= {"annotate", "calibrate", "insert-qdq"}


def test_equal_runs_give_equal_reports_but_for_timings_and_paths(runs):
    (model_a, a), (model_b, b) = runs
    assert model_a.read_bytes() == model_b.read_bytes()
    for report in (a, b):
        report.pop("timings")
        report["output"].pop("path")
    assert a == b


def test_an_unwritable_report_path_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = qpass("quantize", EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", "-o", tmp_path / "m.onnx",
                 "--report", blocker / "r.json")
    assert_one_line_error(proc, 2, "cannot write")
