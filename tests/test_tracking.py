"""tracking/: MlflowTracker against a throwaway sqlite store, flatten_params, the UI server."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

import mlflow  # noqa: E402

from datamill import secrets  # noqa: E402
from datamill.tracker import StepRecord, TableRecord  # noqa: E402
from tracking import params as P  # noqa: E402
from tracking.mlflow_tracker import TRUNCATED_TAG, MlflowTracker  # noqa: E402
from tracking.params import TRUNCATED_SUFFIX, flatten_params  # noqa: E402

SECRET = "sk-test-9f8e7d6c5b4a"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A sqlite store and artifact root under tmp_path; the cwd is an empty folder so a stray
    ./mlruns would be noticed."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri, tmp_path / "mlartifacts")
    client = mlflow.MlflowClient(tracking_uri=uri)
    return tracker, client, tmp_path


@pytest.fixture
def secret(monkeypatch):
    monkeypatch.setenv("DATAMILL_TEST_API_KEY", SECRET)
    value = secrets.read_secret_env("DATAMILL_TEST_API_KEY")
    yield value
    secrets._known_values.discard(value)


def _start(tracker, parent=None, params=None, spec_yaml="name: demo\n"):
    return tracker.start_run(experiment="demo", run_name="point-1" if parent else "sweep",
                             parent_run_id=parent, params=params or {}, tags={"datamill.role": "x"},
                             spec_yaml=spec_yaml)


def _table(tmp_path, name="clean") -> TableRecord:
    path = tmp_path / f"{name}.parquet"
    path.write_bytes(b"not read by the tracker")
    return TableRecord(name=name, path=path, rows=42, digest="ab" * 32,
                       schema={"text": "large_string", "n": "int64", "score": "double",
                               "ok": "bool", "tags": "list<item: string>"})


# --- flatten_params (pure) ---

def test_flatten_nested_dicts_and_lists():
    flat, truncated = flatten_params({
        "steps": {"clean": {"dedup": {"minhash": {"threshold": 0.8}}}},
        "files": ["a.jsonl", {"b": None}], "flag": True, "empty": {},
    })
    assert flat == {"steps.clean.dedup.minhash.threshold": "0.8", "files.0": "a.jsonl",
                    "files.1.b": "null", "flag": "true", "empty": "{}"}
    assert truncated == {}
    assert flatten_params({"x": 1}, prefix="sweep") == ({"sweep.x": "1"}, {})


def test_flatten_truncates_long_values_and_reports_them():
    flat, truncated = flatten_params({"prompt": "y" * 7000, "short": "ok"})
    assert len(flat["prompt"]) == P.MAX_PARAM_VAL_LENGTH
    assert flat["prompt"].endswith(TRUNCATED_SUFFIX)
    assert truncated == {"prompt": 7000}


def test_flatten_sanitises_keys():
    flat, _ = flatten_params({"a:b": 1, "a b/c": 2, "a*b": 3, "/abs": 4, "k" * 300: 5, "..": 6})
    keys = list(flat)
    assert "a b/c" in keys  # allowed characters are kept
    assert all(P._BAD_KEY_CHARS.search(k) is None for k in keys)
    assert all(len(k) <= P.MAX_ENTITY_KEY_LENGTH for k in keys)
    assert len(set(keys)) == 6  # "a:b" and "a*b" both become "a_b": neither value is lost
    assert sorted(flat.values()) == ["1", "2", "3", "4", "5", "6"]


def test_limits_match_mlflow():
    from mlflow.utils import validation as v

    assert P.MAX_PARAM_VAL_LENGTH == v.MAX_PARAM_VAL_LENGTH
    assert P.MAX_TAG_VAL_LENGTH == v.MAX_TAG_VAL_LENGTH
    assert P.MAX_ENTITY_KEY_LENGTH == v.MAX_ENTITY_KEY_LENGTH
    assert P.MAX_PARAMS_TAGS_PER_BATCH == v.MAX_PARAMS_TAGS_PER_BATCH
    assert P.MAX_METRICS_PER_BATCH == v.MAX_METRICS_PER_BATCH


# --- MlflowTracker ---

def test_parent_and_child_runs_with_params_and_spec(store):
    tracker, client, tmp_path = store
    parent = _start(tracker)
    # 250 params: more than one log_batch request (100 per batch)
    params = {"steps": {f"s{i}": {"n": i} for i in range(250)}, "long": "z" * 7000, "odd:key": 1}
    child = _start(tracker, parent=parent, params=params, spec_yaml="name: demo\nsteps: {}\n")
    tracker.end_run(child)
    tracker.end_run(parent, "FAILED")

    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert "mlflow.parentRunId" not in client.get_run(parent).data.tags
    assert run.info.run_name == "point-1"
    assert run.data.tags["datamill.role"] == "x"
    assert run.data.params["steps.s249.n"] == "249"
    assert len(run.data.params) == 252
    assert run.data.params["odd_key"] == "1"
    assert run.data.params["long"].endswith(TRUNCATED_SUFFIX)
    assert run.data.tags[TRUNCATED_TAG] == "long"
    assert run.info.status == "FINISHED"
    assert client.get_run(parent).info.status == "FAILED"

    exp = client.get_experiment_by_name("demo")
    assert exp.artifact_location == (tmp_path / "mlartifacts" / "demo").resolve().as_uri()
    spec = tmp_path / "mlartifacts" / "demo" / child / "artifacts" / "spec.yaml"
    assert spec.read_text() == "name: demo\nsteps: {}\n"
    assert not Path("mlruns").exists()  # nothing landed in the cwd
    assert tracker.location() == f"sqlite:///{tmp_path}/mlflow.db"


def test_log_step_dataset_inputs_metrics_and_tags(store):
    tracker, client, tmp_path = store
    run_id = _start(tracker)
    table = _table(tmp_path)
    step = StepRecord(name="clean", kind="dedup", key="k123", cached=False, seconds=1.5,
                      stats={"rows": {"main": 42, "removed": 3}, "method": "minhash", "ratio": 0.9,
                             "exact": True},
                      tables=[table], model_dir=tmp_path / "model")
    tracker.log_step(run_id, step)
    tracker.log_metrics(run_id, {"clean.loss": 0.5}, step=3)
    tracker.end_run(run_id)

    run = client.get_run(run_id)
    [inp] = run.inputs.dataset_inputs
    ds = inp.dataset
    assert ds.name == "clean"
    assert ds.digest == table.digest[:36]
    assert ds.source_type == "local"
    assert table.path.resolve().as_uri() in ds.source
    import json

    cols = {c["name"]: c["type"] for c in json.loads(ds.schema)["mlflow_colspec"]}
    assert cols == {"text": "string", "n": "long", "score": "double", "ok": "boolean", "tags": "string"}
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "clean"}

    m = run.data.metrics
    assert m == {"clean.ratio": 0.9, "clean.loss": 0.5}  # results only: row counts and timings are tags
    assert client.get_metric_history(run_id, "clean.loss")[0].step == 3
    t = run.data.tags
    assert t["step.clean.rows.main"] == "42" and t["step.clean.rows.removed"] == "3"
    assert t["step.clean.seconds"] == "1.5"
    assert t["step.clean.key"] == "k123"
    assert t["step.clean.cached"] == "false"
    assert t["step.clean.method"] == "minhash"
    assert t["step.clean.exact"] == "true"
    assert t["step.clean.model_path"] == str(tmp_path / "model")
    assert not client.list_artifacts(run_id, "model")  # the model is referenced, not uploaded


def test_log_artifact_file_and_folder(store):
    tracker, client, tmp_path = store
    run_id = _start(tracker)
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "a.json").write_text("{}")
    (tmp_path / "one.txt").write_text("hi")
    tracker.log_artifact(run_id, tmp_path / "res", "results")
    tracker.log_artifact(run_id, tmp_path / "one.txt")
    names = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "results")}
    assert {"one.txt", "results/a.json", "spec.yaml"} <= names


def test_secret_never_reaches_the_store(store, secret):
    tracker, client, tmp_path = store
    params = {"source": {"url": f"https://user:{secret}@example.org/data"}, "long": secret * 2000}
    run_id = tracker.start_run(experiment="demo", run_name=f"run {secret}", parent_run_id=None, params=params,
                               tags={"note": f"token={secret}"}, spec_yaml=f"source:\n  url: {secret}\n")
    tracker.log_step(run_id, StepRecord(name="s", kind="k", key="k", cached=True, seconds=0.1,
                                        stats={"msg": f"used {secret}"}, tables=[_table(tmp_path)]))
    tracker.end_run(run_id)

    run = client.get_run(run_id)
    assert secrets.REDACTED in run.data.params["source.url"]
    assert secrets.REDACTED in run.data.tags["step.s.msg"]
    files = [tmp_path / "mlflow.db", *(tmp_path / "mlartifacts").rglob("*")]
    files = [f for f in files if f.is_file()]
    assert any(f.name == "spec.yaml" for f in files)
    for f in files:
        data = f.read_bytes()
        assert SECRET.encode() not in data, f
        assert SECRET[:8].encode() not in data, f  # not even half a secret cut by truncation


# --- UI server (~10 s: the server takes that long to answer /health) ---

def test_start_and_stop_server(store):
    from tracking.ui import start_server, stop_server

    tracker, _, tmp_path = store
    run_id = _start(tracker)
    tracker.end_run(run_id)
    proc, url = start_server(tracker.uri, tmp_path / "mlartifacts")
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            assert r.status == 200
        # the server reads the same store
        remote = mlflow.MlflowClient(tracking_uri=url)
        assert remote.get_run(run_id).info.status == "FINISHED"
    finally:
        stop_server(proc)
    assert proc.poll() is not None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)


def test_log_table_writes_a_viewable_table(store):
    tracker, _, tmp_path = store
    run = tracker.start_run(experiment="tables", run_name="r", parent_run_id=None, params={}, tags={}, spec_yaml="a: 1\n")
    tracker.log_table(run, "gen.sample", {"id": ["a", "b"], "text": ["x", "y"]})
    tracker.end_run(run)
    files = list((tmp_path / "mlartifacts").rglob("gen.sample.json"))
    assert files and '"x"' in files[0].read_text()
