"""Loading, normalising and saving ONNX models.

Everything a later pass may rely on is established here, once: a checked model at opset >= 13
(per-channel Q/DQ needs it), weights as initializers even when the exporter stored them as
`Constant` nodes, static shapes except an optional dynamic batch dimension, and shape information
for every tensor. Saving is atomic and byte-deterministic.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import InputError, UnsupportedModelError

MIN_OPSET = 13
QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearConcat",
}
_EXTERNAL_DATA_LIMIT = 1_800_000_000


def parse_input_shapes(specs: tuple[str, ...] | list[str]) -> dict[str, list[int]]:
    """Parse `NAME=1x3x224x224` strings (the `--input-shape` option)."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = [int(d) for d in dims.lower().split("x")]
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise InputError(f"--input-shape {spec!r}: expected NAME=DIMxDIMx... with positive dims") from None
        shapes[name] = shape
    return shapes


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX file; external data next to it is loaded too."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf raises several unrelated types
        raise InputError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    if not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (the graph has no nodes)")
    try:
        if model.ByteSize() < _EXTERNAL_DATA_LIMIT:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except Exception as exc:
        raise InputError(f"{path}: invalid ONNX model: {first_line(exc)}") from None
    return model


def normalize(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """Bring a float model into the form every pass expects (see the module docstring)."""
    refuse_quantized(model)
    model = _upgrade_opset(model)
    graph = gs.import_onnx(model)
    _constants_to_initializers(graph)
    resized = _resolve_input_shapes(graph, input_shapes or {})
    ranks = {t.name: len(t.shape) for t in graph.outputs if t.shape is not None}  # as the exporter declared them
    graph.cleanup().toposort()
    _name_nodes(graph)
    if resized:
        _forget_shapes(graph)  # the exporter's value_info describes other input sizes: infer anew
    try:
        model = infer_shapes(gs.export_onnx(graph))
    except InputError:
        _forget_shapes(graph)  # stale value_info contradicting the model itself: one retry without it
        model = infer_shapes(gs.export_onnx(graph))
    _outputs_from_value_info(model, ranks)
    return model


def _outputs_from_value_info(model: onnx.ModelProto, ranks: dict[str, int]) -> None:
    """Shape inference leaves graph outputs as they were; give a shapeless one the inferred shape."""
    inferred = {v.name: v for v in model.graph.value_info}
    for out in model.graph.output:
        if not out.type.tensor_type.HasField("shape") and out.name in inferred:
            out.type.CopyFrom(inferred[out.name].type)
    for out in model.graph.output:
        if not out.type.tensor_type.HasField("shape") and out.name in ranks:
            # not inferable (e.g. a Reshape to a computed shape): the declared rank, sizes unknown
            shape = out.type.tensor_type.shape
            for _ in range(ranks[out.name]):
                shape.dim.add()


def _forget_shapes(graph: gs.Graph) -> None:
    """Drop the shapes of every computed tensor (value_info and graph outputs); dtypes stay."""
    inputs = {t.name for t in graph.inputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in inputs:
            tensor.shape = None


def resolve_inputs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """Any model, float or quantized, with its dynamic input sizes resolved: for running it, not for passes."""
    graph = gs.import_onnx(model)
    _resolve_input_shapes(graph, input_shapes or {})
    return gs.export_onnx(graph)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise InputError(f"shape inference failed: {first_line(exc)}") from None


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise InputError("model imports no default-domain opset")


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write `model` atomically (temp file + rename) with deterministic bytes."""
    write_all(model_files(model, Path(path)))


def model_files(model: onnx.ModelProto, path: Path) -> dict[Path, bytes]:
    """The bytes of `model` saved at `path`: one file, or beyond protobuf's 2 GB limit the graph plus
    its weights in `<name>.data` beside it (ONNX external data), for `write_all`."""
    if model.ByteSize() < _EXTERNAL_DATA_LIMIT:
        return {path: model.SerializeToString(deterministic=True)}
    model = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's model keeps its weights
    data_name = path.name + ".data"
    onnx.external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True,
                                                             location=data_name, size_threshold=1024)
    blob = bytearray()
    for tensor in stored_tensors(model.graph):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        blob.extend(b"\0" * (-len(blob) % 4096))  # page-aligned, as onnx.save writes it, for mmap
        offset, data = len(blob), tensor.raw_data
        blob.extend(data)
        onnx.external_data_helper.set_external_data(tensor, data_name, offset, len(data))
        tensor.ClearField("raw_data")
    return {path: model.SerializeToString(deterministic=True), path.parent / data_name: bytes(blob)}


def stored_tensors(graph: onnx.GraphProto):
    """Every tensor a graph stores: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from stored_tensors(sub)


def umask_mode(base: int = 0o666) -> int:
    """The permissions `open()` (base 0o666) or a linker (0o777) would give a new file; temp
    files are 0600 until published."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def write_all(files: dict[Path, bytes]) -> None:
    """Write every file to a temp file beside it first, then rename them all into place: an error
    while writing (a full disk, a read-only directory) leaves every earlier file as it was."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                staged.append((tmp, path))
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(tmp, umask_mode())
            except OSError as exc:
                raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def writing(path: Path):
    """Create the parent directory; an OS error becomes a one-line input error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


def refuse_quantized(model: onnx.ModelProto) -> None:
    """qpass takes float models: one already quantized (Q/DQ or integer ops) is refused."""
    found = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if found:
        raise UnsupportedModelError(
            f"the model is already quantized (it contains {', '.join(found)}); give qpass the float model")


def _upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    if opset_of(model) >= MIN_OPSET:
        return model
    try:
        return onnx.version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:
        raise InputError(f"cannot upgrade opset {opset_of(model)} to {MIN_OPSET}: {first_line(exc)}") from None


def _constants_to_initializers(graph: gs.Graph) -> None:
    """Exporters often store weights as `Constant` nodes or behind `Identity`; passes want initializers."""
    for node in graph.nodes:
        if node.op == "Identity" and isinstance(node.inputs[0], gs.Constant) and node.outputs[0] not in graph.outputs:
            out = node.outputs[0]  # exporters alias shared weights through Identity nodes
            node.outputs.clear()
            out.to_constant(node.inputs[0].values)
            continue
        if node.op != "Constant" or not node.outputs:
            continue
        value = _constant_value(node)
        if value is None:
            continue
        out = node.outputs[0]
        if out in graph.outputs:
            continue
        node.outputs.clear()
        out.to_constant(value)


def _name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique, stable name: the plan and the report refer to nodes by name."""
    seen = {node.name for node in graph.nodes if node.name}
    taken: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in taken:
            name = f"{node.op}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)
        taken.add(node.name)


def _constant_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    scalar_kinds = {"value_float": np.float32, "value_int": np.int64}
    list_kinds = {"value_floats": np.float32, "value_ints": np.int64}
    for key, dtype in scalar_kinds.items():
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key, dtype in list_kinds.items():
        if key in attrs:
            return np.array(list(attrs[key]), dtype=dtype)
    return None


def _resolve_input_shapes(graph: gs.Graph, given: dict[str, list[int]]) -> bool:
    """Apply the given sizes (a dynamic batch may stay a name); True when a shape changed."""
    changed = False
    names = {t.name for t in graph.inputs}
    unknown = sorted(set(given) - names)
    if unknown:
        raise InputError(f"--input-shape names {', '.join(unknown)}, but the model inputs are {', '.join(sorted(names))}")
    for tensor in graph.inputs:
        shape = list(tensor.shape or [])
        if tensor.name in given:
            new = given[tensor.name]
            if len(new) != len(shape):
                raise InputError(f"--input-shape {tensor.name}: {len(new)} dims given, the model input has {len(shape)}")
            for dim, value in zip(shape, new):
                if isinstance(dim, int) and dim > 0 and dim != value:
                    raise InputError(f"--input-shape {tensor.name}={_fmt(new)} contradicts the model's static shape "
                                     f"{_fmt(shape)} (to run it at other sizes, make those dims dynamic first: "
                                     "onnx.tools.update_model_dims)")
            changed |= list(new) != shape
            tensor.shape = list(new)
            continue
        dynamic = [i for i, d in enumerate(shape) if not (isinstance(d, int) and d > 0)]
        if [i for i in dynamic if i != 0]:
            raise InputError(
                f"input {tensor.name} has dynamic dimensions {_fmt(shape)}; give its sizes with "
                f"--input-shape {tensor.name}=" + "x".join(str(d) if isinstance(d, int) and d > 0 else "N" for d in shape)
                + " (or calibration data whose arrays all have one shape)")
    return changed


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def node_reads(node: gs.Node) -> list[gs.Variable]:
    """The variables `node` reads: its inputs and what its subgraphs (If, Loop, Scan) take from the
    enclosing scope, which onnx-graphsurgeon shares as the outer graph's own tensor objects."""
    found = [t for t in node.inputs if isinstance(t, gs.Variable)]
    for value in node.attrs.values():
        for sub in value if isinstance(value, list) else [value]:
            if isinstance(sub, gs.Graph):
                inner = {id(t) for t in sub.inputs} | {id(o) for n in sub.nodes for o in n.outputs}
                found += [t for n in sub.nodes for t in node_reads(n) if id(t) not in inner]
    return found


def levels(graph: gs.Graph, layers: set[str]) -> dict[str, int]:
    """node -> how many of `layers` lie on the longest path from the inputs to it, itself included
    (a path may pass through what an If's branches read)."""
    level: dict[str, int] = {}
    for node in graph.nodes:  # topologically sorted
        up = max((level.get(t.inputs[0].name, 0) for t in node_reads(node) if t.inputs), default=0)
        level[node.name] = up + (node.name in layers)
    return level
