"""MLflow tracking under stress and for reading: stores created by two processes at once, re-runs
that add no copies of runs, a sweep's parent that carries its comparison, children whose metrics
are results, and the comparison chart (titles inside the figure, error bars from stderr)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import mlflow  # noqa: E402

import datamill  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _experiment_runs(uri: str, name: str) -> list:
    client = mlflow.MlflowClient(tracking_uri=uri)
    return client.search_runs([client.get_experiment_by_name(name).experiment_id])


# --------------------------------------------------------------------------- item 9: store creation

WORKER = """
import sys, time
from pathlib import Path
from tracking.mlflow_tracker import MlflowTracker

folder, me, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
MlflowTracker(f"sqlite:///{folder}/warm-{me}.db", folder / "art")  # imports done before the race
for r in range(rounds):
    (folder / f"ready-{r}-{me}").touch()
    while not (folder / f"go-{r}").exists():  # both processes start creating the store together
        time.sleep(0.001)
    tracker = MlflowTracker(f"sqlite:///{folder}/store-{r}.db", folder / "art")
    run = tracker.start_run(experiment="race", run_name=me, parent_run_id=None, params={}, tags={}, spec_yaml="a: 1\\n")
    tracker.end_run(run)
    print(r, run, flush=True)
"""


def test_two_processes_creating_one_new_store_at_once_both_log_their_run(tmp_path):
    rounds = 3
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen([sys.executable, str(script), str(tmp_path), name, str(rounds)], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in ("a", "b")]
    try:
        for r in range(rounds):  # each round a fresh store file, released to both at the same moment
            while (not all((tmp_path / f"ready-{r}-{name}").exists() for name in "ab")
                   and all(w.poll() is None for w in workers)):  # a worker that failed is reported below
                time.sleep(0.001)
            (tmp_path / f"go-{r}").touch()
        outputs = [w.communicate(timeout=300) for w in workers]
    finally:
        for w in workers:
            w.kill()
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    for r in range(rounds):
        runs = _experiment_runs(f"sqlite:///{tmp_path}/store-{r}.db", "race")
        assert sorted(run.info.run_name for run in runs) == ["a", "b"]


# --------------------------------------------------------------------------- item 12: no duplicate runs

def _one_step_spec(name: str, db: Path, n: int) -> str:
    return textwrap.dedent(f"""\
        name: {name}
        tracking: {{uri: "sqlite:///{db}"}}
        sources:
          nums: {{generator: count, n: {n}}}
        steps:
          rows: {{emit: {{n: {n}}}}}
        """)


def test_a_rerun_adds_no_runs_though_another_spec_logged_to_the_store_since(write_spec, tmp_path):
    db = tmp_path / "shared" / "mlflow.db"
    a = write_spec(_one_step_spec("alpha", db, 2), "alpha.yaml")
    b = write_spec(_one_step_spec("beta", db, 3), "beta.yaml")
    first = datamill.run(a)
    datamill.run(b)  # the store changes: another spec's run
    again = datamill.run(a)
    assert again.executed == [] and again.logged_before and again.run_id == first.run_id
    uri = f"sqlite:///{db}"
    assert [r.info.run_id for r in _experiment_runs(uri, "alpha")] == [first.run_id]
    assert len(_experiment_runs(uri, "beta")) == 1
    # deleted in MLflow (the UI's delete): the next run logs the results again
    mlflow.MlflowClient(tracking_uri=uri).delete_run(first.run_id)
    third = datamill.run(a)
    assert third.executed == [] and not third.logged_before and third.run_id != first.run_id
    assert [r.info.run_id for r in _experiment_runs(uri, "alpha")] == [third.run_id]
    assert not (first.workspace.root / "logged").exists()  # the runs themselves are the memo


def test_an_unchanged_rerun_finds_its_runs_without_starting_mlflow(write_spec):
    """Importing mlflow and opening a store take seconds: a re-run with nothing to log reads the
    sqlite store's tables itself."""
    path = write_spec("name: again\nsources:\n  tasks: {path: data/tasks.jsonl}\nsteps:\n"
                      "  pool: {sql: SELECT * FROM tasks}\n")
    first = datamill.run(path)
    code = (f"import sys, datamill; r = datamill.run({str(path)!r}, quiet=True); "
            "print(r.logged_before, r.run_id, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=path.parent,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", first.run_id, "False"]


