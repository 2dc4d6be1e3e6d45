"""`qpass analyze`: per-layer sensitivity, tensor summaries, and fallback to float until a goal holds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLE
from test_cli import assert_one_line_error, qpass
from qpasses.analyze import Goal, analyze
from qpasses.ops import node_macs
from qpasses.calibration.stats import TensorSummary
from qpasses.calibration.data import InputSpec, open_source
from qpasses.pass_infra import PassContext, QuantState
from qpasses.passes.insert_qdq import realize
from qpasses.pipeline import build_pipeline, output_sqnr, prepare
from qpasses.targets import load_target


@pytest.fixture(scope="module")
def example_analysis():
    return analyze(EXAMPLE / "model.onnx", load_target("tvm-arm"), EXAMPLE / "calib.npz", PassContext(quiet=True),
                   eval_data=EXAMPLE / "eval.npz", goal=Goal(min_sqnr=34.0, max_drop=0.0, min_int8=0.0))  # the int8 rule: below


def test_fallback_keeps_the_most_harmful_layers_until_the_goal_holds(example_analysis):
    analysis, model = example_analysis
    assert analysis.metric == "top-1 accuracy vs labels" and analysis.evaluation_samples == 497
    assert analysis.quantized.sqnr_db < 34.0 <= analysis.fallback_score.sqnr_db and analysis.goal_met
    ranked = [layer for r in sorted(analysis.layers, key=lambda r: -r.all_but_db) for layer in r.layers]
    assert analysis.fallback == ranked[:len(analysis.fallback)]
    # the returned model is what the report describes: measured again, independently
    eval_data = open_source(EXAMPLE / "eval.npz", [InputSpec("input", ("N", 1, 8, 8), np.dtype(np.float32))])
    float_model = onnx.load(EXAMPLE / "model.onnx")
    db = min(output_sqnr(float_model, model, eval_data, 64).values())
    assert db == pytest.approx(analysis.fallback_score.sqnr_db, abs=1e-3)
    convs = [n for n in model.graph.node if n.name in analysis.fallback and n.op_type == "Conv"]
    assert convs and all(not conv.input[1].endswith(".dq") for conv in convs)  # their weights reach the conv unquantized


def test_the_bisected_fallback_is_the_shortest_prefix_of_the_ranking_that_meets_the_goal():
    """The fallback is bisected over the ranking; the prefix one unit shorter, realized and measured
    independently, must miss the goal (here the SQNR only rises as units go float, so the
    bisection finds the same prefix as scoring one unit more at a time)."""
    target, goal = load_target("tvm-arm"), Goal(min_sqnr=36.0, min_int8=0.0)
    analysis, _ = analyze(EXAMPLE / "model.onnx", target, EXAMPLE / "calib.npz", PassContext(quiet=True),
                          eval_data=EXAMPLE / "eval.npz", goal=goal)
    ranked = sorted(analysis.layers, key=lambda r: -r.all_but_db)
    k = next(i for i in range(len(ranked) + 1) if sum(len(r.layers) for r in ranked[:i]) == len(analysis.fallback))
    assert analysis.goal_met and 1 < k < len(ranked)
    ctx = PassContext(quiet=True)
    model, _ = prepare(EXAMPLE / "model.onnx", EXAMPLE / "calib.npz", ctx)  # the calibration analyze made
    state = QuantState(graph=gs.import_onnx(model), target=target)
    build_pipeline(target, stop_after="calibrate")(state, ctx)
    eval_data = open_source(EXAMPLE / "eval.npz", [InputSpec("input", ("N", 1, 8, 8), np.dtype(np.float32))])
    shorter = [layer for r in ranked[:k - 1] for layer in r.layers]
    model = realize(state.float_model, target, state.plan.keep_float(shorter, "test"))
    assert min(output_sqnr(onnx.load(EXAMPLE / "model.onnx"), model, eval_data, 64).values()) < goal.min_sqnr


def test_sensitivity_of_each_layer_is_measured(example_analysis):
    analysis, _ = example_analysis
    # 13 layers in 9 units: each conv with the pools and reshapes that only read its output
    assert [r.layers for r in analysis.layers][3:8] == [
        ["/Add", "/b3/MaxPool"], ["/b1/b1.0/Conv"], ["/b2/b2.0/Conv"], ["/Concat", "/post/post.0/MaxPool"],
        ["/post/post.1/Conv", "/head/head.0/GlobalAveragePool", "/head/head.1/Flatten"]]
    assert sum(len(r.layers) for r in analysis.layers) == 13 and len(analysis.layers) == 9
    full = analysis.quantized.sqnr_db
    for r in analysis.layers:
        assert np.isfinite([r.only_db, r.all_but_db, r.output_db]).all()
        assert r.only_db > full - 1.0  # one layer's noise alone is (about) no worse than all of it
    first = analysis.layers[0]
    assert first.op_type == "Conv+Relu" and first.nodes[0] == first.layer
    for t in analysis.tensors:  # the grid's edges themselves do not clip; beyond them something does
        inside = t.grid[0] <= t.seen["min"] and t.seen["max"] <= t.grid[1]
        assert (t.seen["clipped_fraction"] == 0) == inside, t


def test_tensor_summary_counts_clipped_values():
    s = TensorSummary(-1.0, 1.0)
    s.update(np.array([-2.0, -1.0, 0.0, 0.5, 3.0]))
    s.update(np.array([[1.0]]))
    got = s.as_dict()
    assert got["min"] == -2.0 and got["max"] == 3.0 and got["clipped_fraction"] == pytest.approx(2 / 6)
    assert got["mean"] == pytest.approx(np.mean([-2, -1, 0, 0.5, 3, 1]))
    assert got["std"] == pytest.approx(np.std([-2, -1, 0, 0.5, 3, 1]))


def test_cli_report_table_and_unreachable_goal(tmp_path):
    report, out = tmp_path / "a.json", tmp_path / "mixed.onnx"
    proc = qpass("analyze", EXAMPLE / "model.onnx", "--target", "snpe", "--data", EXAMPLE / "calib.npz",
                 "--report", report, "--fallback", "--min-sqnr", "500", "-o", out, "-q")
    assert proc.returncode == 1 and "fallback goal not met" in proc.stderr.strip().splitlines()[-1]
    data = json.loads(report.read_text())
    assert data["goal_met"] is False and len(data["fallback"]) == sum(len(r["layers"]) for r in data["layers"])
    assert float(data["fallback_score"]["sqnr_db"]) > 100 and out.exists()  # all float: exact up to float re-association
    assert "only dB" in proc.stdout and "fallback: goal NOT met" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--fallback"], "--fallback needs a goal"),
    (["--min-sqnr", "30"], "go with --fallback"),
    (["--fallback", "--max-drop", "1", "--eval-data", "EVAL_NOLABEL"], None),
])
def test_cli_bad_options(tmp_path, args, message):
    args = [str(tmp_path / "x.npz") if a == "EVAL_NOLABEL" else a for a in args]
    if message is None:  # --max-drop works without labels too: agreement with the float model
        np.savez(tmp_path / "x.npz", input=np.load(EXAMPLE / "eval.npz")["input"][:64])
        proc = qpass("analyze", EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", *args, "-o", tmp_path / "m.onnx", "-q")
        assert proc.returncode == 0 and "agreement with the float model" in proc.stdout, proc.stderr
        return
    assert_one_line_error(qpass("analyze", EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", *args), 2, message)


def test_quantize_unknown_float_layer_is_one_line(tmp_path):
    proc = qpass("quantize", EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", "--float-layer", "nope",
                 "-o", tmp_path / "x.onnx")
    assert_one_line_error(proc, 2, "--float-layer nope")
    assert not (tmp_path / "x.onnx").exists()


def test_a_value_on_the_grid_edge_is_not_clipped():
    """academic: the input's range is [-1, 1] = its grid; values at 1.0 round to qmax, they do not clip."""
    analysis, _ = analyze(EXAMPLE / "model.onnx", load_target("academic"), EXAMPLE / "calib.npz", PassContext(quiet=True))
    first = analysis.tensors[0]
    assert first.tensor == "input" and first.seen["max"] == pytest.approx(first.grid[1], rel=1e-6)
    assert first.seen["clipped_fraction"] == 0


