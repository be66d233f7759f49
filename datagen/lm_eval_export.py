"""The offline task families as lm-evaluation-harness tasks (multiple choice and exact match).

    names = export_lm_eval_tasks(Path("out/lm_eval"), ["arithmetic", "capitals"], n=100)
    tm = lm_eval.tasks.TaskManager(include_path="out/lm_eval", include_defaults=False)
    lm_eval.simple_evaluate(model=..., tasks=names, task_manager=tm)

    python -m datagen.lm_eval_export evals/tasks      # the tasks datamill ships (evals/tasks/)

Per family two tasks over the same test rows, and a group `datamill_<family>` of both. The test
rows come from the family's held-out `eval` split (datagen/tasks.py: no `train` row, the default
of `tasks` steps and sources, asks any of them, at any seed) and never repeat a question; the
few-shot rows come from the `train` split. Shipped sizes (`TEST_N`): 100 per family, except
capitals and chat, which get every held-out question there is (147 and 14).

    datamill_<family>_mc     multiple_choice over the row's 4 `choices`; acc, acc_norm
    datamill_<family>_exact  generate_until (until "\\n"); a regex filter pulls the answer out of
                             the generation (the last number, the last country/capital/continent
                             named, or the first line); exact_match

The folder is self-contained and can move: each YAML loads its rows through
`custom_dataset: !function utils.load_split`, a small loader written next to it that reads
`data/<family>_<split>.jsonl` relative to its own file (lm-eval resolves relative `data_files`
against the current directory instead, so plain `dataset_path: json` tasks break when run from
elsewhere). The same folder works with `lm_eval --include_path <folder>` and from Python.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

TEST_SPLIT, FEWSHOT_SPLIT = "test", "train"
DEFAULT_TEST_N = 100
# Test rows per family when `n` is not given (what evals/tasks/ ships). Capitals and chat ask for
# more than their held-out split has: they get all of it (147 and 14 distinct questions at medium).
TEST_N = {"capitals": 1000, "chat": 1000}
DOC_TO_TEXT = "Question: {{question}}\nAnswer:"

# What the exact-match filter extracts from a generation, per family.
_LAST_INTEGER = r"-?\d[\d,]*"
_LAST_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
# The first line, without an "Answer:" label, quotes, backticks or a final period.
_FIRST_LINE = r"""(?i)^[\s"'`]*(?:(?:the\s+)?(?:answer|output|result)\s*(?:is\s*)?:\s*)?[\s"'`]*(.*?)[\s"'`.]*$"""


def _capitals_pattern() -> str:
    """Any country, capital or continent from the shipped table, longest first, as whole words."""
    from datagen.tasks import continents, countries

    names = {name for c in countries() for name in (c.country, c.capital)} | set(continents())
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=lambda s: (-len(s), s)))
    return rf"(?i)(?<!\w)({alternatives})(?!\w)"


def _exact_settings(family: str) -> dict:
    """regex (pattern, which match), exact_match options and generation length for a family."""
    if family == "arithmetic":
        return {"regex": (_LAST_INTEGER, -1), "ignore": [","], "ignore_case": False, "ignore_punct": False,
                "max_gen_toks": 32}
    if family == "units":
        return {"regex": (_LAST_NUMBER, -1), "ignore": [","], "ignore_case": False, "ignore_punct": False,
                "max_gen_toks": 32}
    if family == "capitals":
        return {"regex": (_capitals_pattern(), -1), "ignore": [], "ignore_case": True, "ignore_punct": True,
                "max_gen_toks": 48}
    if family == "sort":  # "3,7,12" and "[3, 7, 12]" count as "3, 7, 12"
        return {"regex": (_FIRST_LINE, 0), "ignore": [r"[\s\[\]'\"]"], "ignore_case": True,
                "ignore_punct": False, "max_gen_toks": 96}
    if family == "code":  # printed output is compared as is (no case or punctuation folding)
        return {"regex": (_FIRST_LINE, 0), "ignore": [], "ignore_case": False, "ignore_punct": False,
                "max_gen_toks": 48}
    # reverse, chat (chat is a distractor family: exact match on chit-chat is expectedly low)
    return {"regex": (_FIRST_LINE, 0), "ignore": [], "ignore_case": True, "ignore_punct": True,
            "max_gen_toks": 128 if family == "chat" else 64}


def distinct_rows(family: str, n: int, seed: int, difficulty: str, split: str,
                  exclude: set[str] = frozenset()) -> list[dict]:
    """Up to `n` rows of `family` with distinct questions (none in `exclude`): rows k = 0, 1, ... of
    `generate_tasks([family], ., seed, difficulty, split)`, skipping repeated questions. Stops early
    when `patience` rows in a row bring nothing new: the split has fewer distinct questions than `n`
    (with 147 questions, 2,000 draws all miss the last unseen one with p < 1e-5)."""
    from datagen.tasks import make_row

    rows, seen = [], set(exclude)
    patience = max(2000, 2 * n)
    k = misses = 0
    while len(rows) < n and misses < patience:
        row = make_row(family, seed, k, difficulty, split)
        k += 1
        question = row["messages"][0]["content"]
        if question in seen:
            misses += 1
            continue
        misses = 0
        seen.add(question)
        rows.append(row)
    return rows


def _docs(family: str, n: int, seed: int, difficulty: str, split: str, exclude: set[str] = frozenset()) -> list[dict]:
    from datamill.records import row_id

    return [{"id": row_id(row["messages"]), "family": family, "difficulty": difficulty,
             "question": row["messages"][0]["content"], "answer": row["answer"], "choices": row["choices"],
             "label": row["choices"].index(row["answer"]), "reply": row["messages"][1]["content"]}
            for row in distinct_rows(family, n, seed, difficulty, split, exclude)]


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")


LOADER = '''"""Rows of the datamill task family `name` for lm-eval (`custom_dataset: !function utils.load_split`).

Written by datagen/lm_eval_export.py. Reads data/<name>_<split>.jsonl next to this file, so the
folder works from any directory, with the `lm_eval` CLI (--include_path) and from Python.
"""

import json
from pathlib import Path


def load_split(name: str, **_metadata):
    import datasets

    splits = {}
    for split in ("test", "train"):
        path = Path(__file__).parent / "data" / f"{name}_{split}.jsonl"
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f])
    return splits
'''


class Function(str):
    """A `!function module.name` reference in an lm-eval YAML."""


def _write_yaml(path: Path, config: dict) -> None:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):  # "Question: ...\nAnswer:" reads better double-quoted than folded
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)

    Dumper.add_representer(str, text)
    Dumper.add_representer(Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))
    path.write_text(yaml.dump(config, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=1000))


def export_lm_eval_tasks(out_dir: Path, families: list[str] | None = None, n: int | dict[str, int] | None = None,
                         seed: int = 1234, difficulty: str = "medium", *, num_fewshot: int = 0, fewshot_n: int = 20,
                         fewshot_seed: int | None = None) -> list[str]:
    """Write lm-eval task YAMLs and JSONL data for `families` into `out_dir`; return the task names
    (`datamill_<family>_mc`, `datamill_<family>_exact` for each family, in that order).

    Test rows: up to `n` per family (an int for all, a dict per family with DEFAULT_TEST_N for the
    rest, None = TEST_N, what evals/tasks/ ships) from the family's held-out `eval` split at `seed`,
    no question twice. A family with fewer distinct held-out questions gets them all; the YAML's
    metadata `n` is the number written. No `train`-split row (the default of `generate_tasks`,
    `tasks` steps and `generator: tasks` sources) asks any of them, whatever its seed: the split is
    a fixed partition of what is asked (datagen/tasks.py), so pools need no dedup against the eval.

    Few-shot: up to `fewshot_n` rows with distinct questions (seed `fewshot_seed`, default
    `seed + 1`, `train` split) go to a `train` split that lm-eval draws examples from;
    `num_fewshot` is written into the YAML (lm-eval's `num_fewshot` argument overrides it).
    `fewshot_n=0` writes none. Rows are read in memory by the loader (utils.py): nothing is cached
    under ~/.cache.
    """
    from datagen.tasks import DIFFICULTIES, GENERATOR_VERSION, check_families

    families = list(dict.fromkeys(check_families(families)))
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; valid: {', '.join(DIFFICULTIES)}")
    if n is None:
        n = TEST_N
    sizes = ({f: n.get(f, DEFAULT_TEST_N) for f in families} if isinstance(n, dict)
             else dict.fromkeys(families, n))
    for family, size in sizes.items():
        if size <= 0:
            raise ValueError(f"n must be > 0, got {size} for {family}")
    if num_fewshot > 0 and fewshot_n < num_fewshot:
        raise ValueError(f"num_fewshot={num_fewshot} needs fewshot_n >= {num_fewshot} (got {fewshot_n})")
    out_dir = Path(out_dir).resolve()
    fewshot_seed = seed + 1 if fewshot_seed is None else fewshot_seed
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "utils.py").write_text(LOADER)

    names = []
    for family in families:
        test = _docs(family, sizes[family], seed, difficulty, "eval")
        _write_jsonl(out_dir / "data" / f"{family}_{TEST_SPLIT}.jsonl", test)
        splits = {"test_split": TEST_SPLIT}
        if fewshot_n > 0:
            pool = _docs(family, fewshot_n, fewshot_seed, difficulty, "train", exclude={d["question"] for d in test})
            if len(pool) < max(num_fewshot, 1):
                raise ValueError(f"{family}: only {len(pool)} few-shot rows differ from the test rows; "
                                 f"raise fewshot_n or lower num_fewshot")
            _write_jsonl(out_dir / "data" / f"{family}_{FEWSHOT_SPLIT}.jsonl", pool)
            splits["fewshot_split"] = FEWSHOT_SPLIT
        common = {
            "custom_dataset": Function("utils.load_split"),
            "dataset_kwargs": {"name": family},
            **splits,
            "num_fewshot": num_fewshot,
            "doc_to_text": DOC_TO_TEXT,
        }
        meta = {"version": 2.0, "generator": "datamill tasks", "generator_version": GENERATOR_VERSION,
                "family": family, "split": "eval", "n": len(test), "seed": seed, "fewshot_seed": fewshot_seed,
                "difficulty": difficulty}

        mc = f"datamill_{family}_mc"
        _write_yaml(out_dir / f"{mc}.yaml", {
            "task": mc, **common, "output_type": "multiple_choice",
            "doc_to_choice": "choices", "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": meta,
        })

        exact = f"datamill_{family}_exact"
        settings = _exact_settings(family)
        pattern, group = settings["regex"]
        exact_match = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                       "ignore_case": settings["ignore_case"], "ignore_punctuation": settings["ignore_punct"]}
        if settings["ignore"]:  # lm-eval 0.4 compares plain lists (one bool) when given an empty list
            exact_match["regexes_to_ignore"] = settings["ignore"]
        _write_yaml(out_dir / f"{exact}.yaml", {
            "task": exact, **common, "output_type": "generate_until",
            "doc_to_target": "answer",
            "generation_kwargs": {"until": ["\n"], "do_sample": False, "temperature": 0.0,
                                  "max_gen_toks": settings["max_gen_toks"]},
            "filter_list": [{"name": "extract", "filter": [
                {"function": "regex", "regex_pattern": pattern, "group_select": group, "fallback": "[invalid]"},
                {"function": "take_first"}]}],
            "metric_list": [exact_match],
            "metadata": meta,
        })
        names += [mc, exact]
        # the family's name alone runs both (`tasks: [datamill_arithmetic]`)
        _write_yaml(out_dir / f"datamill_{family}.yaml", {"group": f"datamill_{family}", "task": [mc, exact],
                                                          "metadata": {"version": 2.0}})
    return names


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the task families as lm-eval tasks into a folder.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--families", nargs="+", default=None, help="default: all")
    parser.add_argument("--n", type=int, default=None,
                        help=f"test rows per family (default: {DEFAULT_TEST_N}; capitals and chat: all held-out ones)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--fewshot-n", type=int, default=20)
    args = parser.parse_args(argv)
    names = export_lm_eval_tasks(args.out_dir, args.families, n=args.n, seed=args.seed,
                                 num_fewshot=args.num_fewshot, fewshot_n=args.fewshot_n)
    print(f"wrote {len(names)} tasks to {args.out_dir}: {', '.join(names)}")


if __name__ == "__main__":
    main()
