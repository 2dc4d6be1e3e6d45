"""QuantPlan.keep_float: layers kept in float lose exactly their Q/DQ, and all-float is the float model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from conftest import TARGETS
from qpasses.calibration.data import InputSpec, open_source
from qpasses.calibration.runner import run_outputs
from qpasses.pass_infra import PassContext, QuantState
from qpasses.passes.insert_qdq import realize
from qpasses.pipeline import build_pipeline
from qpasses.targets import load_target


def calibrated(zoo_dir, model: str, target_name: str) -> QuantState:
    target = load_target(target_name)
    state = QuantState(graph=gs.import_onnx(onnx.load(zoo_dir / f"{model}.onnx")), target=target)
    ctx = PassContext(data=calib(zoo_dir), quiet=True, batch_size=8)
    build_pipeline(target, stop_after="calibrate")(state, ctx)
    return state


def calib(zoo_dir):
    return open_source(zoo_dir / "calib.npy", [InputSpec("input", ("N", 3, 16, 16), np.dtype(np.float32))])


@pytest.mark.parametrize("target", TARGETS)
def test_every_layer_in_float_is_the_float_model(zoo_dir, target):
    state = calibrated(zoo_dir, "resnet_basic", target)
    plan = state.plan.keep_float(state.plan.layers(), "test")
    model = realize(state.float_model, state.target, plan)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    ref, got = run_outputs(state.float_model, calib(zoo_dir), 8), run_outputs(model, calib(zoo_dir), 8, optimize=False)
    np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-5)


def test_a_float_supergroup_loses_exactly_its_own_qdq(zoo_dir):
    state = calibrated(zoo_dir, "resnet_basic", "tensorrt")
    plan = state.plan
    group = next(g for g in plan.groups if len(g) == 3)  # Conv + Add + Relu
    head = group[0]
    assert plan.layer_of()[group[2]] == head and head in plan.layers()
    mixed = plan.keep_float([head], "test")
    assert head not in mixed.layers() and not set(group) & set(mixed.quantized_nodes)
    assert all(mixed.float_nodes[n] == "test" for n in group)
    assert not any(w.node == head for w in mixed.weights)
    assert all(c[0] not in group for a in mixed.activations.values() for c in a.consumers)
    dropped_edges = sum(c[0] in group for a in plan.activations.values() for c in a.consumers)
    dq = lambda p: sum(n.op_type == "DequantizeLinear" for n in realize(state.float_model, state.target, p).graph.node)  # noqa: E731
    assert dq(plan) - dq(mixed) == dropped_edges + 1  # each dropped input edge, and the weight
    assert plan.keep_float([], "test") is plan
