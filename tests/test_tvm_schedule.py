"""CPU schedules change speed, never results: every scheduled build equals the unscheduled one (bit for
bit on integer models, every integer kernel), a conv's int32 sums equal a numpy int64 reference even
when the exact-float kernel must split it, and the kernels get the loop structure the rules promise."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import EXAMPLE, ZOO_NAMES
from qpasses.targets.lower.tvm import lower, static_inputs
from qpasses.targets.lower.tvm_schedule import EXACT_FLOAT, _exact_chunks, schedule_cpu
from test_lower_onnxruntime import int8_model
from test_tvm_dot import conv_module, reference

tvm = pytest.importorskip("tvm", reason="apache-tvm is a test dependency; pip install -e '.[test]'")
from tvm import relax, tirx  # noqa: E402

TARGET = {"kind": "llvm", "mcpu": "x86-64-v3"}


def run(mod: tvm.IRModule, feeds: list[np.ndarray]) -> list[np.ndarray]:
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(TARGET)), tvm.cpu())
    result = vm["main"](*(tvm.runtime.tensor(f) for f in feeds))
    return [result.numpy()] if isinstance(result, tvm.runtime.Tensor) else [r.numpy() for r in result]


def lowered(path) -> tvm.IRModule:
    model = onnx.load(path)
    return lower(model, static_inputs(model, {}))


@pytest.mark.parametrize("name", ["example", *ZOO_NAMES])
def test_scheduled_builds_compute_what_unscheduled_ones_do(tmp_path, zoo_dir, name):
    source, data = (EXAMPLE / "model.onnx", None) if name == "example" else (zoo_dir / f"{name}.onnx", zoo_dir / "calib.npy")
    feeds = [np.random.default_rng(1).standard_normal(static_inputs(onnx.load(source), {})[0]["shape"]).astype(np.float32)]
    target = tvm.target.Target(TARGET)
    quantized = lowered(int8_model(tmp_path, source, target="tvm-x86", data=data))
    want = run(quantized, feeds)
    for kernel in ("integer", "pmaddwd", "float-exact"):
        for got, expected in zip(run(schedule_cpu(quantized, target, kernel), feeds), want):
            np.testing.assert_array_equal(got, expected, err_msg=kernel)
    floating = lowered(source)
    # float: DecomposeOpsForInference splits BatchNorm into elementwise ops, which re-associates
    for got, expected in zip(run(schedule_cpu(floating, target), feeds), run(floating, feeds)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def int8_conv_module(weight: np.ndarray, shape: tuple[int, ...]) -> tvm.IRModule:
    """data (int8) -> conv2d with constant int8 weights, padding 1 -> int32 sums."""
    return conv_module(weight, shape, "int8", (1, 1), (1, 1, 1, 1))


def conv_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """int64 conv2d, stride 1, padding 1: the arithmetic every kernel must reproduce."""
    return reference(x, w, (1, 1), (1, 1, 1, 1))


@pytest.mark.parametrize("magnitude", [3, 127])
def test_int8_conv_sums_equal_an_int64_reference(magnitude):
    """Full-range weights on 160 input channels overflow float32's exact range: the exact-float kernel
    splits the input channels into chunks that each stay exact; small weights need no split."""
    rng = np.random.default_rng(0)
    weight = rng.choice([-magnitude, magnitude], size=(16, 160, 3, 3)).astype(np.int8)
    weight[0] = magnitude  # output channel 0 on a patch of 127s: sums of 127 * 127 * 9 * 160 > 2^24
    x = rng.integers(-128, 128, size=(1, 160, 10, 12)).astype(np.int8)
    x[:, :, 2:8, 2:8] = 127
    chunks = _exact_chunks(weight)
    assert len(chunks) == (1 if magnitude == 3 else 2)
    for start, stop in chunks:
        assert np.abs(weight[:, start:stop].astype(np.int64)).reshape(16, -1).sum(1).max() * 128 < EXACT_FLOAT
    want = conv_reference(x, weight)
    assert np.abs(want).max() >= (2 ** 24 if magnitude == 127 else 0)  # the split case really exceeds 2^24
    mod = int8_conv_module(weight, x.shape)
    for kernel in ("integer", "pmaddwd", "float-exact"):
        (got,) = run(schedule_cpu(mod, tvm.target.Target(TARGET), kernel), [x])
        np.testing.assert_array_equal(got, want, err_msg=kernel)


def test_conv_kernels_are_tiled_parallel_and_vectorized_on_integers():
    """The integer kernel reads int8 data and int8 weights repacked to O/8 I H W 8o, with a parallel outer
    loop and an 8-lane vectorized inner loop."""
    weight = np.random.default_rng(0).integers(-5, 6, size=(32, 64, 3, 3)).astype(np.int8)
    mod = schedule_cpu(int8_conv_module(weight, (1, 64, 28, 28)), tvm.target.Target(TARGET), "integer")
    kernels = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(kernels) == 1
    kernel = kernels[0]
    assert [str(p.dtype) for p in kernel.params[:2]] == ["int8", "int8"]
    assert [int(d) for d in kernel.params[1].shape] == [4, 64, 3, 3, 8]
    text = kernel.script()  # TVM's Python API has no TIR visitor any more: read the printed loops
    assert "T.parallel(" in text and "T.vectorized(T.int64(8))" in text


@pytest.mark.parametrize("rows", [(1,), (24, 1), (3, 5)])
def test_dense_rule_tiles_rows_and_streams_repacked_weights(rows):
    """A float matmul by a constant [K, N] plus bias (an LSTM's projections: [24, 1, 512] @ [512, 2048],
    and its per-step [1, 512] @ [512, 2048]) reads the weight repacked to N/8 K 8n, keeps the bias add at
    the tile and equals numpy's float64 result to float32 rounding."""
    rng = np.random.default_rng(2)
    depth, columns = 512, 256
    x = rng.standard_normal((*rows, depth)).astype(np.float32)
    w = rng.standard_normal((depth, columns)).astype(np.float32)
    b = rng.standard_normal(columns).astype(np.float32)
    builder = relax.BlockBuilder()
    data = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with builder.function("main", [data]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.add(relax.op.matmul(data, relax.const(w)), relax.const(b)))
        builder.emit_func_output(out)
    mod = schedule_cpu(builder.get(), tvm.target.Target(TARGET))
    kernels = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(kernels) == 1 and [int(d) for d in kernels[0].params[1].shape] == [columns // 8, depth, 8]
    assert "T.vectorized(T.int64(8))" in kernels[0].script()
    expected = x.astype(np.float64) @ w.astype(np.float64) + b
    np.testing.assert_allclose(run(mod, [x])[0], expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_requantize_between_dot_convs_runs_in_channel_blocks():
    """Between two convs on the pmaddwd kernel (8 output channels per register), the requantize runs
    over [N, C/8, H, W, 8] (contiguous reads of the packed sums) into an intermediate, and a second
    block packs it for the next conv; the result equals the unscheduled module's bit for bit."""
    rng = np.random.default_rng(4)
    w1 = rng.integers(-20, 21, size=(16, 8, 3, 3)).astype(np.int8)
    w2 = rng.integers(-20, 21, size=(8, 16, 3, 3)).astype(np.int8)
    x = rng.integers(-128, 128, size=(1, 8, 12, 12)).astype(np.int8)
    builder = relax.BlockBuilder()
    data = relax.Var("x", relax.TensorType(x.shape, "int8"))
    with builder.function("main", [data]):
        with builder.dataflow():
            sums = relax.op.nn.conv2d(data, relax.const(w1), padding=(1, 1, 1, 1), out_dtype="int32")
            requantized = relax.op.astype(relax.op.clip(relax.op.right_shift(sums, relax.const(5, "int32")),
                                                        -128, 127), "int8")
            out = builder.emit_output(relax.op.nn.conv2d(requantized, relax.const(w2), padding=(1, 1, 1, 1),
                                                         out_dtype="int32"))
        builder.emit_func_output(out)
    mod = builder.get()
    scheduled = schedule_cpu(mod, tvm.target.Target(TARGET), "pmaddwd")
    scripts = [f.script() for _, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert any("T.int64(1), T.int64(2), T.int64(12), T.int64(12), T.int64(8)" in s and "T.vectorized(T.int64(8))" in s
               for s in scripts)  # the [1, 16/8, 12, 12, 8] intermediate, 8 lanes vectorized
    np.testing.assert_array_equal(run(scheduled, [x])[0], run(mod, [x])[0])
