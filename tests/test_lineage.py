"""Lineage: one row followed from its source through each selector's decision, the training
table of the model that saw it, to the eval examples nearest to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SPEC = """
name: lineage
models: {tiny: builtin:tiny-llama}
sources:
  rows: {generator: tasks, families: [capitals, arithmetic], n: 40, seed: 0}
  target: {generator: tasks, families: [capitals], n: 10, seed: 1}
steps:
  pick: {select: {input: rows, target: target, method: zipfit, budget: 10}}
  sft: {train: {model: tiny, data: pick, max_steps: 1, max_len: 64, lora: {r: 4}}}
  score:
    evaluate: {model: sft, tasks: [datamill_capitals_mc], limit: 5, training_data: pick, apply_chat_template: false}
sweep:
  steps.pick.select.method: [zipfit, random]
tracking: {enabled: false}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from datamill.models import resolve_model

    return resolve_model("builtin:tiny-llama", base_dir=Path("."), cache_dir=tmp_path_factory.mktemp("models"))


def test_lineage_follows_a_row_through_selection_training_and_eval(write_spec, tiny, monkeypatch):
    from typer.testing import CliRunner

    import datamill
    from datamill.cli import app
    from datamill.lineage import lineage

    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(tiny.parent))
    spec = write_spec(SPEC)
    result = datamill.run(spec)
    picked = result.table("pick", point=0)  # zipfit's selection
    nearest = result.table("score", point=0)["nearest_train_id"].to_list()
    row_id = next(i for i in picked["id"].to_list() if i in nearest)  # a row that some eval example is closest to

    hits = lineage(spec, row_id)
    tables = {(h["point"], h["table"]) for h in hits}
    assert ("", "rows") in tables  # the source step, shared by both points
    scores = {h["point"]: h["row"] for h in hits if h["table"] == "pick__scores"}
    assert set(scores) == {"method=zipfit", "method=random"}  # each selector's decision on this row
    assert scores["method=zipfit"]["selected"] is True
    assert ("method=zipfit", "sft") in tables  # the training table of the model that saw it
    near = [h for h in hits if h["match"] == "nearest_train_id" and h["point"] == "method=zipfit"]
    assert near and all(h["table"] == "score" and h["row"]["nearest_train_id"] == row_id for h in near)

    out = CliRunner().invoke(app, ["lineage", str(spec), row_id, "--json"])
    assert out.exit_code == 0, out.output
    assert [json.loads(line)["table"] for line in out.output.splitlines()] == [h["table"] for h in hits]
    missing = CliRunner().invoke(app, ["lineage", str(spec), "no-such-row"])
    assert missing.exit_code != 0 and "no table" in str(missing.exception or missing.output)
