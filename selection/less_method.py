"""LESS as a `select` method: warmup, gradient datastore, scores (the maths is in selection/less.py).

The datastore lives in the workspace's shared folder under a key of everything that decides it
(the pool's contents, the model's identity, the warmup and projection settings):

    <cache_dir>/less/<key>/warmup/epochs/epoch-N/   adapter weights + Adam moments + mean lr
    <cache_dir>/less/<key>/features-epoch-N.npy     candidate features (Adam-aware, projected)

A second `select` on the same pool with another target table computes only the targets'
gradients. Files are written to a temp name and renamed, so a killed run never leaves half a
feature file.

On a Ray executor (`executor: {kind: ray}`) the candidates' features of each checkpoint, the
expensive part, are computed in shards: slices of the length-sorted pool, each a Ray task that
loads the checkpoint itself (workers read it from the datastore: on a cluster of several
machines the workspace must be on a shared filesystem). Slices start at whole projection chunks,
so every batch and every projected chunk is the one of a single pass, and shards use this
process's torch thread count (datamill/shards.py): the features, scores and tables are
bit-identical to a local run on the same kind of CPU. A
worker with a GPU (`num_gpus` in the executor) runs its shard there: the same features up to
float rounding. The targets' features, few, are computed here.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np

from datamill.atomic import write_atomic
from datamill.hashing import hash_obj


def run_less(candidates, targets, *, rows, target_rows, model_dir, cache_dir, seed: int = 0, progress=None,
             warmup_fraction: float = 0.05, warmup_min: int = 8, epochs: int = 4, lr: float = 2e-5, lora_r: int = 8,
             lora_alpha: float = 32, lora_targets: list[str] | None = None, proj_dim: int = 8192,
             aggregate: str = "mean", group_column: str | None = None, max_len: int = 512, batch_size: int = 8,
             candidate_gradient: str = "adam", shards=None) -> np.ndarray:
    """Scores of the `less` method. Defaults follow LESS (4 epochs, lr 2e-5, 5% warmup slice,
    8192 dims) except the LoRA rank (8, alpha 32: the reference's 128/512 is slow on a CPU).
    `shards`: the step's shard runner, which computes the candidates' features in shards (see the
    module docstring; without it, here, one after the other).

    aggregate: how a candidate's lr-weighted cosines with the targets become one score.
        "mean" (default): the mean over all targets (LESS with a single target task).
        "max": the best-matching target.
        "subtask": LESS's setting for MMLU, BBH and TyDiQA: the mean over the targets of each
        subtask, then the max over subtasks, so a candidate that helps one subtask scores high
        even when that subtask has few targets. Needs `group_column`.
    group_column: with aggregate "subtask", the target table's column naming each target
        example's subtask (e.g. `subject` for MMLU). Targets are grouped by its value: unlike the
        reference, subtasks need not be contiguous nor equal in size. Only valid with "subtask"."""
    if model_dir is None:
        raise ValueError("method less needs a model to warm up: set `model:` in the select step")
    if candidate_gradient not in ("adam", "sgd"):
        raise ValueError(f"candidate_gradient: expected 'adam' (LESS's default) or 'sgd', found {candidate_gradient!r}")
    groups = _subtask_groups(aggregate, group_column, target_rows, len(targets))
    lora_targets = lora_targets or ["q_proj", "k_proj", "v_proj", "o_proj"]
    from datamill.models import model_identity
    from datamill.registry import function
    from selection.less import features, gradient_width, less_scores, load_checkpoint_model, projection_every

    pool_convs, loss_on = _conversations(rows, candidates)
    target_convs, target_loss_on = _conversations(target_rows, targets)
    lora = {"r": lora_r, "alpha": lora_alpha, "targets": list(lora_targets)}
    settings = {"pool": hash_obj(pool_convs, 32), "model": model_identity(str(model_dir), Path(model_dir)),
                "seed": seed, "warmup_fraction": warmup_fraction, "warmup_min": warmup_min, "epochs": epochs,
                "lr": lr, "lora": lora, "proj_dim": proj_dim, "max_len": max_len, "loss_on": loss_on,
                "candidate_gradient": candidate_gradient,
                "version": 2}  # 2: epoch mean lr = the rates the epoch's steps used (train/loop.py)
    store = Path(cache_dir) / "less" / hash_obj(settings)
    store.mkdir(parents=True, exist_ok=True)
    (store / "settings.json").write_text(json.dumps(settings, indent=2))

    states = _warmup(function("fine_tune"), model_dir, pool_convs, loss_on, store, lora, seed=seed,
                     fraction=warmup_fraction, minimum=warmup_min, epochs=epochs, lr=lr, max_len=max_len,
                     batch_size=batch_size)
    encode = function("encode_examples")
    pool_examples = encode(model_dir, pool_convs, loss_on=loss_on, max_len=max_len)
    target_examples = encode(model_dir, target_convs, loss_on=target_loss_on, max_len=max_len)
    cand_feats, target_feats, lrs = [], [], []
    for state in states:
        model, moments = load_checkpoint_model(Path(model_dir), lora, Path(state["path"]))
        names = sorted(moments)
        cached = store / f"features-epoch-{state['epoch']}.npy"
        if cached.is_file():
            feats = np.load(cached)
            if progress:
                progress(len(pool_examples) / len(states))
        else:
            step = (lambda n: progress(n / len(states))) if progress else None
            adam = candidate_gradient == "adam"
            # decided here, once: the slices are aligned to it and every shard projects alike
            every = projection_every(batch_size, gradient_width(model, names))
            shard = functools.partial(_checkpoint_features, adam=adam, dim=proj_dim, seed=seed,
                                      batch_size=batch_size, every=every)
            load = functools.partial(_load_checkpoint, model_dir=str(model_dir), lora=lora,
                                     state_path=str(state["path"]))
            feats = _sharded_features(shards, shard, pool_examples, align=every * batch_size,
                                      setup={"checkpoint": load}, progress=step)
            write_atomic(cached, lambda tmp: np.save(tmp, feats))
        cand_feats.append(feats)
        target_feats.append(features(model, target_examples, names, None, proj_dim, seed, batch_size=batch_size))
        lrs.append(state["mean_lr"])
    return less_scores(cand_feats, target_feats, lrs, aggregate, groups)


def _subtask_groups(aggregate: str, group_column: str | None, target_rows, n_targets: int) -> list | None:
    """Each target's subtask label (aggregate "subtask"), checked before any training: a clear
    error naming the field when the setting is wrong."""
    from selection.less import AGGREGATES

    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate: expected one of {', '.join(AGGREGATES)}, found {aggregate!r}")
    if aggregate != "subtask":
        if group_column is not None:
            raise ValueError(f"group_column: only used with aggregate: subtask (aggregate is {aggregate!r})")
        return None
    if group_column is None:
        raise ValueError("group_column: aggregate: subtask needs group_column, the target table's column that "
                         "names each target example's subtask")
    columns = list(target_rows.columns) if target_rows is not None else []
    if group_column not in columns:
        raise ValueError(f"group_column: the target table has no column {group_column!r} "
                         f"(columns: {', '.join(columns) or 'none'})")
    labels = target_rows[group_column].to_list()
    if len(labels) != n_targets:
        raise ValueError(f"group_column: {len(labels)} values for {n_targets} targets")
    missing = sum(label is None for label in labels)
    if missing:
        raise ValueError(f"group_column: {missing} target rows have no value in {group_column!r}")
    for label in labels:
        try:
            hash(label)
        except TypeError:
            raise ValueError(f"group_column: {group_column!r} must hold one label per row (a string or number), "
                             f"found a {type(label).__name__}") from None
    return labels


SHARD_MINIMUM = 64  # examples: a shard loads the model, it must have work enough to be worth it


def _sharded_features(shards, shard, examples, *, align: int, setup: dict | None = None, progress=None) -> np.ndarray:
    """`features` of `examples` through the executor (here, one after the other, without
    `shards`): `shard(slice, **setup)` over consecutive slices of their length order (`features`'
    batching order) whose lengths are multiples of `align`, so that each slice's batches and
    projection chunks are those of one pass."""
    from datamill.shards import LocalShards
    from selection.less import in_input_order, length_order

    shards = LocalShards() if shards is None else shards
    order = length_order(examples)
    slices = shards.slices([examples[i] for i in order], minimum=SHARD_MINIMUM, align=align)
    done = (lambda _, n: progress(n)) if progress else None
    return in_input_order(np.concatenate(shards.map(shard, slices, setup=setup, on_emit=done)), order)


def _load_checkpoint(*, model_dir: str, lora: dict, state_path: str) -> tuple:
    """A warmup checkpoint's model and Adam moments, loaded where the shards run (a Ray task
    ships this call, not a model); on a GPU worker (executor num_gpus), on the GPU: the same
    features up to float rounding."""
    from datamill.devices import resolve_device
    from selection.less import load_checkpoint_model

    model, moments = load_checkpoint_model(Path(model_dir), lora, Path(state_path))
    return model.to(resolve_device()), moments  # the GPU when there is one


def _checkpoint_features(examples, *, checkpoint: tuple, adam: bool, dim: int, seed: int, batch_size: int,
                         every: int, emit=None) -> np.ndarray:
    """One shard: the features of `examples` (already in batching order) under a warmup
    checkpoint, `(model, moments)` from `_load_checkpoint`."""
    from selection.less import sorted_features

    model, moments = checkpoint
    return sorted_features(model, examples, sorted(moments), moments if adam else None, dim, seed,
                           batch_size=batch_size, every=every, progress=emit)


def _conversations(table, texts: list[str]):
    """Conversations (loss on assistant turns) when the table has messages, else texts (all tokens)."""
    if table is not None and "messages" in table.columns:
        return [[{"role": m["role"], "content": m["content"]} for m in ms] for ms in table["messages"].to_list()], \
            "assistant"
    return list(texts), "all"


def _warmup(fine_tune, model_dir, convs, loss_on, store: Path, lora: dict, *, seed, fraction, minimum, epochs, lr,
            max_len, batch_size) -> list[dict]:
    """The warmup's per-epoch states, trained once per datastore key (resumable: fine_tune's
    checkpoints live in the store)."""
    done = store / "warmup" / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    k = min(len(convs), max(minimum, math.ceil(fraction * len(convs))))
    picked = np.random.default_rng(seed).permutation(len(convs))[:k]
    result = fine_tune(model_dir, [convs[i] for i in picked], store / "warmup", state_dir=store / "warmup-state",
                       lora={"r": lora["r"], "alpha": lora["alpha"], "dropout": 0.1, "targets": lora["targets"]},
                       epochs=epochs, lr=lr, schedule="linear", warmup=0.03, max_len=max_len, batch_size=batch_size,
                       seed=seed, loss_on=loss_on, epoch_checkpoints=True, checkpoint_every=None,
                       save="adapter")  # features read the epoch states: a merged copy would be 517 MB of SmolLM2 unused
    states = result["epoch_states"]
    write_atomic(done, json.dumps(states))
    return states