def test_find_runs_reads_a_sqlite_store_as_mlflow_searches_it(tmp_path):
    from tracking.mlflow_tracker import MlflowTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert MlflowTracker(uri, tmp_path / "art").find_runs("demo", {"k": "v"}) == []
    assert not (tmp_path / "mlflow.db").exists()  # looking did not create a store

    writer = MlflowTracker(uri, tmp_path / "art")
    ids = {}
    for name, status, tags in [("old", "FINISHED", {"k": "v"}), ("failed", "FAILED", {"k": "v"}),
                               ("other", "FINISHED", {"k": "w"}), ("gone", "FINISHED", {"k": "v"}),
                               ("new", "FINISHED", {"k": "v", "j": "it's"}), ("open", None, {"k": "v"})]:
        ids[name] = writer.start_run(experiment="demo", run_name=name, parent_run_id=None, params={}, tags=tags,
                                     spec_yaml="a: 1\n")
        if status:
            writer.end_run(ids[name], status)
    writer.start_run(experiment="elsewhere", run_name="x", parent_run_id=None, params={}, tags={"k": "v"},
                     spec_yaml="a: 1\n")
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.delete_run(ids["gone"])

    reader = MlflowTracker(uri, tmp_path / "art")  # a fresh process's tracker: no MLflow client yet
    found = reader.find_runs("demo", {"k": "v"})
    assert [run_id for run_id, _ in found] == [ids["new"], ids["old"]]  # FINISHED, not deleted, newest first
    assert found[0][1]["j"] == "it's" and found[0][1]["mlflow.runName"] == "new"
    assert [run_id for run_id, _ in reader.find_runs("demo", {"k": "v", "j": "it's"})] == [ids["new"]]
    experiment = client.get_experiment_by_name("demo").experiment_id
    searched = client.search_runs([experiment], "attributes.status = 'FINISHED' and tags.k = 'v'",
                                  order_by=["attributes.start_time DESC"])
    assert [run_id for run_id, _ in found] == [r.info.run_id for r in searched]
    assert reader.find_runs("nowhere", {"k": "v"}) == []


SWEEP = """\
name: scoring
sources:
  nums: {generator: count, n: 4}
steps:
  base: {scored: {input: nums, acc: 0.5, stderr: 0.05}}
  score: {scored: {input: nums, acc: 0.6}}
sweep:
  mode: zip
  steps.score.scored.acc: [0.6, 0.7]
  steps.score.scored.stderr: [0.04, null]
"""


def test_a_sweep_run_twice_from_python_has_one_parent_and_one_child_per_point(write_spec):
    path = write_spec(SWEEP)
    first = datamill.run(path)
    # reading the results in MLflow and writing a note on the sweep (as in the UI) changes the store
    mlflow.MlflowClient(tracking_uri=first.tracking_location).set_tag(first.run_id, "mlflow.note.content", "looks good")
    again = datamill.run(str(path))
    assert again.logged_before and again.run_id == first.run_id
    assert [p.run_id for p in again.points] == [p.run_id for p in first.points]
    runs = _experiment_runs(first.tracking_location, "scoring")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [first.run_id]
    children = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == first.run_id)
    assert children == ["acc=0.6,stderr=0.04", "acc=0.7"] and len(runs) == 3


# --------------------------------------------------------------------------- item 14: readable sweeps

