"""LESS (Xia et al. 2024; reference: princeton-nlp/LESS): select the candidates whose LoRA gradients
point where the target examples' gradients point.

1. Warm up LoRA on a random slice of the pool (default 5%, 4 epochs), keeping each epoch's
   adapter weights and Adam moments: the train stage's `fine_tune`, through the core registry
   (each epoch's state read back with its `load_epoch_state`).
2. Per checkpoint c: each candidate's gradient g of its mean next-token loss on assistant tokens,
   turned into Adam's update direction with that checkpoint's moments (as LESS's
   `obtain_gradients_with_adam`: m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2,
   m' / sqrt(v' + eps), no bias correction, eps inside the root); each target's plain gradient.
3. Project with a fixed seeded Rademacher (+-1) matrix (the same for every checkpoint, candidates
   and targets; TRAK's projector, without 1/sqrt(d)), and L2-normalise: dot products are cosines.
4. score_i = aggregate over targets j of sum_c w_c <T_c[i], V_c[j]>, w_c = mean lr of epoch c /
   sum of them (the mean over the epoch's optimizer steps of the rate each step was taken
   with); aggregate = mean (LESS with one target task), max, or subtask (LESS's setting for
   MMLU, BBH and TyDiQA: the mean within each target subtask, then the max over subtasks).

Per-example gradients come from one backward pass per batch: a LoRA factor is a linear map
y = W x, and with a summed loss over independent examples the gradient reaching y[b] belongs to
example b alone, so each example's dL_b/dW = sum over its tokens of grad_y[b,t] (x) x[b,t]: an
einsum over activations and output gradients caught by hooks. `per_example_grads(..., loop=True)`
does one backward per example instead, the reference the tests compare against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # LESS hard-codes these (adamw_torch defaults)
PROJECTION_BLOCK = 1024  # parameter rows of the random matrix generated at a time
PROJECTION_ELEMENTS = 50_000_000  # about how many gradient values (rows x width) to project at once


# --------------------------------------------------------------------------- per-example gradients


class _LinearTaps:
    """Hooks on LoRA's linear factors: each one's input and the gradient reaching its output."""

    def __init__(self, modules: dict[str, object]):
        self.inputs: dict[str, object] = {}
        self.grads: dict[str, object] = {}
        self.handles = [module.register_forward_hook(self._tap(name)) for name, module in modules.items()]

    def _tap(self, name):
        def save_grad(grad):
            self.grads[name] = grad.detach()

        def hook(module, args, output):
            self.inputs[name] = args[0].detach()
            output.register_hook(save_grad)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def lora_linears(model) -> dict[str, object]:
    """parameter name -> the nn.Linear holding it, for every trainable weight (LoRA A and B)."""
    import torch

    out = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
            out[f"{module_name}.weight"] = module
    return out


def per_example_grads(model, batches, *, loop: bool = False):
    """Yield {param name: [B, *shape] tensor} of per-example gradients of each example's mean
    token loss, for each batch dict (input_ids, labels, attention_mask; right-padded)."""
    import torch

    linears = lora_linears(model)
    if not linears:
        raise ValueError("the model has no trainable linear layers (LoRA adapters expected)")
    device = next(model.parameters()).device
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}  # a no-op on the CPU
        if loop:
            yield _looped(model, batch, linears)
            continue
        taps = _LinearTaps(linears)
        try:
            model.zero_grad(set_to_none=True)
            losses = _mean_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            losses.sum().backward()  # examples are independent: each output gradient row is one example's
            out = {}
            for name, module in linears.items():
                x, g = taps.inputs[name], taps.grads[name]  # [B, T, in], [B, T, out]
                out[name] = torch.einsum("bto,bti->boi", g, x)
        finally:
            taps.remove()
            model.zero_grad(set_to_none=True)
        yield out


def _mean_losses(model, input_ids, attention_mask, labels):
    """Each example's mean cross-entropy over its loss-bearing tokens (HF's per-example loss).
    Logits are computed only where a loss is taken (the decoder's hidden states at those
    positions through the output layer): most tokens are prompt tokens."""
    import torch
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    positions = targets != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][positions]).float()
    per_token = F.cross_entropy(logits, targets[positions], reduction="none")
    example = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[positions]
    sums = torch.zeros(labels.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(0, example, per_token)
    return sums / positions.sum(1).clamp(min=1)


def _looped(model, batch, linears):
    import torch

    rows = []
    for b in range(batch["input_ids"].shape[0]):
        model.zero_grad(set_to_none=True)
        n = int(batch["attention_mask"][b].sum())
        ids = batch["input_ids"][b:b + 1, :n]
        _mean_losses(model, ids, torch.ones_like(ids), batch["labels"][b:b + 1, :n]).sum().backward()
        rows.append({name: m.weight.grad.detach().clone() for name, m in linears.items()})
    model.zero_grad(set_to_none=True)
    return {name: torch.stack([r[name] for r in rows]) for name in linears}


# --------------------------------------------------------------------------- features


def adam_direction(g, exp_avg, exp_avg_sq):
    """LESS's Adam-aware gradient: the update direction one Adam step would take from (m, v)."""
    import torch

    m = BETA1 * exp_avg + (1 - BETA1) * g
    v = BETA2 * exp_avg_sq + (1 - BETA2) * g * g
    return m / torch.sqrt(v + EPS)


