"""The bundled example: int8 accuracy within 1 point of float on its labeled evaluation data."""

import numpy as np
import onnx
import pytest

from conftest import EXAMPLE, TARGETS
from qpasses.calibration.runner import session
from qpasses.pass_infra import PassContext
from qpasses.pipeline import quantize
from qpasses.targets import load_target


def accuracy(model: onnx.ModelProto, optimize: bool) -> float:
    data = np.load(EXAMPLE / "eval.npz")
    logits = session(model, optimize).run(None, {"input": data["input"]})[0]
    return float((logits.argmax(1) == data["labels"]).mean())


METHODS = ["minmax", "quantile", "mse", "kl", "norm", "meanstd"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target", TARGETS)
def test_int8_accuracy_within_one_point(target, method):
    ctx = PassContext(quiet=True, calib_method=method)
    result = quantize(EXAMPLE / "model.onnx", load_target(target), EXAMPLE / "calib.npz", ctx)
    float_acc = accuracy(onnx.load(EXAMPLE / "model.onnx"), True)
    assert float_acc > 0.95  # the example is a trained model, not noise
    assert accuracy(result.model, optimize=False) >= float_acc - 0.01
    assert all(db > 15 for db in result.sqnr_db.values())
