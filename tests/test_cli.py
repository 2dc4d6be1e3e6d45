"""The `qpass` command: the README's main job, bad input as one line and exit 2, determinism."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper
from PIL import Image

from conftest import EXAMPLE


def qpass(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["qpass", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under `root`: its hash and mode, to show that a failed command changed nothing."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qpass: error:") and text in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_quantize_example_is_deterministic(tmp_path):
    """Model, encodings and report are byte-identical between runs (the report's timings and own paths aside)."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        proc = qpass("quantize", EXAMPLE / "model.onnx", "--target", "tensorrt", "--calib", "kl", "--data",
                     EXAMPLE / "calib.npz", "-o", out / "m.onnx", "--export-encodings", out / "enc.json",
                     "--report", out / "r.json", *(["-q"] if name == "b" else []))
        assert proc.returncode == 0, proc.stderr
        runs.append((out, proc.stderr))
    (a, first), (b, second) = runs
    assert "SQNR" in first and "nodes quantized" in first and second == ""
    for name in ("m.onnx", "enc.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    reports = [json.loads((d / "r.json").read_text()) for d in (a, b)]
    for report in reports:
        del report["timings"], report["output"]["path"]
    assert reports[0] == reports[1]


@pytest.mark.parametrize("method", ["minmax", "quantile", "mse", "kl", "norm", "meanstd"])
def test_every_calibration_method_from_the_command_line(tmp_path, method):
    proc = qpass("quantize", EXAMPLE / "model.onnx", "-t", "tensorrt", "--calib", method, "--weight-calib", method,
                 "--data", EXAMPLE / "calib.npz", "-o", tmp_path / "m.onnx")
    assert proc.returncode == 0, proc.stderr
    assert f"({method} activations, {method} weights)" in proc.stderr and "SQNR" in proc.stderr


def test_default_output_goes_next_to_the_input(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes((EXAMPLE / "model.onnx").read_bytes())
    proc = qpass("quantize", model, "-t", "acl", "-d", EXAMPLE / "calib.npz", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.acl.int8.onnx").is_file()
    assert model.read_bytes() == (EXAMPLE / "model.onnx").read_bytes()
    umask = os.umask(0o022)
    os.umask(umask)  # qpass inherits the test's umask: its outputs get what a plain open() would give
    assert stat.S_IMODE((tmp_path / "m.acl.int8.onnx").stat().st_mode) == 0o666 & ~umask


def test_never_overwrites_the_input(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes((EXAMPLE / "model.onnx").read_bytes())
    proc = qpass("quantize", model, "-d", EXAMPLE / "calib.npz", "-o", model)
    assert_one_line_error(proc, 2, "-o {} is the input model; qpass never overwrites its inputs".format(model))
    assert model.read_bytes() == (EXAMPLE / "model.onnx").read_bytes()


@pytest.mark.parametrize("flags, message", [
    (["--report", "{model}", "--force"], "--report {model} is the input model"),
    (["--html", "{model}", "--force"], "--html {model} is the input model"),
    (["--export-encodings", "{model}", "--force"], "--export-encodings {model} is the input model"),
    (["--report", "{calib}", "--force"], "is the --data file"),
    (["-o", "{out}", "--report", "{out}"], "-o and --report both name"),
    (["--report", "{tmp}/r.json", "--html", "{tmp}/r.json"], "--report and --html both name"),
    (["--report", "{tmp}"], "is a directory"),
    (["--report", "{tmp}/link.json", "--force"], "--report {tmp}/link.json is the input model"),
    (["--report", "{tmp}/./sub/../m.onnx", "--force"], "is the input model"),
    (["--config", "{tmp}/c.toml", "--html", "{tmp}/c.toml", "--force"], "is the --config file"),
    (["--target", "{tmp}/t.toml", "--export-encodings", "{tmp}/t.toml", "--force"], "is the --target file"),
    (["--report", "{tmp}/m.onnx/r.json"], "m.onnx is not a directory"),
])
def test_no_output_replaces_an_input_or_another_output(tmp_path, flags, message):
    """Checked before any work, --force or not: the input, the data and every output survive and
    nothing is written."""
    model, calib, out = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    model.write_bytes((EXAMPLE / "model.onnx").read_bytes())
    calib.write_bytes((EXAMPLE / "calib.npz").read_bytes())
    (tmp_path / "link.json").symlink_to(model)
    (tmp_path / "sub").mkdir()
    (tmp_path / "c.toml").write_text("[quantize]\ncalib = \"kl\"\n")
    (tmp_path / "t.toml").write_text('extends = "tensorrt"\n')
    names = {"model": model, "calib": calib, "out": out, "tmp": tmp_path}
    before = tree(tmp_path)
    proc = qpass("quantize", model, "-d", calib, "-o", out, *[f.format(**names) for f in flags])
    assert_one_line_error(proc, 2, message.format(**names))
    assert tree(tmp_path) == before


def test_bench_refuses_a_library_it_cannot_load(tmp_path):
    """A truncated library would kill the process at dlopen (SIGBUS); a text file is no artifact at all."""
    library = min(Path(onnxruntime.__file__).parent.rglob("*.so"), key=lambda p: p.stat().st_size)
    data = library.read_bytes()
    (tmp_path / "cut.so").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.so").write_text("not a library\n")
    for name in ("cut.so", "text.so"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}]}))
    before = tree(tmp_path)
    assert_one_line_error(qpass("bench", tmp_path / "cut.so", "--engine", "tvm", "--report", tmp_path / "r.json"), 2,
                          "cut.so is a damaged shared library: its header tables end past the file's")
    assert_one_line_error(qpass("bench", tmp_path / "text.so", "--engine", "tvm"), 2,
                          "text.so is neither an ONNX model, a TensorRT engine nor a shared library")
    assert_one_line_error(qpass("compile", EXAMPLE / "model.onnx", "--engine", "tvm", "-o", tmp_path / "q.so",
                                "--report", tmp_path / "q.so.json"), 2, "-o's companion q.so.json and --report both name")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", ["missing", "no input key", "wrong shape", "latency of another schema"])
