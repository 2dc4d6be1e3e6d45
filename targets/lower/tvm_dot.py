"""Integer conv2d kernels on a CPU's dot-product instructions: x86 `vpmaddwd` and `vpdpbusd`, ARM `sdot`.

Each instruction multiplies a small group of input channels pairwise and adds the group into one
int32 lane, exactly:
* `vpmaddwd` (x86 AVX2): 2 int16 pairs per lane, 8 lanes: 16 multiply-adds per instruction where
  the int32 multiply (`vpmulld`) of the generic integer kernel does 8 at a quarter of the rate.
  Every int16 product and pair sum fits int32, so int8 and int16 operands (activations centred
  on their zero point) are exact.
* `vpdpbusd` (x86 VNNI: AVX512-VNNI on zmm, 16 lanes; AVX-VNNI on ymm, 8 lanes): 4 u8*s8 products
  per lane, accumulated in place without saturation: 4x the multiply-adds of `vpmaddwd` per lane.
  The activations are int8, so they are offset by 128 into u8 (padding too: 128 is the old 0)
  and 128 * (the sum of each output channel's weights) is subtracted from the int32 result, exact.
* `sdot` (ARMv8.2 dotprod): 4 int8 products per lane, 4 lanes, accumulated in place; int8 only.

TVM 0.27's `Schedule.tensorize` crashes on such intrinsics, so the kernel is written directly in
TIR and reached through `relax.call_tir`. `dot_layers` rewrites each qualifying integer conv2d
(and matmul by a constant weight, as the 1x1 conv of its rows) before legalization into: pad,
group G adjacent input channels ([N, C/G, H, W, G]), the kernel, and back to NCHW. The output
layout [N, OC/L, Ho, Wo, L] keeps L output channels in one register; weights are repacked once at
compile time to [OC/L, C/G, KH, KW, L, G]. Register tile: OBB blocks of L output channels x XS
output pixels, all accumulators in registers (x86: 2 x 7 measured fastest on ResNet-18 layers).
The epilogue (bias, requantize) stays in Relax and fuses with the unpacking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.ir import GenericConst
from tvm.script import tirx as T

KERNEL_ATTR = "qpass.kernel"  # marks a hand-written PrimFunc: `tvm_schedule` leaves it alone
INT32 = "int32"
MIN_PARALLEL = 1 << 20  # multiply-adds below which waking the thread pool costs more than it saves


def _pmaddwd(acc, data, weight):
    return acc + T.call_llvm_pure_intrin("int32x8", T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                                         data, weight)


def _vpdpbusd(bits: int) -> Callable:
    vector, intrinsic = f"int32x{bits // 32}", f"llvm.x86.avx512.vpdpbusd.{bits}"  # 256: AVX-VNNI or AVX512VL

    def accumulate(acc, data, weight):  # the LLVM in apache-tvm 0.27 takes the byte vectors as they are
        return T.call_llvm_pure_intrin(vector, T.llvm_lookup_intrinsic_id(intrinsic), acc, data, weight)
    return accumulate


def _sdot(acc, data, weight):
    return T.call_llvm_pure_intrin("int32x4", T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot"), acc, data, weight)


@dataclass(frozen=True)
class DotKernel:
    """One instruction's shape: `group` operands per int32 lane, `lanes` lanes per register."""

    name: str
    operand: str  # dtype of the activations in the instruction
    accepts: tuple[str, ...]  # conv operand dtypes that convert to the kernel's exactly
    group: int
    lanes: int
    accumulators: int  # registers for the tile; the rest hold weights and the broadcast group
    accumulate: Callable  # (acc, data group broadcast, weights) -> acc: TIR vectors
    weight_operand: str = ""  # dtype of the weights in the instruction, when not `operand`
    offset: int = 0  # added to the activations to make them `operand` (subtracted again through the weights)

    @property
    def weights(self) -> str:
        return self.weight_operand or self.operand


