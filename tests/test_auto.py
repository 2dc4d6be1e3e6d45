"""`qpass quantize --auto`: the search's order, its stopping rule, the int8 rule, and what it writes."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest

from conftest import EXAMPLE
from test_cli import assert_one_line_error, qpass
from qpasses.analyze import Goal
from qpasses.auto import search
from qpasses.calibration.data import open_source
from qpasses.calibration.runner import input_specs, run_outputs
from qpasses.pass_infra import PassContext
from qpasses.pipeline import EXCLUSIVE, TECHNIQUES, Techniques, prepare, quantize
from qpasses.targets import load_target

OPTIONS = Techniques(adaround_iterations=5)  # AdaRound's few steps keep the search a test's length


def run(goal: Goal | None, budget_s: float = 600.0):
    ctx = PassContext(quiet=True, batch_size=64)
    model, _ = prepare(EXAMPLE / "model.onnx", EXAMPLE / "calib.npz", ctx)
    held = open_source(EXAMPLE / "eval.npz", input_specs(model))
    return model, held, search(model, load_target("onnxruntime"), ctx, held, goal, OPTIONS, budget_s, lambda line: None)


@pytest.fixture(scope="module")
def unreachable():
    return run(Goal(min_sqnr=200.0, min_int8=0.7))  # no conv of the example holds over 30% of the MACs


def test_a_goal_the_defaults_meet_is_one_trial_and_the_plain_model():
    model, held, found = run(Goal(min_sqnr=20.0))
    assert len(found.trials) == 1 and found.chosen == 0 and found.met
    assert found.trials[0].calibration == "minmax" and found.trials[0].techniques == [] and not found.trials[0].float_layers
    plain = quantize(EXAMPLE / "model.onnx", load_target("onnxruntime"), EXAMPLE / "calib.npz",
                     PassContext(quiet=True, batch_size=64))
    assert found.result.model.SerializeToString() == plain.model.SerializeToString()


def test_search_order_calibration_then_every_subset_then_float_layers(unreachable):
    _, _, found = unreachable
    trials = found.trials
    assert [(t.calibration, t.techniques) for t in trials[:2]] == [("minmax", []), ("best", [])]
    base = trials[0] if trials[0].sqnr_db > trials[1].sqnr_db else trials[1]
    singles = [t for t in trials if len(t.techniques) == 1 and not t.float_layers]
    assert [t.techniques[0] for t in singles] == list(TECHNIQUES) and all(t.calibration == base.calibration for t in singles)
    applying = [name for name in TECHNIQUES if any(set(t.techniques) > {name} for t in trials)]
    tried = {tuple(t.techniques) for t in trials if len(t.techniques) > 1 and not t.float_layers}
    assert tried == {s for size in range(2, len(applying) + 1) for s in combinations(applying, size)
                     if len(EXCLUSIVE & set(s)) < 2}  # never AdaRound and BRECQ together
    assert len(applying) >= 2 and not found.skipped  # not a greedy chain: every subset of what applies
    mixed = [t for t in trials if t.float_layers]
    assert mixed and not found.met


def test_float_layers_respect_the_int8_rule_and_the_best_is_written(unreachable):
    model, held, found = unreachable
    first, allowed = [t for t in found.trials if t.float_layers]
    assert first.int8_share < 0.7 <= allowed.int8_share  # the goal's own fallback breaks the rule: the most it allows
    assert len(first.float_layers) > len(allowed.float_layers)
    # ranked by what a float copy buys per MAC: the units without MACs that help (the residual Add) go first
    assert allowed.float_layers[0] == "/Add" and allowed.sqnr_db > max(t.sqnr_db for t in found.trials if not t.float_layers)
    counting = [t for t in found.trials if t.int8_share >= 0.7]
    assert found.trials[found.chosen] is max(counting, key=lambda t: t.sqnr_db)
    # the written model is the trial's: its SQNR measured again, independently, in numpy
    ref = run_outputs(model, held, 64)[0].astype(np.float64)
    got = run_outputs(found.result.model, held, 64, optimize=False)[0]
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) == pytest.approx(found.trials[found.chosen].sqnr_db,
                                                                                        abs=1e-6)
    chosen = found.trials[found.chosen]
    assert set(chosen.float_layers) <= set(found.result.state.plan.float_nodes)


def test_cli_says_the_default_goal(tmp_path):
    proc = qpass("quantize", EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", "--auto", "-o", tmp_path / "m.onnx")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("auto: goal --max-drop 2, 80% of MACs in int8 (the default: no goal was given)\n")


def test_default_goal_on_a_classifier_and_the_time_budget():
    _, _, found = run(None, budget_s=1e-3)
    assert found.default_goal and found.goal.max_drop == 2.0 and found.goal.min_sqnr is None
    assert found.met == found.trials[found.chosen].met
    if not found.trials[0].met:  # the budget leaves every subset out
        assert all(len(t.techniques) <= 1 for t in found.trials)


def test_cli_writes_the_best_and_exits_1_when_no_setting_meets_the_goal(tmp_path):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    proc = qpass("quantize", EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", "--auto", "--min-sqnr", "200",
                 "--auto-minutes", "0.001", "--adaround-iters", "5", "-o", out, "--report", report)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("qpass: error: --auto: no setting met the goal (--min-sqnr 200, 80% of MACs in int8)"), last
    assert "auto: trial 1 (minmax): worst-output SQNR" in proc.stderr
    assert proc.stderr.startswith("auto: goal --min-sqnr 200, 80% of MACs in int8\n")
    record = json.loads(report.read_text())
    assert out.exists() and record["auto"]["met"] is False and record["auto"]["trials"]
    chosen = record["auto"]["trials"][record["auto"]["chosen"]]
    assert record["calibration"]["activations"] == chosen["calibration"]
    assert record["fidelity"]["worst_sqnr_db"] == pytest.approx(chosen["sqnr_db"])


def test_cli_refuses_auto_with_a_technique_and_writes_nothing(tmp_path):
    out = tmp_path / "m.onnx"
    proc = qpass("quantize", EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", "--auto", "--cle", "-o", out)
    assert_one_line_error(proc, 2, "--auto chooses the techniques")
    assert not out.exists()
