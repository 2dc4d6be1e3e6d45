"""What the lowering passes read off a Q/DQ region: constant values and quantization parameters."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

QRANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "int32": (-2 ** 31, 2 ** 31 - 1)}


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one quantize/dequantize call (scalar, or per channel along `axis`)."""

    scale: np.ndarray  # float64 holding the model's float32 values: multipliers are formed in float64
    zero_point: np.ndarray  # int64
    dtype: str  # the integer side's dtype
    axis: int

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    def same_as(self, other: "QParams") -> bool:
        return (self.dtype == other.dtype and self.scale.shape == other.scale.shape
                and np.array_equal(self.scale, other.scale) and np.array_equal(self.zero_point, other.zero_point))


def op_name(expr: relax.Expr) -> str:
    return getattr(expr.op, "name", "") if isinstance(expr, relax.Call) else ""


def bound(expr: relax.Expr, var2val: dict) -> relax.Expr:
    """The value a dataflow variable is bound to (patterns match through bindings; numpy evaluation must too)."""
    while isinstance(expr, relax.Var) and expr in var2val:
        expr = var2val[expr]
    return expr


def qparams(call: relax.Call, var2val: dict) -> QParams | None:
    """Parameters of a relax.quantize / relax.dequantize call, when its scale and zero point are constants."""
    scale, zero_point = (constant(a, var2val) for a in call.args[1:3])
    if scale is None or zero_point is None:
        return None
    int_dtype = call.attrs.out_dtype if op_name(call) == "relax.quantize" else str(call.args[0].ty.dtype)
    return QParams(scale.astype(np.float32).astype(np.float64).reshape(-1), zero_point.astype(np.int64).reshape(-1), str(int_dtype),
                   int(call.attrs.axis))


def constant(expr: relax.Expr, var2val: dict) -> np.ndarray | None:
    """The numpy value of an expression built from constants, or None.

    Weights reach a conv as dequantize(int8 constant) or, for targets that store float weights,
    as dequantize(quantize(float constant)); biases as reshape(dequantize(int32 constant)). These
    few ops are evaluated here with ONNX's own semantics (round half to even, saturate).
    """
    expr = bound(expr, var2val)
    if isinstance(expr, tvm.ir.GenericConst):
        return expr.value.numpy()
    name = op_name(expr)
    if name in ("relax.quantize", "relax.dequantize"):
        data = constant(expr.args[0], var2val)
        params = qparams(expr, var2val)
        if data is None or params is None:
            return None
        shape = [1] * data.ndim
        if not params.per_tensor:
            shape[params.axis % data.ndim] = -1
        scale, zero_point = params.scale.astype(np.float32).reshape(shape), params.zero_point.reshape(shape)
        if name == "relax.dequantize":
            return ((data.astype(np.int64) - zero_point).astype(np.float32) * scale).astype(np.float32)
        lo, hi = QRANGE[params.dtype]
        return np.clip(np.round(data.astype(np.float32) / scale) + zero_point, lo, hi).astype(params.dtype)
    if name == "relax.isnan":
        data = constant(expr.args[0], var2val)
        return None if data is None else np.isnan(data)
    if name == "relax.where":
        parts = [constant(a, var2val) for a in expr.args]
        return None if any(p is None for p in parts) else np.where(*parts)
    if name == "relax.reshape":
        data = constant(expr.args[0], var2val)
        return None if data is None else data.reshape([int(d) for d in expr.ty.shape])
    if name == "relax.permute_dims":
        data = constant(expr.args[0], var2val)
        axes = expr.attrs.axes
        return None if data is None else np.transpose(data, None if axes is None else [int(a) for a in axes])
    return None


def integer_weight(expr: relax.Expr, var2val: dict) -> tuple[np.ndarray, QParams] | None:
    """(integer values, their QParams) of a constant weight reached through dequantize, possibly permuted.

    A Gemm with transB imports as matmul(x, permute_dims(dequantize(W))): the permutation is
    applied to the integers and the channel axis moves with it.
    """
    expr = bound(expr, var2val)
    permute = expr if op_name(expr) == "relax.permute_dims" else None
    if permute is not None:
        expr = bound(permute.args[0], var2val)
    if op_name(expr) != "relax.dequantize":
        return None
    values, params = constant(expr.args[0], var2val), qparams(expr, var2val)
    if values is None or params is None or not np.issubdtype(values.dtype, np.integer):
        return None
    if permute is not None:
        axes = permute.attrs.axes
        order = list(range(values.ndim))[::-1] if axes is None else [int(a) for a in axes]
        values = np.transpose(values, order)
        params = QParams(params.scale, params.zero_point, params.dtype, order.index(params.axis % len(order)))
    return values, params


def scalar(expr: relax.Expr) -> float:
    """A Python number out of a PrimValue / IntImm / FloatImm argument (clip bounds)."""
    while hasattr(expr, "value") and not isinstance(expr, (int, float)):
        expr = expr.value
    return float(expr)


def activation_bounds(y: QParams, relu: bool, clip: relax.Call | None) -> tuple[int, int]:
    """The output's integer range narrowed by a relu or clip before the quantize.

    q = round(v / s) + z is monotonic in v, so clipping v to [a, b] before quantizing equals
    clamping q to [round(a / s) + z, round(b / s) + z] after.
    """
    lo, hi = QRANGE[y.dtype]
    sy, zy = float(y.scale[0]), int(y.zero_point[0])
    if relu:
        lo = max(lo, zy)
    if clip is not None:
        a, b = scalar(clip.args[1]), scalar(clip.args[2])
        if np.isfinite(a):
            lo = max(lo, zy + int(np.round(a / sy)))
        if np.isfinite(b):
            hi = min(hi, zy + int(np.round(b / sy)))
    return lo, hi


def rewrite_functions(mod: tvm.IRModule, rewrite) -> tvm.IRModule:
    """A new module with `rewrite` applied to every Relax function (assigning into `mod` would
    change the caller's module too)."""
    new = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            new[gvar] = rewrite(func)
    return new
