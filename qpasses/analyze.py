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
from .ops import WEIGHTED_OPS
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
        return self.score(got)

    def score(self, got: list[np.ndarray]) -> Score:
        return Score(min(sqnr(r, g) for r, g in zip(self.reference, got)), self.top1(got))


class Variants:
    """Every keep-float variant of one calibrated plan, scored without building a model per variant.

    Each Q/DQ edge of a quantized layer (activation input, weight, int32 bias) is read through
    Where(flag, quantized, float), with one boolean graph input per layer: a variant is a feed. Op
    by op it computes what `realize(plan.keep_float(...))` computes, so the scores are the same.
    A layer's two sensitivity variants differ from the all-float and the all-quantized model only
    from that layer on: the tensors entering it are computed once for both (`_prefixes`) and each
    variant runs only the rest of the graph."""

    def __init__(self, float_model: onnx.ModelProto, target: Target, plan: QuantPlan, evaluator: Evaluator):
        self.evaluator, self.float_model, self.plan = evaluator, float_model, plan
        names = {layer: f"qpass.quantize.{i}" for i, layer in enumerate(plan.layers())}
        self.model, self.flags = _switchable(realize(float_model, target, plan), float_model, plan, names)
        self.sess = session(self.model, optimize=False)
        self.batches = self._batches()
        self.prefix: dict[bool, list[dict[str, np.ndarray]]] | None = None

    def _batches(self) -> list[dict[str, np.ndarray]]:
        data, batch_size = self.evaluator.data, self.evaluator.batch_size
        batch, fixed = feed_batch(self.float_model, data, batch_size)
        return [feeds for feeds in data.batches(batch) if not fixed or len(next(iter(feeds.values()))) == batch]

    def _switches(self, quantized: set[str], names: set[str] | None = None) -> dict[str, np.ndarray]:
        return {flag: np.array(layer in quantized) for layer, flag in self.flags.items() if names is None or flag in names}

    def __call__(self, floats: list[str]) -> Score:
        quantized = set(self.flags) - set(floats)
        return self.evaluator.score(_concat([self.sess.run(None, {**feeds, **self._switches(quantized)})
                                             for feeds in self.batches]))

    def sensitivity(self, layer: str) -> tuple[Score, Score]:
        """(only this layer quantized, every layer but this one quantized)."""
        if self.prefix is None:
            self.prefix = self._prefixes()
        cut, frontier = self._cut(layer)
        sess = session(cut, optimize=False)
        wanted = {i.name for i in sess.get_inputs()}
        scores = []
        for quantized, others in ((False, {layer}), (True, set(self.flags) - {layer})):
            outs = [sess.run(None, {**{n: cache[n] for n in frontier}, **self._switches(others, wanted)})
                    for cache in self.prefix[quantized]]
            scores.append(self.evaluator.score(_concat(outs)))
        return scores[0], scores[1]

    def _prefixes(self) -> dict[bool, list[dict[str, np.ndarray]]]:
        """Every float-graph tensor on the evaluation batches, all layers float and all quantized."""
        names = [o for n in self.float_model.graph.node for o in n.output if o]
        sess = session(with_outputs(self.model, names), optimize=False)
        inputs = {i.name for i in self.float_model.graph.input}
        result = {}
        for quantized in (False, True):
            switches = self._switches(set(self.flags) if quantized else set())
            result[quantized] = [{**{k: v for k, v in feeds.items() if k in inputs},
                                  **dict(zip(names, sess.run(names, {**feeds, **switches})))} for feeds in self.batches]
        return result

    def _cut(self, layer: str) -> tuple[onnx.ModelProto, list[str]]:
        """The switchable model from `layer`'s first node on, fed by the float-graph tensors that cross
        into it; returns the model and those tensors' names."""
        order = [n.name for n in self.float_model.graph.node]
        group = next((g for g in self.plan.groups if g[0] == layer), [layer])
        start = min(order.index(n) for n in group)
        before = {o for n in self.float_model.graph.node[:start] for o in n.output}
        before |= {i.name for i in self.float_model.graph.input}
        graph = gs.import_onnx(self.model)
        tensors = graph.tensors()
        frontier = sorted(name for name in before if name in tensors and isinstance(tensors[name], gs.Variable)
                          and any(c.name not in set(order[:start]) for c in tensors[name].outputs))
        for name in frontier:
            tensors[name].inputs.clear()
        flags = [t for t in graph.inputs if t.name in set(self.flags.values())]
        graph.inputs = [tensors[n] for n in frontier] + flags
        graph.cleanup(remove_unused_graph_inputs=True).toposort()
        return gs.export_onnx(graph), [t.name for t in graph.inputs if t.name in set(frontier)]


