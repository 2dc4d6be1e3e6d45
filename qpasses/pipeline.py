"""From a target and options to the pass sequence, and the `quantize` entry point.

The sequence is the same for every target; what differs is data in the target file (e.g.
`fold_batchnorm`), never an `if target == ...` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qpasses.calibration.data import ArraySource, DataSource, open_source
from qpasses.calibration.runner import input_specs, run_outputs
from qpasses.targets.schema import Target

from . import graph as graph_io
from .pass_infra import Pass, PassContext, PassResult, QuantState, Sequential
from .passes.annotate import Annotate
from .passes.calibrate import Calibrate
from .passes.fold_batchnorm import FoldBatchNorm
from .passes.insert_qdq import InsertQDQ

ALL_PASSES: tuple[type[Pass], ...] = (FoldBatchNorm, Annotate, Calibrate, InsertQDQ)


def build_pipeline(target: Target) -> Sequential:
    passes: list[Pass] = [FoldBatchNorm()] if target.fold_batchnorm else []
    return Sequential(passes + [Annotate(), Calibrate(), InsertQDQ()])


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    float_model: onnx.ModelProto  # the normalised (and folded) float model the plan refers to
    state: QuantState
    passes: list[PassResult]
    calib_samples: int
    holdout_samples: int
    sqnr_db: dict[str, float] = field(default_factory=dict)


def holdout_size(n: int) -> int:
    """Samples held back from calibration to measure fidelity: 1/8 of the data, at most 64."""
    return min(64, n // 8) if n >= 8 else 0


def quantize(model_path: str | Path, target: Target, data: str | Path | None, ctx: PassContext,
             input_shapes: dict[str, list[int]] | None = None, holdout: int | None = None,
             preprocess: Path | None = None) -> QuantizeResult:
    model = graph_io.normalize(graph_io.load_model(model_path), input_shapes)
    source: DataSource | None = open_source(data, input_specs(model), preprocess, ctx.seed) if data is not None else None
    held: DataSource = ArraySource({}, rows=np.arange(0))
    if source is not None:
        n_hold = holdout_size(len(source)) if holdout is None else min(holdout, len(source) - 1)
        source, held = source.split(n_hold)
    ctx.data = source
    state = QuantState(graph=gs.import_onnx(model), target=target)
    pipeline = build_pipeline(target)
    results = pipeline(state, ctx)
    quantized = graph_io.infer_shapes(state.model())
    float_state = QuantState(graph=gs.import_onnx(model), target=target)
    if target.fold_batchnorm:
        FoldBatchNorm()(float_state, PassContext(quiet=True))
    float_model = float_state.model()
    result = QuantizeResult(quantized, float_model, state, results, state.plan.calibration_samples, len(held))
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
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    noise = float(np.sum((reference.astype(np.float64) - candidate) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")
