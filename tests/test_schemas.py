"""The JSON records CI pipelines read (quantize, eval, bench reports) follow their published JSON
Schemas in qpasses/schemas, and the schemas do reject a record that breaks them."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest

from conftest import EXAMPLE
from test_cli import qpass


def schema(name: str) -> dict:
    return json.loads(resources.files("qpasses").joinpath("schemas", f"{name}.schema.json").read_text())


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("records")
    model, common = root / "m.onnx", ["-q"]
    assert qpass("quantize", EXAMPLE / "model.onnx", "-t", "snpe", "-d", EXAMPLE / "calib.npz", "-o", model,
                 "--report", root / "plain.json", *common).returncode == 0
    assert qpass("bench", model, "--engine", "onnxruntime", "--compare", EXAMPLE / "model.onnx", "--runs", "3",
                 "--warmup", "1", "--max-latency", "1000", "--report", root / "bench.json", *common).returncode == 0
    assert qpass("quantize", EXAMPLE / "model.onnx", "-t", "snpe", "-d", EXAMPLE / "calib.npz", "-o", root / "g.onnx",
                 "--eval-data", EXAMPLE / "eval.npz", "--max-drop", "5", "--cle", "--html", root / "g.html",
                 "--latency", root / "bench.json", "--report", root / "gated.json", *common).returncode == 0
    assert qpass("eval", EXAMPLE / "model.onnx", model, "--data", EXAMPLE / "eval.npz", "--report", root / "eval.json",
                 *common).returncode == 0
    return {name: json.loads((root / f"{name}.json").read_text()) for name in ("plain", "gated", "bench", "eval")}


@pytest.mark.parametrize("record,kind", [("plain", "quantize"), ("gated", "quantize"), ("bench", "bench"),
                                         ("eval", "eval")])
def test_records_follow_their_schemas(records, record, kind):
    jsonschema.Draft202012Validator.check_schema(schema(kind))
    jsonschema.validate(records[record], schema(kind), cls=jsonschema.Draft202012Validator)


def test_gated_report_carries_evaluation_and_latency(records):
    gated = records["gated"]
    assert gated["fidelity"]["evaluation"]["metric"] == "top-1 accuracy vs labels" and gated["gates"]["failed"] == []
    plain = records["plain"]["fidelity"]["evaluation"]  # no gates: still top-1, on the held-back samples
    assert plain["data"] == "held back from --data" and plain["metric"] == "top-1 agreement with the reference"
    assert gated["latency"]["schema"] == "qpass.bench" and records["bench"]["gates"]["failed"] == []
    assert [d["technique"] for d in gated["techniques"]["decisions"]] == ["cle"]


def test_schemas_reject_broken_records(records):
    broken = dict(records["plain"], version=2)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema("quantize"))
    broken = json.loads(json.dumps(records["bench"]))
    broken["models"]["model"]["latency"].pop("median_ms")
    with pytest.raises(jsonschema.ValidationError, match="median_ms"):
        jsonschema.validate(broken, schema("bench"))
