"""From a target and options to the pass sequence, and the `quantize` entry point.

The sequence is the same for every target; what differs is data in the target file (e.g.
`fold_batchnorm`), never an `if target == ...` here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qpasses.calibration.data import ArraySource, DataSource, open_source
from qpasses.calibration.runner import check_loads, input_specs, run_outputs
from qpasses.errors import CalibrationError, InputError, UnsupportedModelError
from qpasses.targets.schema import Target

from . import graph as graph_io
from .pass_infra import Pass, PassContext, PassResult, QuantState, Sequential
from .passes.annotate import Annotate
from .passes.adaround import AdaRound, AdaRoundConfig
from .passes.bias_correct import BiasCorrect
from .passes.bn_recalibrate import BNRecalibrate
from .passes.brecq import BlockReconstruct
from .passes.calibrate import Calibrate
from .passes.decompose import Decompose
from .passes.equalize import Equalize
from .passes.fold_factors import FoldScalarFactors
from .passes.fold_batchnorm import FoldBatchNorm
from .passes.insert_qdq import InsertQDQ
from .passes.preoptimize import Preoptimize
from .passes.smoothquant import SmoothQuant

ALL_PASSES: tuple[type[Pass], ...] = (FoldBatchNorm, Preoptimize, Equalize, SmoothQuant, Decompose, Annotate, Calibrate,
                                       BNRecalibrate, AdaRound, BlockReconstruct, InsertQDQ, BiasCorrect, FoldScalarFactors)
# technique -> its pass, tried in this order: cheap first, AdaRound (the slow one) last, so it runs once
TECHNIQUES = {"cle": Equalize.name, "smoothquant": SmoothQuant.name, "bn_recal": BNRecalibrate.name,
              "bias_correction": BiasCorrect.name, "adaround": AdaRound.name, "brecq": BlockReconstruct.name}
EXCLUSIVE = {"adaround", "brecq"}  # two ways of choosing the same roundings: never both


@dataclass(frozen=True)
class Techniques:
    """The accuracy-recovery techniques a run asks for (each is a pass switched on)."""

    cle: bool = False
    cle_replace_relu6: bool = False
    smoothquant: bool = False
    bn_recal: bool = False
    bias_correction: str | None = None  # "empirical" | "analytic"
    adaround: bool = False
    brecq: bool = False
    adaround_iterations: int = AdaRoundConfig.iterations  # AdaRound's per layer, BRECQ's per block


@dataclass(frozen=True)
class Decision:
    """Whether a requested technique was kept: it must not lower the held-back output SQNR."""

    technique: str
    applied: bool  # False: the technique found nothing to do on this model (see the notes for why)
    before_db: float
    after_db: float
    kept: bool


def build_pipeline(target: Target, techniques: Techniques = Techniques(), stop_after: str | None = None) -> Sequential:
    """The pass sequence; `stop_after` ends it early (e.g. after "calibrate", for analysis)."""
    passes: list[Pass] = [FoldBatchNorm()] if target.fold_batchnorm else []
    if target.fusion and target.fusion.preoptimize:
        passes.append(Preoptimize())
    if techniques.cle:
        passes.append(Equalize(replace_relu6=techniques.cle_replace_relu6))
    if techniques.smoothquant:
        passes.append(SmoothQuant())
    if target.fusion and target.fusion.decompose:
        passes.append(Decompose())
    passes += [Annotate(), Calibrate()]
    if techniques.bn_recal:
        passes.append(BNRecalibrate())
    if techniques.brecq:
        passes.append(BlockReconstruct(iterations=techniques.adaround_iterations))
    elif techniques.adaround:
        passes.append(AdaRound(iterations=techniques.adaround_iterations))
    passes.append(InsertQDQ())
    if techniques.bias_correction:
        passes.append(BiasCorrect(techniques.bias_correction))
    if target.fusion:
        passes.append(FoldScalarFactors())
    names = [p.name for p in passes]
    return Sequential(passes[:names.index(stop_after) + 1] if stop_after in names else passes)


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    float_model: onnx.ModelProto  # the float graph the plan refers to (folded, equalized)
    state: QuantState
    passes: list[PassResult]
    calib_samples: int
    holdout_samples: int
    sqnr_db: dict[str, float] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    held: DataSource | None = None  # the held-back samples sqnr_db was measured on
    reference: onnx.ModelProto | None = None  # the float model as given (normalized), sqnr_db's reference
    before_qdq: QuantState | None = None  # the state insert-qdq started from, when the run was asked to keep it

    @property
    def score_db(self) -> float:
        """The worst output's SQNR: what a technique must not lower."""
        return min(self.sqnr_db.values()) if self.sqnr_db else float("nan")