KERNELS = {
    "pmaddwd": DotKernel("pmaddwd", "int16", ("int8", "uint8", "int16"), 2, 8, 14, _pmaddwd),  # 16 ymm
    "vnni512": DotKernel("vnni512", "uint8", ("int8",), 4, 16, 14, _vpdpbusd(512), "int8", 128),  # 2 x 7 tiles
    "vnni256": DotKernel("vnni256", "uint8", ("int8",), 4, 8, 14, _vpdpbusd(256), "int8", 128),  # 16 ymm
    "sdot": DotKernel("sdot", "int8", ("int8",), 4, 4, 24, _sdot),  # 32 NEON registers
}


def dot_layers(mod: tvm.IRModule, kernel: DotKernel) -> tvm.IRModule:
    """Every integer conv2d `fits` and matmul `fits_matmul` accepts becomes a call to `kernel`."""
    kernels: dict[tuple, tvm.ir.GlobalVar] = {}
    builder = relax.BlockBuilder(mod)

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if fits_matmul(call, kernel):
                return _dot_matmul(call, kernel, builder, kernels)
            return _dot_conv(call, kernel, builder, kernels) if fits(call, kernel) else call

    rewrite = Rewrite(mod)
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            builder.update_func(gvar, rewrite.visit_expr(func))
    return relax.transform.Normalize()(builder.get())


def fits(call: relax.Expr, kernel: DotKernel) -> bool:
    """An NCHW conv2d on operands `kernel` accepts, groups 1, no dilation, constant weights, int32 sums."""
    if not isinstance(call, relax.Call) or not call.op.same_as(tvm.ir.Op.get("relax.nn.conv2d")):
        return False
    data, weight = call.args[:2]
    a = call.attrs
    return (str(data.ty.dtype) in kernel.accepts and isinstance(weight, GenericConst)
            and str(weight.ty.dtype) in kernel.accepts and str(a.out_dtype) == INT32
            and int(a.groups) == 1 and all(int(d) == 1 for d in a.dilation)
            and (a.data_layout, a.kernel_layout, a.out_layout or a.data_layout) == ("NCHW", "OIHW", "NCHW")
            and all(isinstance(s, tvm.tirx.IntImm) for s in data.ty.shape))


def fits_matmul(call: relax.Expr, kernel: DotKernel) -> bool:
    """A matmul of static activations [..., M, K] `kernel` accepts by a constant 2-D weight [K, N], int32 sums."""
    if not isinstance(call, relax.Call) or not call.op.same_as(tvm.ir.Op.get("relax.matmul")):
        return False
    data, weight = call.args
    return (str(data.ty.dtype) in kernel.accepts and isinstance(weight, GenericConst)
            and str(weight.ty.dtype) in kernel.accepts and len(weight.ty.shape) == 2
            and str(call.attrs.out_dtype) == INT32 and len(data.ty.shape) >= 2
            and all(isinstance(s, tvm.tirx.IntImm) for s in data.ty.shape))


def count_fitting(mod: tvm.IRModule, kernel: DotKernel) -> int:
    """Integer convs and matmuls `dot_layers` would run on `kernel`: for the compile report."""
    found = [0]

    def visit(expr: relax.Expr) -> None:
        found[0] += fits(expr, kernel) or fits_matmul(expr, kernel)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found[0]


def _dot_conv(call: relax.Call, kernel: DotKernel, builder: relax.BlockBuilder, kernels: dict) -> relax.Expr:
    data, attrs = call.args[0], call.attrs
    return _dot_kernel_call(data, str(data.ty.dtype), tuple(int(d) for d in data.ty.shape),
                            call.args[1].value.numpy(), tuple(int(s) for s in attrs.strides),
                            tuple(int(p) for p in attrs.padding), (int(call.ty.shape[2]), int(call.ty.shape[3])),
                            kernel, builder, kernels)


