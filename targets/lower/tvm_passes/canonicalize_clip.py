"""CanonicalizeClip: the ONNX importer's max/min kernels for Clip become one relax.clip.

TVM's ONNX frontend imports Clip (ReLU6 in MobileNets) as call_tir(maximum) then call_tir(minimum)
on NaN-guarded bounds, which no pattern over Relax ops can see. With constant bounds the pair is
exactly clip(x, lo, hi), which LowerQuantizedConv and LowerQuantizedAdd turn into integer bounds.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from .common import bound, constant, rewrite_functions, scalar

KERNELS = {"maximum": 0, "minimum": 1}  # which clip bound each imported kernel sets


def _kernel(call: relax.Call) -> str | None:
    callee = call.args[0]
    name = getattr(callee, "name_hint", "") or getattr(callee, "name", "")
    return next((k for k in KERNELS if name.rstrip("0123456789_") == k), None)


@tvm.transform.module_pass(opt_level=0, name="qpass.CanonicalizeClip")
class CanonicalizeClip:
    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        call_tir = is_op("relax.call_tir")(wildcard(), wildcard())
        clip_of_clip = is_op("relax.clip")(is_op("relax.clip")(wildcard(), wildcard(), wildcard()), wildcard(), wildcard())

        def rewrite(func: relax.Function) -> relax.Function:
            var2val = relax.analysis.get_var2val(func)

            def kernel_to_clip(original: relax.Call, _m: dict) -> relax.Expr:
                kernel = _kernel(original)
                args = bound(original.args[1], var2val)
                if kernel is None or not isinstance(args, relax.Tuple) or len(args.fields) != 2:
                    return original
                value = constant(args.fields[1], var2val)
                dtype = getattr(original.ty, "dtype", "")
                if value is None or value.size != 1 or dtype not in ("float32", "float16"):
                    return original
                bounds = [-math.inf, math.inf]
                bounds[KERNELS[kernel]] = float(value.reshape(()))
                return relax.op.clip(args.fields[0], relax.prim_value(bounds[0]), relax.prim_value(bounds[1]))

            def merge(original: relax.Call, _m: dict) -> relax.Expr:
                inner = bound(original.args[0], var2val)
                lo = max(scalar(inner.args[1]), scalar(original.args[1]))
                hi = min(scalar(inner.args[2]), scalar(original.args[2]))
                return relax.op.clip(inner.args[0], relax.prim_value(lo), relax.prim_value(hi))

            func = rewrite_call(call_tir, kernel_to_clip, func)
            var2val = relax.analysis.get_var2val(func)
            return rewrite_call(clip_of_clip, merge, func)

        return rewrite_functions(mod, rewrite)
