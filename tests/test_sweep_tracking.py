"""Sweeps and MLflow end to end: parent/child runs, shared upstream work, no secret leaks."""

from __future__ import annotations

from pathlib import Path

import pytest

import datamill
from datamill.errors import StepFailed

SWEEP = """\
name: swept
sources:
  tasks: {path: data/tasks.jsonl}
steps:
  pool:
    sql: SELECT * FROM tasks
  clean:
    dedup: {input: pool, exact: true, minhash: {threshold: 0.8}}
  pick:
    sql: SELECT * FROM clean WHERE family = 'capitals'
sweep:
  steps.clean.dedup.minhash.threshold: [0.5, 0.9]
  steps.pick.sql.query: ["SELECT * FROM clean WHERE family = 'capitals'", "SELECT * FROM clean LIMIT 5"]
"""


def test_sweep_2x2_makes_parent_and_four_children_and_runs_upstream_once(write_spec):
    from mlflow import MlflowClient

    path = write_spec(SWEEP)
    result = datamill.run(path)
    ran = [item.split("@")[0] for item in result.executed]
    assert ran.count("tasks") == 1 and ran.count("pool") == 1  # shared by all four points
    assert ran.count("clean") == 2 and ran.count("pick") == 4
    assert len(result.points) == 4

    client = MlflowClient(tracking_uri=result.tracking_location)
    experiment = client.get_experiment_by_name("swept")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.run_id]
    assert [p.info.run_id for p in parents] == [result.run_id]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in runs)
    thresholds = sorted(r.data.params["point.steps.clean.dedup.minhash.threshold"] for r in children)
    assert thresholds == ["0.5", "0.5", "0.9", "0.9"]
    child = children[0]
    assert child.data.params["sources.tasks.path"] == "data/tasks.jsonl"
    assert child.data.tags["step.clean.key"] and child.data.tags["step.tasks.rows.rejected"] == "3"
    assert {d.dataset.name for d in child.inputs.dataset_inputs} >= {"tasks", "clean", "clean__removed", "pick"}
    # artifacts stay in the workspace's store, not in the current directory
    artifacts = Path(path).parent / ".datamill" / "mlartifacts"
    assert list(artifacts.rglob("spec.yaml"))


def test_secrets_never_reach_the_mlflow_store(write_spec, monkeypatch):
    secret, literal = "sk-live-VERY-SECRET-8c1f", "tok-LITERAL-4d2a9e"
    monkeypatch.setenv("SOME_SECRET", secret)
    path = write_spec(f"""\
name: secretive
description: uses a key
steps:
  rows:
    emit: {{n: 2, api_key_env: SOME_SECRET, token: {literal}}}
""")
    result = datamill.run(path)
    assert result.points[0].steps["rows"].stats["used_key"] is True  # the step did read the secret
    store = Path(path).parent / ".datamill"
    files = [p for p in store.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "spec.yaml" for p in files)
    for f in files:
        data = f.read_bytes()
        for value in (secret, literal, "SOME_SECRET"):
            assert value.encode() not in data, f"{value} leaked into {f}"


def test_a_run_left_running_by_a_killed_process_is_closed_by_the_next_run(write_spec):
    from mlflow import MlflowClient

    path = write_spec(SWEEP)
    first = datamill.run(path)
    client = MlflowClient(tracking_uri=first.tracking_location)
    experiment = client.get_experiment_by_name("swept")
    # what a SIGKILL leaves behind: a run of this workspace never terminated
    orphan = client.create_run(experiment.experiment_id, run_name="killed",
                               tags={"datamill.workspace": str(first.workspace.root)}).info.run_id
    other = client.create_run(experiment.experiment_id, run_name="elsewhere",
                              tags={"datamill.workspace": "/another/workspace"}).info.run_id
    datamill.run(path)
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_run(other).info.status == "RUNNING"  # another workspace's run is not ours to close
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == [other]


def test_an_unchanged_rerun_adds_no_mlflow_runs_until_the_store_changes(write_spec):
    from mlflow import MlflowClient

    path = write_spec(SWEEP)
    first = datamill.run(path)
    again = datamill.run(path)
    assert again.executed == [] and again.logged_before
    assert again.run_id == first.run_id and [p.run_id for p in again.points] == [p.run_id for p in first.points]
    client = MlflowClient(tracking_uri=first.tracking_location)
    experiment = client.get_experiment_by_name("swept").experiment_id
    assert len(client.search_runs([experiment])) == 5  # one parent, four children: no copies
    # the store changed since (a run deleted in the UI, say): the results are logged again
    client.delete_run(first.points[0].run_id)
    third = datamill.run(path)
    assert not third.logged_before and third.run_id != first.run_id
    assert len(client.search_runs([experiment])) == 4 + 5
    # a changed spec is a new plan: it runs and logs as always
    changed = datamill.run(path, ["steps.clean.dedup.exact=false"])
    assert changed.executed and not changed.logged_before


@pytest.mark.slow  # needs the ray extra, which CI installs for the slow suite (it takes seconds)
def test_sweep_points_on_ray_run_at_once_with_shared_steps_once_and_the_tables_of_a_local_run(write_spec):
    """executor: ray runs the points in threads: shared steps once, same tables, runs. Dedup shards
    its work, so Ray starts from a point's thread, and must outlive it: Ray's services die with
    the thread that started them, and the failing sweep's dedup ran after that thread ended."""
    from mlflow import MlflowClient

    pytest.importorskip("ray")
    local = datamill.run(write_spec(SWEEP))
    together = datamill.run(write_spec(SWEEP.replace("name: swept", "name: together") + "executor: {kind: ray}\n"))
    ran = [item.split("@")[0] for item in together.executed]
    assert ran.count("tasks") == 1 and ran.count("pool") == 1 and ran.count("clean") == 2 and ran.count("pick") == 4
    assert [p.label for p in together.points] == [p.label for p in local.points]
    for a, b in zip(local.points, together.points):
        for name in ("clean", "pick"):
            key = a.plan.by_name(name).key
            assert key == b.plan.by_name(name).key
            assert local.workspace.table_path(key).read_bytes() == together.workspace.table_path(key).read_bytes()
    client = MlflowClient(tracking_uri=together.tracking_location)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs)

    # one point fails: the others finish, the failure is raised, the parent run is FAILED
    failing = SWEEP.replace('"SELECT * FROM clean LIMIT 5"', '"SELECT error(\'boom\') FROM clean"')
    with pytest.raises(StepFailed, match="boom"):
        datamill.run(write_spec(failing.replace("name: swept", "name: failing") + "executor: {kind: ray}\n"))
    runs = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    statuses = sorted(r.info.status for r in runs)
    assert statuses == ["FAILED", "FAILED", "FAILED", "FINISHED", "FINISHED"]  # 2 points + the parent
