"""Executors for shardable steps: the same tables whichever ran them; a clear error without Ray."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import datamill
from datamill.errors import SpecError
from datamill.shards import LocalShards

SPEC = """\
name: sharded
sources:
  pool: {generator: tasks, families: [arithmetic, capitals, sort, code], n: 300, seed: 0}
  target: {generator: tasks, families: [capitals], n: 20, seed: 1}
steps:
  pick:
    select: {input: pool, target: target, method: zipfit, budget: 30}
tracking: {enabled: false}
"""


class SlicingShards(LocalShards):
    """Runs shards here, but says it is not local: the methods slice their work as on Ray."""

    kind = "test-slices"
    workers = 3


def test_zipfit_in_slices_gives_the_scores_of_one_pass():
    from selection.builtin import zipfit

    candidates = [f"what is {i} plus {i * 7}? the answer is {i * 8}." * (1 + i % 3) for i in range(1100)]
    targets = ["what is 2 plus 2? 4", "add 10 and 5: 15", "the capital of France is Paris"]
    shards = SlicingShards()
    sliced = zipfit(candidates, targets, shards=shards)
    np.testing.assert_array_equal(sliced, zipfit(candidates, targets))
    assert len(shards.seconds) == 5  # 1100 candidates, slices of max(256, 1100 / 12)
    summary = shards.summary()
    assert summary["shards"] == 5 and summary["shard_seconds"]["total"] >= summary["shard_seconds"]["max"]


def test_density_in_slices_gives_the_scores_of_one_pass():
    from selection.builtin import density

    candidates = [f"row {i}: the capital of country {i % 17} is city {i % 5}" for i in range(300)]
    targets = ["What is the capital of France? Paris", "Capital of Peru: Lima"]
    sliced = density(candidates, targets, batch_size=16, shards=SlicingShards())
    np.testing.assert_array_equal(sliced, density(candidates, targets, batch_size=16))


def test_setup_is_built_once_for_all_local_shards_and_emitted_values_arrive_at_once():
    import functools

    built, seen = [], []

    def make_model(name):
        built.append(name)
        return {"name": name}

    def shard(items, *, model, emit):
        for x in items:
            emit(x)
            assert seen[-1][1] == x  # delivered here before emit returns
        return [f"{model['name']}:{x}" for x in items]

    shards = LocalShards()
    done = []
    out = shards.map(shard, [[1, 2], [3], [4, 5]], on_done=lambda i, r: done.append(i),
                     setup={"model": functools.partial(make_model, "m")}, on_emit=lambda i, x: seen.append((i, x)))
    assert out == [["m:1", "m:2"], ["m:3"], ["m:4", "m:5"]]
    assert built == ["m"]  # once per map, not per shard
    assert seen == [(0, 1), (0, 2), (1, 3), (2, 4), (2, 5)] and done == [0, 1, 2]
    assert shards.map(shard, [], setup={"model": functools.partial(make_model, "n")}, on_emit=print) == []
    assert built == ["m"]  # lazily: no shard, no setup
    assert shards.map(lambda x: x * 2, [1, 2]) == [2, 4]  # no setup: fn(shard)
    assert len(shards.seconds) == 5


def test_one_local_worker_runs_one_slice_several_run_four_each():
    items = list(range(100))
    assert LocalShards().slices(items) == [items]  # one after the other: cutting gains nothing
    assert len(SlicingShards().slices(items)) == 12
    assert [len(s) for s in SlicingShards().slices(items, minimum=30, align=8)] == [32, 32, 32, 4]
    assert LocalShards().cpus_per_shard == (os.cpu_count() or 1)


def test_the_select_step_reports_its_executor_and_shards(write_spec):
    result = datamill.run(write_spec(SPEC))
    stats = result.points[0].steps["pick"].stats
    assert stats["executor"] == "local"


def test_executor_ray_without_ray_names_the_extra(write_spec, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    spec = write_spec(SPEC + "executor: {kind: ray}\n")
    with pytest.raises(SpecError) as err:
        datamill.plans(spec)
    message = str(err.value)
    assert "pip install 'datamill[ray]'" in message and f"{spec.name}:" in message  # file:line:col of the field




@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["zipfit", "density"])
def test_the_same_spec_on_ray_writes_byte_identical_tables(write_spec, ray_cluster, method):
    spec = SPEC.replace("method: zipfit", f"method: {method}")
    local = datamill.run(write_spec(spec))
    on_ray = datamill.run(write_spec(spec.replace("name: sharded", "name: sharded_ray") + "executor: {kind: ray}\n"))
    stats = on_ray.points[0].steps["pick"].stats
    assert stats["executor"] == "ray" and stats["shards"] >= 2
    assert local.points[0].plan.by_name("pick").key == on_ray.points[0].plan.by_name("pick").key
    for side in ("main", "scores"):
        a = local.workspace.table_path(local.points[0].plan.by_name("pick").key, side).read_bytes()
        b = on_ray.workspace.table_path(on_ray.points[0].plan.by_name("pick").key, side).read_bytes()
        assert a == b, side


@pytest.mark.slow
def test_on_ray_each_task_builds_its_setup_and_emitted_values_come_back(tmp_path, ray_cluster):
    import functools

    from datamill.shards import RayShards

    def make_model(folder):  # defined here: Ray ships it by value (workers cannot import tests/)
        import uuid

        (Path(folder) / uuid.uuid4().hex).write_text(str(os.getpid()))
        return {"pid": os.getpid()}

    def shard(items, *, model, emit):
        for x in items:
            emit(x * 10)
        return [x + 1 for x in items]

    seen = []
    shards = RayShards()
    assert shards.cpus_per_shard == 1
    out = shards.map(shard, [[1, 2], [3], [4]], setup={"model": functools.partial(make_model, str(tmp_path))},
                     on_emit=lambda i, x: seen.append((i, x)))
    assert out == [[2, 3], [4], [5]]
    assert len(list(tmp_path.iterdir())) == 3  # once per task
    assert sorted(seen) == [(0, 10), (0, 20), (1, 30), (2, 40)]
    assert [x for i, x in seen if i == 0] == [10, 20]  # a shard's values in the order it emitted them


@pytest.mark.slow
def test_a_worker_killed_mid_shard_is_retried_by_ray(tmp_path, ray_cluster):
    from datamill.shards import RayShards

    def _dies_on_first_attempt(shard):  # defined here: Ray ships it by value (workers cannot import tests/)
        marker = Path(shard["marker"])
        if not marker.exists():
            marker.write_text("died once")
            os._exit(1)  # the worker process dies mid-shard
        return shard["value"] * 2

    shards = RayShards(max_retries=2)
    out = shards.map(_dies_on_first_attempt, [{"marker": str(tmp_path / f"m{i}"), "value": i} for i in range(4)])
    assert out == [0, 2, 4, 6]
    assert all((tmp_path / f"m{i}").exists() for i in range(4))


def test_cli_executor_flag_is_the_spec_field(write_spec, monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from datamill.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    # (datamill.cli.main turns a SpecError into its message and exit code 2)
    out = CliRunner().invoke(app, ["run", str(write_spec(SPEC)), "--executor", "ray"])
    assert isinstance(out.exception, SpecError) and "datamill[ray]" in str(out.exception)
    out = CliRunner().invoke(app, ["run", str(write_spec(SPEC)), "--executor", "cluster"])
    assert isinstance(out.exception, SpecError) and "'local' or 'ray'" in str(out.exception)
    assert out.exception.exit_code == 2


@pytest.mark.slow
def test_generation_requests_on_ray_write_the_tables_of_a_local_run(write_spec, ray_cluster):
    import polars as pl

    from fake_openai_server import FakeServer

    with FakeServer(delay_s=0.2) as server:
        spec = f"""\
