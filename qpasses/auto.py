"""Quantize to a goal (`qpass quantize --auto`): try settings until the accuracy goal holds.

Settings are tried in the order of how little they change the model:

1. calibration: the method asked for (`--calib`, minmax by default), then `best` (each quantizer's
   method chosen by its consumers' output error); the better of the two is kept for what follows;
2. techniques: subsets of CLE, SmoothQuant, BN re-calibration, bias correction and AdaRound, one technique
   first, then pairs, and so on (AdaRound last within a size: it is the slow one). A technique
   that finds nothing to do on the model is left out of larger subsets. Subsets, not one
   technique added after another: such a greedy chain can end below one technique alone;
3. float layers: on the best setting so far, the fewest units in float that meet the goal
   (`analyze.fallbacks`). A result with less than `goal.min_int8` of the conv/matmul MACs in
   int8 does not count; then the best that still counts (units ranked by gain per MAC) is tried.

The first setting that meets the goal is the result; when none does, the best one by the goal's
measures is, and the caller exits 1. Trials share work: a trial resumes from the calibrated state
of an earlier one with the same graph before calibration and the same method
(`pipeline.run_trial`), the float model's outputs on the evaluation samples are computed once, and
the technique search leaves out a subset when the time it would take (estimated from the
one-technique trials) does not fit in the budget less a share kept for the fallback.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from itertools import combinations
from typing import Callable

import numpy as np
import onnx

from qpasses.calibration.data import ArraySource, DataSource
from qpasses.calibration.runner import run_outputs
from qpasses.errors import InputError
from qpasses.targets.schema import Target

from .analyze import Evaluator, Goal, fallbacks, goal_holds, int8_share, mostly_float
from .metric import TaskMetric
from .ops import node_macs
from .pass_infra import PassContext, Sequential
from .passes.calibrate import BEST
from .passes.insert_qdq import InsertQDQ
from .pipeline import EXCLUSIVE, TECHNIQUES, QuantizeResult, Snapshots, Techniques, build_pipeline, finish, require_quantized, run_trial, sqnr
from .report import json_safe

DEFAULT_SQNR = 25.0  # dB, worst output: the goal when none is given
DEFAULT_DROP = 2.0  # top-1 points, on a classifier: the goal when none is given
FALLBACK_SHARE = 0.25  # of the time budget, kept for the float-layer search
ADAROUND_ITERATIONS = 250  # unless --adaround-iters says otherwise: most of AdaRound's gain, at a quarter of the time
_NO_SAMPLES: DataSource = ArraySource({}, rows=np.arange(0))  # trials are scored here, not by run_trial


@dataclass
class Trial:
    calibration: str
    techniques: list[str]
    float_layers: list[str]
    sqnr_db: float  # worst output, on the evaluation samples
    top1: float | None  # percent (agreement with the float model when the samples have no labels)
    metric: float | None  # the --metric function's value
    int8_share: float | None  # of the conv/matmul MACs, planned int8
    met: bool  # the goal holds and the result counts as int8
    seconds: float


@dataclass
class Search:
    """What `--auto` tried and chose; `result` is the chosen trial's run."""

    goal: Goal
    default_goal: bool  # no goal was given: `goal` is the default
    budget_s: float
    trials: list[Trial] = field(default_factory=list)
    skipped: list[list[str]] = field(default_factory=list)  # technique subsets the time budget left out
    chosen: int = -1
    result: QuantizeResult | None = None

    @property
    def met(self) -> bool:
        return self.trials[self.chosen].met

    def to_json(self) -> dict:
        return json_safe({"goal": asdict(self.goal), "default_goal": self.default_goal, "budget_s": self.budget_s,
                          "trials": [asdict(t) for t in self.trials], "skipped": self.skipped,
                          "chosen": self.chosen, "met": self.met})


def default_goal(classifier: bool, min_int8: float) -> Goal:
    """--max-drop 2 on a classifier (first output [N, classes]), else --min-sqnr 25."""
    return Goal(max_drop=DEFAULT_DROP, min_int8=min_int8) if classifier else Goal(min_sqnr=DEFAULT_SQNR, min_int8=min_int8)


