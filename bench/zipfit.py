"""ZIP-FIT scoring speed: datamill's `zipfit_scores` next to the paper's method, in the same run.

The peer is ZIP-FIT as its paper and reference code compute it: for every (candidate, target)
pair, three `gzip.compress` calls (C(x), C(y), C(x+y)) and 1 - NCD, averaged over the targets,
spread over all cores with `multiprocessing.Pool` (as the reference does). datamill's `exact` mode
gets every size from its C kernel (zlib's decisions, no bits written, work shared between pairs)
on threads over all cores; `fast` uses optimal instead of zlib's Huffman code lengths. Both at
gzip levels 9 and 1. The three are run interleaved (peer, exact, fast, then again), best of
`--repeat` runs each, with the same worker count. Reported per data set: the length
distribution of its texts, best wall time, speed ratio, whether every score is identical,
Spearman correlation and top-100 overlap with the paper's scores, and DSIR's time
(`data-selection`, the baseline ZIP-FIT's paper compares with) on the same candidates.

Data sets:
- tasks: short instruction texts from the offline task families (all seven, medium difficulty),
  candidates with seed 0, targets from the arithmetic family with seed 1.
- scale: the scale corpus (bench/corpus.py: instruction-length texts, median ~530 characters,
  tail to 8,000), candidates `texts(corpus_rows(n))`, targets `target_texts(200)`.

Run:  .venv/bin/python bench/zipfit.py            (tasks 20,000 x 200, scale 2,000 x 200; ~15 min on 2 cores)
      .venv/bin/python bench/zipfit.py --quick    (tasks 2,000 x 200, scale 500 x 200, one run each; prints only)
Writes bench/zipfit.json and bench/zipfit.md. Measure on a quiet machine: the load average is
recorded before and after.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402  (bench/machine.py)

_TARGETS: list[str] = []
_LEVEL = 9
GOALS = {"exact_speedup": 7.0, "fast_speedup": 20.0, "fast_spearman": 0.995}


def _naive_init(targets: list[str], level: int) -> None:
    global _TARGETS, _LEVEL
    _TARGETS, _LEVEL = targets, level


def _naive_one(x: str) -> float:
    """The paper's per-pair computation for one candidate (three gzip.compress per pair)."""
    def c(s: str) -> int:
        return len(gzip.compress(s.encode("utf-8"), compresslevel=_LEVEL))

    sims = []
    for y in _TARGETS:
        cx, cy, cxy = c(x), c(y), c(x + y)
        sims.append(1 - (cxy - min(cx, cy)) / max(cx, cy))
    return math.fsum(sims) / len(sims)


def naive_pool(candidates: list[str], targets: list[str], level: int, workers: int) -> np.ndarray:
    with Pool(workers, initializer=_naive_init, initargs=(targets, level)) as pool:
        return np.asarray(pool.map(_naive_one, candidates, chunksize=64), dtype=np.float64)


def texts(n: int, seed: int, families: list[str] | None) -> list[str]:
    """Task-family texts (also used by bench/ray_scaling.py)."""
    from datagen.tasks import generate_tasks
    from datamill.records import text_of

    return [text_of(row["messages"]) for row in generate_tasks(families, n, seed)]


