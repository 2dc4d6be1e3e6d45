"""Requantize in integer arithmetic: sum_i v_i * M_i, rounded, plus a zero point, clamped.

Each term is an integer tensor (a conv's int32 accumulator, or an int8 input minus its zero point)
and a real multiplier M_i (s_in / s_out, per channel or scalar). Two forms:

- powers of two (tvm-arm, MQBench's TVM setting): every M_i = 2^k_i, so the result is shifts only,
  `(sum_i v_i << (s + k_i)) + 2^(s-1)) >> s` in int32, s = max(-k_i);
- otherwise fixed point, gemmlowp-style: M_i ~ m_i / 2^n with m_i < 2^31 and one shift n per
  channel shared by all terms, `(sum_i v_i * m_i + 2^(n-1)) >> n` in int64.

Both round half to even, as ONNX's QuantizeLinear does: `(v + 2^(s-1) - 1 + ((v >> s) & 1)) >> s`.
Ties are common with power-of-two scales, so this matters for matching the Q/DQ reference.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

MULTIPLIER_BITS = 30  # m_i in [2^30, 2^31]: full precision, and int32 * m_i fits int64


def is_pow2(multiplier: np.ndarray) -> bool:
    mantissa, _ = np.frexp(multiplier.astype(np.float64))
    return bool(np.all(mantissa == 0.5))


def fixed_point(multipliers: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """Integer multipliers m_i and the shared shift n (per channel) with M_i ~ m_i / 2^n."""
    largest = np.max(np.stack(np.broadcast_arrays(*[m.astype(np.float64) for m in multipliers])), axis=0)
    exponent = np.floor(np.log2(np.maximum(largest, 1e-30)))
    shift = np.clip(MULTIPLIER_BITS - exponent, 0, 62).astype(np.int64)
    return [np.round(m.astype(np.float64) * np.exp2(shift)).astype(np.int64) for m in multipliers], shift


def integer_term(value: relax.Expr, zero_point: int) -> relax.Expr:
    """An integer input widened to int32 with its zero point taken off."""
    value = relax.op.astype(value, "int32")
    return relax.op.subtract(value, relax.const(zero_point, "int32")) if zero_point else value


def requantize(terms: list[tuple[relax.Expr, np.ndarray]], zero_point: int, lo: int, hi: int, out_dtype: str,
               channel_shape: list[int]) -> relax.Expr:
    """The Relax expression for clamp(round(sum_i v_i * M_i) + zero_point, lo, hi) as `out_dtype`.

    `terms` are (int32 expression, multiplier) pairs; a per-channel multiplier is reshaped to
    `channel_shape` (e.g. [1, C, 1, 1]) to broadcast against the values.
    """
    multipliers = [np.asarray(m, np.float64).reshape(-1) for _, m in terms]

    def const(values: np.ndarray, dtype: str) -> relax.Expr:
        values = values.astype(dtype)
        return relax.const(values.reshape(channel_shape) if values.size > 1 else values.reshape(()), dtype)

    if all(is_pow2(m) for m in multipliers):
        exponents = [np.frexp(m)[1].astype(np.int64) - 1 for m in multipliers]
        shift = np.max(np.stack(np.broadcast_arrays(*[-e for e in exponents])), axis=0)
        lefts = [shift + e for e in exponents]
        wide = "int64" if max(int(np.max(left)) for left in lefts) > 7 else "int32"
        total = None
        for (value, _), left in zip(terms, lefts):
            value = relax.op.astype(value, wide) if wide != "int32" else value
            if np.any(left):
                value = relax.op.left_shift(value, const(left, wide))
            total = value if total is None else relax.op.add(total, value)
        if np.any(shift > 0):
            total = _shift_round_half_even(total, np.maximum(shift, 0), wide, const)
        if np.any(shift < 0):
            total = relax.op.left_shift(total, const(np.maximum(-shift, 0), wide))
    else:
        wide = "int64"
        integers, shift = fixed_point(multipliers)
        total = None
        for (value, _), m in zip(terms, integers):
            product = relax.op.multiply(relax.op.astype(value, wide), const(m, wide))
            total = product if total is None else relax.op.add(total, product)
        total = _shift_round_half_even(total, shift, wide, const)
    if zero_point:
        total = relax.op.add(total, relax.const(zero_point, wide))
    total = relax.op.clip(total, relax.prim_value(lo), relax.prim_value(hi))
    return relax.op.astype(total, out_dtype)


def _shift_round_half_even(value: relax.Expr, shift: np.ndarray, dtype: str, const) -> relax.Expr:
    """value / 2^shift rounded to nearest, ties to even (shift >= 0, per channel or scalar)."""
    bias = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)) - 1, 0)
    odd = relax.op.bitwise_and(relax.op.right_shift(value, const(shift, dtype)), relax.const(1, dtype))
    return relax.op.right_shift(relax.op.add(relax.op.add(value, const(bias, dtype)), odd), const(shift, dtype))
