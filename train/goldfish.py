"""Goldfish loss masks (Hans et al. 2024; reference: ahans30/goldfish-loss `apply_goldfish`).

A mask is computed per example from its token ids alone, so the same text drops the same
tokens in any batch, row or epoch. Only training uses it; eval losses see every token.

`hash` follows the reference's hash-table variant: a table of 1,000,003 uniform floats from a
generator seeded 2971215073; the target at position t (t >= h-1 in the target sequence) is
dropped iff table[prod(targets[t-h+1 .. t]) mod 1,000,003] < 1/k, the product in int64 with
wrap-around. One deliberate difference: the reference draws the table on the training device,
so CPU and CUDA runs drop different tokens; datamill always draws it on the CPU, so a model
trained on a GPU drops exactly the tokens a CPU run would.
"""

from __future__ import annotations

TABLE_SIZE = 1_000_003
TABLE_SEED = 2971215073

_table = None


def _hash_table():
    global _table
    if _table is None:
        import torch

        generator = torch.Generator(device="cpu").manual_seed(TABLE_SEED)
        _table = torch.rand(TABLE_SIZE, generator=generator)
    return _table


def dropped_targets(targets, *, k: int, h: int, strategy: str = "hash", start: int = 0):
    """Bool tensor (same length as the 1-D int64 `targets`): True where the target leaves the loss."""
    import torch

    n = targets.shape[0]
    drop = torch.zeros(n, dtype=torch.bool)
    if strategy == "static":
        drop[start::k] = True
        return drop
    if n < h:
        return drop
    keys = torch.remainder(targets.to(torch.int64).unfold(0, h, 1).prod(dim=-1), TABLE_SIZE)
    drop[h - 1:] = _hash_table()[keys] < 1.0 / k
    return drop


def apply_goldfish(input_ids: list[int], labels: list[int], *, k: int, h: int, strategy: str = "hash",
                   start: int = 0, ignore_index: int = -100) -> tuple[list[int], int]:
    """Labels of one example with the goldfish drops set to `ignore_index`, and how many
    loss-bearing tokens were dropped. `labels[i]` is the target predicted at position i-1 (HF
    convention), so the target sequence is input_ids[1:]."""
    import torch

    if len(input_ids) < 2:
        return list(labels), 0
    drop = dropped_targets(torch.tensor(input_ids[1:]), k=k, h=h, strategy=strategy, start=start).tolist()
    out = list(labels)
    dropped = 0
    for j, d in enumerate(drop):
        if d and out[j + 1] != ignore_index:
            out[j + 1] = ignore_index
            dropped += 1
    return out, dropped
