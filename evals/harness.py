"""EleutherAI lm-evaluation-harness, called through its Python API, with datamill's shipped tasks.

    from evals.harness import evaluate, hf_model
    run = evaluate(hf_model("path/to/model"), ["datamill_capitals_mc"])
    run.metrics        # {"datamill_capitals_mc": {"acc": 0.87, "acc_stderr": 0.03, ...}}
    run.samples        # one dict per example and metric: id, task, metric, score, correct, ...

The shipped tasks (evals/tasks/) also run from the plain CLI:
    lm_eval --model hf --model_args pretrained=MODEL --include_path evals/tasks --tasks datamill_capitals_mc
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

SHIPPED_TASKS = Path(__file__).resolve().parent / "tasks"
BINARY_METRICS = ("acc", "acc_norm", "exact_match")  # 1.0 = right, 0.0 = wrong
_TASK_LINE = re.compile(r"^(?:task|group):[ \t]*['\"]?([^'\"\s#\[]+)", re.M)  # a name on the same line


def task_index(include_paths=()) -> dict[str, Path]:
    """Task and group name -> YAML file in the shipped folder and `include_paths`, read without
    lm-eval (a plan-time check must not import it)."""
    index: dict[str, Path] = {}
    for folder in [SHIPPED_TASKS, *map(Path, include_paths)]:
        for path in sorted(folder.rglob("*.yaml")):
            for name in _TASK_LINE.findall(path.read_text(encoding="utf-8", errors="replace")):
                index.setdefault(name, path)
    return index


def group_members(path: Path) -> list[str]:
    """The task names a group YAML lists under `task:` (none for a plain task)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not re.search(r"^group:", text, re.M):
        return []
    block = re.search(r"^task:[ \t]*(\[[^\]]*\]|\n(?:[ \t]*-[^\n]*\n?)+)", text, re.M)
    return re.findall(r"\w[\w\-.]*", block.group(1)) if block else []


def task_manager(include_paths=(), defaults: bool = False, work_dir: Path | None = None):
    """lm-eval's TaskManager over the shipped tasks and `include_paths`; `defaults` adds lm-eval's
    ~15k built-in tasks (their data comes from the hub; indexing them takes ~10 s). Your folders
    are used through copies in `work_dir` whose relative `data_files` are made absolute
    (`resolved_task_folder`)."""
    from lm_eval.tasks import TaskManager

    folders = [resolved_task_folder(Path(p), Path(work_dir) / f"include-{i}") if work_dir else Path(p)
               for i, p in enumerate(include_paths)]
    return TaskManager(include_path=[str(SHIPPED_TASKS), *map(str, folders)], include_defaults=defaults)


def resolved_task_folder(folder: Path, copy: Path) -> Path:
    """A copy of a task folder in which every YAML's relative `dataset_kwargs.data_files` points
    at the file next to the original YAML. lm-eval resolves relative data files against the
    current directory, so a task folder otherwise works only when run from one place. Other
    files (utils.py for `!function`, included YAMLs) are copied as they are."""
    import shutil

    import yaml

    class Tagged(str):
        tag = ""

    class Loader(yaml.SafeLoader):
        pass

    class Dumper(yaml.SafeDumper):
        pass

    def keep_tag(loader, suffix, node):  # !function and other lm-eval tags survive the round trip
        value = Tagged(loader.construct_scalar(node))
        value.tag = suffix
        return value

    Loader.add_multi_constructor("!", keep_tag)
    Dumper.add_representer(Tagged, lambda dumper, value: dumper.represent_scalar("!" + value.tag, str(value)))

    def absolute(value, base: Path):
        if isinstance(value, str):
            return str((base / value).resolve()) if not Path(value).is_absolute() and (base / value).exists() else value
        if isinstance(value, list):
            return [absolute(v, base) for v in value]
        if isinstance(value, dict):
            return {k: absolute(v, base) for k, v in value.items()}
        return value

    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for path in folder.rglob("*.yaml"):
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
        files = config.get("dataset_kwargs", {}).get("data_files") if isinstance(config, dict) else None
        if files is not None:
            config["dataset_kwargs"]["data_files"] = absolute(files, path.parent)
            (copy / path.relative_to(folder)).write_text(yaml.dump(config, Dumper=Dumper, sort_keys=False,
                                                                    allow_unicode=True), encoding="utf-8")
    return copy


def hf_model(path, *, device: str = "auto", batch_size: int = 8):
    """lm-eval's HFLM on a local folder: a full model, or a LoRA adapter (adapter_config.json)
    on top of the base model it names."""
    import torch
    from lm_eval.models.huggingface import HFLM

    path = Path(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"device": device, "batch_size": batch_size, "dtype": "float32" if device == "cpu" else "auto"}
    from datamill.progress import no_hf_loading_bars

    adapter = path / "adapter_config.json"
    with no_hf_loading_bars():
        if adapter.is_file():
            base = json.loads(adapter.read_text())["base_model_name_or_path"]
            return HFLM(pretrained=base, peft=str(path), tokenizer=str(path), **kwargs)
        return HFLM(pretrained=str(path), **kwargs)


@dataclass
class EvalRun:
    results: dict  # lm-eval's results (without samples), JSON-ready
    metrics: dict[str, dict[str, float]]  # task -> metric -> value (and <metric>_stderr)
    samples: list[dict]  # one row per example and metric


