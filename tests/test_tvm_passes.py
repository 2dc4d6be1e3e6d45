"""qpass's Relax passes, tested as TVM tests its own: on small hand-built regions, by the structure
they produce and by what they compute.

Each case is a one-region Q/DQ ONNX model whose input and output are the integer tensors
themselves. The lowered TVM module must equal, bit for bit, a numpy integer reference written
here (int64 conv by sliding windows, the fixed-point requantize with ties to even), and be within
one step of ONNX Runtime running the Q/DQ graph with optimisations off. With power-of-two scales
the reference is also checked against exact rational rounding.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

tvm = pytest.importorskip("tvm", reason="apache-tvm is a test dependency; pip install -e '.[test]'")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from qpasses.targets.lower.tvm_passes import (  # noqa: E402
    CanonicalizeClip, LowerQuantizedConv, float_ops, integer_lowering)

RNG = np.random.default_rng(7)
RANGE = {np.int8: (-128, 127), np.uint8: (0, 255)}
# Multipliers are formed in float64 from the model's float32 scales, in the passes and here alike.


# ---------------------------------------------------------------- building one-region Q/DQ models
def _tensor(name, dtype, shape):
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)


def _model(nodes, inputs, output, inits):
    graph = helper.make_graph(nodes, "region", inputs, [output], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _dq(name, src, scale, zero_point, inits, axis=None):
    inits[f"{name}_s"], inits[f"{name}_z"] = np.asarray(scale, np.float32), np.asarray(zero_point)
    return helper.make_node("DequantizeLinear", [src, f"{name}_s", f"{name}_z"], [name], **({"axis": axis} if axis is not None else {}))


def _q(name, src, scale, zero_point, inits):
    inits[f"{name}_s"], inits[f"{name}_z"] = np.asarray(scale, np.float32), np.asarray(zero_point)
    return helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"], [name])


def _activation(kind, src, inits):
    if kind == "relu":
        return [helper.make_node("Relu", [src], ["act"])]
    if kind == "clip":
        inits["lo"], inits["hi"] = np.float32(0.0), np.float32(6.0)
        return [helper.make_node("Clip", [src, "lo", "hi"], ["act"])]
    return [helper.make_node("Identity", [src], ["act"])]


def conv_case(x_dtype, zx, sx, cin, cout, k, stride, pad, group, sw, sy, zy, y_dtype, act, pow2=False):
    x = RNG.integers(*RANGE[x_dtype], (1, cin, 9, 9), endpoint=True).astype(x_dtype)
    w = RNG.integers(-127, 128, (cout, cin // group, k, k)).astype(np.int8)
    sw = np.asarray(sw, np.float32)
    bias = RNG.integers(-3000, 3000, cout).astype(np.int32)
    inits = {"w": w, "b": bias}
    nodes = [_dq("xf", "x", sx, np.asarray(zx, x_dtype), inits),
             _dq("wf", "w", sw, np.zeros(sw.shape, np.int8), inits, axis=0),
             _dq("bf", "b", np.float32(sx) * sw, np.zeros(sw.shape, np.int32), inits, axis=0),
             helper.make_node("Conv", ["xf", "wf", "bf"], ["c"], strides=[stride] * 2, pads=[pad] * 4, group=group)]
    nodes += _activation(act, "c", inits) + [_q("y", "act", sy, np.asarray(zy, y_dtype), inits)]
    out = (9 + 2 * pad - k) // stride + 1
    model = _model(nodes, [_tensor("x", x_dtype, x.shape)], _tensor("y", y_dtype, [1, cout, out, out]), inits)
    acc = conv_reference(x, zx, w, stride, pad, group) + bias.reshape(1, -1, 1, 1)
    multiplier = np.broadcast_to(np.float64(np.float32(sx)) * sw.astype(np.float64), (cout,)) / np.float64(np.float32(sy))
    return model, {"x": x}, ([(acc, multiplier.reshape(1, -1, 1, 1))], zy, y_dtype, act, sy)


def conv_reference(x, zx, w, stride, pad, group):
    """int64 convolution of (x - zx) by w, zero padding of the centred input (NCHW, OIHW)."""
    centred = np.pad(x.astype(np.int64) - zx, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k, cg, og = w.shape[-1], w.shape[1], w.shape[0] // group
    windows = np.lib.stride_tricks.sliding_window_view(centred, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    out = [np.einsum("nchwij,ocij->nohw", windows[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og].astype(np.int64))
           for g in range(group)]
    return np.concatenate(out, axis=1)


def gemm_case():
    x = RNG.integers(-128, 128, (2, 40)).astype(np.int8)
    w = RNG.integers(-127, 128, (12, 40)).astype(np.int8)
    sx, sw, sy = 0.05, RNG.uniform(0.002, 0.01, 12).astype(np.float32), 0.3
    bias = RNG.integers(-500, 500, 12).astype(np.int32)
    inits = {"w": w, "b": bias}
    nodes = [_dq("xf", "x", sx, np.int8(0), inits), _dq("wf", "w", sw, np.zeros(12, np.int8), inits, axis=0),
             _dq("bf", "b", np.float32(sx) * sw, np.zeros(12, np.int32), inits, axis=0),
             helper.make_node("Gemm", ["xf", "wf", "bf"], ["c"], transB=1)]
    nodes += _activation("relu", "c", inits) + [_q("y", "act", sy, np.int8(0), inits)]
    model = _model(nodes, [_tensor("x", np.int8, x.shape)], _tensor("y", np.int8, [2, 12]), inits)
    acc = x.astype(np.int64) @ w.T.astype(np.int64) + bias
    multiplier = np.float64(np.float32(sx)) * sw.astype(np.float64) / np.float64(np.float32(sy))
    return model, {"x": x}, ([(acc, multiplier.reshape(1, -1))], 0, np.int8, "relu", sy)


def add_case(pow2):
    a = RNG.integers(-128, 128, (1, 6, 5, 5)).astype(np.int8)
    b = RNG.integers(0, 256, (1, 6, 5, 5)).astype(np.uint8)
    sa, sb, sy = (0.25, 0.125, 0.5) if pow2 else (0.031, 0.017, 0.045)
    za, zb, zy = (0, 0, 0) if pow2 else (0, 131, 0)
    b = b.astype(np.uint8) if not pow2 else RNG.integers(-128, 128, (1, 6, 5, 5)).astype(np.int8)
    inits = {}
    nodes = [_dq("af", "a", sa, np.int8(za), inits), _dq("bf", "b", sb, np.asarray(zb, b.dtype), inits),
             helper.make_node("Add", ["af", "bf"], ["c"])]
    nodes += _activation("relu", "c", inits) + [_q("y", "act", sy, np.int8(zy), inits)]
    model = _model(nodes, [_tensor("a", a.dtype, a.shape), _tensor("b", b.dtype, b.shape)],
                   _tensor("y", np.int8, list(a.shape)), inits)
    terms = [(a.astype(np.int64) - za, np.float64(np.float32(sa)) / np.float64(np.float32(sy))),
             (b.astype(np.int64) - zb, np.float64(np.float32(sb)) / np.float64(np.float32(sy)))]
    return model, {"a": a, "b": b}, (terms, zy, np.int8, "relu", sy)


def concat_case():
    """Two inputs with the output's quantizer, one with its own: only that one is requantized."""
    parts = [RNG.integers(0, 256, (1, c, 4, 4)).astype(np.uint8) for c in (3, 2, 4)]
    params = [(0.02, 10), (0.02, 10), (0.05, 100)]
    inits = {}
    nodes = [_dq(f"p{i}f", f"p{i}", s, np.uint8(z), inits) for i, (s, z) in enumerate(params)]
    nodes += [helper.make_node("Concat", ["p0f", "p1f", "p2f"], ["c"], axis=1), _q("y", "c", 0.02, np.uint8(10), inits)]
    model = _model(nodes, [_tensor(f"p{i}", np.uint8, p.shape) for i, p in enumerate(parts)],
                   _tensor("y", np.uint8, [1, 9, 4, 4]), inits)
    m = np.float64(np.float32(0.05)) / np.float64(np.float32(0.02))
    third = requantize_reference([(parts[2].astype(np.int64) - 100, m)], 10, 0, 255)
    expected = np.concatenate([parts[0], parts[1], third.astype(np.uint8)], axis=1)
    return model, {f"p{i}": p for i, p in enumerate(parts)}, expected


