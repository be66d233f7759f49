"""The training loop, top to bottom, on Accelerate.

    train(job)                      in-process, as the `train` step runs it
    python -m train.loop JOB.json   the same, one process
    accelerate launch [--config_file ddp.yaml] -m train.loop JOB.json
                                    several GPUs (DDP; FSDP/DeepSpeed through Accelerate's config)

A job names the tokenised examples (a parquet file the `train` step writes: input_ids, labels,
table, split), the base model folder, the settings (`TrainConfig`), and two folders: `out_dir`
(final model, log) and `state_dir` (resume checkpoints, which survive a killed run).

The order of work is a pure function of the seed: every epoch's example order, rows and
micro-batches are computed up front, so a resumed run only needs the step number to continue
exactly where it stopped, and every process of a distributed run knows the whole plan.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datamill.atomic import replace_folder, write_atomic
from datamill.devices import has_bf16
from train.config import TrainConfig
from train.data import IGNORE, Example, collate, epoch_order, micro_batches, pack, pair_batches

CHECKPOINT_FILE = "trainer.pt"


@dataclass
class TrainJob:
    config: dict  # TrainConfig as JSON
    model_dir: str  # base model (HF folder)
    examples: str  # tokenised examples (parquet)
    out_dir: str  # the final model goes to out_dir/model, metrics to out_dir/log.jsonl
    state_dir: str  # resume checkpoints and per-epoch states while training
    live_log: str | None = None  # launched runs: metrics rows appended here as they come (for the parent)
    reference_dir: str | None = None  # preference objectives: a reference model other than the base

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "TrainJob":
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class Plan:
    """All optimizer steps: each a list of micro-batches, each a list of rows of example indices."""

    steps: list[list[list[list[int]]]]
    epoch_of_step: list[int]  # epoch that the step's last micro-batch belongs to
    packed: bool


@dataclass
class Data:
    """The tokenised examples, which of them train and which evaluate, and how a micro-batch of
    them becomes tensors."""

    examples: list[Example]
    train_labels: list[list[int]]  # what training takes its loss on (goldfish drops applied)
    train_idx: list[int]
    eval_idx: list[int]
    pad_id: int
    packed: bool
    max_len: int
    # Preference objectives: example 2p is pair p's chosen side, 2p+1 its rejected side, and a
    # packed row holds whole pairs (twice max_len long).
    pairs: bool = False

    def tensors(self, micro_batch: list[list[int]], device, training: bool = True) -> dict:
        """A micro-batch's tensors on `device`; evaluation takes its loss on every labelled token."""
        labels = self.train_labels if training else [e.labels for e in self.examples]
        row_len = 2 * self.max_len if self.pairs else self.max_len
        return {k: v.to(device) for k, v in collate(micro_batch, self.examples, labels, packed=self.packed,
                                                    pad_id=self.pad_id, row_len=row_len).items()}


@dataclass
class Run:
    """What one run works with, built once in `train` and handed whole to the helpers below."""

    cfg: TrainConfig
    accelerator: Any
    model: Any  # as Accelerate prepared it (DDP-wrapped on several processes)
    optimizer: Any
    scheduler: Any
    data: Data
    plan: Plan
    select: Any  # _LossPositions
    state_dir: Path
    reference: Any = None  # preference objectives: every example's reference log-prob ([n] tensor, CPU)
    history: list[dict] = field(default_factory=list)
    # This process's optimizer-step time and tokens, for the summary's throughput.
    totals: dict = field(default_factory=lambda: {"seconds": 0.0, "tokens": 0, "loss_tokens": 0})


