"""Q/DQ models per target and zoo model: the structure each graph rule must produce, and numerics
against the independent fake-quant reference in tests/reference.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import TARGETS, ZOO_NAMES
from models import INPUT_SHAPE
from qpasses.calibration.runner import session
from reference import evaluate

GRAPH_1 = ("academic", "acl")
GRAPH_3 = ("fbgemm", "snpe", "tvm-arm", "onnxruntime")
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
RESIDUAL = ("resnet_basic", "resnet_bottleneck", "mobilenetv2_block", "regnet_group")


class View:
    """Read-only lookups over a Q/DQ model."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def nodes(self, op: str) -> list[onnx.NodeProto]:
        return [n for n in self.model.graph.node if n.op_type == op]

    def op_of(self, tensor: str) -> str | None:
        node = self.producer.get(tensor)
        return node.op_type if node else None

    def axis(self, node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == "axis"), None)

    def weight_dq(self, node: onnx.NodeProto) -> onnx.NodeProto:
        dq = self.producer[node.input[1]]
        assert dq.op_type == "DequantizeLinear"
        return dq


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", ZOO_NAMES)
def test_matches_fake_quant_reference(quantized, model, target):
    result = quantized(model, target)
    x = np.random.default_rng(7).standard_normal((4, *INPUT_SHAPE)).astype(np.float32)
    ref = evaluate(result.float_model, result.state.plan, {"input": x})[0]
    got = session(result.model, optimize=False).run(None, {"input": x})[0]
    session(result.model, optimize=True).run(None, {"input": x})  # the fused int8 path loads and runs too
    diff, peak = np.abs(got - ref), np.abs(ref).max()
    # Tolerance: equal up to float re-association (1e-5 of the output's peak) except where a value
    # sits on a rounding tie and flips one quantization step; such a flip moves a few outputs by < 2%.
    assert np.median(diff) <= 1e-5 * peak
    assert diff.max() <= 2e-2 * peak


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", ZOO_NAMES)
def test_outputs_stay_float_and_weights_are_quantized(quantized, model, target):
    result = quantized(model, target)
    v = View(result.model)
    for out in v.model.graph.output:
        assert v.op_of(out.name) not in ("DequantizeLinear", "QuantizeLinear")
    for node in v.model.graph.node:
        if node.op_type in WEIGHTED and node.name in result.state.plan.quantized_nodes:
            assert v.op_of(node.input[1]) == "DequantizeLinear", node.name


@pytest.mark.parametrize("model", RESIDUAL)
def test_tensorrt_residual_add_quantizes_only_the_skip(quantized, model):
    v = View(quantized(model, "tensorrt").model)
    for add in v.nodes("Add"):
        producers = sorted(v.op_of(i) for i in add.input)
        assert producers == ["Conv", "DequantizeLinear"], (add.name, producers)


@pytest.mark.parametrize("target", GRAPH_3)
@pytest.mark.parametrize("model", RESIDUAL)
def test_graph_3_quantizes_every_add_input(quantized, model, target):
    v = View(quantized(model, target).model)
    for add in v.nodes("Add"):
        assert all(v.op_of(i) == "DequantizeLinear" for i in add.input), add.name


@pytest.mark.parametrize("target", GRAPH_1)
@pytest.mark.parametrize("model", ZOO_NAMES)
def test_graph_1_quantizes_only_conv_and_linear_inputs(quantized, model, target):
    v = View(quantized(model, target).model)
    for dq in v.nodes("DequantizeLinear"):
        for consumer in v.consumers.get(dq.output[0], []):
            assert consumer.op_type in WEIGHTED, (dq.name, consumer.op_type)


