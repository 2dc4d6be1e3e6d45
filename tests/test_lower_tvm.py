"""The TVM engine: a qpass Q/DQ model compiles into a library whose convs run on integers and
whose outputs match ONNX Runtime running the Q/DQ graph; the ARM build is an aarch64 library;
`compile`/`bench` from the CLI, and their one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import onnx
import pytest

from conftest import EXAMPLE, ZOO_NAMES
from qpasses.calibration.runner import session, with_outputs
from qpasses.errors import EngineError
from qpasses.targets.lower.tvm import Runner, compile_model, elf_machine, lower, static_inputs
from qpasses.targets.lower.tvm_schedule import schedule_cpu
from test_cli import assert_one_line_error, qpass
from test_lower_onnxruntime import int8_model

tvm = pytest.importorskip("tvm", reason="apache-tvm is a test dependency; pip install -e '.[test]'")


def reference(qdq_path, feeds):
    """ONNX Runtime, optimisations off: the Q/DQ graph op by op."""
    return session(onnx.load(qdq_path), optimize=False).run(None, feeds)


@pytest.mark.parametrize("name,target", [("example", "tvm-x86"), ("example", "tvm-arm"), ("example", "onnxruntime")]
                         + [(m, "tvm-x86") for m in ZOO_NAMES])
def test_library_matches_the_qdq_reference(tmp_path, zoo_dir, name, target):
    source, data = (EXAMPLE / "model.onnx", None) if name == "example" else (zoo_dir / f"{name}.onnx", zoo_dir / "calib.npy")
    qdq = int8_model(tmp_path, source, target=target, data=data)
    report = compile_model(qdq, tmp_path / "m.so", target="tvm-x86")
    assert report.integer_nodes, report
    runner = Runner(tmp_path / "m.so")
    got, want = runner.outputs(), reference(qdq, runner.feeds)
    model = onnx.load(qdq)
    for g, w, tie in zip(got, want, tie_bound(model, runner.feeds)):
        # integer kernels compute exactly what the Q/DQ graph computes; only the float output
        # dequantize and ORT's float32 re-association differ. One exception: where a pooled
        # channel's integer mean sits exactly on a rounding tie, ORT's float average (its
        # summation order follows the CPU's vector width) can land 1 ulp off it, while TVM's
        # integer average rounds half to even: that channel flips one step (tie_bound).
        allowed = 1e-5 * max(1.0, float(np.abs(w).max())) + np.broadcast_to(tie, g.shape[-1:])
        assert np.all(np.abs(g - w) <= allowed), f"max excess {float((np.abs(g - w) - allowed).max()):.3g}"


def tie_bound(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """Per output, how far one-step flips of the exact ties of the last GlobalAveragePool can move
    the Gemm head after it: s_x * sum over tied channels of |W[o, c]|; zeros without such a head."""
    nodes = list(model.graph.node)
    pools = [n for n in nodes if n.op_type == "GlobalAveragePool"]
    heads = [n for n in nodes if n.op_type == "Gemm"]
    outputs = [np.zeros(1)] * len(model.graph.output)
    if not pools or not heads:
        return outputs
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in nodes for o in n.output}
    dq = producer[pools[-1].input[0]]
    q = session(with_outputs(model, [dq.input[0]]), optimize=False).run([dq.input[0]], feeds)[0].astype(np.int64)
    sums = (q - inits[dq.input[2]].astype(np.int64)).sum(axis=(2, 3))[0]
    area = q.shape[2] * q.shape[3]
    tied = (2 * sums) % (2 * area) == area
    w_dq = producer[heads[-1].input[1]]
    w = inits[w_dq.input[0]].astype(np.float64) * inits[w_dq.input[1]].reshape(-1, 1)  # transB: [N, K]
    bound = float(inits[dq.input[1]]) * np.abs(w[:, tied]).sum(axis=1)
    return [bound if o.name == heads[-1].output[0] else np.zeros(1) for o in model.graph.output]


def test_lstm_and_if_on_shapes_compile_and_match_ort(tmp_path):
    """TVM's frontend has neither op; the rewrite (tvm_onnx) unrolls the LSTM and inlines the If."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w, r, b = (onnx.numpy_helper.from_array((rng.standard_normal(s) * 0.5).astype(np.float32), n)
               for n, s in (("W", (2, 16, 3)), ("R", (2, 16, 4)), ("B", (2, 32))))
    one = onnx.numpy_helper.from_array(np.array(1, np.int64), "one")
    then = helper.make_graph([helper.make_node("Sigmoid", ["y"], ["t"])], "t", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["y"], ["e"])], "e", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=4, direction="bidirectional"),
             helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "one"], ["batch"]),
             helper.make_node("Equal", ["batch", "one"], ["single"]),
             helper.make_node("If", ["single"], ["out"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "lstm_if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, "N", 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [6, 2, "N", 4])], [w, r, b, one])
    path = tmp_path / "lstm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    compile_model(path, tmp_path / "l.so", input_shapes={"x": [6, 1, 3]})
    runner = Runner(tmp_path / "l.so")
    got, want = runner.outputs()[0], session(onnx.load(path), optimize=False).run(None, runner.feeds)[0]
    assert got.shape == want.shape == (6, 2, 1, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ops_tvm_cannot_import_are_refused_with_one_line(tmp_path):
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w, r = (onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
            for n, s in (("W", (1, 12, 3)), ("R", (1, 12, 4))))
    graph = helper.make_graph([helper.make_node("GRU", ["x", "W", "R"], ["y"], hidden_size=4)], "gru",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 4])], [w, r])
    path = tmp_path / "gru.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    assert_one_line_error(qpass("compile", str(path), "--engine", "tvm", "-o", str(tmp_path / "g.so")), 2,
                          "no converter for GRU")
    assert not (tmp_path / "g.so").exists()


