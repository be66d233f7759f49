"""`module:function` in a spec: only the spec's own modules (its folder, its `code:` folders) and
installed datamill plugins' entry points; never arbitrary installed code such as subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import datamill
from datamill.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "datamill.cli"]


def polars_spec(function: str, args: str = "{}", extra: str = "", input: str = "tasks") -> str:
    return (f"name: t\ntracking: {{enabled: false}}\n{extra}sources:\n  tasks: {{path: data/tasks.jsonl}}\n"
            f"steps:\n  x:\n    polars: {{function: '{function}', input: {input}, args: {args}}}\n")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd)


RULE = ("is not allowed: a spec may call functions from modules in its own folder ({folder}) or the folders "
        "listed in `code:`, or installed datamill plugins (entry points datamill.*); '{module}' is not one of them")


@pytest.mark.parametrize("function", ["subprocess:getoutput", "os:system", "builtins:eval", "json:loads"])
def test_installed_modules_are_refused_and_nothing_runs(write_spec, function):
    # input: [] calls the function with the args alone: subprocess.getoutput(cmd="touch ...")
    marker = write_spec("", name="spec.yaml").parent / "ran"
    spec = write_spec(polars_spec(function, args=f"{{cmd: 'touch {marker}'}}", input="[]"))
    for command in ("validate", "run"):
        out = cli(command, str(spec), cwd=spec.parent)
        assert out.returncode == 2, out.stderr
        assert "spec.yaml:7" in out.stderr and "steps.x.polars.function" in out.stderr
        rule = RULE.format(folder=spec.parent.resolve(), module=function.split(":")[0])
        assert f"'{function}' {rule}" in out.stderr
        assert "internal error" not in out.stderr
    assert not marker.exists()  # the shell command never ran


def test_a_module_in_the_spec_folder_wins_over_an_installed_one_of_the_same_name(write_spec):
    # `json.py` next to the spec is the spec's own module: it is used, not the standard library's,
    # and the standard library's json stays what it was for everyone else.
    import json

    write_spec("import polars as pl\n\ndef loads(df):\n    return df.head(1).with_columns(pl.lit('mine').alias('who'))\n",
               name="json.py")
    result = datamill.run(write_spec(polars_spec("json:loads")))
    assert result.table("x")["who"].to_list() == ["mine"]
    assert sys.modules["json"] is json and json.loads("[1]") == [1]


def test_a_module_in_a_code_folder_and_a_module_inside_a_package(write_spec, tmp_path):
    lib = tmp_path / "lib" / "cleaning"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "rules.py").write_text("from .limits import N\n\ndef first(df):\n    return df.head(N)\n")
    (lib / "limits.py").write_text("N = 2\n")
    spec = write_spec(polars_spec("cleaning.rules:first", extra="code: [lib]\n"))
    assert datamill.run(spec).table("x").height == 2
    (lib / "limits.py").write_text("N = 3\n")
    (lib / "rules.py").write_text("from .limits import N\n\ndef first(df):\n    return df.head(N)  # edited\n")
    result = datamill.run(spec)  # the edited module is hashed into the key and run afresh
    assert result.executed and result.table("x").height == 3
    # without `code:` the same reference is refused
    with pytest.raises(SpecError, match=r"'cleaning.rules' is not one of them"):
        datamill.run(write_spec(polars_spec("cleaning.rules:first"), name="other.yaml"))


def test_a_missing_code_folder_is_an_error_at_its_line(write_spec):
    spec = write_spec(polars_spec("transforms:keep_short", extra="code:\n  - lib\n  - nowhere\n"))
    (spec.parent / "lib").mkdir()
    out = cli("validate", str(spec), cwd=spec.parent)
    assert out.returncode == 2
    assert "spec.yaml:5" in out.stderr and "code.1: folder 'nowhere' does not exist" in out.stderr


def test_the_examples_polars_spec_still_validates(tmp_path):
    out = cli("validate", str(ROOT / "examples" / "polars.yaml"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_a_plugin_entry_point_may_be_named_but_nothing_else_of_its_module(write_spec, tmp_path, monkeypatch):
    # an installed plugin: a package plus its dist-info, exposing `myplug:shortest` as a select method
    site = tmp_path / "site"
    (site / "myplug").mkdir(parents=True)
    (site / "myplug" / "__init__.py").write_text(
        "def shortest(candidates, targets):\n    return [-len(c) for c in candidates]\n\n"
        "def head(df):\n    return df.head(1)\n")
    info = site / "myplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[datamill.selectors]\nshortest = myplug:shortest\n")
    monkeypatch.syspath_prepend(str(site))

    spec = write_spec("name: t\ntracking: {enabled: false}\nsources:\n  tasks: {path: data/tasks.jsonl}\n"
                      "steps:\n  pick:\n    select: {input: tasks, target: tasks, method: 'myplug:shortest', budget: 3}\n")
    picked = datamill.run(spec).table("pick")
    assert picked.height == 3
    with pytest.raises(SpecError, match=r"'myplug:head' is not allowed: .*'myplug' is not one of them"):
        datamill.run(write_spec(polars_spec("myplug:head"), name="other.yaml"))


def test_lm_eval_task_folders_come_only_from_the_specs_own_folders(tmp_path):
    """A task YAML may run Python (`!function module.fn`): a folder outside the spec's folder is
    refused at validate, unless the spec lists it under `code:`."""
    import shutil

    from evals.harness import SHIPPED_TASKS

    outside = tmp_path / "elsewhere" / "tasks"
    shutil.copytree(SHIPPED_TASKS, outside)
    folder = tmp_path / "project"
    folder.mkdir()
    step = ("steps:\n  score:\n    evaluate: {model: m, tasks: [datamill_capitals_mc], "
            f"include_path: ['{outside}']}}\n")
    spec = folder / "spec.yaml"
    spec.write_text("name: t\nmodels: {m: builtin:tiny-llama}\n" + step)
    out = cli("validate", str(spec), cwd=folder)
    assert out.returncode == 2, out.stderr
    assert "spec.yaml:5" in out.stderr and "steps.score.evaluate.include_path.0" in out.stderr
    assert "outside the spec's folder" in out.stderr and "`!function`" in out.stderr
    spec.write_text(f"name: t\ncode: ['{outside.parent}']\nmodels: {{m: builtin:tiny-llama}}\n" + step)
    out = cli("validate", str(spec), cwd=folder)
    assert out.returncode == 0, out.stderr