def branchy_net(tmp_path) -> Path:
    """conv -> relu feeds an `If` that reads it from the enclosing scope, then a second conv; the
    other branch of the conv output is a model output of its own (quantized on the custom target)."""
    rng = np.random.default_rng(3)
    then = helper.make_graph([helper.make_node("Mul", ["r", "two"], ["picked"])], "then", [],
                             [helper.make_tensor_value_info("picked", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["r"], ["picked_else"])], "else", [],
                              [helper.make_tensor_value_info("picked_else", TensorProto.FLOAT, None)])
    inits = [numpy_helper.from_array(v, name) for name, v in [
        ("w1", (rng.standard_normal((4, 1, 3, 3)) * 0.4).astype(np.float32)), ("b1", rng.standard_normal(4).astype(np.float32)),
        ("w2", (rng.standard_normal((3, 4, 1, 1)) * 0.4).astype(np.float32)), ("two", np.float32(2.0))]]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu1"),
             helper.make_node("If", ["yes"], ["i"], name="branch", then_branch=then, else_branch=other),
             helper.make_node("Conv", ["i", "w2"], ["out"], name="conv2"),
             helper.make_node("MaxPool", ["r"], ["pooled"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    graph = helper.make_graph(nodes, "branchy", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8]),
                                                 helper.make_tensor_value_info("yes", TensorProto.BOOL, [])],  # run time
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, 8, 8]),
                               helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 4, 4, 4])], inits)
    path = tmp_path / "branchy.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def hard_swish_net(tmp_path) -> Path:
    """conv -> x * HardSigmoid(x) -> conv -> Div -> conv -> Flatten: on onnxruntime the float
    HardSigmoid, Div and Flatten read their convs' dequantized outputs."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.4).astype(np.float32), name)
             for name, shape in (("w1", (4, 1, 3, 3)), ("w2", (4, 4, 3, 3)), ("w3", (2, 4, 1, 1)))]
    inits.append(numpy_helper.from_array(np.float32(3.0), "three"))
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("HardSigmoid", ["c1"], ["g"], name="hsig"),
             helper.make_node("Mul", ["c1", "g"], ["h"], name="hswish"),
             helper.make_node("Conv", ["h", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Div", ["c2", "three"], ["d"], name="scale"),
             helper.make_node("Conv", ["d", "w3"], ["c3"], name="conv3"),
             helper.make_node("Flatten", ["c3"], ["out"], name="flat")]
    graph = helper.make_graph(nodes, "hswish", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 128])], inits)
    path = tmp_path / "hswish.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.mark.parametrize("case", ["example on tvm-arm", "If and quantized outputs", "float readers of quantized tensors"])
def test_each_unit_scores_as_the_model_realized_with_it_alone_or_without_it(tmp_path, case):
    """The scores come from cut, rewired copies of one Q/DQ model; realize each variant as a whole
    model and score it the plain way: the same numbers."""
    if case == "example on tvm-arm":
        path, data, target = EXAMPLE / "model.onnx", EXAMPLE / "calib.npz", load_target("tvm-arm")
    else:
        path, data = (branchy_net if case.startswith("If") else hard_swish_net)(tmp_path), tmp_path / "calib.npz"
        np.savez(data, input=np.random.default_rng(4).standard_normal((40, 1, 8, 8)).astype(np.float32), yes=np.ones(40, bool))
        target = dataclasses.replace(load_target("onnxruntime"), quantize_model_output=case.startswith("If"),
                                     float_tail=not case.startswith("If"))  # the MaxPool writes a quantized output
    ctx = PassContext(quiet=True)
    analysis, _ = analyze(path, target, data, ctx)
    model, held = prepare(path, data, ctx)
    state = QuantState(graph=gs.import_onnx(model), target=target)
    build_pipeline(target, stop_after="calibrate")(state, ctx)
    plan = state.plan
    if case.startswith("If"):
        assert plan.model_outputs and "branch" in plan.float_nodes and len(analysis.layers) >= 2
    if case.startswith("float readers"):
        readers = {c for act in plan.activations.values() for c, _ in act.consumers}
        assert {"hsig", "scale", "flat"} <= readers and {"conv1", "conv2", "conv3"} <= set(plan.quantized_nodes)
    everything = set(plan.layers())
    for r in analysis.layers:
        for floats, got in ((everything - set(r.layers), r.only_db), (set(r.layers), r.all_but_db)):
            variant = realize(state.float_model, target, plan.keep_float(floats, "test"))
            want = min(output_sqnr(state.float_model, variant, held, 16).values())
            assert got == pytest.approx(want, abs=1e-3), (r.layers, floats)


def test_a_goal_met_only_by_running_mostly_float_does_not_count(tmp_path):
    """Mixed precision stays int8: a fallback that reaches the accuracy goal with less than
    `min_int8` of the conv/matmul MACs in int8 is reported as not meeting it (exit 1, with why)."""
    strict = Goal(min_sqnr=45.0)  # reachable only with nearly every layer float
    analysis, model = analyze(EXAMPLE / "model.onnx", load_target("tvm-arm"), EXAMPLE / "calib.npz",
                              PassContext(quiet=True), eval_data=EXAMPLE / "eval.npz", goal=strict)
    assert analysis.fallback_score.sqnr_db >= strict.min_sqnr and analysis.int8_share < strict.min_int8
    assert analysis.goal_met is False
    int8_macs = sum(m for n, m in node_macs(model).items() if any(i.endswith(".dq") for i in
                    next(x for x in model.graph.node if x.name == n).input[1:2]))
    assert int8_macs / sum(node_macs(onnx.load(EXAMPLE / "model.onnx")).values()) == pytest.approx(analysis.int8_share)
    lenient = analyze(EXAMPLE / "model.onnx", load_target("tvm-arm"), EXAMPLE / "calib.npz", PassContext(quiet=True),
                      eval_data=EXAMPLE / "eval.npz", goal=dataclasses.replace(strict, min_int8=0.0))[0]
    assert lenient.goal_met and lenient.fallback == analysis.fallback
    proc = qpass("analyze", EXAMPLE / "model.onnx", "--target", "tvm-arm", "--data", EXAMPLE / "calib.npz",
                 "--eval-data", EXAMPLE / "eval.npz", "--fallback", "--min-sqnr", "45", "-o", tmp_path / "m.onnx", "-q")
    assert proc.returncode == 1 and "conv/matmul MACs in int8 (< --min-int8-macs 80)" in proc.stderr.splitlines()[-1]
    assert "needs to count as int8" in proc.stdout
