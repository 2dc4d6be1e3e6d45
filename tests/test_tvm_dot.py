"""The dot-product conv kernels: vpmaddwd's int32 sums equal a numpy int64 conv for every shape it
takes (odd input channels, output channels not a multiple of 8, strides, uneven padding, widths
without a good strip, int16 operands centred on a zero point) and build into real vpmaddwd
instructions; the sdot kernel builds into real sdot instructions for aarch64 (it runs under qemu in
test_tvm_rpc); `auto` chooses each only where the target has the instruction."""

from __future__ import annotations

import numpy as np
import pytest

from qpasses.targets.lower.tvm_dot import KERNEL_ATTR, KERNELS, count_fitting, dot_layers, pack_weight
from qpasses.targets.lower.tvm_schedule import int_kernel_for, schedule_cpu

tvm = pytest.importorskip("tvm", reason="apache-tvm is a test dependency; pip install -e '.[test]'")
from tvm import relax, tirx  # noqa: E402

TARGET = {"kind": "llvm", "mcpu": "x86-64-v3"}
ARM_DOTPROD = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}


def conv_module(weight: np.ndarray, shape: tuple[int, ...], dtype: str, strides, padding, groups: int = 1):
    builder = relax.BlockBuilder()
    data = relax.Var("data", relax.TensorType(shape, dtype))
    with builder.function("main", [data]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.nn.conv2d(data, relax.const(weight), strides=strides, padding=padding,
                                                         groups=groups, out_dtype="int32"))
        builder.emit_func_output(out)
    return builder.get()


def reference(x: np.ndarray, w: np.ndarray, strides, padding) -> np.ndarray:
    """int64 conv2d; padding (top, left, bottom, right) as Relax orders it."""
    (sh, sw), (top, left, bottom, right) = strides, padding
    padded = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    kh, kw = w.shape[2:]
    ho, wo = (padded.shape[2] - kh) // sh + 1, (padded.shape[3] - kw) // sw + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo), np.int64)
    for dy in range(kh):
        for dx in range(kw):
            patch = padded[:, :, dy:dy + sh * (ho - 1) + 1:sh, dx:dx + sw * (wo - 1) + 1:sw]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, dy, dx].astype(np.int64))
    return out


def build_and_run(mod: tvm.IRModule, x: np.ndarray, target: dict = TARGET,
                  needs: tuple[str, ...] = ()) -> tuple[np.ndarray | None, str]:
    """The module's output on `x` (None when this CPU lacks a flag in `needs`) and its assembly."""
    executable = tvm.compile(mod, target=tvm.target.Target(target))
    asm = executable.mod.imports[0].inspect_source("asm")
    if not all(cpu_has(flag) for flag in needs):
        return None, asm
    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy(), asm


def cpu_has(flag: str) -> bool:
    with open("/proc/cpuinfo") as f:
        return flag in f.read().split()


