"""A piece of an ONNX graph evaluated in torch, so that a reconstruction pass can differentiate it.

Block reconstruction (`passes/brecq.py`) runs a residual, inverted-residual or attention block of
the model in torch: its nodes in graph order, each by the torch function with ONNX's semantics
(opset 13 and later: the normalised models). The ops are those of CNNs and transformers; a block
holding any other op is not reconstructed (`unsupported` says which). Constants come from the
graph; a `hook` sees every value a node reads, which is where fake quantization goes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from qpasses.errors import InputError

if TYPE_CHECKING:
    import torch

Hook = Callable[[gs.Node, int, "torch.Tensor"], "torch.Tensor"]  # (reader, input index, value) -> value read


def require_torch(option: str) -> Any:
    """The torch module, or a one-line error naming the option that needs it (torch is optional)."""
    try:
        import torch
    except ImportError:
        raise InputError(f"{option} needs torch: pip install torch") from None
    return torch


def _axes(node: gs.Node, values: list, index: int = 1) -> list[int] | None:
    """Axes given as an attribute (older opsets) or as an input (newer)."""
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(values) > index and values[index] is not None:
        return [int(a) for a in values[index].tolist()]
    return None


def _reduce_mean(node: gs.Node, v: list) -> "torch.Tensor":
    axes = _axes(node, v)
    keep = bool(node.attrs.get("keepdims", 1))
    return v[0].mean() if axes is None else v[0].mean(dim=axes, keepdim=keep)


def _pads(node: gs.Node, spatial: tuple[int, ...], kernel: list[int]) -> list[int]:
    """ONNX pads (all begins, then all ends), `auto_pad` resolved for the input's spatial size."""
    nd = len(kernel)
    auto = node.attrs.get("auto_pad", "NOTSET")
    if auto == "VALID":
        return [0] * 2 * nd
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        return list(node.attrs.get("pads", [0] * 2 * nd))
    strides = node.attrs.get("strides", [1] * nd)
    dilations = node.attrs.get("dilations", [1] * nd)
    begins, ends = [], []
    for n, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else large)
        ends.append(large if auto == "SAME_UPPER" else small)
    return begins + ends


def _conv(node: gs.Node, v: list) -> "torch.Tensor":
    import torch.nn.functional as F

    w = v[1]
    nd = w.ndim - 2
    x = v[0]
    pads = _pads(node, tuple(x.shape[2:]), list(w.shape[2:]))
    if any(pads):
        x = F.pad(x, [p for i in reversed(range(nd)) for p in (pads[i], pads[nd + i])])
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(x, w, v[2] if len(v) > 2 else None, stride=tuple(node.attrs.get("strides", [1] * nd)),
                dilation=tuple(node.attrs.get("dilations", [1] * nd)), groups=int(node.attrs.get("group", 1)))


def _gemm(node: gs.Node, v: list) -> "torch.Tensor":
    a = v[0].T if node.attrs.get("transA", 0) else v[0]
    b = v[1].T if node.attrs.get("transB", 0) else v[1]
    y = float(node.attrs.get("alpha", 1.0)) * (a @ b)
    return y + float(node.attrs.get("beta", 1.0)) * v[2] if len(v) > 2 and v[2] is not None else y


def _pool(node: gs.Node, v: list, kind: str) -> "torch.Tensor":
    import torch.nn.functional as F

    kernel = list(node.attrs["kernel_shape"])
    nd = len(kernel)
    x = v[0]
    pads = _pads(node, tuple(x.shape[2:]), kernel)
    if any(pads):
        x = F.pad(x, [p for i in reversed(range(nd)) for p in (pads[i], pads[nd + i])],
                  value=float("-inf") if kind == "max" else 0.0)
    strides = tuple(node.attrs.get("strides", [1] * nd))
    ceil = bool(node.attrs.get("ceil_mode", 0))
    if kind == "max":
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        return pool(x, kernel, strides, dilation=tuple(node.attrs.get("dilations", [1] * nd)), ceil_mode=ceil)
    if any(pads) and not node.attrs.get("count_include_pad", 0):
        raise NotImplementedError("AveragePool with padding excluded from the count")
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    return pool(x, kernel, strides, ceil_mode=ceil)


def _clip(v: list) -> "torch.Tensor":
    lo = v[1] if len(v) > 1 and v[1] is not None else None
    hi = v[2] if len(v) > 2 and v[2] is not None else None
    return v[0].clamp(None if lo is None else float(lo), None if hi is None else float(hi))


