"""Which layer hurts: per-layer sensitivity, per-tensor ranges, and float fallback (mixed precision).

The debugging flow of the AIMET white paper (sec. 4.6) on one calibration: every variant below
reuses the calibrated qparams and differs only in which layers get Q/DQ (`QuantPlan.keep_float`),
so differences come from quantization alone. A layer is a quantized node, or a whole supergroup
instance (Conv + Add + Relu on TensorRT); the analysis scores units: a weighted layer together with
the layers that only post-process its output (see `_units`). Per unit, on held-back (or
`--eval-data`) samples:

- only_db:     worst-output SQNR with only this unit quantized: the noise it adds by itself;
- all_but_db:  worst-output SQNR with every unit but this one quantized: what keeping it float buys;
- output_db:   SQNR of the unit's output tensor in the fully quantized model: noise accumulated so far.

Fallback keeps units in float, the one whose float copy buys the most first (highest all_but_db),
until the goal holds: worst-output SQNR >= min_sqnr and top-1 drop <= max_drop points, with at
least `min_int8` of the model's conv/matmul MACs still in int8 (a mixed model that meets the
accuracy goal by running mostly float is no int8 model: it does not count). How many
is found by bisection over that ranking (see `_fallback`), not by scoring one more unit at a time. Top-1 is
measured against the data's `labels` when it has them, else as agreement with the float model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from qpasses.calibration.data import DataSource, open_source
from qpasses.calibration.runner import (feed_batch, input_specs, join_batches, observe, reads, run_outputs, session,
                                        with_outputs)
from qpasses.calibration.stats import TensorSummary
from qpasses.errors import InputError
from qpasses.targets.schema import Target

from .metric import TaskMetric
from .ops import WEIGHTED_OPS, node_macs
from .pass_infra import PassContext, QuantState
from .passes.fold_factors import folded
from .passes.insert_qdq import float_output_name, realize
from .pipeline import build_pipeline, prepare, sqnr, sqnr_db
from .plan import QuantPlan
from .report import json_safe


@dataclass(frozen=True)
class Goal:
    min_sqnr: float | None = None  # dB, worst output
    max_drop: float | None = None  # top-1 points
    min_int8: float = 0.8  # share of the model's conv/matmul MACs that must stay int8 for the goal to count
    min_metric: float | None = None  # the --metric function's value


@dataclass
class Score:
    sqnr_db: float  # worst output
    top1: float | None  # percent; None when the first output is not [N, classes]
    metric: float | None = None  # the --metric function's value, when one is given


@dataclass
class LayerReport:
    """One unit (see `_units`), named by its first layer."""

    layer: str
    layers: list[str]  # what fallback keeps in float, as `--float-layer` names them
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
    int8_share: float | None = None  # of the model's conv/matmul MACs, planned int8 in the result
    goal: Goal | None = None
    goal_met: bool | None = None

    def to_json(self) -> dict:
        return json_safe(asdict(self))


class Evaluator:
    """Scores Q/DQ variants of one float model on fixed samples; the float outputs are computed once."""

    def __init__(self, float_model: onnx.ModelProto, data: DataSource, batch_size: int, task: TaskMetric | None = None):
        self.data, self.batch_size, self.task = data, batch_size, task
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

    def score(self, got: list[np.ndarray]) -> Score:
        return Score(min(sqnr(r, g) for r, g in zip(self.reference, got)), self.top1(got),
                     None if self.task is None else self.task(self.reference, got))


@dataclass(frozen=True)
class _Switch:
    """An input that reads a DequantizeLinear: kept while any of `layers` is quantized, rewired to
    `original` (the float tensor or weight) when all of them are kept float. A quantized layer's
    input has its own layer; a float op reading a quantized tensor (where every reader reads the
    dequantized value, `[fusion]` targets) has the layers that keep that tensor quantized."""

    node: int  # index in the realized model's node list
    index: int  # input index
    layers: frozenset[str]
    original: str


@dataclass
class _Cut:
    """One variant as a graph to run: the realized model's nodes it keeps (in order), the inputs
    it rewires to float tensors, and the tensors it reads (model inputs or cached) and outputs."""

    nodes: list[int]
    rewired: dict[int, list[str]]
    inputs: list[str]
    outputs: list[str]
    initializers: list[str]


class Variants:
    """Keep-float variants of one calibrated plan, scored without realizing a model per variant.

    The Q/DQ model is realized once and every quantized input of a layer (activation, weight, int32
    bias) is recorded as a switch; a variant rewires the switches of its float layers to the float
    tensors and drops what no output needs, which is the graph `realize(plan.keep_float(...))`
    builds. A unit's two sensitivity variants differ from the all-float and the all-quantized model
    only in the unit's descendants: the tensors they read from outside that cone are computed once
    for both (`cache`) and fed, so each variant runs only the cone below the unit, op by op."""

    def __init__(self, float_model: onnx.ModelProto, target: Target, plan: QuantPlan, evaluator: Evaluator,
                 units: list[list[str]], tensors: list[str]):
        self.evaluator, self.plan = evaluator, plan
        self.model = realize(float_model, target, plan)
        self.constants: dict[str, onnx.TensorProto] = {}
        self.switches = self._find_switches(float_model)
        self.reads = [reads(node) for node in self.model.graph.node]
        self.graph_inputs = {i.name: i for i in self.model.graph.input}
        self.types = {v.name: v for v in [*self.model.graph.value_info, *self.model.graph.output]}
        self.outputs = [o.name for o in self.model.graph.output]
        # the float graph: its nodes' reads and outputs, named as in the realized model
        alias = {name: float_output_name(name) for name in plan.model_outputs}
        self.float_nodes = [(n.name, {alias.get(r, r) for r in reads(n)}, [alias.get(o, o) for o in n.output if o])
                            for n in float_model.graph.node]
        data, batch_size = evaluator.data, evaluator.batch_size
        batch, fixed = feed_batch(float_model, data, batch_size)
        self.batches = [feeds for feeds in data.batches(batch) if not fixed or len(next(iter(feeds.values()))) == batch]
        everything = set(plan.layers())
        self.cuts = []
        for unit in units:
            available = self._outside(unit)
            self.cuts.append((self._cut(set(unit), available), self._cut(everything - set(unit), available)))
        cached = sorted({*tensors, *(n for pair in self.cuts for cut in pair for n in cut.inputs)} - set(self.graph_inputs))
        self.cache = {quantized: self._run(self._cut(everything if quantized else set(), extra=cached), None)
                      for quantized in (False, True)}

    def _find_switches(self, float_model: onnx.ModelProto) -> list[_Switch]:
        plan, graph = self.plan, self.model.graph
        layer_of, layers = plan.layer_of(), set(plan.layers())
        producer = {o: n for n in graph.node for o in n.output}
        originals = {i.name: i for i in float_model.graph.initializer}
        weights = {(w.node, w.input_index): w.tensor for w in [*plan.weights, *plan.constants]}
        biases = {b.node: b.tensor for b in plan.biases}
        switches = []
        writer = {t: layer_of.get(n, n) for n, t in plan.node_outputs.items()}
        for i, node in enumerate(graph.node):
            layer = layer_of.get(node.name)
            if layer not in layers and node.name not in plan.float_nodes:
                continue
            for idx, name in enumerate(node.input):
                dq = producer.get(name)
                if dq is None or dq.op_type != "DequantizeLinear":
                    continue
                if layer not in layers:  # a float reader: dequantized while the tensor stays quantized
                    q = producer.get(dq.input[0])
                    act = plan.activations.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
                    if act is not None:
                        keepers = {layer_of.get(c, c) for c, _ in act.consumers} & layers
                        if act.written and writer.get(act.tensor) in layers:
                            keepers.add(writer[act.tensor])
                        if keepers:  # else nothing any variant keeps float unquantizes it
                            switches.append(_Switch(i, idx, frozenset(keepers), act.tensor))
                    continue
                tensor = weights.get((node.name, idx))
                if tensor is None and node.name in biases and idx == WEIGHTED_OPS[node.op_type].bias_input:
                    tensor = biases[node.name]
                if tensor is not None:  # a weight or bias: its float original
                    original = f"{tensor}.float"
                    if original not in self.constants:
                        self.constants[original] = onnx.TensorProto()
                        self.constants[original].CopyFrom(originals[tensor])
                        self.constants[original].name = original
                else:  # an activation: what its QuantizeLinear reads
                    q = producer.get(dq.input[0])
                    if q is None or q.op_type != "QuantizeLinear":
                        continue
                    original = q.input[0]
                switches.append(_Switch(i, idx, frozenset([layer]), original))
        return switches

    def _cut(self, quantized: set[str], available: frozenset[str] = frozenset(), extra: list[str] = ()) -> _Cut:
        """The variant with only `quantized` layers quantized, computing the model outputs (and
        `extra` tensors) that are not `available` from those that are."""
        graph = self.model.graph
        rewired: dict[int, list[str]] = {}
        for s in self.switches:
            if not s.layers & quantized:
                rewired.setdefault(s.node, list(graph.node[s.node].input))[s.index] = s.original
        outputs = [o for o in dict.fromkeys([*self.outputs, *extra]) if o not in available]
        needed, keep = set(outputs), []
        for i in reversed(range(len(graph.node))):  # realize() leaves the nodes in topological order
            outs = [o for o in graph.node[i].output if o]
            if not needed.intersection(outs) or available.issuperset(outs):
                continue
            keep.append(i)
            needed.update(self.reads[i] if i not in rewired else
                          {r for r in rewired[i] if r} | (self.reads[i] - set(graph.node[i].input)))
        produced = {o for i in keep for o in graph.node[i].output}
        initializers = [t.name for t in graph.initializer if t.name in needed] + [n for n in self.constants if n in needed]
        inputs = sorted(needed - produced - set(initializers))
        kept = set(keep)
        return _Cut(keep[::-1], {i: r for i, r in rewired.items() if i in kept}, inputs, outputs, initializers)

    def _model(self, cut: _Cut) -> onnx.ModelProto:
        graph = self.model.graph
        nodes = []
        for i in cut.nodes:
            node = graph.node[i]
            if i in cut.rewired:
                node = onnx.NodeProto.FromString(node.SerializeToString())
                node.input[:] = cut.rewired[i]
            nodes.append(node)
        wanted = set(cut.initializers)
        initializers = [t for t in graph.initializer if t.name in wanted] + [t for n, t in self.constants.items() if n in wanted]
        values = [self._input(name) for name in cut.inputs]
        results = [self.types.get(name) or onnx.ValueInfoProto(name=name) for name in cut.outputs]
        return onnx.helper.make_model(onnx.helper.make_graph(nodes, "variant", values, results, initializers),
                                      opset_imports=self.model.opset_import, ir_version=self.model.ir_version)

    def _input(self, name: str) -> onnx.ValueInfoProto:
        """A model input as declared; a cached tensor typed by its values, of any shape."""
        if name in self.graph_inputs:
            return self.graph_inputs[name]
        dtype = onnx.helper.np_dtype_to_tensor_dtype(self.cache[False][0][name].dtype)
        return onnx.helper.make_tensor_value_info(name, dtype, None)

    def _run(self, cut: _Cut, base: bool | None) -> list[dict[str, np.ndarray]]:
        """Per evaluation batch, the model outputs and the cut's outputs, reading the cut's inputs
        from the batch's feeds (and the cache of `base`)."""
        sess = session(self._model(cut), optimize=False)
        results = []
        for n, feeds in enumerate(self.batches):
            known = feeds if base is None else {**feeds, **self.cache[base][n]}
            values = dict(zip(cut.outputs, sess.run(cut.outputs, {name: known[name] for name in cut.inputs})))
            results.append({**{o: known[o] for o in self.outputs if o not in values}, **values})
        return results

    def score(self, runs: list[dict[str, np.ndarray]]) -> Score:
        samples = len(next(iter(self.batches[0].values())))
        return self.evaluator.score(join_batches(self.model, samples, [[run[o] for o in self.outputs] for run in runs]))

    def _outside(self, layers: list[str]) -> frozenset[str]:
        """The model inputs and the float-graph tensors that the layers' nodes neither compute nor feed."""
        seeds = {n for layer in layers for n in self.plan.members(layer)}
        seeds |= {self.model.graph.node[s.node].name for s in self.switches if s.layers & set(layers)}
        affected = _descendants(self.float_nodes, seeds)
        return frozenset(self.graph_inputs) | frozenset(o for _, _, outs in self.float_nodes for o in outs
                                                        if o not in affected)

    def __call__(self, floats: list[str]) -> Score:
        """The score with the `floats` layers in float: only their cone runs, from the quantized cache."""
        quantized = set(self.plan.layers()) - set(floats)
        cut = self._cut(quantized, self._outside(floats))
        if set(cut.inputs) <= set(self.cache[True][0]) | set(self.graph_inputs):
            return self.score(self._run(cut, True))
        return self.score(self._run(self._cut(quantized), None))

    def sensitivity(self, unit: int) -> tuple[Score, Score]:
        """(only the unit's layers quantized, every layer but the unit's quantized)."""
        only, all_but = self.cuts[unit]
        return self.score(self._run(only, False)), self.all_but(unit)

    def all_but(self, unit: int) -> Score:
        """Every layer but the unit's quantized: what keeping the unit float buys (fallback's ranking)."""
        return self.score(self._run(self.cuts[unit][1], True))

    def tensor_db(self, names: list[str]) -> dict[str, float]:
        """SQNR of float-graph tensors in the fully quantized model, against the float model."""
        result = {}
        for name in names:
            total = _NoiseSum()
            for ref, got in zip(self.cache[False], self.cache[True]):
                total.update(ref[name], got[name])
            result[name] = total.db
        return result


