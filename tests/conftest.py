"""Shared fixtures: the exported test zoo, calibration data, and cached quantization runs."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import INPUT_SHAPE, ZOO, build, export  # noqa: E402

from qpasses.pass_infra import PassContext  # noqa: E402
from qpasses.pipeline import QuantizeResult, quantize  # noqa: E402
from qpasses.targets import builtin_names, load_target  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "digits"
TARGETS = builtin_names()
ZOO_NAMES = sorted(ZOO)


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    for name in ZOO:
        export(build(name), root / f"{name}.onnx")
    rng = np.random.default_rng(0)
    np.save(root / "calib.npy", rng.standard_normal((40, *INPUT_SHAPE)).astype(np.float32))
    return root


@pytest.fixture(scope="session")
def quantized(zoo_dir):
    """quantized(model_name, target_name) -> QuantizeResult, computed once per session."""

    @functools.cache
    def run(model: str, target: str) -> QuantizeResult:
        return quantize(zoo_dir / f"{model}.onnx", load_target(target), zoo_dir / "calib.npy",
                        PassContext(quiet=True, batch_size=8, debug=True))

    return run
