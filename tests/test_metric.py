"""`--metric FILE.py:FUNCTION`: the user's task metric as a gate (eval, quantize) and a goal (--auto),
and one-line errors for every way the file can be wrong."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from conftest import EXAMPLE
from test_cli import assert_one_line_error, qpass
from qpasses.errors import InputError
from qpasses.metric import load_metric

AGREEMENT = '''
import numpy as np

def agreement(reference, candidate):
    """Fraction of samples whose top class is the same."""
    return float(np.mean(reference[0].argmax(1) == candidate[0].argmax(1)))

def broken(reference, candidate):
    raise KeyError("boxes")

def not_a_number(reference, candidate):
    return float("nan")
'''


@pytest.fixture()
def metric_file(tmp_path):
    path = tmp_path / "task.py"
    path.write_text(AGREEMENT)
    return path


def test_eval_gate_on_the_metric_against_numpy(tmp_path, metric_file):
    int8 = tmp_path / "m.onnx"
    assert qpass("quantize", EXAMPLE / "model.onnx", "-d", EXAMPLE / "calib.npz", "-o", int8, "-q").returncode == 0
    report = tmp_path / "eval.json"
    proc = qpass("eval", EXAMPLE / "model.onnx", int8, "--data", EXAMPLE / "eval.npz", "--metric", f"{metric_file}:agreement",
                 "--min-metric", "1.01", "--report", report)
    assert proc.returncode == 1 and "task metric" in proc.stderr and "< --min-metric 1.01" in proc.stderr.splitlines()[-1]
    x = np.load(EXAMPLE / "eval.npz")["input"]
    ref = ort.InferenceSession(str(EXAMPLE / "model.onnx")).run(None, {"input": x})[0]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(int8), options).run(None, {"input": x})[0]
    record = json.loads(report.read_text())
    assert record["task_metric"] == pytest.approx(float(np.mean(ref.argmax(1) == got.argmax(1))), abs=1e-12)
    assert record["gates"]["min_metric"] == 1.01 and record["task_metric_name"].endswith("task.py:agreement")


def test_auto_stops_at_the_first_setting_that_meets_the_metric(tmp_path, metric_file):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    proc = qpass("quantize", EXAMPLE / "model.onnx", "-d", EXAMPLE / "calib.npz", "--eval-data", EXAMPLE / "eval.npz",
                 "--auto", "--metric", f"{metric_file}:agreement", "--min-metric", "0.99", "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    trials = json.loads(report.read_text())["auto"]["trials"]
    assert trials[-1]["met"] and trials[-1]["metric"] >= 0.99 and not any(t["met"] for t in trials[:-1])
    assert "metric 0.99" in proc.stderr or "metric 1" in proc.stderr


@pytest.mark.parametrize("spec,text", [
    ("task.py", "--metric takes FILE.py:FUNCTION"),
    ("missing.py:agreement", "no file missing.py"),
    ("task.py:absent", "has no function absent"),
    ("task.py:broken", "failed: KeyError: 'boxes'"),
    ("task.py:not_a_number", "returned nan, not a finite number"),
])
def test_a_wrong_metric_is_one_line_and_writes_nothing(tmp_path, metric_file, spec, text):
    out = tmp_path / "m.onnx"
    proc = qpass("quantize", EXAMPLE / "model.onnx", "-d", EXAMPLE / "calib.npz", "--metric", spec, "--min-metric", "0.5",
                 "-o", out, cwd=tmp_path)
    assert_one_line_error(proc, 2, text)
    assert not out.exists()


def test_a_file_that_does_not_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import not_a_module_anywhere\n")
    with pytest.raises(InputError, match="importing .*bad.py failed: ModuleNotFoundError"):
        load_metric(f"{bad}:f")
    assert_one_line_error(qpass("eval", EXAMPLE / "model.onnx", EXAMPLE / "model.onnx", "--data", EXAMPLE / "eval.npz",
                                "--min-metric", "1"), 2, "--min-metric needs --metric")