def pool_case(kind):
    x = RNG.integers(0, 256, (1, 5, 6, 6)).astype(np.uint8)
    inits = {}
    pool = (helper.make_node("MaxPool", ["xf"], ["c"], kernel_shape=[2, 2], strides=[2, 2]) if kind == "max"
            else helper.make_node("GlobalAveragePool", ["xf"], ["c"]))
    sy, zy = (0.04, 7) if kind == "max" else (0.01, 3)
    nodes = [_dq("xf", "x", 0.04, np.uint8(7), inits), pool, _q("y", "c", sy, np.uint8(zy), inits)]
    shape = [1, 5, 3, 3] if kind == "max" else [1, 5, 1, 1]
    model = _model(nodes, [_tensor("x", np.uint8, x.shape)], _tensor("y", np.uint8, shape), inits)
    if kind == "max":
        expected = x.reshape(1, 5, 3, 2, 3, 2).max(axis=(3, 5))
    else:
        total = (x.astype(np.int64) - 7).sum(axis=(2, 3), keepdims=True)
        m = np.float64(np.float32(0.04)) / (np.float64(np.float32(0.01)) * 36)
        expected = requantize_reference([(total, m)], zy, 0, 255).astype(np.uint8)
    return model, {"x": x}, expected


# ---------------------------------------------------------------- the independent integer reference
def requantize_reference(terms, zero_point, lo, hi):
    """sum_i v_i * M_i in fixed point, M_i ~ m_i / 2^n with n = 30 - floor(log2(max M)), ties to even."""
    largest = np.max(np.stack(np.broadcast_arrays(*[np.asarray(m, np.float64) for _, m in terms])), axis=0)
    n = (30 - np.floor(np.log2(largest))).astype(np.int64)
    total = sum(v.astype(np.int64) * np.round(np.asarray(m, np.float64) * 2.0 ** n).astype(np.int64) for v, m in terms)
    quotient, remainder = total >> n, total & ((np.int64(1) << n) - 1)
    half = np.int64(1) << (n - 1)
    rounded = quotient + ((remainder > half) | ((remainder == half) & (quotient & 1 == 1)))
    return np.clip(rounded + zero_point, lo, hi)


