"""The files a command reads and writes, all checked before any work (`graph.write_all` then writes
the outputs together at the end).

A pipeline must never lose a file: no output may be an input (not even with --force, and not
through a symlink, a hard link or `./`), two outputs may not be one file, and an output that
exists is replaced only with --force. Companion files count too: the `.json` sidecar of a TVM
library and the external-data file of an ONNX model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from qpasses.calibration.data import is_random
from qpasses.targets.lower import sidecar

from .errors import InputError
from .graph import stored_tensors


def written_with(path: Path) -> list[Path]:
    """What writing `path` also writes: a TVM library's sidecar."""
    return [sidecar(path)] if path.suffix == ".so" else []


def companions(path: Path) -> list[Path]:
    """The files that belong to an input: a TVM library's sidecar, an ONNX model's external data."""
    if path.suffix == ".so":
        return written_with(path)
    if path.suffix != ".onnx" or not path.is_file():
        return []
    try:  # the graph without the weights: cheap, and only the locations are needed
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not loadable: the command that reads it says why
        return []
    found = {path.parent / e.value for t in stored_tensors(model.graph) for e in t.external_data if e.key == "location"}
    return sorted(found)


@dataclass
class Files:
    """The paths of one command, by role ("the input model", "--report"), checked when built."""

    inputs: dict[str, Path | str | None]
    outputs: dict[str, Path | None]
    force: bool = False
    read: dict[Path, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        for what, path in self.inputs.items():
            if path is None or is_random(path):
                continue
            path = Path(path)
            for part in [path, *companions(path)]:
                if part.exists():
                    self.read[part.resolve()] = what if part == path else f"{part.name}, which belongs to {what}"
        written: dict[Path, str] = {}
        for what, output in self.outputs.items():
            if output is None:
                continue
            for part in [output, *written_with(output)]:
                named = what if part == output else f"{what}'s companion {part.name}"
                self._check(named, part, written)
                written[part.resolve()] = named

    def _check(self, what: str, output: Path, written: dict[Path, str]) -> None:
        where = output.resolve()
        same = self._same_input(output, where)
        if same is not None:
            raise InputError(f"{what} {output} is {same}; qpass never overwrites its inputs")
        if where in written:
            raise InputError(f"{written[where]} and {what} both name {output}; give each output its own path")
        if output.is_dir():
            raise InputError(f"{what} {output} is a directory; give a file path")
        if output.exists() and not self.force:
            raise InputError(f"{output} exists; pass --force to replace it")
        parent = next(p for p in [where.parent, *where.parent.parents] if p.exists())
        if not parent.is_dir():
            raise InputError(f"cannot write {what} {output}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"cannot write {what} {output}: {parent} is not writable")

    def _same_input(self, output: Path, where: Path) -> str | None:
        if where in self.read:
            return self.read[where]
        if output.exists():  # a hard link, or another spelling on a case-insensitive file system
            for path, what in self.read.items():
                if os.path.samefile(path, output):
                    return what
        return None
