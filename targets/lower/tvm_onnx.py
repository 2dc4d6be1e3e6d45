"""ONNX rewrites that bring a model into the form TVM's ONNX frontend can import.

TVM 0.27's frontend has no converter for `If` or `LSTM`. Both are common in real exports, and
neither needs one once the input shapes are fixed, as they are for a compiled library:
- `flatten_static_ifs`: exporters branch on shapes (`Shape -> Gather -> Equal -> If`). With the
  library's static input shapes those conditions are constants, and the taken branch is inlined.
- `unroll_lstm`: an LSTM over a known sequence length is the same recurrence written out: one
  MatMul of all timesteps with W, then per step a MatMul with R and the gate ops, in float32.
- `bypass_identities`: its Identity converter fails on a shape value ("cannot handle ShapeExpr
  inputs": Paddle exports pass shapes through Identity nodes), and an Identity computes nothing.

Quantize/dequantize nodes are never folded, so the Q/DQ structure that qpass's integer lowering
looks for is unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qpasses.errors import UnsupportedModelError
from qpasses.graph import first_line

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def importable(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """`model` with its inputs fixed to `shapes`, static `If`s inlined, LSTMs unrolled and Identity
    nodes bypassed. Models with none of these ops are returned unchanged."""
    if not {"If", "LSTM", "Identity"} & {op for _, op in op_types(model.graph)}:
        return model
    graph = gs.import_onnx(model)
    for tensor in graph.inputs:
        if tensor.name in shapes:
            tensor.shape = list(shapes[tensor.name])
    bypass_identities(graph)
    graph = flatten_static_ifs(_with_shapes(graph))
    unroll_lstm(graph)
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def bypass_identities(graph: gs.Graph) -> None:
    """Readers of an Identity's output read its input instead (not where the output is a graph output)."""
    outputs = {t.name for t in graph.outputs}
    for node in [n for n in graph.nodes if n.op == "Identity" and n.outputs[0].name not in outputs]:
        source, out = node.inputs[0], node.outputs[0]
        for reader in list(out.outputs):
            reader.inputs = [source if t is out else t for t in reader.inputs]
        node.outputs.clear()


def _with_shapes(graph: gs.Graph) -> gs.Graph:
    """The graph with every tensor's shape inferred anew from the (static) input shapes."""
    model = gs.export_onnx(graph.cleanup().toposort())
    del model.graph.value_info[:]
    return gs.import_onnx(onnx.shape_inference.infer_shapes(model, data_prop=True))


def op_types(graph: onnx.GraphProto) -> set[tuple[str, str]]:
    """(domain, op type) of every node, subgraphs included."""
    found = set()
    for node in graph.node:
        found.add((node.domain, node.op_type))
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found |= op_types(attr.g)
    return found


def flatten_static_ifs(graph: gs.Graph) -> gs.Graph:
    """Inline every `If` whose condition follows from the static shapes; refuse one that does not.

    Folding and shape inference alternate: an inlined branch's shapes are known only after the
    next inference, and a nested `If` may branch on them. The folding also turns computed
    Reshape targets into constants, which gives an LSTM's input its static shape."""
    while True:
        try:
            graph.fold_constants(fold_shapes=True, flatten_subgraphs=False, error_ok=False,
                                 should_exclude_node=lambda node: node.op in _QDQ)
        except Exception as exc:  # graphsurgeon evaluates the constant parts with ONNX Runtime
            raise UnsupportedModelError(f"folding the model's shape computations for TVM failed: {first_line(exc)}") from None
        graph = _with_shapes(graph)
        static = [n for n in graph.nodes if n.op == "If" and isinstance(n.inputs[0], gs.Constant)]
        if not static:
            break
        for node in static:
            _inline(graph, node)
        graph = _with_shapes(graph)
    left = [n.name for n in graph.nodes if n.op == "If"]
    if left:
        raise UnsupportedModelError(f"If node(s) {', '.join(left[:3])} branch on input values, not on shapes: "
                                    "TVM's ONNX frontend cannot import them (ONNX Runtime runs the model)")
    return graph


def _inline(graph: gs.Graph, node: gs.Node) -> None:
    """Replace an `If` by the branch its constant condition takes; Identity nodes keep the output names."""
    branch = node.attrs["then_branch" if bool(node.inputs[0].values) else "else_branch"]
    outputs = list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.extend(branch.nodes)
    for inner, outer in zip(branch.outputs, outputs):
        graph.nodes.append(gs.Node("Identity", f"{node.name}/{outer.name}", inputs=[inner], outputs=[outer]))


def unroll_lstm(graph: gs.Graph) -> None:
    """Replace every LSTM by its recurrence written out over the static sequence length."""
    for node in [n for n in graph.nodes if n.op == "LSTM"]:
        _Unroll(graph, node).run()


