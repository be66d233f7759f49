"""LESS: per-example LoRA gradients (batched = one backward each), the Adam-aware direction, the
projection, the scores, and the method on the testbed (tiny-llama, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datamill.shards import LocalShards

import torch  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from datamill.models import resolve_model

    return resolve_model("builtin:tiny-llama", base_dir=Path("."), cache_dir=tmp_path_factory.mktemp("models"))


def lora_model(folder, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # non-zero B, so that gradients reach A too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


def examples(folder):
    from datamill.registry import function

    convs = [[{"role": "user", "content": f"What is {a} + {a * 2}?"}, {"role": "assistant", "content": f"{a * 3}"}]
             for a in range(1, 6)]
    convs.append([{"role": "user", "content": "Name a colour, then another one, then a third, please."},
                  {"role": "assistant", "content": "Red, green and a rather long blue."}])
    return function("encode_examples")(folder, convs, max_len=128)


def test_batched_per_example_gradients_equal_one_backward_per_example(tiny):
    from selection.less import batches_of, per_example_grads

    model = lora_model(tiny)
    exs = examples(tiny)
    batch = list(batches_of(exs, batch_size=len(exs), pad_id=0))  # different lengths: padding inside
    fast = next(per_example_grads(model, batch))
    slow = next(per_example_grads(model, batch, loop=True))
    assert set(fast) == set(slow) and all("lora_" in name for name in fast)
    for name in fast:
        assert fast[name].shape[0] == len(exs)
        torch.testing.assert_close(fast[name], slow[name], atol=1e-5, rtol=1e-4)
    assert any(float(g.abs().max()) > 0 for g in fast.values())


def test_adam_direction_matches_a_hand_computation():
    from selection.less import adam_direction

    g = torch.tensor([0.5, -2.0, 0.0])
    m = torch.tensor([0.1, 0.2, -0.3])
    v = torch.tensor([0.01, 0.04, 0.0])
    expected = []
    for gi, mi, vi in zip(g.tolist(), m.tolist(), v.tolist()):
        m2 = 0.9 * mi + 0.1 * gi
        v2 = 0.999 * vi + 0.001 * gi * gi
        expected.append(m2 / (v2 + 1e-8) ** 0.5)  # no bias correction, eps inside the root (LESS)
    torch.testing.assert_close(adam_direction(g, m, v), torch.tensor(expected), atol=1e-6, rtol=1e-6)


def test_projection_is_fixed_by_the_seed_and_preserves_geometry():
    from selection.less import project

    x = torch.randn(6, 3000, generator=torch.Generator().manual_seed(0))
    a, b, c = project(x, 1024, seed=0), project(x, 1024, seed=0), project(x, 1024, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    cos = torch.nn.functional.cosine_similarity
    # Johnson-Lindenstrauss: cosines survive the projection roughly
    assert abs(float(cos(a[0:1], a[1:2])) - float(cos(x[0:1], x[1:2]))) < 0.15
    assert float(cos(project(x[:1] * 3, 1024, 0), a[:1])) == pytest.approx(1.0, abs=1e-5)


def test_scores_weight_checkpoints_by_learning_rate():
    from selection.less import less_scores

    t1, t2 = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.0, 1.0], [1.0, 0.0]])
    v = np.array([[1.0, 0.0]])
    # checkpoint 1 says row 0, checkpoint 2 says row 1; the higher lr wins
    assert less_scores([t1, t2], [v, v], [3.0, 1.0]).tolist() == [0.75, 0.25]
    assert less_scores([t1, t2], [v, v], [1.0, 3.0]).tolist() == [0.25, 0.75]
    two_targets = np.array([[1.0, 0.0], [0.0, -1.0]])
    assert less_scores([t1], [two_targets], [1.0], aggregate="max").tolist() == [1.0, 0.0]
    assert less_scores([t1], [two_targets], [1.0], aggregate="mean").tolist() == [0.5, -0.5]


def test_less_on_the_testbed_and_its_datastore_serves_a_second_target(write_spec, tiny, monkeypatch):
    """One pool, two target tables: the warmup and the candidates' features are computed once.
    (With builtin:tiny-llama, a random 2-layer model, LESS separates families whose answers look
    different, such as capitals and sorted lists; families that all answer with numbers
    (arithmetic, units, code output) need a real model's gradients.)"""
    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(tiny.parent))
    params = "{epochs: 2, warmup_fraction: 0.1, proj_dim: 1024, lr: 0.001, batch_size: 16}"
    spec = write_spec(f"""
name: less
models: {{tiny: builtin:tiny-llama}}
sources:
  pool: {{generator: tasks, families: [arithmetic, reverse, sort, capitals, units, code, chat], n: 700, seed: 0}}
  capitals: {{generator: tasks, families: [capitals], n: 50, seed: 1}}
  sorting: {{generator: tasks, families: [sort], n: 50, seed: 1}}
steps:
  pick_capitals: {{select: {{input: pool, target: capitals, method: less, budget: 100, model: tiny, params: {params}}}}}
  pick_sort: {{select: {{input: pool, target: sorting, method: less, budget: 100, model: tiny, params: {params}}}}}
tracking: {{enabled: false}}
""")
    from datamill.api import run

    result = run(spec)
    steps = result.points[-1].steps
    assert steps["pick_capitals"].stats["target_family_precision"] >= 0.8, steps["pick_capitals"].stats
    assert steps["pick_sort"].stats["target_family_precision"] >= 0.8, steps["pick_sort"].stats
    stores = list((result.workspace.root / "shared" / "select" / "less").iterdir())
    assert len(stores) == 1  # one datastore for the pool, whichever the target
    assert sorted(p.name for p in stores[0].glob("features-epoch-*.npy")) == ["features-epoch-1.npy",
                                                                               "features-epoch-2.npy"]
    scores = result.table("pick_sort__scores")
    assert scores.height == 700 and scores["selected"].sum() == 100


