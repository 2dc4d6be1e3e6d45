"""qpass's Relax passes: they turn the float computation a Q/DQ model imports as into integer kernels.

TVM's ONNX frontend imports QuantizeLinear/DequantizeLinear faithfully, so a Q/DQ model computes in
float: every conv dequantizes its int8 weights and runs in float32. Each pass here finds one kind of
region, dequantize -> op -> quantize, and rewrites it into integer arithmetic with the same result
(within one step of rounding): integer conv/matmul with an int32 accumulator and bias, integer
add, pooling and concat, and a requantize step in fixed point (a pure shift where the scales are
powers of two). Whatever no pass rewrites stays float and `float_ops` lists it.

One pass per file, each a `tvm.transform` module pass; `integer_lowering()` chains them.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .canonicalize_clip import CanonicalizeClip
from .fold_qdq import FoldQuantizeDequantize
from .lower_add import LowerQuantizedAdd
from .lower_concat import LowerQuantizedConcat
from .lower_conv import LowerQuantizedConv
from .lower_pool import LowerQuantizedPool

__all__ = ["CanonicalizeClip", "FoldQuantizeDequantize", "LowerQuantizedAdd", "LowerQuantizedConcat", "LowerQuantizedConv",
           "LowerQuantizedPool", "integer_lowering", "float_ops"]

KERNELS = ("relax.nn.conv2d", "relax.matmul")
FLOAT_COMPUTE = ("relax.nn.conv2d", "relax.nn.conv2d_transpose", "relax.matmul", "relax.add", "relax.multiply",
                 "relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.mean", "relax.concat", "relax.nn.relu",
                 "relax.clip", "relax.sigmoid", "relax.call_tir")


def integer_lowering() -> tvm.transform.Pass:
    """Every qpass rewrite, then clean-up: what a Q/DQ module goes through before legalization."""
    return tvm.transform.Sequential([
        CanonicalizeClip(),
        LowerQuantizedConv(),
        LowerQuantizedAdd(),
        LowerQuantizedPool(),
        LowerQuantizedConcat(),
        FoldQuantizeDequantize(),
        relax.transform.DeadCodeElimination(),
        relax.transform.FoldConstant(),
    ], name="qpass.IntegerLowering")


def float_ops(mod: tvm.IRModule, with_kernels: bool = False) -> list[tuple[str, str, relax.Call, str]]:
    """(variable, op, call, output dtype) of every compute op, for the compile report.

    By default only those still producing float32; `with_kernels` adds every conv/matmul, so the
    report can count the integer ones too.
    """
    found = []
    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                call, dtype = binding.value, str(getattr(binding.var.ty, "dtype", ""))
                op = getattr(getattr(call, "op", None), "name", "")
                if op in FLOAT_COMPUTE and (dtype == "float32" or with_kernels and op in KERNELS):
                    found.append((binding.var.name, op, call, dtype))
    return found