def _descendants(float_nodes: list[tuple[str, set[str], list[str]]], members: set[str]) -> set[str]:
    """The float-graph tensors that the member nodes compute or feed."""
    affected: set[str] = set()
    for name, inputs, outs in float_nodes:
        if name in members or inputs & affected:
            affected.update(outs)
    return affected


def tensor_sqnr(reference: onnx.ModelProto, candidate: onnx.ModelProto, names: list[str], data: DataSource,
                batch_size: int) -> dict[str, float]:
    """SQNR of named intermediate tensors of `candidate` (run op by op) against `reference`."""
    ref_sess = session(with_outputs(reference, names))
    got_sess = session(with_outputs(candidate, names), optimize=False)
    sums = {name: _NoiseSum() for name in names}
    batch, fixed = feed_batch(reference, data, batch_size)
    for feeds in data.batches(batch):
        if fixed and len(next(iter(feeds.values()))) != batch:
            break
        for name, r, g in zip(names, ref_sess.run(names, feeds), got_sess.run(names, feeds)):
            sums[name].update(r, g)
    return {name: total.db for name, total in sums.items()}


class _NoiseSum:
    """Signal and noise energy of one tensor summed over batches, streamed."""

    def __init__(self) -> None:
        self.signal = self.noise = 0.0

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        reference = reference.astype(np.float64)
        self.signal += float(np.sum(reference * reference))
        self.noise += float(np.sum((reference - candidate) ** 2))

    @property
    def db(self) -> float:
        return sqnr_db(self.signal, self.noise)