def train(job: TrainJob, log=None, progress_desc: str = "train") -> dict:
    """Run a job; `log(metrics, step)` receives metrics as they come. Returns the summary stats."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from datamill import progress

    cfg = TrainConfig.model_validate(job.config)
    out_dir, state_dir = Path(job.out_dir), Path(job.state_dir)
    started = time.monotonic()

    # --- 1. Accelerator: device, mixed precision, processes ---
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), cpu=cfg.device == "cpu")
    world, rank = accelerator.num_processes, accelerator.process_index
    if not accelerator.is_main_process or job.live_log:
        progress.set_quiet(True)  # one progress bar for the run: the parent's, from the live log
    set_seed(cfg.seed)

    # --- 2. Data: tokenised examples, their order for every epoch ---
    examples, tables, split = _load_examples(job.examples)
    train_idx = [i for i, s in enumerate(split) if s == "train"]
    eval_idx = [i for i, s in enumerate(split) if s == "eval"]
    if not train_idx:
        raise ValueError("no training examples (every row was empty or held out)")
    train_labels = _training_labels(cfg, examples)
    loss_counts = [sum(1 for x in labels[1:] if x != IGNORE) for labels in train_labels]
    # What a step's loss is the mean over: loss tokens (sft), or pairs (preference objectives: each
    # pair's two examples count half a unit each).
    units = [0.5] * len(examples) if cfg.preference else loss_counts

    # --- 3. Model: base, adapters, memory savers ---
    with _quiet_libraries():
        model, tokenizer = _load_model(cfg, job.model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.to(accelerator.device)
    if cfg.preference:
        from train.preference import disable_dropout

        disable_dropout(model)
    packed = _use_packing(cfg, model, accelerator.device)
    data = Data(examples, train_labels, train_idx, eval_idx, pad_id, packed, cfg.max_len, pairs=cfg.preference)
    select = _LossPositions(model)  # logits only where a loss is taken, when the model allows it

    params = list(model.parameters())
    param_counts = {"trainable_params": sum(p.numel() for p in params if p.requires_grad),
                    "total_params": sum(p.numel() for p in params)}
    plan = _plan(cfg, data, tables, world)
    eval_batches = _eval_batches(cfg, data)
    total_steps = len(plan.steps)

    # --- 4. Optimizer and schedule ---
    from transformers import get_scheduler

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    warmup = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    scheduler = get_scheduler(cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    run = Run(cfg, accelerator, model, optimizer, scheduler, data, plan, select, state_dir)
    if cfg.preference and cfg.objective != "simpo":  # before any weight moves (or is restored)
        from train.preference import reference_logps

        state_dir.mkdir(parents=True, exist_ok=True)
        run.reference = reference_logps(
            model, _all_pair_batches(cfg, data), lambda mb: data.tensors(mb, accelerator.device, training=False),
            state_dir, accelerator, n_examples=len(examples), select=select, reference_dir=job.reference_dir)

    # --- 5. Resume from the last checkpoint, if a killed run left one ---
    start_step = 0
    checkpoint = _latest_checkpoint(state_dir)
    if checkpoint is not None:
        start_step = _load_checkpoint(run, checkpoint)
        if accelerator.is_main_process:
            progress.console().print(f"  resuming {progress_desc} at step {start_step}/{total_steps} "
                                     f"from {checkpoint.name}")

    # --- 6. The loop ---
    if job.live_log and accelerator.is_main_process:
        live = _LiveLog(Path(job.live_log), total_steps, start_step)
        log = live.chain(log)
    neftune_ctx = nullcontext(None)
    if cfg.neftune is not None:
        from train.neftune import neftune

        neftune_ctx = neftune(accelerator.unwrap_model(model), cfg.neftune.alpha, cfg.neftune.length)
    eval_steps = _eval_steps(cfg, plan, bool(eval_batches))
    # Throughput counts the time of optimizer steps only, not evals or checkpoints in between.
    timer_seconds, timer_tokens, timer_loss_tokens = 0.0, 0, 0
    model.train()
    with neftune_ctx as noise, progress.bar(progress_desc, total=total_steps, unit="steps") as bar:
        bar.advance(start_step)
        for step in range(start_step, total_steps):
            step_start = time.monotonic()
            group = plan.steps[step]
            step_loss_tokens = sum(loss_counts[i] for mb in group for row in mb for i in row)
            step_units = sum(units[i] for mb in group for row in mb for i in row)
            mine = group[rank::world]
            # A step with fewer micro-batches than processes (an epoch's last, say) leaves this one
            # idle, but DDP's gradient all-reduce needs every process's backward: run the step's
            # first micro-batch with its loss zeroed (it adds nothing to the gradient or the counts).
            idle = not mine
            mine = mine or group[:1]
            loss_sum = torch.zeros((), device=accelerator.device)
            pair_metrics: dict = {}
            slots = tokens = 0
            for i, mb in enumerate(mine):
                batch = data.tensors(mb, accelerator.device)
                if noise is not None:
                    noise.set_batch(batch["seq_len"])
                sync = accelerator.no_sync(model) if i < len(mine) - 1 else nullcontext()
                with sync, accelerator.autocast():
                    if cfg.preference:
                        summed, mb_metrics = _pair_loss(run, batch, mb)
                    else:
                        summed, mb_metrics = _forward_loss(model, batch, select), {}
                    # Each micro-batch's summed loss over the step's units (loss tokens or pairs, all
                    # processes): the step's gradient is the exact mean, however they fall into micro-batches.
                    accelerator.backward(summed * (0.0 if idle else world / max(step_units, 1)))
                if idle:
                    continue
                loss_sum += summed.detach()
                for key, value in mb_metrics.items():
                    pair_metrics[key] = pair_metrics.get(key, 0.0) + value
                slots += batch["input_ids"].numel()
                tokens += int((batch["seq_len"] > 0).sum())
            grad_norm = _clip(accelerator, model, cfg.max_grad_norm)
            # The rate this step's update is taken with (read before the scheduler advances; HF's
            # Trainer logs the next step's rate instead, so LESS's reference weights an epoch of one
            # step with the rate after it, 0 for the last epoch of a linear schedule).
            step_lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.advance()

            # --- metrics (summed over processes) ---
            loss_sum, slots, tokens = _sum_over_processes(accelerator, loss_sum, slots, tokens)
            pair_metrics = _mean_over_units(accelerator, pair_metrics, step_units)
            timer_seconds += time.monotonic() - step_start
            timer_tokens += tokens
            timer_loss_tokens += step_loss_tokens
            for key, value in (("seconds", time.monotonic() - step_start), ("tokens", tokens),
                               ("loss_tokens", step_loss_tokens)):
                run.totals[key] += value
            done = step + 1
            row = {"step": done, "epoch": plan.epoch_of_step[step], "loss": loss_sum / max(step_units, 1),
                   "lr": step_lr, "grad_norm": grad_norm,
                   "useful_token_share": step_loss_tokens / max(slots, 1), **pair_metrics}
            if done % cfg.log_every == 0 or done == total_steps:
                elapsed = max(timer_seconds, 1e-9)
                row.update(tokens_per_s=timer_tokens / elapsed, loss_tokens_per_s=timer_loss_tokens / elapsed)
                timer_seconds, timer_tokens, timer_loss_tokens = 0.0, 0, 0
            if done in eval_steps:
                if cfg.preference:
                    row.update(_evaluate_pairs(run, eval_batches))
                else:
                    row["eval_loss"] = evaluate_loss(model, eval_batches, data, accelerator, select)
                model.train()
            run.history.append(row)
            if log is not None and accelerator.is_main_process and (done % cfg.log_every == 0 or "eval_loss" in row
                                                                    or done == total_steps):
                log({k: v for k, v in row.items() if k != "step"}, done)
            if cfg.epoch_checkpoints and _epoch_ends(plan, step):
                _save_epoch_state(run, plan.epoch_of_step[step])
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total_steps:
                _save_checkpoint(run, done)
    select.remove()

    # --- 7. Save the final model (an HF folder), the log, the per-epoch states ---
    accelerator.wait_for_everyone()
    summary = {}
    if accelerator.is_main_process:
        with _quiet_libraries():
            _save_model(cfg, accelerator.unwrap_model(model), tokenizer, out_dir / "model",
                        _declared_dtype(job.model_dir))
        _write_jsonl(out_dir / "log.jsonl", run.history)
        if (state_dir / "epochs").is_dir():
            shutil.copytree(state_dir / "epochs", out_dir / "epochs", dirs_exist_ok=True)
        summary = _summary(run, time.monotonic() - started, start_step) | param_counts
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary


class _LiveLog:
    """A launched run's metrics for the process that launched it (which shows the progress and
    logs to MLflow as they come): a first line {total_steps, start_step}, then one per logged row."""

    def __init__(self, path: Path, total_steps: int, start_step: int):
        self.path = path
        self._write({"total_steps": total_steps, "start_step": start_step}, mode="w")

    def _write(self, row: dict, mode: str = "a") -> None:
        with open(self.path, mode) as f:
            f.write(json.dumps(row) + "\n")

    def chain(self, log):
        def both(metrics: dict, step: int) -> None:
            self._write({"step": step, **metrics})
            if log is not None:
                log(metrics, step)
        return both


# --------------------------------------------------------------------------- losses


class _LossPositions:
    """Compute logits only at positions that carry a loss.

    A forward pre-hook on the output layer hands it the hidden states of the selected positions
    alone ([N, hidden] instead of [B, T, hidden]): with assistant-only loss and a 49k vocabulary
    this skips most of the lm_head and softmax work and memory. The forward still goes through
    the (possibly DDP-wrapped) model, so gradient sync is untouched. Models whose output layer is
    not a plain projection fall back to full logits; `_check_loss_positions` decides."""

    def __init__(self, model):
        self.positions = None  # bool [B, T-1]: position t predicts labels[:, t+1]
        self.enabled = False
        head = model.get_output_embeddings()
        self.handle = head.register_forward_pre_hook(self._hook) if head is not None else None
        if self.handle is not None:
            self.enabled = _check_loss_positions(model, self)

    def _hook(self, module, args):
        if not self.enabled or self.positions is None:
            return None
        hidden = args[0]
        return (hidden[:, :-1][self.positions],) + tuple(args[1:])

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _forward_loss(model, batch, select: _LossPositions):
    """Summed cross-entropy over the batch's loss-bearing tokens."""
    import torch.nn.functional as F

    logits, targets, _ = loss_logits(model, batch, select)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def loss_logits(model, batch, select: _LossPositions):
    """The model's logits at the loss-bearing positions ([N, vocab]), their target tokens ([N]),
    and the positions (bool [B, T-1]: position t predicts labels[:, t+1])."""
    labels = batch["labels"]
    positions = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][positions]
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    select.positions = positions if select.enabled else None
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        select.positions = None
    if logits.dim() == 3:  # full logits: pick the loss positions here
        logits = logits[:, :-1][positions]
    return logits, targets, positions


