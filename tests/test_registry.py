"""Issue 18: one `Registry[T]` behind every extension point (step kinds, trackers, stage functions,
selectors, generation backends, BYOD metrics, parsers); lists and schema enums come from it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import datamill
from datamill.api import plans
from datamill.errors import DatamillError, SpecError
from datamill.registry import Registry


def write_plugin(site, dist: str, group: str, entries: dict[str, str], modules: dict[str, str]) -> None:
    """An installed distribution `dist` in `site`: its modules and its entry points in `group`."""
    site.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))


# --------------------------------------------------------------------------- the generic registry


def test_a_builtin_placeholder_is_imported_on_first_get_only(tmp_path, monkeypatch):
    (tmp_path / "lazy_widget_module.py").write_text("def widget():\n    return 'made'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    widgets = Registry("widget", check=callable, builtins={"lazy": "lazy_widget_module:widget"})
    assert widgets.names() == ["lazy"] and "lazy" in widgets and widgets.is_builtin("lazy")
    assert "lazy_widget_module" not in sys.modules
    assert widgets.get("lazy")() == "made"
    assert "lazy_widget_module" in sys.modules
    monkeypatch.delitem(sys.modules, "lazy_widget_module")


def test_register_as_a_decorator_or_a_call_and_unregister():
    widgets = Registry("widget", check=callable, builtins={"join": "os.path:join"})

    @widgets.register("mine")
    def mine():
        return 1

    assert mine() == 1 and widgets.get("mine") is mine and widgets["mine"] is mine
    assert widgets.register("length", len) is len
    assert widgets.names() == ["join", "length", "mine"] and list(widgets) == widgets.names()
    widgets.register("join", len)  # shadows the built-in until unregistered
    assert widgets.get("join") is len and not widgets.is_builtin("join")
    for name in ("mine", "length", "join"):
        widgets.unregister(name)
    import os.path

    assert widgets.names() == ["join"] and widgets.get("join") is os.path.join and "mine" not in widgets


def test_an_entry_of_the_wrong_type_is_refused_with_what_was_expected():
    widgets = Registry("widget", check=dict, builtins={"path": "os:path"})
    with pytest.raises(TypeError, match="widget 'three' must be a dict, not 3"):
        widgets.register("three", 3)
    with pytest.raises(SpecError, match="widget 'path' must be a dict, not <module 'posixpath'|widget 'path' must be a dict"):
        widgets.get("path")
    classes = Registry("backend", check=lambda obj: isinstance(obj, type), expects="a class")
    with pytest.raises(TypeError, match="backend 'f' must be a class, not <function"):
        classes.register("f", lambda: None)


def test_an_unknown_name_gets_the_closest_and_all_names():
    from selection.methods import SELECTORS, selector

    with pytest.raises(SpecError, match=r"unknown selection method 'zipfti'; did you mean 'zipfit'\? "
                                        r"\(available: density, dsir, length, less, perplexity, random, zipfit"):
        selector("zipfti")
    with pytest.raises(ValueError, match="did you mean 'zipfit'"):
        SELECTORS.validate("zipfti")
    with pytest.raises(DatamillError, match=r"unknown stage function 'fine_tun'; did you mean 'fine_tune'\?.*"
                                            r"is datamill installed"):
        datamill.registry.function("fine_tun")


def test_a_broken_plugin_is_reported_and_breaks_nothing_else(tmp_path, monkeypatch):
    group = "datamill.test_widgets"
    write_plugin(tmp_path, "widgets", group, {"good": "good_widget_plugin:make", "bad": "bad_widget_plugin:make"},
                 {"good_widget_plugin": "def make():\n    return 'good'\n",
                  "bad_widget_plugin": "raise ImportError('needs libwidget')\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    widgets = Registry("widget", group=group, check=callable, builtins={"join": "os.path:join"})
    assert widgets.names() == ["good", "join"]
    assert widgets.get("good")() == "good"
    assert "bad" in widgets and widgets.broken("bad") == "ImportError: needs libwidget"
    with pytest.raises(SpecError, match="widget 'bad' is installed but failed to import: ImportError: needs libwidget"):
        widgets.get("bad")
    with pytest.raises(ValueError, match="failed to import"):
        widgets.validate("bad")
    # a plugin installed after the first look is found when asked for
    write_plugin(tmp_path / "later", "late_widgets", group, {"late": "late_widget_plugin:make"},
                 {"late_widget_plugin": "def make():\n    return 'late'\n"})
    monkeypatch.syspath_prepend(str(tmp_path / "later"))
    assert widgets.get("late")() == "late" and "late" in widgets.names()


def test_a_name_field_checks_and_lists_the_names_when_used():
    from pydantic import BaseModel, ValidationError

    widgets = Registry("widget", check=callable, builtins={"join": "os.path:join"})
    Widget = widgets.name_type()

    class Config(BaseModel):
        one: Widget = "join"
        many: list[Widget] = []

    with pytest.raises(ValidationError, match="unknown widget 'lenght'"):
        Config(one="lenght")
    widgets.register("length", len)  # after the class was made: validated and listed all the same
    assert Config(one="length", many=["join", "length"]).model_dump() == {"one": "length", "many": ["join", "length"]}
    schema = Config.model_json_schema()["properties"]
    assert schema["one"]["enum"] == ["join", "length"] and schema["many"]["items"]["enum"] == ["join", "length"]


# --------------------------------------------------------------------------- every extension point


def test_every_extension_point_is_a_registry_and_the_lists_come_from_it():
    from datagen import backends
    from datagen.generate_step import GenerateConfig
    from datagen.parsing import PARSERS
    from datagen.prompt_library import PromptFile
    from datamill.registry import FUNCTIONS, STEPS, TRACKERS
    from datamill.spec import json_schema
    from evals import byod
    from selection.methods import SELECTORS

    for registry in (STEPS, TRACKERS, FUNCTIONS, SELECTORS, backends.REGISTRY, byod.METRICS, PARSERS):
        assert isinstance(registry, Registry) and registry.names()
    defs = json_schema()["$defs"]
    assert defs["GenerateConfig"]["properties"]["backend"]["enum"] == backends.names() == ["openai", "transformers",
                                                                                           "vllm"]
    assert defs["EvaluateConfig"]["properties"]["self_supervised"]["items"]["enum"] == byod.METRICS.names()
    assert PromptFile.model_json_schema()["properties"]["parser"]["enum"] == PARSERS.names()
    assert set(byod.AGGREGATION) == set(byod.METRICS) and byod.AGGREGATION["word_order"] == "median"
    method = defs["SelectConfig"]["properties"]["method"]["description"]
    assert all(name in method for name in ("zipfit", "random", "length", "dsir", "density", "less", "perplexity"))
    assert [n for n in backends.names() if backends.is_local(n)] == ["transformers", "vllm"]
    assert GenerateConfig(model="m", prompts=["academic"], n=1).model_dump()["backend"] == "transformers"


def test_the_registries_import_nothing_heavy():
    code = ("import sys, datamill.registry\n"
            "stages = [m for m in ('datagen', 'selection', 'train', 'evals', 'tracking') if m in sys.modules]\n"
            "import datagen.backends, datagen.parsing, evals.byod, selection.methods\n"
            "print(stages, [m for m in ('torch', 'transformers', 'polars', 'mlflow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []"


@pytest.fixture
def toys():
    """tests/toy_extensions.py registered (its two decorators), then taken out again."""
    import importlib

    import toy_extensions
    from datagen import backends
    from evals import byod

    importlib.reload(toy_extensions)
    yield toy_extensions
    backends.REGISTRY.unregister("toy")
    byod.METRICS.unregister("toy_length")


TOY_SPEC = """\
name: toys
tracking: {enabled: false}
models:
  m: ./model
