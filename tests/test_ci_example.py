"""The README's GitHub Actions workflow works: its `qpass` steps, read from the README and run as
written from a checkout-like directory, exit 0 and leave the files the upload step publishes."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import yaml

from conftest import EXAMPLE

README = EXAMPLE.parent.parent / "README.md"


def workflow() -> dict:
    text = README.read_text()
    section = text[text.index("### In a CI pipeline (GitHub Actions)"):]
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))


def test_workflow_steps_run_as_written(tmp_path):
    steps = workflow()["jobs"]["quantize"]["steps"]
    runs = [step["run"] for step in steps if "run" in step]
    assert runs[0] == "python -m pip install -e ."  # the test environment is that install
    (tmp_path / "examples").symlink_to(EXAMPLE.parent)  # the checkout's relative paths
    for command in runs[1:]:
        assert command.startswith("qpass ")
        proc = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, (command, proc.stderr)
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-artifact"))
    published = tmp_path / upload["with"]["path"]
    assert {p.name for p in published.iterdir()} == {"digits.int8.onnx", "report.json", "report.html",
                                                       "digits.encodings.json", "eval.json"}
    gates = json.loads((published / "report.json").read_text())["gates"]
    assert gates["failed"] == [] and gates["min_sqnr"] == 25 and gates["max_drop"] == 1.0


def test_a_failing_gate_fails_the_step(tmp_path):
    quantize = next(s["run"] for s in workflow()["jobs"]["quantize"]["steps"] if s.get("run", "").startswith("qpass quantize"))
    (tmp_path / "examples").symlink_to(EXAMPLE.parent)
    proc = subprocess.run([*shlex.split(quantize), "--min-sqnr", "80"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1 and "gate failed" in proc.stderr
    assert Path(tmp_path / "out" / "report.json").is_file()  # uploaded by `if: always()`
