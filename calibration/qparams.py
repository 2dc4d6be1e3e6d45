"""Ranges to quantization parameters, for every scheme a target can ask for.

One function serves all quantizers (as torch.ao's observers share `_calculate_qparams`):

- the range is widened to contain 0, so that zero (padding, ReLU) is exact;
- symmetric: zero_point = 0 and scale = max(|lo|, |hi|) / qmax (TensorRT's amax / 127);
- asymmetric: scale = (hi - lo) / (qmax - qmin), zero_point = round(qmin - lo / scale);
- power-of-two: scale = 2^ceil(log2(scale)), the smallest power of two that still covers the range;
- a degenerate range (all zeros) gets scale 1, so every value quantizes to the zero point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qpasses.targets.schema import Quantizer


@dataclass(frozen=True)
class QParams:
    scale: np.ndarray  # float32, scalar or per-channel
    zero_point: np.ndarray  # int8/uint8/int32, same shape as scale
    qmin: int
    qmax: int
    axis: int | None = None

    @property
    def signed(self) -> bool:
        return self.qmin < 0


def is_signed(quantizer: Quantizer, lo: np.ndarray) -> bool:
    """Resolve `signed = "auto"` (MQBench adaptive signedness): unsigned when lo >= 0."""
    if quantizer.signed == "auto":
        return bool(np.min(lo) < 0)
    return bool(quantizer.signed)


def compute_qparams(lo, hi, quantizer: Quantizer, axis: int | None = None) -> QParams:
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    signed = is_signed(quantizer, lo)
    qmin, qmax = quantizer.qrange(signed)
    if quantizer.symmetric:
        amax = np.maximum(-lo, hi) if signed else hi
        scale = amax / qmax
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = np.where(scale > 0, scale, 1.0)
    if quantizer.scale == "pow2":
        scale = np.exp2(np.ceil(np.log2(scale)))
    scale = scale.astype(np.float32)
    if quantizer.symmetric:
        zero_point = np.zeros_like(scale, dtype=np.int64)
    else:
        zero_point = np.clip(np.round(qmin - lo / scale.astype(np.float64)), qmin, qmax).astype(np.int64)
    dtype = np.int8 if signed else np.uint8
    return QParams(np.asarray(scale, np.float32), np.asarray(zero_point, dtype), qmin, qmax, axis)


def constant_qparams(values: np.ndarray, quantizer: Quantizer) -> QParams:
    """Per-tensor qparams of a constant over its own values: a constant needs no calibration."""
    return compute_qparams(values.min(), values.max(), quantizer)


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """Round-half-to-even and saturate, as ONNX QuantizeLinear does."""
    scale, zp = _broadcast(qp, x.ndim)
    q = np.round(x.astype(np.float32) / scale) + zp
    return np.asarray(np.clip(q, qp.qmin, qp.qmax)).astype(qp.zero_point.dtype)


def on_axis(values: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    """Per-channel values shaped to broadcast along `axis` of a tensor with `ndim` axes."""
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _broadcast(qp: QParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    return on_axis(qp.scale, qp.axis, ndim), on_axis(qp.zero_point.astype(np.float32), qp.axis, ndim)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """scale * (q - zero_point) in float32, as ONNX DequantizeLinear computes it."""
    scale, zp = _broadcast(qp, q.ndim)
    return ((q.astype(np.float32) - zp) * scale).astype(np.float32)


def fake_quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """The value a Q/DQ pair passes on: the nearest grid point, saturated."""
    return dequantize(quantize(x, qp), qp)