def test_bad_evaluation_inputs_are_refused_before_anything_is_written(tmp_path, case):
    out, report = tmp_path / "m.int8.onnx", tmp_path / "r.json"
    bad = tmp_path / "bad.npz"
    if case == "no input key":
        np.savez(bad, other=np.zeros((4, 1, 8, 8), np.float32))
    elif case == "wrong shape":
        np.savez(bad, input=np.zeros((4, 1, 9, 9), np.float32))
    flags = ["--eval-data", bad]
    if case == "latency of another schema":
        bad = tmp_path / "other.json"
        bad.write_text(json.dumps({"schema": "qpass.eval", "models": []}))
        flags = ["--html", tmp_path / "r.html", "--latency", bad]
    proc = qpass("quantize", EXAMPLE / "model.onnx", "-d", EXAMPLE / "calib.npz", "-o", out, "--report", report, *flags)
    assert_one_line_error(proc, 2, str(bad))
    assert not out.exists() and not report.exists() and not (tmp_path / "r.html").exists()


def test_eval_analyze_and_bench_never_write_over_their_inputs(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes((EXAMPLE / "model.onnx").read_bytes())
    for args in (["eval", model, model, "-d", EXAMPLE / "calib.npz", "--report", model, "--force"],
                 ["analyze", model, "-t", "acl", "-d", EXAMPLE / "calib.npz", "--report", model, "--force"],
                 ["bench", model, "--engine", "onnxruntime", "--report", model, "--force"]):
        assert_one_line_error(qpass(*args), 2, "qpass never overwrites its inputs")
    assert model.read_bytes() == (EXAMPLE / "model.onnx").read_bytes()


def nan_model(path):
    """Log of the input feeds a Conv: negative calibration inputs make its quantized input NaN."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 1, 1], [1.0, -1.0])
    nodes = [helper.make_node("Log", ["x"], ["logx"], name="log"), helper.make_node("Conv", ["logx", "w"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def quantized_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [1])
    graph = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s"], ["y"])], "g", [x], [y],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "junk.onnx").write_text("not a model")
    np.savez(tmp_path / "empty.npz", input=np.zeros((0, 1, 8, 8), np.float32))
    np.savez(tmp_path / "shape.npz", input=np.zeros((4, 1, 9, 8), np.float32))
    np.savez(tmp_path / "dtype.npz", input=np.zeros((4, 1, 8, 8), np.int64))
    np.save(tmp_path / "neg.npy", -np.ones((4, 1, 4, 4), np.float32))
    (tmp_path / "target.toml").write_text('extends = "tensorrt"\n[weight]\ngranularity = "channel"\n')
    nan_model(tmp_path / "nan.onnx")
    quantized_model(tmp_path / "q.onnx")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    custom = helper.make_graph([helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Swoosh", ["t"], ["y"], domain="my.ops")],
                               "g", [x], [y])
    onnx.save(helper.make_model(custom, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)]),
              tmp_path / "custom.onnx")
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(relu, opset_imports=[helper.make_opsetid("", 99)]), tmp_path / "opset99.onnx")
    onnx.save(helper.make_model(relu, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "relu.onnx")
    (tmp_path / "inputs.toml").write_text('extends = "onnxruntime"\n[ops.Conv]\ninputs = [5, 7]\n')
    (tmp_path / "quantise.toml").write_text('[quantise]\ncalib = "kl"\n')
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "resize.toml").write_text("resize = -8\nchannels = \"L\"\n")
    with np.load(EXAMPLE / "eval.npz") as data:
        np.savez(tmp_path / "nan_labels.npz", input=data["input"], labels=np.full(len(data["input"]), np.nan))
    return tmp_path


CASES = [
    (["missing.onnx"], "no such file"),
    (["junk.onnx"], "not a readable ONNX model"),
    (["q.onnx"], "already quantized"),
    ([EXAMPLE / "model.onnx", "--target", "tpu"], "unknown target 'tpu'"),
    ([EXAMPLE / "model.onnx", "--target", "target.toml"], "weight.granularity"),
    ([EXAMPLE / "model.onnx"], "calibration data is required"),
    ([EXAMPLE / "model.onnx", "--data", "empty.npz"], "empty"),
    ([EXAMPLE / "model.onnx", "--data", "shape.npz"], "shape"),
    ([EXAMPLE / "model.onnx", "--data", "dtype.npz"], "int64"),
    ([EXAMPLE / "model.onnx", "--data", "missing.npz"], "no such file"),
    (["nan.onnx", "--data", "neg.npy", "-t", "acl"], "tensor logx has NaN or Inf"),
    ([EXAMPLE / "model.onnx", "--input-shape", "image=1x1x8x8", "--data", EXAMPLE / "calib.npz"], "model inputs are input"),
    (["custom.onnx", "--data", "random"], "custom.onnx: ONNX Runtime cannot load it: my.ops:Swoosh(-1) is not a registered"),
    (["opset99.onnx", "--data", "random"], "opset99.onnx: ONNX Runtime cannot load it: ONNX Runtime only *guarantees*"),
    (["relu.onnx", "--data", "random"], "nothing to quantize for target onnxruntime: every node stays float "
                                        "(1 node(s): the target has no int8 rule for Relu)"),
    ([EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", "--holdout", "1000"],
     "--holdout 1000 leaves nothing to calibrate on: --data has 400 sample(s)"),
    ([EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", "--calib", "meanstd", "--meanstd-k", "nan"],
     "'nan' is not a finite number"),
    ([EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", "--meanstd-k", "inf"], "'inf' is not a finite number"),
    ([EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", "--min-sqnr", "nan"], "'nan' is not a finite number"),
    ([EXAMPLE / "model.onnx", "--data", "random:99999999999999999999"], "expected random or random:N with 0 < N <= 4096"),
    ([EXAMPLE / "model.onnx", "--data", "images", "--preprocess", "resize.toml"],
     "resize.toml: resize: expected a positive integer, got -8"),
    ([EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", "--target", "inputs.toml"],
     "ops.Conv.inputs: Conv has 3 input(s) (indices 0..2), got [5, 7]"),
    ([EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", "--config", "quantise.toml"],
     "[quantise] is not a qpass command"),
    ([EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", "--eval-data", "nan_labels.npz"],
     "nan_labels.npz: labels must be one class index (an integer >= 0) per sample, got float64 [497]"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[c[1] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(bad_inputs, args, message):
    before = tree(bad_inputs)
    proc = qpass("quantize", *args, "-o", "out.onnx", "--report", "r.json", cwd=bad_inputs)
    assert_one_line_error(proc, 2, message)
    assert tree(bad_inputs) == before


def test_random_data_says_loudly_it_is_not_calibration(tmp_path):
    proc = qpass("quantize", EXAMPLE / "model.onnx", "--data", "random:16", "-o", tmp_path / "r.onnx", "-q")
    assert proc.returncode == 0 and "not calibration" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--calib", "quantile", "--quantile", "1.5"], "--quantile must be in (0, 1]"),
    (["--calib", "meanstd", "--meanstd-k", "0"], "--meanstd-k must be positive"),
    (["--data", "random:x"], "random:N"),
])
def test_bad_calibration_options(tmp_path, args, message):
    proc = qpass("quantize", EXAMPLE / "model.onnx", "-o", tmp_path / "o.onnx", *args)
    assert_one_line_error(proc, 2, message)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("args, text", [
    (["--calib", "median"], "median"),
    (["--bias-correction", "foo"], "'foo' is not one of 'empirical', 'analytic'"),
    (["--adaround-iters", "0"], "--adaround-iters"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_usage_errors_are_one_line_exit_2(args, text):
    assert_one_line_error(qpass("quantize", EXAMPLE / "model.onnx", *args), 2, text)


def test_listing_commands():
    targets = qpass("targets")
    assert targets.returncode == 0
    assert [line.split()[0] for line in targets.stdout.splitlines()] == sorted(
        ["academic", "acl", "fbgemm", "onnxruntime", "onnxruntime-vnni", "snpe", "tensorrt", "tvm-arm", "tvm-x86"])
    show = qpass("targets", "show", "tensorrt")
    assert show.returncode == 0 and "narrow range" in show.stdout and "Conv + Add" in show.stdout
    assert "float tail" in show.stdout
    advice = qpass("targets", "show", "onnxruntime").stdout.split("this CPU: ")[1].splitlines()[1]
    assert advice.split(":")[0].strip() in ("avx512_vnni", "avx_vnni", "asimddp", "avx2") or "no advice" in advice
    passes = qpass("passes")
    assert [line.split()[0] for line in passes.stdout.splitlines()] == [
        "fold-batchnorm", "preoptimize", "equalize", "smoothquant", "decompose", "annotate", "calibrate", "bn-recal",
        "adaround", "brecq", "insert-qdq", "bias-correct", "fold-scalar-factors"]
    version = qpass("--version")
    assert version.returncode == 0 and "qpass" in version.stdout


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "qpasses.cli", "targets"], capture_output=True, text=True)
    assert proc.returncode == 0 and "tensorrt" in proc.stdout


def test_quantize_gates_exit_1_after_writing_model_and_report(tmp_path):
    common = ["quantize", EXAMPLE / "model.onnx", "-t", "tensorrt", "-d", EXAMPLE / "calib.npz",
              "--eval-data", EXAMPLE / "eval.npz", "--max-drop", "2"]
    passed = qpass(*common, "--min-sqnr", "10", "-o", tmp_path / "ok.onnx", "--report", tmp_path / "ok.json")
    assert passed.returncode == 0, passed.stderr
    assert "top-1 (top-1 accuracy vs labels)" in passed.stderr
    record = json.loads((tmp_path / "ok.json").read_text())
    evaluation = record["fidelity"]["evaluation"]
    assert record["gates"]["failed"] == [] and evaluation["samples"] == 497 and evaluation["drop"] <= 2

    failed = qpass(*common, "--min-sqnr", "90", "-o", tmp_path / "bad.onnx", "--report", tmp_path / "bad.json", "-q")
    assert_one_line_error(failed, 1, "gate failed: worst output SQNR")
    assert (tmp_path / "bad.onnx").is_file()
    assert json.loads((tmp_path / "bad.json").read_text())["gates"]["failed"][0].endswith("< --min-sqnr 90")


def test_eval_compares_two_models_and_gates(tmp_path):
    int8 = tmp_path / "int8.onnx"
    assert qpass("quantize", EXAMPLE / "model.onnx", "-t", "snpe", "-d", EXAMPLE / "calib.npz", "-o", int8, "-q").returncode == 0
    ok = qpass("eval", EXAMPLE / "model.onnx", int8, "--data", EXAMPLE / "eval.npz", "--max-drop", "2",
               "--report", tmp_path / "eval.json")
    assert ok.returncode == 0, ok.stderr
    assert "497 samples" in ok.stdout and "SQNR" in ok.stdout and "drop" in ok.stdout
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["schema"] == "qpass.eval" and report["metric"] == "top-1 accuracy vs labels"
    assert_one_line_error(qpass("eval", EXAMPLE / "model.onnx", int8, "--data", EXAMPLE / "eval.npz",
                                "--min-sqnr", "90", "-q"), 1, "gate failed")
    assert_one_line_error(qpass("eval", EXAMPLE / "model.onnx", int8, "--data", tmp_path / "missing.npz"), 2,
                          "missing.npz")


def test_eval_sizes_a_dynamic_model_from_the_data_as_quantize_does(tmp_path):
    """A model exported with dynamic H/W: quantize reads the sizes off the arrays, and so must eval."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "dyn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])], [w])
    model, int8, data = tmp_path / "dyn.onnx", tmp_path / "dyn.int8.onnx", tmp_path / "x.npy"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), model)
    np.save(data, rng.standard_normal((16, 3, 12, 20)).astype(np.float32))
    assert qpass("quantize", model, "-t", "acl", "-d", data, "-o", int8, "-q").returncode == 0  # one conv, its output float
    done = qpass("eval", model, int8, "--data", data, "--report", tmp_path / "e.json", "-q")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "e.json").read_text())["worst_sqnr_db"] > 25


