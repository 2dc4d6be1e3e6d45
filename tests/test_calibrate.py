"""The calibrate pass with every method on the zoo: qparams follow the target, the Q/DQ model
matches the fake-quant reference, shared quantizers get one merged range."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ZOO_NAMES
from models import INPUT_SHAPE
from qpasses.calibration.observers import make_observer
from qpasses.calibration.qparams import compute_qparams
from qpasses.calibration.runner import session
from qpasses.errors import CalibrationError
from qpasses.pass_infra import PassContext
from qpasses.passes.calibrate import CHOICE_SAMPLES, CHOICES, SAME_SCALE
from qpasses.pipeline import quantize
from qpasses.targets import load_target
from qpasses.targets.check import check_model
from reference import evaluate, fake_quant

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


def _two_matmuls(path, rng) -> np.ndarray:
    """X -> MatMul -> Relu -> MatMul -> Y, and heavy-tailed samples of X (so the methods' ranges differ), as
    many as the choice looks at."""
    w1 = rng.standard_normal((16, 12)).astype(np.float32)
    w2 = rng.standard_normal((12, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W1"], ["H"], name="mm1"), helper.make_node("Relu", ["H"], ["R"], name="relu"),
         helper.make_node("MatMul", ["R", "W2"], ["Y"], name="mm2")], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 64, 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 64, 4])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return rng.standard_t(2.0, (CHOICE_SAMPLES, 64, 16)).astype(np.float32)


def test_best_chooses_per_quantizer_the_range_its_consumer_computes_best_with(tmp_path):
    """Against numpy: for each quantized MatMul input, every candidate range is fake-quantized and
    multiplied by the float weight; the method chosen is the one of least relative output error."""
    rng = np.random.default_rng(3)
    x = _two_matmuls(tmp_path / "m.onnx", rng)
    np.savez(tmp_path / "calib.npz", X=x)
    target = load_target("onnxruntime")
    result = quantize(tmp_path / "m.onnx", target, tmp_path / "calib.npz",
                      PassContext(quiet=True, calib_method="best", batch_size=8), holdout=0)
    plan = result.state.plan
    w = {t.name: numpy_helper.to_array(t) for t in result.float_model.graph.initializer}
    h = x @ w["W1"]
    inputs = {"X": (x, w["W1"]), "R": (np.maximum(h, 0), w["W2"])}  # the quantized MatMul inputs
    assert set(inputs) <= set(plan.methods)
    for name, (value, weight) in inputs.items():
        errors, ranges = {}, {}
        for method in CHOICES:
            observer = make_observer(method)
            observer.update(value)
            ranges[method] = observer.compute_range(target.activation)
            qp = compute_qparams(*ranges[method], target.activation)
            exact = value.astype(np.float64) @ weight
            approx = fake_quant(value, qp.scale, qp.zero_point, qp.qmin, qp.qmax).astype(np.float64) @ weight
            errors[method] = np.sum((exact - approx) ** 2) / np.sum(exact ** 2)
        assert len({round(float(r[1]), 6) for r in ranges.values()}) > 1  # the choice is not trivial
        best, chosen = min(CHOICES, key=lambda m: (errors[m], CHOICES.index(m))), plan.methods[name]
        scale = {m: float(compute_qparams(*ranges[m], target.activation).scale) for m in CHOICES}
        # the least error, or a method listed earlier whose scale is the same within SAME_SCALE
        assert chosen == best or (CHOICES.index(chosen) < CHOICES.index(best)
                                  and abs(scale[chosen] - scale[best]) <= SAME_SCALE * scale[chosen]), (name, errors)
        assert np.allclose(plan.ranges[name], ranges[chosen], rtol=1e-6)


def test_best_compares_only_the_float_outputs_of_a_consumer(tmp_path):
    """A consumer with an integer output too (MaxPool's Indices) is scored on its float output only."""
    rng = np.random.default_rng(4)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W"], ["H"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("MaxPool", ["H"], ["P", "I"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Conv", ["P", "W2"], ["Y"], name="conv2")], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2, 4, 4]), helper.make_tensor_value_info("I", TensorProto.INT64, ["N", 4, 4, 4])],
        [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "W2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", X=rng.standard_t(2.0, (CHOICE_SAMPLES, 4, 8, 8)).astype(np.float32))
    result = quantize(tmp_path / "m.onnx", load_target("tensorrt"), tmp_path / "calib.npz",
                      PassContext(quiet=True, calib_method="best", batch_size=8), holdout=0)
    assert "H" in result.state.plan.methods


