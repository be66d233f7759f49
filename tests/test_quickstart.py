"""examples/quickstart.yaml end to end, reduced to seconds: the real spec file, changed only by
`--set` overrides (tiny random Llama, generation through the fake OpenAI server, fewer rows and
steps). One uninterrupted run is the reference; a second workspace is SIGKILLed during
generation, training and selection, resumed each time, and must end with the same tables and
metrics."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fake_openai_server import FakeServer

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUICKSTART = EXAMPLES / "quickstart.yaml"
METHODS = {"random", "zipfit", "density", "less"}
GENQA_N = 12
SFT_STEPS = 4
# Timing columns of the training log: throughput, never equal between two runs.
TIMING_COLUMNS = {"sft__log": ["tokens_per_s", "loss_tokens_per_s"]}


def reduced_overrides(spec: Path, base_url: str) -> list[str]:
    """The quickstart made small; everything else stays as the file says."""
    doc = yaml.safe_load(spec.read_text())
    sweep = copy.deepcopy(doc["sweep"])
    methods = sweep["steps.pick.select.method"]
    params = sweep["steps.pick.select.params"]
    # The sweep's keys hold dots, so its LESS params can only be changed by replacing the whole
    # sweep (built from the file's own, with a small projection and one warmup epoch).
    less = methods.index("less")
    # (the file's lora_targets name SmolLM2's top layers; the tiny Llama has two layers)
    params[less] = {**params[less], "epochs": 1, "proj_dim": 64, "max_len": 64, "lora_targets": ["q_proj", "v_proj"]}
    return [
        "models.smol=builtin:tiny-llama",
        "steps.genqa.generate.backend=openai",
        f"steps.genqa.generate.openai.base_url={base_url}",
        "steps.genqa.generate.openai.max_in_flight=2",  # not in the key: lets the kill test slow it down
        f"steps.genqa.generate.n={GENQA_N}",
        "sources.tasks.n=70",
        "steps.pick.select.budget=10",
        "sweep=" + json.dumps(sweep),
        # A checkpoint after every step, so that the kill test can stop training between two.
        f"steps.sft.train.max_steps={SFT_STEPS}",
        "steps.sft.train.checkpoint_every=1",
        *(f"steps.{step}.evaluate.{field}=5" for step in ("base", "score") for field in ("limit", "max_examples")),
        # The fake server answers "Answer: <seed>" (1-2 characters): the quickstart's rule
        # `length(messages[-1].content) >= 12` in steps.cleaned drops every GenQA row. Keep its
        # other half (the answer must not restate the question) so that GenQA rows reach selection.
        "steps.cleaned.sql=SELECT * FROM pool WHERE family <> 'genqa' "
        "OR lower(messages[-1].content) <> lower(messages[1].content)",
    ]


def copy_quickstart(folder: Path, source: Path = QUICKSTART) -> Path:
    """The spec and the prompt files it names, in a folder of their own (the workspace lands there)."""
    folder.mkdir(parents=True)
    shutil.copy(source, folder / "quickstart.yaml")
    shutil.copytree(source.parent / "prompts", folder / "prompts")
    return folder / "quickstart.yaml"


def labels_by_method(spec: Path, overrides: list[str]) -> dict[str, str]:
    """Sweep point label ("method=less", or "method=less,model=smol" when the sweep sets more
    plain values) of each method, in the sweep's order."""
    import datamill

    labels = [p.resolved.label for p in datamill.plans(spec, overrides)]
    by_method = {label.split(",")[0].removeprefix("method="): label for label in labels}
    assert set(by_method) == METHODS and len(labels) == len(METHODS), labels
    return by_method


def point_tables(spec: Path, overrides: list[str]) -> dict[str, dict]:
    """{point label: {table name: DataFrame}} of the tables compared after a resume."""
    import polars as pl

    import datamill

    out = {}
    for plan in datamill.plans(spec, overrides):
        tables = {}
        for name, side in [("genqa", "main"), ("deduped", "main"), ("pick", "main"), ("pick", "scores"),
                           ("sft", "main"), ("sft", "log"), ("base", "main"), ("score", "main")]:
            key = plan.by_name(name).key
            assert plan.workspace.is_cached(key), f"{plan.resolved.label}: {name} did not finish"
            table = name if side == "main" else f"{name}__{side}"
            tables[table] = pl.read_parquet(plan.workspace.table_path(key, side)).drop(TIMING_COLUMNS.get(table, []))
        out[plan.resolved.label] = tables
    return out


