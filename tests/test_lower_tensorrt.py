"""The TensorRT engine. Building and timing need `tensorrt`, `cuda-python` and an NVIDIA GPU: those
tests run where they exist and skip elsewhere with the reason; without TensorRT the commands
must say so in one line."""

from __future__ import annotations

import importlib.util
import json

import onnx
import pytest

from conftest import EXAMPLE
from qpasses.calibration.runner import session
from qpasses.pass_infra import PassContext
from qpasses.pipeline import quantize, sqnr
from qpasses.targets import load_target
from qpasses.targets.lower import file_kind
from test_cli import assert_one_line_error, qpass

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def have_gpu() -> bool:
    from qpasses.targets.lower.tensorrt import gpu_name

    try:
        return bool(gpu_name())
    except Exception:
        return False


needs_gpu = pytest.mark.skipif(not (HAVE_TENSORRT and have_gpu()), reason="needs TensorRT and an NVIDIA GPU: TensorRT's "
                               "wheels download from a host this machine cannot reach, and it has no GPU")


@pytest.fixture
def qdq(tmp_path):
    model = quantize(EXAMPLE / "model.onnx", load_target("tensorrt"), EXAMPLE / "calib.npz", PassContext(quiet=True)).model
    onnx.save(model, tmp_path / "m.onnx")
    return tmp_path / "m.onnx"


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed: the build tests below run instead")
def test_without_tensorrt_compile_and_bench_say_so(qdq, tmp_path):
    proc = qpass("compile", qdq, "--engine", "tensorrt", "-o", tmp_path / "m.plan")
    assert_one_line_error(proc, 3, "needs TensorRT")
    assert not (tmp_path / "m.plan").exists()
    (tmp_path / "fake.plan").write_bytes(b"ftrt" + bytes(60))
    assert_one_line_error(qpass("bench", tmp_path / "fake.plan", "--engine", "tensorrt"), 3, "needs TensorRT")


@needs_gpu
def test_engine_matches_the_qdq_reference_and_runs_int8(qdq, tmp_path):
    from qpasses.targets.lower.tensorrt import Runner, compile_model

    report = compile_model(qdq, tmp_path / "m.plan", input_shapes={"input": [8, 3, 16, 16]},
                           timing_cache=tmp_path / "timing.cache")
    assert file_kind(tmp_path / "m.plan") == "tensorrt" and (tmp_path / "timing.cache").exists()
    assert sum(report.integer_nodes.values()) >= 7  # the convs and the gemm
    runner = Runner(tmp_path / "m.plan", batch=8)
    assert runner() > 0
    reference = session(onnx.load(qdq), optimize=False).run(None, runner.feeds)[0]
    # TensorRT fuses and may run float layers in FP16: a looser bound than integer-exact
    assert sqnr(reference, runner.results()[0]) > 25


@needs_gpu
def test_bench_reports_the_gpu(qdq, tmp_path):
    assert qpass("compile", qdq, "--engine", "tensorrt", "-o", tmp_path / "m.plan",
                 "--input-shape", "input=1x3x16x16").returncode == 0
    proc = qpass("bench", tmp_path / "m.plan", "--engine", "tensorrt", "--runs", "20", "--report", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["device"] and result["models"]["model"]["latency"]["median_ms"] > 0


def test_an_onnx_file_is_not_an_engine(qdq):
    assert_one_line_error(qpass("bench", qdq, "--engine", "tensorrt"), 2, "an ONNX model, not what --engine tensorrt runs")


def test_planned_int8_layers_that_tensorrt_ran_otherwise_are_flagged(qdq):
    """The engine inspector's JSON (DETAILED; layer names join the fused ONNX nodes with " + "), as
    TensorRT 10 writes it, read against the plan: a planned conv in FP16 is named, with its precision."""
    from qpasses.targets.lower import planned_int8
    from qpasses.targets.lower.tensorrt import CompileReport, read_precisions

    model = onnx.load(qdq)
    convs = [n.name for n in planned_int8(model)]
    int8 = "Thirty-two wide channel vectorized row major Int8 format"
    half = "Channel major FP16 format where channel % 8 == 0"
    layers = [{"Name": f"{name} + relu", "LayerType": "CaskConvolution",
               "Inputs": [{"Name": "x", "Format/Datatype": half if i == 1 else int8}],
               "Outputs": [{"Name": "y", "Format/Datatype": int8}]} for i, name in enumerate(convs[:-1])]
    layers.append({"Name": "Reformatting CopyNode for Input Tensor 0", "LayerType": "Reformat",
                   "Inputs": [{"Format/Datatype": "Row major linear FP32"}], "Outputs": [{"Format/Datatype": int8}]})
    report = CompileReport("tensorrt", "m.onnx", "m.plan", "10", "gpu", False, True, 1024)
    read_precisions({"Layers": layers, "Bindings": ["input"]}, model, report)
    assert report.integer_nodes == {"CaskConvolution": len(convs) - 2}
    assert report.planned_not_int8 == [{"name": convs[1], "op": "Conv", "precision": "FP16"},
                                       {"name": convs[-1], "op": model.graph.node[[n.name for n in model.graph.node].index(convs[-1])].op_type,
                                        "precision": "not found among the engine's layers"}]
    assert "2 planned-int8 conv/matmul node(s) run in another precision" in report.warnings[0]