class _Unroll:
    """One LSTM node (ONNX semantics, gates in i, o, f, c order) written out step by step."""

    def __init__(self, graph: gs.Graph, node: gs.Node):
        self.graph, self.node, self.count = graph, node, 0
        attrs = node.attrs
        self.hidden = int(attrs["hidden_size"])
        self.directions = 2 if attrs.get("direction", "forward") == "bidirectional" else 1
        self.reverse = attrs.get("direction", "forward") == "reverse"
        self.batch_major = int(attrs.get("layout", 0)) == 1
        unsupported = [k for k in ("clip", "input_forget") if attrs.get(k) not in (None, 0)]
        if attrs.get("activations") not in (None, ["Sigmoid", "Tanh", "Tanh"] * self.directions):
            unsupported.append("activations")
        inputs = list(node.inputs) + [gs.Variable.empty()] * (8 - len(node.inputs))
        self.x, self.w, self.r, self.b, lens, self.h0, self.c0, self.p = inputs
        if not _empty(lens):
            unsupported.append("sequence_lens")
        if not _empty(self.p):
            unsupported.append("peepholes")
        if not isinstance(self.w, gs.Constant) or not isinstance(self.r, gs.Constant) or \
                not (_empty(self.b) or isinstance(self.b, gs.Constant)):
            unsupported.append("computed weights")
        shape = self.x.shape
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
            unsupported.append("a sequence length unknown at compile time")
        if unsupported:
            raise UnsupportedModelError(f"LSTM {node.name}: {', '.join(unsupported)}: qpass unrolls only a plain "
                                        "LSTM over a static sequence for TVM (ONNX Runtime runs the model)")
        self.steps, self.batch = (shape[1], shape[0]) if self.batch_major else (shape[0], shape[1])

    def run(self) -> None:
        node, graph = self.node, self.graph
        x = self._op("Transpose", [self.x], perm=[1, 0, 2]) if self.batch_major else self.x
        per_direction = [self._direction(x, d, reverse=self.reverse or d == 1) for d in range(self.directions)]
        ys, hs, cs = (list(t) for t in zip(*per_direction))
        y = ys[0] if len(ys) == 1 else self._op("Concat", ys, axis=1)  # [steps, dirs, batch, hidden]
        h = hs[0] if len(hs) == 1 else self._op("Concat", hs, axis=0)  # [dirs, batch, hidden]
        c = cs[0] if len(cs) == 1 else self._op("Concat", cs, axis=0)
        if self.batch_major:
            y = self._op("Transpose", [y], perm=[2, 0, 1, 3])
            h, c = (self._op("Transpose", [t], perm=[1, 0, 2]) for t in (h, c))
        outputs = list(node.outputs) + [gs.Variable.empty()] * (3 - len(node.outputs))
        for old, new in zip(outputs, (y, h, c)):
            if not _empty(old):
                self._op("Identity", [new], out=old)
        node.outputs.clear()
        node.inputs.clear()
        graph.cleanup()

    def _direction(self, x: gs.Tensor, d: int, reverse: bool):
        hidden = self.hidden
        w = self._const("W", self.w.values[d].T)  # [input, 4H]
        r = self._const("R", self.r.values[d].T)  # [H, 4H]
        bias = np.zeros(8 * hidden, np.float32) if _empty(self.b) else self.b.values[d]
        b = self._const("B", bias[:4 * hidden] + bias[4 * hidden:])
        projected = self._op("Add", [self._op("MatMul", [x, w]), b])  # [steps, batch, 4H]
        h = self._state(self.h0, d)
        c = self._state(self.c0, d)
        order = range(self.steps - 1, -1, -1) if reverse else range(self.steps)
        ys = {}
        for t in order:
            step = self._op("Gather", [projected, self._const("t", np.array(t, np.int64))], axis=0)
            gates = self._op("Add", [step, self._op("MatMul", [h, r])])
            i, o, f, g = (self._slice(gates, k * hidden, (k + 1) * hidden) for k in range(4))
            i, o, f = (self._op("Sigmoid", [v]) for v in (i, o, f))
            g = self._op("Tanh", [g])
            c = self._op("Add", [self._op("Mul", [f, c]), self._op("Mul", [i, g])])
            h = self._op("Mul", [o, self._op("Tanh", [c])])
            ys[t] = self._reshape(h, [1, 1, self.batch, hidden])
        y = self._op("Concat", [ys[t] for t in range(self.steps)], axis=0)  # [steps, 1, batch, H]
        return y, self._reshape(h, [1, self.batch, hidden]), self._reshape(c, [1, self.batch, hidden])

    # Slice (opset 10) and Reshape (opset 5) take their parameters as inputs at every later opset,
    # unlike Split and Unsqueeze: the rewrite is valid whatever the model's opset.
    def _slice(self, x: gs.Tensor, start: int, end: int) -> gs.Tensor:
        bounds = [self._const(k, np.array([v], np.int64)) for k, v in (("start", start), ("end", end), ("axis", 1))]
        return self._op("Slice", [x, *bounds])

    def _reshape(self, x: gs.Tensor, shape: list[int]) -> gs.Tensor:
        return self._op("Reshape", [x, self._const("shape", np.array(shape, np.int64))])

    def _state(self, given: gs.Tensor, d: int) -> gs.Tensor:
        if _empty(given):
            return self._const("zeros", np.zeros((self.batch, self.hidden), np.float32))
        axis = 1 if self.batch_major else 0  # [batch, dirs, hidden] or [dirs, batch, hidden]
        return self._op("Gather", [given, self._const("d", np.array(d, np.int64))], axis=axis)

    def _name(self, what: str) -> str:
        self.count += 1
        return f"{self.node.name}/unrolled/{what}_{self.count}"

    def _const(self, what: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self._name(what), np.array(values, order="C"))  # 0-d stays 0-d

    def _op(self, op: str, inputs: list, out: gs.Variable | None = None, **attrs) -> gs.Variable:
        out = out if out is not None else gs.Variable(self._name(op), dtype=np.float32)
        self.graph.nodes.append(gs.Node(op, self._name(op), attrs, inputs=list(inputs), outputs=[out]))
        return out


def _empty(tensor: gs.Tensor) -> bool:
    return tensor is None or (isinstance(tensor, gs.Variable) and tensor.name == "")
