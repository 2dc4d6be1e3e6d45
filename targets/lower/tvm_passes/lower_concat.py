"""LowerQuantizedConcat: concat of dequantized inputs -> quantize, as a concat of integers.

With the shared scale most targets require (qpass gives concat inputs one quantizer), the
integers are concatenated as they are; an input with its own scale is requantized to the
output's first.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from .common import QRANGE, bound, op_name, qparams, rewrite_functions
from .requantize import integer_term, requantize


@tvm.transform.module_pass(opt_level=0, name="qpass.LowerQuantizedConcat")
class LowerQuantizedConcat:
    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        concat = is_op("relax.concat")(wildcard())
        quantize = is_op("relax.quantize")(concat, is_const(), is_const())

        def rewrite(func: relax.Function) -> relax.Function:
            var2val = relax.analysis.get_var2val(func)

            def rewriter(original: relax.Expr, m: dict) -> relax.Expr:
                y = qparams(m[quantize], var2val)
                fields = bound(m[concat].args[0], var2val)
                if y is None or not y.per_tensor or not isinstance(fields, relax.Tuple):
                    return original
                lo, hi = QRANGE[y.dtype]
                parts = []
                for field in fields.fields:
                    dq = bound(field, var2val)
                    xq = qparams(dq, var2val) if op_name(dq) == "relax.dequantize" else None
                    if xq is None or not xq.per_tensor:
                        return original
                    if xq.same_as(y):
                        parts.append(dq.args[0])
                    else:
                        parts.append(requantize([(integer_term(dq.args[0], int(xq.zero_point[0])), xq.scale / y.scale)],
                                                int(y.zero_point[0]), lo, hi, y.dtype, []))
                return relax.op.concat(parts, axis=m[concat].attrs.axis)

            return rewrite_call(quantize, rewriter, func)

        return rewrite_functions(mod, rewrite)