def search(model: onnx.ModelProto, target: Target, ctx: PassContext, held: DataSource, goal: Goal | None,
           options: Techniques, budget_s: float, say: Callable[[str], None], min_int8: float = Goal.min_int8,
           metric: TaskMetric | None = None) -> Search:
    """The search on a prepared model (`pipeline.prepare`; `ctx.data` holds the calibration samples),
    scored on `held` (with the user's `metric` too, when given). `options` carries the techniques'
    settings (ReLU6, AdaRound iterations), `say` reports each trial, `min_int8` is the int8 rule of
    the default goal."""
    start = time.perf_counter()
    evaluate = Evaluator(model, held, ctx.batch_size, metric)
    float_top1 = evaluate.top1(evaluate.reference)
    if goal is not None and goal.max_drop is not None and not evaluate.classifier:
        raise InputError("--max-drop needs a classifier (first output [N, classes]); use --min-sqnr")
    found = Search(goal or default_goal(evaluate.classifier, min_int8), goal is None, budget_s)
    goal = found.goal
    say(f"auto: goal {describe_goal(goal)}" + (" (the default: no goal was given)" if found.default_goal else ""))
    snapshots: Snapshots = {}
    names = [o.name for o in model.graph.output]
    runs: dict[int, QuantizeResult] = {}  # the best trial's run only: a run holds a model and a calibrated state

    def record(result: QuantizeResult, calibration: str, used: list[str], layers: list[str], began: float) -> Trial:
        got = run_outputs(result.model, held, ctx.batch_size, optimize=False)
        result.sqnr_db = {name: sqnr(r, g) for name, r, g in zip(names, evaluate.reference, got)}
        score = evaluate.score(got)
        share = int8_share(result.state.plan, node_macs(result.float_model))
        trial = Trial(calibration, used, layers, score.sqnr_db, score.top1, score.metric, share,
                      goal_holds(score, float_top1, share, goal),
                      round(time.perf_counter() - began, 2))
        found.trials.append(trial)
        if not runs or _rank(trial, goal) > _rank(found.trials[found.chosen], goal):
            runs.clear()
            runs[len(found.trials) - 1] = result
            found.chosen = len(found.trials) - 1
        say(describe(len(found.trials), trial))
        return trial

    def attempt(calibration: str, used: list[str]) -> Trial:
        began = time.perf_counter()
        deadline = start + budget_s * (1 - FALLBACK_SHARE)  # AdaRound and BRECQ stop there: the budget holds
        result = run_trial(model, target, replace(ctx, calib_method=calibration, deadline=deadline),
                           techniques(options, used), _NO_SAMPLES, snapshots, keep=True)
        require_quantized(result, target)
        applied[tuple(used)] = all(any(r.name == TECHNIQUES[n] and r.modified for r in result.passes) for n in used)
        return record(result, calibration, used, [], began)

    def met() -> bool:
        return found.trials[-1].met

    def fits(seconds: float) -> bool:
        return time.perf_counter() - start + seconds <= budget_s * (1 - FALLBACK_SHARE)

    applied: dict[tuple[str, ...], bool] = {}
    base = attempt(ctx.calib_method, [])
    if not met() and ctx.calib_method != BEST and _rank(attempt(BEST, []), goal) > _rank(base, goal):
        base = found.trials[-1]
    if not met():
        applies, cost = [], {}
        for name in TECHNIQUES:
            if not fits(base.seconds):  # a technique costs at least the trial without it
                found.skipped.append([name])
                continue
            trial = attempt(base.calibration, [name])
            if met():
                break
            if applied[name,]:
                applies.append(name)
                cost[name] = max(trial.seconds - base.seconds, 0.0)
        subsets = [s for size in range(2, len(applies) + 1) for s in combinations(applies, size)
                   if len(EXCLUSIVE & set(s)) < 2] if not met() else []
        for subset in subsets:  # within a size in TECHNIQUES order, so AdaRound's come last
            if not fits(base.seconds + sum(cost[n] for n in subset)):
                found.skipped.append(list(subset))
                continue
            attempt(base.calibration, list(subset))
            if met():
                break
    if not met():
        trial, result = found.trials[found.chosen], runs[found.chosen]
        for option in fallbacks(result.before_qdq, held, goal, replace(ctx, calib_method=trial.calibration), metric):
            began = time.perf_counter()
            mixed = _with_float_layers(model, result, option.layers, techniques(options, trial.techniques), ctx)
            record(mixed, trial.calibration, trial.techniques, option.layers, began)
            if met():
                break
    found.result = runs[found.chosen]  # the first that met the goal (the search stops there), else the best
    found.result.held, found.result.reference, found.result.holdout_samples = held, model, len(held)
    return found


