"""EleutherAI lm-evaluation-harness, called through its Python API, with datamill's shipped tasks.

    from evals.harness import evaluate, hf_model
    run = evaluate(hf_model("path/to/model"), ["datamill_capitals_mc"])
    run.metrics        # {"datamill_capitals_mc": {"acc": 0.87, "acc_stderr": 0.03, ...}}
    run.samples        # one dict per example and metric: id, task, metric, score, correct, ...

The shipped tasks (evals/tasks/) also run from the plain CLI; `lm_eval_command` writes the command
line that gives the numbers `evaluate` gives (same model arguments, seeds, chat template, ...).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import warnings
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
    """lm-eval's TaskManager over the shipped tasks and `include_paths` (through `task_folder`, in
    `work_dir`); `defaults` adds lm-eval's ~15k built-in tasks (their data comes from the hub;
    indexing them takes ~10 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_folder(include_paths, work_dir)), include_defaults=defaults)


def task_folder(include_paths=(), under: Path | None = None) -> Path:
    """The one folder lm-eval indexes (the `lm_eval` CLI takes a single --include_path): the
    shipped tasks, or with your folders a folder in `under` that holds a copy of the shipped tasks
    (datamill/) and of each of yours (include-<i>/) with relative data files made absolute
    (`resolved_task_folder`). It is named by the digest of what it copies, so it is written once,
    and it stays: the recorded `lm_eval` command of an evaluation reads it."""
    import shutil

    folders = [Path(p).resolve() for p in include_paths]
    if not folders:
        return SHIPPED_TASKS
    if under is None:
        raise ValueError("task_folder: your task folders need `under`, where their resolved copy goes")
    from datamill.hashing import hash_file, hash_obj

    sources = [SHIPPED_TASKS, *folders]
    digest = hash_obj([{str(f.relative_to(folder)): hash_file(f) for f in _task_files(folder)} for folder in sources])
    final = Path(under).resolve() / digest
    if final.is_dir():
        return final
    # Built in a temp folder and renamed: a reader (another unit, another run) sees all of it or none.
    tmp = final.with_name(f".{digest}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, folder in enumerate(sources):
        name = "datamill" if i == 0 else f"include-{i - 1}"
        resolved_task_folder(folder, tmp / name, points_to=final / name)
    try:
        os.rename(tmp, final)
    except OSError:  # another process wrote the same folder first
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _task_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def resolved_task_folder(folder: Path, copy: Path, points_to: Path | None = None) -> Path:
    """A copy of a task folder in which every YAML's relative `dataset_kwargs.data_files` points
    at the copied file (in `points_to`, where the copy will be read from; default `copy`). lm-eval
    resolves relative data files against the current directory, so a task folder otherwise works
    only when run from one place. Other files (utils.py for `!function`, included YAMLs) are
    copied as they are."""
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

    def absolute(value, source: Path, target: Path):
        if isinstance(value, str):
            exists = not Path(value).is_absolute() and (source / value).exists()
            return os.path.normpath(target / value) if exists else value
        if isinstance(value, list):
            return [absolute(v, source, target) for v in value]
        if isinstance(value, dict):
            return {k: absolute(v, source, target) for k, v in value.items()}
        return value

    folder, points_to = Path(folder).resolve(), Path(points_to or copy).absolute()
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for path in folder.rglob("*.yaml"):
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
        files = config.get("dataset_kwargs", {}).get("data_files") if isinstance(config, dict) else None
        if files is not None:
            relative = path.parent.relative_to(folder)
            config["dataset_kwargs"]["data_files"] = absolute(files, path.parent, points_to / relative)
            (copy / path.relative_to(folder)).write_text(yaml.dump(config, Dumper=Dumper, sort_keys=False,
                                                                    allow_unicode=True), encoding="utf-8")
    return copy


def checked_task_folders(include_path: list[str], env) -> list:
    """A step's `include_path` folders, resolved against the spec's folder, each an existing folder
    inside the spec's folder or its `code:` folders (a task YAML can run Python through
    `!function`): FieldError at the entry otherwise."""
    from datamill.errors import FieldError
    from datamill.user_code import outside_allowed_folders

    folders = [(Path(env.base_dir) / p).resolve() for p in include_path]
    for i, folder in enumerate(folders):
        if not folder.is_dir():
            raise FieldError(("include_path", i), f"task folder not found: {folder}")
        refused = outside_allowed_folders(folder, env)
        if refused:
            raise FieldError(("include_path", i), refused)
    return folders


def hf_model_args(path, device: str = "auto") -> tuple[dict, str]:
    """The arguments of lm-eval's HFLM for a local folder (what the `lm_eval` CLI's --model_args
    takes) and the device ("auto": cuda when there is one): a full model, or a LoRA adapter
    (adapter_config.json) on top of the base model it names."""
    from datamill.devices import resolve_device

    path = Path(path).resolve()
    device = resolve_device(device)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        args = {"pretrained": base, "peft": str(path), "tokenizer": str(path)}
    else:
        args = {"pretrained": str(path)}
    args["dtype"] = "float32" if device == "cpu" else "auto"
    return args, device


def hf_model(path, *, device: str = "auto", batch_size: int = 8):
    """lm-eval's HFLM on a local folder, built from `hf_model_args` as the `lm_eval` CLI builds it."""
    from lm_eval.models.huggingface import HFLM

    from datamill.progress import no_hf_loading_bars

    args, device = hf_model_args(path, device)
    with no_hf_loading_bars(), warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` when it loads an adapter:
        # a FutureWarning for them, noise in every evaluate of a LoRA model for our users
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return HFLM(**args, device=device, batch_size=batch_size)


def lm_eval_command(tasks: list[str], *, model_args: dict, device: str, batch_size: int, include_path: Path,
                    num_fewshot: int | None = None, limit: int | None = None, apply_chat_template: bool = False,
                    seed: int = 1234, gen_kwargs: dict | None = None) -> str:
    """The `lm_eval` command line that runs `tasks` as `evaluate` does with these settings, so it
    gives the same numbers: lm-eval's own defaults differ (its --seed is 0,1234,1234,1234, no chat
    template). Dictionaries go as JSON: in lm-eval's key=value form a folder named like a number
    would be read as one."""
    args = ["lm_eval", "--model", "hf", "--model_args", json.dumps(model_args), "--device", device,
            "--batch_size", str(batch_size), "--include_path", str(include_path), "--tasks", ",".join(tasks),
            "--seed", str(seed)]  # one value: all four seeds, as `evaluate` sets them
    if apply_chat_template:
        args += ["--apply_chat_template", "--fewshot_as_multiturn"]  # the second is the CLI's default: said
    if num_fewshot is not None:
        args += ["--num_fewshot", str(num_fewshot)]
    if limit is not None:
        args += ["--limit", str(limit)]
    if gen_kwargs:
        args += ["--gen_kwargs", json.dumps(gen_kwargs)]
    return shlex.join(args)


@dataclass
class EvalRun:
    results: dict  # lm-eval's results (without samples), JSON-ready
    metrics: dict[str, dict[str, float]]  # task -> metric -> value (and <metric>_stderr)
    samples: list[dict]  # one row per example and metric
    task_folder: Path  # the folder lm-eval indexed (`task_folder`); gone after the call if `work_dir` was None


def evaluate(lm, tasks: list[str], *, include_paths=(), defaults: bool = False, num_fewshot: int | None = None,
             limit: int | None = None, apply_chat_template: bool = False, seed: int = 1234,
             work_dir: Path | None = None, gen_kwargs: dict | None = None) -> EvalRun:
    """Run `tasks` on an lm-eval LM (HFLM or any registered LM class), samples logged.
    `work_dir`: where the copy of `include_paths` with absolute data paths goes (`task_folder`; a
    temp folder if None). The settings are those `lm_eval_command` writes for the CLI."""
    import tempfile
    import logging

    import lm_eval
    from lm_eval.tasks import TaskManager

    for name in ("lm_eval.api.task", "lm_eval.evaluator"):
        logging.getLogger(name).addFilter(_drop_notices_for_cli_users)
    if hasattr(lm, "model") and hasattr(lm.model, "eval"):
        lm.model.eval()  # evaluation never trains: no dropout, no training-time hooks
    with tempfile.TemporaryDirectory() as tmp:
        folder = task_folder(include_paths, Path(work_dir or tmp))
        manager = TaskManager(include_path=str(folder), include_defaults=defaults)
        # fewshot_as_multiturn as the CLI sets it (on with the chat template); without one it changes nothing
        res = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot, limit=limit,
            log_samples=True, apply_chat_template=apply_chat_template, fewshot_as_multiturn=bool(apply_chat_template),
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            gen_kwargs=gen_kwargs or None)
    samples = res.pop("samples")
    results = json.loads(json.dumps(res, default=str))
    return EvalRun(results=results, metrics=task_metrics(results), samples=sample_rows(samples), task_folder=folder)


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