def test_the_sweep_parent_holds_the_compared_metrics_and_children_their_results(write_spec):
    from datamill.comparison import comparison

    result = datamill.run(write_spec(SWEEP))
    compared = comparison(result)
    assert compared.rows == ["acc=0.6,stderr=0.04", "acc=0.7", "base"] and compared.columns == ["score.demo_task.acc"]
    assert compared.values == [[0.6], [0.7], [0.5]]
    # a normal interval from each step's acc_stderr, where there is one (no per-example scores: no test)
    assert compared.intervals == [[pytest.approx((0.6 - 1.96 * 0.04, 0.6 + 1.96 * 0.04))], [None],
                                  [pytest.approx((0.5 - 1.96 * 0.05, 0.5 + 1.96 * 0.05))]]
    assert not compared.has_tests()

    client = mlflow.MlflowClient(tracking_uri=result.tracking_location)
    parent = client.get_run(result.run_id).data
    # a metric's value for every point sorts together; labels made valid keys ("=", "," are not allowed)
    assert {k: v for k, v in parent.metrics.items() if ".ci_" not in k} == {
        "score.demo_task.acc/acc_0.6_stderr_0.04": 0.6, "score.demo_task.acc/acc_0.7": 0.7,
        "score.demo_task.acc/base": 0.5}
    assert parent.metrics["score.demo_task.acc.ci_low/base"] == pytest.approx(0.5 - 1.96 * 0.05)
    assert parent.tags["datamill.role"] == "sweep" and "datamill.point" not in parent.tags
    # the parent is every point: its params and spec say which fields are swept, not point 1's values
    assert parent.params["steps.score.scored.acc"] == "(swept: see sweep)"
    assert parent.params["steps.base.scored.acc"] == "0.5"
    spec_text = client.download_artifacts(result.run_id, "spec.yaml")
    assert "acc: '(swept: see sweep)'" in Path(spec_text).read_text()

    child = client.get_run(result.points[0].run_id).data
    assert child.tags["datamill.point"] == "acc=0.6,stderr=0.04"
    assert set(child.metrics) == {"base.tasks.demo_task.acc", "base.tasks.demo_task.acc_stderr",
                                  "score.tasks.demo_task.acc", "score.tasks.demo_task.acc_stderr"}
    # row counts and timings are the steps' bookkeeping: tags, beside each step's key
    assert child.tags["step.nums.rows.main"] == "4" and child.tags["step.score.rows.main"] == "4"
    assert float(child.tags["step.score.seconds"]) >= 0 and child.tags["step.score.key"]
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "comparison")}
    assert artifacts == {"comparison/comparison.png", "comparison/comparison_bars.png"}


def test_comparison_bars_keep_long_titles_inside_the_figure_and_draw_error_bars(tmp_path, monkeypatch):
    from matplotlib.container import ErrorbarContainer

    from datamill import plots

    drawn = {}
    save = plots._save

    def save_and_measure(fig, path):  # what the saved PNG shows, measured before the figure closes
        out = save(fig, path)
        renderer = fig.canvas.get_renderer()
        drawn["figure"] = fig.bbox
        drawn["titles"] = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.title.get_text()]
        drawn["suptitle"] = fig.get_suptitle()
        drawn["error_bars"] = [sum(len(c.lines[2][0].get_segments()) for c in ax.containers
                                   if isinstance(c, ErrorbarContainer)) for ax in fig.axes if ax.title.get_text()]
        return out

    monkeypatch.setattr(plots, "_save", save_and_measure)
    rows = ["method=random", "method=zipfit", "method=less,model=smol", "base"]
    # long names first and last in a row of four: drawn on one line, the last ran off the figure
    columns = ["score.tasks.datamill_capitals_mc_with_a_much_longer_task_name.acc_norm",
               "score.datamill_capitals_exact.exact_match", "pick.target_family_precision",
               "score.tasks.datamill_units_mc_with_an_even_longer_task_name.acc_norm", "score.datamill_units_mc.acc"]
    values = [[0.16, 0.41, 0.1, 0.53, 0.3], [0.44, 0.45, 1.0, 0.61, 0.35], [0.56, 0.52, 0.8, 0.61, 0.31],
              [0.44, 0.44, None, 0.57, 0.3]]
    errors = [[0.06, 0.05, None, None, 0.04], [0.08, 0.05, None, None, 0.04], [0.08, 0.05, None, None, 0.04],
              [0.08, 0.05, None, None, None]]
    intervals = [[None if e is None else (v - 1.96 * e, v + 1.96 * e) for v, e in zip(vs, es)]
                 for vs, es in zip(values, errors)]
    path = plots.bars(tmp_path / "comparison_bars.png", rows, columns, values, intervals=intervals, muted={"base"},
                      title="3 sweep points (grey: base)")
    assert path.stat().st_size > 10_000

    figure = drawn["figure"]
    assert len(drawn["titles"]) == len(columns)
    for box in drawn["titles"]:
        assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and figure.y0 <= box.y0 and box.y1 <= figure.y1, box
    for i, box in enumerate(drawn["titles"]):
        assert not any(box.overlaps(other) for other in drawn["titles"][i + 1:])  # no title runs into the next
    assert drawn["error_bars"] == [4, 4, 0, 0, 3]  # a bar per row with an interval, none elsewhere
    assert "95% intervals" in drawn["suptitle"]