def describe_goal(goal: Goal) -> str:
    """The goal as the options that set it, e.g. "--min-sqnr 25, 80% of MACs in int8"."""
    given = [f"{flag} {value:g}" for flag, value in (("--min-sqnr", goal.min_sqnr), ("--max-drop", goal.max_drop),
                                                     ("--min-metric", goal.min_metric)) if value is not None]
    return ", ".join([*given, f"{100 * goal.min_int8:g}% of MACs in int8"])


def describe(number: int, t: Trial) -> str:
    """One line per trial, as `--auto` prints them."""
    what = ", ".join([t.calibration, *t.techniques]) + (f", {len(t.float_layers)} float layer(s)" if t.float_layers else "")
    top1 = ("" if t.top1 is None else f", top-1 {t.top1:.2f}%") + ("" if t.metric is None else f", metric {t.metric:.4g}")
    share = "" if t.int8_share is None else f", {100 * t.int8_share:.0f}% of MACs int8"
    return (f"auto: trial {number} ({what}): worst-output SQNR {t.sqnr_db:.1f} dB{top1}{share}"
            f"{': goal met' if t.met else ''} ({t.seconds:.1f} s)")


def techniques(options: Techniques, used: list[str]) -> Techniques:
    """`options` with exactly the techniques in `used` switched on (a trial's setting)."""
    return replace(options, cle="cle" in used, smoothquant="smoothquant" in used, bn_recal="bn_recal" in used,
                   adaround="adaround" in used, brecq="brecq" in used,
                   bias_correction=(options.bias_correction or "empirical") if "bias_correction" in used else None)


def _rank(t: Trial, goal: Goal) -> tuple:
    """Higher is better: the goal met, then counting as int8, then the task metric (for a --min-metric
    goal), then top-1 (for a --max-drop goal), then SQNR."""
    metric = t.metric if goal.min_metric is not None and t.metric is not None else 0.0
    top1 = t.top1 if goal.max_drop is not None and t.top1 is not None else 0.0
    return t.met, not mostly_float(t.int8_share, goal), metric, top1, t.sqnr_db


def _with_float_layers(model: onnx.ModelProto, result: QuantizeResult, layers: list[str], techniques: Techniques,
                       ctx: PassContext) -> QuantizeResult:
    """The run's model with `layers` in float: insert-qdq and the passes after it run again on the
    calibrated state, and the float layers get their original weights back (AdaRound rounded them
    for int8)."""
    state = result.before_qdq.snapshot()
    members = {n for layer in layers for n in state.plan.members(layer)}
    originals = {t.name: t for t in state.float_model.graph.initializer}
    tensors = state.graph.tensors()
    for w in state.plan.weights:
        if w.node in members and w.tensor in originals:
            tensors[w.tensor].values = onnx.numpy_helper.to_array(originals[w.tensor])
    state.plan = state.plan.keep_float(layers, "kept in float by --auto")
    passes = build_pipeline(state.target, techniques).passes
    qdq = [p.name for p in passes].index(InsertQDQ.name)
    before = [r for r in result.passes if r.name not in {p.name for p in passes[qdq:]}]
    return finish(model, state, before, Sequential(passes[qdq:]), ctx, _NO_SAMPLES)
