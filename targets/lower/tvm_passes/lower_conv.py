"""LowerQuantizedConv: dequantize -> conv2d/matmul (-> bias) (-> residual) (-> relu/clip) -> quantize, in integers.

The region becomes: integer operands (int8, or int16 when a zero point has to be subtracted
first, which keeps padding exact), conv2d/matmul with an int32 accumulator, the bias added as
int32 at scale s_x * s_w, then one requantize (see `requantize`) that also adds a residual input
(TensorRT's conv+add fusion) and applies relu/clip as integer bounds. A conv/matmul whose output
leaves the model in float (the classifier) keeps the integer kernel and dequantizes its int32
accumulator. Regions the pass cannot express exactly (per-channel activations, a non-constant
weight) are left alone and stay float.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from .common import activation_bounds, bound, constant, integer_weight, op_name, qparams, rewrite_functions
from .requantize import requantize


def _add(core, extra):
    return is_op("relax.add")(core, extra) | is_op("relax.add")(extra, core)


class _Patterns:
    """The region's pieces, named so the rewriter can tell which optional parts matched."""

    def __init__(self, quantized_output: bool):
        self.x = wildcard()
        self.dq_x = is_op("relax.dequantize")(self.x, is_const(), is_const())
        self.weight = wildcard()
        self.conv = is_op("relax.nn.conv2d")(self.dq_x, self.weight)
        self.matmul = is_op("relax.matmul")(self.dq_x, self.weight)
        core = self.conv | self.matmul
        if not quantized_output:
            self.bias = wildcard()
            self.root = _add(core, self.bias) | core
            return
        self.extra1, self.extra2 = wildcard(), wildcard()
        self.add1 = _add(core, self.extra1)
        self.add2 = _add(self.add1, self.extra2)
        body = self.add2 | self.add1 | core
        self.relu = is_op("relax.nn.relu")(body)
        self.clip = is_op("relax.clip")(body, wildcard(), wildcard())
        self.quantize = is_op("relax.quantize")(self.relu | self.clip | body, is_const(), is_const())
        self.root = self.quantize


def _int_operand(value: relax.Expr, zero_point: int, wide: bool) -> relax.Expr:
    """The activation as the conv reads it: as stored, or widened to int16 and centred on its zero point."""
    if not wide:
        return value
    value = relax.op.astype(value, "int16")
    return relax.op.subtract(value, relax.const(zero_point, "int16")) if zero_point else value


class _Rewriter:
    def __init__(self, func: relax.Function, quantized_output: bool):
        self.var2val = relax.analysis.get_var2val(func)
        self.p = _Patterns(quantized_output)
        self.quantized_output = quantized_output

    def __call__(self, original: relax.Expr, m: dict) -> relax.Expr:
        p = self.p
        core = m.get(p.conv, m.get(p.matmul))
        is_conv = p.conv in m
        x_params = qparams(bound(m[p.dq_x], self.var2val), self.var2val)
        weight = integer_weight(m[p.weight], self.var2val)
        if x_params is None or not x_params.per_tensor or weight is None:
            return original
        w_values, w_params = weight
        out_ndim = core.ty.ndim
        channel_axis = 1 if is_conv else out_ndim - 1
        channels = int(core.ty.shape[channel_axis])
        w_axis = 0 if is_conv else w_values.ndim - 1
        if not w_params.per_tensor and w_params.axis != w_axis:
            return original
        zx, zw = int(x_params.zero_point[0]), w_params.zero_point.reshape(-1)
        if np.any(zw != zw[0]):
            return original
        wide = bool(zx or zw[0] or x_params.dtype != "int8" or w_params.dtype != "int8")
        w_int = (w_values.astype(np.int32) - int(zw[0])).astype("int16" if wide else "int8")
        x_int = _int_operand(m[p.x], zx, wide)
        if is_conv:
            a = core.attrs
            acc = relax.op.nn.conv2d(x_int, relax.const(w_int), strides=a.strides, padding=a.padding,
                                     dilation=a.dilation, groups=a.groups, data_layout=a.data_layout,
                                     kernel_layout=a.kernel_layout, out_layout=a.out_layout, out_dtype="int32")
        else:
            acc = relax.op.matmul(x_int, relax.const(w_int), out_dtype="int32")
        acc_scale = np.broadcast_to(x_params.scale[0] * w_params.scale, (channels,)).astype(np.float64)
        channel_shape = [1] * out_ndim
        channel_shape[channel_axis] = channels

        extras = [m[e] for e in ((p.extra1, p.extra2) if self.quantized_output else (p.bias,)) if e in m]
        bias, residuals = None, []
        for extra in extras:
            values = constant(extra, self.var2val)
            if values is not None and bias is None:
                bias = self._bias_integers(extra, values, acc_scale, channel_shape)
                if bias is None:
                    return original
                continue
            dq = bound(extra, self.var2val)
            r_params = qparams(dq, self.var2val) if op_name(dq) == "relax.dequantize" else None
            if r_params is None or not r_params.per_tensor or not self.quantized_output:
                return original
            residuals.append((dq.args[0], r_params))
        if bias is not None:
            acc = relax.op.add(acc, relax.const(bias.reshape(channel_shape)))

        if not self.quantized_output:  # the int32 accumulator is dequantized at scale s_x * s_w
            return relax.op.dequantize(acc, relax.const(acc_scale.astype(np.float32)), relax.const(0, "int32"),
                                       axis=channel_axis)

        y = qparams(m[p.quantize], self.var2val)
        if y is None or not y.per_tensor:
            return original
        sy, zy = float(y.scale[0]), int(y.zero_point[0])
        terms = [(acc, acc_scale / sy)]
        for r, r_params in residuals:
            r32 = relax.op.astype(r, "int32")
            zr = int(r_params.zero_point[0])
            terms.append((relax.op.subtract(r32, relax.const(zr, "int32")) if zr else r32,
                          np.array([float(r_params.scale[0]) / sy])))
        lo, hi = activation_bounds(y, p.relu in m, m.get(p.clip))
        return requantize(terms, zy, lo, hi, y.dtype, channel_shape)

    def _bias_integers(self, extra, values, acc_scale, channel_shape) -> np.ndarray | None:
        """The bias as int32 at the accumulator's scale: the stored integers when the model has them."""
        channels = acc_scale.size
        if values.size not in (1, channels):
            return None
        expr = bound(extra, self.var2val)
        while op_name(expr) == "relax.reshape":
            expr = bound(expr.args[0], self.var2val)
        if op_name(expr) == "relax.dequantize":
            stored, params = constant(expr.args[0], self.var2val), qparams(expr, self.var2val)
            if (stored is not None and stored.dtype == np.int32 and not np.any(params.zero_point)
                    and np.allclose(params.scale.astype(np.float64), acc_scale, rtol=1e-6)):
                return np.broadcast_to(stored.reshape(-1), (channels,)).astype(np.int32)
        return np.round(np.broadcast_to(values.reshape(-1), (channels,)).astype(np.float64) / acc_scale).astype(np.int32)


@tvm.transform.module_pass(opt_level=0, name="qpass.LowerQuantizedConv")
class LowerQuantizedConv:
    """Integer conv2d/matmul regions, quantized outputs first, then float-output (classifier) layers."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        def rewrite(func: relax.Function) -> relax.Function:
            for quantized_output in (True, False):
                rewriter = _Rewriter(func, quantized_output)
                func = rewrite_call(rewriter.p.root, rewriter, func)
            return func

        return rewrite_functions(mod, rewrite)
