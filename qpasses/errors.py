"""User-facing errors: each becomes one line on stderr and a documented exit code.

Exit codes: 0 success, 1 a gate failed, 2 usage or input error, 3 engine or runtime failure.
"""

from __future__ import annotations


class QpassError(Exception):
    """An error the user can act on; the CLI prints its message without a traceback."""

    exit_code = 2


class GateError(QpassError):
    """A goal the user set (accuracy, SQNR) was not met; the outputs are still written."""

    exit_code = 1


class InputError(QpassError):
    """The model, target file, options or data given by the user are unusable."""


class UnsupportedModelError(InputError):
    """The model is valid ONNX but qpass cannot quantize it (e.g. already quantized)."""


class CalibrationError(InputError):
    """Calibration data is empty, mismatched, or produced non-finite activations."""


class EngineError(QpassError):
    """A runtime (ONNX Runtime, TVM, TensorRT) failed on a model qpass produced."""

    exit_code = 3


class PassError(QpassError):
    """A pass broke its contract; names the pass so the failure can be located."""

    exit_code = 3
