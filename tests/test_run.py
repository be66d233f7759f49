"""Running specs: the cache, atomic outputs, rejected rows, the catalog, sweeps, SQL sandbox."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import datamill
from datamill.errors import SpecError, StepFailed

PIPELINE = """\
name: t
tracking: {enabled: false}
sources:
  tasks: {path: data/tasks.jsonl}
steps:
  pool:
    sql: SELECT * FROM tasks WHERE family <> 'reverse'
  clean:
    dedup: {input: pool, exact: true, minhash: {threshold: 0.8}}
  counts:
    sql: SELECT family, count(*) AS n FROM clean GROUP BY family
  side:
    sql: SELECT count(*) AS n FROM tasks
"""


def names(result) -> list[str]:
    return sorted(item.split("@")[0] for item in result.executed)


def test_unchanged_rerun_recomputes_nothing(write_spec):
    path = write_spec(PIPELINE)
    first = datamill.run(path)
    assert names(first) == ["clean", "counts", "pool", "side", "tasks"]
    second = datamill.run(path)
    assert second.executed == []
    assert all(record.cached for record in second.points[0].steps.values())
    assert second.table("counts").equals(first.table("counts"))


def test_plan_marks_cached_steps_with_row_counts(write_spec):
    from datamill.plan import describe

    path = write_spec(PIPELINE)
    (plan,) = datamill.plans(path)
    assert {row["status"] for row in describe(plan)} == {"to run"}
    datamill.run(path)
    (plan,) = datamill.plans(path)
    rows = {row["name"]: row for row in describe(plan)}
    assert {row["status"] for row in rows.values()} == {"cached"}
    assert rows["tasks"]["rows"] == {"main": 151, "rejected": 3}
    assert rows["clean"]["deps"] == ["pool"]


def test_changing_one_step_reruns_it_and_its_dependants_only(write_spec):
    path = write_spec(PIPELINE)
    datamill.run(path)
    result = datamill.run(path, ["steps.clean.dedup.minhash.threshold=0.5"])
    assert names(result) == ["clean", "counts"]
    # editing an input file reruns everything that reads it
    data = path.parent / "data" / "tasks.jsonl"
    data.write_text(data.read_text() + '{"prompt": "new?", "response": "yes", "family": "chat"}\n')
    assert names(datamill.run(path)) == ["clean", "counts", "pool", "side", "tasks"]


def test_polars_step_reruns_when_its_module_changes(write_spec):
    module = write_spec("import polars as pl\n\ndef f(df):\n    return df.head(2)\n", name="mymod.py")
    path = write_spec("name: t\ntracking: {enabled: false}\nsources:\n  tasks: {path: data/tasks.jsonl}\n"
                      "steps:\n  few:\n    polars: {function: 'mymod:f', input: tasks}\n")
    assert datamill.run(path).table("few").height == 2
    assert datamill.run(path).executed == []
    module.write_text("import polars as pl\n\ndef f(df, n=3):\n    return df.head(n)\n")
    result = datamill.run(path)
    assert names(result) == ["few"] and result.table("few").height == 3


def test_rejected_rows_land_with_reasons(write_spec):
    result = datamill.run(write_spec(PIPELINE))
    rejected = result.table("tasks__rejected").sort("line")
    assert rejected["line"].to_list() == [18, 43, 78]
    reasons = rejected["reason"].to_list()
    assert reasons[0].startswith("invalid JSON") and "empty content" in reasons[1] and "missing field" in reasons[2]
    assert result.points[0].steps["tasks"].stats["rejected"] == 3


def test_catalog_reads_every_table(write_spec):
    path = write_spec(PIPELINE)
    result = datamill.run(path)
    ws = datamill.open(result.workspace.root)
    assert {"tasks", "tasks__rejected", "pool", "clean", "clean__removed", "counts"} <= set(ws.tables())
    assert ws.table("clean").height == result.table("clean").height
    assert ws.sql("SELECT sum(n) AS n FROM counts")["n"][0] == result.table("clean").height
    out = subprocess.run([sys.executable, "-m", "datamill.cli", "sql", str(path), "SELECT count(*) AS n FROM pool"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and str(result.table("pool").height) in out.stdout


def test_failed_step_leaves_nothing_trusted_and_rerun_completes(write_spec, monkeypatch):
    path = write_spec(PIPELINE + "  partial:\n    explode: {input: pool, after_rows: 2}\n")
    with pytest.raises(StepFailed, match="step 'partial' \\(explode\\) failed: RuntimeError: boom"):
        datamill.run(path)
    (plan,) = datamill.plans(path)
    key = plan.by_name("partial").key
    assert not plan.workspace.is_cached(key) and not plan.workspace.step_dir(key).exists()
    monkeypatch.setenv("DATAMILL_TEST_DEFUSE", "1")
    result = datamill.run(path)
    assert names(result) == ["partial"]  # upstream steps that finished before the failure are reused
    assert result.table("partial").height == 2


def test_sigkill_mid_step_then_rerun(write_spec, tmp_path):
    marker = tmp_path / "started"
    path = write_spec(PIPELINE + f"  slow:\n    sleepy: {{input: pool, marker: '{marker}'}}\n")
    tests_dir = Path(__file__).parent
    code = ("import sys; sys.path.insert(0, %r); import plugin_steps; import datamill; datamill.run(%r, quiet=True)"
            % (str(tests_dir), str(path)))
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), "the step never started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (plan,) = datamill.plans(path)
    key = plan.by_name("slow").key
    assert not plan.workspace.is_cached(key)  # its half-written table is not trusted
    assert any((plan.workspace.steps_dir / ".tmp").iterdir())
    os.environ["DATAMILL_TEST_DEFUSE"] = "1"
    try:
        result = datamill.run(path)
    finally:
        del os.environ["DATAMILL_TEST_DEFUSE"]
    assert names(result) == ["slow"]
    assert result.table("slow").height == result.table("pool").height
    assert not (plan.workspace.steps_dir / ".tmp").exists() or not any((plan.workspace.steps_dir / ".tmp").iterdir())


def test_spec_sql_cannot_read_outside_the_workspace(write_spec):
    path = write_spec(PIPELINE + "  leak:\n    sql: SELECT * FROM read_csv('/etc/passwd')\n")
    with pytest.raises(SpecError) as info:  # refused before anything runs (the run's sandbox: test_sql_sandbox.py)
        datamill.run(path)
    assert "steps.leak.sql.query" in str(info.value) and "read_csv('/etc/passwd')" in str(info.value)
    out = subprocess.run([sys.executable, "-m", "datamill.cli", "run", str(path)], capture_output=True, text=True)
    assert out.returncode == 2 and "spec SQL reads only earlier tables" in out.stderr
    assert "root:" not in out.stdout + out.stderr


def test_run_from_a_dict_and_the_cli_exit_codes(write_spec):
    path = write_spec(PIPELINE)
    out = subprocess.run([sys.executable, "-m", "datamill.cli", "run", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-m", "datamill.cli", "run", str(path)], capture_output=True, text=True)
    assert "everything was cached" in out.stderr
    out = subprocess.run([sys.executable, "-m", "datamill.cli", "run", str(path), "--set", "nope=1"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown key 'nope'" in out.stderr


@pytest.mark.slow  # starts an MLflow server: ~20 s
def test_ui_command_serves_the_spec_store_and_stops_on_ctrl_c(write_spec):
    import re
    import urllib.request

    path = write_spec(PIPELINE.replace("tracking: {enabled: false}\n", ""))
    datamill.run(path)
    proc = subprocess.Popen([sys.executable, "-m", "datamill.cli", "ui", str(path)],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = None
        deadline = time.time() + 90
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            found = re.search(r"http://127\.0\.0\.1:\d+", line)
            url = found.group(0) if found else None
        assert url, "datamill ui printed no URL"
        with urllib.request.urlopen(url + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=t") as r:
            assert b'"name": "t"' in r.read().replace(b'"name":"t"', b'"name": "t"')
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
