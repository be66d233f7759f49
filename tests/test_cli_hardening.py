"""Issue 16: damaged cached outputs are run again; `sql`, `lineage` and `path` read the spec as given
(--set, --point); every run ends with its results and model folders; command-line polish."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import datamill
from datamill.registry import register_step
from datamill.step import Step, StepConfig


class FakeModelConfig(StepConfig):
    data: str


@register_step
class FakeModelStep(Step):
    """A "training" step: writes a model folder (config + weights bytes) and a final loss (tests)."""

    kind = "fake_model"
    Config = FakeModelConfig
    produces_model = True

    def input_tables(self):
        return [(("data",), self.config.data)]

    def run(self, ctx) -> None:
        rows = ctx.read(self.config.data).height
        ctx.model_dir.mkdir(parents=True)
        (ctx.model_dir / "config.json").write_text(json.dumps({"rows": rows}))
        (ctx.model_dir / "model.safetensors").write_bytes(b"\0" * 256)
        ctx.stats["final_loss"] = 1.5


PIPELINE = """\
name: t
tracking: {enabled: false}
sources:
  tasks: {path: data/tasks.jsonl}
steps:
  pool:
    sql: SELECT * FROM tasks WHERE family <> 'reverse'
  pick:
    sql: {query: SELECT * FROM pool ORDER BY id LIMIT 50}
"""
SWEEP = PIPELINE + """\
sweep:
  steps.pick.sql.query: [SELECT * FROM pool ORDER BY id LIMIT 50, SELECT * FROM pool ORDER BY id LIMIT 30]
"""
LABEL_50 = "query=SELECT * FROM pool ORDER BY id LIMIT 50"
LABEL_30 = "query=SELECT * FROM pool ORDER BY id LIMIT 30"
MODEL = PIPELINE + """\
  sft: {fake_model: {data: pick}}
  score: {scored: {input: pick, acc: 0.625}}