def analyze(model_path: str | Path, target: Target, data: str | Path, ctx: PassContext,
            input_shapes: dict[str, list[int]] | None = None, holdout: int | None = None,
            preprocess: Path | None = None, eval_data: str | Path | None = None,
            goal: Goal | None = None, metric: TaskMetric | None = None) -> tuple[Analysis, onnx.ModelProto]:
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
    evaluate = Evaluator(float_model, held, ctx.batch_size, metric)
    if goal is not None and goal.max_drop is not None and not evaluate.classifier:
        raise InputError("--max-drop needs a classifier (first output [N, classes]); use --min-sqnr")
    tensors = _tensor_reports(plan, float_model, held, ctx)  # before the variants' cache takes its memory
    units = _units(plan, float_model)
    outputs = [plan.layer_output(unit[-1]) for unit in units]
    named = [float_output_name(o) if o in plan.model_outputs else o for o in outputs]
    variants = Variants(float_model, target, plan, evaluate, units, named)
    quantized = variants.score(variants.cache[True])
    output_db = variants.tensor_db(sorted(set(named)))
    ops = {n.name: n.op for n in state.graph.nodes}
    reports = []
    for i in tqdm(range(len(units)), desc="analyzing layers", unit="unit", disable=True if ctx.quiet else None,
                  leave=False):
        nodes = [n for layer in units[i] for n in plan.members(layer)]
        only, all_but = variants.sensitivity(i)
        reports.append(LayerReport(units[i][0], units[i], "+".join(ops[n] for n in nodes), nodes, outputs[i],
                                   only.sqnr_db, all_but.sqnr_db, output_db[named[i]]))
    analysis = Analysis(target.name, plan.calibration_samples, len(evaluate.reference[0]), evaluate.metric,
                        evaluate.top1(evaluate.reference), quantized, reports, tensors,
                        int8_share=int8_share(plan, macs := node_macs(float_model)))
    if goal is None:
        return analysis, variants.model
    analysis.goal = goal
    chosen, result = _fallback([r.layers for r in sorted(reports, key=lambda r: -r.all_but_db)], variants, quantized,
                               lambda score: meets_goal(score, analysis.float_top1, goal))
    mixed_plan = plan.keep_float(chosen, "kept in float by analysis")
    analysis.fallback, analysis.fallback_score = chosen, result
    analysis.int8_share = int8_share(mixed_plan, macs)
    analysis.goal_met = goal_holds(result, analysis.float_top1, analysis.int8_share, goal)
    mixed = realize(float_model, target, mixed_plan)
    return analysis, folded(mixed) if target.fusion else mixed