def _pair_loss(run: Run, batch: dict, micro_batch: list[list[int]]):
    """A micro-batch of preference pairs: the summed per-pair loss and the TRL metrics' sums."""
    from train.preference import metric_sums, pair_losses, sequence_logps

    cfg = run.cfg
    logps, counts = sequence_logps(run.model, batch, run.select)
    reference = None
    if run.reference is not None:
        order = [i for row in micro_batch for i in row]
        reference = run.reference[order].to(logps.device, logps.dtype)
    losses, rewards_c, rewards_r = pair_losses(cfg.objective, cfg.preference_beta(), cfg.gamma, logps, counts,
                                               reference)
    return losses.sum(), metric_sums(losses, rewards_c, rewards_r, logps)


def _evaluate_pairs(run: Run, batches) -> dict:
    """Held-out pairs: mean loss and reward accuracy (eval mode, no gradient)."""
    import torch

    model, accelerator = run.model, run.accelerator
    model.eval()
    total, metrics, pairs = 0.0, {}, 0
    with torch.no_grad():
        for mb in batches:
            with accelerator.autocast():
                summed, mb_metrics = _pair_loss(run, run.data.tensors(mb, accelerator.device, training=False), mb)
            total += float(summed)
            pairs += sum(len(row) for row in mb) // 2
            for key, value in mb_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + value
    return {"eval_loss": total / max(pairs, 1),
            "eval_rewards/accuracies": metrics.get("rewards/accuracies", 0.0) / max(pairs, 1),
            "eval_rewards/margins": metrics.get("rewards/margins", 0.0) / max(pairs, 1)}


