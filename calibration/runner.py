"""Run a float model in ONNX Runtime and stream the tensors that need ranges to observers.

The tensors are exposed as extra graph outputs of a copy of the model; each batch's values are
handed to the observers and dropped, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from qpasses.errors import CalibrationError, EngineError, InputError

from .data import DataSource, InputSpec
from .observers import Observer


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {i.name for i in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, shape, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))))
    return specs


def session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    """A CPU session; `optimize=False` runs a Q/DQ graph op by op, the numeric reference."""
    try:
        return _load(model, optimize)
    except Exception as exc:
        raise EngineError(f"ONNX Runtime cannot load the model: {ort_message(exc)}") from None


def check_loads(model: onnx.ModelProto, what: str) -> None:
    """Before any work: an input model that ONNX Runtime cannot load (an op it does not have, an
    opset it does not know) is an input error, not an engine failure."""
    try:
        _load(model, optimize=False)
    except Exception as exc:
        raise InputError(f"{what}: ONNX Runtime cannot load it: {ort_message(exc)}") from None


def _load(model: onnx.ModelProto, optimize: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # ENABLE_ALL keeps requested intermediate outputs exact up to float re-association and is ~25%
    # faster than BASIC on a calibration run (NCHWc kernels); tools/bench_calibration.py measures it.
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def optimized(model: onnx.ModelProto, level: str = "extended", directory: Path | None = None,
              disabled: tuple[str, ...] = ()) -> onnx.ModelProto:
    """The graph ONNX Runtime runs for `model`: its own optimiser's output at `level` (Q/DQ fusion
    happens at "extended"), saved by ORT to a temp file in `directory` and read back. `disabled`
    names ORT graph transformers to leave out."""
    with tempfile.TemporaryDirectory(dir=directory, prefix=".qpass-ort-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = LEVELS[level]
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=list(disabled))
        except Exception as exc:
            raise EngineError(f"ONNX Runtime cannot load the model: {ort_message(exc)}") from None
        return onnx.load(options.optimized_model_filepath)


def ort_message(exc: Exception) -> str:
    """ONNX Runtime's error without its status prefix and C++ source location: the part a user reads."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .*? failed:", "", text)
    text = re.sub(r"^Fatal error: ", "", text)
    text = re.sub(r"^\S+\.(h|cc|cpp):\d+ .*?\) ", "", text)  # file:line and the C++ signature
    return text.strip()


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the named intermediate tensors."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    types = {v.name: v.type for v in list(model.graph.value_info) + list(model.graph.input)}
    for name in names:
        if name in existing:
            continue
        value = onnx.ValueInfoProto(name=name)
        if name in types:
            value.type.CopyFrom(types[name])
        else:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        model.graph.output.append(value)
    return model


def reads(node: onnx.NodeProto) -> set[str]:
    """The tensors a node reads: its inputs and what its subgraphs take from the enclosing scope."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            inner = {i.name for i in sub.initializer} | {i.name for i in sub.input}
            for n in sub.node:
                names |= reads(n) - inner
                inner |= set(n.output)
    return names


def only_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that outputs just the named tensors and keeps only the nodes they need
    (ONNX Runtime runs every node of a graph, whatever outputs are asked for)."""
    names = list(names)
    model = with_outputs(model, names)
    graph = model.graph
    wanted = set(names)
    kept = [o for o in graph.output if o.name in wanted]
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    keep: set[int] = set()
    pending = [producer[name] for name in wanted if name in producer]
    while pending:
        i = pending.pop()
        if i not in keep:
            keep.add(i)
            pending += [producer[name] for name in reads(graph.node[i]) if name in producer]
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for i, n in enumerate(graph.node) if i in keep]
    del graph.output[:]
    graph.output.extend(kept)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The model's static batch size, or None when the batch dimension is dynamic."""
    dims = [s.shape[0] for s in input_specs(model) if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0]
    return dims[0] if dims else None


def feed_batch(model: onnx.ModelProto, source: DataSource, batch_size: int) -> tuple[int, bool]:
    """The samples per run, and whether the model fixes that number (then only whole batches run)."""
    if source.one_per_feed:
        return 1, False
    fixed = fixed_batch(model)
    return fixed or batch_size, fixed is not None


