"""SmoothQuant: the smoothed float model computes what the original does (ONNX Runtime), the scales are
the paper's (numpy), and on a LayerNorm with outlier channels the int8 model gains SQNR."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from qpasses.calibration.runner import session
from qpasses.pass_infra import PassContext
from qpasses.passes.smoothquant import ALPHA, find_sites
from qpasses.pipeline import Techniques, quantize
from qpasses.targets import load_target

TOKENS, CHANNELS = 12, 16


def _attention_input(path, layernorm_op: bool, residual: bool = False) -> dict[str, np.ndarray]:
    """X -> LayerNorm (gain with two outlier channels) -> Reshape [tokens, C] -> two matmuls (a MatMul
    and a Gemm with transB), as a transformer's q/v projections read it. Returns the constants."""
    rng = np.random.default_rng(0)
    gamma = rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32)
    gamma[:2] = 40.0  # the outlier channels trained LayerNorms have
    beta = rng.uniform(-0.5, 0.5, CHANNELS).astype(np.float32)
    w1 = rng.standard_normal((CHANNELS, 24)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((8, CHANNELS)).astype(np.float32) * 0.2  # Gemm transB: [N, K]
    w1[:2], w2[:, :2] = w1[:2] / 40, w2[:, :2] / 40  # trained weights read the outliers lightly
    if layernorm_op:
        nodes = [helper.make_node("LayerNormalization", ["X", "gamma", "beta"], ["ln"], name="ln", axis=-1)]
    else:  # as a Paddle or opset-11 export writes it: (x - mean) / std, then the gain and the bias
        nodes = [helper.make_node("ReduceMean", ["X"], ["mu"], axes=[-1]), helper.make_node("Sub", ["X", "mu"], ["xc"]),
                 helper.make_node("Mul", ["xc", "xc"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
                 helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
                 helper.make_node("Div", ["xc", "sd"], ["norm"]), helper.make_node("Mul", ["norm", "gamma"], ["scaled"], name="gain"),
                 helper.make_node("Add", ["scaled", "beta"], ["ln"], name="bias")]
    nodes += [helper.make_node("Reshape", ["ln", "shape"], ["rows"]),
              helper.make_node("MatMul", ["rows", "W1"], ["Y1"], name="q"),
              helper.make_node("Gemm", ["rows", "W2", "b2"], ["Y2"], name="v", transB=1)]
    outputs = [helper.make_tensor_value_info("Y1", TensorProto.FLOAT, [TOKENS, 24]),
               helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [TOKENS, 8])]
    if residual:
        nodes.append(helper.make_node("Add", ["ln", "X"], ["R"]))
        outputs.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, [1, TOKENS, CHANNELS]))
    constants = {"gamma": gamma, "beta": beta, "W1": w1, "W2": w2, "b2": np.zeros(8, np.float32),
                 "eps": np.array(1e-5, np.float32), "shape": np.array([TOKENS, CHANNELS], np.int64)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, TOKENS, CHANNELS])],
                              outputs, [numpy_helper.from_array(v, k) for k, v in constants.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return constants


def _layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma + beta


@pytest.mark.parametrize("layernorm_op", [True, False], ids=["LayerNormalization", "decomposed"])
def test_smoothing_keeps_the_function_and_moves_the_outliers_into_the_weights(tmp_path, layernorm_op):
    constants = _attention_input(tmp_path / "m.onnx", layernorm_op)
    x = np.random.default_rng(1).standard_normal((64, 1, TOKENS, CHANNELS)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    result = quantize(tmp_path / "m.onnx", load_target("onnxruntime"), tmp_path / "calib.npy",
                      PassContext(quiet=True, batch_size=1), techniques=Techniques(smoothquant=True))
    decision = result.decisions[0]
    assert decision.technique == "smoothquant" and decision.applied and decision.kept
    assert decision.after_db >= decision.before_db + 20.0, decision  # 11 -> 38 dB (decomposed: 8 -> 35)
    # the float model it quantized computes what the original does
    original, smoothed = session(onnx.load(tmp_path / "m.onnx")), session(result.float_model)
    for sample in x[:4]:
        for a, b in zip(original.run(None, {"X": sample}), smoothed.run(None, {"X": sample})):
            assert np.allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    # the scales are the paper's, against numpy: s_j = max|X_j|^a / max|W_j|^(1-a) over both readers
    calibration = x[:-holdout] if (holdout := result.holdout_samples) else x
    x_max = np.abs(_layernorm(calibration, constants["gamma"], constants["beta"])).reshape(-1, CHANNELS).max(0)
    w_max = np.maximum(np.abs(constants["W1"]).max(1), np.abs(constants["W2"]).max(0))
    s = x_max ** ALPHA / w_max ** (1 - ALPHA)
    got = {t.name: numpy_helper.to_array(t) for t in result.float_model.graph.initializer}
    assert np.allclose(got["gamma"], constants["gamma"] / s, rtol=1e-5)
    assert np.allclose(got["beta"], constants["beta"] / s, rtol=1e-5)
    assert np.allclose(got["W1"], constants["W1"] * s[:, None], rtol=1e-5)


def test_an_activation_read_by_anything_but_matmuls_is_left_alone(tmp_path):
    """A residual Add also reads the LayerNorm output: dividing it by s would change the sum."""
    _attention_input(tmp_path / "m.onnx", layernorm_op=True, residual=True)
    assert not find_sites(gs.import_onnx(onnx.load(tmp_path / "m.onnx")))
    _attention_input(tmp_path / "ok.onnx", layernorm_op=True)
    (site,) = find_sites(gs.import_onnx(onnx.load(tmp_path / "ok.onnx")))
    assert sorted(n.name for n in site.readers) == ["q", "v"]
