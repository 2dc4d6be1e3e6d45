"""Cross-layer equalization (Nagel et al., data-free quantization; AIMET white paper sec. 4.1).

    Conv1 -> act -> Conv2, act in {none, Relu, LeakyRelu}:
        s_i = sqrt(r1_i * r2_i) / r2_i,  r1_i = max|W1[i, ...]|,  r2_i = max|W2[:, i, ...]|
        W1[i] /= s_i,  b1[i] /= s_i,  W2[:, i] *= s_i
    so that both weights have range sqrt(r1_i * r2_i) on channel i. The function is unchanged
    because act(x / s) = act(x) / s for s > 0 (positive homogeneity). Conv2 may be depthwise
    (its channel i is W2[i]); Conv1 may be grouped or depthwise (its channel i is W1[i]).

High-bias absorption (same paper, sec. 4.1.2) follows, for pairs joined by a ReLU whose first
conv has BatchNorm statistics on record: its output is ~ N(beta_i, gamma_i^2) per channel, so
c_i = max(0, beta_i - 3 |gamma_i|) is (almost) always passed through the ReLU unchanged and can
move into the next layer:
    b1[i] -= c_i,   b2[o] += sum_{i, taps} W2[o, i, ...] c_i   (depthwise: b2[i] += c_i sum W2[i])
which shrinks the first output's range without changing the function, except where conv2 pads
with zeros (its border taps then see -c_i too) or the 3-sigma bound fails; the pipeline's
keep-the-better check guards those cases.

ReLU6 (Clip 0..6) is not positive-homogeneous: such a pair is skipped and reported, unless the
pass is built with `replace_relu6=True`, which turns the Clip into a Relu first (the user's call:
it changes the float model wherever activations exceed 6). Pairs are equalized repeatedly until
the scales settle, so chains Conv1 -> Conv2 -> Conv3 balance end to end. Run after BatchNorm
folding and before `annotate`; the recorded BN statistics of a scaled conv are scaled alike.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qpasses.pass_infra import Pass, PassContext, QuantState

HOMOGENEOUS = ("Relu", "LeakyRelu")


def _is_relu6(node: gs.Node) -> bool:
    if node.op != "Clip" or len(node.inputs) < 3:
        return False
    lo, hi = node.inputs[1], node.inputs[2]
    return (isinstance(lo, gs.Constant) and isinstance(hi, gs.Constant)
            and float(lo.values) == 0.0 and float(hi.values) == 6.0)


def _single_consumer(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    if len(tensor.outputs) != 1 or tensor in graph.outputs:
        return None
    return tensor.outputs[0]


def _constant_conv(node: gs.Node) -> bool:
    return node.op == "Conv" and isinstance(node.inputs[1], gs.Constant)


def find_pairs(graph: gs.Graph) -> tuple[list[tuple[gs.Node, gs.Node, gs.Node | None]], list[str]]:
    """(conv1, conv2, activation) pairs that can be equalized, and why others were skipped."""
    pairs, skipped = [], []
    for conv1 in graph.nodes:
        if not _constant_conv(conv1):
            continue
        nxt = _single_consumer(conv1.outputs[0], graph)
        act = None
        if nxt is not None and (nxt.op in HOMOGENEOUS or _is_relu6(nxt)):
            act, nxt = nxt, _single_consumer(nxt.outputs[0], graph)
        if nxt is None or not _constant_conv(nxt) or nxt.inputs[0] is not (act or conv1).outputs[0]:
            continue
        channels = conv1.inputs[1].values.shape[0]
        groups = int(nxt.attrs.get("group", 1))
        w2 = nxt.inputs[1].values
        if not (groups == 1 and w2.shape[1] == channels) and not (groups == channels and w2.shape[0] == channels):
            skipped.append(f"{conv1.name} -> {nxt.name}: grouped convolution, channels do not pair one to one")
            continue
        pairs.append((conv1, nxt, act))
    return pairs, skipped


def equalize_pair(conv1: gs.Node, conv2: gs.Node) -> np.ndarray:
    """Scale one pair in place; returns the per-channel scales s."""
    w1 = conv1.inputs[1].values.astype(np.float64)
    w2 = conv2.inputs[1].values.astype(np.float64)
    depthwise = int(conv2.attrs.get("group", 1)) > 1
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    r2 = (np.abs(w2).reshape(w2.shape[0], -1).max(axis=1) if depthwise
          else np.abs(w2).swapaxes(0, 1).reshape(w2.shape[1], -1).max(axis=1))
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    conv1.inputs[1].values = (w1 / s.reshape(shape1)).astype(conv1.inputs[1].values.dtype)
    if len(conv1.inputs) > 2 and isinstance(conv1.inputs[2], gs.Constant):
        conv1.inputs[2].values = (conv1.inputs[2].values / s).astype(conv1.inputs[2].values.dtype)
    shape2 = shape1 if depthwise else (1, -1) + (1,) * (w2.ndim - 2)
    conv2.inputs[1].values = (w2 * s.reshape(shape2)).astype(conv2.inputs[1].values.dtype)
    return s


def absorb_high_bias(conv1: gs.Node, conv2: gs.Node, record: dict | None) -> bool:
    """Move c = max(0, beta - 3|gamma|) from conv1's bias into conv2's (see the module docstring)."""
    if record is None or len(conv1.inputs) < 3 or not isinstance(conv1.inputs[2], gs.Constant):
        return False
    c = np.maximum(0.0, record["beta"] - 3.0 * np.abs(record["gamma"]))
    if not np.any(c > 0):
        return False
    w2 = conv2.inputs[1].values.astype(np.float64)
    depthwise = int(conv2.attrs.get("group", 1)) > 1
    shift = c * w2.reshape(w2.shape[0], -1).sum(axis=1) if depthwise else np.einsum("oi...,i->o...", w2, c).reshape(w2.shape[0], -1).sum(axis=1)
    b1 = conv1.inputs[2]
    b1.values = (b1.values - c).astype(b1.values.dtype)
    if len(conv2.inputs) > 2 and isinstance(conv2.inputs[2], gs.Constant):
        conv2.inputs[2].values = (conv2.inputs[2].values + shift).astype(conv2.inputs[2].values.dtype)
    else:
        conv2.inputs[2:] = [gs.Constant(f"{conv2.name}.bias", shift.astype(conv2.inputs[1].values.dtype))]
    record["beta"] = record["beta"] - c
    return True


class Equalize(Pass):
    name = "equalize"
    summary = "cross-layer equalization of conv -> (relu) -> conv weight ranges (--cle)"

    def __init__(self, replace_relu6: bool = False, iterations: int = 20, tolerance: float = 1e-4):
        self.replace_relu6 = replace_relu6
        self.iterations = iterations
        self.tolerance = tolerance

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        graph = state.graph
        pairs, skipped = find_pairs(graph)
        usable, relu_pairs = [], []
        for conv1, conv2, act in pairs:
            if act is not None and act.op == "Clip":
                if not self.replace_relu6:
                    skipped.append(f"{conv1.name} -> {conv2.name}: ReLU6 between them is not scale-invariant "
                                   "(--cle-replace-relu6 turns it into ReLU)")
                    continue
                act.op, act.inputs = "Relu", act.inputs[:1]
                state.notes.append(f"cle: {act.name} ReLU6 replaced by ReLU")
            usable.append((conv1, conv2))
            if act is not None and act.op == "Relu":
                relu_pairs.append((conv1, conv2))
        for _ in range(self.iterations):
            scales = [equalize_pair(c1, c2) for c1, c2 in usable]
            for (conv1, _), s in zip(usable, scales):
                record = state.bn_records.get(conv1.outputs[0].name)
                if record is not None:  # the folded BN's target statistics scale with the channel
                    record["beta"], record["gamma"] = record["beta"] / s, record["gamma"] / s
            if all(np.max(np.abs(np.log(s))) < self.tolerance for s in scales):
                break
        absorbed = sum(absorb_high_bias(c1, c2, state.bn_records.get(c1.outputs[0].name)) for c1, c2 in relu_pairs)
        state.notes.extend(f"cle: skipped {why}" for why in skipped)
        state.notes.append(f"cle: equalized {len(usable)} conv pair(s), absorbed high biases in {absorbed}")
        return bool(usable)
