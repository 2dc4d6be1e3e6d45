"""CPU schedules for the Relax modules `tvm.lower` produces: fast x86 (AVX2) code without MetaSchedule.

`schedule_cpu(mod, target)` legalizes and fuses the module itself, then schedules every PrimFunc
with a few fixed rules, each one function below:

* conv2d (NCHW; any stride, padding, groups, depthwise; float32, or integer with int32 sums): output
  channels in blocks of 8 (one AVX2 register of int32/float32) times a row strip of up to 8 pixels
  held in registers, the reduction outside them, the fused epilogue (bias, BN, requantize, clip,
  residual add) computed at the tile, the outer loop parallel. Weights are repacked at compile time
  (OIHW -> O/8 I H W 8o) so the 8 output channels are one vector load; the Relax constants are
  rewritten to the packed layout beside the PrimFunc's parameter.
* depthwise conv2d (one input channel per group): 8 (or 4) output pixels along the row vectorized
  instead (8 output channels would read 8 different input channels), weight broadcast, epilogue at
  the tile.
* dense/matmul: 8 output columns (vectorized) x up to 8 rows in registers, reduction outside them,
  epilogue at the tile; constant weights repacked ([K, N] -> N/8 K 8n) to stream contiguously.
* relayout: an elementwise chain between a dot kernel's packed sums and the next one's packed input
  (requantize, activation, Q/DQ, residual add) runs in channel blocks, then a second block moves
  bytes into the output's layout (`schedule_relayout`).
* fallback: parallel outer and vectorized innermost spatial loop of elementwise, pooling and
  reduction blocks, and of any conv/matmul a rule does not take (output channels or columns not a
  multiple of 8, non-constant weights, conv2d_transpose). Loops go parallel only above
  MIN_PARALLEL operations: on the small kernels waking the thread pool costs more than it saves.

Integer convs run one of these kernels (`int_kernel`), all exact; "auto" picks the target's best
dot-product kernel (vnni512, vnni256, pmaddwd on x86 as its features allow, sdot on aarch64 with
+dotprod), else "integer":
* "integer": int8 operands widened to int32 in the inner loop (vpmovsx + vpmulld), on any CPU.
  Wider operands (int16/int32, widened once ahead) measured the same: the int32 multiply bounds them.
* "pmaddwd" (x86 AVX2), "vnni512"/"vnni256" (x86 `vpdpbusd` on zmm/ymm) and "sdot" (ARM dotprod):
  hand-written TIR kernels on those instructions, for convs and for matmuls by constant weights
  (`tvm_dot`; `Schedule.tensorize` segfaults in apache-tvm 0.27.0.post1). pmaddwd has about 3.5x
  the "integer" kernel's throughput; on CPUs without VNNI it is as fast as float32 FMA, no faster.
  The convs they do not take (depthwise, grouped) run "float-exact" where they fit, else "integer".
* "float-exact": a conv whose every partial sum provably stays below 2^24 in magnitude (max over
  output channels of sum|w| * 128, from the constant weights) runs as a float32 FMA conv and casts
  the sums back to int32: float32 holds all those integers, so the result is bit-identical in any
  summation order. A conv over the bound is split into up to 4 input-channel chunks that each meet
  it, their int32 results added; grouped convs are not split. Convs that still fail keep "integer".

exp, erf, tanh, sigmoid and softmax legalize to vectorizable polynomials (`tvm_fast_math`).

The result builds with plain `tvm.compile(result, target=target)`: its default pipeline finds no
Relax operator left to legalize, and its TIR pipeline lowers the scheduled PrimFuncs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax, s_tir, tirx
from tvm.ir import GenericConst
from tvm.target.codegen import target_has_features

from . import INT_KERNELS
from .tvm_passes.common import rewrite_functions
from .tvm_fast_math import FAST_MATH
from .tvm_dot import KERNEL_ATTR, KERNELS as DOT_KERNELS, DotKernel, dot_layers, fits

LOG = logging.getLogger(__name__)
LANES = 8  # AVX2: 8 x int32 / float32 per ymm register
MAX_STRIP = 8  # output pixels per register tile (8 accumulators + operands fit the 16 ymm registers)
MIN_PARALLEL = 1 << 20  # fewer operations (MACs, elements) than this: threads cost more than they save
PARALLEL_TASKS = 64  # enough tasks to balance the threads
ELEMENT_WORK = 64  # operations per element of a requantize/activation chain, for the parallel threshold
EXACT_FLOAT = 2 ** 24  # float32 holds every integer of smaller magnitude exactly

CONSTANTS = (tvm.ir.prim.expr.IntImm, tvm.ir.prim.expr.FloatImm)
Packing = dict[int, Callable[[np.ndarray], np.ndarray]]  # PrimFunc parameter index -> constant repack


def int_kernel_for(choice: str, target: tvm.target.Target) -> str:
    """The integer conv kernel `choice` means on `target`: "auto" is the target's dot-product kernel if it has one."""
    if choice not in INT_KERNELS:
        raise ValueError(f"int_kernel must be one of {INT_KERNELS}, not {choice!r}")
    llvm = target.kind.name == "llvm"
    has = lambda *features: llvm and bool(target_has_features(list(features), target))  # noqa: E731
    available = {"vnni512": has("avx512vnni", "avx512bw"),  # in order of preference: multiply-adds per instruction
                 "vnni256": has("avxvnni") or has("avx512vnni", "avx512vl"),
                 "pmaddwd": has("avx2"),
                 "sdot": llvm and "aarch64" in str(target.attrs.get("mtriple", "")) and has("dotprod")}
    if choice in available and not available[choice]:
        needs = {"pmaddwd": "an x86 target with AVX2 (e.g. --mcpu x86-64-v3)",
                 "vnni512": "an x86 target with AVX512-VNNI (e.g. --mcpu icelake-server, sapphirerapids, znver4)",
                 "vnni256": "an x86 target with AVX-VNNI or AVX512-VNNI (e.g. --mcpu alderlake, sapphirerapids)",
                 "sdot": "an aarch64 target with dot products (--mattr +neon,+dotprod)"}[choice]
        raise ValueError(f"the {choice} kernel needs {needs}")
    if choice == "auto":
        return next((name for name, ok in available.items() if ok), "integer")
    return choice