def test_a_channel_of_all_but_zero_weights_keeps_its_int32_bias(tmp_path):
    """Its weight scale would make s_x * s_w denormal and the bias overflow int32 (clipped, the output
    lost): the scale is raised until the bias fits. Against numpy: that channel's output is its bias,
    within one step of the activation quantizer (an identity 1x1 conv reads it)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 4, 1, 1)).astype(np.float32)
    w[1] = 1e-39  # a pruned channel that BatchNorm folding left all but zero
    b = np.array([0.1, 0.75, -0.2], np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["X", "W", "B"], ["H"], name="conv"),
                               helper.make_node("Conv", ["H", "I"], ["Y"], name="identity")], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B"),
                               numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "I")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    x = rng.standard_normal((16, 4, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", X=x)
    target = load_target("onnxruntime")
    result = quantize(tmp_path / "m.onnx", target, tmp_path / "calib.npz", PassContext(quiet=True), holdout=0)
    got = session(result.model, optimize=False).run(None, {"X": x})[0]
    step = float(result.state.plan.qparams["H"].scale)
    assert np.abs(got[:, 1] - 0.75).max() <= step
    assert any("raised the weight scale of 1 channel" in n for n in result.state.notes)
    assert not check_model(result.model, target).violations


def _two_ranges(path, rng) -> None:
    """A concat of a conv output in the hundreds and a sigmoid in [0, 1] (as a detector head's boxes and
    scores), the sigmoid also read by a conv of its own (Y2), the concat by another (Y1)."""
    c = lambda n, v: numpy_helper.from_array(np.asarray(v, np.float32), n)  # noqa: E731
    nodes = [helper.make_node("Conv", ["X", "WA"], ["A"], name="big", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["X", "WB"], ["b"], name="small", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["b"], ["B"], name="sig"),
             helper.make_node("Concat", ["A", "B"], ["AB"], name="cat", axis=1),
             helper.make_node("Conv", ["AB", "WC"], ["Y1"], name="mix"),
             helper.make_node("Conv", ["B", "WD"], ["Y2"], name="scores")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 2, 8, 8]) for y in ("Y1", "Y2")],
                              [c("WA", rng.standard_normal((4, 3, 3, 3)) * 30), c("WB", rng.standard_normal((4, 3, 3, 3)) * 0.3),
                               c("WC", rng.standard_normal((2, 8, 1, 1))), c("WD", rng.standard_normal((2, 4, 1, 1)))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


@pytest.mark.parametrize("base", ["tensorrt", "onnxruntime", "tvm-arm"])
def test_a_shared_quantizer_over_ranges_far_apart_is_split(tmp_path, base):
    """One grid over [-300, 300] and [0, 1] rounds the sigmoid to 0 (Y2 at 0 dB against the float model
    in ORT); split, the concat runs float and the sigmoid keeps its own range (Y2 above 40 dB). The
    model still conforms: a float concat ties nothing."""
    rng = np.random.default_rng(0)
    _two_ranges(tmp_path / "m.onnx", rng)
    np.save(tmp_path / "calib.npy", rng.standard_normal((64, 3, 8, 8)).astype(np.float32))
    runs = {}
    for ratio in ("32", "inf"):
        (tmp_path / "t.toml").write_text(f'extends = "{base}"\nname = "split"\nshare_range_ratio = {ratio}\n')
        target = load_target(str(tmp_path / "t.toml"))
        runs[ratio] = quantize(tmp_path / "m.onnx", target, tmp_path / "calib.npy", PassContext(quiet=True))
        assert not check_model(runs[ratio].model, target).violations
    split, tied = runs["32"], runs["inf"]
    assert tied.sqnr_db["Y2"] < 1.0 and split.sqnr_db["Y2"] > 40.0
    assert split.sqnr_db["Y1"] >= tied.sqnr_db["Y1"] - 0.5
    assert "ranges differ" in split.state.plan.float_nodes["cat"] and "share_range_ratio" in split.state.plan.float_nodes["cat"]
    assert split.state.plan.quantizer_of("B") == "B" and any("split" in n for n in split.state.notes)
