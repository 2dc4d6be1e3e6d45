"""SmoothQuant (Xiao et al., 2023): move the activation outliers of a transformer into the weights.

A LayerNorm output has a few channels far larger than the rest; one per-tensor activation scale
for all of them leaves the ordinary channels a handful of levels. For an activation X read only by
matmuls with constant weights W (X's last axis is W's input axis), per input channel j:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)          (alpha = 0.5, the paper's default)
    X' = X / s,   W' = diag(s) W,   so X' W' = X W

The division goes into the constants of the op that writes X, so no op is added: a
LayerNormalization's scale and bias, a decomposed LayerNorm's (or RMSNorm's) gain Mul and bias Add.
Reshapes that keep the last axis may sit between it and the matmuls (ORT's MatMul + Add fusion
flattens the tokens into a Gemm). max|X_j| is measured on the calibration data in the float model.
Run after BatchNorm folding and ORT's rewrites (`preoptimize`), before `annotate`; like CLE it
changes float weights, so calibration follows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qpasses.calibration.runner import observe
from qpasses.calibration.stats import ChannelAbsMax
from qpasses.pass_infra import Pass, PassContext, QuantState

ALPHA = 0.5
RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")  # row-major: a matmul reading rows of the
# original last axis's length reads the original rows (ORT flattens the tokens before a Gemm)
MIN_RANGE = 1e-5  # a channel's max |x| or max |w| below this counts as this (the paper's clamp)


@dataclass
class Site:
    """One activation to smooth: the constants that write it (scaled by 1/s) and the weights that read
    it (row j scaled by s_j)."""

    tensor: str  # what the matmuls read: max|X_j| is measured here
    divided: list[tuple[gs.Node, int]]  # (node, input index) of every constant divided by s
    readers: list[gs.Node]  # Gemm/MatMul nodes with a constant weight


def _constant(node: gs.Node, channels: int) -> int | None:
    """The index of a constant input of `node` that holds one value per channel of the last axis."""
    for idx, tensor in enumerate(node.inputs):
        if isinstance(tensor, gs.Constant) and tensor.values.size == channels and tensor.values.shape[-1:] == (channels,):
            return idx
    return None


def _writers(tensor: gs.Variable, channels: int) -> list[tuple[gs.Node, int]] | None:
    """The constants to divide so that the op writing `tensor` writes tensor / s, or None."""
    if len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op == "LayerNormalization" and int(node.attrs.get("axis", -1)) in (-1, len(tensor.shape or []) - 1):
        return [(node, i) for i in (1, 2) if i < len(node.inputs) and isinstance(node.inputs[i], gs.Constant)]
    if node.op == "Mul" and (idx := _constant(node, channels)) is not None:
        return [(node, idx)]
    if node.op == "Add" and (idx := _constant(node, channels)) is not None:
        other = node.inputs[1 - idx]
        if isinstance(other, gs.Variable) and len(other.outputs) == 1 and other.inputs and other.inputs[0].op == "Mul":
            gain = _constant(other.inputs[0], channels)
            return None if gain is None else [(other.inputs[0], gain), (node, idx)]
    return None


def _rows(node: gs.Node, tensor: gs.Tensor) -> int | None:
    """The input channels of `node` if it is a matmul with a constant weight reading `tensor`'s last
    axis, else None."""
    if node.op not in ("Gemm", "MatMul") or node.inputs[0] is not tensor or not isinstance(node.inputs[1], gs.Constant):
        return None
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return None
    return node.inputs[1].values.shape[_row_axis(node)]


def find_sites(graph: gs.Graph) -> list[Site]:
    """Every activation written by a normalisation's constants and read only by matmuls (through
    reshapes that keep the last axis)."""
    outputs = {t.name for t in graph.outputs}
    sites = []
    for node in graph.nodes:
        if node.op not in ("LayerNormalization", "Mul", "Add") or not node.outputs:
            continue
        start = node.outputs[0]
        readers, rows, frontier, ok = [], set(), [start], True
        while frontier and ok:
            tensor = frontier.pop()
            ok = tensor.name not in outputs and bool(tensor.outputs)
            for reader in tensor.outputs:
                if (k := _rows(reader, tensor)) is not None:
                    readers.append(reader)
                    rows.add(k)
                elif reader.op in RESHAPES:
                    frontier.append(reader.outputs[0])
                else:
                    ok = False
        divided = _writers(start, rows.pop()) if ok and len(rows) == 1 else None
        if divided:
            sites.append(Site(readers[0].inputs[0].name, divided, readers))
    return sites


def _row_axis(node: gs.Node) -> int:
    """The weight axis of the input channels (the rows X's last axis multiplies)."""
    weight = node.inputs[1].values
    if node.op == "Gemm":
        return 1 if node.attrs.get("transB", 0) else 0
    return weight.ndim - 2 if weight.ndim >= 2 else 0


def smoothing_scales(x_max: np.ndarray, readers: list[gs.Node], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), the weight maximum over every reader's row j."""
    w_max = np.zeros_like(x_max)
    for node in readers:
        w = np.abs(node.inputs[1].values.astype(np.float64))
        axis = _row_axis(node)
        w_max = np.maximum(w_max, np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).max(axis=1))
    return np.maximum(x_max, MIN_RANGE) ** alpha / np.maximum(w_max, MIN_RANGE) ** (1 - alpha)


def _scale(node: gs.Node, idx: int, factor: np.ndarray, axis: int = -1) -> None:
    """Multiply a constant input by `factor` along `axis`; a constant other nodes also read is copied."""
    constant = node.inputs[idx]
    values = constant.values
    shape = [1] * values.ndim
    shape[axis] = -1
    scaled = (values.astype(np.float64) * factor.reshape(shape)).astype(values.dtype)
    if len(constant.outputs) > 1:
        node.inputs[idx] = gs.Constant(f"{constant.name}.smoothed.{node.name}", scaled)
    else:
        constant.values = scaled


class SmoothQuant(Pass):
    name = "smoothquant"
    summary = "SmoothQuant: move LayerNorm outlier channels' range into the matmul weights (--smoothquant)"

    def __init__(self, alpha: float = ALPHA):
        self.alpha = alpha

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        sites = find_sites(state.graph)
        if not sites:
            state.notes.append("smoothquant: no normalisation output read only by matmuls with constant weights")
            return False
        if ctx.data is None:
            state.notes.append("smoothquant: needs calibration data to measure the activations")
            return False
        maxima = {site.tensor: ChannelAbsMax() for site in sites}
        observe(state.model(), maxima, ctx.data, ctx.batch_size, ctx.max_samples, ctx.quiet, desc="measuring outliers")
        for site in sites:
            s = smoothing_scales(maxima[site.tensor].maximum, site.readers, self.alpha)
            for node, idx in site.divided:
                _scale(node, idx, 1.0 / s)
            for reader in site.readers:
                _scale(reader, 1, s, _row_axis(reader))
        state.notes.append(f"smoothquant: smoothed {len(sites)} activation(s) into "
                           f"{sum(len(s.readers) for s in sites)} matmul weight(s) (alpha {self.alpha:g})")
        return True
