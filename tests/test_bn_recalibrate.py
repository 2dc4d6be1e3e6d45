"""BN re-calibration restores the recorded BatchNorm statistics of folded layers under quantization."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import onnx
import pytest
import torch
from torch import nn

from qpasses.calibration.data import InputSpec, open_source
from qpasses.graph import levels
from qpasses.pass_infra import PassContext, QuantState
from qpasses.passes.bias_correct import channel_moments
from qpasses.passes.bn_recalibrate import BNRecalibrate
from qpasses.passes.insert_qdq import realize
from qpasses.pipeline import Techniques, build_pipeline, quantize
from qpasses.targets import load_target


def statistics_error(state: QuantState, ctx: PassContext) -> tuple[float, float]:
    """Worst |mean - beta| / |gamma| and worst |std / |gamma| - 1| over the recorded channels."""
    names = sorted(state.bn_records)
    moments = channel_moments(realize(state.model(), state.target, state.plan), names, ctx, quantized=True)
    mean_err = std_err = 0.0
    for name in names:
        gamma, beta = np.abs(state.bn_records[name]["gamma"]), state.bn_records[name]["beta"]
        mean_err = max(mean_err, float(np.max(np.abs(moments[name].mean() - beta) / gamma)))
        std_err = max(std_err, float(np.max(np.abs(np.sqrt(moments[name].var()) / gamma - 1))))
    return mean_err, std_err


@pytest.mark.parametrize("model, target", [("resnet_basic", "academic"), ("gemm_head", "tensorrt"),
                                           ("mobilenetv2_block", "tvm-arm")])
def test_recorded_statistics_are_restored(zoo_dir, model, target):
    target = load_target(target)
    data = open_source(zoo_dir / "calib.npy", [InputSpec("input", ("N", 3, 16, 16), np.dtype(np.float32))])
    ctx = PassContext(data=data, quiet=True, batch_size=8)
    state = QuantState(graph=gs.import_onnx(onnx.load(zoo_dir / f"{model}.onnx")), target=target)
    build_pipeline(target, stop_after="calibrate")(state, ctx)
    before = statistics_error(state, ctx)
    assert BNRecalibrate()(state, ctx).modified
    after = statistics_error(state, ctx)
    # the zoo's BN statistics are random, so the data misses them widely before; after, what is left
    # comes from re-deriving the ranges at the end (measured: mean <= 4%, std <= 2.4% of |gamma|)
    assert max(before) > 0.3
    assert after[0] < 0.05 and after[1] < 0.03, (before, after)
    assert any("re-estimated" in n for n in state.notes)


def test_no_batchnorm_on_record_is_a_warning(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(tmp_path / "m.onnx"), input_names=["input"], dynamo=False)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    result = quantize(tmp_path / "m.onnx", load_target("academic"), tmp_path / "calib.npy", PassContext(quiet=True),
                      techniques=Techniques(bn_recal=True))
    (decision,) = result.decisions
    assert not decision.applied and not decision.kept
    assert any("no BatchNorm statistics on record" in n for n in result.state.notes)


def test_a_layer_behind_an_if_that_reads_a_layer_comes_a_level_later():
    """x -> conv a -> relu r; an If's branches read r from the enclosing scope; conv b reads the If.
    b depends on a only through the branch, and must still be corrected (and rounded) after it."""
    w = onnx.numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    double = onnx.helper.make_graph([onnx.helper.make_node("Add", ["r", "r"], ["twice"])], "then", [],
                                    [onnx.helper.make_tensor_value_info("twice", onnx.TensorProto.FLOAT, None)])
    nodes = [onnx.helper.make_node("Conv", ["x", "w"], ["a_out"], name="a"),
             onnx.helper.make_node("Relu", ["a_out"], ["r"], name="relu"),
             onnx.helper.make_node("If", ["yes"], ["i"], name="branch", then_branch=double, else_branch=double),
             onnx.helper.make_node("Conv", ["i", "w"], ["y"], name="b")]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 2, 2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [w, onnx.numpy_helper.from_array(np.array(True), "yes")])
    level = levels(gs.import_onnx(onnx.helper.make_model(graph)), {"a", "b"})
    assert (level["a"], level["branch"], level["b"]) == (1, 1, 2)
