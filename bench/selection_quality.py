"""Selection quality on the testbed with a known answer: precision@budget and wall time per method.

For each target family: a pool of the six other families (100 rows each) plus 66 rows of the
target family (~10%), and a target table of 50 rows of that family drawn with another seed; the
budget is 66. precision@budget = the share of the selection that is of the target family. Every
method runs through the real `select` step (one spec per family, a sweep over methods), so the
times include what a user waits for (embedding, LESS's warmup and gradients, DSIR's fitting).
Random and DSIR are the peers (ZIP-FIT's paper claims to select faster than DSIR: see the times).
LESS and perplexity use builtin:tiny-llama (a random 2-layer model) to stay within minutes on a
CPU; they say little about those methods with a real model.

Run:  .venv/bin/python bench/selection_quality.py     (~5 min on 2 cores)
Writes bench/selection_quality.json and bench/selection_quality.md.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_name, model_cache  # noqa: E402  (bench/machine.py)

FAMILIES = ["arithmetic", "reverse", "sort", "capitals", "units", "code", "chat"]
TARGETS = ["arithmetic", "capitals", "code", "sort"]
METHODS = {  # row label -> (method, params, needs the model)
    "zipfit": ("zipfit", "{level: 9}", False), "zipfit fast": ("zipfit", "{level: 9, mode: fast}", False),
    "dsir": ("dsir", "{}", False), "density": ("density", "{}", False),
    "less": ("less", "{epochs: 2, warmup_fraction: 0.1, proj_dim: 1024, lr: 0.001, batch_size: 16}", True),
    "perplexity": ("perplexity", "{}", True), "length": ("length", "{}", False), "random": ("random", "{}", False),
}


def spec_text(family: str, label: str) -> str:
    method, params, needs_model = METHODS[label]
    model = "      model: tiny\n" if needs_model else ""
    return f"""
name: quality
models: {{tiny: builtin:tiny-llama}}
sources:
  tasks: {{generator: tasks, families: [{', '.join(FAMILIES)}], n: 700, seed: 0}}
  target: {{generator: tasks, families: [{family}], n: 50, seed: 1}}
steps:
  pool:
    sql: |
      SELECT * FROM tasks WHERE family <> '{family}'
      UNION ALL SELECT * FROM (SELECT * FROM tasks WHERE family = '{family}' ORDER BY id LIMIT 66)
  pick:
    select:
      input: pool
      target: target
      method: {method}
      budget: 66
      params: {params}
{model}tracking: {{enabled: false}}
"""


def main() -> None:
    from datamill import progress
    from datamill.api import run

    progress.set_quiet(True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DATAMILL_MODEL_CACHE", str(model_cache()))
        for family in TARGETS:
            for method in METHODS:
                folder = Path(tmp) / f"{family}-{method.replace(' ', '-')}"
                folder.mkdir()
                (folder / "spec.yaml").write_text(spec_text(family, method))
                start = time.perf_counter()
                stats = run(folder / "spec.yaml", quiet=True).points[-1].steps["pick"].stats
                seconds = time.perf_counter() - start
                results.append({"family": family, "method": method, "precision": stats["target_family_precision"],
                                "select_seconds": round(stats["seconds"]["score"], 2), "run_seconds": round(seconds, 2)})
                print(f"{family:10s} {method:10s} precision {stats['target_family_precision']:.3f} "
                      f"scoring {stats['seconds']['score']:.1f} s", flush=True)
    out = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
           "date": time.strftime("%Y-%m-%d"), "results": results,
           "command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/selection_quality.py"}
    (ROOT / "bench" / "selection_quality.json").write_text(json.dumps(out, indent=2) + "\n")
    (ROOT / "bench" / "selection_quality.md").write_text(markdown(out))
    print(markdown(out))


def markdown(r: dict) -> str:
    m = r["machine"]
    by = {(x["family"], x["method"]): x for x in r["results"]}
    families = list(dict.fromkeys(x["family"] for x in r["results"]))
    methods = list(dict.fromkeys(x["method"] for x in r["results"]))
    lines = [f"# Selection quality on the testbed ({m['cpu']}, {m['cores']} cores)", "",
             f"Python {m['python']}, {r['date']}. Pool: 600 rows of six other task families + 66 of the target "
             "family (~10%); target table: 50 other rows of that family; budget 66. Cells: precision@budget "
             "(scoring seconds). LESS and perplexity run on builtin:tiny-llama (a random 2-layer model).", "",
             "| method | " + " | ".join(families) + " | mean precision |", "|---|" + "---|" * (len(families) + 1)]
    for method in methods:
        cells = [f"{by[(f, method)]['precision']:.2f} ({by[(f, method)]['select_seconds']} s)" for f in families]
        mean = sum(by[(f, method)]["precision"] for f in families) / len(families)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean:.2f} |")
    lines += ["", "Base rate (random selection): 66 / 666 = 0.10.", "", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