def test_less_without_a_model_is_a_clear_error(write_spec):
    from datamill.api import run
    from datamill.errors import StepFailed

    spec = write_spec("""
name: less_nomodel
sources:
  pool: {generator: tasks, families: [arithmetic, chat], n: 20, seed: 0}
  target: {generator: tasks, families: [arithmetic], n: 5, seed: 1}
steps:
  pick: {select: {input: pool, target: target, method: less, budget: 5}}
tracking: {enabled: false}
""")
    with pytest.raises(StepFailed, match="method less needs a model to warm up"):
        run(spec)


def test_features_keep_the_examples_order_whatever_the_batching(tiny):
    from selection.less import features, lora_linears

    model = lora_model(tiny)
    exs = examples(tiny)
    names = sorted(lora_linears(model))
    a = features(model, exs, names, None, 256, seed=0, batch_size=4)  # length-sorted batches
    b = np.concatenate([features(model, [e], names, None, 256, seed=0) for e in exs])  # one at a time
    np.testing.assert_allclose(a, b, atol=1e-5)


class SlicingShards(LocalShards):
    """Runs shards here, but says it is not local: LESS slices its work as on Ray (a copy of
    tests/test_shards.py's, so that the two files stay independent)."""

    kind = "test-slices"
    workers = 3


def test_less_features_in_shards_are_bit_identical_to_one_pass(tiny, tmp_path, monkeypatch):
    """As on a Ray executor: each checkpoint's candidate features in slices of the length-sorted
    pool, one shard each (run here). Slices start at whole projection chunks (3 batches here: the
    real budget holds all of tiny-llama's pool in one chunk), so features and scores are equal
    bit for bit."""
    import selection.less
    from selection.less_method import run_less

    monkeypatch.setattr(selection.less, "projection_every", lambda batch_size, width: 3)
    candidates = [f"item {i}: " + "word " * (i % 23) + "end" for i in range(150)]  # many lengths
    targets = ["item 7: word word end", "item 3: end"]
    settings = dict(rows=None, target_rows=None, model_dir=tiny, cache_dir=tmp_path, epochs=1, warmup_min=8,
                    lr=1e-3, proj_dim=256, batch_size=4, max_len=64)
    one_pass = run_less(candidates, targets, **settings)
    files = sorted(tmp_path.glob("less/*/features-epoch-*.npy"))
    assert len(files) == 1
    local_feats = [np.load(f) for f in files]
    for f in files:  # the warmup stays: the second run recomputes only the features
        f.unlink()
    shards = SlicingShards()
    sliced = run_less(candidates, targets, shards=shards, **settings)
    for f, feats in zip(files, local_feats):
        np.testing.assert_array_equal(np.load(f), feats)
    np.testing.assert_array_equal(sliced, one_pass)
    # 150 examples in slices of max(64, 150 / 12) rounded up to 3 batches of 4: 72, 72, 6
    assert len(shards.seconds) == 3
    assert np.unique(one_pass).size > 100  # the scores tell candidates apart


