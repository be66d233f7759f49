"""What the stages offer each other, declared in core: the signature of every cross-stage function
and the dicts it takes and returns.

Stages never import each other: one offers a function under a name (entry-point group
`datamill.functions` in pyproject.toml) and another fetches it with
`datamill.registry.function(name)`. Without this module a function's shape would be known only
to the stage that offers it and to the one that calls it. Each Protocol below is the callable a
name resolves to, and `FUNCTIONS` maps the names to them; tests/test_contracts.py checks that
every name the code fetches is declared here, is offered, and has the declared parameters.

A file one stage writes and another reads has one owner, which offers the reader beside its
writer: the trainer's per-epoch state (`<epoch folder>/state.pt`) is read with
`load_epoch_state`, never opened by the stage that uses it.

Types only: nothing heavy is imported (numpy and torch only for type checkers).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypedDict, Union

if TYPE_CHECKING:
    import numpy as np
    import torch

PathLike = Union[str, Path]


class Message(TypedDict):
    role: str  # "system", "user" or "assistant"
    content: str


Conversation = list[Message]


# --------------------------------------------------------------------------- fine_tune


class EpochState(TypedDict):
    """One entry of `fine_tune(...)["epoch_states"]`: what training kept at the end of an epoch
    (with `epoch_checkpoints`). `path` is the epoch's folder, read with `load_epoch_state`."""

    epoch: int  # 1-based
    mean_lr: float  # the mean over the epoch's optimizer steps of the rate each step was taken with
    step: int  # optimizer steps done when the epoch ended
    path: str  # <out_dir>/epochs/epoch-<epoch>


class _FineTuneOutputs(TypedDict):
    model_dir: str  # the trained model (an HF folder, or the adapter alone with save: adapter)
    epoch_states: list[EpochState]  # one per epoch with epoch_checkpoints, else empty


class FineTuneResult(_FineTuneOutputs, total=False):
    """`fine_tune`'s result: the outputs above plus the training summary (summary.json), of which
    these are the keys always present; others (tokens_per_s, goldfish_drop_share, peak memory)
    depend on the settings."""

    steps: int
    epochs: int
    train_examples: int
    eval_examples: int
    truncated_examples: int
    first_loss: float | None
    final_loss: float | None
    trainable_params: int
    total_params: int


class FineTune(Protocol):
    """`fine_tune`, offered by train (train/api.py); called by selection's LESS to warm up LoRA
    and keep every epoch's state (selection/less_method.py).

    Fine-tunes `model_dir` on conversations (or plain texts); `settings` are `train` step fields
    (lora, epochs, lr, max_len, epoch_checkpoints, save, ...). `state_dir` holds the resume
    checkpoints (a temp folder when None); `log(metrics, step)` receives metrics as they come."""

    def __call__(self, model_dir: PathLike, conversations: list[Conversation | str], out_dir: PathLike, *,
                 state_dir: PathLike | None = None, log: Callable[[dict, int], None] | None = None,
                 **settings: Any) -> FineTuneResult: ...


# --------------------------------------------------------------------------- load_epoch_state


class AdamMoments(TypedDict):
    exp_avg: torch.Tensor  # Adam's first moment, the parameter's shape
    exp_avg_sq: torch.Tensor  # Adam's second moment


class EpochTensors(TypedDict):
    """What an epoch state's folder holds besides its `EpochState` fields, by parameter name
    (the trainable ones: LoRA's A and B under LoRA), on the CPU."""

    weights: dict[str, torch.Tensor]
    moments: dict[str, AdamMoments]  # parameters the optimizer has stepped (all of `weights`)


class LoadEpochState(Protocol):
    """`load_epoch_state`, offered by train beside the code that writes the state (train/loop.py);
    called by selection's LESS to load each warmup checkpoint (selection/less.py).

    `folder` is an `EpochState`'s `path`."""

    def __call__(self, folder: PathLike) -> EpochTensors: ...


# --------------------------------------------------------------------------- encode_examples


class EncodedExample(Protocol):
    """One tokenised example (train.data.Example)."""

    input_ids: list[int]
    labels: list[int]  # input_ids where the loss is taken, -100 elsewhere
    truncated: bool  # cut to max_len


class EncodeExamples(Protocol):
    """`encode_examples`, offered by train (train/api.py); called by selection's LESS (and
    bench/less_grads.py) to compute gradients on exactly the tokens and loss mask training uses.

    Tokenises conversations (chat template) or texts as the `train` step does. `loss_on`:
    "assistant" (assistant tokens only) or "all"."""

    def __call__(self, model_dir: PathLike, conversations: list[Conversation | str], *,
                 loss_on: str = "assistant", max_len: int = 1024) -> list[EncodedExample]: ...


# --------------------------------------------------------------------------- log_density, neighbours


class LogDensity(Protocol):
    """`log_density`, offered by selection (selection/density.py); for other stages to put a
    text's density under a distribution next to their results (tests call it; no stage yet).

    Each query's log density under the reference texts: float array [len(queries)].
    `embedder`: a model folder (default: all-MiniLM-L6-v2); `bandwidth`: "median", "scott" or a
    number."""

    def __call__(self, queries: list[str], reference: list[str], *, embedder: PathLike | None = None,
                 bandwidth: str | float = "median") -> np.ndarray: ...


class NeighboursResult(TypedDict):
    log_density: np.ndarray  # [len(queries)] as `log_density`
    nearest: np.ndarray  # [len(queries)] index of the most similar reference text
    similarity: np.ndarray  # [len(queries)] its cosine similarity


class Neighbours(Protocol):
    """`neighbours`, offered by selection (selection/density.py); called by evals' evaluate step
    for each eval example's density under the training rows and its nearest training row
    (evals/evaluate_step.py). Both sides are embedded once."""

    def __call__(self, queries: list[str], reference: list[str], *, embedder: PathLike | None = None,
                 bandwidth: str | float = "median") -> NeighboursResult: ...


# --------------------------------------------------------------------------- contamination


class TaskOverlap(TypedDict):
    instances: int  # the eval task's unique instances
    overlapping: int  # those that share enough n-grams with a training prompt
    share: float  # overlapping / instances (0 when there are none)


class Contamination(Protocol):
    """`contamination`, offered by evals (evals/contamination.py); called by the core's
    contamination warning (datamill/overlap.py).

    How much of each eval task the training prompts `texts` contain, by Tulu 3's rule (an eval
    instance overlaps when at least `threshold` of its `n`-grams appear in a training text).
    `tasks`: {task or group name: its include folders beyond the shipped ones}; groups expand to
    their member tasks, which key the result. `strip_template`: leave out the text every prompt
    of a task's template shares."""

    def __call__(self, texts: list[str], tasks: dict[str, list[PathLike]], *, n: int = 8,
                 threshold: float = 0.5, strip_template: bool = True) -> dict[str, TaskOverlap]: ...


FUNCTIONS: dict[str, type] = {
    "fine_tune": FineTune,
    "load_epoch_state": LoadEpochState,
    "encode_examples": EncodeExamples,
    "log_density": LogDensity,
    "neighbours": Neighbours,
    "contamination": Contamination,
}
"""Every cross-stage function: its name (as `datamill.registry.function` fetches it) -> the
Protocol of the callable it resolves to."""