@dataclass
class Fallback:
    """Float layers chosen for a goal, and the score and int8 share of the mixed model."""

    layers: list[str]
    score: Score
    int8_share: float | None
    met: bool  # the accuracy goal holds, with at least goal.min_int8 of the MACs in int8


def fallbacks(state: QuantState, held: DataSource, goal: Goal, ctx: PassContext,
              metric: TaskMetric | None = None) -> list[Fallback]:
    """Fallback for a calibrated plan (`state` as insert-qdq would start from it): the fewest units
    in float that meet the accuracy goal; when those leave less than goal.min_int8 of the MACs in
    int8, also the best that still counts: units ranked by what their float copy buys per MAC it
    takes from int8 (a depthwise conv, an Add or a small SE conv before a large conv), the fewest
    of them that meet the goal within the rule, else all the rule allows. Units are ranked and
    scored on the float weights of `state.float_model`."""
    plan, float_model = state.plan, state.float_model
    evaluate = Evaluator(float_model, held, ctx.batch_size, metric)
    float_top1 = evaluate.top1(evaluate.reference)
    units = _units(plan, float_model)
    variants = Variants(float_model, state.target, plan, evaluate, units, [])
    all_but = [variants.all_but(i).sqnr_db for i in tqdm(range(len(units)), desc="ranking layers", unit="unit",
                                                                 disable=True if ctx.quiet else None, leave=False)]
    ranked = [units[i] for i in sorted(range(len(units)), key=lambda i: -all_but[i])]
    meets = lambda score: meets_goal(score, float_top1, goal)  # noqa: E731
    macs = node_macs(float_model)
    quantized = variants.score(variants.cache[True])
    layers, score = _fallback(ranked, variants, quantized, meets)
    share = int8_share(plan.keep_float(layers, ""), macs)
    found = [Fallback(layers, score, share, goal_holds(score, float_top1, share, goal))]
    if not mostly_float(share, goal):
        return found
    cost = [sum(macs.get(n, 0) for layer in unit for n in plan.members(layer)) for unit in units]
    helps = [i for i in range(len(units)) if all_but[i] > quantized.sqnr_db]
    cheap = [units[i] for i in sorted(helps, key=lambda i: -(all_but[i] - quantized.sqnr_db) / max(cost[i], 1))]
    prefix = lambda k: [layer for unit in cheap[:k] for layer in unit]  # noqa: E731
    counts = lambda k: not mostly_float(int8_share(plan.keep_float(prefix(k), ""), macs), goal)  # noqa: E731
    if cheap and counts(1):
        lo, hi = 1, len(cheap) + 1  # the share only falls as units go float: the longest prefix that counts
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if counts(mid) else (lo, mid)
        layers, score = _fallback(cheap[:lo], variants, quantized, meets)
        share = int8_share(plan.keep_float(layers, ""), macs)
        found.append(Fallback(layers, score, share, goal_holds(score, float_top1, share, goal)))
    return found