@pytest.mark.slow
@pytest.mark.timeout(900)  # SmolLM2's gradients for every candidate: ~2.5 min here
def test_less_with_a_real_model_finds_families_a_random_model_cannot(write_spec, tmp_path_factory, monkeypatch):
    """SmolLM2-135M-Instruct (offline): one pool of the seven task families (30 rows each, base
    rate 0.14) and three target families that tiny-llama's random gradients confuse, at LESS's
    learning rate (2e-5). One datastore serves the three targets. (~3 min on 2 cores; measured
    here: units 0.90, code 0.87, reverse 0.83, arithmetic 0.80, chat 0.63)"""
    import os

    monkeypatch.setenv("DATAMILL_MODEL_CACHE", os.environ.get("DATAMILL_MODEL_CACHE")
                       or str(tmp_path_factory.mktemp("models")))
    families = ["units", "code", "reverse"]  # tiny-llama: 0.59, 0.35, 0.23
    params = "{epochs: 1, warmup_fraction: 0.2, proj_dim: 1024, lr: 0.00002, max_len: 128, batch_size: 16}"
    targets = "\n".join(f"  target_{f}: {{generator: tasks, families: [{f}], n: 30, seed: 1}}" for f in families)
    steps = "\n".join(f"  pick_{f}: {{select: {{input: pool, target: target_{f}, method: less, budget: 30, "
                      f"model: smol, params: {params}}}}}" for f in families)
    spec = write_spec(f"""
name: less_smol
models: {{smol: builtin:smollm2-135m-instruct}}
sources:
  pool: {{generator: tasks, families: [arithmetic, reverse, sort, capitals, units, code, chat], n: 210, seed: 0}}
{targets}
steps:
{steps}
tracking: {{enabled: false}}
""")
    from datamill.api import run

    result = run(spec)
    steps = result.points[-1].steps
    for family in families:
        assert steps[f"pick_{family}"].stats["target_family_precision"] >= 0.8, (family, steps[f"pick_{family}"].stats)
    assert len(list((result.workspace.root / "shared" / "select" / "less").iterdir())) == 1


@pytest.fixture
def ray_cluster():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()  # RayShards joins the instance a test file started before
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_less_on_ray_writes_the_tables_of_a_local_run(write_spec, tiny, ray_cluster, monkeypatch):
    """The same select spec with `executor: {kind: ray}`: the candidates' features are Ray tasks
    (slices of the length-sorted pool, each loading the checkpoint itself), and the step's
    tables are byte-identical to a local run's."""
    import selection.less
    from datamill.api import run

    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(tiny.parent))
    # projection chunks of one batch (tiny-llama's real budget is one chunk for the whole pool):
    # decided by the driver, so the Ray workers project alike
    monkeypatch.setattr(selection.less, "projection_every", lambda batch_size, width: 1)
    params = "{epochs: 1, warmup_min: 8, proj_dim: 256, lr: 0.001, batch_size: 8, max_len: 96}"
    spec = f"""
name: less_local
models: {{tiny: builtin:tiny-llama}}
sources:
  pool: {{generator: tasks, families: [arithmetic, capitals, sort, code], n: 130, seed: 0}}
  target: {{generator: tasks, families: [capitals], n: 10, seed: 1}}
steps:
  pick: {{select: {{input: pool, target: target, method: less, budget: 20, model: tiny, params: {params}}}}}
tracking: {{enabled: false}}
"""
    local = run(write_spec(spec))
    on_ray = run(write_spec(spec.replace("name: less_local", "name: less_ray") + "executor: {kind: ray}\n"))
    stats = on_ray.points[0].steps["pick"].stats
    # 2 workers: slices of max(64, 130 / 8) examples: 64, 64, 2
    assert stats["executor"] == "ray" and stats["shards"] == 3, stats
    key = local.points[0].plan.by_name("pick").key
    assert key == on_ray.points[0].plan.by_name("pick").key
    for side in ("main", "scores"):
        a = local.workspace.table_path(key, side).read_bytes()
        b = on_ray.workspace.table_path(key, side).read_bytes()
        assert a == b, side