def _check_loss_positions(model, select: _LossPositions) -> bool:
    """Do selected-position logits equal the full logits at those positions? (A model with a
    non-linear head or one that reshapes logits would differ or fail: then use full logits.)"""
    import torch

    device = next(model.parameters()).device
    ids = torch.arange(3, 19, device=device).unsqueeze(0) % max(model.config.vocab_size, 19)
    positions = torch.zeros(1, ids.shape[1] - 1, dtype=torch.bool, device=device)
    positions[0, 5:11] = True
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits[:, :-1][positions]
            select.enabled, select.positions = True, positions
            picked = model(input_ids=ids, use_cache=False).logits
        return picked.shape == full.shape and _same_logits(picked, full, model)
    except Exception:
        return False
    finally:
        select.enabled, select.positions = False, None
        model.train(was_training)


def _same_logits(a, b, model) -> bool:
    """Equal up to the arithmetic noise of the model's weights' dtype (quantised or bf16 bases
    differ more between two equivalent computations than fp32 ones)."""
    import torch

    fp32 = all(p.dtype == torch.float32 for p in model.parameters())
    tol = 1e-4 if fp32 else 3e-2
    return bool(torch.allclose(a.float(), b.float(), atol=tol, rtol=tol))


def evaluate_loss(model, batches, data: Data, accelerator=None, select=None) -> float:
    """Mean per-token cross-entropy on held-out batches: eval mode (no dropout, no NEFTune), all
    loss-bearing tokens (no goldfish)."""
    import torch

    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    no_select = select or _NoSelect()
    with torch.no_grad():
        for mb in batches:
            batch = data.tensors(mb, device, training=False)
            ctx = accelerator.autocast() if accelerator is not None else nullcontext()
            with ctx:
                total += _forward_loss(model, batch, no_select).double().cpu()
            count += int((batch["labels"][:, 1:] != IGNORE).sum())
    return float(total / max(count, 1))