def test_report_lists_what_stays_float(tmp_path, zoo_dir):
    """conv_transpose: the lowering has no ConvTranspose rule yet; the report says so instead of hiding it."""
    qdq = int8_model(tmp_path, zoo_dir / "conv_transpose.onnx", target="tvm-x86", data=zoo_dir / "calib.npy")
    report = compile_model(qdq, tmp_path / "m.so")
    assert "nn.conv2d_transpose" in {n["op"] for n in report.float_nodes}
    assert any(k.startswith("conv2d int8 x int8 -> int32") for k in report.integer_nodes)
    # the deconv is planned int8 (its weight is dequantized) and TVM runs it float: the warning says so
    assert report.planned_int8 == sum(report.integer_nodes.values()) + 1
    assert f"1 of {report.planned_int8} planned-int8 conv/matmul node(s) run float32 kernels" in report.warnings[0]
    assert "nn.conv2d_transpose" in report.warnings[0]


def test_built_conv_kernels_take_integer_inputs(tmp_path):
    """Scheduled for a CPU without AVX2 (where auto picks the integer kernel), every conv2d kernel of the
    example reads int8 activations and int8 weights; with AVX2 they read int16 pairs (test_tvm_pmaddwd)."""
    qdq = int8_model(tmp_path, EXAMPLE / "model.onnx", target="tvm-x86")
    model = onnx.load(qdq)
    built = schedule_cpu(lower(model, static_inputs(model, {})), tvm.target.Target({"kind": "llvm"}))
    convs = {gv.name_hint: f for gv, f in built.functions_items() if "conv2d" in gv.name_hint}
    assert len(convs) >= 4  # one kernel per distinct conv shape and epilogue
    for name, func in convs.items():
        dtypes = [str(p.dtype) for p in func.params[:2]]
        assert dtypes == ["int8", "int8"], (name, dtypes)


def test_arm_build_is_an_aarch64_library_that_does_not_run_here(tmp_path):
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.fail("aarch64-linux-gnu-gcc is missing: .ci/run installs Debian's gcc-aarch64-linux-gnu")
    qdq = int8_model(tmp_path, EXAMPLE / "model.onnx", target="tvm-arm")
    report = compile_model(qdq, tmp_path / "arm.so", target="tvm-arm", mattr="+neon,+dotprod")
    assert elf_machine(tmp_path / "arm.so") == "aarch64" and report.machine == "aarch64"
    assert report.llvm["mattr"] == ["+neon", "+dotprod"]
    with pytest.raises(EngineError, match="built for aarch64; this machine is x86_64"):
        Runner(tmp_path / "arm.so")


