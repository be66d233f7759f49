"""The trainer as plain functions, for notebooks and for other stages (through
`datamill.registry.function`, never by import): LESS warms up LoRA with `fine_tune` and computes
gradients on exactly the tokens and loss mask that training uses with `encode_examples`.

    from datamill.registry import function
    result = function("fine_tune")(model_dir, conversations, out_dir, lora={"r": 8}, epochs=4,
                                   epoch_checkpoints=True)
    result["epoch_states"]   # [{"epoch": 1, "mean_lr": ..., "step": ..., "path": ".../epochs/epoch-1"}, ...]
    function("load_epoch_state")(result["epoch_states"][0]["path"])   # {"weights": ..., "moments": ...}

The signatures and dicts are declared in datamill/contracts.py; the epoch states' files are
written and read in train/loop.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from train.config import TrainConfig
from train.data import Example


def encode_examples(model_dir, conversations: list, *, loss_on: str = "assistant", max_len: int = 1024) -> list[Example]:
    """Tokenise conversations (lists of {role, content}) or texts as the `train` step does: chat
    template, labels -100 off the loss, truncation to max_len."""
    from transformers import AutoTokenizer

    from train.data import encode

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [encode(tokenizer, c, loss_on, max_len) for c in conversations]


def fine_tune(model_dir, conversations: list, out_dir, *, state_dir=None, log=None, **settings) -> dict:
    """Fine-tune `model_dir` on conversations; `settings` are `train` step fields (lora, epochs, lr,
    max_len, epoch_checkpoints, ...). The model is saved to out_dir/model. Returns the training
    summary plus `model_dir` and, with epoch_checkpoints, `epoch_states`."""
    import polars as pl

    from train.loop import TrainJob, epoch_states, train

    cfg = TrainConfig(model=str(model_dir), data="conversations", **settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="datamill-train-"))
    state.mkdir(parents=True, exist_ok=True)
    examples = encode_examples(model_dir, conversations, loss_on=cfg.loss_on, max_len=cfg.max_len)
    keep = [e for e in examples if any(x != -100 for x in e.labels)]
    if not keep:
        raise ValueError("no example has a loss-bearing token (no assistant turn within max_len?)")
    tokens = state / "examples.parquet"
    pl.DataFrame({"input_ids": [e.input_ids for e in keep], "labels": [e.labels for e in keep],
                  "truncated": [e.truncated for e in keep], "table": [0] * len(keep),
                  "split": ["train"] * len(keep)}).write_parquet(tokens)
    summary = train(TrainJob(config=cfg.model_dump(mode="json"), model_dir=str(model_dir), examples=str(tokens),
                             out_dir=str(out_dir), state_dir=str(state)), log=log)
    summary["model_dir"] = str(out_dir / "model")
    summary["epoch_states"] = epoch_states(out_dir)
    return summary
