"""Comparing two models: SQNR per output and top-1 equal an independent numpy computation on ONNX
Runtime's outputs; gates fail with one line each; mismatched models are refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import EXAMPLE
from qpasses.calibration.data import open_source
from qpasses.calibration.runner import input_specs, session
from qpasses.errors import InputError
from qpasses.fidelity import compare
from test_lower_onnxruntime import int8_model


def test_scores_equal_a_numpy_computation(tmp_path):
    reference = onnx.load(EXAMPLE / "model.onnx")
    candidate = onnx.load(int8_model(tmp_path, EXAMPLE / "model.onnx", target="tvm-arm"))
    data = open_source(EXAMPLE / "eval.npz", input_specs(reference))
    result = compare(reference, candidate, data, batch_size=64)

    samples = np.load(EXAMPLE / "eval.npz")
    want = session(reference).run(None, {"input": samples["input"]})[0].astype(np.float64)
    got = session(candidate, optimize=False).run(None, {"input": samples["input"]})[0]
    assert result.samples == len(samples["labels"])
    (db,) = result.sqnr_db.values()
    assert db == pytest.approx(10 * np.log10(np.sum(want ** 2) / np.sum((want - got) ** 2)), abs=1e-6)
    assert result.metric == "top-1 accuracy vs labels"
    assert result.reference_top1 == pytest.approx(100 * np.mean(want.argmax(1) == samples["labels"]))
    assert result.candidate_top1 == pytest.approx(100 * np.mean(got.argmax(1) == samples["labels"]))
    assert result.agreement == pytest.approx(100 * np.mean(got.argmax(1) == want.argmax(1)))
    assert result.drop == pytest.approx(result.reference_top1 - result.candidate_top1)

    assert result.failures(min_sqnr=db - 1, max_drop=result.drop + 0.5) == []
    failed = result.failures(min_sqnr=db + 1, max_drop=result.drop - 0.5)
    assert len(failed) == 2 and "< --min-sqnr" in failed[0] and "> --max-drop" in failed[1]


def test_a_model_against_itself_without_labels():
    model = onnx.load(EXAMPLE / "model.onnx")
    data = open_source(EXAMPLE / "calib.npz", input_specs(model))
    result = compare(model, model, data, batch_size=32)
    # float rounding only: the reference runs with ORT's graph optimisations, the candidate without
    assert result.worst_sqnr_db > 100 and result.metric == "top-1 agreement with the reference"
    assert result.reference_top1 == result.candidate_top1 == result.agreement == 100.0 and result.drop == 0.0


def test_models_with_different_outputs_are_refused():
    model = onnx.load(EXAMPLE / "model.onnx")
    other = onnx.load(EXAMPLE / "model.onnx")
    other.graph.output[0].name = "renamed"
    data = open_source(EXAMPLE / "calib.npz", input_specs(model))
    with pytest.raises(InputError, match="the models' outputs differ"):
        compare(model, other, data, batch_size=32)