def test_every_int_kernel_gives_the_same_outputs(tmp_path):
    qdq = int8_model(tmp_path, EXAMPLE / "model.onnx", target="tvm-x86")
    compile_model(qdq, tmp_path / "int.so", int_kernel="integer")
    report = compile_model(qdq, tmp_path / "exact.so", int_kernel="float-exact")
    assert report.exact_float_convs == 6 and not report.warnings  # every conv of the example fits 2^24
    assert json.loads((tmp_path / "exact.so.json").read_text())["int_kernel"] == "float-exact"
    report = compile_model(qdq, tmp_path / "auto.so")  # tvm-x86 is x86-64-v3: AVX2
    assert report.int_kernel == "pmaddwd" and report.dot_layers == 7  # 6 convs and the classifier
    report = compile_model(qdq, tmp_path / "native.so", mcpu="native")  # this CPU's best: vnni512 where it has VNNI
    assert report.llvm["mcpu"] == tvm.target.codegen.llvm_get_system_cpu() and report.dot_layers == 7
    want = Runner(tmp_path / "int.so").outputs()
    for library in ("exact.so", "auto.so", "native.so"):
        for got, expected in zip(Runner(tmp_path / library).outputs(), want):
            np.testing.assert_array_equal(got, expected, err_msg=library)


def test_compile_is_deterministic(tmp_path):
    qdq = int8_model(tmp_path, EXAMPLE / "model.onnx", target="tvm-x86")
    compile_model(qdq, tmp_path / "a.so")
    compile_model(qdq, tmp_path / "b.so")
    assert (tmp_path / "a.so").read_bytes() == (tmp_path / "b.so").read_bytes()
    mask = os.umask(0o022)
    os.umask(mask)  # a library gets what a linker gives one it creates, its sidecar what open() gives
    assert stat.S_IMODE((tmp_path / "a.so").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "a.so.json").stat().st_mode) == 0o666 & ~mask


def test_cli_compile_and_bench_against_float(tmp_path):
    qdq = int8_model(tmp_path, EXAMPLE / "model.onnx", target="tvm-x86")
    result = qpass("compile", str(qdq), "--engine", "tvm", "-o", str(tmp_path / "q.so"), "--report", str(tmp_path / "c.json"))
    assert result.returncode == 0, result.stderr
    assert "integer kernels: conv2d int8 x int8 -> int32 x6, matmul int8 x int8 -> int32 x1" in result.stderr
    assert "pmaddwd: 7 integer conv(s) and matmul(s) run on the dot-product kernel" in result.stderr
    compiled = json.loads((tmp_path / "c.json").read_text())
    assert compiled["engine"] == "tvm" and compiled["inputs"] == [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert qpass("compile", str(EXAMPLE / "model.onnx"), "--engine", "tvm", "-o", str(tmp_path / "f.so"), "-q").returncode == 0
    result = qpass("bench", str(tmp_path / "q.so"), "--engine", "tvm", "--compare", str(tmp_path / "f.so"),
                   "--warmup", "2", "--runs", "5", "-q", "--report", str(tmp_path / "b.json"))
    assert result.returncode == 0, result.stderr
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["engine"] == "tvm" and bench["speedup"] > 0 and bench["models"]["model"]["latency"]["median_ms"] > 0


def test_cli_errors(tmp_path):
    qdq = int8_model(tmp_path, EXAMPLE / "model.onnx", target="tvm-x86")
    assert_one_line_error(qpass("compile", str(qdq), "--engine", "tvm", "--target", "tensorrt", "-o", str(tmp_path / "x.so")),
                          2, "target tensorrt has no [tvm] device table")
    for name in ("q.tar", "q"):  # TVM would read .tar as an object archive: refused before anything is written
        assert_one_line_error(qpass("compile", str(qdq), "--engine", "tvm", "-o", str(tmp_path / name)), 2, "name it *.so")
        assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.json").exists()
    assert qpass("compile", str(qdq), "--engine", "tvm", "-o", str(tmp_path / "q.so"), "-q").returncode == 0
    shutil.copy(tmp_path / "q.so", tmp_path / "alone.so")
    assert_one_line_error(qpass("bench", str(tmp_path / "alone.so"), "--engine", "tvm"), 2, "alone.so.json is missing")
    assert_one_line_error(qpass("bench", str(tmp_path / "q.so"), "--engine", "onnxruntime"), 2, "use --engine tvm")
    assert_one_line_error(qpass("bench", str(qdq), "--engine", "tvm"), 2, "not what --engine tvm runs")
    assert_one_line_error(qpass("bench", str(tmp_path / "q.so"), "--engine", "tvm", "--batch-size", "4"), 2,
                          "compiled for input of shape [1, 1, 8, 8]")
