"""ops: the multiply-accumulates of each weighted op, counted by hand for small shapes."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qpasses.ops import node_macs


def test_node_macs_counts_each_weighted_op():
    w = lambda name, *shape: numpy_helper.from_array(np.zeros(shape, np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),  # 1x4x8x8 outputs, 3*3*3 each
             helper.make_node("Conv", ["c", "wd"], ["d"], name="depthwise", group=4, strides=[2, 2]),  # 1x4x3x3, 1*3*3
             helper.make_node("Flatten", ["d"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg"], ["g"], name="gemm", transB=1),  # 1x5 outputs, K = 36
             helper.make_node("MatMul", ["g", "wm"], ["y"], name="matmul"),  # 1x2 outputs, K = 5
             helper.make_node("Relu", ["y"], ["out"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [w("wc", 4, 3, 3, 3), w("wd", 4, 1, 3, 3), w("wg", 5, 36), w("wm", 5, 2)])
    counts = node_macs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert counts == {"conv": 4 * 64 * 27, "depthwise": 4 * 9 * 9, "gemm": 5 * 36, "matmul": 2 * 5}