"""


@pytest.fixture
def cli(monkeypatch, capsys):
    """cli(*args) -> (exit code, stdout, stderr) of `datamill ARGS`, run through main() as the
    console script runs it (exit codes, messages, flags moved before the subcommand)."""
    from datamill.cli import main

    monkeypatch.setenv("COLUMNS", "250")  # rich wraps long lines at 80 columns otherwise

    def invoke(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["datamill", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    return invoke


def step_key(path, name: str, overrides=None, point: int = 0) -> str:
    return datamill.plans(path, overrides)[point].by_name(name).key


# --------------------------------------------------------------------------- damaged cache


def test_a_truncated_cached_table_is_reported_and_run_again(write_spec, cli):
    from datamill.plan import describe

    path = write_spec(PIPELINE)
    first = datamill.run(path)
    (plan,) = datamill.plans(path)
    table = plan.workspace.table_path(plan.by_name("pool").key)
    with open(table, "r+b") as f:
        f.truncate(100)

    rows = {row["name"]: row for row in describe(plan)}
    assert rows["pool"]["status"] == "damaged" and "100 bytes" in rows["pool"]["damaged"]
    assert rows["tasks"]["status"] == "cached"
    code, out, _ = cli("plan", path)
    assert code == 0 and "to run (damaged)" in out and "damaged: pool: tables/main.parquet is 100 bytes" in out

    code, _, err = cli("run", path)
    assert code == 0, err
    assert re.search(r"damaged\s+pool: tables/main\.parquet is 100 bytes, \d+ when written; running it again", err)
    assert "cached  pick" in err  # its output was whole: reused
    assert datamill.run(path).executed == []
    assert datamill.run(path).table("pick").equals(first.table("pick"))


def test_an_old_meta_without_sizes_still_catches_a_table_that_is_not_parquet(write_spec):
    path = write_spec(PIPELINE)
    datamill.run(path)
    (plan,) = datamill.plans(path)
    ws, key = plan.workspace, plan.by_name("pool").key
    meta_path = ws.step_dir(key) / "meta.json"
    meta = json.loads(meta_path.read_text())
    for info in meta["tables"].values():
        del info["bytes"]  # as written before sizes were recorded
    meta_path.write_text(json.dumps(meta))
    assert ws.is_cached(key)
    data = ws.table_path(key).read_bytes()
    ws.table_path(key).write_bytes(data[: len(data) // 2])
    assert not ws.is_cached(key) and "PAR1" in ws.damaged(key)
    assert [name.split("@")[0] for name in datamill.run(path).executed] == ["pool"]


def test_a_model_missing_a_file_is_damaged(write_spec):
    path = write_spec(MODEL)
    datamill.run(path)
    (plan,) = datamill.plans(path)
    ws, key = plan.workspace, plan.by_name("sft").key
    model = ws.step_dir(key) / "model"
    (model / "config.json").unlink()
    assert ws.damaged(key) == "model/config.json is missing"
    assert [name.split("@")[0] for name in datamill.run(path).executed] == ["sft"]
    assert (model / "config.json").is_file() and ws.damaged(key) is None

    # a meta written before model file sizes were recorded: config and weights must be there
    meta_path = ws.step_dir(key) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["model_files"]
    meta_path.write_text(json.dumps(meta))
    assert ws.damaged(key) is None
    (model / "model.safetensors").unlink()
    assert "no weights file" in ws.damaged(key)


# --------------------------------------------------------------------------- sql: the spec as given


def test_sql_reads_the_spec_as_given_not_the_last_run(write_spec, cli):
    path = write_spec(PIPELINE)
    thirty = "steps.pick.sql.query=SELECT * FROM pool ORDER BY id LIMIT 30"
    datamill.run(path)
    datamill.run(path, [thirty])  # the catalog now points at this run's tables
    code, out, err = cli("sql", path, "SELECT count(*) AS n FROM pick")
    assert code == 0, err
    assert re.search(r"│\s*50\s*│", out)
    code, out, err = cli("sql", path, "SELECT count(*) AS n FROM pick", "--set", thirty)
    assert code == 0 and re.search(r"│\s*30\s*│", out)

    code, out, err = cli("sql", path, "SELECT count(*) FROM pick", "--set", thirty.replace("30", "7"))
    assert code == 2
    assert ("table 'pick' (step pick) has not been run for this spec as given (--set 'steps.pick.sql.query="
            "SELECT * FROM pool ORDER BY id LIMIT 7'): run `datamill run") in err
    # tables the query does not read need not have run
    code, out, err = cli("sql", path, "SELECT count(*) AS n FROM pool", "--set", thirty.replace("30", "7"))
    assert code == 0 and re.search(r"│\s*111\s*│", out)


def test_sql_on_a_sweep_needs_a_point_for_tables_that_differ(write_spec, cli):
    path = write_spec(SWEEP)
    datamill.run(path)
    code, _, err = cli("sql", path, "SELECT count(*) FROM pick")
    assert code == 2
    assert "table 'pick' differs between the sweep's points" in err
    assert LABEL_50 in err and f'"pick@{LABEL_30}"' in err
    for point in (LABEL_50, "query=SELECT * FROM pool ORDER BY id LIMIT 50"):
        code, out, err = cli("sql", path, "SELECT count(*) AS n FROM pick", "--point", point)
        assert code == 0 and re.search(r"│\s*50\s*│", out), err
    code, out, err = cli("sql", path, f'SELECT count(*) AS n FROM "pick@{LABEL_30}"')
    assert code == 0 and re.search(r"│\s*30\s*│", out), err
    code, out, err = cli("sql", path, "SELECT count(*) AS n FROM pool")  # the same in every point
    assert code == 0 and re.search(r"│\s*111\s*│", out), err
    code, _, err = cli("sql", path, "SELECT 1", "--point", "query=nope")
    assert code == 2 and "--point query=nope: matches no point" in err and LABEL_30 in err


def test_sql_errors_are_the_users_and_reads_stay_in_the_workspace(write_spec, cli):
    path = write_spec(PIPELINE)
    datamill.run(path)
    code, _, err = cli("sql", path, "SELECT * FROM pik")
    assert code == 2 and "Catalog Error: Table with name pik does not exist!" in err and 'Did you mean "pick"' in err
    code, _, err = cli("sql", path, "SELEC 1")
    assert code == 2 and "Parser Error" in err and "internal error" not in err
    code, _, err = cli("sql", path, "SELECT * FROM read_csv('/etc/passwd')")
    assert code == 2 and "Permission Error" in err


# --------------------------------------------------------------------------- path, results


def test_path_prints_a_steps_output_folder(write_spec, cli):
    path = write_spec(MODEL)
    code, _, err = cli("path", path, "pick")
    assert code == 2 and "step 'pick' has not been run for this spec as given: run `datamill run" in err
    datamill.run(path)
    code, out, _ = cli("path", path, "pick")
    assert code == 0 and (Path(out.strip()) / "tables" / "main.parquet").is_file() and out.count("\n") == 1
    code, out, _ = cli("path", path, "sft")
    assert code == 0 and Path(out.strip()).name == "model" and (Path(out.strip()) / "config.json").is_file()
    code, _, err = cli("path", path, "pik")
    assert code == 2 and "no step 'pik'" in err and "did you mean 'pick'" in err


def test_path_on_a_sweep(write_spec, cli):
    path = write_spec(SWEEP)
    datamill.run(path)
    code, out, _ = cli("path", path, "pool")  # shared by the points
    assert code == 0 and Path(out.strip()).name == step_key(path, "pool")
    code, _, err = cli("path", path, "pick")
    assert code == 2 and "differs between the sweep's points" in err and LABEL_30 in err
    code, out, _ = cli("path", path, "pick", "--point", LABEL_30)
    assert code == 0 and Path(out.strip()).name == step_key(path, "pick", point=1)


def test_a_single_run_ends_with_its_results_and_model_folders(write_spec, cli):
    path = write_spec(MODEL)
    code, _, err = cli("run", path)
    assert code == 0, err
    assert "results" in err and re.search(r"score\s*│\s*demo_task\.acc\s*│\s*0\.625", err)
    assert re.search(r"sft\s*│\s*final_loss\s*│\s*1\.5", err)
    model = datamill.plans(path)[0].workspace.step_dir(step_key(path, "sft")) / "model"
    assert f"model sft: {model}" in err


# --------------------------------------------------------------------------- lineage


def test_lineage_writes_its_report_to_stdout_and_keeps_to_a_point(write_spec, cli):
    path = write_spec(SWEEP)
    result = datamill.run(path)
    row_id = result.table("pick", point=1)["id"][0]  # in both points' picks
    code, out, err = cli("lineage", path, row_id)
    assert code == 0 and "pick" in out and "tasks" in out and "\x1b[" not in out
    assert f"[{LABEL_50}] pick" in out and f"[{LABEL_30}] pick" in out
    code, out, _ = cli("lineage", path, row_id, "--point", LABEL_30)
    assert code == 0 and f"[{LABEL_30}] pick" in out and LABEL_50 not in out and "tasks" in out


# --------------------------------------------------------------------------- flags


def test_version_and_global_flags_after_the_subcommand(write_spec, cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"datamill {datamill.__version__}"
    path = write_spec(PIPELINE)
    code, out, err = cli("validate", path, "-q")
    assert code == 0 and "ok" in out
    bad = write_spec(PIPELINE.replace("tasks.jsonl", "missing.jsonl"), name="bad.yaml")
    code, _, err = cli("validate", bad)
    assert code == 2 and "Traceback" not in err
    from datamill.errors import SpecError

    with pytest.raises(SpecError):  # --debug after the subcommand: the error is raised, traceback and all
        cli("validate", bad, "--debug")
    # an option's value is never taken for a flag
    code, _, err = cli("validate", path, "--set", "--debug")
    assert code == 2 and "--set --debug: expected PATH=VALUE" in err


def test_results_carry_their_95_percent_interval_where_a_stderr_is_known(write_spec, cli):
    path = write_spec(PIPELINE + "  score: {scored: {input: pick, acc: 0.6, stderr: 0.04}}\n"
                                 "  plain: {scored: {input: pick, acc: 0.5}}\n")
    code, _, err = cli("run", path)
    assert code == 0, err
    assert re.search(r"score\s*│\s*demo_task\.acc\s*│\s*0\.6±0\.078", err)  # 1.96 x 0.04
    assert re.search(r"plain\s*│\s*demo_task\.acc\s*│\s*0\.5\s*│", err)  # no stderr: the value alone
    assert "± half-width of the 95% interval (a bootstrap over examples; 1.96 x stderr where a step reports only " \
           "that)" in err
