"""`qpass quantize --html`: a self-contained page with one SQNR bar per layer, histograms with the
clipping range for the worst layers, the placement summary and a latency table; headless Chromium
renders it to a non-blank screenshot without console errors (and the check does catch errors)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLE
from test_cli import qpass


def render_in_chromium(page, tmp_path) -> tuple[np.ndarray, list[str]]:
    """Screenshot pixels and console messages of `page` in headless Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is missing: bash tools/setup_tests.sh installs Debian's chromium (.ci/run does)")
    shot = tmp_path / f"{page.stem}.png"
    # --no-sandbox: CI runs as root; --disable-dev-shm-usage: containers have a small /dev/shm
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1100,1400",
                           "--enable-logging=stderr", "--v=0", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return np.asarray(Image.open(shot).convert("RGB")), console


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    bench, common = root / "bench.json", ["quantize", EXAMPLE / "model.onnx", "-t", "tvm-arm", "-d", EXAMPLE / "calib.npz"]
    assert qpass(*common, "-o", root / "first.onnx", "-q").returncode == 0
    assert qpass("bench", root / "first.onnx", "--engine", "onnxruntime", "--compare", EXAMPLE / "model.onnx",
                 "--runs", "5", "--warmup", "1", "--report", bench, "-q").returncode == 0
    proc = qpass(*common, "--eval-data", EXAMPLE / "eval.npz", "--min-sqnr", "5", "-o", root / "m.onnx",
                 "--report", root / "r.json", "--html", root / "r.html", "--latency", bench, "-q")
    assert proc.returncode == 0, proc.stderr
    return root / "r.html", json.loads((root / "r.json").read_text())


def test_page_has_every_section_and_nothing_external(page):
    path, record = page
    text = path.read_text()
    for heading in ("Summary", "SQNR per layer", "Activations of the worst layers", "Q/DQ placement", "Latency"):
        assert f"<h2>{heading}</h2>" in text
    assert not re.search(r"<script|https?://|src=", text)  # self-contained, nothing to fetch
    layers = re.findall(r"<title>([^<]*): (-?[0-9.]+|inf) dB</title></rect>", text)
    assert len(layers) == len({record["nodes"]["fused"].get(n, n) for n in record["nodes"]["quantized"]})
    histograms = text.count('class="hist"')
    assert 1 <= histograms <= 6 and text.count('stroke="#b00020"') == 2 * histograms  # two clip lines each
    assert "gates" in text and "passed" in text
    assert record["fidelity"]["evaluation"]["samples"] == 497 and "top-1 accuracy vs labels" in text


def test_chromium_renders_it_without_console_errors(page, tmp_path):
    pixels, console = render_in_chromium(page[0], tmp_path)
    assert console == []
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # text, bars and histograms, not a blank page
    broken = tmp_path / "broken.html"
    broken.write_text("<!doctype html><p>x</p><script>console.error('boom'); missing();</script>")
    _, console = render_in_chromium(broken, tmp_path)
    assert any("boom" in line for line in console) and any("missing" in line for line in console)
