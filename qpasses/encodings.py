"""Quantization encodings in the AIMET / QNN JSON format (AIMET white paper ch. 3.3), both ways.

SNPE and QNN import such a file with the float ONNX model and use its ranges instead of computing
their own. One encoding describes one quantizer on an unsigned grid of 2^bitwidth levels:

    x = scale * (u + offset),  u in [0, 2^bitwidth - 1],  min = scale * offset,
    max = scale * (2^bitwidth - 1 + offset)

qpass's quantizers are r = scale * (q - zero_point) with q in [qmin, qmax] (int8 or uint8); the
grid starts at -2^(bits-1) for signed quantizers, 0 for unsigned, so offset = grid_start -
zero_point. Per-channel weights list one encoding per channel. Activations are keyed by tensor
name (a tensor sharing a quantizer gets the shared one), weights and constant inputs by initializer
name. int32 biases are not listed: their scale follows from the input's and the weight's. A
constant input's encoding is written for the record; reading it back recomputes it from the values.

`to_encodings(plan)` writes the file's content; `qparams_from(encodings, plan, target)` turns a
file back into the plan's qparams for the same graph, so export then import gives the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qpasses.calibration.qparams import QParams, is_signed
from qpasses.errors import InputError
from qpasses.targets.schema import Quantizer, Target

from .plan import QuantPlan

VERSION = "0.6.1"  # the AIMET encodings layout written (activation_encodings / param_encodings)


def to_encodings(plan: QuantPlan, target: Target) -> dict:
    """The encodings of every quantized activation and weight of `plan`."""
    activations = {name: _encode(plan.qparams[plan.quantizer_of(name)], target.activation)
                   for name in sorted(plan.activations)}
    params = {}
    for w in plan.weights:
        params.setdefault(w.tensor, _encode(plan.qparams[w.tensor], target.weight_quantizer(w.op_type)))
    for c in plan.constants:
        params.setdefault(c.tensor, _encode(plan.qparams[c.tensor], target.activation))
    return {
        "version": VERSION,
        "activation_encodings": activations,
        "param_encodings": dict(sorted(params.items())),
        "excluded_layers": sorted(plan.float_nodes),
        "quantizer_args": {"activation_bitwidth": target.activation.bits, "param_bitwidth": target.weight.bits,
                           "dtype": "int", "is_symmetric": target.weight.symmetric,
                           "per_channel_quantization": target.weight.granularity == "per_channel"},
    }


def _encode(qp: QParams, quantizer: Quantizer) -> list[dict]:
    start = -(2 ** (quantizer.bits - 1)) if qp.signed else 0
    levels = 2 ** quantizer.bits - 1
    scales, zero_points = np.atleast_1d(qp.scale).astype(np.float64), np.atleast_1d(qp.zero_point).astype(np.int64)
    encodings = []
    for scale, zero_point in zip(scales, zero_points):
        offset = int(start - zero_point)
        encodings.append({"bitwidth": quantizer.bits, "dtype": "int", "is_symmetric": str(quantizer.symmetric),
                          "min": float(np.float32(scale * offset)), "max": float(np.float32(scale * (levels + offset))),
                          "offset": offset, "scale": float(np.float32(scale))})
    return encodings


def read_encodings(path: Path) -> dict:
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"--encodings {path}: {exc}") from None
    if not isinstance(content, dict) or not {"activation_encodings", "param_encodings"} <= set(content):
        raise InputError(f"--encodings {path}: not an AIMET encodings file (needs activation_encodings and "
                         "param_encodings)")
    return content


def qparams_from(encodings: dict, plan: QuantPlan, target: Target) -> None:
    """Set `plan.qparams` and `plan.ranges` from an encodings file instead of calibrating."""
    activations, params = encodings["activation_encodings"], encodings["param_encodings"]
    missing = [a for a, members in plan.shares.items() if not any(m in activations for m in members)]
    missing += [w.tensor for w in plan.weights if w.tensor not in params]
    if missing:
        raise InputError(f"the encodings have no entry for {len(missing)} tensor(s) this target quantizes, "
                         f"e.g. {', '.join(sorted(set(missing))[:3])}")
    for anchor, members in plan.shares.items():
        found = next(activations[m] for m in [anchor, *members] if m in activations)
        plan.qparams[anchor], plan.ranges[anchor] = _decode(found, target.activation, None, anchor)
    for w in plan.weights:
        if w.tensor not in plan.qparams:
            quantizer = target.weight_quantizer(w.op_type)
            plan.qparams[w.tensor], plan.ranges[w.tensor] = _decode(params[w.tensor], quantizer, w.axis, w.tensor)


def _decode(entries: list[dict], quantizer: Quantizer, axis: int | None, name: str) -> tuple[QParams, tuple]:
    try:
        scale = np.array([e["scale"] for e in entries], np.float64)
        offset = np.array([e["offset"] for e in entries], np.int64)
        bits = {int(e["bitwidth"]) for e in entries}
    except (KeyError, TypeError, ValueError):
        raise InputError(f"encoding of {name}: every entry needs bitwidth, scale and offset") from None
    if bits != {quantizer.bits}:
        raise InputError(f"encoding of {name}: bitwidth {sorted(bits)}, but the target quantizes it to {quantizer.bits} bits")
    if np.any(scale <= 0) or not np.all(np.isfinite(scale)):
        raise InputError(f"encoding of {name}: scales must be positive and finite")
    lo, hi = scale * offset, scale * (2 ** quantizer.bits - 1 + offset)
    signed = is_signed(quantizer, lo)
    qmin, qmax = quantizer.qrange(signed)
    start = -(2 ** (quantizer.bits - 1)) if signed else 0
    zero_point = start - offset
    if np.any(zero_point < qmin) or np.any(zero_point > qmax):
        raise InputError(f"encoding of {name}: offset {offset.tolist()[:3]} puts zero outside the target's "
                         f"{'int' if signed else 'uint'}{quantizer.bits} grid")
    if axis is None:
        scale, zero_point, lo, hi = scale[0], zero_point[0], lo[0], hi[0]
    dtype = np.int8 if signed else np.uint8
    qp = QParams(np.asarray(scale, np.float32), np.asarray(zero_point, dtype), qmin, qmax, axis)
    return qp, (lo, hi)