def project(flat, dim: int, seed: int):
    """[N, D] -> [N, dim] with a seeded Rademacher matrix generated block by block (never stored
    whole: D x 8192 would not fit in memory for a 1B model's adapters)."""
    import torch

    out = torch.zeros(flat.shape[0], dim, dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[1], PROJECTION_BLOCK):
        stop = min(start + PROJECTION_BLOCK, flat.shape[1])
        # generated on the CPU whatever the device: the same matrix everywhere
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start // PROJECTION_BLOCK)
        block = torch.randint(0, 2, (stop - start, dim), generator=generator, dtype=torch.int8).float() * 2 - 1
        out += flat[:, start:stop].float() @ block.to(flat.device)
    return out


def features(model, examples, names: list[str], moments: dict | None, dim: int, seed: int, *,
             batch_size: int = 8, every: int | None = None, pad_id: int = 0, progress=None,
             loop: bool = False) -> np.ndarray:
    """Normalised projected (Adam-aware when `moments` is given) gradients, one row per example,
    in the examples' order. Batches are formed from length-sorted examples (little padding)."""
    order = length_order(examples)
    rows = sorted_features(model, [examples[i] for i in order], names, moments, dim, seed, batch_size=batch_size,
                           every=every, pad_id=pad_id, progress=progress, loop=loop)
    return in_input_order(rows, order)


def length_order(examples) -> np.ndarray:
    """The order `features` batches examples in: by length, ties in input order."""
    return np.argsort([len(e.input_ids) for e in examples], kind="stable")


