"""Which layer hurts: per-layer sensitivity, per-tensor ranges, and float fallback (mixed precision).

The debugging flow of the AIMET white paper (sec. 4.6) on one calibration: every variant below
reuses the calibrated qparams and differs only in which layers get Q/DQ (`QuantPlan.keep_float`),
so differences come from quantization alone. A layer is a quantized node, or a whole supergroup
instance (Conv + Add + Relu on TensorRT). Per layer, on held-back (or `--eval-data`) samples:

- only_db:     worst-output SQNR with only this layer quantized: the noise it adds by itself;
- all_but_db:  worst-output SQNR with every layer but this one quantized: what keeping it float buys;
- output_db:   SQNR of the layer's output tensor in the fully quantized model: noise accumulated so far.

Fallback keeps layers in float, the one whose float copy buys the most first (highest all_but_db),
until the goal holds: worst-output SQNR >= min_sqnr and top-1 drop <= max_drop points. Top-1 is
measured against the data's `labels` when it has them, else as agreement with the float model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from qpasses.calibration.data import DataSource, open_source
from qpasses.calibration.runner import feed_batch, input_specs, observe, run_outputs, session, with_outputs
from qpasses.calibration.stats import TensorSummary
from qpasses.errors import InputError
from qpasses.targets.schema import Target

from .pass_infra import PassContext, QuantState
from .passes.insert_qdq import realize
from .pipeline import build_pipeline, prepare, sqnr, sqnr_db
from .plan import QuantPlan
from .report import json_safe


@dataclass(frozen=True)
class Goal:
    min_sqnr: float | None = None  # dB, worst output
    max_drop: float | None = None  # top-1 points


@dataclass
class Score:
    sqnr_db: float  # worst output
    top1: float | None  # percent; None when the first output is not [N, classes]


@dataclass
class LayerReport:
    layer: str
    op_type: str
    nodes: list[str]
    output: str
    only_db: float
    all_but_db: float
    output_db: float


@dataclass
class TensorReport:
    tensor: str
    quantizer: str  # the share anchor whose qparams it uses
    range: tuple[float, float]  # calibrated
    grid: tuple[float, float]  # what the quantizer represents (wider with power-of-two scales)
    scale: float
    zero_point: int
    seen: dict[str, float]  # min, max, mean, std, clipped_fraction on the evaluation samples


@dataclass
class Analysis:
    target: str
    calibration_samples: int
    evaluation_samples: int
    metric: str
    float_top1: float | None
    quantized: Score
    layers: list[LayerReport]
    tensors: list[TensorReport]
    fallback: list[str] = field(default_factory=list)
    fallback_score: Score | None = None
    goal: Goal | None = None
    goal_met: bool | None = None

    def to_json(self) -> dict:
        return json_safe(asdict(self))


class Evaluator:
    """Scores Q/DQ variants of one float model on fixed samples; the float outputs are computed once."""

    def __init__(self, float_model: onnx.ModelProto, data: DataSource, batch_size: int):
        self.data, self.batch_size = data, batch_size
        self.reference = run_outputs(float_model, data, batch_size)
        n = len(self.reference[0]) if self.reference else 0
        first = self.reference[0] if self.reference else np.zeros((0,))
        labels = data.batch_labels()
        self.classifier = first.ndim == 2 and first.shape[1] > 1
        self.labels = labels[:n] if labels is not None else (first.argmax(1) if self.classifier else None)
        self.metric = "top-1 accuracy vs labels" if labels is not None else "top-1 agreement with the float model"

    def top1(self, outputs: list[np.ndarray]) -> float | None:
        if not self.classifier or self.labels is None:
            return None
        return 100.0 * float(np.mean(outputs[0].argmax(1) == self.labels))

    def __call__(self, model: onnx.ModelProto) -> Score:
        got = run_outputs(model, self.data, self.batch_size, optimize=False)
        return Score(min(sqnr(r, g) for r, g in zip(self.reference, got)), self.top1(got))


def tensor_sqnr(reference: onnx.ModelProto, candidate: onnx.ModelProto, names: list[str], data: DataSource,
                batch_size: int) -> dict[str, float]:
    """SQNR of named intermediate tensors of `candidate` (run op by op) against `reference`."""
    ref_sess = session(with_outputs(reference, names))
    got_sess = session(with_outputs(candidate, names), optimize=False)
    signal, noise = np.zeros(len(names)), np.zeros(len(names))
    batch, fixed = feed_batch(reference, data, batch_size)
    for feeds in data.batches(batch):
        if fixed and len(next(iter(feeds.values()))) != batch:
            break
        for i, (r, g) in enumerate(zip(ref_sess.run(names, feeds), got_sess.run(names, feeds))):
            r = r.astype(np.float64)
            signal[i] += float(np.sum(r * r))
            noise[i] += float(np.sum((r - g) ** 2))
    return {n: sqnr_db(float(s), float(e)) for n, s, e in zip(names, signal, noise)}


def analyze(model_path: str | Path, target: Target, data: str | Path, ctx: PassContext,
            input_shapes: dict[str, list[int]] | None = None, holdout: int | None = None,
            preprocess: Path | None = None, eval_data: str | Path | None = None,
            goal: Goal | None = None) -> tuple[Analysis, onnx.ModelProto]:
    """Analyze per layer; with a goal, also choose the float layers. Returns the report and the model
    it describes (fully quantized, or with the fallback layers in float)."""
    model, held = prepare(model_path, data, ctx, input_shapes, holdout, preprocess)
    if eval_data is not None:
        held = open_source(eval_data, input_specs(model), preprocess, ctx.seed)
    if not len(held):
        raise InputError("analysis needs evaluation samples: give --eval-data, or more --data to hold back from")
    state = QuantState(graph=gs.import_onnx(model), target=target)
    build_pipeline(target, stop_after="calibrate")(state, ctx)
    plan, float_model = state.plan, state.float_model
    layers = plan.layers()
    if not layers:
        raise InputError(f"nothing to analyze: target {target.name} quantizes no layer of this model")
    evaluate = Evaluator(float_model, held, ctx.batch_size)
    if goal is not None and goal.max_drop is not None and not evaluate.classifier:
        raise InputError("--max-drop needs a classifier (first output [N, classes]); use --min-sqnr")
    variant = lambda floats: realize(float_model, target, plan.keep_float(floats, "kept in float by analysis"))  # noqa: E731

    full = realize(float_model, target, plan)
    quantized = evaluate(full)
    outputs = {layer: plan.layer_output(layer) for layer in layers}
    output_db = tensor_sqnr(float_model, full, sorted(set(outputs.values())), held, ctx.batch_size)
    nodes = {n.name: n.op for n in state.graph.nodes}
    members = {g[0]: g for g in plan.groups}
    reports = []
    for layer in tqdm(layers, desc="analyzing layers", unit="layer", disable=True if ctx.quiet else None, leave=False):
        group = members.get(layer, [layer])
        only = evaluate(variant([other for other in layers if other != layer])).sqnr_db
        all_but = evaluate(variant([layer])).sqnr_db
        reports.append(LayerReport(layer, "+".join(nodes[n] for n in group), group, outputs[layer], only, all_but,
                                   output_db[outputs[layer]]))
    analysis = Analysis(target.name, plan.calibration_samples, len(evaluate.reference[0]), evaluate.metric,
                        evaluate.top1(evaluate.reference), quantized, reports, _tensor_reports(plan, float_model, held, ctx))
    if goal is None:
        return analysis, full
    analysis.goal = goal
    ranked = sorted(reports, key=lambda r: -r.all_but_db)
    score, chosen = quantized, []
    for report in ranked:
        if _meets(score, analysis.float_top1, goal):
            break
        chosen.append(report.layer)
        score = evaluate(variant(chosen))
    analysis.fallback, analysis.fallback_score = chosen, score
    analysis.goal_met = _meets(score, analysis.float_top1, goal)
    return analysis, variant(chosen)


def _meets(score: Score, float_top1: float | None, goal: Goal) -> bool:
    ok = goal.min_sqnr is None or score.sqnr_db >= goal.min_sqnr
    if goal.max_drop is not None:
        ok = ok and score.top1 is not None and float_top1 is not None and float_top1 - score.top1 <= goal.max_drop
    return bool(ok)


def _tensor_reports(plan: QuantPlan, float_model: onnx.ModelProto, held: DataSource, ctx: PassContext) -> list[TensorReport]:
    grids, summaries = {}, {}
    for name, act in plan.activations.items():
        qp = plan.qparams[act.share]
        scale, zp = float(qp.scale), int(qp.zero_point)
        grids[name] = ((qp.qmin - zp) * scale, (qp.qmax - zp) * scale)
        # a value saturates when it rounds past qmin/qmax, i.e. lies more than half a step outside
        summaries[name] = TensorSummary(grids[name][0] - scale / 2, grids[name][1] + scale / 2)
    observe(float_model, summaries, held, ctx.batch_size, quiet=True, desc="tensor summary")
    reports = []
    for name, act in plan.activations.items():
        qp = plan.qparams[act.share]
        lo, hi = plan.ranges[act.share]
        reports.append(TensorReport(name, act.share, (float(lo), float(hi)), grids[name], float(qp.scale),
                                    int(qp.zero_point), summaries[name].as_dict()))
    return reports


def format_analysis(a: Analysis, tensors_shown: int = 10) -> str:
    """The readable table `qpass analyze` prints; the JSON report holds everything."""
    def top1(score: Score) -> str:
        return "" if score.top1 is None else f", top-1 {score.top1:.2f}% (float {a.float_top1:.2f}%, {a.metric})"

    lines = [f"target {a.target}: {len(a.layers)} quantized layer(s); calibrated on {a.calibration_samples} samples, "
             f"measured on {a.evaluation_samples}",
             f"fully quantized: worst-output SQNR {a.quantized.sqnr_db:.1f} dB{top1(a.quantized)}", "",
             f"{'layer':32s} {'op':18s} {'only dB':>8s} {'all-but dB':>10s} {'output dB':>9s}"]
    for r in a.layers:
        lines.append(f"{r.layer[:32]:32s} {r.op_type[:18]:18s} {r.only_db:8.1f} {r.all_but_db:10.1f} {r.output_db:9.1f}")
    clipped = sorted(a.tensors, key=lambda t: -t.seen["clipped_fraction"])[:tensors_shown]
    lines += ["", f"{'tensor (most clipped first)':32s} {'calibrated range':>22s} {'quantizer grid':>22s} "
                  f"{'seen range':>22s} {'clipped':>8s}"]
    for t in clipped:
        lines.append(f"{t.tensor[:32]:32s} {t.range[0]:10.4g}..{t.range[1]:<10.4g} {t.grid[0]:10.4g}..{t.grid[1]:<10.4g} "
                     f"{t.seen['min']:10.4g}..{t.seen['max']:<10.4g} {100 * t.seen['clipped_fraction']:7.2g}%")
    if a.goal is not None:
        lines.append("")
        verdict = "met" if a.goal_met else "NOT met"
        kept = ", ".join(a.fallback) or "none"
        lines.append(f"fallback: goal {verdict} with {len(a.fallback)} layer(s) in float ({kept}): "
                     f"worst-output SQNR {a.fallback_score.sqnr_db:.1f} dB{top1(a.fallback_score)}")
    return "\n".join(lines)
