"""NEFTune (Jain et al. 2023; reference: neelsjain/NEFTune): noise on the input embeddings.

During training only, the embedding output e gets e + eps * alpha / sqrt(L * d) with eps ~ U(-1, 1)
drawn fresh on every forward, detached from the graph. `nonpad` (the paper's code): L is the
length of the sequence a token belongs to (in a packed row: its own example) and padding gets
no noise. `padded` (HF Trainer / TRL): L is the row length and every position gets noise.

It is a forward hook on the input embedding module, active only while the module is in
training mode, and removed when training ends (`with neftune(model, ...)`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager


class NEFTuneHook:
    def __init__(self, alpha: float, length: str, hidden_size: int):
        self.alpha, self.length, self.hidden_size = alpha, length, hidden_size
        self.seq_len = None  # [B, T] tensor set before each training forward (see `set_batch`)

    def set_batch(self, seq_len) -> None:
        self.seq_len = seq_len

    def __call__(self, module, inputs, output):
        if not module.training:
            return output
        import torch

        if self.length == "padded" or self.seq_len is None:
            scale = self.alpha / math.sqrt(output.shape[1] * self.hidden_size)
            noise = torch.empty_like(output).uniform_(-1, 1) * scale
        else:
            lengths = self.seq_len.to(device=output.device, dtype=output.dtype)
            scale = torch.where(lengths > 0, self.alpha / torch.sqrt(lengths.clamp(min=1) * self.hidden_size),
                                torch.zeros_like(lengths))
            noise = torch.empty_like(output).uniform_(-1, 1) * scale.unsqueeze(-1)
        return output + noise.detach()


@contextmanager
def neftune(model, alpha: float, length: str = "nonpad"):
    """Attach the hook to `model`'s input embeddings for the duration of the block."""
    embeddings = model.get_input_embeddings()
    hook = NEFTuneHook(alpha, length, embeddings.weight.shape[1])
    handle = embeddings.register_forward_hook(hook)
    try:
        yield hook
    finally:
        handle.remove()
