"""Latency statistics and the interleaved measuring loop shared by every engine."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qpasses.bench import IncompleteRun, Latency, measure, seeded_inputs, static_shapes
from qpasses.errors import EngineError, InputError


def test_statistics_against_numpy():
    samples = list(np.random.default_rng(0).gamma(2.0, 1.5, size=1000))
    lat = Latency.of(samples)
    assert lat.median_ms == pytest.approx(np.median(samples))
    assert lat.p90_ms == pytest.approx(np.quantile(samples, 0.9)) and lat.p99_ms == pytest.approx(np.quantile(samples, 0.99))
    assert lat.min_ms == min(samples) and lat.runs == 1000
    assert lat.std_ms == pytest.approx(np.std(samples))


def test_models_are_warmed_up_then_timed_in_turn():
    """Interleaving: drift during the session falls on both models alike."""
    calls: list[str] = []

    class Recorder:
        device = "test"

        def __init__(self, label: str, ms: float):
            self.label, self.ms = label, ms

        def __call__(self) -> float:
            calls.append(self.label)
            return self.ms

    result = measure({"model": Recorder("a", 1.0), "compare": Recorder("b", 3.0)}, warmup=2, runs=3, quiet=True)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert result["model"].median_ms == 1.0 and result["compare"].runs == 3


def test_a_failure_mid_run_keeps_the_runs_made():
    """A board that drops off after a few runs: the error carries what was measured before it."""
    left = iter(range(5))

    def flaky() -> float:
        if next(left, None) is None:
            raise EngineError("connection lost")
        return 2.0

    with pytest.raises(IncompleteRun, match="connection lost") as failure:
        measure({"model": flaky, "compare": lambda: 4.0}, warmup=1, runs=10, quiet=True)
    # warm-up took one call; then model and compare alternate until the 6th model call fails
    assert failure.value.latency["model"].runs == 4 and failure.value.latency["compare"].runs == 4
    assert failure.value.latency["model"].median_ms == 2.0


def random_feeds(model, batch, given, seed):
    return seeded_inputs(static_shapes(model, given, batch), seed)


def test_random_feeds_need_sizes_for_dynamic_dimensions(zoo_dir):
    model = onnx.load(zoo_dir / "resnet_basic.onnx")
    assert random_feeds(model, 8, {}, 0)["input"].shape[0] == 8  # the dynamic batch
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    with pytest.raises(InputError, match="--input-shape"):
        random_feeds(model, 1, {}, 0)
