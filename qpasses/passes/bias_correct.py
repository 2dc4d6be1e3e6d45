"""Empirical bias correction (AIMET white paper sec. 4; Nagel et al. 2019).

Quantizing weights and inputs shifts the mean of each output channel of a conv/gemm:
E[y_q] != E[y]. Measured on calibration data, the shift is removed by adding
    delta_c = E[y_float]_c - E[y_quant]_c
to the bias of channel c (a float bias directly; an int32 bias in steps of its scale s_x * s_w;
a node without bias gets one). Means are taken over the batch and spatial axes, in ONNX Runtime,
for the float model and the current Q/DQ model (simulated op by op: the target's engine, not
ORT's int8 kernels, is what the correction is for); two rounds let later layers see the earlier
corrections. Run after `insert-qdq`.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qpasses.calibration.runner import observe
from qpasses.calibration.stats import ChannelMoments
from qpasses.pass_infra import Pass, PassContext, QuantState

BIAS_OPS = ("Conv", "ConvTranspose", "Gemm")
MAX_SAMPLES = 256


def channel_means(model, tensors: list[str], ctx: PassContext, quantized: bool) -> dict[str, np.ndarray]:
    means = {name: ChannelMoments() for name in tensors}
    limit = min(ctx.max_samples or MAX_SAMPLES, MAX_SAMPLES)
    observe(model, means, ctx.data, ctx.batch_size, limit, ctx.quiet, desc="bias correction", optimize=not quantized)
    return {name: m.mean() for name, m in means.items()}


class BiasCorrect(Pass):
    name = "bias-correct"
    summary = "empirical bias correction of conv/gemm outputs on calibration data (--bias-correction)"
    requires = ("plan", "float_model")

    def __init__(self, rounds: int = 2):
        self.rounds = rounds

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        nodes = {n.name: n for n in state.graph.nodes}
        targets = [nodes[w.node] for w in state.plan.weights if w.op_type in BIAS_OPS and w.node in nodes]
        outputs = [n.outputs[0].name for n in targets]
        if not targets or ctx.data is None:
            state.notes.append("bias correction: nothing to correct" if targets else "bias correction: no conv/gemm")
            return False
        reference = channel_means(state.float_model, outputs, ctx, quantized=False)
        for _ in range(self.rounds):
            current = channel_means(state.model(), outputs, ctx, quantized=True)
            for node, name in zip(targets, outputs):
                _add_to_bias(node, reference[name] - current[name])
        state.notes.append(f"bias correction: corrected {len(targets)} layer(s)")
        return True


def _add_to_bias(node: gs.Node, delta: np.ndarray) -> None:
    if len(node.inputs) < 3 or node.inputs[2].name == "":
        node.inputs[2:] = [gs.Constant(f"{node.name}.bias_correction", delta.astype(np.float32))]
        return
    bias = node.inputs[2]
    if isinstance(bias, gs.Constant):
        bias.values = (bias.values + delta).astype(bias.values.dtype)
        return
    dq = bias.inputs[0]  # DequantizeLinear(int32 bias, scale, 0)
    stored, scale = dq.inputs[0], dq.inputs[1].values.astype(np.float64)
    stored.values = np.clip(stored.values + np.round(delta / scale), np.iinfo(np.int32).min,
                            np.iinfo(np.int32).max).astype(np.int32)