def expected_output(spec):
    terms, zy, y_dtype, act, sy = spec
    lo, hi = RANGE[y_dtype]
    if act == "relu":
        lo = max(lo, zy)
    elif act == "clip":
        lo, hi = max(lo, zy), min(hi, zy + int(np.round(6.0 / np.float32(sy))))
    return requantize_reference(terms, zy, lo, hi).astype(y_dtype)


def exact_rational(terms, zero_point, lo, hi):
    """Round-half-even of the exact rational sum (power-of-two multipliers make fixed point exact)."""
    flat = [(v.astype(np.int64), np.broadcast_to(m, v.shape)) for v, m in terms]
    out = np.empty(flat[0][0].shape, np.int64)
    for index in np.ndindex(out.shape):
        value = sum(Fraction(int(v[index])) * Fraction(float(m[index])) for v, m in flat)
        out[index] = min(max(round(value) + zero_point, lo), hi)  # Python's round: ties to even
    return out


# ---------------------------------------------------------------- running both engines
def run_tvm(model, feeds):
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    dtypes = {i.name: str(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)) for i in model.graph.input}
    mod = integer_lowering()(from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False))
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    return mod, vm["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in model.graph.input]).numpy()


def run_ort(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def assert_integer_only(mod):
    assert float_ops(mod) == [], [op for _, op, _, _ in float_ops(mod)]
    ops = {getattr(b.value.op, "name", "") for blk in mod["main"].body.blocks for b in blk.bindings
           if isinstance(b.value, relax.Call)}
    assert not ops & {"relax.quantize", "relax.dequantize"}, "a Q/DQ survived between integer kernels"


CONVS = {
    # u8 input with a zero point (int16 operands), per-channel float scales, stride 2
    "u8-asym-per-channel": dict(x_dtype=np.uint8, zx=131, sx=0.021, cin=4, cout=6, k=3, stride=2, pad=1, group=1,
                                sw=RNG.uniform(0.001, 0.01, 6), sy=0.07, zy=5, y_dtype=np.uint8, act="relu"),
    # tvm-arm: s8 symmetric, power-of-two scales (pure shifts), depthwise, ReLU6 as Clip
    "s8-pow2-depthwise-relu6": dict(x_dtype=np.int8, zx=0, sx=2.0 ** -5, cin=6, cout=6, k=3, stride=1, pad=1, group=6,
                                    sw=2.0 ** -8, sy=2.0 ** -4, zy=0, y_dtype=np.int8, act="clip"),
    "s8-float-1x1": dict(x_dtype=np.int8, zx=0, sx=0.013, cin=8, cout=5, k=1, stride=1, pad=0, group=1,
                         sw=RNG.uniform(0.002, 0.02, 5), sy=0.11, zy=0, y_dtype=np.int8, act="none"),
}


@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_region_is_integer_and_bit_exact(case):
    model, feeds, spec = conv_case(**CONVS[case])
    mod, got = run_tvm(model, feeds)
    assert_integer_only(mod)
    expected = expected_output(spec)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got.astype(np.int32) - run_ort(model, feeds)).max() <= 1
    if "pow2" in case:
        lo, hi = RANGE[spec[2]]
        assert np.array_equal(expected, np.clip(exact_rational(spec[0], 0, lo, hi), 0, int(np.round(6 / spec[4]))))


def test_gemm_region_is_integer_and_bit_exact():
    model, feeds, spec = gemm_case()
    mod, got = run_tvm(model, feeds)
    assert_integer_only(mod)
    np.testing.assert_array_equal(got, expected_output(spec))
    assert np.abs(got.astype(np.int32) - run_ort(model, feeds)).max() <= 1


@pytest.mark.parametrize("pow2", [True, False])
def test_add_region_rounds_once(pow2):
    model, feeds, spec = add_case(pow2)
    mod, got = run_tvm(model, feeds)
    assert_integer_only(mod)
    np.testing.assert_array_equal(got, expected_output(spec))
    assert np.abs(got.astype(np.int32) - run_ort(model, feeds)).max() <= 1
    if pow2:  # shifts only: the exact rational result, and exactly what ORT computes
        np.testing.assert_array_equal(got, np.clip(exact_rational(spec[0], 0, 0, 127), 0, 127))
        np.testing.assert_array_equal(got, run_ort(model, feeds))


def test_concat_requantizes_only_the_input_with_its_own_scale():
    model, feeds, expected = concat_case()
    mod, got = run_tvm(model, feeds)
    assert_integer_only(mod)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got.astype(np.int32) - run_ort(model, feeds)).max() <= 1


