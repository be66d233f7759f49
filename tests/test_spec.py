"""Spec errors: each class of mistake gives file:line:col, the field, what was expected,
exit code 2 and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from datamill.api import load
from datamill.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent
GOOD = """\
name: t
sources:
  tasks: {path: data/tasks.jsonl}
steps:
  pool:
    sql: SELECT * FROM tasks
  clean:
    dedup: {input: pool, exact: true, minhash: {threshold: 0.8}}
"""


def errors_of(path, overrides=None) -> str:
    with pytest.raises(SpecError) as info:
        load(path, overrides).points()
    return "\n".join(info.value.problems)


def test_good_spec_validates(write_spec):
    (point,) = load(write_spec(GOOD)).points()
    assert point.spec.steps["clean"].dedup.minhash.threshold == 0.8


def test_malformed_yaml_names_line(write_spec):
    path = write_spec("name: t\nsteps:\n  a: {sql: 'SELECT 1'\n  b: 2\n")
    msg = errors_of(path)
    assert msg.startswith(f"{path}:4:") and "invalid YAML" in msg


def test_wrong_type_names_field_expected_and_found(write_spec):
    path = write_spec(GOOD.replace("exact: true", "exact: maybe"))
    msg = errors_of(path)
    assert f"{path}:8:" in msg
    assert "steps.clean.dedup.exact: expected a valid boolean" in msg and "found 'maybe' (str)" in msg


def test_unknown_key_suggests_nearest(write_spec):
    msg = errors_of(write_spec(GOOD.replace("minhash:", "minhsh:")))
    assert "steps.clean.dedup.minhsh: unknown key 'minhsh'; did you mean 'minhash'?" in msg
    assert ":8:" in msg


def test_unknown_step_kind_suggests_nearest(write_spec):
    msg = errors_of(write_spec(GOOD.replace("    dedup:", "    dedupe:")))
    assert "unknown key 'dedupe'; did you mean 'dedup'?" in msg


def test_missing_required_field(write_spec):
    msg = errors_of(write_spec(GOOD.replace("input: pool, ", "")))
    assert "steps.clean.dedup.input: missing required field 'input'" in msg


def test_missing_file(write_spec):
    path = write_spec(GOOD.replace("data/tasks.jsonl", "data/nope.jsonl"))
    msg = errors_of(path)
    assert f"{path}:3:" in msg and "sources.tasks.path" in msg and "nope.jsonl" in msg


def test_undefined_table_suggests_nearest(write_spec):
    msg = errors_of(write_spec(GOOD.replace("FROM tasks", "FROM taks")))
    assert "steps.pool.sql" in msg and "undefined table 'taks'; did you mean 'tasks'?" in msg


def test_side_tables_are_checked(write_spec):
    ok = GOOD + "  gone:\n    sql: SELECT * FROM clean__removed JOIN tasks__rejected ON true\n"
    load(write_spec(ok)).points()
    msg = errors_of(write_spec(GOOD + "  gone:\n    sql: SELECT * FROM pool__removed\n"))
    assert "step 'pool' (sql) has no side table 'removed' (its side tables: none)" in msg


def test_undefined_and_unknown_models(write_spec):
    msg = errors_of(write_spec(GOOD + "models:\n  m: builtin:tiny-lama\n  local: ./no/such/model\n"))
    assert "models.m" in msg and "tiny-llama" in msg
    assert "models.local" in msg and "no/such/model" in msg


def test_step_model_references(write_spec):
    base = "name: t\nmodels:\n  smol: builtin:smollm2-135m-instruct\nsteps:\n  a: {emit: {model: %s}}\n"
    load(write_spec(base % "smol")).points()  # a name from models:
    load(write_spec(base % "builtin:tiny-llama")).points()  # a literal reference
    msg = errors_of(write_spec(base % "smoll"))
    assert ":5:" in msg and "steps.a.emit.model: undefined model 'smoll'; did you mean 'smol'?" in msg
    msg = errors_of(write_spec(base % "./missing-model"))
    assert "steps.a.emit.model" in msg and "missing-model" in msg
    msg = errors_of(write_spec(base % "a"))
    assert "step 'a' (emit) produces no model" in msg


def test_cycle_between_steps(write_spec):
    text = "name: t\nsteps:\n  a: {sql: SELECT * FROM b}\n  b: {sql: SELECT * FROM a}\n"
    msg = errors_of(write_spec(text))
    assert "cycle: a -> b -> a" in msg


def test_duplicate_step_names(write_spec):
    msg = errors_of(write_spec(GOOD + "  pool:\n    sql: SELECT 1\n"))
    assert "duplicate key 'pool' (first defined on line 5)" in msg and ":9:" in msg
    msg = errors_of(write_spec(GOOD + "  tasks:\n    sql: SELECT 1\n"))
    assert "duplicate name 'tasks'" in msg


def test_bad_sql_is_a_spec_error(write_spec):
    msg = errors_of(write_spec(GOOD.replace("SELECT * FROM tasks", "SELEC * FROM tasks")))
    assert "steps.pool.sql" in msg and "invalid SQL" in msg
    msg = errors_of(write_spec(GOOD.replace("SELECT * FROM tasks", "DROP TABLE tasks")))
    assert "expected a SELECT statement" in msg


def test_all_problems_reported_at_once(write_spec):
    bad = GOOD.replace("exact: true", "exact: maybe").replace("minhash:", "minhsh:")
    assert len(errors_of(write_spec(bad)).splitlines()) == 2


def test_set_overrides_are_typed_by_the_schema(write_spec):
    path = write_spec(GOOD)
    (point,) = load(path, ["steps.clean.dedup.minhash.threshold=0.5", "description=42",
                           "steps.clean.dedup.exact=false"]).points()
    assert point.spec.steps["clean"].dedup.minhash.threshold == 0.5
    assert point.spec.description == "42"  # a string field gets the text, not the int
    assert point.spec.steps["clean"].dedup.exact is False


def test_set_override_errors_name_the_override(write_spec):
    msg = errors_of(write_spec(GOOD), ["steps.clean.dedup.exact=maybe"])
    assert msg.startswith("--set steps.clean.dedup.exact: steps.clean.dedup.exact: expected a valid boolean")
    msg = errors_of(write_spec(GOOD), ["steps.clean.dedup.exactt=true"])
    assert "did you mean 'exact'" in msg
    with pytest.raises(SpecError, match="expected PATH=VALUE"):
        load(write_spec(GOOD), ["nonsense"])


def test_sweep_points_grid_and_zip(write_spec):
    sweep = "sweep:\n  steps.clean.dedup.minhash.threshold: [0.5, 0.9]\n  steps.clean.dedup.exact: [true, false]\n"
    points = load(write_spec(GOOD + sweep)).points()
    assert len(points) == 4
    assert {(p.spec.steps["clean"].dedup.minhash.threshold, p.spec.steps["clean"].dedup.exact) for p in points} == {
        (0.5, True), (0.5, False), (0.9, True), (0.9, False)}
    points = load(write_spec(GOOD + sweep + "  mode: zip\n")).points()
    assert [p.label for p in points] == ["threshold=0.5,exact=True", "threshold=0.9,exact=False"]


def test_sweep_labels_leave_out_paired_params_when_the_method_names_the_point():
    from datamill.spec import point_labels

    zipped = [{"s.method": "zipfit", "s.params": {"level": 9}}, {"s.method": "less", "s.params": {"epochs": 1}}]
    assert point_labels(zipped) == ["method=zipfit", "method=less"]
    with_model = [{"s.method": "zipfit", "s.model": None}, {"s.method": "less", "s.model": "smol"}]
    assert point_labels(with_model) == ["method=zipfit", "method=less,model=smol"]
    # a grid over params with one method: the params are what tell the points apart
    grid = [{"s.method": "zipfit", "s.params": {"level": 9}}, {"s.method": "zipfit", "s.params": {"level": 1}}]
    assert point_labels(grid) == ["method=zipfit,params={'level': 9}", "method=zipfit,params={'level': 1}"]
    assert point_labels([{}]) == [""]


def test_sweep_errors(write_spec):
    msg = errors_of(write_spec(GOOD + "sweep:\n  steps.clean.dedup.minhash.threshold: 0.5\n"))
    assert "expected a non-empty list" in msg
    msg = errors_of(write_spec(GOOD + "sweep:\n  steps.clean.dedup.exact: [true, maybe]\n"))
    assert "sweep steps.clean.dedup.exact='maybe'" in msg and ":10:" in msg


def test_schema_export_validates_every_example(tmp_path):
    import jsonschema
    import yaml

    # A fresh process: this one has the test plugins' step kinds registered.
    out = subprocess.run([sys.executable, "-m", "datamill.cli", "schema"], capture_output=True, text=True, check=True)
    schema = json.loads(out.stdout)
    committed = json.loads((ROOT / "datamill.schema.json").read_text())
    assert committed == schema, "datamill.schema.json is stale: run `make schema`"
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(examples) >= 5
    import importlib.util

    no_ray = importlib.util.find_spec("ray") is None  # the default suite runs without the ray extra
    for path in examples:
        text = path.read_text()
        assert text.startswith("# yaml-language-server: $schema=../datamill.schema.json")
        jsonschema.validate(yaml.safe_load(text), schema)
        local = ["executor.kind=local"] if no_ray and "kind: ray" in text else []
        if "scale_data/" in text:  # its data is made by a command (bench/corpus.py): stand-ins will do
            (tmp_path / "scale_data").mkdir(exist_ok=True)
            for name in ("corpus.jsonl", "targets.jsonl"):
                (tmp_path / "scale_data" / name).write_text("")
            path = tmp_path / path.name
            path.write_text(text)
        load(path, local).points()  # and datamill itself accepts them
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "x", "steps": {"a": {"dedup": {"input": "b", "exactt": True}}}}, schema)


def test_cli_exit_code_2_and_no_traceback(write_spec):
    path = write_spec(GOOD.replace("exact: true", "exact: maybe"))
    out = subprocess.run([sys.executable, "-m", "datamill.cli", "validate", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "steps.clean.dedup.exact" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "datamill.cli", "--debug", "validate", str(path)],
                         capture_output=True, text=True)
    assert "Traceback" in out.stderr
    out = subprocess.run([sys.executable, "-m", "datamill.cli", "validate", str(path.parent / "missing.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "spec file not found" in out.stderr


def test_sources_can_name_a_generator_step(write_spec):
    base = "name: t\ntracking: {enabled: false}\nsources:\n  nums: {generator: count, n: %s}\n  tasks: {path: data/tasks.jsonl}\n"
    (point,) = load(write_spec(base % "4")).points()
    steps = point.step_objects()
    assert steps["nums"].kind == "count" and steps["nums"].config.n == 4 and steps["tasks"].kind == "source"
    msg = errors_of(write_spec(base % "many"))
    assert "sources.nums.n: expected a valid integer" in msg and ":4:" in msg
    msg = errors_of(write_spec(base.replace("n: %s", "m: 1")))
    assert "sources.nums.m: unknown key 'm'" in msg and "valid keys: n, generator" in msg
    msg = errors_of(write_spec(base.replace("generator: count", "generator: cont") % "1"))
    assert "sources.nums.generator: unknown generator 'cont'; did you mean 'count'?" in msg
    import datamill

    assert datamill.run(write_spec(base % "4")).table("nums").height == 4