steps:
  gen: {generate: {model: m, backend: toy, prompts: [academic], n: 3}}
  score: {evaluate: {model: m, self_supervised: [negation, toy_length]}}
"""


def test_a_toy_backend_and_metric_take_one_file_and_appear_in_the_schema(toys, write_spec, tmp_path):
    from datamill.spec import json_schema
    from evals import byod

    defs = json_schema()["$defs"]
    assert "toy" in defs["GenerateConfig"]["properties"]["backend"]["enum"]
    assert "toy_length" in defs["EvaluateConfig"]["properties"]["self_supervised"]["items"]["enum"]
    assert byod.AGGREGATION["toy_length"] == "median"

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    spec = write_spec(TOY_SPEC)
    assert {"gen", "score"} <= {s.name for s in plans(spec)[0].steps}
    with pytest.raises(SpecError, match=r"unknown self-supervised metric 'toy_lenght'; did you mean 'toy_length'"):
        plans(write_spec(TOY_SPEC.replace("toy_length", "toy_lenght"), name="typo.yaml"))
    generated = datamill.run(write_spec(TOY_SPEC.replace("  score:", "#"), name="gen.yaml"), quiet=True).table("gen")
    assert generated.height == 3 and generated["gen_model"].to_list()[0]


def test_a_toy_metric_runs_and_reports_its_own_statistic(toys):
    from evals import byod

    class Model:
        training = False

        def eval(self):
            pass

        def train(self, mode):
            pass

    rows, summary = byod.run_metric("toy_length", Model(), None, ["a", "abc", "abcdefgh", "ab"])
    assert [r["score"] for r in rows] == [1.0, 3.0, 8.0, 2.0]
    assert summary["score"] == 2.5 and summary["mean"] == 3.5
