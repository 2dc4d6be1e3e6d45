"""The calibrate pass with every method on the zoo: qparams follow the target, the Q/DQ model
matches the fake-quant reference, shared quantizers get one merged range."""

import numpy as np
import pytest

from conftest import ZOO_NAMES
from models import INPUT_SHAPE
from qpasses.calibration.runner import session
from qpasses.errors import CalibrationError
from qpasses.pass_infra import PassContext
from qpasses.pipeline import quantize
from qpasses.targets import load_target
from reference import evaluate

METHODS = ["minmax", "quantile", "mse", "kl", "norm", "meanstd"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", ZOO_NAMES)
def test_every_method_on_the_zoo(zoo_dir, model, method):
    ctx = PassContext(quiet=True, calib_method=method, weight_calib=method, batch_size=8)
    result = quantize(zoo_dir / f"{model}.onnx", load_target("onnxruntime"), zoo_dir / "calib.npy", ctx)
    plan = result.state.plan
    assert set(plan.qparams) >= set(plan.shares) | {w.tensor for w in plan.weights}
    for anchor in plan.shares:
        lo, hi = plan.ranges[anchor]
        assert np.isfinite(lo) and np.isfinite(hi) and lo <= hi
    assert all(np.isfinite(db) and db > 10 for db in result.sqnr_db.values())
    x = np.random.default_rng(9).standard_normal((2, *INPUT_SHAPE)).astype(np.float32)
    ref = evaluate(result.float_model, plan, {"input": x})[0]
    got = session(result.model, optimize=False).run(None, {"input": x})[0]
    assert np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max()  # tolerance as in test_insert_qdq


def test_shared_quantizer_range_covers_every_member(zoo_dir):
    result = quantize(zoo_dir / "inception_concat.onnx", load_target("tensorrt"), zoo_dir / "calib.npy",
                      PassContext(quiet=True))
    plan = result.state.plan
    shared = [members for members in plan.shares.values() if len(members) > 1]
    assert shared
    minmax = quantize(zoo_dir / "inception_concat.onnx", load_target("academic"), zoo_dir / "calib.npy", PassContext(quiet=True))
    for members in shared:
        anchor = plan.quantizer_of(members[0])
        lo, hi = plan.ranges[anchor]
        for name in members:
            if name in minmax.state.plan.ranges:  # the academic plan observes conv inputs on their own
                m_lo, m_hi = minmax.state.plan.ranges[name]
                assert lo <= m_lo + 1e-6 and hi >= m_hi - 1e-6


def test_max_samples_limits_calibration(zoo_dir):
    result = quantize(zoo_dir / "resnet_basic.onnx", load_target("tensorrt"), zoo_dir / "calib.npy",
                      PassContext(quiet=True, max_samples=8))
    assert result.calib_samples == 8
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        bad = zoo_dir / "nan.npy"
        x = np.load(zoo_dir / "calib.npy")
        x[3, 0, 0, 0] = np.inf
        np.save(bad, x)
        quantize(zoo_dir / "resnet_basic.onnx", load_target("tensorrt"), bad, PassContext(quiet=True))