def children_of(client, experiment_id: str, parent_id: str) -> dict:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.info.run_name: r for r in runs}


def eval_metrics(run) -> dict[str, float]:
    """The `score` step's eval results logged on a child run (its timings left out)."""
    return {k: v for k, v in run.data.metrics.items()
            if k.startswith("score.") and "seconds" not in k and not k.endswith("_per_s")}


@pytest.fixture(scope="module")
def server():
    with FakeServer() as fake:
        yield fake


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    """The tiny Llama built once for the module; offline; rich tables not wrapped."""
    from datamill.models import resolve_model

    cache = tmp_path_factory.mktemp("models")
    resolve_model("builtin:tiny-llama", base_dir=Path("."), cache_dir=cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATAMILL_MODEL_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("COLUMNS", "1000")
        yield dict(os.environ)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, server, environment):
    """The reduced quickstart run once, uninterrupted, through the CLI."""
    from typer.testing import CliRunner

    from datamill.cli import app

    spec = copy_quickstart(tmp_path_factory.mktemp("quickstart") / "reference")
    overrides = reduced_overrides(spec, server.base_url)
    out = CliRunner().invoke(app, ["run", str(spec), *[a for o in overrides for a in ("--set", o)]])
    assert out.exit_code == 0, f"{out.output[-4000:]}\n{out.exception!r}"
    return {"spec": spec, "overrides": overrides, "output": out.output}


# --------------------------------------------------------------------------- end to end


