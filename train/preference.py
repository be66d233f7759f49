"""Preference objectives on the training loop's path: DPO, IPO, SimPO.

A pair is two tokenised examples, chosen and rejected (prompt + completion, labels on the
completion only). The loop sums each example's completion log-probability with one forward over
a micro-batch (`sequence_logps`), and `pair_losses` turns those sums into per-pair losses and
rewards; the loop averages over the step's pairs, so a step's gradient is the mean over its pairs
whatever the micro-batching, as TRL's DPOTrainer takes the mean over its batch.

    dpo    -log σ(β·[(π_c − ref_c) − (π_r − ref_r)])                          (Rafailov et al. 2023)
    ipo    ([(π_c − ref_c)/|c| − (π_r − ref_r)/|r|] − 1/(2β))²               (Azar et al. 2023; TRL's
           length-normalised form, which the IPO authors confirmed)
    simpo  -log σ(β·[π_c/|c| − π_r/|r|] − γ)                                 (Meng et al. 2024; no reference)

π and ref are summed log-probabilities of a completion's tokens under the policy and the reference;
|c| and |r| the completions' token counts. Rewards are β·(π − ref) (SimPO: β·π/|·|), TRL's
`rewards/chosen`, `rewards/rejected`; `rewards/accuracies` is the share of pairs whose chosen reward
is higher, `rewards/margins` the mean difference.

The reference log-probs are computed once, before the first step, and kept in the step's state
folder (`reference_logps`): a resumed run reads them back instead of recomputing. With LoRA and
`reference: base` they come from the model itself with its adapters disabled, so no second copy of
the model is loaded; a full fine-tune with `reference: base` computes them before its weights move.
"""

from __future__ import annotations

from pathlib import Path

REFERENCE_FILE = "reference_logps.pt"
OBJECTIVES = ("dpo", "ipo", "simpo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def sequence_logps(model, batch: dict, select) -> tuple:
    """Per-example sums of log p(label token) over loss-bearing tokens, and their token counts:
    two [n] tensors, n = the micro-batch's examples in row order (collate's `segment`)."""
    import torch
    import torch.nn.functional as F

    from train.loop import loss_logits

    logits, targets, positions = loss_logits(model, batch, select)
    segment = batch["segment"][:, 1:][positions]
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    n = int(batch["segment"].max()) + 1
    sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, segment, token_logps)
    counts = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, segment, torch.ones_like(token_logps))
    return sums, counts


def split_sides(values):
    """[chosen_0, rejected_0, chosen_1, ...] -> (chosen, rejected)."""
    return values[0::2], values[1::2]


def pair_losses(objective: str, beta: float, gamma: float, logps, counts, ref_logps=None) -> tuple:
    """Per-pair losses, chosen rewards and rejected rewards ([pairs] each) from per-example sums
    in chosen/rejected order. `ref_logps`: the reference's sums in the same order (not for simpo)."""
    import torch.nn.functional as F

    pi_c, pi_r = split_sides(logps)
    n_c, n_r = (x.clamp(min=1.0) for x in split_sides(counts))
    if objective == "simpo":
        avg_c, avg_r = pi_c / n_c, pi_r / n_r
        losses = -F.logsigmoid(beta * (avg_c - avg_r) - gamma)
        return losses, beta * avg_c.detach(), beta * avg_r.detach()
    ref_c, ref_r = split_sides(ref_logps)
    ratio_c, ratio_r = pi_c - ref_c, pi_r - ref_r
    if objective == "dpo":
        losses = -F.logsigmoid(beta * (ratio_c - ratio_r))
    elif objective == "ipo":
        losses = (ratio_c / n_c - ratio_r / n_r - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference objective '{objective}' (expected one of {', '.join(OBJECTIVES)})")
    return losses, beta * ratio_c.detach(), beta * ratio_r.detach()


def metric_sums(losses, rewards_c, rewards_r, logps) -> dict:
    """The TRL metrics of a micro-batch, as sums over its pairs (the loop divides by the step's pairs)."""
    pi_c, pi_r = split_sides(logps.detach())
    return {"rewards/chosen": float(rewards_c.sum()), "rewards/rejected": float(rewards_r.sum()),
            "rewards/accuracies": float((rewards_c > rewards_r).float().sum()),
            "rewards/margins": float((rewards_c - rewards_r).sum()),
            "logps/chosen": float(pi_c.sum()), "logps/rejected": float(pi_r.sum())}


def reference_logps(model, micro_batches: list, tensors, state_dir: Path, accelerator, *, n_examples: int,
                    select, reference_dir: str | None = None):
    """Every example's summed completion log-prob under the reference, as a [n_examples] tensor on
    the CPU: read from `state_dir` when an earlier attempt of this step computed them.

    `micro_batches` cover every example once; `tensors(mb)` makes a micro-batch's tensors. The
    reference is `reference_dir` (another model, loaded for this and freed), else `model` with its
    LoRA adapters disabled (peft) or as it is before training (full fine-tuning). On several
    processes each computes a share and all read every share back."""
    import torch

    from train.loop import _NoSelect as NoSelect  # a model loaded here has no loss-position hook

    path = Path(state_dir) / REFERENCE_FILE
    if path.is_file():
        return torch.load(path, map_location="cpu")
    rank, world = accelerator.process_index, accelerator.num_processes
    part = Path(state_dir) / f".reference-part-{rank}.pt"
    values = torch.full((n_examples,), float("nan"), dtype=torch.float64)
    reference, owned = _reference_model(model, reference_dir, accelerator)
    was_training = reference.training
    reference.eval()
    try:
        with torch.no_grad(), _adapters_off(reference, owned):
            for mb in micro_batches[rank::world]:
                with accelerator.autocast():
                    sums, _ = sequence_logps(reference, tensors(mb), select if not owned else NoSelect())
                order = [i for row in mb for i in row]
                values[order] = sums.double().cpu()
    finally:
        reference.train(was_training)
        if owned:
            del reference
    torch.save(values, part)
    accelerator.wait_for_everyone()
    merged = torch.full((n_examples,), float("nan"), dtype=torch.float64)
    for r in range(world):
        share = torch.load(Path(state_dir) / f".reference-part-{r}.pt", map_location="cpu")
        merged = torch.where(torch.isnan(share), merged, share)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(merged, tmp)
        tmp.replace(path)
        for r in range(world):
            (Path(state_dir) / f".reference-part-{r}.pt").unlink(missing_ok=True)
    return merged


def _reference_model(model, reference_dir: str | None, accelerator):
    """(the module that scores the reference, whether it was loaded here)."""
    if reference_dir is None:
        return accelerator.unwrap_model(model), False
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
    return reference.to(accelerator.device), True


def _adapters_off(model, owned: bool):
    """peft's `disable_adapter()` on the policy itself: the base model's log-probs."""
    from contextlib import nullcontext

    if not owned and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return nullcontext()


def disable_dropout(model) -> None:
    """Dropout off everywhere (LoRA's included), as TRL's DPOTrainer does by default: with it on,
    the policy's log-probs at step 0 would differ from the reference's for the same weights."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