def test_existing_outputs_are_replaced_only_with_force(tmp_path):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    args = ["quantize", EXAMPLE / "model.onnx", "-t", "acl", "-d", EXAMPLE / "calib.npz", "-o", out, "-q"]
    assert qpass(*args).returncode == 0
    report.write_text("earlier")
    before = out.read_bytes()
    out.write_bytes(b"earlier artifact")
    assert_one_line_error(qpass(*args), 2, f"{out} exists; pass --force to replace it")
    assert out.read_bytes() == b"earlier artifact"
    assert qpass(*args, "--force").returncode == 0 and out.read_bytes() == before
    out.unlink()
    assert_one_line_error(qpass(*args, "--report", report), 2, f"{report} exists")
    assert not out.exists()  # refused before any work
    for command in (["compile", EXAMPLE / "model.onnx", "--engine", "onnxruntime", "-o", report],
                    ["eval", EXAMPLE / "model.onnx", EXAMPLE / "model.onnx", "--data", EXAMPLE / "eval.npz",
                     "--report", report]):
        assert_one_line_error(qpass(*command), 2, "exists; pass --force")


def test_options_from_a_config_file_with_the_command_line_winning(tmp_path):
    config = tmp_path / "qpass.toml"
    config.write_text(f'[quantize]\ntarget = "snpe"\ncalib = "kl"\ndata = "{EXAMPLE / "calib.npz"}"\n'
                      f'eval-data = "{EXAMPLE / "eval.npz"}"\nmax_drop = 2\nfloat-layer = ["/head/head.2/Gemm"]\nquiet = true\n')
    proc = qpass("quantize", EXAMPLE / "model.onnx", "--config", config, "-o", tmp_path / "a.onnx", "--report", tmp_path / "a.json")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["target"]["name"] == "snpe" and record["calibration"]["activations"] == "kl"
    assert record["gates"]["max_drop"] == 2 and "/head/head.2/Gemm" in record["nodes"]["float"]
    proc = qpass("quantize", EXAMPLE / "model.onnx", "--config", config, "--calib", "minmax", "-t", "acl",
                 "-o", tmp_path / "b.onnx", "--report", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["target"]["name"] == "acl" and record["calibration"]["activations"] == "minmax"

    config.write_text('[quantize]\ncalibb = "kl"\n')
    assert_one_line_error(qpass("quantize", EXAMPLE / "model.onnx", "--config", config), 2,
                          "`qpass quantize` has no option calibb")
    config.write_text('[quantize\n')
    assert_one_line_error(qpass("quantize", EXAMPLE / "model.onnx", "--config", config), 2, f"--config {config}:")


def test_verbose_logs_each_pass_and_every_command_has_help(tmp_path):
    proc = qpass("quantize", EXAMPLE / "model.onnx", "-d", EXAMPLE / "calib.npz", "-o", tmp_path / "m.onnx", "-q", "-v")
    assert proc.returncode == 0
    assert [line.split(":")[2].split()[1] for line in proc.stderr.splitlines()] == \
        ["fold-batchnorm", "preoptimize", "decompose", "annotate", "calibrate", "insert-qdq", "fold-scalar-factors"]
    for command in ("quantize", "eval", "analyze", "check", "compile", "bench", "rpc-server", "passes"):
        shown = qpass(command, "--help")
        assert shown.returncode == 0 and "--config" in shown.stdout and "--verbose" in shown.stdout, command
        assert "Example" in shown.stdout, command
    for command in (["targets"], ["targets", "show"]):
        assert "Example" in qpass(*command, "--help").stdout
    assert qpass("--version").stdout.startswith("qpass, version ")


def test_bench_latency_gate(tmp_path):
    model = tmp_path / "m.onnx"
    assert qpass("quantize", EXAMPLE / "model.onnx", "-d", EXAMPLE / "calib.npz", "-o", model, "-q").returncode == 0
    args = ["bench", model, "--engine", "onnxruntime", "--runs", "3", "--warmup", "1", "-q"]
    failed = qpass(*args, "--max-latency", "0.000001", "--report", tmp_path / "slow.json")
    assert failed.returncode == 1 and failed.stderr.strip().splitlines()[-1].startswith("qpass: error: gate failed: median")
    assert json.loads((tmp_path / "slow.json").read_text())["gates"]["failed"]
    assert qpass(*args, "--max-latency", "10000").returncode == 0


def test_a_technique_judged_on_few_samples_says_so(tmp_path):
    """Keep-or-drop rests on the held-back samples: with 4 of them the summary warns."""
    few = qpass("quantize", EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", "--cle", "--holdout", "4",
                "-o", tmp_path / "few.onnx")
    assert few.returncode == 0 and "judged on 4 held-back sample(s)" in few.stderr
    enough = qpass("quantize", EXAMPLE / "model.onnx", "--data", EXAMPLE / "calib.npz", "--cle", "--holdout", "32",
                   "-o", tmp_path / "enough.onnx")
    assert enough.returncode == 0 and "held-back sample(s), too few" not in enough.stderr