def schedule_cpu(mod: tvm.IRModule, target: tvm.target.Target, int_kernel: str = "auto") -> tvm.IRModule:
    """Legalize, fuse and schedule `mod` for a CPU `target`; `tvm.compile(result, target=target)` builds it."""
    int_kernel = int_kernel_for(int_kernel, target)
    with target:
        if int_kernel == "float-exact":
            mod = exact_float_convs(mod)
        elif int_kernel in DOT_KERNELS:  # what the dot kernel does not take (depthwise convs) runs exact in float32
            mod = exact_float_convs(dot_layers(mod, DOT_KERNELS[int_kernel]))
        mod = tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.LegalizeOps(FAST_MATH),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
        ])(mod)
    constant_args = _constant_arguments(mod)
    relaid: dict[str, tuple[tirx.PrimFunc, Packing]] = {}
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and KERNEL_ATTR not in (func.attrs or {}):
            scheduled, packing = schedule_primfunc(func, constant_args.get(gvar.name_hint, set()), gvar.name_hint)
            if packing:
                relaid[gvar.name_hint] = scheduled, packing  # new signature: needs a new GlobalVar
            else:
                mod[gvar] = scheduled
    return _repack_constants(mod, relaid)


def schedule_primfunc(func: tirx.PrimFunc, constant_params: set[int],
                      func_name: str = "") -> tuple[tirx.PrimFunc, Packing]:
    """Apply the first matching rule to the main reduction block (without one: inline the elementwise
    chain into one block), then the fallback to what is left."""
    sch = s_tir.Schedule(func)
    packing: Packing = {}
    main = _main_reduction(sch)
    if main is not None:
        rules = [schedule_depthwise, schedule_conv] if _is_depthwise(sch, main) else \
            [schedule_conv] if _is_conv(sch, main) else [schedule_dense] if _is_dense(sch, main) else []
        for rule in rules:
            attempt = sch.copy()
            try:
                packing = rule(attempt, main, constant_params)
                sch = attempt
                LOG.debug("%s: %s", func_name, rule.__name__)
                break
            except (RuntimeError, ValueError) as exc:
                LOG.debug("%s: %s failed: %s", func_name, rule.__name__, str(exc).strip().splitlines()[-1])
    else:
        attempt = sch.copy()
        if _try(lambda: schedule_relayout(attempt)):
            sch = attempt
            LOG.debug("%s: schedule_relayout", func_name)
        else:
            _inline_injective(sch)
    sch = schedule_fallback(sch)
    return sch.mod["main"], packing


