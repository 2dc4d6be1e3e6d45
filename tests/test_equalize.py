"""Cross-layer equalization: the float function is unchanged and paired ranges become equal."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
from torch import nn

from models import INPUT_SHAPE, build, export
from qpasses import graph as graph_io
from qpasses.calibration.runner import session
from qpasses.pass_infra import PassContext, QuantState
from qpasses.passes.equalize import Equalize, find_pairs
from qpasses.passes.fold_batchnorm import FoldBatchNorm
from qpasses.targets import load_target


def folded(path) -> QuantState:
    state = QuantState(graph=gs.import_onnx(graph_io.normalize(graph_io.load_model(path))), target=load_target("tvm-arm"))
    FoldBatchNorm()(state, PassContext(quiet=True))
    return state


def run(state: QuantState, x: np.ndarray) -> np.ndarray:
    return session(state.model(), optimize=False).run(None, {"input": x})[0]


class DepthwiseChain(nn.Module):
    """conv -> ReLU -> depthwise -> ReLU -> pointwise: the MobileNet pattern CLE is for."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


@pytest.fixture
def depthwise_model(tmp_path):
    torch.manual_seed(0)
    model = DepthwiseChain().eval()
    with torch.no_grad():  # very unequal channel ranges, as trained depthwise layers have
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.logspace(-2, 1, m.num_features)[torch.randperm(m.num_features)])
    return export(model, tmp_path / "dw.onnx")


@pytest.mark.parametrize("name", ["resnet_basic", "resnet_bottleneck", "depthwise"])
def test_function_is_preserved(tmp_path, depthwise_model, name):
    path = depthwise_model if name == "depthwise" else export(build(name), tmp_path / f"{name}.onnx")
    before, after = folded(path), folded(path)
    assert Equalize()(after, PassContext(quiet=True)).modified
    x = np.random.default_rng(0).standard_normal((4, *INPUT_SHAPE)).astype(np.float32)
    ref, got = run(before, x), run(after, x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())  # float32 re-association


def channel_ranges(conv1, conv2):
    w1, w2 = conv1.inputs[1].values, conv2.inputs[1].values
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    depthwise = conv2.attrs.get("group", 1) > 1
    r2 = np.abs(w2).reshape(w2.shape[0], -1).max(axis=1) if depthwise else np.abs(w2).max(axis=(0, 2, 3))
    return r1, r2


def test_ranges_are_equalized_and_spread_shrinks(depthwise_model):
    state = folded(depthwise_model)
    pairs, _ = find_pairs(state.graph)
    assert len(pairs) == 2
    spread_before = [np.ptp(np.log(channel_ranges(c1, c2)[0])) for c1, c2, _ in pairs]
    Equalize()(state, PassContext(quiet=True))
    for (c1, c2, _), before in zip(pairs, spread_before):
        r1, r2 = channel_ranges(c1, c2)
        np.testing.assert_allclose(r1, r2, rtol=1e-3)  # a chain converges: equal up to the tolerance
        assert np.ptp(np.log(r1)) < before


def test_relu6_pairs_are_skipped_and_reported(tmp_path):
    state = folded(export(build("mobilenetv2_block"), tmp_path / "m.onnx"))
    assert not Equalize()(state, PassContext(quiet=True)).modified
    assert sum("ReLU6" in note for note in state.notes) == 2
    replaced = folded(export(build("mobilenetv2_block"), tmp_path / "m.onnx"))
    assert Equalize(replace_relu6=True)(replaced, PassContext(quiet=True)).modified
    assert not any(n.op == "Clip" for n in replaced.graph.nodes if "block" in n.name and n.name.endswith(("2/Clip", "5/Clip")))


def test_high_bias_is_absorbed_into_the_next_layer(tmp_path):
    """A BN with beta >> 3|gamma| before a ReLU: c = beta - 3|gamma| moves into the 1x1 conv after it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = np.random.default_rng(0).standard_normal((4, *INPUT_SHAPE)).astype(np.float32)
    with torch.no_grad():  # BN statistics chosen so that on x every output lies within beta +- 2|gamma|
        y = model[0](torch.from_numpy(x))
        mean = y.mean(dim=(0, 2, 3))
        model[1].running_mean.copy_(mean)
        model[1].running_var.copy_(((y - mean[:, None, None]).abs().amax(dim=(0, 2, 3)) / 2) ** 2)
        model[1].weight.fill_(0.5)
        model[1].bias.copy_(torch.linspace(4.0, 6.0, 8))
    path = export(model, tmp_path / "hb.onnx")
    state = folded(path)
    relu_out = next(n for n in state.graph.nodes if n.op == "Relu").outputs[0].name

    def min_over_max(s: QuantState) -> np.ndarray:
        from qpasses.calibration.runner import with_outputs
        y = session(with_outputs(s.model(), [relu_out]), optimize=False).run([relu_out], {"input": x})[0]
        return y.min(axis=(0, 2, 3)) / y.max(axis=(0, 2, 3))

    ratio_before, y_before = min_over_max(state), run(state, x)
    Equalize()(state, PassContext(quiet=True))
    # CLE scales a channel's min and max alike; only the absorption moves the ratio: c = beta - 1.5
    # leaves outputs within 1.5 +- 1: min/max falls from 0.61..0.74 to 0.21..0.29 (measured)
    assert np.all(min_over_max(state) < 0.5 * ratio_before)
    np.testing.assert_allclose(run(state, x), y_before, rtol=1e-4, atol=1e-4 * np.abs(y_before).max())
    assert any("absorbed high biases in 1" in n for n in state.notes)