def _fallback(ranked: list[list[str]], variants: Variants, quantized: Score,
              meets: Callable[[Score], bool]) -> tuple[list[str], Score]:
    """The fewest leading units (lists of layers) of `ranked` kept float for which the goal holds
    (all of them when it never does), found by bisection: about log2(units) scored variants instead
    of one per unit. It is the shortest such prefix when keeping more units float never lowers the
    score; otherwise still a prefix that meets the goal, with the one a unit shorter missing it."""
    def layers(k: int) -> list[str]:
        return [layer for unit in ranked[:k] for layer in unit]

    scores = {0: quantized}

    def score(k: int) -> Score:
        if k not in scores:
            scores[k] = variants(layers(k))
        return scores[k]

    lo, hi = 0, len(ranked)
    if meets(score(lo)):
        return layers(lo), score(lo)
    if not meets(score(hi)):
        return layers(hi), score(hi)
    while hi - lo > 1:  # the goal fails with lo units float and holds with hi
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if meets(score(mid)) else (mid, hi)
    return layers(hi), score(hi)


def _units(plan: QuantPlan, float_model: onnx.ModelProto) -> list[list[str]]:
    """The layers scored as one: a layer without weights joins the unit that produces all of its
    quantized inputs, directly or through float ops (a conv's activation, SiLU's or hard-swish's
    Mul, a pool or reshape of one conv's output), so each unit is a weighted layer with what only
    post-processes it, or an op that joins several units (a residual Add, a Concat of branches)."""
    layer_of = plan.layer_of()
    quantized = set(plan.quantized_nodes)
    weighted = {layer_of[w.node] for w in plan.weights}
    quantized_inputs: dict[str, set[str]] = {}
    for act in plan.activations.values():
        for node, _ in act.consumers:
            quantized_inputs.setdefault(layer_of.get(node, node), set()).add(act.tensor)
    origin: dict[str, frozenset] = {i.name: frozenset([None]) for i in float_model.graph.input}
    for node in float_model.graph.node:  # the quantized layers (None: a model input) a tensor comes from through float ops
        here = (frozenset([layer_of[node.name]]) if node.name in quantized else
                frozenset().union(*(origin.get(t, frozenset()) for t in reads(node))))
        origin.update((o, here) for o in node.output)
    unit_of: dict[str | None, int | None] = {None: None}
    units: list[list[str]] = []
    for layer in plan.layers():
        sources = {unit_of.get(source) for t in quantized_inputs.get(layer, ()) for source in origin.get(t, ())}
        if layer in weighted or len(sources) != 1 or None in sources:
            sources = {len(units)}
            units.append([])
        unit_of[layer] = sources.pop()
        units[unit_of[layer]].append(layer)
    return units