def _concat(batches: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [np.concatenate(parts) for parts in zip(*batches)]


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
    score = Variants(float_model, target, plan, evaluate)

    full = realize(float_model, target, plan)
    quantized = evaluate(full)
    outputs = {layer: plan.layer_output(layer) for layer in layers}
    output_db = tensor_sqnr(float_model, full, sorted(set(outputs.values())), held, ctx.batch_size)
    nodes = {n.name: n.op for n in state.graph.nodes}
    members = {g[0]: g for g in plan.groups}
    reports = []
    for layer in tqdm(layers, desc="analyzing layers", unit="layer", disable=True if ctx.quiet else None, leave=False):
        group = members.get(layer, [layer])
        only_score, all_but_score = score.sensitivity(layer)
        only, all_but = only_score.sqnr_db, all_but_score.sqnr_db
        reports.append(LayerReport(layer, "+".join(nodes[n] for n in group), group, outputs[layer], only, all_but,
                                   output_db[outputs[layer]]))
    analysis = Analysis(target.name, plan.calibration_samples, len(evaluate.reference[0]), evaluate.metric,
                        evaluate.top1(evaluate.reference), quantized, reports, _tensor_reports(plan, float_model, held, ctx))
    if goal is None:
        return analysis, full
    analysis.goal = goal
    ranked = sorted(reports, key=lambda r: -r.all_but_db)
    result, chosen = quantized, []
    for report in ranked:
        if _meets(result, analysis.float_top1, goal):
            break
        chosen.append(report.layer)
        result = score(chosen)
    analysis.fallback, analysis.fallback_score = chosen, result
    analysis.goal_met = _meets(result, analysis.float_top1, goal)
    return analysis, variant(chosen)


def _switchable(qdq: onnx.ModelProto, float_model: onnx.ModelProto, plan: QuantPlan,
                names: dict[str, str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """`qdq` with each quantized input of a layer behind Where(flag of the layer, quantized, float);
    returns the model and the flags it reads (layer -> boolean input name)."""
    graph = gs.import_onnx(qdq)
    layer_of = plan.layer_of()
    originals = {i.name: i for i in float_model.graph.initializer}
    constants: dict[str, gs.Constant] = {}
    weights = {(w.node, w.input_index): w.tensor for w in plan.weights}
    biases = {b.node: b.tensor for b in plan.biases}
    flags: dict[str, gs.Variable] = {}
    for node in list(graph.nodes):
        layer = layer_of.get(node.name)
        if layer not in names:
            continue
        for idx, tensor in enumerate(node.inputs):
            if not (isinstance(tensor, gs.Variable) and tensor.inputs and tensor.inputs[0].op == "DequantizeLinear"):
                continue
            name = weights.get((node.name, idx))
            if name is None and node.name in biases and idx == WEIGHTED_OPS[node.op].bias_input:
                name = biases[node.name]
            if name is not None:  # a weight or bias: the float original
                if name not in constants:
                    constants[name] = gs.Constant(f"{name}.float", onnx.numpy_helper.to_array(originals[name]))
                source = constants[name]
            else:  # an activation: what its QuantizeLinear reads
                q = tensor.inputs[0].inputs[0]
                if not (isinstance(q, gs.Variable) and q.inputs and q.inputs[0].op == "QuantizeLinear"):
                    continue
                source = q.inputs[0].inputs[0]
            flag = flags.setdefault(layer, gs.Variable(names[layer], dtype=np.bool_, shape=[]))
            out = gs.Variable(f"{tensor.name}.{node.name}.{idx}.switch", dtype=tensor.dtype, shape=tensor.shape)
            graph.nodes.append(gs.Node("Where", f"{node.name}.switch.{idx}", inputs=[flag, tensor, source], outputs=[out]))
            node.inputs[idx] = out
    graph.inputs += list(flags.values())
    return gs.export_onnx(graph.toposort()), {layer: var.name for layer, var in flags.items()}


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
