"""The CPU build's transcendental functions: within 5e-6 of float64 numpy over their whole useful
range, and built without a scalar libm call (`expf`, `erff`, `tanhf`) left in the code."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qpasses.targets.lower.tvm_schedule import schedule_cpu

tvm = pytest.importorskip("tvm", reason="apache-tvm is a test dependency; pip install -e '.[test]'")
from tvm import relax  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"})
X = np.linspace(-12.0, 12.0, 4096, dtype=np.float32).reshape(4, 1024)

OPS = {  # name: (Relax op, float64 reference)
    "exp": (relax.op.exp, np.exp),
    "erf": (relax.op.erf, np.vectorize(math.erf)),
    "tanh": (relax.op.tanh, np.tanh),
    "sigmoid": (relax.op.sigmoid, lambda x: 1.0 / (1.0 + np.exp(-x))),
    "softmax": (lambda x: relax.op.nn.softmax(x, axis=1),
                lambda x: np.exp(x - x.max(1, keepdims=True)) / np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)),
}


def run(op, x: np.ndarray) -> tuple[np.ndarray, str]:
    builder = relax.BlockBuilder()
    data = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with builder.function("main", [data]):
        with builder.dataflow():
            out = builder.emit_output(op(data))
        builder.emit_func_output(out)
    executable = tvm.compile(schedule_cpu(builder.get(), TARGET), target=TARGET)
    asm = executable.mod.imports[0].inspect_source("asm")
    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy(), asm


@pytest.mark.parametrize("name", list(OPS))
def test_matches_float64_without_libm_calls(name):
    op, reference = OPS[name]
    got, asm = run(op, X)
    expected = reference(X.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=5e-6, atol=1e-30 if name == "exp" else 1e-6)
    for call in ("expf", "erff", "tanhf"):
        assert f"call\t{call}" not in asm and f"{call}@PLT" not in asm


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_multiplies_by_the_reciprocal_within_one_step(per_channel):
    """quantize by a constant scale: round-half-even(x / scale) + zero point, clamped to int8 as numpy
    computes it, but with no division in the code; the result may differ by one step only where
    x / scale is within float32 rounding of a tie."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((2, 4, 8, 16)) * 3).astype(np.float32)
    scale = (rng.uniform(0.01, 0.05, 4) if per_channel else np.array(0.0234)).astype(np.float32)
    zero = np.array([3, -2, 0, 5] if per_channel else 1).astype(np.int8)
    op = lambda d: relax.op.quantize(d, relax.const(scale), relax.const(zero), axis=1, out_dtype="int8")  # noqa: E731
    got, asm = run(op, x)
    shape = (1, 4, 1, 1) if per_channel else ()
    expected = np.clip(np.round(x / scale.reshape(shape)) + zero.reshape(shape), -128, 127)
    assert np.abs(got.astype(np.int32) - expected).max() <= 1 and np.mean(got != expected) < 1e-3
    assert "vdivps" not in asm and "divss" not in asm