def _reshape(v: list) -> "torch.Tensor":
    shape = [int(d) for d in v[1].tolist()]
    shape = [v[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return v[0].reshape(shape)


def _split(node: gs.Node, v: list) -> list["torch.Tensor"]:
    axis = int(node.attrs.get("axis", 0))
    sizes = node.attrs.get("split")
    if sizes is None and len(v) > 1 and v[1] is not None:
        sizes = v[1].tolist()
    if sizes is None:
        n = len(node.outputs)
        return list(v[0].chunk(n, dim=axis))
    return list(v[0].split([int(s) for s in sizes], dim=axis))


def _slice(v: list) -> "torch.Tensor":
    x = v[0]
    starts, ends = v[1].tolist(), v[2].tolist()
    axes = v[3].tolist() if len(v) > 3 and v[3] is not None else list(range(len(starts)))
    steps = v[4].tolist() if len(v) > 4 and v[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        n = x.shape[a]
        s, e = max(0, s + n if s < 0 else min(s, n)), max(0, e + n if e < 0 else min(e, n))
        index[a] = slice(s, e, st)  # a positive step (`unsupported` refuses the others)
    return x[tuple(index)]


def _resize(node: gs.Node, v: list) -> "torch.Tensor":
    """Nearest (asymmetric, floor) or linear (half-pixel or align-corners) upsampling by scales or sizes."""
    import torch.nn.functional as F

    x = v[0]
    sizes = v[3] if len(v) > 3 and v[3] is not None and v[3].numel() else None
    if sizes is not None:
        size = [int(s) for s in sizes.tolist()[2:]]
    else:
        size = [int(np.floor(n * float(f))) for n, f in zip(x.shape[2:], v[2].tolist()[2:])]
    if node.attrs.get("mode", "nearest") == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    corners = node.attrs.get("coordinate_transformation_mode", "half_pixel") == "align_corners"
    return F.interpolate(x, size=size, mode="bilinear" if x.ndim == 4 else "linear", align_corners=corners)


def _constant_of_shape(node: gs.Node, v: list) -> "torch.Tensor":
    import torch

    value = node.attrs.get("value")  # a one-element tensor; float 0 by default
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value.values).ravel()
    return torch.full([int(d) for d in v[0].tolist()], fill[0].item(), dtype=torch.from_numpy(fill).dtype)


def _space_to_depth(node: gs.Node, v: list) -> "torch.Tensor":
    x, b = v[0], int(node.attrs["blocksize"])
    n, c, h, w = x.shape
    return x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4).reshape(n, c * b * b, h // b, w // b)


def _torch_ops() -> dict[str, Callable[[gs.Node, list], Any]]:
    import torch
    import torch.nn.functional as F

    def attr(node: gs.Node, name: str, default: Any) -> Any:
        return node.attrs.get(name, default)

    return {
        "Conv": _conv,
        "Gemm": _gemm,
        "MatMul": lambda n, v: v[0] @ v[1],
        "Add": lambda n, v: v[0] + v[1],
        "Sub": lambda n, v: v[0] - v[1],
        "Mul": lambda n, v: v[0] * v[1],
        "Div": lambda n, v: v[0] / v[1],
        "Pow": lambda n, v: v[0].pow(v[1]),
        "Sqrt": lambda n, v: v[0].sqrt(),
        "Erf": lambda n, v: torch.erf(v[0]),
        "Tanh": lambda n, v: torch.tanh(v[0]),
        "Relu": lambda n, v: F.relu(v[0]),
        "LeakyRelu": lambda n, v: F.leaky_relu(v[0], float(attr(n, "alpha", 0.01))),
        "Sigmoid": lambda n, v: torch.sigmoid(v[0]),
        "HardSigmoid": lambda n, v: (float(attr(n, "alpha", 0.2)) * v[0] + float(attr(n, "beta", 0.5))).clamp(0, 1),
        "HardSwish": lambda n, v: v[0] * (v[0] / 6 + 0.5).clamp(0, 1),
        "Clip": lambda n, v: _clip(v),
        "Softmax": lambda n, v: torch.softmax(v[0], dim=int(attr(n, "axis", -1))),
        "ReduceMean": _reduce_mean,
        "LayerNormalization": lambda n, v: F.layer_norm(v[0], v[0].shape[int(attr(n, "axis", -1)):],
                                                        v[1], v[2] if len(v) > 2 else None, float(attr(n, "epsilon", 1e-5))),
        "MaxPool": lambda n, v: _pool(n, v, "max"),
        "AveragePool": lambda n, v: _pool(n, v, "average"),
        "GlobalAveragePool": lambda n, v: v[0].mean(dim=tuple(range(2, v[0].ndim)), keepdim=True),
        "Concat": lambda n, v: torch.cat(v, dim=int(attr(n, "axis", 0))),
        "Reshape": lambda n, v: _reshape(v),
        "Flatten": lambda n, v: v[0].reshape(int(np.prod(v[0].shape[:int(attr(n, "axis", 1))])), -1),
        "Transpose": lambda n, v: v[0].permute(*attr(n, "perm", list(reversed(range(v[0].ndim))))),
        "Squeeze": lambda n, v: v[0].squeeze(tuple(a % v[0].ndim for a in _axes(n, v))) if _axes(n, v) else v[0].squeeze(),
        "Unsqueeze": lambda n, v: _unsqueeze(v[0], _axes(n, v)),
        "Identity": lambda n, v: v[0],
        "Split": _split,
        "Slice": lambda n, v: _slice(v),
        "Shape": lambda n, v: torch.tensor(v[0].shape, dtype=torch.int64),
        "Gather": _gather,
        "BatchNormalization": lambda n, v: F.batch_norm(v[0], v[3], v[4], v[1], v[2], False, 0.0, float(attr(n, "epsilon", 1e-5))),
        "Cast": lambda n, v: v[0],
        "Resize": _resize,
        "SpaceToDepth": _space_to_depth,
        "ConstantOfShape": _constant_of_shape,
    }


def _gather(node: gs.Node, v: list) -> "torch.Tensor":
    import torch

    x, index = v[0], v[1]
    axis = int(node.attrs.get("axis", 0)) % x.ndim
    index = torch.where(index < 0, index + x.shape[axis], index)
    picked = torch.index_select(x, axis, index.reshape(-1))
    return picked.reshape((*x.shape[:axis], *index.shape, *x.shape[axis + 1:]))


def _unsqueeze(x: "torch.Tensor", axes: list[int]) -> "torch.Tensor":
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


_OPS: dict[str, Callable] | None = None


def ops() -> dict[str, Callable[[gs.Node, list], Any]]:
    global _OPS
    if _OPS is None:
        _OPS = _torch_ops()
    return _OPS


SUPPORTED = ("Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Relu", "LeakyRelu",
             "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Softmax", "ReduceMean", "LayerNormalization", "MaxPool",
             "AveragePool", "GlobalAveragePool", "Concat", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
             "Identity", "Split", "Slice", "Shape", "Gather", "Cast", "BatchNormalization", "Resize", "SpaceToDepth",
             "ConstantOfShape")


def unsupported(nodes: list[gs.Node]) -> str | None:
    """Why these nodes cannot run in torch here (the first op without a rule), or None."""
    for node in nodes:
        if node.op not in SUPPORTED or node.domain not in (None, "", "ai.onnx"):
            return f"{node.op} has no torch rule"
        if node.op == "Cast" and node.attrs.get("to") not in (1, 7):  # float, int64: torch keeps the input type
            return "Cast to a type other than float or int64"
        if node.op == "Slice" and len(node.inputs) > 4 and not (isinstance(node.inputs[4], gs.Constant)
                                                              and np.all(node.inputs[4].values > 0)):
            return "Slice with a step that is not a positive constant"
        if node.op == "Resize" and not _resize_rule(node):
            return "Resize other than nearest (asymmetric, floor) or linear (half_pixel, align_corners)"
        if node.op == "DepthToSpace" or (node.op in ("Conv", "MaxPool", "AveragePool") and
                                         node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")):
            return f"{node.op} with these attributes"
    return None


def _resize_rule(node: gs.Node) -> bool:
    mode = node.attrs.get("mode", "nearest")
    transform = node.attrs.get("coordinate_transformation_mode", "half_pixel")
    if mode == "nearest":
        return transform == "asymmetric" and node.attrs.get("nearest_mode", "round_prefer_floor") == "floor"
    return mode == "linear" and transform in ("half_pixel", "align_corners", "pytorch_half_pixel")


def constant(tensor: gs.Constant, cache: dict[str, "torch.Tensor"]) -> "torch.Tensor":
    import torch

    if tensor.name not in cache:
        cache[tensor.name] = torch.as_tensor(np.array(tensor.values))
    return cache[tensor.name]


def run(nodes: list[gs.Node], values: dict[str, "torch.Tensor"], hook: Hook | None = None,
        constants: dict[str, "torch.Tensor"] | None = None, overrides: dict[str, "torch.Tensor"] | None = None) -> None:
    """Evaluate `nodes` (in graph order) into `values`, which holds their inputs from outside. A node
    reads constant inputs from the graph unless `overrides` has a tensor for that name (a weight being
    learned); `hook` gets every value a node reads and returns what it reads instead."""
    table = ops()
    constants = {} if constants is None else constants
    overrides = overrides or {}
    for node in nodes:
        args = []
        for idx, tensor in enumerate(node.inputs):
            if tensor.name == "":
                value = None
            elif tensor.name in overrides:
                value = overrides[tensor.name]
            elif isinstance(tensor, gs.Constant):
                value = constant(tensor, constants)
            else:
                value = values[tensor.name]
            if hook is not None and value is not None:
                value = hook(node, idx, value)
            args.append(value)
        out = table[node.op](node, args)
        for tensor, value in zip(node.outputs, out if isinstance(out, list) else [out]):
            values[tensor.name] = value
