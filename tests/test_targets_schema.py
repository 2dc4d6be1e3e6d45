"""Target files: every shipped target loads; bad files fail with the exact field."""

import re

import pytest

from qpasses.errors import InputError
from qpasses.targets import builtin_names, load_target

MQBENCH_TABLE_1 = {  # target: (weight granularity, symmetric, pow2 scale)
    "tensorrt": ("per_channel", True, "float"),
    "acl": ("per_channel", True, "float"),
    "tvm-arm": ("per_tensor", True, "pow2"),
    "snpe": ("per_tensor", False, "float"),
    "fbgemm": ("per_channel", False, "float"),
    "academic": ("per_tensor", True, "float"),
}


def test_shipped_targets():
    assert set(builtin_names()) == set(MQBENCH_TABLE_1) | {"onnxruntime", "onnxruntime-vnni", "tvm-x86"}


def test_tvm_devices_are_data():
    """The TVM engine's device comes from the target file; an extending file replaces the LLVM table whole."""
    arm, x86 = load_target("tvm-arm").tvm, load_target("tvm-x86").tvm
    assert arm.llvm == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    assert arm.cross_compiler == "aarch64-linux-gnu-gcc"
    assert x86.llvm == {"kind": "llvm", "mcpu": "x86-64-v3"} and x86.cross_compiler == ""
    assert load_target("tensorrt").tvm is None
    assert load_target("tvm-x86").ops == load_target("tvm-arm").ops


def test_tvm_table_needs_an_llvm_target(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text('extends = "tvm-arm"\nname = "t"\n[tvm]\nllvm = { kind = "cuda" }\n')
    with pytest.raises(InputError, match=r"tvm\.llvm: expected an LLVM target"):
        load_target(str(bad))


def test_onnxruntime_weights_fit_int16_pair_sums_unless_vnni():
    """u8 activations x s8 weights, two products summed in int16 (AVX2's vpmaddubsw): 7-bit weights
    keep 2 * 255 * 64 below 2**15; the VNNI variant keeps all 8 bits."""
    lo, hi = load_target("onnxruntime").weight.qrange(True)
    assert 2 * 255 * max(-lo, hi) < 2**15
    vnni = load_target("onnxruntime-vnni")
    assert vnni.weight.qrange(True) == (-128, 127) and vnni.ops == load_target("onnxruntime").ops


@pytest.mark.parametrize("name", sorted(MQBENCH_TABLE_1))
def test_quantizers_follow_mqbench_table_1(name):
    t = load_target(name)
    granularity, symmetric, scale = MQBENCH_TABLE_1[name]
    assert (t.weight.granularity, t.weight.symmetric, t.weight.scale) == (granularity, symmetric, scale)
    assert t.fold_batchnorm


def test_tensorrt_is_symmetric_narrow_and_has_no_per_channel_deconv():
    t = load_target("tensorrt")
    assert t.weight.narrow_range and t.weight.qrange(True) == (-127, 127)
    assert t.activation.symmetric and t.activation.qrange(True) == (-128, 127)
    assert t.weight_quantizer("ConvTranspose").granularity == "per_tensor"
    assert t.weight_quantizer("Conv").granularity == "per_channel"


def write(tmp_path, text):
    path = tmp_path / "custom.toml"
    path.write_text(text)
    return str(path)


def test_user_target_extends_a_shipped_one(tmp_path):
    t = load_target(write(tmp_path, 'extends = "onnxruntime"\nname = "ort-4bit"\n[weight]\nbits = 4\n'))
    assert t.name == "ort-4bit" and t.weight.bits == 4 and t.weight.qrange(True) == (-8, 7)
    assert t.ops == load_target("onnxruntime").ops


@pytest.mark.parametrize("text, field", [
    ('extends = "tensorrt"\n[weight]\ngranularity = "channel"\n', "weight.granularity"),
    ('extends = "tensorrt"\n[weight]\nsymmetric = "yes"\n', "weight.symmetric"),
    ('extends = "tensorrt"\n[activation]\nbits = 16\n', "activation.bits"),
    ('extends = "tensorrt"\nbias = "int8"\n', "bias"),
    ('extends = "tensorrt"\ncolour = "red"\n', "colour"),
    ('extends = "tensorrt"\nfloat_tail = "yes"\n', "float_tail"),
    ('extends = "tensorrt"\n[ops.Add]\ninputs = "some"\n', "ops.Add.inputs"),
    ('extends = "tensorrt"\n[ops.Add]\nshared = true\n', "ops.Add.shared"),
    ('extends = "tensorrt"\nsupergroups = [["Conv"]]\n', "supergroups[0]"),
    ('extends = "onnxruntime"\n[fusion]\ndecompose = ["Erf"]\n', "fusion.decompose"),
    ('extends = "onnxruntime"\n[fusion]\nconstant_error = 1.5\n', "fusion.constant_error"),
    ('extends = "onnxruntime"\n[fusion]\npreoptimize = "extended"\n', "fusion.preoptimize"),
    ('extends = "onnxruntime"\n[cpu.sse4_2]\ntarget = "onnxruntime"\n', "cpu.sse4_2.why"),
])
def test_bad_field_is_named(tmp_path, text, field):
    with pytest.raises(InputError, match=re.escape(f"{field}: ")):
        load_target(write(tmp_path, text))


def test_duplicate_keys_and_unknown_names_are_rejected(tmp_path):
    with pytest.raises(InputError, match="not valid TOML"):
        load_target(write(tmp_path, 'name = "a"\nname = "b"\n'))
    with pytest.raises(InputError, match="unknown target 'tensorrtt'"):
        load_target("tensorrtt")
    with pytest.raises(InputError, match="no such file"):
        load_target(str(tmp_path / "missing.toml"))


def test_the_onnxruntime_target_advises_per_cpu_feature():
    """The [cpu] table is data: VNNI and ARM dot products take all 8 weight bits, AVX2 alone 7."""
    choices = {c.feature: c.target for c in load_target("onnxruntime").cpu}
    assert choices == {"avx512_vnni": "onnxruntime-vnni", "avx_vnni": "onnxruntime-vnni", "asimddp": "onnxruntime-vnni",
                       "avx2": "onnxruntime"}
    assert [c.feature for c in load_target("onnxruntime").cpu][-1] == "avx2"  # the first match wins: VNNI before AVX2