class _NoSelect:
    enabled = False
    positions = None


# --------------------------------------------------------------------------- packing


def _use_packing(cfg: TrainConfig, model, device) -> bool:
    if cfg.packing == "off":
        return False
    supported = packing_supported(model, device)
    if cfg.packing == "on" and not supported:
        raise ValueError(f"packing: on, but {type(model).__name__} does not keep packed examples apart "
                         "(its logits change when another example shares the row); use packing: auto or off")
    return supported


def packing_supported(model, device=None) -> bool:
    """Two short sequences packed in one row with restarting position ids must give the same
    logits as each sequence alone: then the model builds a block-diagonal mask from them."""
    import torch

    device = device or next(model.parameters()).device
    vocab = model.config.vocab_size
    a = torch.arange(5, 12, device=device) % vocab
    b = torch.arange(20, 29, device=device) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = torch.cat([model(input_ids=x[None], use_cache=False).logits[0] for x in (a, b)])
            row = torch.cat([a, b])[None]
            pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))]).to(device)[None]
            together = model(input_ids=row, position_ids=pos, use_cache=False).logits[0]
        return _same_logits(alone, together, model)
    except Exception:
        return False
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- the plan


def _plan(cfg: TrainConfig, data: Data, tables: list[int], world: int) -> Plan:
    """Every optimizer step's micro-batches, for all epochs, from the seed alone."""
    packed = data.packed
    by_table: dict[int, list[int]] = {}  # table -> its training examples (pairs: pair numbers)
    for i in data.train_idx:
        if data.pairs and i % 2:
            continue
        by_table.setdefault(tables[i], []).append(i // 2 if data.pairs else i)
    table_ids = sorted(by_table)
    weights = None
    if cfg.weights() is not None:
        names = cfg.tables()
        weights = [cfg.weights()[names[t]] for t in table_ids]
    sizes = [len(by_table[t]) for t in table_ids]
    lengths = [len(e.input_ids) for e in data.examples]
    per_step = cfg.grad_accum * world

    def epoch_batches(epoch: int) -> list:
        order = [by_table[table_ids[t]][r] for t, r in epoch_order(sizes, weights, cfg.seed, epoch)]
        if data.pairs:
            return pair_batches(order, lengths, packed=packed, max_len=cfg.max_len, batch_size=cfg.batch_size,
                                batch_tokens=cfg.batch_tokens, seed=cfg.seed * 7919 + epoch)
        if packed:
            rows = [[order[j] for j in row] for row in pack([lengths[i] for i in order], cfg.max_len)]
        else:
            rows = [[i] for i in order]
        return micro_batches(rows, lengths, packed=packed, max_len=cfg.max_len, batch_size=cfg.batch_size,
                             batch_tokens=cfg.batch_tokens, seed=cfg.seed * 7919 + epoch)

    batches: list = []
    epoch_of: list[int] = []
    epoch = 0
    first = epoch_batches(0)
    wanted = (cfg.max_steps * per_step) if cfg.max_steps else max(1, round(cfg.epochs * len(first)))
    while len(batches) < wanted:
        mbs = first if epoch == 0 else epoch_batches(epoch)
        take = mbs[: wanted - len(batches)]
        batches.extend(take)
        epoch_of.extend([epoch] * len(take))
        epoch += 1
    steps = [batches[s:s + per_step] for s in range(0, len(batches), per_step)]
    epoch_of_step = [epoch_of[min(s + per_step, len(batches)) - 1] for s in range(0, len(batches), per_step)]
    return Plan(steps=steps, epoch_of_step=epoch_of_step, packed=packed)


def _eval_batches(cfg: TrainConfig, data: Data) -> list:
    eval_idx, packed = data.eval_idx, data.packed
    if not eval_idx:
        return []
    lengths = [len(e.input_ids) for e in data.examples]
    if data.pairs:
        return pair_batches([i // 2 for i in eval_idx if i % 2 == 0], lengths, packed=packed, max_len=cfg.max_len,
                            batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens, seed=0)
    if packed:
        rows = [[eval_idx[j] for j in row] for row in pack([lengths[i] for i in eval_idx], cfg.max_len)]
    else:
        rows = [[i] for i in eval_idx]
    return micro_batches(rows, lengths, packed=packed, max_len=cfg.max_len, batch_size=cfg.batch_size,
                         batch_tokens=cfg.batch_tokens, seed=0)


def _all_pair_batches(cfg: TrainConfig, data: Data) -> list:
    """Every pair (training and held out) once: what the reference log-probs are computed over."""
    lengths = [len(e.input_ids) for e in data.examples]
    return pair_batches(list(range(len(data.examples) // 2)), lengths, packed=data.packed, max_len=cfg.max_len,
                        batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens, seed=0)


def _eval_steps(cfg: TrainConfig, plan: Plan, has_eval: bool) -> set[int]:
    if not has_eval:
        return set()
    total = len(plan.steps)
    if cfg.eval_every:
        return set(range(cfg.eval_every, total + 1, cfg.eval_every)) | {total}
    return {s + 1 for s in range(total) if _epoch_ends(plan, s)} | {total}


def _epoch_ends(plan: Plan, step: int) -> bool:
    return step == len(plan.steps) - 1 or plan.epoch_of_step[step + 1] != plan.epoch_of_step[step]


def _training_labels(cfg: TrainConfig, examples: list[Example]) -> list[list[int]]:
    """Labels as training sees them: goldfish drops applied per example (eval uses the originals)."""
    if cfg.goldfish is None:
        return [e.labels for e in examples]
    from train.goldfish import apply_goldfish

    g = cfg.goldfish
    return [apply_goldfish(e.input_ids, e.labels, k=g.k, h=g.h, strategy=g.strategy, start=g.start)[0]
            for e in examples]


# --------------------------------------------------------------------------- model


@contextmanager
def _quiet_libraries():
    """transformers' load/save progress bars and peft's deprecation chatter would drown our own
    bar; both are restored afterwards (a notebook user's settings stay theirs)."""
    import warnings

    from datamill.progress import no_hf_loading_bars

    with no_hf_loading_bars(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _mixed_precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    return "bf16" if has_bf16(cfg.device) else "no"


def _load_model(cfg: TrainConfig, model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {"dtype": torch.float32}
    if cfg.lora is not None and cfg.lora.quantize != "none":
        kwargs = _quantized_kwargs(cfg.lora.quantize)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        if cfg.lora.quantize != "none":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        elif cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        lora = cfg.lora
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.targets, task_type="CAUSAL_LM"))
    return model, tokenizer


def _quantized_kwargs(bits: str) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"lora.quantize: {bits} (QLoRA) needs a CUDA GPU; on this machine use quantize: none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"lora.quantize: {bits} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if bits == "4bit":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": quant, "dtype": torch.bfloat16}


def _save_model(cfg: TrainConfig, model, tokenizer, folder: Path, base_dtype=None) -> None:
    """An HF folder: merged weights (LoRA merged into the base) or the adapter alone.

    A merged model is saved in the dtype its base declares, not in the float32 that training
    upcast it to: a bf16 base would otherwise come back twice its size on disk."""
    if cfg.lora is not None and cfg.save == "merged":
        model = model.merge_and_unload()
        if base_dtype is not None and cfg.lora.quantize == "none":  # a bitsandbytes model cannot be cast
            model = model.to(base_dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _declared_dtype(model_dir: str):
    """The weights' dtype a model folder's config.json declares ("dtype", "torch_dtype" before
    transformers 5); None when it declares none or has no config.json (an adapter-only folder)."""
    import torch

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _clip(accelerator, model, max_norm):
    import torch

    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm is not None:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params]))) \
        if params else 0.0


def _mean_over_units(accelerator, sums: dict, units: float) -> dict:
    """Per-micro-batch sums (preference metrics) -> the step's means, over every process."""
    import torch

    if not sums:
        return {}
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="sum")
    return {k: v / max(units, 1e-9) for k, v in zip(keys, values.tolist())}