def in_input_order(sorted_rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Rows computed in `order` (from length_order) put back in the examples' order."""
    rows = np.empty_like(sorted_rows)
    rows[order] = sorted_rows
    return rows


def gradient_width(model, names: list[str]) -> int:
    """Values in one example's flattened gradient over the parameters `names`."""
    params = dict(model.named_parameters())
    return sum(params[name].numel() for name in names)


def projection_every(batch_size: int, width: int) -> int:
    """How many batches' gradients are projected together: as many as PROJECTION_ELEMENTS holds,
    at least one. A count of whole batches, not a running size, so that where the chunks start
    is known in advance: a slice of the sorted examples starting at a multiple of
    every * batch_size meets exactly the chunks of one pass (a matmul's rounding may depend on
    its shape, and LESS's features must not depend on how the work was split)."""
    return max(1, PROJECTION_ELEMENTS // (batch_size * width))


def sorted_features(model, examples, names: list[str], moments: dict | None, dim: int, seed: int, *,
                    batch_size: int = 8, every: int | None = None, pad_id: int = 0, progress=None,
                    loop: bool = False) -> np.ndarray:
    """`features` of examples already in batching order: batches of `batch_size` in this order,
    the gradients of `every` batches (default: projection_every) projected together so that
    rows x parameters stays bounded. Runs on the model's device; the result is on the CPU."""
    import torch

    every = every or projection_every(batch_size, gradient_width(model, names))
    device = next(model.parameters()).device
    adam = None if moments is None else {
        name: (moments[name]["exp_avg"].flatten()[None].to(device),
               moments[name]["exp_avg_sq"].flatten()[None].to(device)) for name in names}
    out, pending = [], []

    def flush():
        if pending:
            projected = project(torch.cat(pending), dim, seed)
            out.append(torch.nn.functional.normalize(projected, dim=1).cpu().numpy())
            pending.clear()

    for grads in per_example_grads(model, batches_of(examples, batch_size, pad_id), loop=loop):
        parts = []
        for name in names:
            g = grads[name].flatten(1)
            if adam is not None:
                g = adam_direction(g, *adam[name])
            parts.append(g)
        pending.append(torch.cat(parts, dim=1))
        if progress:
            progress(pending[-1].shape[0])
        if len(pending) == every:
            flush()
    flush()
    return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)


AGGREGATES = ("mean", "max", "subtask")


def less_scores(candidate_feats: list[np.ndarray], target_feats: list[np.ndarray], lrs: list[float],
                aggregate: str = "mean", groups=None) -> np.ndarray:
    """score_i = aggregate_j sum_c w_c <T_c[i], V_c[j]> with w_c = lr_c / sum(lr).

    aggregate: "mean" over all targets, "max" over them, or "subtask": `groups` holds each
    target's subtask label; the mean over each subtask's targets (the mean of per-example
    cosines, not the cosine with a mean gradient), then the max over subtasks, as LESS's
    matching.py. Unlike the reference (a reshape to [N, n_subtasks, -1]), the targets of a
    subtask need not be contiguous nor the subtasks equal in size: targets are grouped by label."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate: expected one of {', '.join(AGGREGATES)}, found {aggregate!r}")
    weights = np.asarray(lrs, dtype=np.float64)
    weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(lrs), 1 / len(lrs))
    total = sum(w * (t.astype(np.float64) @ v.astype(np.float64).T)
                for w, t, v in zip(weights, candidate_feats, target_feats))
    if aggregate == "mean":
        return total.mean(axis=1)
    if aggregate == "max":
        return total.max(axis=1)
    labels = list(groups) if groups is not None else None
    if labels is None or len(labels) != total.shape[1]:
        raise ValueError(f"aggregate 'subtask' needs one subtask label per target: found "
                         f"{'none' if labels is None else len(labels)} for {total.shape[1]} targets")
    index: dict = {}
    column = np.array([index.setdefault(label, len(index)) for label in labels])
    membership = np.zeros((total.shape[1], len(index)))
    membership[np.arange(total.shape[1]), column] = 1.0
    means = (total @ membership) / membership.sum(axis=0)  # [N, subtasks]
    return means.max(axis=1)


def batches_of(examples, batch_size: int, pad_id: int):
    """Right-padded tensors of tokenised examples (input_ids, labels) in input order."""
    import torch

    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


def load_checkpoint_model(base_dir: Path, lora: dict, state_path: Path):
    """The base model with LoRA adapters set to a warmup checkpoint's weights (eval mode)."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from datamill.progress import no_hf_loading_bars
    from datamill.registry import function

    with no_hf_loading_bars():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=lora["targets"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, config)
    state = function("load_epoch_state")(state_path)  # the trainer owns the file's format
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["weights"].items():
            params[name].copy_(value)
    return model.eval(), state["moments"]
