"""`qpass check`: qpass's own output conforms for every target and zoo model; each rule, broken on
purpose in a conforming model, is reported with its rule name and the node's name."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import EXAMPLE, TARGETS, ZOO_NAMES
from qpasses.errors import InputError
from qpasses.pass_infra import PassContext
from qpasses.pipeline import quantize
from qpasses.targets import load_target
from qpasses.targets.check import check_model
from test_cli import assert_one_line_error, qpass


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", ZOO_NAMES)
def test_qpass_output_conforms(quantized, model, target):
    result = check_model(quantized(model, target).model, load_target(target))
    assert result.ok, "\n".join(map(str, result.violations))
    assert result.quantized_edges > 0 and not result.float_layers


@pytest.fixture(scope="module")
def example():
    """The bundled example quantized for each target this module breaks."""
    return {t: quantize(EXAMPLE / "model.onnx", load_target(t), EXAMPLE / "calib.npz", PassContext(quiet=True)).model
            for t in ("tensorrt", "tvm-arm", "onnxruntime")}


def edit(model: onnx.ModelProto, name: str, change) -> onnx.ModelProto:
    """A copy with initializer `name` replaced by change(its array)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init)), name))
            return model
    raise KeyError(name)


def found(model: onnx.ModelProto, target: str) -> set[tuple[str, str]]:
    return {(v.rule, v.node) for v in check_model(model, load_target(target)).violations}


def test_a_nonzero_zero_point(example):
    broken = edit(example["tensorrt"], "/res/res.2/Relu_output_0.zero_point", lambda z: np.int8(3))
    assert found(broken, "tensorrt") == {("zero-point", "/res/res.3/Conv")}


def test_a_weight_outside_the_narrow_range(example):
    """TensorRT weights are [-127, 127]; one weight at -128 steps is -128 after QuantizeLinear."""
    model = example["tensorrt"]
    scale = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "res.0.weight.scale"))

    def push(w):
        w = w.copy()
        w[0, 0, 0, 0] = -128 * scale[0]
        return w

    assert found(edit(model, "res.0.weight.clipped", push), "tensorrt") == {("weight-range", "/res/res.0/Conv")}


def test_scales_not_powers_of_two_and_per_tensor_granularity(example):
    got = found(example["tensorrt"], "tvm-arm")  # per-channel float scales where tvm-arm wants per-tensor pow2
    assert {("pow2", "/res/res.0/Conv"), ("granularity", "/res/res.0/Conv")} <= got


def test_signedness_and_asymmetric_zero_points(example):
    got = found(example["onnxruntime"], "tensorrt")  # uint8 asymmetric activations where int8 symmetric is due
    assert {("signedness", "/res/res.0/Conv"), ("zero-point", "/stem/stem.0/Conv"), ("bias", "/res/res.0/Conv")} <= got


def test_a_qdq_inside_a_supergroup(example):
    """tvm-arm quantizes both Add inputs; on TensorRT the conv's input to the Add must stay float."""
    got = found(example["tvm-arm"], "tensorrt")
    assert ("extra-qdq", "/Add") in got


def test_a_missing_input_qdq(example):
    """A conv whose weight is quantized but whose input is not cannot run in int8."""
    model = onnx.ModelProto.FromString(example["tensorrt"].SerializeToString())
    conv = next(n for n in model.graph.node if n.name == "/res/res.3/Conv")
    dq = next(n for n in model.graph.node if n.output[0] == conv.input[0])
    q = next(n for n in model.graph.node if n.output[0] == dq.input[0])
    conv.input[0] = q.input[0]
    assert ("missing-qdq", "/res/res.3/Conv") in found(model, "tensorrt")


def test_concat_inputs_with_different_scales(example):
    """Concat inputs reference one shared scale; give one of them a scale of its own."""
    model = onnx.ModelProto.FromString(example["tensorrt"].SerializeToString())
    member = "/b1/b1.2/Relu_output_0"
    pair = [n for n in model.graph.node if n.name in (f"{member}.QuantizeLinear", f"{member}.DequantizeLinear")]
    shared = next(i for i in model.graph.initializer if i.name == pair[0].input[1])
    model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(shared) * 2, "own.scale"))
    for node in pair:
        node.input[1] = "own.scale"
    assert found(model, "tensorrt") == {("shared-scale", "/Concat")}


def test_an_int32_bias_with_the_wrong_scale(example):
    broken = edit(example["onnxruntime"], "/res/res.0/Conv.bias.scale", lambda s: (s * 1.5).astype(np.float32))
    assert found(broken, "onnxruntime") == {("bias", "/res/res.0/Conv")}


def test_layers_kept_float_are_listed_not_violations():
    ctx = PassContext(quiet=True, float_layers=("/res/res.3/Conv",))
    model = quantize(EXAMPLE / "model.onnx", load_target("tensorrt"), EXAMPLE / "calib.npz", ctx).model
    result = check_model(model, load_target("tensorrt"))
    assert result.ok and result.float_layers == ["/res/res.3/Conv"]


def test_a_float_model_is_refused():
    with pytest.raises(InputError, match="not a Q/DQ model"):
        check_model(onnx.load(EXAMPLE / "model.onnx"), load_target("tensorrt"))


def test_from_the_command_line(tmp_path, example):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(example["tensorrt"], good)
    onnx.save(example["onnxruntime"], bad)
    ok = qpass("check", good, "--target", "tensorrt")
    assert ok.returncode == 0 and "conforms to tensorrt" in ok.stdout
    fail = qpass("check", bad, "--target", "tensorrt", "--json")
    assert fail.returncode == 1 and fail.stderr.startswith("qpass: error:")
    report = json.loads(fail.stdout)
    assert report["violations"] and all({"rule", "node", "message"} <= set(v) for v in report["violations"])
    assert_one_line_error(qpass("check", EXAMPLE / "model.onnx", "--target", "tensorrt"), 2, "not a Q/DQ model")
