"""`vllm` backend: vLLM's offline engine on a local HF folder (GPU machines with `pip install vllm`).

vLLM batches continuously inside the engine, so requests are handed over in chunks of at
least `MIN_CHUNK`: each chunk's results reach `on_result` (and the request cache) before the
next chunk starts, which bounds what a kill can lose. Each request carries its own seed
(`SamplingParams(seed=...)`), so what is sampled does not depend on the chunking.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

from datagen.backends.base import BackendStats, GenRequest, GenResult
from datamill.errors import DatamillError

MIN_CHUNK = 256
AVAILABLE_ELSEWHERE = "transformers, openai"


class VLLMBackend:
    name = "vllm"
    local = True  # runs a model folder here (datagen.backends.is_local)

    def __init__(self, model_dir: Path, batch_size: int = 16, dtype: str = "auto", device: str = "auto",
                 progress_desc: str = "generate"):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise DatamillError(f"the vllm backend needs `pip install vllm` (GPU); available here: "
                                f"{AVAILABLE_ELSEWHERE}") from None
        from vllm import LLM

        self.chunk = max(int(batch_size), MIN_CHUNK)
        self.progress_desc = progress_desc
        self.stats = BackendStats()
        kwargs = {"model": str(model_dir), "dtype": dtype}
        if device not in ("auto", "cuda"):
            kwargs["device"] = device
        self.llm = LLM(**kwargs)
        self.stats.extra.update({"engine": "vllm", "dtype": dtype})

    def generate(self, requests: Iterable[GenRequest], on_result: Callable[[GenResult], None]) -> None:
        from vllm import SamplingParams

        from datamill.progress import bar

        requests = list(requests)
        start = time.monotonic()
        with bar(self.progress_desc, total=len(requests), unit="requests") as progress:
            for at in range(0, len(requests), self.chunk):
                chunk = requests[at:at + self.chunk]
                params = [SamplingParams(temperature=r.temperature, top_p=r.top_p if r.temperature > 0 else 1.0,
                                         max_tokens=r.max_tokens, seed=r.seed) for r in chunk]
                outputs = self.llm.chat([r.messages for r in chunk], sampling_params=params, use_tqdm=False)
                for request, output in zip(chunk, outputs):
                    completion = output.outputs[0]
                    result = GenResult(id=request.id, text=completion.text,
                                       tokens_in=len(output.prompt_token_ids or []),
                                       tokens_out=len(completion.token_ids or []),
                                       finish_reason=completion.finish_reason)
                    self.stats.count(result)
                    on_result(result)
                    progress.advance()
                self.stats.seconds = time.monotonic() - start