@pytest.mark.parametrize("kind", ["max", "global-average"])
def test_pooling_runs_on_integers(kind):
    model, feeds, expected = pool_case(kind)
    mod, got = run_tvm(model, feeds)
    assert_integer_only(mod)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got.astype(np.int32) - run_ort(model, feeds)).max() <= 1


def _op_names(mod):
    return [getattr(b.value.op, "name", type(b.value).__name__) for blk in mod["main"].body.blocks for b in blk.bindings]


def test_conv_pass_structure_with_power_of_two_scales():
    """tvm-arm's region becomes: int8 conv2d -> int32 bias add -> rounding shift -> clamp -> cast; no multiply."""
    model, _, _ = conv_case(**CONVS["s8-pow2-depthwise-relu6"])
    before = from_onnx(model, shape_dict={"x": [1, 6, 9, 9]}, dtype_dict={"x": "int8"}, keep_params_in_input=False)
    after = relax.transform.DeadCodeElimination()(LowerQuantizedConv()(CanonicalizeClip()(before)))
    assert _op_names(after) == ["relax.nn.conv2d", "relax.add",  # int32 accumulator + int32 bias
                                "relax.add", "relax.right_shift", "relax.bitwise_and", "relax.add",  # ties to even
                                "relax.right_shift", "relax.clip", "relax.astype"]
    conv = after["main"].body.blocks[0].bindings[0].value
    assert [str(a.ty.dtype) for a in conv.args] == ["int8", "int8"] and conv.attrs.out_dtype == "int32"
    assert conv.attrs.groups == 6


def test_conv_pass_structure_with_a_zero_point_and_float_scales():
    """A u8 input with a zero point is widened to int16 and centred before the conv, so zero padding is exact;
    the requantize multiplies in int64."""
    model, _, _ = conv_case(**CONVS["u8-asym-per-channel"])
    before = from_onnx(model, shape_dict={"x": [1, 4, 9, 9]}, dtype_dict={"x": "uint8"}, keep_params_in_input=False)
    names = _op_names(relax.transform.DeadCodeElimination()(LowerQuantizedConv()(before)))
    assert names[:3] == ["relax.astype", "relax.subtract", "relax.nn.conv2d"]
    assert "relax.multiply" in names and names[-2:] == ["relax.clip", "relax.astype"]


def test_pass_leaves_the_callers_module_alone():
    model, _, _ = conv_case(**CONVS["s8-float-1x1"])
    before = from_onnx(model, shape_dict={"x": [1, 8, 9, 9]}, dtype_dict={"x": "int8"}, keep_params_in_input=False)
    snapshot = before.script()
    LowerQuantizedConv()(before)
    assert before.script() == snapshot


def test_regions_it_cannot_express_stay_float():
    """A conv whose weight is computed at run time (not a constant) is left as the importer made it."""
    x = _tensor("x", np.int8, [1, 2, 4, 4])
    wt = _tensor("w", np.int8, [3, 2, 1, 1])
    inits = {}
    nodes = [_dq("xf", "x", 0.1, np.int8(0), inits), _dq("wf", "w", 0.01, np.int8(0), inits),
             helper.make_node("Conv", ["xf", "wf"], ["c"]), _q("y", "c", 0.2, np.int8(0), inits)]
    model = _model(nodes, [x, wt], _tensor("y", np.int8, [1, 3, 4, 4]), inits)
    mod = integer_lowering()(from_onnx(model, shape_dict={"x": [1, 2, 4, 4], "w": [3, 2, 1, 1]},
                                       dtype_dict={"x": "int8", "w": "int8"}, keep_params_in_input=False))
    assert [op for _, op, _, _ in float_ops(mod)] == ["relax.nn.conv2d"]