def _sum_over_processes(accelerator, loss_sum, slots: int, tokens: int):
    import torch

    packed = torch.tensor([float(loss_sum), slots, tokens], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        packed = accelerator.reduce(packed, reduction="sum")
    loss, slots, tokens = packed.tolist()
    return loss, int(slots), int(tokens)


# --------------------------------------------------------------------------- checkpoints


def _latest_checkpoint(state_dir: Path) -> Path | None:
    folder = state_dir / "checkpoints"
    found = sorted(folder.glob("step-*")) if folder.is_dir() else []
    found = [f for f in found if (f / CHECKPOINT_FILE).is_file()]
    return found[-1] if found else None


def _rng_state() -> dict:
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_state(accelerator, model) -> dict:
    """Only what trains (adapters under LoRA): a 7B LoRA checkpoint is megabytes, not gigabytes."""
    model = accelerator.unwrap_model(model)
    # No copy on CPU (torch.save writes the storage as it is): a full fine-tune's checkpoint must
    # not hold a second set of weights in memory.
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(run: Run, step: int) -> None:
    """Everything needed to continue exactly: trainable weights, optimizer, schedule, RNG, position.
    Written to a temp folder and renamed, so a kill leaves the previous checkpoint intact."""
    import torch

    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        folder = run.state_dir / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save({"step": step, "weights": _trainable_state(run.accelerator, run.model),
                    "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                    "rng": _rng_state(), "history": run.history}, tmp / CHECKPOINT_FILE)
        replace_folder(tmp, folder / f"step-{step:08d}")
        for old in sorted(folder.glob("step-*"))[:-run.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    run.accelerator.wait_for_everyone()


def _load_checkpoint(run: Run, folder: Path) -> int:
    """Restore a checkpoint into the run; returns the step to continue from."""
    import torch

    state = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    params = dict(run.accelerator.unwrap_model(run.model).named_parameters())
    with torch.no_grad():
        for name, value in state["weights"].items():
            params[name].copy_(value.to(params[name].device))
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    run.history[:] = state["history"]
    return int(state["step"])


# An epoch's state, `<state_dir>/epochs/epoch-N/` (copied to `<out_dir>/epochs/`): written by
# `_save_epoch_state`, read only through `epoch_states` and `load_epoch_state` below, which other
# stages reach by name (contract: datamill.contracts.EpochState, LoadEpochState).
EPOCH_TENSORS_FILE = "state.pt"  # {"weights": {name: tensor}, "moments": {name: {"exp_avg", "exp_avg_sq"}}}
EPOCH_INFO_FILE = "epoch.json"  # {"epoch": N (1-based), "mean_lr": ..., "step": optimizer steps done}


def _save_epoch_state(run: Run, epoch: int) -> None:
    """Weights and Adam moments by parameter name at the end of an epoch (0-based), plus the
    epoch's mean learning rate (the mean over the epoch's optimizer steps of the rate each step
    was taken with: history's "lr"): what LESS needs to compute Adam-aware gradient features per
    checkpoint and to weight them."""
    import torch

    if not run.accelerator.is_main_process:
        return
    folder = run.state_dir / "epochs" / f"epoch-{epoch + 1}"
    history = run.history
    unwrapped = run.accelerator.unwrap_model(run.model)
    names = {id(p): n for n, p in unwrapped.named_parameters() if p.requires_grad}
    inner = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate wraps the torch optimizer
    moments = {}
    for group in inner.param_groups:
        for p in group["params"]:
            st = inner.state.get(p, {})
            if id(p) in names and "exp_avg" in st:
                moments[names[id(p)]] = {"exp_avg": st["exp_avg"].cpu(), "exp_avg_sq": st["exp_avg_sq"].cpu()}
    lrs = [r["lr"] for r in history if r["epoch"] == epoch]
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"weights": _trainable_state(run.accelerator, run.model), "moments": moments},
               tmp / EPOCH_TENSORS_FILE)
    (tmp / EPOCH_INFO_FILE).write_text(json.dumps({"epoch": epoch + 1, "mean_lr": sum(lrs) / max(len(lrs), 1),
                                                   "step": history[-1]["step"] if history else 0}))
    replace_folder(tmp, folder)


def epoch_states(out_dir: Path) -> list[dict]:
    """The epoch states a run kept (epoch_checkpoints), in epoch order: each folder's epoch.json
    and its path, what `fine_tune` returns as `epoch_states`."""
    folders = sorted((Path(out_dir) / "epochs").glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
    return [{**json.loads((p / EPOCH_INFO_FILE).read_text()), "path": str(p)} for p in folders]


def load_epoch_state(folder) -> dict:
    """The weights and Adam moments of an epoch state's folder (an `epoch_states` entry's path),
    on the CPU. Offered to other stages as `datamill.registry.function("load_epoch_state")`:
    LESS loads its warmup checkpoints with it."""
    import torch

    return torch.load(Path(folder) / EPOCH_TENSORS_FILE, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------- inputs and outputs


def _load_examples(path: str):
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["input_ids", "labels", "truncated", "table", "split"]).to_pydict()
    examples = [Example(list(i), list(l), bool(t)) for i, l, t in
                zip(table["input_ids"], table["labels"], table["truncated"])]
    return examples, table["table"], table["split"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def _peak_memory_mb(accelerator) -> dict:
    import torch

    out = {"peak_rss_mb": _peak_rss_mb()}
    if accelerator.device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM, not ru_maxrss: ru_maxrss keeps the
    high-water mark of the process image before exec, so a trainer started by a big parent
    (e.g. a test runner holding a model) would report the parent's memory."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, kB elsewhere


def _summary(run: Run, seconds: float, resumed_from: int) -> dict:
    cfg, history, totals, accelerator = run.cfg, run.history, run.totals, run.accelerator
    examples, train_labels, train_idx = run.data.examples, run.data.train_labels, run.data.train_idx
    original = sum(sum(1 for x in examples[i].labels[1:] if x != IGNORE) for i in train_idx)
    kept = sum(sum(1 for x in train_labels[i][1:] if x != IGNORE) for i in train_idx)
    losses = [r["loss"] for r in history]
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    out = {
        "steps": len(run.plan.steps),
        "epochs": history[-1]["epoch"] + 1 if history else 0,
        "train_examples": len(train_idx),
        "eval_examples": len(run.data.eval_idx),
        "truncated_examples": sum(1 for i in train_idx if examples[i].truncated),
        "packing": run.data.packed,
        "loss_positions_only": run.select.enabled,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
        "final_eval_loss": evals[-1] if evals else None,
        "first_eval_loss": evals[0] if evals else None,
        "train_seconds": round(seconds, 2),
        "mixed_precision": _mixed_precision(cfg),
        "device": str(accelerator.device),
        "processes": accelerator.num_processes,
        "resumed_from_step": resumed_from,
    }
    if totals["seconds"] > 0:
        out["loss_tokens_per_s"] = round(totals["loss_tokens"] / totals["seconds"], 1)
        out["tokens_per_s"] = round(totals["tokens"] / totals["seconds"], 1)
    if cfg.goldfish is not None:
        out["goldfish_drop_share"] = round(1 - kept / max(original, 1), 4)
    if cfg.preference:
        from train.preference import METRICS

        out.update(objective=cfg.objective, beta=cfg.preference_beta(), train_pairs=len(train_idx) // 2,
                   eval_pairs=len(run.data.eval_idx) // 2)
        last = history[-5:]
        for key in METRICS:  # the last steps' mean, as final_loss
            values = [r[key] for r in last if key in r]
            if values:
                out[f"final_{key.replace('/', '_')}"] = sum(values) / len(values)
        evals = [r for r in history if "eval_rewards/accuracies" in r]
        if evals:
            out["final_eval_rewards_accuracies"] = evals[-1]["eval_rewards/accuracies"]
    out.update(_peak_memory_mb(accelerator))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m train.loop JOB.json   (or: accelerate launch -m train.loop JOB.json)",
              file=sys.stderr)
        return 2
    train(TrainJob.load(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