def scale_texts(candidates: int, targets: int) -> tuple[list[str], list[str]]:
    spec = importlib.util.spec_from_file_location("bench_corpus", ROOT / "bench" / "corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    rows = [row for chunk in corpus.corpus_rows(candidates, seed=0) for row in chunk]
    return corpus.texts(rows), corpus.target_texts(targets)


def lengths(texts: list[str]) -> dict:
    chars = np.asarray([len(t) for t in texts])
    return {"median": int(np.median(chars)), "p90": int(np.percentile(chars, 90)),
            "p99": int(np.percentile(chars, 99)), "max": int(chars.max())}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 100) -> float:
    return len(set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k])) / k


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(name: str, candidates: list[str], targets: list[str], workers: int, repeat: int) -> dict:
    """The peer and both modes at levels 9 and 1, interleaved, best of `repeat` each."""
    from selection.dsir import dsir_log_weights
    from selection.zipfit import zipfit_scores

    rows = []
    for level in (9, 1):
        best = {"paper": math.inf, "exact": math.inf, "fast": math.inf}
        scores = {}
        for _ in range(repeat):
            scores["paper"], s = timed(lambda: naive_pool(candidates, targets, level, workers))
            best["paper"] = min(best["paper"], s)
            for mode in ("exact", "fast"):
                scores[mode], s = timed(lambda: zipfit_scores(candidates, targets, level=level, mode=mode,
                                                              workers=workers))
                best[mode] = min(best[mode], s)
        ref = scores["paper"]
        for mode in ("exact", "fast"):
            ours = scores[mode]
            rows.append({"level": level, "mode": mode, "paper_pool_s": round(best["paper"], 2),
                         "datamill_s": round(best[mode], 2), "speedup": round(best["paper"] / best[mode], 2),
                         "identical": bool(np.array_equal(ref, ours)),
                         "max_abs_diff": float(np.abs(ref - ours).max()), "spearman": round(spearman(ref, ours), 6),
                         "top100_overlap": top_overlap(ref, ours)})
            r = rows[-1]
            print(f"{name} level {level} {mode}: paper's method {r['paper_pool_s']} s, datamill {r['datamill_s']} s "
                  f"({r['speedup']}x), identical={r['identical']}, spearman={r['spearman']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        _, dsir_s = timed(lambda: dsir_log_weights(candidates, targets, Path(tmp)))
    return {"name": name, "candidates": len(candidates), "targets": len(targets),
            "pairs": len(candidates) * len(targets), "candidate_chars": lengths(candidates),
            "target_chars": lengths(targets), "rows": rows, "dsir_s": round(dsir_s, 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task-candidates", type=int, default=20_000)
    parser.add_argument("--scale-candidates", type=int, default=2_000)
    parser.add_argument("--targets", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each (the best counts)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run; print, write nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.task_candidates, args.scale_candidates, args.repeat = 2_000, 500, 1

    workers = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    datasets = [measure("tasks", texts(args.task_candidates, 0, None), texts(args.targets, 1, ["arithmetic"]),
                        workers, args.repeat),
                measure("scale", *scale_texts(args.scale_candidates, args.targets), workers, args.repeat)]
    result = {
        "machine": {"cpu": cpu_name(), "cores": workers, "python": platform.python_version(),
                    "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2)},
        "date": time.strftime("%Y-%m-%d"), "repeat": args.repeat, "datasets": datasets, "goals": GOALS,
        "command": ".venv/bin/python bench/zipfit.py",
    }
    print(markdown(result))
    if not args.quick:
        (ROOT / "bench" / "zipfit.json").write_text(json.dumps(result, indent=2) + "\n")
        (ROOT / "bench" / "zipfit.md").write_text(markdown(result))


DESCRIPTIONS = {
    "tasks": "short instruction texts of the offline task families (candidates: all seven families; targets: "
             "arithmetic)",
    "scale": "instruction-length texts of the scale corpus (bench/corpus.py; candidates `texts(corpus_rows(n))`, "
             "targets `target_texts(200)`)",
}


def markdown(r: dict) -> str:
    m, g = r["machine"], r["goals"]
    lines = [f"# ZIP-FIT scoring: datamill vs the paper's per-pair gzip method ({m['cpu']}, {m['cores']} cores)", "",
             f"Python {m['python']}, {r['date']}; load average {m['load_avg_1m_before']} before, "
             f"{m['load_avg_1m_after']} after (the machine is shared). Both sides use all {m['cores']} cores; the "
             f"paper's method, exact and fast were run interleaved, best of {r['repeat']} each.", ""]
    for d in r["datasets"]:
        c, t = d["candidate_chars"], d["target_chars"]
        lines += [f"## {d['name']}: {d['candidates']:,} candidates x {d['targets']} targets = {d['pairs']:,} pairs", "",
                  f"{DESCRIPTIONS.get(d['name'], d['name'])}. Characters per text: candidates median {c['median']:,}, "
                  f"p90 {c['p90']:,}, p99 {c['p99']:,}, max {c['max']:,}; targets median {t['median']:,}, "
                  f"p90 {t['p90']:,}, p99 {t['p99']:,}, max {t['max']:,}.", "",
                  "| gzip level | mode | paper's method (Pool) | datamill | speedup | identical scores | Spearman | "
                  "top-100 overlap |", "|---|---|---|---|---|---|---|---|"]
        for row in d["rows"]:
            lines.append(f"| {row['level']} | {row['mode']} | {row['paper_pool_s']} s | {row['datamill_s']} s | "
                         f"**{row['speedup']}x** | {row['identical']} | {row['spearman']} | {row['top100_overlap']} |")
        lines += ["", f"DSIR (`data-selection`, hashed n-grams, one process) on the same candidates: {d['dsir_s']} s.",
                  ""]
    lines += [f"Goals (issue 19): exact identical and >= {g['exact_speedup']}x; fast >= {g['fast_speedup']}x with "
              f"Spearman >= {g['fast_spearman']}, on both length distributions. At gzip level 9:"]
    for d in r["datasets"]:
        row = {x["mode"]: x for x in d["rows"] if x["level"] == 9}
        exact_met = row["exact"]["identical"] and row["exact"]["speedup"] >= g["exact_speedup"]
        fast_met = row["fast"]["speedup"] >= g["fast_speedup"] and row["fast"]["spearman"] >= g["fast_spearman"]
        lines.append(f"- {d['name']}: exact {row['exact']['speedup']}x, identical {row['exact']['identical']} "
                     f"({'met' if exact_met else 'NOT met'}); fast {row['fast']['speedup']}x, Spearman "
                     f"{row['fast']['spearman']} ({'met' if fast_met else 'NOT met'}).")
    lines += ["",
              "Cheaper fast modes were measured and rejected (scale texts, 1,000 x 200, level 9, Spearman with "
              "exact): a greedy parse (the longer of y's and x's matches) with optimal code lengths, 0.972; "
              "zlib's parse with entropy-estimated sizes, 0.951 (0.992 with the header of optimal code lengths, "
              "0.943 with their data bits and an estimated header); zlib's parse with optimal code lengths (this "
              "fast mode), 0.998. The parse is most of the time and the ranking is sensitive to every part of "
              "the size, so fast keeps zlib's parse.", "",
              "exact: every size from selection/_deflate_size.c, which makes zlib's decisions and counts the bits "
              "without writing them (checked against this zlib on probe texts and pairs before use). Each candidate "
              "is parsed once up to where what follows it matters and every target continues from there; each "
              "target's own hash chains are summarized once, so a pair only searches the candidate's. fast: the "
              "same parse with optimal Huffman code lengths instead of zlib's heap (sizes within a byte or two).", "",
              f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
