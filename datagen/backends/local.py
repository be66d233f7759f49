"""`transformers` backend: a local Hugging Face causal LM, batched, CPU or GPU.

Requests are rendered with the model's chat template (instruct models emit nothing useful
without it), sorted by prompt length and run in batches of `batch_size` with left padding (so
every row's prompt ends where generation starts).

Sampling is reproducible per request, whatever the batch it lands in: instead of `generate`'s
one global RNG, a logits processor adds Gumbel noise drawn from a generator seeded with the
request's own seed to the temperature-scaled, top-p-filtered logits, and decoding takes the
argmax (the Gumbel-max trick: that is an exact sample from the filtered softmax). So batch size
and resume order, which are not part of the step's cache key, do not change what is sampled
(up to float rounding differences between batch shapes).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

from datagen.backends.base import BackendStats, GenRequest, GenResult
from datamill.devices import resolve_device, resolve_dtype
from datamill.errors import DatamillError


CANDIDATES = 512  # tokens considered for top-p before falling back to a full sort


class _SeededSampler:
    """A logits processor: sampling with one torch.Generator per row (see the module docstring)."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: str):
        import torch

        self.temperature, self.top_p = temperature, top_p
        self.generators = []
        for seed in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(int(seed) % (2**63))
            self.generators.append(g)

    def __call__(self, input_ids, scores):
        import torch

        logits = scores.float() / self.temperature
        if self.top_p >= 1.0:
            return logits + self._gumbel(logits.shape[-1], logits.device)
        # top-p on the top CANDIDATES tokens (a full sort of the vocabulary costs ~10x more); a row
        # whose candidates hold less than top_p of the mass (a very flat distribution) sorts it all.
        k = min(CANDIDATES, logits.shape[-1])
        probs = logits.softmax(dim=-1)
        top_logits, top_ids = logits.topk(k, dim=-1)
        top_probs = probs.gather(-1, top_ids)
        covered = top_probs.sum(dim=-1) >= self.top_p
        out = torch.full_like(logits, float("-inf"))
        for row in range(logits.shape[0]):
            if covered[row]:
                ids, vals, p = top_ids[row], top_logits[row], top_probs[row]
            else:
                vals, ids = torch.sort(logits[row], descending=True)
                p = probs[row, ids]
            # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
            keep = (p.cumsum(dim=-1) - p) < self.top_p
            noise = self._gumbel_row(row, int(keep.sum()), logits.device)
            out[row, ids[keep]] = vals[keep] + noise
        return out

    def _gumbel_row(self, row: int, size: int, device):
        """i.i.d. Gumbel(0, 1) noise from this row's own generator. Which kept token gets which
        draw is fixed by rank, so the argmax is an exact sample from the renormalised nucleus."""
        import torch

        uniform = torch.rand(size, generator=self.generators[row], device=device)
        return -torch.log(-torch.log(uniform.clamp_(min=1e-20, max=1.0 - 1e-7)))

    def _gumbel(self, vocab: int, device):
        import torch

        return torch.stack([self._gumbel_row(row, vocab, device) for row in range(len(self.generators))])


class TransformersBackend:
    """Generate with `model.generate` on a local HF folder (see the module docstring)."""

    name = "transformers"
    local = True  # runs a model folder here (datagen.backends.is_local)

    def __init__(self, model_dir: Path, batch_size: int = 16, dtype: str = "auto", device: str = "auto",
                 progress_desc: str = "generate"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.batch_size = max(1, int(batch_size))
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.progress_desc = progress_desc
        self.stats = BackendStats()
        from datamill.progress import no_hf_loading_bars

        try:
            with no_hf_loading_bars():
                self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
                self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise DatamillError(f"cannot load the model in {model_dir} with transformers: {e}") from e
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.eos_ids = self._eos_ids()
        self.stats.extra.update({"device": self.device, "dtype": str(self.dtype).removeprefix("torch.")})

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def prompt_text(self, messages: list[dict]) -> str:
        """The chat-templated prompt; a model without a template gets the contents joined."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n\n".join(m["content"] for m in messages) + "\n\n"

    def generate(self, requests: Iterable[GenRequest], on_result: Callable[[GenResult], None]) -> None:
        from datamill.progress import bar

        requests = list(requests)
        texts = [self.prompt_text(r.messages) for r in requests]
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        # Similar lengths together: less padding. Rows with other sampling params never share a batch.
        order = sorted(range(len(requests)), key=lambda i: (self._sampling(requests[i]), lengths[i], i))
        batches, current = [], []
        for i in order:
            if current and (len(current) == self.batch_size
                            or self._sampling(requests[current[0]]) != self._sampling(requests[i])):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        start = time.monotonic()
        with bar(self.progress_desc, total=len(requests), unit="requests") as progress:
            for batch in batches:
                for result in self._run_batch([requests[i] for i in batch], [texts[i] for i in batch]):
                    self.stats.count(result)
                    on_result(result)
                    progress.advance()
                self.stats.seconds = time.monotonic() - start
        self.stats.extra["batches"] = self.stats.extra.get("batches", 0) + len(batches)

    @staticmethod
    def _sampling(r: GenRequest) -> tuple:
        return (r.temperature, r.top_p, r.max_tokens)

    def _run_batch(self, requests: list[GenRequest], texts: list[str]) -> list[GenResult]:
        import torch
        from transformers import LogitsProcessorList

        first = requests[0]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        kwargs = {"max_new_tokens": first.max_tokens, "pad_token_id": self.tokenizer.pad_token_id,
                  "do_sample": False}
        if first.temperature > 0:
            seeds = [r.seed if r.seed is not None else 0 for r in requests]
            kwargs["logits_processor"] = LogitsProcessorList(
                [_SeededSampler(seeds, first.temperature, first.top_p, self.device)])
        try:
            with torch.inference_mode():
                out = self.model.generate(**enc, **kwargs)
        except torch.OutOfMemoryError:
            if len(requests) == 1:
                raise
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            half = len(requests) // 2
            return self._run_batch(requests[:half], texts[:half]) + self._run_batch(requests[half:], texts[half:])
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        results = []
        for request, tokens, n_in in zip(requests, new, prompt_tokens):
            end = next((j for j, t in enumerate(tokens) if t in self.eos_ids), None)
            kept = tokens if end is None else tokens[:end]
            results.append(GenResult(
                id=request.id, text=self.tokenizer.decode(kept, skip_special_tokens=True),
                tokens_in=int(n_in), tokens_out=len(kept) + (0 if end is None else 1),
                finish_reason="length" if end is None else "stop"))
        return results
