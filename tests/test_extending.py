"""docs/EXTENDING.md works as written: every Python block runs, each extension it adds is in its
registry and in the spec schema, and the example step kind and selector run in a spec."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import datamill
from datamill.registry import STEPS, TRACKERS
from datamill.spec import json_schema

DOC = Path(__file__).resolve().parent.parent / "docs" / "EXTENDING.md"
ADDED = {"step": "shout", "selector": "shortest", "backend": "echo", "metric": "length_ratio", "tracker": "printing"}


@pytest.fixture(scope="module")
def extensions():
    """The doc's Python blocks run in order, in one namespace; what they registered is taken out after."""
    from datagen import backends
    from evals import byod
    from selection.methods import SELECTORS

    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 6
    namespace: dict = {"__name__": "extending_doc"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    yield namespace
    STEPS.unregister(ADDED["step"])
    SELECTORS.unregister(ADDED["selector"])
    backends.REGISTRY.unregister(ADDED["backend"])
    byod.METRICS.unregister(ADDED["metric"])
    TRACKERS.unregister(ADDED["tracker"])


def test_each_extension_is_registered_and_in_the_schema(extensions):
    from datagen import backends
    from evals import byod
    from selection.methods import method_names

    assert ADDED["step"] in STEPS.names() and ADDED["tracker"] in TRACKERS.names()
    assert ADDED["selector"] in method_names() and ADDED["backend"] in backends.names()
    assert ADDED["metric"] in byod.METRICS and byod.AGGREGATION[ADDED["metric"]] == "median"
    schema = json.dumps(json_schema())
    for name in (ADDED["step"], ADDED["backend"], ADDED["metric"]):
        assert f'"{name}"' in schema, name


def test_the_example_step_and_selector_run_in_a_spec(extensions, write_spec):
    path = write_spec("""
name: extending
tracking: {enabled: false}
sources:
  notes: {path: notes.jsonl, schema: raw}
  wanted: {path: notes.jsonl, schema: raw}
steps:
  loud: {shout: {input: notes}}
  short: {select: {input: loud, target: wanted, method: shortest, budget: 2, column: text}}
""")
    rows = [{"id": str(i), "text": "word " * (i + 1)} for i in range(5)]
    (path.parent / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = datamill.run(path)
    assert result.table("loud")["text"].to_list()[0] == "WORD "
    assert sorted(result.table("short")["text"].str.len_chars().to_list()) == [5, 10]


def test_a_spec_picks_the_example_tracker(extensions, write_spec, capsys):
    path = write_spec("""
name: tracked
tracking: {tracker: printing}
sources:
  notes: {path: notes.jsonl, schema: raw}
steps:
  loud: {shout: {input: notes}}
""")
    (path.parent / "notes.jsonl").write_text(json.dumps({"id": "1", "text": "hi"}) + "\n")
    datamill.run(path)
    printed = capsys.readouterr().out
    assert "loud {" in printed and "'shouted': 1" in printed


def test_an_unknown_tracker_is_a_spec_error_with_a_suggestion(write_spec):
    from datamill.errors import SpecError
    from datamill.spec import load_spec

    path = write_spec("name: t\ntracking: {tracker: mlfow}\nsources: {}\nsteps: {}\n")
    with pytest.raises(SpecError, match="did you mean 'mlflow'"):
        load_spec(path).points()