name: gen_local
tracking: {{enabled: false}}
steps:
  genqa:
    generate: {{model: fake-model, backend: openai, openai: {{base_url: "{server.base_url}", max_in_flight: 4}},
               prompts: [general, math], n: 24, temperature: 0.7}}
"""
        local = datamill.run(write_spec(spec))
        server.max_concurrent = 0
        on_ray = datamill.run(write_spec(spec.replace("gen_local", "gen_ray") + "executor: {kind: ray}\n"))
        # max_in_flight is the total on Ray too: the tasks running at once share it
        assert 2 <= server.max_concurrent <= 4
    stats = on_ray.points[0].steps["genqa"].stats
    assert stats["executor"] == "ray" and stats["shards"] >= 2
    for table in ("genqa", "genqa__rejected"):
        assert pl.read_parquet(on_ray.tables[table]).equals(pl.read_parquet(local.tables[table])), table


def test_max_in_flight_is_shared_by_the_tasks_running_at_once():
    from datagen.generate_step import GenerateConfig, GenerateStep

    cfg = GenerateConfig.model_validate({"model": "m", "backend": "openai", "prompts": ["general"], "n": 4,
                                         "openai": {"max_in_flight": 64}})
    assert GenerateStep._per_task(cfg, 3).openai.max_in_flight == 22
    assert GenerateStep._per_task(cfg, 100).openai.max_in_flight == 1
    assert cfg.openai.max_in_flight == 64  # the step's own config is left as it is


def test_a_step_waiting_for_ray_lets_another_points_step_work_here():
    """Sweep points on Ray run in threads; only one step works in this process at a time, and it
    lets go while it waits for Ray (datamill/shards.py)."""
    import threading

    from datamill.shards import RayShards

    work = threading.Lock()
    shards = RayShards(work_lock=work)
    other_ran = threading.Event()

    def other_point():
        with work:
            other_ran.set()

    with work:
        thread = threading.Thread(target=other_point)
        thread.start()
        assert not other_ran.wait(0.2)  # held: the other point waits
        with shards.released():
            assert other_ran.wait(5)  # waiting for Ray: the other point's step works
        thread.join()
    assert not work.locked()
