"""Empirical bias correction removes the measured per-channel mean error of conv outputs."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from models import export
from qpasses.calibration.data import InputSpec, open_source
from qpasses.passes.bias_correct import expected_relu

from qpasses.calibration.runner import observe
from qpasses.pass_infra import PassContext
from qpasses.calibration.stats import ChannelMoments
from qpasses.pipeline import Techniques, quantize
from qpasses.targets import load_target


def mean_errors(result, zoo_dir) -> dict[str, np.ndarray]:
    """|E[y_float] - E[y_quant]| per channel for every corrected layer output, on the calibration data."""
    from qpasses.calibration.data import InputSpec, open_source

    source = open_source(zoo_dir / "calib.npy", [InputSpec("input", ("N", 3, 16, 16), np.dtype(np.float32))])
    names = [n.output[0] for n in result.float_model.graph.node if n.op_type in ("Conv", "Gemm")]
    out = {}
    for model in (result.float_model, result.model):
        means = {name: ChannelMoments() for name in names}
        observe(model, means, source, 8, quiet=True, optimize=model is result.float_model)
        out[id(model)] = {k: m.mean() for k, m in means.items()}
    ref, got = out[id(result.float_model)], out[id(result.model)]
    return {k: np.abs(ref[k] - got[k]) for k in names}


@pytest.mark.parametrize("target", ["academic", "tvm-arm"])  # a float bias and an int32 bias
def test_every_layer_mean_error_vanishes(zoo_dir, target):
    """Level by level, each layer is corrected behind the corrections upstream, and nothing after it
    changes its output: so every layer's mean error vanishes, down to the step of an int32 bias
    (s_x * s_w), which no correction can split. (Correcting all layers from one measurement
    corrects the upstream part twice: the deeper the layer, the worse.)"""
    run = lambda bc: quantize(zoo_dir / "resnet_basic.onnx", load_target(target), zoo_dir / "calib.npy",  # noqa: E731
                              PassContext(quiet=True), holdout=0, techniques=Techniques(bias_correction="empirical" if bc else None))
    corrected = run(True)
    before, after = mean_errors(run(False), zoo_dir), mean_errors(corrected, zoo_dir)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in corrected.model.graph.initializer}
    producer = {o: n for n in corrected.model.graph.node for o in n.output}
    assert len(after) >= 4
    for node in (n for n in corrected.model.graph.node if n.output[0] in after):
        bias = producer.get(node.input[2])
        step = inits[bias.input[1]] if bias is not None and bias.op_type == "DequantizeLinear" else 0.0
        assert np.all(after[node.output[0]] <= step / 2 + 1e-5 * (1 + before[node.output[0]].max())), node.name
    assert sum(a.mean() for a in after.values()) < 0.2 * sum(b.mean() for b in before.values())


def test_a_technique_that_hurts_is_dropped_and_one_that_does_not_apply_is_said(zoo_dir):
    result = quantize(zoo_dir / "mobilenetv2_block.onnx", load_target("tvm-arm"), zoo_dir / "calib.npy",
                      PassContext(quiet=True), techniques=Techniques(cle=True, bias_correction="empirical"))
    cle, bc = result.decisions
    assert not cle.applied and not cle.kept and any("ReLU6" in n for n in result.state.notes)
    assert bc.applied and bc.kept == (bc.after_db >= bc.before_db)
    assert result.score_db == pytest.approx(max(bc.before_db, bc.after_db))


def test_expected_relu_matches_sampling():
    mu, sigma = np.array([-1.0, 0.0, 0.5, 3.0]), np.array([0.5, 1.0, 2.0, 0.3])
    samples = np.random.default_rng(0).normal(mu, sigma, size=(400_000, 4))
    np.testing.assert_allclose(expected_relu(mu, sigma), np.maximum(samples, 0).mean(axis=0), atol=5e-3)


class BnChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.b(self.a(x))


def test_analytic_correction_removes_the_weight_error_shift_without_data(tmp_path):
    """BN statistics that match the data: the second conv's mean shift is predicted from them alone."""
    torch.manual_seed(0)
    model = BnChain().eval()
    x = np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        for bn, pre in ((model.a[1], model.a[0]), (model.b[1], lambda t: model.b[0](model.a(t)))):
            y = pre(torch.from_numpy(x))
            bn.running_mean.copy_(y.mean(dim=(0, 2, 3)))
            bn.running_var.copy_(y.var(dim=(0, 2, 3)))
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 1.0)
        model.b[0].weight.mul_(torch.logspace(-1, 1, 16)[:, None, None])  # unequal input channels: per-tensor rounding hurts
    export(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", x)
    run = lambda bc: quantize(tmp_path / "m.onnx", load_target("academic"), tmp_path / "x.npy",  # noqa: E731
                              PassContext(quiet=True), holdout=0, techniques=Techniques(bias_correction=bc))
    corrected = run("analytic")
    assert any("1 layer(s) analytic" in n for n in corrected.state.notes)
    source = open_source(tmp_path / "x.npy", [InputSpec("input", ("N", 3, 16, 16), np.dtype(np.float32))])
    second = [n.output[0] for n in corrected.float_model.graph.node if n.op_type == "Conv"][1]
    errors = []
    for result in (run(None), corrected):
        means = {}
        for model_ in (result.float_model, result.model):
            m = {second: ChannelMoments()}
            observe(model_, m, source, 16, quiet=True, optimize=model_ is result.float_model)
            means[id(model_)] = m[second].mean()
        errors.append(np.abs(means[id(result.float_model)] - means[id(result.model)]))
    before, after = errors
    assert after.mean() < 0.5 * before.mean()  # measured: 0.0168 -> 0.0016