CASES = {  # name: (data shape, data dtype, output channels, kernel, strides, padding (t, l, b, r))
    "3x3 s1": ((1, 16, 8, 8), "int8", 16, 3, (1, 1), (1, 1, 1, 1)),
    "odd channels, 12 outputs, width 11": ((1, 3, 13, 11), "int8", 12, 3, (1, 1), (1, 1, 1, 1)),
    "7x7 stride 2, uneven padding": ((2, 5, 17, 19), "int8", 24, 7, (2, 2), (3, 2, 2, 3)),
    "1x1 stride 2": ((1, 32, 14, 14), "int8", 64, 1, (2, 2), (0, 0, 0, 0)),
    "int16 (zero point subtracted)": ((1, 8, 9, 23), "int16", 8, 3, (1, 2), (0, 1, 1, 0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pmaddwd_conv_sums_equal_an_int64_reference(case):
    shape, dtype, channels, k, strides, padding = CASES[case]
    rng = np.random.default_rng(7)
    bound = 256 if dtype == "int16" else 128  # int16: u8 - zero point spans [-255, 255]
    x = rng.integers(-bound + 1, bound, size=shape).astype(dtype)
    w = rng.integers(-bound + 1, bound, size=(channels, shape[1], k, k)).astype(dtype)
    x.flat[:50] = -bound + 1  # extremes: every pair product at its largest magnitude
    w[0] = -bound + 1
    mod = conv_module(w, shape, dtype, strides, padding)
    assert count_fitting(mod, KERNELS["pmaddwd"]) == 1 and count_fitting(mod, KERNELS["sdot"]) == (dtype == "int8")
    got, asm = build_and_run(schedule_cpu(mod, tvm.target.Target(TARGET), "pmaddwd"), x)
    np.testing.assert_array_equal(got, reference(x, w, strides, padding))
    assert "vpmaddwd" in asm and "vpmulld" not in asm


VNNI = {  # kernel: (LLVM target, the /proc/cpuinfo flag running it needs, register in the instruction)
    "vnni512": ({"kind": "llvm", "mcpu": "icelake-server"}, "avx512_vnni", "zmm"),
    "vnni256": ({"kind": "llvm", "mcpu": "alderlake"}, "avx_vnni", "ymm"),
}


@pytest.mark.parametrize("kernel", list(VNNI))
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] == "int8"])
def test_vnni_conv_sums_equal_an_int64_reference(kernel, case):
    """vpdpbusd multiplies u8 by s8: the int8 activations are offset by 128 (padding as well) and
    128 * each channel's weight sum is taken off again. Extremes: -128 activations (0 after the
    offset) and 127 ones (255) against -128 and 127 weights. Run where this CPU has the instruction;
    elsewhere the build is checked for the instruction only."""
    shape, dtype, channels, k, strides, padding = CASES[case]
    target, flag, register = VNNI[kernel]
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, size=shape).astype(np.int8)
    w = rng.integers(-128, 128, size=(channels, shape[1], k, k)).astype(np.int8)
    x.flat[:40], x.flat[40:80], w[0], w[-1] = -128, 127, -128, 127
    mod = conv_module(w, shape, dtype, strides, padding)
    assert count_fitting(mod, KERNELS[kernel]) == 1
    got, asm = build_and_run(schedule_cpu(mod, tvm.target.Target(target), kernel), x, target, (flag,))
    assert f"vpdpbusd\t%{register}" in asm and "vpmulld" not in asm
    if got is not None:
        np.testing.assert_array_equal(got, reference(x, w, strides, padding))


def matmul_module(weight: np.ndarray, shape: tuple[int, ...], dtype: str):
    builder = relax.BlockBuilder()
    data = relax.Var("data", relax.TensorType(shape, dtype))
    with builder.function("main", [data]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.matmul(data, relax.const(weight), out_dtype="int32"))
        builder.emit_func_output(out)
    return builder.get()


MATMULS = {"rows x columns not whole blocks": ((1, 40, 30), 37), "batched 3-D": ((2, 5, 64), 48)}


@pytest.mark.parametrize("kernel", ["pmaddwd", *VNNI])
@pytest.mark.parametrize("case", list(MATMULS))
def test_matmul_with_constant_weights_runs_the_dot_kernel_exactly(kernel, case):
    """A matmul by a constant [K, N] runs as the 1x1 conv of its rows (the PP-OCR recogniser's
    18710-class CTC head took 23 ms on the generic kernel); its sums equal numpy's int64 matmul."""
    shape, columns = MATMULS[case]
    target, flag, register = VNNI.get(kernel, (TARGET, "avx2", "ymm"))
    rng = np.random.default_rng(5)
    x = rng.integers(-128, 128, size=shape).astype(np.int8)
    w = rng.integers(-128, 128, size=(shape[-1], columns)).astype(np.int8)
    x.flat[:30], w[:, 0] = -128, 127
    mod = matmul_module(w, shape, "int8")
    assert count_fitting(mod, KERNELS[kernel]) == 1
    got, asm = build_and_run(schedule_cpu(mod, tvm.target.Target(target), kernel), x, target, (flag,))
    assert ("vpmaddwd" if kernel == "pmaddwd" else f"vpdpbusd\t%{register}") in asm
    if got is not None:
        np.testing.assert_array_equal(got, x.astype(np.int64) @ w.astype(np.int64))