Snapshots = dict[tuple[str, ...], tuple[QuantState, list[PassResult]]]  # (calib method, passes) -> state after calibrate


def holdout_size(n: int) -> int:
    """Samples held back from calibration to measure fidelity: 1/8 of the data, at most 64."""
    return min(64, n // 8) if n >= 8 else 0


def prepare(model_path: str | Path, data: str | Path | None, ctx: PassContext,
            input_shapes: dict[str, list[int]] | None = None, holdout: int | None = None,
            preprocess: Path | None = None) -> tuple[onnx.ModelProto, DataSource]:
    """Load and normalize the model; split the data into calibration (`ctx.data`) and held-back samples.

    Dynamic input sizes not given in `input_shapes` are taken from the data when its arrays agree."""
    raw = graph_io.load_model(model_path)
    graph_io.refuse_quantized(raw)  # before reading any data: the model itself is the problem
    source: DataSource | None = open_source(data, input_specs(raw), preprocess, ctx.seed) if data is not None else None
    given = input_shapes or {}
    shapes = {**(shapes_from_data(raw, source, set(given)) if source is not None else {}), **given}
    model = graph_io.normalize(raw, shapes)
    check_loads(model, str(model_path))
    held: DataSource = ArraySource({}, rows=np.arange(0))
    if source is not None:
        if holdout is not None and holdout >= len(source):
            raise InputError(f"--holdout {holdout} leaves nothing to calibrate on: --data has {len(source)} "
                             f"sample(s); hold back fewer, or give --eval-data")
        n_hold = holdout_size(len(source)) if holdout is None else holdout
        source, held = source.split(n_hold)
    ctx.data = source
    return model, held


def shapes_from_data(model: onnx.ModelProto, source: DataSource, given: frozenset[str] | set[str] = frozenset()) -> dict[str, list]:
    """The sizes of the model's dynamic non-batch dimensions, read off the calibration arrays
    (inputs in `given` are sized by --input-shape instead)."""
    found = source.sample_shapes()
    whole = getattr(source, "whole", frozenset())  # only arrays can hold whole feeds
    shapes = {}
    for spec in input_specs(model):
        if spec.name in given or all(isinstance(d, int) and d > 0 for d in spec.shape[1:]) or spec.name not in found:
            continue
        if len(found[spec.name]) > 1:
            raise CalibrationError(f"input {spec.name} has dynamic dimensions and the calibration arrays have "
                                   f"different shapes ({', '.join(sorted(map(str, found[spec.name])))}): "
                                   f"give its sizes with --input-shape")
        sample = next(iter(found[spec.name]))
        shapes[spec.name] = list(sample) if spec.name in whole else [spec.shape[0], *sample]
    return shapes


def quantize(model_path: str | Path, target: Target, data: str | Path | None, ctx: PassContext,
             input_shapes: dict[str, list[int]] | None = None, holdout: int | None = None,
             preprocess: Path | None = None, techniques: Techniques = Techniques()) -> QuantizeResult:
    """Quantize a model; each requested technique is kept only if it does not lower the SQNR."""
    model, held = prepare(model_path, data, ctx, input_shapes, holdout, preprocess)
    accepted = Techniques(cle_replace_relu6=techniques.cle_replace_relu6,
                          adaround_iterations=techniques.adaround_iterations)
    snapshots: Snapshots = {}
    best = run_trial(model, target, ctx, accepted, held, snapshots)
    require_quantized(best, target)
    decisions: list[Decision] = []
    why: list[str] = []
    for name, pass_name in TECHNIQUES.items():
        if not getattr(techniques, name):
            continue
        candidate = replace(accepted, **{name: getattr(techniques, name)})
        trial = run_trial(model, target, ctx, candidate, held, snapshots)
        applied = any(r.name == pass_name and r.modified for r in trial.passes)
        kept = applied and (not len(held) or trial.score_db >= best.score_db)
        decisions.append(Decision(name, applied, best.score_db, trial.score_db, kept))
        if kept:
            best, accepted = trial, candidate
        elif not applied:  # keep the reasons it did not apply
            why.extend(n for n in trial.state.notes if n not in best.state.notes)
    best.decisions, best.held, best.reference = decisions, held, model
    best.state.notes.extend(n for n in why if n not in best.state.notes)
    return best


def require_quantized(result: QuantizeResult, target: Target) -> None:
    if not result.state.plan.quantized_nodes:
        reasons = Counter(result.state.plan.float_nodes.values())
        why = "; ".join(f"{n} node(s): {reason}" for reason, n in reasons.most_common()) or "the model has no nodes"
        raise UnsupportedModelError(f"nothing to quantize for target {target.name}: every node stays float ({why})")


def run_trial(model: onnx.ModelProto, target: Target, ctx: PassContext, techniques: Techniques, held: DataSource,
              snapshots: Snapshots, keep: bool = False) -> QuantizeResult:
    """Run the pipeline; a trial resumes from the state after calibration when an earlier run got there
    with the same passes and calibration method, so trying a later technique does not calibrate
    again. `keep`: also keep the state insert-qdq starts from (`before_qdq`)."""
    passes = build_pipeline(target, techniques).passes
    names = tuple(p.name for p in passes)
    start = names.index(Calibrate.name) + 1
    key = (ctx.calib_method, *names[:start])
    if key in snapshots:
        saved, results = snapshots[key]
        state, results = saved.snapshot(), list(results)
    else:
        state = QuantState(graph=gs.import_onnx(model), target=target)
        results = Sequential(passes[:start])(state, ctx)
        snapshots[key] = (state.snapshot(), list(results))
    qdq = names.index(InsertQDQ.name)
    results += Sequential(passes[start:qdq])(state, ctx)
    before = state.snapshot() if keep else None
    result = finish(model, state, results, Sequential(passes[qdq:]), ctx, held)
    result.before_qdq = before
    return result


def finish(model: onnx.ModelProto, state: QuantState, results: list[PassResult], rest: Sequential, ctx: PassContext,
           held: DataSource) -> QuantizeResult:
    """Run the passes from insert-qdq on; measure the output SQNR on `held` against `model`."""
    results = results + rest(state, ctx)
    quantized = graph_io.infer_shapes(state.model())
    result = QuantizeResult(quantized, state.float_model, state, results, state.plan.calibration_samples, len(held))
    if len(held):
        result.sqnr_db = output_sqnr(model, quantized, held, ctx.batch_size)
    return result


def output_sqnr(reference: onnx.ModelProto, candidate: onnx.ModelProto, data: DataSource, batch_size: int) -> dict[str, float]:
    """SQNR in dB of each output of `candidate` against `reference`; the Q/DQ model runs unfused."""
    ref = run_outputs(reference, data, batch_size)
    got = run_outputs(candidate, data, batch_size, optimize=False)
    names = [o.name for o in reference.graph.output]
    return {name: sqnr(r, g) for name, r, g in zip(names, ref, got)}


def sqnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return sqnr_db(float(np.sum(reference ** 2)), float(np.sum((reference - candidate) ** 2)))


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): inf for no noise, -inf for no signal."""
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(signal / noise)) if signal > 0 else float("-inf")
