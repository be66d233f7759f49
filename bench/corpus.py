"""The scale corpus: synthetic instruction rows with the lengths of real instruction data, planted
near-duplicates and a target family, written as JSONL in bounded memory at any size.

Rows (`{"prompt", "response", "family", "planted_dup_of"}`):
- Text: words drawn with the frequencies of the Python reference manual (stdlib pydoc_data, so
  offline and deterministic), with some punctuation; a prompt opens with one of a dozen
  instruction templates.
- Lengths: prompt + response has a median of ~520 characters and a long tail to 8,000 (prompt
  lognormal, median 38 words; response lognormal, median 34 words; both clipped).
- Near duplicates: `dup_share` of the rows (10 % by default) copy an earlier row of the same
  chunk with 0.5-2 % of the words (at least one in prompt and response) replaced: the 3-gram
  shingle sets then have a Jaccard with the original of median ~0.87, 75 % at or above 0.8
  (a copy of a copy drifts further). `planted_dup_of` is the original's row number (else null).
- Target family: `target_share` of the rows (2 %) are `family: "target"`: a fifth of their words
  come from a topic lexicon of 150 words. `target_texts(n)` makes target-task examples the same
  way, for ZIP-FIT/DSIR to select towards.

    from bench.corpus import write_corpus, target_texts
    write_corpus(path, rows=1_000_000, seed=0)     # ~600 MB at 1M rows, ~60 s on one core
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

TEMPLATES = ["Write a short essay about", "Explain in simple terms", "Summarize the following text:",
             "Can you help me understand", "Give three examples of", "Translate into plain English:",
             "What are the main ideas of", "Rewrite this paragraph more clearly:", "List the steps to",
             "Describe the difference between", "Answer the question below.", "Please review my notes:"]
CHUNK_ROWS = 20_000  # rows generated at a time: memory stays ~100 MB at any corpus size
MAX_CHARS = 8_000


class Words:
    """Words with the frequencies of the Python reference manual, with some punctuation."""

    def __init__(self, rng: np.random.Generator):
        from evals.byod import python_docs_corpus

        counts = Counter(w for text in python_docs_corpus() for w in re.findall(r"[A-Za-z]+", text))
        words, freq = zip(*counts.most_common())
        self.words = words
        self.vocab = np.array([w for w in words for _ in range(3)], dtype=object)
        for i in range(len(words)):
            self.vocab[3 * i + 1] += ","
            self.vocab[3 * i + 2] += "."
        self.p = np.asarray(freq, dtype=np.float64) / sum(freq)
        self.rng = rng

    def texts(self, count: int, median_words: float, sigma: float, max_words: int,
              lexicon: np.ndarray | None = None, lexicon_share: float = 0.0) -> list[str]:
        """`count` texts of lognormal word counts; with a lexicon, that share of words comes from it."""
        lengths = np.clip(self.rng.lognormal(np.log(median_words), sigma, count).astype(np.int64), 3, max_words)
        picks = self.rng.choice(len(self.p), size=int(lengths.sum()), p=self.p) * 3
        if lexicon is not None:
            topical = self.rng.random(len(picks)) < lexicon_share
            picks[topical] = lexicon[self.rng.integers(0, len(lexicon), int(topical.sum()))] * 3
        picks += self.rng.choice(3, size=len(picks), p=[0.88, 0.06, 0.06])
        tokens = self.vocab[picks]
        ends = np.cumsum(lengths)
        return [" ".join(tokens[e - n:e]) for e, n in zip(ends.tolist(), lengths.tolist())]


def _lexicon(words: Words) -> np.ndarray:
    """150 mid-frequency words (ranks 300-3,000), fixed: the target family's topic."""
    return np.random.default_rng(12345).choice(np.arange(300, min(3000, len(words.words))), 150, replace=False)


def _perturb(text: str, rng: np.random.Generator, words: Words) -> str:
    """Replace 0.5-2 % of the words (at least one) with random vocabulary words."""
    tokens = text.split(" ")
    k = max(1, int(len(tokens) * rng.uniform(0.005, 0.02)))
    for at in rng.choice(len(tokens), size=min(k, len(tokens)), replace=False).tolist():
        tokens[at] = words.words[int(rng.integers(0, 2000))]
    return " ".join(tokens)


def corpus_rows(rows: int, seed: int = 0, dup_share: float = 0.10, target_share: float = 0.02):
    """The corpus's rows, chunk by chunk (lists of dicts), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    words = Words(rng)
    lexicon = _lexicon(words)
    for start in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - start)
        is_target = rng.random(n) < target_share
        prompts = words.texts(n, 38, 0.9, 900)
        responses = words.texts(n, 34, 0.9, 700)
        topical_p = words.texts(int(is_target.sum()), 38, 0.9, 900, lexicon, 0.2)
        topical_r = words.texts(int(is_target.sum()), 34, 0.9, 700, lexicon, 0.2)
        templates = rng.integers(0, len(TEMPLATES), n).tolist()
        dup = rng.random(n) < dup_share
        dup[0] = False
        t = 0
        chunk = []
        for i in range(n):
            if dup[i]:
                j = int(rng.integers(0, i))
                original = chunk[j]
                chunk.append({"prompt": _perturb(original["prompt"], rng, words),
                              "response": _perturb(original["response"], rng, words),
                              "family": original["family"],
                              "planted_dup_of": start + j if original["planted_dup_of"] is None
                              else original["planted_dup_of"]})
                continue
            if is_target[i]:
                prompt, response, family = topical_p[t], topical_r[t], "target"
                t += 1
            else:
                prompt, response, family = prompts[i], responses[i], "general"
            prompt = f"{TEMPLATES[templates[i]]} {prompt}"
            room = MAX_CHARS - len(prompt) - 1
            chunk.append({"prompt": prompt, "response": response[:max(room, 20)], "family": family,
                          "planted_dup_of": None})
        yield chunk


def write_corpus(path: Path, rows: int, seed: int = 0, **kw) -> Path:
    """Write the corpus as JSONL (written to a temp name, then renamed)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for chunk in corpus_rows(rows, seed, **kw):
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk))
    tmp.replace(path)
    return path


def target_texts(n: int = 200, seed: int = 1) -> list[str]:
    """Examples of the target task (prompt and response joined), made as the target family's rows."""
    words = Words(np.random.default_rng(seed))
    lexicon = _lexicon(words)
    prompts = words.texts(n, 45, 0.9, 900, lexicon, 0.2)
    responses = words.texts(n, 40, 0.9, 700, lexicon, 0.2)
    return [f"{p}\n{r}" for p, r in zip(prompts, responses)]


def write_targets(path: Path, n: int = 200) -> Path:
    """The target examples as JSONL rows {text, family: "target"} (a `schema: raw` source)."""
    Path(path).write_text("".join(json.dumps({"text": t, "family": "target"}) + "\n" for t in target_texts(n)))
    return Path(path)


def texts(rows: list[dict]) -> list[str]:
    """What dedup and selection compare: prompt and response joined by a newline (as messages are)."""
    return [f"{r['prompt']}\n{r['response']}" for r in rows]


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the scale corpus (JSONL) and its target examples.")
    parser.add_argument("out", type=Path, help="the corpus file to write, e.g. examples/scale_data/corpus.jsonl")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_corpus(args.out, args.rows, args.seed)
    targets = write_targets(args.out.with_name("targets.jsonl"))
    print(f"wrote {args.rows:,} rows to {args.out} and 200 target examples to {targets}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # evals (the word frequencies)
    main()