def test_kernel_reads_int16_channel_pairs_and_is_left_unscheduled():
    """The rewrite calls one hand-written PrimFunc on [N, C/2, H, W, 2] int16 data and [OC/8, C/2, KH, KW, 8, 2]
    weights; large convs get a parallel outer loop, small ones stay serial (threads would cost more)."""
    rng = np.random.default_rng(0)
    for shape, parallel in (((1, 64, 56, 56), True), ((1, 16, 8, 8), False)):
        w = rng.integers(-127, 128, size=(64, shape[1], 3, 3)).astype(np.int8)
        mod = schedule_cpu(conv_module(w, shape, "int8", (1, 1), (1, 1, 1, 1)), tvm.target.Target(TARGET), "pmaddwd")
        kernels = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and KERNEL_ATTR in f.attrs]
        assert len(kernels) == 1
        data, weight, out = kernels[0].params
        assert (str(data.dtype), str(weight.dtype), str(out.dtype)) == ("int16", "int16", "int32")
        assert [int(d) for d in data.shape] == [1, shape[1] // 2, shape[2] + 2, shape[3] + 2, 2]
        assert [int(d) for d in weight.shape] == [8, shape[1] // 2, 3, 3, 8, 2]
        assert ("T.parallel(" in kernels[0].script()) == parallel


def test_sdot_kernel_builds_into_sdot_instructions():
    w = np.random.default_rng(0).integers(-127, 128, size=(16, 6, 3, 3)).astype(np.int8)
    target = tvm.target.Target(ARM_DOTPROD)
    mod = schedule_cpu(conv_module(w, (1, 6, 12, 12), "int8", (1, 1), (1, 1, 1, 1)), target, "auto")
    (kernel,) = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and KERNEL_ATTR in f.attrs]
    data, weight, out = kernel.params
    assert [int(d) for d in data.shape] == [1, 2, 14, 14, 4] and str(data.dtype) == "int8"
    assert [int(d) for d in weight.shape] == [4, 2, 3, 3, 4, 4] and [int(d) for d in out.shape] == [1, 4, 12, 12, 4]
    asm = tvm.compile(mod, target=target).mod.imports[0].inspect_source("asm")
    assert "sdot\tv" in asm and "smlal" not in asm


def test_weight_packing_groups_input_channels_per_block_of_outputs():
    w = np.arange(10 * 3 * 2 * 2).reshape(10, 3, 2, 2)
    packed = pack_weight(w, KERNELS["pmaddwd"])
    assert packed.shape == (2, 2, 2, 2, 8, 2) and packed.dtype == np.int16
    for o, c, y, x in np.ndindex(w.shape):
        assert packed[o // 8, c // 2, y, x, o % 8, c % 2] == w[o, c, y, x]
    assert not packed[1, :, :, :, 2:].any() and not packed[:, 1, :, :, :, 1].any()  # zero padding
    packed = pack_weight(w, KERNELS["sdot"])
    assert packed.shape == (3, 1, 2, 2, 4, 4) and packed.dtype == np.int8
    assert packed[2, 0, 1, 0, 1, 2] == w[9, 2, 1, 0] and not packed[:, :, :, :, :, 3].any()


def test_grouped_convs_are_left_alone():
    w = np.ones((8, 1, 3, 3), np.int8)
    depthwise = conv_module(w, (1, 8, 6, 6), "int8", (1, 1), (1, 1, 1, 1), groups=8)
    assert count_fitting(depthwise, KERNELS["pmaddwd"]) == 0
    assert str(dot_layers(depthwise, KERNELS["pmaddwd"])) == str(depthwise)


def test_auto_means_the_targets_dot_product_kernel():
    assert int_kernel_for("auto", tvm.target.Target(TARGET)) == "pmaddwd"
    assert int_kernel_for("auto", tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})) == "integer"
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert int_kernel_for("auto", arm) == "integer"
    assert int_kernel_for("auto", tvm.target.Target(ARM_DOTPROD)) == "sdot"
    with pytest.raises(ValueError, match="needs an x86 target with AVX2"):
        int_kernel_for("pmaddwd", arm)
    with pytest.raises(ValueError, match=r"needs an aarch64 target with dot products \(--mattr \+neon,\+dotprod\)"):
        int_kernel_for("sdot", arm)
    assert int_kernel_for("float-exact", arm) == "float-exact"
    for mcpu, best in (("sapphirerapids", "vnni512"), ("znver4", "vnni512"), ("alderlake", "vnni256"),
                       ("znver3", "pmaddwd")):
        assert int_kernel_for("auto", tvm.target.Target({"kind": "llvm", "mcpu": mcpu})) == best
    with pytest.raises(ValueError, match="needs an x86 target with AVX512-VNNI"):
        int_kernel_for("vnni512", tvm.target.Target({"kind": "llvm", "mcpu": "alderlake"}))
    with pytest.raises(ValueError, match="needs an x86 target with AVX-VNNI or AVX512-VNNI"):
        int_kernel_for("vnni256", tvm.target.Target(TARGET))
