"""The JSON record of one `qpass quantize` run (`--report`), for CI pipelines and audits.

Schema "qpass.quantize" version 1 (a reader checks `schema` and `version`; fields are only ever
added within a version; JSON Schema: qpasses/schemas/quantize.schema.json, with eval and bench
beside it):

    schema, version             "qpass.quantize", 1
    versions                    qpass, onnx, onnxruntime, numpy
    input, output               {path, sha256} of the float model read and the Q/DQ model written
    target                      the resolved rules of the target (its file after `extends`)
    calibration                 methods, options, seed, data, samples used, samples held back;
                                with --calib best, `chosen`: quantizers per method (and `method` per tensor)
    techniques                  requested, and one decision per technique tried:
                                {technique, applied, before_db, after_db, kept}
    nodes                       quantized, fused (node -> supergroup head), float (node -> why)
    tensors.activations         tensor -> {quantizer, range, scale, zero_point, dtype, consumers}
    tensors.weights             tensor -> {node, axis, range, scale, zero_point, dtype}, per-channel
                                values as lists
    tensors.constants           the same, for float constant inputs stored as integers (fusing engines)
    conformance                 `qpass check` of the output: violations, layers left in float
    fidelity                    SQNR in dB per output on the held-back samples, and the worst
    fidelity.evaluation         on --eval-data or the held-back samples (qpasses/fidelity.py):
                                samples, SQNR, top-1 accuracy (labels) or agreement, drop, and
                                with --metric the task metric
    gates                       with --min-sqnr/--max-drop/--min-metric: the goals and the failures
    auto                        with --auto (qpasses/auto.py): the goal, every trial (calibration,
                                techniques, float layers, scores, int8 share, seconds), the
                                technique subsets the time budget left out, the trial written
    latency                     with --latency: the `qpass bench --report` record it was given
    notes                       what the passes said (skipped layers, techniques that did not apply)
    timings                     seconds per pass, and auto's trial seconds (the fields that differ
                                between equal runs)

Non-finite floats are written as the strings "inf", "-inf", "nan" (JSON has no such numbers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

from qpasses import __version__
from qpasses.calibration.qparams import QParams

from qpasses.targets.check import CheckResult

from .pass_infra import PassContext
from .pipeline import QuantizeResult, Techniques

SCHEMA, VERSION = "qpass.quantize", 1


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays to Python, non-finite floats to strings."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(report: dict) -> bytes:
    return (json.dumps(json_safe(report), indent=2) + "\n").encode()


def _quantizer(qp: QParams, value_range: tuple) -> dict:
    return {"range": [np.asarray(r).tolist() for r in value_range], "scale": qp.scale.tolist(),
            "zero_point": qp.zero_point.tolist(), "dtype": str(qp.zero_point.dtype), "qmin": qp.qmin, "qmax": qp.qmax}


def quantize_report(result: QuantizeResult, ctx: PassContext, requested: Techniques, model: Path,
                    output: Path, output_bytes: bytes, conformance: CheckResult) -> dict:
    """The record of a run whose model `result.model` is written to `output` as `output_bytes`."""
    plan, state = result.state.plan, result.state
    activations = {}
    for name, act in plan.activations.items():
        anchor = plan.quantizer_of(name)
        activations[name] = {"quantizer": anchor, **_quantizer(plan.qparams[anchor], plan.ranges[anchor]),
                             "consumers": [list(edge) for edge in act.consumers],
                             **({"method": plan.methods[anchor]} if anchor in plan.methods else {})}
    weights = {}
    for w in plan.weights:
        weights.setdefault(w.tensor, {"node": w.node, "axis": w.axis,
                                      **_quantizer(plan.qparams[w.tensor], plan.ranges[w.tensor])})
    constants = {c.tensor: {"node": c.node, "axis": None, **_quantizer(plan.qparams[c.tensor], plan.ranges[c.tensor])}
                 for c in plan.constants}
    target = dataclasses.asdict(state.target)
    target.pop("raw")
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "versions": {"qpass": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "numpy": np.__version__},
        "input": {"path": str(model), "sha256": sha256(model)},
        "output": {"path": str(output), "sha256": hashlib.sha256(output_bytes).hexdigest()},
        "target": target,
        "calibration": {"activations": ctx.calib_method, "weights": ctx.weight_calib, "options": ctx.calib_options,
                        "seed": ctx.seed, "batch_size": ctx.batch_size, "samples": result.calib_samples,
                        "held_back": result.holdout_samples,
                        **({"chosen": dict(sorted(Counter(plan.methods.values()).items()))} if plan.methods else {})},
        "techniques": {"requested": dataclasses.asdict(requested),
                       "decisions": [dataclasses.asdict(d) for d in result.decisions]},
        "nodes": {"quantized": plan.quantized_nodes, "fused": plan.fused_nodes, "float": plan.float_nodes},
        "tensors": {"activations": activations, "weights": weights, "constants": constants},
        "conformance": conformance.to_json(),
        "fidelity": {"sqnr_db": result.sqnr_db, "worst_sqnr_db": result.score_db if result.sqnr_db else None},
        "notes": state.notes,
        "timings": {name: round(seconds, 3) for name, seconds in ctx.timings.items()},
    }