def test_reduced_quickstart_end_to_end(reference):
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    import datamill
    from datamill.cli import app
    from datamill.lineage import lineage

    spec, overrides = reference["spec"], reference["overrides"]
    store = spec.parent.resolve() / ".datamill"

    # --- what the CLI printed last: the comparison table (a row per method, then base), then where MLflow is
    lines = [line.rstrip() for line in reference["output"].splitlines() if line.strip()]
    assert lines[-1].startswith("MLflow: ") and f"sqlite:///{store / 'mlflow.db'}" in lines[-1], lines[-5:]
    assert lines[-3].startswith("finished") and lines[-2].startswith("tables: "), lines[-5:]
    last_step = max(i for i, line in enumerate(lines) if line.lstrip().startswith(("done", "cached", "running")))
    table = lines[last_step + 1:-3]
    assert table and "sweep points" in table[0], "\n".join(lines[last_step:])
    labelled = [line.split("│")[1].split()[0] for line in table if line.startswith("│")]  # body rows' first cell
    by_method = labels_by_method(spec, overrides)
    # every label starts "method=": the table's first column is "method", its cells the rest
    shown = [label.removeprefix("method=") for label in by_method.values()]
    assert labelled[-len(METHODS) - 1:] == [*shown, "base"], table  # "base (ref)": the same in every point
    assert any("(ref)" in line for line in table) and any("±" in line for line in table), table
    assert any(line.startswith("paired tests against base") for line in table), table
    assert any("exact_match" in line for line in table), table  # the eval metrics are its columns (short names)

    # --- MLflow: a sweep parent, a child per method, all finished
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(yaml.safe_load(spec.read_text())["name"])
    parent = client.get_run(re.search(r" run ([0-9a-f]{32}) ", lines[-1]).group(1))
    assert parent.data.tags["datamill.role"] == "sweep" and "mlflow.parentRunId" not in parent.data.tags
    children = children_of(client, experiment.experiment_id, parent.info.run_id)
    assert set(children) == set(by_method.values())  # method=random, method=zipfit, ...
    runs = [parent, *children.values()]
    assert all(r.info.status == "FINISHED" for r in runs), {r.info.run_name: r.info.status for r in runs}
    for name, child in children.items():
        metrics = child.data.metrics
        assert any(k.startswith("score.tasks.datamill_capitals_exact.") for k in metrics), (name, sorted(metrics))
        assert any(k.startswith("score.tasks.byod_") for k in metrics), (name, sorted(metrics))
        assert "sft.loss" in metrics and "sft.final_loss" in metrics, (name, sorted(metrics))
        assert len(client.get_metric_history(child.info.run_id, "sft.loss")) == SFT_STEPS
        assert "pick.target_family_precision" in metrics and "pick.selected" in metrics, (name, sorted(metrics))
        artifacts = {a.path for folder in ("sft", "pick") for a in client.list_artifacts(child.info.run_id, folder)}
        assert {"sft/loss_curve.png", "pick/scores.png"} <= artifacts, (name, artifacts)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} >= {
        "comparison/comparison.png", "comparison/comparison_bars.png"}

    # --- an unchanged re-run executes nothing
    result = datamill.run(spec, overrides)
    assert result.executed == []
    labels = [p.label for p in result.points]

    # --- lineage of one generated row: generation -> each selector's decision -> training -> eval
    picked = {label: result.table("pick", point=i)["id"].to_list() for i, label in enumerate(labels)}
    nearest = {label: set(result.table("score", point=i)["nearest_train_id"].drop_nulls().to_list())
               for i, label in enumerate(labels)}
    genqa = datamill.open(result.workspace.root).sql(  # the deduplicated rows, unquoted
        'SELECT id FROM genqa WHERE id IN (SELECT id FROM deduped)')["id"].to_list()
    candidates = [i for i in genqa if any(i in ids for ids in picked.values())]
    assert candidates, f"no selector picked any of the {len(genqa)} GenQA rows that survived cleaning and dedup"
    # prefer a GenQA row that is also some eval example's nearest training row
    row_id = next((i for i in candidates if any(i in nearest[label] for label in labels)), candidates[0])

    hits = lineage(spec, row_id, overrides)
    generated = [h for h in hits if h["table"] == "genqa"]
    assert len(generated) == 1 and generated[0]["point"] == ""  # shared by every point
    prompt_files = yaml.safe_load(spec.read_text())["steps"]["genqa"]["generate"]["prompts"]
    prompt_names = {yaml.safe_load((spec.parent / p).read_text()).get("name", Path(p).stem) for p in prompt_files}
    provenance = generated[0]["row"]
    assert provenance["gen_prompt"] in prompt_names and provenance["gen_model"] == "smol"
    assert provenance["gen_seed"] is not None and provenance["source"]
    assert {("", "pool"), ("", "deduped")} <= {(h["point"], h["table"]) for h in hits}
    decisions = {h["point"]: h["row"] for h in hits if h["table"] == "pick__scores"}
    assert set(decisions) == set(labels)  # each selector's decision on this row
    chose = {label for label, row in decisions.items() if row["selected"]}
    assert chose == {label for label in labels if row_id in picked[label]} and chose
    trained = {h["point"] for h in hits if h["table"] == "sft"}
    assert trained == chose  # the training table of every model that saw it, and only those

    out = CliRunner().invoke(app, ["lineage", str(spec), row_id, "--json",
                                   *[a for o in overrides for a in ("--set", o)]])
    assert out.exit_code == 0, out.output
    assert [json.loads(line)["table"] for line in out.stdout.splitlines()] == [h["table"] for h in hits]

    # eval examples nearest to a selected row show up in its lineage (the GenQA row's when it is
    # some eval example's nearest training row, else another selected row's)
    near_label = next((label for label in chose if row_id in nearest[label]), None)
    near_id = row_id
    if near_label is None:
        near_label = labels[0]
        near_id = sorted(nearest[near_label])[0]
        hits = lineage(spec, near_id, overrides)
    near = [h for h in hits if h["match"] == "nearest_train_id" and h["point"] == near_label]
    assert near and all(h["table"] == "score" and h["row"]["nearest_train_id"] == near_id for h in near)
    assert near_id in picked[near_label]


# --------------------------------------------------------------------------- kill and resume


def _shard_lines(workspace: Path) -> int:
    lines = 0
    for shard in workspace.glob("shared/generate/openai/*/shard-*.jsonl"):
        lines += sum(1 for line in shard.read_text().splitlines() if line.endswith("}"))
    return lines