# --- rules -------------------------------------------------------------------------------------------

def schedule_conv(sch: s_tir.Schedule, conv: s_tir.SBlockRV, constant_params: set[int]) -> Packing:
    """Conv2d: 8 output channels (one vector) x a strip of pixels in registers, epilogue at the tile."""
    loops = sch.get_loops(conv)
    if len(loops) != 7:
        raise ValueError("not an NCHW conv2d loop nest")
    n, f, y, x, rc, ry, rx = loops
    channels, width = _extent(sch, f), _extent(sch, x)
    weight = _read_buffer_index(sch, conv, 1)
    param = _param_index(sch, _buffer_of(sch, conv, weight))
    if channels % LANES or param is None or param not in constant_params:
        raise ValueError("output channels not a multiple of 8, or weights not a constant")
    _inline_epilogue(sch, conv)
    sch.transform_layout(conv, ("read", weight), lambda o, i, h, w: (o // LANES, i, h, w, o % LANES))
    if _param_index(sch, sch.get(conv).writes[0].source) is None:  # an intermediate, not the caller's tensor
        sch.transform_layout(conv, ("write", 0), lambda b, c, h, w: (b, c // LANES, h, w, c % LANES))
    strip = _divisor_at_most(width, MAX_STRIP)
    fo, fi = sch.split(f, [None, LANES])
    xo, xi = sch.split(x, [None, strip])
    sch.reorder(n, fo, y, xo, rc, ry, rx, xi, fi)
    sch.unroll(xi)
    sch.vectorize(fi)
    reduction = _extent(sch, rc) * _extent(sch, ry) * _extent(sch, rx)
    _parallel(sch, [n, fo, y], _extent(sch, n) * channels * _extent(sch, y) * width * reduction)
    for consumer in sch.get_consumers(conv):
        sch.reverse_compute_at(consumer, xo, preserve_unit_loops=True)
        _vectorize_tile(sch, consumer)
    sch.decompose_reduction(conv, rc)
    return {param: _pack_oihw}


def schedule_depthwise(sch: s_tir.Schedule, conv: s_tir.SBlockRV, constant_params: set[int]) -> Packing:
    """Depthwise conv2d (one input channel per output): vectorize 8 output pixels along the row instead."""
    loops = sch.get_loops(conv)
    if len(loops) != 7 or _extent(sch, loops[4]) != 1:
        raise ValueError("not a depthwise NCHW conv2d loop nest")
    n, f, y, x, rc, ry, rx = loops
    width = _extent(sch, x)
    _inline_epilogue(sch, conv)
    lanes = next((v for v in (LANES, LANES // 2) if width % v == 0), None)  # 76-wide rows: 4 lanes
    xo, xi = sch.split(x, [None, lanes]) if lanes else (x, None)
    sch.reorder(n, f, y, xo, rc, ry, rx, *([xi] if xi is not None else []))
    if xi is not None:
        sch.vectorize(xi)
    work = _extent(sch, n) * _extent(sch, f) * _extent(sch, y) * width * _extent(sch, ry) * _extent(sch, rx)
    for consumer in sch.get_consumers(conv):
        sch.reverse_compute_at(consumer, xo if xi is not None else y, preserve_unit_loops=True)
        _vectorize_tile(sch, consumer)
    _parallel(sch, [n, f, y], work)  # after compute_at, which may need `y`; before decompose_reduction
    sch.decompose_reduction(conv, rc)
    return {}


def schedule_dense(sch: s_tir.Schedule, dense: s_tir.SBlockRV, constant_params: set[int]) -> Packing:
    """Matmul/dense: 8 output columns (one vector) x a strip of up to 8 rows in registers, the
    reduction outside them, epilogue at the tile. A constant 2-D weight [K, N] is repacked to
    [N/8, K, 8], so a block of columns streams through contiguous memory (an LSTM's recurrent
    matmul reads 4 MB of weights per step: strided, half of each cache line was wasted)."""
    loops = sch.get_loops(dense)
    spatial, reduction = loops[:-1], loops[-1]
    columns = _extent(sch, spatial[-1])
    if columns % LANES:
        raise ValueError("output columns not a multiple of 8")
    _inline_epilogue(sch, dense)
    weight = _read_buffer_index(sch, dense, 1)
    param = _param_index(sch, _buffer_of(sch, dense, weight))
    packing: Packing = {}
    if param is not None and param in constant_params and len(_buffer_of(sch, dense, weight).shape) == 2:
        sch.transform_layout(dense, ("read", weight), lambda k, n: (n // LANES, k, n % LANES))
        packing = {param: _pack_kn}
    rows = sch.fuse(*spatial[:-1]) if len(spatial) > 2 else spatial[0] if len(spatial) == 2 else None
    jo, ji = sch.split(spatial[-1], [None, LANES])
    work, tile = columns * _extent(sch, reduction), jo
    if rows is None:
        sch.reorder(jo, reduction, ji)
    else:  # each task: one block of columns for every strip of rows, its weights read from cache
        work *= _extent(sch, rows)
        ro, ri = sch.split(rows, [None, _divisor_at_most(_extent(sch, rows), MAX_STRIP)])
        sch.reorder(jo, ro, reduction, ri, ji)
        sch.unroll(ri)
        tile = ro
    sch.vectorize(ji)
    _parallel(sch, [jo], work)
    for consumer in sch.get_consumers(dense):
        sch.reverse_compute_at(consumer, tile, preserve_unit_loops=True)
        _vectorize_tile(sch, consumer)
    sch.decompose_reduction(dense, reduction)
    return packing


def schedule_relayout(sch: s_tir.Schedule) -> None:
    """An elementwise chain next to layout changes (a conv's packed int32 sums -> NCHW -> requantize,
    activation, Q/DQ, residual add -> pad and pack for the next conv), computed in channel blocks.

    Inlined into one block, the chain would run at the output's packed index and gather its inputs
    through divisions and modulos, 4 bytes at a time. Instead the elementwise part runs as one block
    over [N, C/L, H, W, L] (L = the gcd of C and the packed inputs' last axes: reads contiguous, L
    lanes vectorized; without a packed input it stays NCHW, its rows vectorized) into an
    intermediate, and a second block only moves the values into the output's layout (an NCHW
    output too: a plain copy, which measured 10% faster over the YOLOX and PicoDet models than
    the gathers, though slower for some layers alone).
    """
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    moves = [_is_layout(sch, block) for block in blocks]
    if all(moves) or not any(moves):
        raise ValueError("no elementwise chain next to a layout change")
    if any(_is_select(sch, block) for block in blocks):  # both branches would be computed per lane: 3.4x slower
        raise ValueError("a concatenation")
    body = max(i for i, m in enumerate(moves) if not m)
    for block in blocks[:body] + blocks[body + 1:-1]:
        sch.compute_inline(block)
    body = blocks[body]
    iters = sch.get(body).iter_vars
    if len(iters) != 4:
        raise ValueError("the elementwise part is not NCHW")
    packed = [r.source for r in sch.get(body).reads
              if len(r.source.shape) == 5 and _param_index(sch, r.source) is not None]
    out = blocks[-1] if moves[-1] else sch.cache_write(body, 0, "global")
    lanes = math.gcd(int(iters[1].dom.extent), *(int(b.shape[-1]) for b in packed)) if packed else 0
    if packed and lanes >= 4:
        block_layout = lambda n, c, h, w: (n, c // lanes, h, w, c % lanes)  # noqa: E731
        sch.transform_layout(body, ("write", 0), block_layout)
        sch.transform_block_layout(body, block_layout)
    elif not moves[-1] or packed:
        raise ValueError("neither a packed input nor a layout change after the chain")
    for block in (body, out):
        loops = sch.get_loops(block)
        size = 1
        for loop in loops:
            size *= _extent(sch, loop)
        inner = loops[-1]
        if _extent(sch, inner) > 16 and _extent(sch, inner) % 16 == 0:
            inner = sch.split(inner, [None, 16])[1]
        _parallel(sch, loops[1:-2] if len(loops) > 4 else loops[1:-1], size * ELEMENT_WORK)
        if _extent(sch, inner) in (4, 8, 16):
            sch.vectorize(inner)


def schedule_fallback(sch: s_tir.Schedule) -> s_tir.Schedule:
    """Elementwise, pooling, reductions: parallel outer spatial loops, vectorize the innermost spatial loop."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        kinds = _loop_kinds(sch, block)
        if not loops or kinds is None or "spatial" not in kinds or len(sch.get_child_blocks(loops[0])) != 1:
            continue  # scheduled by a rule, not a plain legalized nest, or sharing loops with other blocks
        attempt = sch.copy()
        if _try(lambda: _parallel_vectorize(attempt, block, loops, kinds)):
            sch = attempt
    return sch


def _parallel_vectorize(sch: s_tir.Schedule, block: s_tir.SBlockRV, loops: list[s_tir.LoopRV],
                        kinds: list[str]) -> None:
    """Reductions outside the innermost spatial loop; fuse the other spatial loops parallel; vectorize."""
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == "spatial"]
    reduction = [loop for loop, kind in zip(loops, kinds) if kind == "reduction"]
    if reduction:
        sch.reorder(*spatial[:-1], *reduction, spatial[-1])
    size = 1
    for loop in loops:
        size *= _extent(sch, loop)
    inner = spatial[-1]
    if _extent(sch, inner) > 4 * LANES:
        inner = sch.split(inner, [None, LANES])[1]
    _parallel(sch, spatial[:-1], size)
    if _extent(sch, inner) > 1:
        sch.vectorize(inner)
    if reduction:
        sch.decompose_reduction(block, reduction[0])


# --- Relax-level rewrites ----------------------------------------------------------------------------

def exact_float_convs(mod: tvm.IRModule) -> tvm.IRModule:
    """int8 conv2d with constant weights -> float32 convs that provably compute the same int32 sums."""

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            chunks = _exact_split(call)
            return call if chunks is None else _exact_float_conv(call, chunks)

    return relax.transform.Normalize()(rewrite_functions(mod, Rewrite(mod).visit_expr))


def exact_float_plan(mod: tvm.IRModule, dot: DotKernel | None = None) -> tuple[int, int]:
    """(int8 convs that run in float32, int8 convs left on integers) under `float-exact`, or under the
    `dot` kernel for the convs it does not take: for the compile report."""
    counts = [0, 0]

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get("relax.nn.conv2d")) \
                and str(expr.args[0].ty.dtype) == "int8" and not (dot is not None and fits(expr, dot)):
            counts[_exact_split(expr) is None] += 1

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return counts[0], counts[1]


def _exact_split(call: relax.Call) -> list[tuple[int, int]] | None:
    """Input-channel ranges of an int8 conv with constant weights whose float32 sums stay exact; None: no split does."""
    if not call.op.same_as(tvm.ir.Op.get("relax.nn.conv2d")):
        return None
    data, weight = call.args[:2]
    if str(data.ty.dtype) != "int8" or not isinstance(weight, GenericConst):
        return None
    values = weight.value.numpy()
    if int(call.attrs.groups) == 1:
        return _exact_chunks(values)  # input channels can be split: a partial conv per chunk
    return [(0, values.shape[1])] if _partial_bound(values) < EXACT_FLOAT else None


def _exact_float_conv(call: relax.Call, chunks: list[tuple[int, int]]) -> relax.Expr:
    """An int8 conv as float32 convs over input-channel chunks whose sums stay below 2^24, added in int32."""
    attrs, weight = call.attrs, call.args[1].value.numpy()
    wide = relax.op.astype(call.args[0], "float32")
    total = None
    for start, stop in chunks:
        part = wide if (start, stop) == (0, weight.shape[1]) else relax.op.strided_slice(wide, [1], [start], [stop])
        conv = relax.op.nn.conv2d(part, relax.const(np.ascontiguousarray(weight[:, start:stop]).astype(np.float32)),
                                  attrs.strides, attrs.padding, attrs.dilation, attrs.groups, attrs.data_layout,
                                  attrs.kernel_layout, attrs.out_layout, "float32")
        conv = relax.op.astype(conv, str(attrs.out_dtype))
        total = conv if total is None else relax.op.add(total, conv)
    return total


def _partial_bound(weight: np.ndarray) -> int:
    """Largest |partial sum| of an int8-input conv: max over output channels of sum|w| * 128."""
    return int(np.abs(weight.astype(np.int64)).reshape(weight.shape[0], -1).sum(1).max()) * 128


def _exact_chunks(weight: np.ndarray, max_chunks: int = 4) -> list[tuple[int, int]] | None:
    """Contiguous input-channel ranges, each with a partial-sum bound below 2^24 (None: more than max_chunks)."""
    per_channel = np.abs(weight.astype(np.int64)).sum(axis=(2, 3)) * 128  # (O, I)
    chunks, start, running = [], 0, np.zeros(weight.shape[0], np.int64)
    for channel in range(weight.shape[1]):
        if (running + per_channel[:, channel]).max() >= EXACT_FLOAT:
            if channel == start:
                return None  # one input channel alone can overflow
            chunks.append((start, channel))
            start, running = channel, np.zeros_like(running)
        running += per_channel[:, channel]
    chunks.append((start, weight.shape[1]))
    return chunks if len(chunks) <= max_chunks else None


def _constant_arguments(mod: tvm.IRModule) -> dict[str, set[int]]:
    """PrimFunc name -> indices of the parameters every call_tir site passes a constant to."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    found: dict[str, set[int]] = {}

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            name = expr.args[0].name_hint
            constants = {i for i, arg in enumerate(expr.args[1].fields) if isinstance(arg, GenericConst)}
            found[name] = found[name] & constants if name in found else constants

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def _repack_constants(mod: tvm.IRModule, relaid: dict[str, tuple[tirx.PrimFunc, Packing]]) -> tvm.IRModule:
    """Call re-laid-out PrimFuncs through new GlobalVars (new signatures), with their constants repacked."""
    if not relaid:
        return mod
    call_tir = tvm.ir.Op.get("relax.call_tir")
    builder = relax.BlockBuilder(mod)
    renamed = {name: builder.add_func(func, name) for name, (func, _) in relaid.items()}
    mod = builder.get()

    @relax.expr_functor.mutator
    class Repack(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not call.op.same_as(call_tir) or call.args[0].name_hint not in relaid:
                return call
            name = call.args[0].name_hint
            packing = relaid[name][1]
            args = [relax.const(packing[i](arg.value.numpy())) if i in packing else arg
                    for i, arg in enumerate(call.args[1].fields)]
            return relax.Call(call.op, [renamed[name], relax.Tuple(args), *call.args[2:]], call.attrs,
                              call.ty_args, ret_ty=call.ty)

    repack = Repack(mod)
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gvar] = repack.visit_expr(func)
    return relax.transform.DeadCodeElimination()(mod)


def _pack_oihw(weight: np.ndarray) -> np.ndarray:
    """OIHW -> (O/8) I H W 8o, the layout `schedule_conv` gives the weight parameter."""
    o, i, h, w = weight.shape
    return np.ascontiguousarray(weight.reshape(o // LANES, LANES, i, h, w).transpose(0, 2, 3, 4, 1))


def _pack_kn(weight: np.ndarray) -> np.ndarray:
    """[K, N] -> [N/8, K, 8], the layout `schedule_dense` gives a constant weight."""
    k, n = weight.shape
    return np.ascontiguousarray(weight.reshape(k, n // LANES, LANES).transpose(1, 0, 2))


# --- helpers -----------------------------------------------------------------------------------------

def _main_reduction(sch: s_tir.Schedule) -> s_tir.SBlockRV | None:
    """The PrimFunc's reduction block with the most loop iterations (the conv or matmul of a fused kernel)."""
    best, best_size = None, 0
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        iters = sch.get(block).iter_vars
        if not any(iv.iter_type == tirx.IterVar.CommReduce for iv in iters):
            continue
        size = 1
        for iv in iters:
            size *= int(iv.dom.extent)
        if size > best_size:
            best, best_size = block, size
    return best


def _is_conv(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> bool:
    name = sch.get(block).name_hint
    return name.startswith(("conv2d_nchw", "group_conv2d_nchw", "depthwise_conv2d_nchw"))


def _is_depthwise(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> bool:
    """A grouped conv with one input channel per group (its rc loop has extent 1)."""
    iters = sch.get(block).iter_vars
    return _is_conv(sch, block) and len(iters) == 7 and int(iters[4].dom.extent) == 1 and \
        int(iters[1].dom.extent) > 1 and sch.get(block).name_hint.startswith(("group", "depthwise"))


def _is_dense(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> bool:
    name = sch.get(block).name_hint
    iters = sch.get(block).iter_vars
    return name.startswith(("matmul", "T_matmul", "T_dense", "dense")) and \
        [iv.iter_type for iv in iters][-1] == tirx.IterVar.CommReduce and \
        sum(iv.iter_type == tirx.IterVar.CommReduce for iv in iters) == 1


def _inline_epilogue(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> None:
    """Inline the elementwise chain after `block` into the last block, so one block reads the sums."""
    changed = True
    while changed:
        changed = False
        for consumer in sch.get_consumers(block):
            if sch.get_consumers(consumer) and _try(lambda: sch.compute_inline(consumer)):
                changed = True
                break
        if not changed:
            for consumer in sch.get_consumers(block):
                for before in sch.get_producers(consumer):
                    if not sch.get(before).same_as(sch.get(block)) and _try(lambda: sch.compute_inline(before)):
                        changed = True
                        break
                if changed:
                    break
        if not changed:
            for consumer in sch.get_consumers(block):
                for after in sch.get_consumers(consumer):
                    if _try(lambda: sch.reverse_compute_inline(after)):
                        changed = True
                        break
                if changed:
                    break


def _is_layout(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> bool:
    """A block that only moves values (transpose, reshape, slice, pad): it stores a load, or a
    load-or-constant."""
    value = _stored_value(sch, block)
    if _is_if_then_else(value):
        value = value.args[1] if isinstance(value.args[2], CONSTANTS) else None
    return isinstance(value, tvm.ir.expr.TensorLoad)


def _is_select(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> bool:
    """A block choosing between two computed values (a concatenation), not a value and padding."""
    value = _stored_value(sch, block)
    return _is_if_then_else(value) and not isinstance(value.args[2], CONSTANTS)


def _stored_value(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> tvm.ir.expr.Expr | None:
    body = sch.get(block).body
    return body.value if isinstance(body, tvm.tirx.stmt.BufferStore) else None


def _is_if_then_else(value: tvm.ir.expr.Expr | None) -> bool:
    return isinstance(value, tvm.ir.expr.Call) and value.op.same_as(tvm.ir.Op.get("prim.if_then_else"))


def _inline_injective(sch: s_tir.Schedule) -> None:
    """Inline every block of an elementwise chain into the next: one pass over memory instead of one per op."""
    changed = True
    while changed:
        changed = False
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get_consumers(block) and _try(lambda: sch.compute_inline(block)):
                changed = True
                break


def _vectorize_tile(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> None:
    """Vectorize the innermost loop of an epilogue tile when it is a whole vector or a few."""
    loops = sch.get_loops(block)
    if loops and _extent(sch, loops[-1]) in (4, 8, 16):
        sch.vectorize(loops[-1])


def _parallel(sch: s_tir.Schedule, loops: list[s_tir.LoopRV], work: int) -> None:
    """Fuse the outer loops into one parallel loop when `work` (operations) pays for waking threads:
    only as many as give PARALLEL_TASKS tasks, since each fused loop costs a division per iteration."""
    loops = [loop for loop in loops if _extent(sch, loop) > 1] or loops[:1]
    if not loops or work < MIN_PARALLEL:
        return
    tasks, prefix = 1, []
    for loop in loops:
        prefix.append(loop)
        tasks *= _extent(sch, loop)
        if tasks >= PARALLEL_TASKS:
            break
    sch.parallel(sch.fuse(*prefix) if len(prefix) > 1 else prefix[0])


def _loop_kinds(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> list[str] | None:
    """'spatial'/'reduction' per loop of a legalized block whose loops bind its iteration variables in order."""
    loops, iters = sch.get_loops(block), sch.get(block).iter_vars
    if len(loops) != len(iters) or any(int(sch.get(l).extent) != int(iv.dom.extent) for l, iv in zip(loops, iters)):
        return None
    kinds = {tirx.IterVar.DataPar: "spatial", tirx.IterVar.CommReduce: "reduction"}
    found = [kinds.get(iv.iter_type) for iv in iters]
    return None if None in found else found


def _read_buffer_index(sch: s_tir.Schedule, block: s_tir.SBlockRV, operand: int) -> int:
    """Index in the block's reads of the `operand`-th multiplied buffer (0 data, 1 weight)."""
    reads = sch.get(block).reads
    writes = [w.source for w in sch.get(block).writes]
    operands = [i for i, r in enumerate(reads) if not any(r.source.same_as(w) for w in writes)]
    return operands[operand]


def _buffer_of(sch: s_tir.Schedule, block: s_tir.SBlockRV, read_index: int) -> tirx.Buffer:
    return sch.get(block).reads[read_index].source


def _param_index(sch: s_tir.Schedule, buffer: tirx.Buffer) -> int | None:
    func = sch.mod["main"]
    for i, param in enumerate(func.params):
        if param.same_as(buffer):
            return i
    return None


def _extent(sch: s_tir.Schedule, loop: s_tir.LoopRV) -> int:
    return int(sch.get(loop).extent)


def _divisor_at_most(value: int, limit: int) -> int:
    return max(d for d in range(1, min(value, limit) + 1) if value % d == 0)


def _try(action: Callable[[], None]) -> bool:
    try:
        action()
        return True
    except (RuntimeError, ValueError):
        return False