@pytest.mark.parametrize("target", [t for t in TARGETS if t not in GRAPH_1])
def test_concat_inputs_share_one_quantizer_and_maxpool_is_not_requantized(quantized, target):
    v = View(quantized("inception_concat", target).model)
    concat = v.nodes("Concat")[0]
    dqs = [v.producer[i] for i in concat.input]
    assert all(dq.op_type == "DequantizeLinear" for dq in dqs)
    assert len({(dq.input[1], dq.input[2]) for dq in dqs}) == 1  # one scale and zero-point initializer
    for pool in v.nodes("MaxPool"):
        dq_in = v.producer[pool.input[0]]
        assert dq_in.op_type == "DequantizeLinear"
        for q in v.consumers.get(pool.output[0], []):
            if q.op_type == "QuantizeLinear":
                assert (q.input[1], q.input[2]) == (dq_in.input[1], dq_in.input[2])


@pytest.mark.parametrize("model", ZOO_NAMES)
def test_tensorrt_quantizer(quantized, model):
    v = View(quantized(model, "tensorrt").model)
    for node in v.nodes("QuantizeLinear") + v.nodes("DequantizeLinear"):
        zp = v.inits[node.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), node.name
    for node in v.model.graph.node:
        if node.op_type not in WEIGHTED:
            continue
        dq = v.weight_dq(node)
        q = v.producer[dq.input[0]]
        assert q.op_type == "QuantizeLinear"  # float weights behind Q/DQ
        w, scale = v.inits[q.input[0]], v.inits[q.input[1]]
        axis = v.axis(dq)
        if node.op_type == "ConvTranspose":
            assert scale.ndim == 0  # no per-channel deconvolution weights in TensorRT
        else:
            expected_axis = 0  # Conv: output channels; torch Linear exports Gemm with transB=1
            assert axis == expected_axis and scale.shape == (w.shape[0],)
        s = scale.reshape(-1, *[1] * (w.ndim - 1)) if scale.ndim else scale
        assert np.rint(w / s).min() >= -127 and np.rint(w / s).max() <= 127  # narrow range


@pytest.mark.parametrize("model, target", [("resnet_bottleneck", "onnxruntime"), ("conv_transpose", "acl")])
def test_weight_and_bias_conventions(quantized, model, target):
    """uint8 activations, symmetric int8 weights per output channel (axis 1 for ConvTranspose), int32
    biases where the target says so."""
    result = quantized(model, target)
    v = View(result.model)
    for q in v.nodes("QuantizeLinear"):
        assert v.inits[q.input[2]].dtype == np.uint8
    weighted = [n for n in v.model.graph.node if n.op_type in WEIGHTED and n.name in result.state.plan.quantized_nodes]
    assert len(weighted) >= 3
    for node in weighted:
        dq = v.weight_dq(node)
        assert v.inits[dq.input[0]].dtype == np.int8 and not v.inits[dq.input[2]].any()
        assert v.axis(dq) == (1 if node.op_type == "ConvTranspose" else 0)
        if target == "onnxruntime":  # acl keeps the bias float
            bias_dq = v.producer[node.input[2]]
            assert bias_dq.op_type == "DequantizeLinear" and v.inits[bias_dq.input[0]].dtype == np.int32


@pytest.mark.parametrize("model", ZOO_NAMES)
def test_tvm_arm_scales_are_powers_of_two(quantized, model):
    v = View(quantized(model, "tvm-arm").model)
    scales = [v.inits[n.input[1]] for n in v.nodes("QuantizeLinear") + v.nodes("DequantizeLinear")]
    assert scales
    for s in scales:
        assert np.all(np.log2(s) == np.round(np.log2(s)))


@pytest.mark.parametrize("model", ["resnet_basic", "mobilenetv2_block"])
def test_no_qdq_inside_supergroups(quantized, model):
    """Conv -> Relu/Clip and Add -> Relu are fused units: the activation reads its producer directly."""
    for target in TARGETS:
        v = View(quantized(model, target).model)
        for node in v.nodes("Relu") + v.nodes("Clip"):
            assert v.op_of(node.input[0]) in ("Conv", "Add", "Gemm"), (target, node.name)

