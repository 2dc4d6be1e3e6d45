"""LowerQuantizedAdd: dequantize(a) + dequantize(b) (-> relu/clip) -> quantize, as an integer add.

Both inputs are rescaled to the output's scale inside one requantize, so the sum is rounded once:
q = clamp(round(M_a (a - z_a) + M_b (b - z_b)) + z_y) with M = s_in / s_out; relu and clip
become the clamp bounds. Residual adds of every target land here unless the target fuses them
into the conv before (then LowerQuantizedConv has taken them already).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from .common import activation_bounds, bound, qparams, rewrite_functions
from .requantize import integer_term, requantize


@tvm.transform.module_pass(opt_level=0, name="qpass.LowerQuantizedAdd")
class LowerQuantizedAdd:
    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        a, b = wildcard(), wildcard()
        dq_a = is_op("relax.dequantize")(a, is_const(), is_const())
        dq_b = is_op("relax.dequantize")(b, is_const(), is_const())
        add = is_op("relax.add")(dq_a, dq_b)
        relu = is_op("relax.nn.relu")(add)
        clip = is_op("relax.clip")(add, wildcard(), wildcard())
        quantize = is_op("relax.quantize")(relu | clip | add, is_const(), is_const())

        def rewrite(func: relax.Function) -> relax.Function:
            var2val = relax.analysis.get_var2val(func)

            def rewriter(original: relax.Expr, m: dict) -> relax.Expr:
                pa, pb = (qparams(bound(m[d], var2val), var2val) for d in (dq_a, dq_b))
                y = qparams(m[quantize], var2val)
                if not all(q is not None and q.per_tensor for q in (pa, pb, y)):
                    return original
                sy, zy = float(y.scale[0]), int(y.zero_point[0])
                terms = [(integer_term(m[v], int(q.zero_point[0])), np.array([float(q.scale[0]) / sy]))
                         for v, q in ((a, pa), (b, pb))]
                lo, hi = activation_bounds(y, relu in m, m.get(clip))
                return requantize(terms, zy, lo, hi, y.dtype, [])

            return rewrite_call(quantize, rewriter, func)

        return rewrite_functions(mod, rewrite)