def _dot_kernel_call(data: relax.Expr, dtype: str, shape: tuple[int, ...], weight: np.ndarray,
                     strides: tuple[int, ...], padding: tuple[int, ...], out_size: tuple[int, int],
                     kernel: DotKernel, builder: relax.BlockBuilder, kernels: dict) -> relax.Expr:
    """conv2d(data: NCHW `shape` of `dtype`, constant OIHW `weight`) -> int32 NCHW, through `kernel`."""
    g, lanes = kernel.group, kernel.lanes
    weight = weight.astype(np.int64)
    n, c, h, w = shape
    oc, _, kh, kw = weight.shape
    sh, sw = strides
    top, left, bottom, right = padding
    ho, wo = out_size
    blocks = -(-oc // lanes)
    obb, xs, wo_padded = tile(blocks, wo, kernel.accumulators)
    extra = max(0, (wo_padded - 1) * sw + kw - (w + left + right))  # the last strip reads past the row
    cg, hp, wp = -(-c // g), h + top + bottom, w + left + right + extra

    if kernel.offset:  # int8 -> u8: x + 128, in int16 so that it does not wrap
        x = relax.op.astype(relax.op.add(relax.op.astype(data, "int16"), relax.const(kernel.offset, "int16")),
                            kernel.operand)
    else:
        x = data if dtype == kernel.operand else relax.op.astype(data, kernel.operand)
    x = relax.op.nn.pad(x, [0, 0, 0, g * cg - c, top, bottom, left, right + extra], pad_value=float(kernel.offset))
    x = relax.op.permute_dims(relax.op.reshape(x, (n, cg, g, hp, wp)), [0, 1, 3, 4, 2])
    key = (n, cg, hp, wp, blocks, kh, kw, ho, wo_padded, sh, sw, xs, obb)
    if key not in kernels:
        work = n * blocks * lanes * ho * wo_padded * cg * g * kh * kw
        func = dot_conv(kernel, *key, parallel=work >= MIN_PARALLEL)
        kernels[key] = builder.add_func(func, f"conv2d_{kernel.name}")
    out = relax.call_tir(kernels[key], [x, relax.const(pack_weight(weight, kernel))],
                         relax.TensorType((n, blocks, ho, wo_padded, lanes), INT32))
    out = relax.op.reshape(relax.op.permute_dims(out, [0, 1, 4, 2, 3]), (n, blocks * lanes, ho, wo_padded))
    if blocks * lanes != oc or wo_padded != wo:
        out = relax.op.strided_slice(out, [1, 3], [0, 0], [oc, wo])
    if kernel.offset:  # the offset times each output channel's weight sum
        shift = (kernel.offset * weight.reshape(oc, -1).sum(axis=1)).astype(np.int32).reshape(1, oc, 1, 1)
        out = relax.op.subtract(out, relax.const(shift))
    return out


def _dot_matmul(call: relax.Call, kernel: DotKernel, builder: relax.BlockBuilder, kernels: dict) -> relax.Expr:
    """x[..., M, K] @ W[K, N] as the 1x1 conv of x's rows as pixels ([1, K, 1, rows]) with W as [N, K, 1, 1]."""
    data, weight = call.args
    shape = [int(d) for d in data.ty.shape]
    rows, depth = int(np.prod(shape[:-1])), shape[-1]
    columns = int(weight.ty.shape[1])
    pixels = relax.op.reshape(relax.op.permute_dims(relax.op.reshape(data, (rows, depth)), [1, 0]), (1, depth, 1, rows))
    conv = _dot_kernel_call(pixels, str(data.ty.dtype), (1, depth, 1, rows),
                            weight.value.numpy().T.reshape(columns, depth, 1, 1), (1, 1), (0, 0, 0, 0), (1, rows),
                            kernel, builder, kernels)
    out = relax.op.permute_dims(relax.op.reshape(conv, (columns, rows)), [1, 0])
    return relax.op.reshape(out, (*shape[:-1], columns))


def tile(blocks: int, width: int, accumulators: int) -> tuple[int, int, int]:
    """(blocks of output channels, pixels, padded output width) of the register tile: the most
    blocks (up to 4) that leave room for 4 pixels, then a divisor of the width when one is at least 4."""
    obb = next(b for b in (4, 2, 1) if blocks % b == 0 and b * 4 <= accumulators)
    most = accumulators // obb
    divisor = max(d for d in range(1, min(width, most) + 1) if width % d == 0)
    if divisor >= 4 or width <= most:
        return obb, divisor, width
    return obb, most, -(-width // most) * most


def pack_weight(weight: np.ndarray, kernel: DotKernel) -> np.ndarray:
    """OIHW integers -> [OC/L, C/G, KH, KW, L, G], zero-padded to whole blocks and channel groups."""
    oc, c, kh, kw = weight.shape
    g, lanes = kernel.group, kernel.lanes
    padded = np.zeros((-(-oc // lanes) * lanes, -(-c // g) * g, kh, kw), kernel.weights)
    padded[:oc, :c] = weight
    blocks, groups = padded.shape[0] // lanes, padded.shape[1] // g
    return np.ascontiguousarray(padded.reshape(blocks, lanes, groups, g, kh, kw).transpose(0, 2, 4, 5, 1, 3))


def dot_conv(kernel: DotKernel, n: int, cg: int, hp: int, wp: int, blocks: int, kh: int, kw: int, ho: int, wo: int,
             sh: int, sw: int, xs: int, obb: int, parallel: bool) -> tirx.PrimFunc:
    """D[n, cg, hp, wp, G] (padded, channel groups) * W[blocks, cg, kh, kw, L, G] -> O[n, blocks, ho, wo, L] int32.

    One task computes `obb` blocks of L output channels for one output row, `xs` pixels at a time:
    for each input-channel group and kernel tap, the group of activations is broadcast to all
    lanes and one instruction multiplies it with the L output channels' weight groups.
    """
    operand, g, lanes, accumulate = kernel.operand, kernel.group, kernel.lanes, kernel.accumulate
    vector, group, weights = f"{operand}x{g * lanes}", f"{operand}x{g}", f"{kernel.weights}x{g * lanes}"
    strips, tasks = wo // xs, blocks // obb
    tile = obb * xs
    outer = T.parallel if parallel else T.serial

    @T.prim_func
    def conv(D: T.Buffer((n, cg, hp, wp, g), operand), W: T.Buffer((blocks, cg, kh, kw, lanes, g), kernel.weights),
             O: T.Buffer((n, blocks, ho, wo, lanes), INT32)):
        T.func_attr({"tir.noalias": True, KERNEL_ATTR: kernel.name})
        for task in outer(n * tasks * ho):
            for strip in T.serial(strips):
                acc = T.alloc_buffer((tile * lanes,), INT32, scope="global")  # small: LLVM keeps it in registers
                for i in T.unroll(tile):
                    acc[T.ramp(i * lanes, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                for c, ky, kx in T.grid(cg, kh, kw):
                    for xi in T.unroll(xs):
                        for bi in T.unroll(obb):
                            acc[T.ramp((bi * xs + xi) * lanes, 1, lanes)] = accumulate(
                                acc[T.ramp((bi * xs + xi) * lanes, 1, lanes)],
                                T.reinterpret(T.broadcast(T.reinterpret(D.vload(
                                    [task // (tasks * ho), c, task % ho * sh + ky, (strip * xs + xi) * sw + kx, 0],
                                    group), dtype=INT32), lanes), dtype=vector),
                                W.vload([task // ho % tasks * obb + bi, c, ky, kx, 0, 0], weights))
                for bi in T.unroll(obb):
                    for xi in T.unroll(xs):
                        O[task // (tasks * ho), task // ho % tasks * obb + bi, task % ho, strip * xs + xi,
                          T.ramp(0, 1, lanes)] = acc[T.ramp((bi * xs + xi) * lanes, 1, lanes)]

    return conv.without_attr("global_symbol")  # each kernel is named where it is added to the module
