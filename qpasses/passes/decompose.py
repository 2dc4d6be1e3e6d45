"""Decompose: rewrite ops the engine has no integer kernel for into ops it has, before planning.

ONNX Runtime's CPU provider fuses Add, Mul and Clip groups into integer kernels but has none for
Div, HardSigmoid or HardSwish; with those written out, a hard-swish between two convs runs on
int8 values instead of being dequantized and requantized around float ops. Each rewrite is exact
up to float rounding:

    Div(x, c), c a constant without zeros  =>  Mul(x, 1 / c)
    HardSigmoid(x; alpha > 0, beta)        =>  Mul(Clip(Add(x, beta / alpha), 0, 1 / alpha), alpha)
    HardSwish(x)                           =>  Mul(Mul(x, Clip(Add(x, 3), 0, 6)), 1 / 6)

The target lists the ops to rewrite (`[fusion] decompose`). Run before `annotate`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from qpasses.pass_infra import Pass, PassContext, QuantState


def _constant(name: str, value: float | np.ndarray, like: gs.Tensor) -> gs.Constant:
    dtype = np.dtype(like.dtype) if like.dtype is not None else np.dtype(np.float32)
    return gs.Constant(name, np.asarray(value, dtype=dtype))


def _is_float_variable(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Variable) and tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.floating)


def _div(node: gs.Node) -> list[gs.Node] | None:
    x, c = node.inputs
    if not (_is_float_variable(x) and isinstance(c, gs.Constant) and np.issubdtype(c.values.dtype, np.floating)
            and np.all(c.values != 0)):
        return None
    return [gs.Node("Mul", node.name, inputs=[x, _constant(f"{node.name}.reciprocal", 1 / c.values.astype(np.float64), c)],
                    outputs=list(node.outputs))]


def _clip_chain(name: str, x: gs.Tensor, shift: float, top: float) -> tuple[list[gs.Node], gs.Variable]:
    """Clip(x + shift, 0, top), named after the node it replaces."""
    added = gs.Variable(f"{name}.shifted", dtype=x.dtype, shape=x.shape)
    clipped = gs.Variable(f"{name}.clipped", dtype=x.dtype, shape=x.shape)
    nodes = [gs.Node("Add", f"{name}.add", inputs=[x, _constant(f"{name}.shift", shift, x)], outputs=[added]),
             gs.Node("Clip", f"{name}.clip", inputs=[added, _constant(f"{name}.low", 0.0, x), _constant(f"{name}.high", top, x)],
                     outputs=[clipped])]
    return nodes, clipped


def _hard_sigmoid(node: gs.Node) -> list[gs.Node] | None:
    x = node.inputs[0]
    alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
    if not (_is_float_variable(x) and alpha > 0):
        return None
    nodes, clipped = _clip_chain(node.name, x, beta / alpha, 1 / alpha)
    return nodes + [gs.Node("Mul", node.name, inputs=[clipped, _constant(f"{node.name}.alpha", alpha, x)],
                            outputs=list(node.outputs))]


def _hard_swish(node: gs.Node) -> list[gs.Node] | None:
    x = node.inputs[0]
    if not _is_float_variable(x):
        return None
    nodes, clipped = _clip_chain(node.name, x, 3.0, 6.0)
    product = gs.Variable(f"{node.name}.product", dtype=x.dtype, shape=x.shape)
    return nodes + [gs.Node("Mul", f"{node.name}.times", inputs=[x, clipped], outputs=[product]),
                    gs.Node("Mul", node.name, inputs=[product, _constant(f"{node.name}.sixth", 1 / 6, x)],
                            outputs=list(node.outputs))]


# op -> its rewrite (None: this instance cannot be rewritten, e.g. a Div by a run-time tensor)
DECOMPOSITIONS: dict[str, Callable[[gs.Node], list[gs.Node] | None]] = {
    "Div": _div, "HardSigmoid": _hard_sigmoid, "HardSwish": _hard_swish}


class Decompose(Pass):
    name = "decompose"
    summary = "rewrite Div by a constant, HardSigmoid and HardSwish into ops with integer kernels"

    def run(self, state: QuantState, ctx: PassContext) -> bool:
        wanted = set(state.target.fusion.decompose) if state.target.fusion else set()
        graph, rewritten = state.graph, 0
        for node in [n for n in graph.nodes if n.op in wanted]:
            replacement = DECOMPOSITIONS[node.op](node)
            if replacement is None:
                continue
            node.outputs.clear()  # the last new node takes over the outputs; cleanup drops the old one
            graph.nodes.extend(replacement)
            rewritten += 1
        if rewritten:
            graph.cleanup().toposort()
            state.notes.append(f"decompose: {rewritten} node(s) rewritten into ops with integer kernels")
        return bool(rewritten)
