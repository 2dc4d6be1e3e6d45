"""FoldQuantizeDequantize: quantize(layout-op*(dequantize(x))) -> layout-op*(x), requantized if the params differ.

What is left between two quantizers after the other passes is data movement (reshape, flatten,
transpose, squeeze) or nothing at all; those run on the integers directly, so no float tensor
is materialised between integer kernels.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from .common import QRANGE, bound, op_name, qparams, rewrite_functions
from .requantize import integer_term, requantize

LAYOUT_OPS = ("relax.reshape", "relax.permute_dims", "relax.squeeze", "relax.expand_dims", "relax.flatten")


@tvm.transform.module_pass(opt_level=0, name="qpass.FoldQuantizeDequantize")
class FoldQuantizeDequantize:
    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        quantize = is_op("relax.quantize")(wildcard(), is_const(), is_const())

        def rewrite(func: relax.Function) -> relax.Function:
            var2val = relax.analysis.get_var2val(func)

            def rewriter(original: relax.Expr, m: dict) -> relax.Expr:
                layout = []
                inner = bound(original.args[0], var2val)
                while op_name(inner) in LAYOUT_OPS:
                    layout.append(inner)
                    inner = bound(inner.args[0], var2val)
                xq, y = (qparams(inner, var2val) if op_name(inner) == "relax.dequantize" else None), qparams(original, var2val)
                if xq is None or y is None or not (xq.per_tensor and y.per_tensor):
                    return original
                value = inner.args[0]
                if not xq.same_as(y):
                    lo, hi = QRANGE[y.dtype]
                    value = requantize([(integer_term(value, int(xq.zero_point[0])), xq.scale / y.scale)],
                                       int(y.zero_point[0]), lo, hi, y.dtype, [])
                for op in reversed(layout):
                    value = relax.Call(op.op, [value, *op.args[1:]], op.attrs)
                return value

            return rewrite_call(quantize, rewriter, func)

        return rewrite_functions(mod, rewrite)