def int8_share(plan: QuantPlan, counts: dict[str, int]) -> float | None:
    """The share of the model's conv/matmul MACs (`ops.node_macs`) that `plan` quantizes (None: it has none)."""
    total = sum(counts.values())
    return sum(counts.get(n, 0) for n in plan.quantized_nodes) / total if total else None


def mostly_float(share: float | None, goal: Goal) -> bool:
    """Too little of the conv/matmul work left in int8 for the result to count (a model without any counts)."""
    return share is not None and share < goal.min_int8


def goal_holds(score: Score, float_top1: float | None, share: float | None, goal: Goal) -> bool:
    """The accuracy goal holds and the result counts as int8."""
    return meets_goal(score, float_top1, goal) and not mostly_float(share, goal)


def meets_goal(score: Score, float_top1: float | None, goal: Goal) -> bool:
    ok = goal.min_sqnr is None or score.sqnr_db >= goal.min_sqnr
    if goal.min_metric is not None:
        ok = ok and score.metric is not None and score.metric >= goal.min_metric
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
        return ("" if score.top1 is None else f", top-1 {score.top1:.2f}% (float {a.float_top1:.2f}%, {a.metric})") + \
            ("" if score.metric is None else f", task metric {score.metric:.4g}")

    layers = sum(len(r.layers) for r in a.layers)
    lines = [f"target {a.target}: {layers} quantized layer(s) in {len(a.layers)} unit(s); "
             f"calibrated on {a.calibration_samples} samples, "
             f"measured on {a.evaluation_samples}",
             f"fully quantized: worst-output SQNR {a.quantized.sqnr_db:.1f} dB{top1(a.quantized)}", "",
             f"{'unit (first layer)':32s} {'op':18s} {'only dB':>8s} {'all-but dB':>10s} {'output dB':>9s}"]
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
        share = "" if a.int8_share is None else f"; {100 * a.int8_share:.1f}% of conv/matmul MACs in int8"
        lines.append(f"fallback: goal {verdict} with {len(a.fallback)} layer(s) in float ({kept}): "
                     f"worst-output SQNR {a.fallback_score.sqnr_db:.1f} dB{top1(a.fallback_score)}{share}")
        if mostly_float(a.int8_share, a.goal):
            lines.append(f"  that is below the {100 * a.goal.min_int8:g}% a result needs to count as int8 "
                         "(--min-int8-macs): the accuracy goal holds only with the model mostly float")
    return "\n".join(lines)