def evaluate(lm, tasks: list[str], *, include_paths=(), defaults: bool = False, num_fewshot: int | None = None,
             limit: int | None = None, apply_chat_template: bool = False, seed: int = 1234,
             work_dir: Path | None = None, gen_kwargs: dict | None = None) -> EvalRun:
    """Run `tasks` on an lm-eval LM (HFLM or any registered LM class), samples logged.
    `work_dir`: where copies of `include_paths` with absolute data paths go (a temp folder if None)."""
    import tempfile
    import logging

    import lm_eval

    for name in ("lm_eval.api.task", "lm_eval.evaluator"):
        logging.getLogger(name).addFilter(_drop_notices_for_cli_users)
    if hasattr(lm, "model") and hasattr(lm.model, "eval"):
        lm.model.eval()  # evaluation never trains: no dropout, no training-time hooks
    with tempfile.TemporaryDirectory() as tmp:
        manager = task_manager(include_paths, defaults, Path(work_dir or tmp))
        res = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot, limit=limit,
            log_samples=True, apply_chat_template=apply_chat_template, random_seed=seed,
            numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed, gen_kwargs=gen_kwargs or None)
    samples = res.pop("samples")
    results = json.loads(json.dumps(res, default=str))
    return EvalRun(results=results, metrics=task_metrics(results), samples=sample_rows(samples))


def _drop_notices_for_cli_users(record) -> bool:
    """lm-eval logs a hint about --metadata for every task with a custom loader, and calls
    gen_kwargs "specified through cli": neither speaks to a spec's user."""
    message = record.getMessage()
    return "Custom kwargs can be passed" not in message and "specified through cli" not in message


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value, metric_stderr: value}} from lm-eval's "metric,filter" keys; the
    filter name is kept only when a task reports one metric under several filters."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        keyed = [(k.split(",", 1), v) for k, v in values.items() if "," in k and isinstance(v, (int, float))]
        filters: dict[str, set] = {}
        for (metric, filt), _ in keyed:
            filters.setdefault(metric.removesuffix("_stderr"), set()).add(filt)
        metrics = {}
        for (metric, filt), value in keyed:
            base = metric.removesuffix("_stderr")
            name = base if len(filters[base]) == 1 else f"{base}_{filt}"
            metrics[name + ("_stderr" if metric.endswith("_stderr") else "")] = float(value)
        out[task] = metrics
    return out


def sample_rows(samples: dict[str, list[dict]]) -> list[dict]:
    """One row per (example, metric): the example's id from its doc (else "<task>:<doc_id>"),
    task, metric, score, correct (binary metrics), target, output (after the task's filters: the
    extracted answer, or the choice the metric picked), the prompt, and either the raw generation
    or every choice's log-likelihood."""
    rows = []
    for task, task_samples in samples.items():
        for s in task_samples:
            doc = s.get("doc") or {}
            contexts, continuations = _arguments(s.get("arguments"))
            responses = s.get("filtered_resps") or []
            loglikelihoods = None
            if responses and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in responses):
                loglikelihoods = [float(r[0]) for r in responses]  # (log-likelihood, is greedy) per choice
            else:
                output = responses[0] if responses else ""
                output = output[0] if isinstance(output, (list, tuple)) and output else output
            raw = s.get("resps") or []
            generation = raw[0][0] if loglikelihoods is None and raw and raw[0] else None  # before the filters
            target = s.get("target")
            if loglikelihoods is not None and isinstance(target, int) and target < len(continuations):
                target = continuations[target].strip()
            for metric in s.get("metrics", []):
                score = s.get(metric)
                if not isinstance(score, (int, float)):
                    continue
                if loglikelihoods is not None:
                    output = _choice(loglikelihoods, continuations, normalised=metric == "acc_norm")
                rows.append({"id": str(doc.get("id", f"{task}:{s['doc_id']}")), "task": task,
                             "doc_id": int(s["doc_id"]), "metric": metric, "score": float(score),
                             "correct": bool(score >= 1.0) if metric in BINARY_METRICS else None,
                             "target": str(target), "output": str(output), "generation": generation,
                             "loglikelihoods": loglikelihoods,
                             "prompt": contexts[0] if contexts else ""})
    return rows


def _choice(loglikelihoods: list[float], continuations: list[str], normalised: bool) -> str:
    """The choice a multiple-choice metric picked: highest log-likelihood, or per character of
    the choice (acc_norm; the continuation less lm-eval's default " " delimiter)."""
    def value(i: int) -> float:
        if not normalised:
            return loglikelihoods[i]
        text = continuations[i] if i < len(continuations) else ""
        return loglikelihoods[i] / max(1, len(text) - text.startswith(" "))

    best = max(range(len(loglikelihoods)), key=value)
    return continuations[best].strip() if best < len(continuations) else str(best)


def _arguments(arguments) -> tuple[list[str], list[str]]:
    """(contexts, continuations) from a sample's request arguments, in either of lm-eval's shapes:
    [(context, continuation), ...] or {"gen_args_0": {"arg_0": context, "arg_1": ...}, ...}."""
    if isinstance(arguments, dict):
        arguments = [[a.get("arg_0"), a.get("arg_1")] for a in arguments.values()]
    contexts, continuations = [], []
    for arg in arguments or []:
        contexts.append(str(arg[0]))
        continuations.append(arg[1] if isinstance(arg[1], str) else "")
    return contexts, continuations