def _batching(model: onnx.ModelProto, source: DataSource, batch_size: int, max_samples: int | None) -> tuple[int, int]:
    """(samples per run, samples to run): a fixed batch dimension takes only whole batches."""
    batch, fixed = feed_batch(model, source, batch_size)
    limit = len(source) if max_samples is None else min(max_samples, len(source))
    if fixed and limit % batch:
        limit -= limit % batch
    if limit == 0:
        raise CalibrationError(f"no calibration samples to run (have {len(source)}, the model's batch is {batch})")
    return batch, limit


def _check_finite(name: str, value: np.ndarray, batch: int) -> None:
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
        raise CalibrationError(f"tensor {name} has NaN or Inf values on calibration batch {batch}")


def observe(model: onnx.ModelProto, observers: dict[str, Observer], source: DataSource, batch_size: int,
            max_samples: int | None = None, quiet: bool = False, desc: str = "calibrating", optimize: bool = True) -> int:
    """Feed every batch of `source` through `model`, updating `observers[tensor]`; returns samples seen.

    `optimize=False` for a Q/DQ model, so that it is simulated op by op rather than run on ORT's
    own int8 kernels."""
    names = sorted(observers)
    sess = session(only_outputs(model, names), optimize)
    batch, limit = _batching(model, source, batch_size, max_samples)
    seen = 0
    # disable=None: no bar when stderr is not a terminal, so CI logs stay readable
    with tqdm(total=limit, desc=desc, unit="sample", disable=True if quiet else None, leave=False) as bar:
        for feeds in source.batches(batch, limit):
            try:
                values = sess.run(names, feeds)
            except Exception as exc:
                raise EngineError(f"ONNX Runtime failed on calibration batch {seen // batch}: "
                                  f"{str(exc).splitlines()[0]}") from None
            for name, value in zip(names, values):
                _check_finite(name, value, seen // batch)
                observers[name].update(value)
            n = 1 if source.one_per_feed else len(next(iter(feeds.values())))
            seen += n
            bar.update(n)
    return seen


def run_outputs(model: onnx.ModelProto, source: DataSource, batch_size: int, optimize: bool = True) -> list[np.ndarray]:
    """All model outputs over `source`, each concatenated along its batch axis (`sample_axes`)."""
    sess = session(model, optimize)
    batch, fixed = feed_batch(model, source, batch_size)
    outs: list[list[np.ndarray]] = []
    first = 0
    for feeds in source.batches(batch):
        if fixed and len(next(iter(feeds.values()))) != batch:
            break
        first = first or len(next(iter(feeds.values())))
        outs.append(sess.run(None, feeds))
    return join_batches(model, first, outs)


def join_batches(model: onnx.ModelProto, samples: int, outs: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per-run outputs (each in graph output order; `samples` in the first run) joined into one
    array per output along its batch axis."""
    if not outs:
        return []
    axes = sample_axes(model, samples, outs[0])
    return [np.concatenate(parts, axis=axis) for parts, axis in zip(zip(*outs), axes)]


def sample_axes(model: onnx.ModelProto, samples: int, outputs: list[np.ndarray]) -> list[int]:
    """The axis of each output that counts the samples of one run. Time-major sequence outputs
    ([T, N, C], as CTC and RNN exports give) do not have it first: the axis named like the first
    input's batch dimension, else the first axis whose size is the run's sample count, else 0."""
    specs = input_specs(model)
    batch_name = specs[0].shape[0] if specs and specs[0].shape and isinstance(specs[0].shape[0], str) else None
    axes = []
    for value, out in zip(model.graph.output, outputs):
        names = [d.dim_param if d.dim_param else None for d in value.type.tensor_type.shape.dim]
        if batch_name is not None and batch_name != "?" and batch_name in names and len(names) == out.ndim:
            axes.append(names.index(batch_name))
        else:
            axes.append(next((i for i, size in enumerate(out.shape) if size == samples), 0))
    return axes


class Ignore:
    """An observer of a tensor a step only needs to reach."""

    def update(self, x: np.ndarray) -> None:
        pass


class StepRunner:
    """Runs one model a piece at a time over the same calibration batches.

    Passes that treat a network layer by layer (AdaRound, BN re-calibration) need each level's layer
    inputs in turn, with the layers before it already changed. Running the model's prefix again per
    level costs one model run per level in all, O(levels^2) node runs. Each `advance` here runs only
    the nodes its targets need that no earlier step ran, reading what the earlier steps left: every
    tensor that a node not yet run still reads, per batch. So the whole model runs about once.

    Every step may pass a new copy of the model (new weights of the layers not yet run), but its
    nodes and tensor names must be those of the first: a node that ran is not run again, so a
    change to it would be missed. `peek` computes tensors without keeping anything: for values
    taken just before a node changes (a layer's output, measured to correct that layer)."""

    def __init__(self, model: onnx.ModelProto, source: DataSource, batch_size: int, max_samples: int | None,
                 quiet: bool = False, desc: str = "running", optimize: bool = True):
        batch, limit = _batching(model, source, batch_size, max_samples)
        self.optimize, self.quiet, self.desc = optimize, quiet, desc
        self.structure = _structure(model)
        self.graph_inputs = {i.name: i for i in model.graph.input}
        self.ran: set[int] = set()  # node indices
        self.left: list[dict[str, np.ndarray]] = list(source.batches(batch, limit))  # per batch, the tensors kept
        self.counts = [1 if source.one_per_feed else len(next(iter(f.values()))) for f in self.left]  # samples per batch

    def advance(self, model: onnx.ModelProto, observers: dict[str, Observer]) -> None:
        """Compute the observed tensors, keeping what later steps will read."""
        self._run(model, observers, keep=True)

    def peek(self, model: onnx.ModelProto, observers: dict[str, Observer]) -> None:
        """Compute the observed tensors from what the steps so far left, keeping nothing."""
        self._run(model, observers, keep=False)

    def _run(self, model: onnx.ModelProto, observers: dict[str, Observer], keep: bool) -> None:
        if _structure(model) != self.structure:
            raise ValueError("StepRunner: every step must pass the same graph (only constants may change)")
        graph = model.graph
        known = set(self.left[0])
        nodes = _needed(graph, set(observers), known, self.ran)
        produced = {o for i in nodes for o in graph.node[i].output if o}
        outputs = sorted((set(observers) - known))
        if keep:  # what this step computes that a node left for later reads
            later = set().union(*(reads(n) for i, n in enumerate(graph.node) if i not in self.ran and i not in nodes))
            outputs = sorted(set(outputs) | (produced & later))
        sess = self._session(model, nodes, known, outputs) if nodes else None
        with tqdm(total=sum(self.counts), desc=self.desc, unit="sample", disable=True if self.quiet else None, leave=False) as bar:
            for b, values in enumerate(self.left):
                if sess is not None:
                    feeds = {i.name: values[i.name] for i in sess.get_inputs()}
                    try:
                        results = dict(zip(outputs, sess.run(outputs, feeds)))
                    except Exception as exc:
                        raise EngineError(f"ONNX Runtime failed on calibration batch {b}: {str(exc).splitlines()[0]}") from None
                    if keep:
                        values.update(results)
                    else:
                        results.update(values)
                        values = results
                for name in sorted(observers):
                    _check_finite(name, values[name], b)
                    observers[name].update(values[name])
                bar.update(self.counts[b])
        if keep:  # what no node left to run reads is dropped
            self.ran |= nodes
            for values in self.left:
                for name in [n for n in values if n not in later]:
                    del values[name]

    def _session(self, model: onnx.ModelProto, nodes: set[int], known: set[str], outputs: list[str]) -> ort.InferenceSession:
        graph = model.graph
        kept = [graph.node[i] for i in sorted(nodes)]  # the graph's own order is topological
        read = set().union(*(reads(n) for n in kept))
        types = {v.name: v for v in [*graph.value_info, *graph.output]}
        sample = self.left[0]
        inputs = [self.graph_inputs[n] if n in self.graph_inputs else
                  onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(sample[n].dtype), None)
                  for n in sorted(read & known)]
        results = [types.get(n) or onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs]
        piece = onnx.helper.make_model(
            onnx.helper.make_graph(kept, "step", inputs, results, [t for t in graph.initializer if t.name in read]),
            opset_imports=model.opset_import, ir_version=model.ir_version, functions=model.functions)
        return session(piece, self.optimize)


def _structure(model: onnx.ModelProto) -> list[tuple[str, ...]]:
    return [(n.op_type, *n.output) for n in model.graph.node]


def _needed(graph: onnx.GraphProto, targets: set[str], known: set[str], ran: set[int]) -> set[int]:
    """The nodes not yet `ran` that compute `targets` from the `known` tensors and the initializers."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    constants = {t.name for t in graph.initializer}
    needed: set[int] = set()
    pending = list(targets)
    while pending:
        name = pending.pop()
        if name in known or name in constants:
            continue
        i = producer.get(name)
        if i is None or i in ran:
            raise ValueError(f"StepRunner: {name} is neither computed by a node left to run nor kept")
        if i not in needed:
            needed.add(i)
            pending += reads(graph.node[i])
    return needed
