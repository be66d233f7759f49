"""The `train` step's settings: every field documents itself (and feeds `datamill schema`).

Imported while specs are validated, so nothing heavy here: pydantic only.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from datamill.step import StepConfig, optional_section


class LoraConfig(StepConfig):
    """Low-rank adapters (peft). Only adapter weights train; the base stays frozen."""

    r: int = Field(8, ge=1)
    """Adapter rank."""
    alpha: float = Field(16, gt=0)
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input."""
    targets: Union[list[str], Literal["all-linear"]] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Module names to adapt (attention projections by default), or `all-linear`."""
    quantize: Literal["none", "4bit", "8bit"] = "none"
    """QLoRA: load the frozen base in 4 or 8 bit with bitsandbytes (needs a CUDA GPU and
    `pip install bitsandbytes`)."""


class GoldfishConfig(StepConfig):
    """Goldfish loss: leave a pseudo-random 1/k of the tokens out of the loss, so the model
    cannot learn passages verbatim (Hans et al. 2024)."""

    k: int = Field(4, ge=2)
    """Drop about one token in k from the loss."""
    h: int = Field(13, ge=1)
    """`hash`: the drop decision hashes the h tokens ending at the target (the paper's h=13), so
    the same text drops the same tokens wherever it appears."""
    strategy: Literal["hash", "static"] = "hash"
    """`hash` (the reference's hash-table variant) or `static`: drop target positions
    start, start+k, start+2k, ... of every example."""
    start: int = Field(0, ge=0)
    """`static`: first dropped position."""


class NEFTuneConfig(StepConfig):
    """NEFTune: uniform noise on the input embeddings while training (Jain et al. 2023)."""

    alpha: float = Field(5.0, gt=0)
    """Noise scale; the noise is U(-1, 1) * alpha / sqrt(L * d)."""
    length: Literal["nonpad", "padded"] = "nonpad"
    """L in the scale: each sequence's non-pad length with no noise on padding (the paper's code),
    or the padded row length with noise everywhere (the HF Trainer / TRL variant)."""


class LaunchConfig(StepConfig):
    """Train in several processes (one per GPU): the same loop (train/loop.py) under
    `accelerate launch`, or, on a Ray executor, as Ray Train workers (TorchTrainer)."""

    num_processes: int = Field(2, ge=1)
    """Processes (one per GPU). Each optimizer step takes `grad_accum` micro-batches in every
    process, so the global batch is batch_size x grad_accum x num_processes."""
    config_file: Optional[str] = None
    """An Accelerate config file (relative to the spec) for FSDP or DeepSpeed; absent: DDP.
    Its `num_processes` and `mixed_precision` are overridden by ours and by `precision`.
    An error on a Ray executor (Ray Train runs DDP)."""
    timeout_s: Optional[float] = Field(None, gt=0)
    """Stop the processes after this many seconds and fail the step (a hung rendezvous fails
    instead of waiting forever; a rerun resumes from the last checkpoint). Default: no limit.
    How the work runs, not what it makes: not in the cache key."""


class TrainConfig(StepConfig):
    """Fine-tune a causal LM on instruction tables (Accelerate; LoRA or full; packing, goldfish, NEFTune)."""

    model: str
    """Base model: a `models:` name, a trained step's name, or a model reference."""
    data: Union[str, list[str], dict[str, float]]
    """Training table, a list of tables, or tables with mixture weights (`{a: 0.7, b: 0.3}`: each
    epoch draws that share of examples from each table; a small table is repeated to fill it).
    Preference objectives read preference tables (`prompt`, `chosen`, `rejected`: a `pairs` step's
    output, or a `schema: preference` source)."""
    column: str = "messages"
    """Column holding the conversation (list of {role, content}), or plain text for `loss_on: all`.
    Not used by preference objectives."""

    objective: Literal["sft", "dpo", "ipo", "simpo"] = "sft"
    """What the loss is: `sft` (next-token cross-entropy), or a preference objective on
    chosen/rejected pairs: `dpo` (Rafailov et al.), `ipo` (Azar et al., TRL's length-normalised
    form) or `simpo` (Meng et al.: length-normalised, no reference model). See train/preference.py."""
    beta: Optional[float] = Field(None, gt=0)
    """Preference objectives: β, the strength of the pull toward the reference (default 0.1 for
    dpo and ipo, 2.0 for simpo, as TRL's defaults)."""
    gamma: float = Field(0.5, ge=0)
    """simpo: the target reward margin γ."""
    reference: str = "base"
    """dpo, ipo: the reference model. `base`: the model being trained, as it starts (with LoRA, the
    base with adapters disabled: no second copy is loaded); or a `models:` name, a trained step's
    name, or a model reference. Its log-probs are computed once and kept with the step."""
    eval_data: Optional[str] = None
    """Held-out table for the eval loss. Default: `eval_fraction` of the training rows."""
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    """Share of the training rows held out for the eval loss when `eval_data` is not set."""
    eval_every: Optional[int] = Field(None, ge=1)
    """Eval loss every N optimizer steps (and at the end). Default: at the end of each epoch."""

    epochs: float = Field(1.0, gt=0)
    """Passes over the data (fractions allowed). `max_steps` wins when set."""
    max_steps: Optional[int] = Field(None, ge=1)
    """Stop after this many optimizer steps."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate (2e-4 suits LoRA; use ~2e-5 for full fine-tuning)."""
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup: float = Field(0.03, ge=0)
    """Warmup: a share of the steps when < 1, else a number of steps."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    """Clip the gradient norm (null: no clipping)."""
    batch_size: int = Field(8, ge=1)
    """Rows per micro-batch (packing: rows of `max_len` tokens; else examples)."""
    batch_tokens: Optional[int] = Field(None, ge=1)
    """Instead of `batch_size`: tokens per micro-batch (padding counted), so short examples come in
    bigger batches. With packing it sets rows = batch_tokens // max_len."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    max_len: int = Field(1024, ge=8)
    """Most tokens per example (longer ones are truncated and counted) and the packed row length."""
    packing: Literal["auto", "on", "off"] = "auto"
    """Pack examples into rows of `max_len` tokens with position ids restarting per example, so no
    example attends to another. `auto`: on when a start-up check confirms the model honours packed
    position ids, else padded batches of similar lengths."""
    loss_on: Literal["assistant", "all", "last_turn"] = "assistant"
    """Tokens that carry the loss: every assistant turn, every token, or the last assistant turn."""
    seed: int = 0
    """Seed of data order, the held-out split, adapter init, dropout and NEFTune noise."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision (Accelerate). auto: bf16 on a GPU that supports it, else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% slower."""
    device: str = "auto"
    """cpu, cuda, mps (auto: what Accelerate picks). Not part of the cache key."""

    launch: Optional[LaunchConfig] = None
    """Several processes/GPUs (`launch: {num_processes: 8}`): `accelerate launch` on this machine,
    Ray Train workers on a Ray executor. Absent: one process, inside `datamill run`. Mixed
    precision is `precision` either way."""

    lora: Optional[LoraConfig] = None
    """LoRA adapters (`lora: {r: 8}`; `lora: true` for defaults). Absent: full fine-tuning."""
    goldfish: Optional[GoldfishConfig] = None
    """Goldfish loss (`goldfish: {k: 4}`; `goldfish: true` for defaults)."""
    neftune: Optional[NEFTuneConfig] = None
    """NEFTune embedding noise (`neftune: {alpha: 5}`; `neftune: true` for defaults)."""

    save: Literal["merged", "adapter"] = "merged"
    """LoRA: save the merged model (a plain HF folder that transformers, lm-eval and vLLM load), or
    the adapter alone (small; transformers with peft installed loads it over the base)."""
    checkpoint_every: Optional[int] = Field(50, ge=1)
    """Save model, optimizer, scheduler, RNG and data position every N steps, so a killed run
    resumes there (null: never). Not part of the cache key."""
    keep_checkpoints: int = Field(1, ge=1)
    """Resume checkpoints kept (older ones are deleted). Not part of the cache key."""
    epoch_checkpoints: bool = False
    """Also keep the weights and optimizer state at the end of every epoch in the output
    (`epochs/epoch-N`), e.g. for LESS gradient features."""
    log_every: int = Field(1, ge=1)
    """Log training metrics every N optimizer steps. Not part of the cache key."""
    log_model: bool = False
    """Upload the final model to MLflow as an artifact (default: only its path is logged, keeping
    the store small)."""

    @field_validator("lora", "goldfish", "neftune", "launch", mode="before")
    @classmethod
    def _true_means_defaults(cls, value):
        return optional_section(value)

    @field_validator("packing", mode="before")
    @classmethod
    def _yaml_on_off(cls, value):
        # YAML reads a bare `on`/`off` as a boolean
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _consistent(self):
        if self.objective != "sft":
            if self.goldfish is not None:
                raise ValueError(f"goldfish is an SFT loss: remove it for objective: {self.objective}")
            if self.neftune is not None:
                raise ValueError(f"neftune applies to SFT: remove it for objective: {self.objective}")
            if self.objective == "simpo" and self.reference != "base":
                raise ValueError("simpo uses no reference model: remove `reference`")
        elif self.reference != "base" or self.beta is not None:
            raise ValueError("beta and reference apply to preference objectives: set objective: dpo (or ipo, "
                             "simpo), or remove them")
        if self.save == "adapter" and self.lora is None:
            raise ValueError("save: adapter needs lora (full fine-tuning has no adapter to save)")
        if self.eval_data is not None and self.eval_fraction:
            raise ValueError("set eval_data or eval_fraction, not both")
        return self

    def tables(self) -> list[str]:
        """Training tables in order."""
        if isinstance(self.data, str):
            return [self.data]
        return list(self.data)

    def weights(self) -> dict[str, float] | None:
        return dict(self.data) if isinstance(self.data, dict) else None

    @property
    def preference(self) -> bool:
        return self.objective != "sft"

    def preference_beta(self) -> float:
        return self.beta if self.beta is not None else (2.0 if self.objective == "simpo" else 0.1)

    def reference_model(self) -> str | None:
        """The reference model's ref when it is another model than the one trained."""
        return self.reference if self.objective in ("dpo", "ipo") and self.reference != "base" else None


# Fields that change how the work runs, not what it produces: kept out of the cache key.
EXECUTION_ONLY = ("device", "checkpoint_every", "keep_checkpoints", "log_every", "log_model")
