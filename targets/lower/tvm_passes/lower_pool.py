"""LowerQuantizedPool: max pooling and global average pooling between dequantize and quantize, in integers.

Max pooling commutes with the (monotonic) dequantize, so it runs on the integers as they are and
needs a requantize only when the output's scale differs. A global average pool (ONNX
GlobalAveragePool imports as a mean over H, W) sums in int32 and folds 1/count into the
requantize multiplier. Windowed average pooling stays float.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from .common import QRANGE, bound, qparams, rewrite_functions
from .requantize import integer_term, requantize


@tvm.transform.module_pass(opt_level=0, name="qpass.LowerQuantizedPool")
class LowerQuantizedPool:
    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        x = wildcard()
        dq = is_op("relax.dequantize")(x, is_const(), is_const())
        max_pool = is_op("relax.nn.max_pool2d")(dq)
        mean = is_op("relax.mean")(dq)
        quantize = is_op("relax.quantize")(max_pool | mean, is_const(), is_const())

        def rewrite(func: relax.Function) -> relax.Function:
            var2val = relax.analysis.get_var2val(func)

            def rewriter(original: relax.Expr, m: dict) -> relax.Expr:
                xq, y = qparams(bound(m[dq], var2val), var2val), qparams(m[quantize], var2val)
                if xq is None or y is None or not (xq.per_tensor and y.per_tensor):
                    return original
                zx, sy, zy = int(xq.zero_point[0]), float(y.scale[0]), int(y.zero_point[0])
                lo, hi = QRANGE[y.dtype]
                if max_pool in m:
                    pool = m[max_pool]
                    pooled = relax.Call(pool.op, [m[x]], pool.attrs)
                    if xq.same_as(y):
                        return pooled
                    return requantize([(integer_term(pooled, zx), xq.scale / sy)], zy, lo, hi, y.dtype, [])
                reduce = m[mean]
                axes = [int(a) % reduce.args[0].ty.ndim for a in reduce.attrs.axis]
                count = int(np.prod([int(reduce.args[0].ty.shape[a]) for a in axes]))
                total = relax.op.sum(integer_term(m[x], zx), axis=axes, keepdims=bool(reduce.attrs.keepdims))
                return requantize([(total, xq.scale / (sy * count))], zy, lo, hi, y.dtype, [])

            return rewrite_call(quantize, rewriter, func)

        return rewrite_functions(mod, rewrite)