def _run_and_kill(spec: Path, overrides: list[str], env: dict, log: Path, ready, what: str, timeout_s: float = 150):
    """Start `datamill run` in its own process group and SIGKILL the group once `ready()`."""
    cmd = [sys.executable, "-m", "datamill.cli", "run", str(spec), *[a for o in overrides for a in ("--set", o)]]
    with open(log, "ab") as out:
        out.write(f"\n===== {time.strftime('%H:%M:%S')} a run to be killed {what}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, cwd=spec.parent, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while not ready():
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed {what}:\n"
                                f"{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"not {what} after {timeout_s} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"{what}: rc {proc.returncode}\n{log.read_text()[-3000:]}"


def test_sigkill_at_three_points_then_rerun_equals_an_uninterrupted_run(reference, server, environment, tmp_path):
    from mlflow import MlflowClient

    import datamill
    from datamill.comparison import comparison

    rng = random.Random(20240607)
    overrides = reference["overrides"]  # same server, so the same keys as the reference
    spec = copy_quickstart(tmp_path / "killed", reference["spec"])  # the reference's text, whatever the file says now
    log = tmp_path / "runs.log"
    plans = datamill.plans(spec, overrides)
    workspace = plans[0].workspace
    ws = workspace.root
    by_label = {p.resolved.label: p for p in plans}
    labels = labels_by_method(spec, overrides)
    first, less = plans[0], by_label[labels["less"]]
    genqa_key = first.by_name("genqa").key
    sft_key = first.by_name("sft").key  # the first point's training
    pick_key = less.by_name("pick").key  # LESS: the slowest selector

    # 1. during generation: a slow server (0.3-0.5 s a request, 2 in flight), killed after a few answers
    server.delay_s = rng.uniform(0.3, 0.5)
    answered = rng.randint(3, 6)
    try:
        _run_and_kill(spec, overrides, environment, log, lambda: _shard_lines(ws) >= answered, "during generation")
    finally:
        server.delay_s = 0.0
    assert answered <= _shard_lines(ws) < GENQA_N and not workspace.is_cached(genqa_key)

    # 2. during training: after its first checkpoint, before its last step
    checkpoints = ws / "steps" / ".state" / sft_key / "checkpoints"
    _run_and_kill(spec, overrides, environment, log, lambda: any(checkpoints.glob("step-*")), "during training")
    assert workspace.is_cached(genqa_key) and not workspace.is_cached(sft_key)
    assert workspace.meta(genqa_key)["stats"]["requests_cached"] >= answered  # resumed, not redone

    # 3. during selection: LESS's warmup is done, its gradient features are being computed
    def selecting() -> bool:
        return any((ws / "steps" / ".tmp").glob(f"{pick_key}-*")) and any(
            (ws / "shared" / "select" / "less").glob("*/warmup/done.json"))

    _run_and_kill(spec, overrides, environment, log, selecting, "during selection")
    assert workspace.is_cached(sft_key) and not workspace.is_cached(pick_key)
    assert workspace.meta(sft_key)["stats"]["resumed_from_step"] >= 1  # training went on from its checkpoint

    # the last run goes uninterrupted: it only has the LESS point's selection, training and eval left
    resumed = datamill.run(spec, overrides)
    assert sorted(item.split("@")[0] for item in resumed.executed) == ["pick", "score", "sft"], resumed.executed
    assert resumed.executed[0] == f"pick@{pick_key}"

    # --- every point's tables equal the uninterrupted run's
    expected, got = point_tables(reference["spec"], overrides), point_tables(spec, overrides)
    assert set(got) == set(expected) == set(labels.values())
    for label in expected:
        for name, frame in expected[label].items():
            other = got[label][name]
            assert other.columns == frame.columns, (label, name)
            assert other.equals(frame), f"{label}: table {name} differs after kill and resume"

    # --- the comparison and the eval metrics of each child run equal the reference's
    clean = datamill.run(reference["spec"], overrides)  # everything cached: the reference's RunResult
    assert clean.executed == []
    a, b = comparison(clean), comparison(resumed)
    assert (a.rows, a.columns, a.values) == (b.rows, b.columns, b.values)
    ref_client = MlflowClient(tracking_uri=clean.tracking_location)
    client = MlflowClient(tracking_uri=resumed.tracking_location)
    name = yaml.safe_load(spec.read_text())["name"]
    ref_children = children_of(ref_client, ref_client.get_experiment_by_name(name).experiment_id, clean.run_id)
    experiment = client.get_experiment_by_name(name).experiment_id
    new_children = children_of(client, experiment, resumed.run_id)
    assert set(new_children) == set(ref_children) == set(labels.values())
    for label, run in ref_children.items():
        assert eval_metrics(run), label
        assert eval_metrics(new_children[label]) == eval_metrics(run), label

    # --- nothing is left RUNNING: the three killed runs were closed by the next start
    runs = client.search_runs([experiment], max_results=1000)
    statuses = {r.info.run_id: (r.info.run_name, r.info.status) for r in runs}
    assert not [s for s in statuses.values() if s[1] == "RUNNING"], statuses
    killed_parents = [r for r in runs if r.data.tags.get("datamill.role") == "sweep" and r.info.status == "KILLED"]
    assert len(killed_parents) == 3, statuses
    assert all(r.data.tags.get("datamill.closed_by") for r in killed_parents)
