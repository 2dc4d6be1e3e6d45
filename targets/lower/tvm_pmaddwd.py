"""An int16 conv2d kernel for x86 AVX2 built on `vpmaddwd`: qpass's fastest exact integer conv there.

`vpmaddwd` multiplies 16 pairs of int16 and adds each pair into one int32 lane: 16 multiply-adds
per instruction, where the int32 multiply (`vpmulld`) of the generic integer kernel does 8 at a
quarter of the throughput. Every int16 product and pair sum fits int32, so it is exact for the
conv's int8 or int16 operands (int8 weights, activations centred on their zero point).

TVM 0.27's `Schedule.tensorize` crashes on such intrinsics, so the kernel is written directly in
TIR and reached through `relax.call_tir`. `pair_convs` rewrites each qualifying integer conv2d
before legalization into: widen to int16, pad, pair adjacent input channels ([N, C/2, H, W, 2]),
the kernel, and back to NCHW. The output layout [N, OC/8, Ho, Wo, 8] keeps 8 output channels in
one register; weights are repacked once at compile time to [OC/8, C/2, KH, KW, 8, 2].
Register tile: OBB blocks of 8 output channels x XS output pixels, all accumulators in ymm
registers (measured fastest on ResNet-18 layers: 2 x 7). The epilogue (bias, requantize) stays
in Relax and fuses with the unpacking.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.ir import GenericConst
from tvm.script import tirx as T

KERNEL_ATTR = "qpass.kernel"  # marks a hand-written PrimFunc: `tvm_schedule` leaves it alone
LANES = 8  # int32 lanes of a ymm register
MAX_ACCUMULATORS = 14  # of the 16 ymm registers: the rest hold the weights and the broadcast pair
INT16, INT32 = "int16", "int32"  # names, not string annotations, for linters reading the TVMScript
MIN_PARALLEL = 1 << 20  # multiply-adds below which waking the thread pool costs more than it saves


def pair_convs(mod: tvm.IRModule) -> tvm.IRModule:
    """Every integer conv2d `pairable` accepts becomes a call to a `vpmaddwd` kernel."""
    kernels: dict[tuple, tvm.ir.GlobalVar] = {}
    builder = relax.BlockBuilder(mod)

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            return _paired_conv(call, builder, kernels) if pairable(call) else call

    rewrite = Rewrite(mod)
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            builder.update_func(gvar, rewrite.visit_expr(func))
    return relax.transform.Normalize()(builder.get())


def pairable(call: relax.Expr) -> bool:
    """An NCHW int8/int16 conv2d, groups 1, no dilation, constant weights, int32 sums."""
    if not isinstance(call, relax.Call) or not call.op.same_as(tvm.ir.Op.get("relax.nn.conv2d")):
        return False
    data, weight = call.args[:2]
    a = call.attrs
    return (str(data.ty.dtype) in ("int8", "uint8", "int16") and isinstance(weight, GenericConst)
            and str(weight.ty.dtype) in ("int8", "uint8", "int16") and str(a.out_dtype) == "int32"
            and int(a.groups) == 1 and all(int(d) == 1 for d in a.dilation)
            and (a.data_layout, a.kernel_layout, a.out_layout or a.data_layout) == ("NCHW", "OIHW", "NCHW")
            and all(isinstance(s, tvm.tirx.IntImm) for s in data.ty.shape))


def count_pairable(mod: tvm.IRModule) -> int:
    """Integer convs `pair_convs` would run on the `vpmaddwd` kernel: for the compile report."""
    found = [0]

    def visit(expr: relax.Expr) -> None:
        found[0] += pairable(expr)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found[0]


def _paired_conv(call: relax.Call, builder: relax.BlockBuilder, kernels: dict) -> relax.Expr:
    data, attrs = call.args[0], call.attrs
    weight = call.args[1].value.numpy().astype(np.int64)
    n, c, h, w = (int(d) for d in data.ty.shape)
    oc, _, kh, kw = weight.shape
    sh, sw = (int(s) for s in attrs.strides)
    top, left, bottom, right = (int(p) for p in attrs.padding)
    ho, wo = int(call.ty.shape[2]), int(call.ty.shape[3])
    blocks = -(-oc // LANES)
    obb = 2 if blocks % 2 == 0 else 1
    xs, wo_padded = _strip(wo, MAX_ACCUMULATORS // obb)
    extra = max(0, (wo_padded - 1) * sw + kw - (w + left + right))  # the last strip reads past the row
    c2, hp, wp = -(-c // 2), h + top + bottom, w + left + right + extra

    x = data if str(data.ty.dtype) == "int16" else relax.op.astype(data, "int16")
    x = relax.op.nn.pad(x, [0, 0, 0, 2 * c2 - c, top, bottom, left, right + extra])
    x = relax.op.permute_dims(relax.op.reshape(x, (n, c2, 2, hp, wp)), [0, 1, 3, 4, 2])
    key = (n, c2, hp, wp, blocks, kh, kw, ho, wo_padded, sh, sw, xs, obb)
    if key not in kernels:
        work = n * blocks * LANES * ho * wo_padded * c2 * 2 * kh * kw
        kernels[key] = builder.add_func(pmaddwd_conv(*key, parallel=work >= MIN_PARALLEL), "conv2d_pmaddwd")
    out = relax.call_tir(kernels[key], [x, relax.const(pack_weight(weight))],
                         relax.TensorType((n, blocks, ho, wo_padded, LANES), "int32"))
    out = relax.op.reshape(relax.op.permute_dims(out, [0, 1, 4, 2, 3]), (n, blocks * LANES, ho, wo_padded))
    if blocks * LANES != oc or wo_padded != wo:
        out = relax.op.strided_slice(out, [1, 3], [0, 0], [oc, wo])
    return out


def _strip(width: int, most: int) -> tuple[int, int]:
    """(pixels per register strip, padded output width): a divisor of the width when one is at least 4."""
    divisor = max(d for d in range(1, min(width, most) + 1) if width % d == 0)
    if divisor >= 4 or width <= most:
        return divisor, width
    return most, -(-width // most) * most


def pack_weight(weight: np.ndarray) -> np.ndarray:
    """OIHW integers -> [OC/8, C/2, KH, KW, 8, 2] int16, zero-padded to whole blocks and channel pairs."""
    oc, c, kh, kw = weight.shape
    padded = np.zeros((-(-oc // LANES) * LANES, -(-c // 2) * 2, kh, kw), np.int16)
    padded[:oc, :c] = weight
    blocks, pairs = padded.shape[0] // LANES, padded.shape[1] // 2
    return np.ascontiguousarray(padded.reshape(blocks, LANES, pairs, 2, kh, kw).transpose(0, 2, 4, 5, 1, 3))


def pmaddwd_conv(n: int, c2: int, hp: int, wp: int, blocks: int, kh: int, kw: int, ho: int, wo: int,
                 sh: int, sw: int, xs: int, obb: int, parallel: bool) -> tirx.PrimFunc:
    """D[n, c2, hp, wp, 2] int16 (padded, channel pairs) * W[blocks, c2, kh, kw, 8, 2] -> O[n, blocks, ho, wo, 8] int32.

    One task computes `obb` blocks of 8 output channels for one output row, `xs` pixels at a time:
    for each input-channel pair and kernel tap, the pair of activations is broadcast to all lanes
    and `vpmaddwd` multiplies it with the 8 output channels' weight pairs.
    """
    strips, groups = wo // xs, blocks // obb
    tile = obb * xs
    outer = T.parallel if parallel else T.serial

    @T.prim_func
    def conv(D: T.Buffer((n, c2, hp, wp, 2), INT16), W: T.Buffer((blocks, c2, kh, kw, 8, 2), INT16),
             O: T.Buffer((n, blocks, ho, wo, 8), INT32)):
        T.func_attr({"tir.noalias": True, KERNEL_ATTR: "pmaddwd"})
        for task in outer(n * groups * ho):
            for strip in T.serial(strips):
                acc = T.alloc_buffer((tile * 8,), "int32", scope="global")  # small: LLVM keeps it in registers
                for i in T.unroll(tile):
                    acc[T.ramp(i * 8, 1, 8)] = T.broadcast(T.int32(0), 8)
                for pair, ky, kx in T.grid(c2, kh, kw):
                    for xi in T.unroll(xs):
                        for bi in T.unroll(obb):
                            acc[T.ramp((bi * xs + xi) * 8, 1, 8)] = acc[T.ramp((bi * xs + xi) * 8, 1, 8)] + \
                                T.call_llvm_pure_intrin(
                                    "int32x8", T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                                    T.reinterpret(T.broadcast(T.reinterpret(D.vload(
                                        [task // (groups * ho), pair, task % ho * sh + ky,
                                         (strip * xs + xi) * sw + kx, 0], "int16x2"), dtype="int32"), 8),
                                        dtype="int16x16"),
                                    W.vload([task // ho % groups * obb + bi, pair, ky, kx, 0, 0], "int16x16"))
                for bi in T.unroll(obb):
                    for xi in T.unroll(xs):
                        O[task // (groups * ho), task // ho % groups * obb + bi, task % ho, strip * xs + xi,
                          T.ramp(0, 1, 8)] = acc[T.ramp((bi * xs + xi) * 8, 1, 8)]

    return conv.without_attr("global_symbol")  # each kernel is named where it is added to the module
