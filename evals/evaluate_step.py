"""`evaluate`: lm-evaluation-harness tasks and self-supervised (BYOD) metrics on a model, every
example's result kept.

Outputs:
    tables/main     one row per example and metric: id (the task row's or corpus row's id), task,
                    doc_id, metric, score, correct, target, output, generation / loglikelihoods,
                    prompt. Self-supervised rows: task `byod_<metric>`, target = the original
                    text, output = the perturbed one. A model trained by a step of the spec:
                    `contaminated`, whether the example's prompt overlaps a row it was trained on
                    (decontaminate's rule; the training tables are known from the plan).
    results.json    lm-eval's full results (configs, versions, metrics with stderr)

Stats (and so MLflow metrics `<step>.tasks.<task>.<metric>`): every task's metrics, their stderr
and their 95% bootstrap interval (`<metric>_ci_low`, `<metric>_ci_high`); for a trained model,
`contaminated.<task>` (examples that overlap its training data) and `clean.<task>.<metric>` (the
metrics on the other examples, next to the full set's); `lm_eval_command.<task>`: the `lm_eval` command line that gives the same numbers (also
the MLflow tag `step.<step>.lm_eval_command.<task>`). Tasks come from evals/tasks/ (shipped,
offline), your `include_path` folders, and with `lm_eval_defaults: true` lm-eval's built-in tasks
(their data comes from the hub).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from datamill.errors import DatamillError, FieldError, did_you_mean
from evals.byod import MetricName
from datamill.step import Step, StepConfig


class EvaluateConfig(StepConfig):
    """Evaluate a model on lm-eval tasks (shipped offline tasks, your own folders, or lm-eval's)."""

    model: str
    """A `models:` name, a trained step, or a model reference (builtin:..., a folder)."""
    tasks: list[str] = []
    """lm-eval task names, e.g. [datamill_capitals_mc, datamill_capitals_exact, datamill_mmlu_dev]."""
    self_supervised: list[MetricName] = []
    """BYOD metrics on `corpus` (evals/byod.py): sensitivity to negation, word order, tokenization,
    far context, and the toxicity trigger."""
    corpus: Optional[str] = None
    """Table of in-the-wild text for the self-supervised metrics (default: the built-in
    `python-docs` corpus, paragraphs of the Python reference manual)."""
    corpus_column: Optional[str] = None
    """Its text column (default `text`, else `messages` joined)."""
    max_examples: int = Field(1000, ge=1)
    """Examples per self-supervised metric (BYOD's default)."""
    training_data: Optional[str] = None
    """The table the model was trained on (e.g. a `select` output). Adds to every example its
    log density under those rows (`train_log_density`) and its most similar training row
    (`nearest_train_id`, `nearest_train_similarity`, and `nearest_train_select_score` when the
    table has select scores), by the selection stage's embedder (all-MiniLM-L6-v2)."""
    training_column: Optional[str] = None
    """Text column of `training_data` (default `messages` joined, else `text`)."""
    num_fewshot: Optional[int] = Field(None, ge=0)
    """Few-shot examples per prompt (default: each task's own setting)."""
    limit: Optional[int] = Field(None, ge=1)
    """Evaluate only the first `limit` examples of each task (quick checks)."""
    gen_kwargs: dict[str, Union[str, int, float, bool]] = {}
    """Overrides of generate_until tasks' generation settings, e.g. {max_gen_toks: 16} for short
    answers (lm-eval's own `gen_kwargs`; a batch generates until its longest answer ends)."""
    batch_size: int = Field(8, ge=1)
    apply_chat_template: Optional[bool] = None
    """Wrap prompts in the model's chat template. Default: when the tokenizer has one (instruct
    models answer generate_until tasks far better with it)."""
    include_path: list[str] = []
    """Folders of your own task YAMLs (relative to the spec), inside the spec's folder or its `code:`
    folders (a task YAML may name Python functions)."""
    lm_eval_defaults: bool = False
    """Also look tasks up among lm-eval's ~15k built-in tasks (needs a hub for their data)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 1234

    @model_validator(mode="after")
    def _something_to_do(self):
        if not self.tasks and not self.self_supervised:
            raise ValueError("give `tasks` (lm-eval) or `self_supervised` metrics, or both")
        return self


class EvaluateStep(Step):
    """lm-eval tasks on one model; metrics with stderr, results JSON, a per-example table."""

    kind = "evaluate"
    execution_only = ("device",)
    Config = EvaluateConfig
    row_reference_columns = ("nearest_train_id",)  # with training_data: the training row nearest to each example
    version = "3"  # 2: each task of `tasks` runs alone (see run); 3: intervals, `contaminated`, clean subset

    def model_refs(self):
        return [(("model",), self.config.model)]

    def input_tables(self):
        tables = [(("corpus",), self.config.corpus)] if self.config.corpus else []
        return tables + ([(("training_data",), self.config.training_data)] if self.config.training_data else [])

    def _include_paths(self, base_dir: Path) -> list[Path]:
        return [(Path(base_dir) / p).resolve() for p in self.config.include_path]

    def eval_tasks(self, env) -> dict:
        folders = tuple(self._include_paths(env.base_dir))
        return {name: folders for name in self.config.tasks}

    def check(self, env) -> None:
        from evals.harness import checked_task_folders, task_index

        checked_task_folders(self.config.include_path, env)
        if self.config.lm_eval_defaults:
            return  # lm-eval checks built-in names when it runs
        known = task_index(self._include_paths(env.base_dir))
        for i, name in enumerate(self.config.tasks):
            if name not in known:
                raise FieldError(("tasks", i), f"unknown task '{name}'{did_you_mean(name, known)}; available: "
                                 f"{', '.join(sorted(known))} (lm-eval's built-in tasks: lm_eval_defaults: true)")

    def key_material(self, env) -> dict:
        # The tasks decide the results: the YAML of each task asked for (a group's, and its
        # members'), and every other file of the task folders (data, loaders). Other tasks' YAML
        # stay out, so adding a task to a folder leaves the evaluations already made cached.
        from datamill.hashing import hash_file
        from evals.harness import SHIPPED_TASKS, group_members, task_index

        folders = [SHIPPED_TASKS, *self._include_paths(env.base_dir)]
        index = task_index(folders[1:])
        names, yamls = list(self.config.tasks), set()
        while names:
            path = index.get(names.pop())
            if path is not None and path not in yamls:
                yamls.add(path)
                names += group_members(path)
        return {"task_files": {str(p.relative_to(folder)) + f"@{i}": hash_file(p)
                               for i, folder in enumerate(folders) if folder.is_dir()
                               for p in sorted(folder.rglob("*"))
                               if p.is_file() and "__pycache__" not in p.parts and (p.suffix != ".yaml" or p in yamls)}}

    def comparison_metrics(self, stats: dict) -> dict[str, float]:
        """Each task's metrics (BYOD metrics by their score) for the sweep's table and charts."""
        out = {}
        for task, metrics in stats.get("tasks", {}).items():
            if task.startswith("byod_"):
                out[task] = metrics["score"]
            else:
                out.update({f"{task}.{m}": v for m, v in metrics.items() if not m.endswith(_NOT_METRICS)})
        for task, metrics in stats.get("clean", {}).items():  # next to the full set, where they differ
            if stats.get("contaminated", {}).get(task):
                out.update({f"clean.{task}.{m}": v for m, v in metrics.items()
                            if m != "examples" and not m.endswith(_NOT_METRICS)})
        return out

    def comparison_examples(self, out_dir: Path) -> dict:
        """Every metric's per-example scores from the main table, keyed by the example's doc id
        (and, for a BYOD metric, its place among the rows drawn from the same text)."""
        import polars as pl

        path = Path(out_dir) / "tables" / "main.parquet"
        if not path.is_file():
            return {}
        wanted = ["task", "doc_id", "metric", "score", "contaminated"]  # not the prompts and generations
        table = pl.read_parquet(path, columns=[c for c in wanted if c in pl.read_parquet_schema(path)])
        scores = _example_scores(table)
        if "contaminated" in table.columns:
            clean = table.filter(pl.col("contaminated") == False)  # noqa: E712 (null: not a question)
            scores.update({f"clean.{column}": s for column, s in _example_scores(clean).items()})
        return scores

    def run(self, ctx) -> None:
        import polars as pl

        cfg = self.config
        # The work in units that do not depend on each other: each entry of `tasks` (a task or a
        # group) and each self-supervised metric. Locally they share one loaded model (the shards'
        # `setup`); on a Ray executor each unit is a Ray task that loads the model itself (on a GPU
        # worker with `executor.num_gpus`). A unit's results are the same either way: lm-eval runs each entry
        # with the same seeds, alone (lm-eval batches the requests of tasks run together, and
        # other padding changes the last bits of a log-likelihood).
        units = [("task", name) for name in cfg.tasks] + [("byod", metric) for metric in cfg.self_supervised]
        corpus = self._corpus(ctx) if cfg.self_supervised else None
        model_path = str(ctx.model_path(cfg.model))
        # Your task folders are copied (data paths made absolute) into the workspace's shared folder,
        # not a temp one: the recorded lm_eval commands read them after the run.
        run_unit = functools.partial(evaluate_unit, settings=cfg.model_dump(mode="json"),
                                     include_paths=[str(p) for p in self._include_paths(ctx.env.base_dir)],
                                     task_dir=str(Path(ctx.shared_dir) / "lm_eval_tasks"), corpus=corpus,
                                     model_path=model_path)
        from evals.harness import hf_model

        load = functools.partial(hf_model, model_path, device=cfg.device, batch_size=cfg.batch_size)
        parts = ctx.shards.map(functools.partial(run_unit, label=ctx.name), units, setup={"lm": load})
        samples, metrics, results, commands = [], {}, {}, {}
        for part in parts:
            samples += part["samples"]
            metrics.update(part["metrics"])
            _merge_results(results, part["results"])
            commands.update(part["lm_eval_command"])
        chat = parts[0]["apply_chat_template"]
        schema = {"id": pl.String, "task": pl.String, "doc_id": pl.Int64, "metric": pl.String, "score": pl.Float64,
                  "correct": pl.Boolean, "target": pl.String, "output": pl.String, "generation": pl.String,
                  "loglikelihoods": pl.List(pl.Float64), "prompt": pl.String}
        table = pl.DataFrame(samples, schema=schema)
        trained_on = ctx.training_data.get(cfg.model, [])
        if cfg.tasks and trained_on:
            table = self._mark_contaminated(ctx, table, trained_on)
        if cfg.training_data:
            table = self._with_training_neighbours(ctx, table)
        ctx.write(table)
        if results:
            path = Path(ctx.out_dir) / "results.json"
            path.write_text(json.dumps(results, indent=2))
            ctx.log_artifact(path)
        _add_intervals(metrics, table)
        if "contaminated" in table.columns:
            ctx.stats["contaminated"], ctx.stats["clean"] = _clean_subset(table)
        ctx.stats.update({"tasks": metrics, "examples": table.select("id", "task").unique().height,
                          "apply_chat_template": chat})
        if commands:
            ctx.stats["lm_eval_command"] = commands
        ctx.stats.update(ctx.shards.summary())
        ctx.log_sample(table.drop("prompt", "loglikelihoods"), name="samples")

    def _mark_contaminated(self, ctx, table, trained_on: list[Path]):
        """A `contaminated` column: whether the example's prompt (as lm-eval renders the doc)
        overlaps a row the model was trained on, by decontaminate's rule (Tulu 3's 8-grams).
        Self-supervised rows stay null: their text is a corpus, not a question."""
        import polars as pl

        from datamill.overlap import prompt_texts
        from evals.contamination import contaminated_examples, eval_instances, template_frames

        train_texts = [text for path in trained_on for text in prompt_texts(pl.read_parquet(path))]
        folders = self._include_paths(ctx.env.base_dir)
        instances = eval_instances(self.config.tasks, folders)
        frames = template_frames(self.config.tasks, folders)  # "Question: ... Answer:" is not the question
        flags = {task: contaminated_examples(texts, train_texts, frame=frames.get(task, ("", "")))
                 for task, texts in instances.items()}
        marks = [flags[task][doc] if task in flags and 0 <= doc < len(flags[task]) else None
                 for task, doc in zip(table["task"].to_list(), table["doc_id"].to_list())]
        return table.with_columns(pl.Series("contaminated", marks, dtype=pl.Boolean))

    def _corpus(self, ctx) -> dict:
        """The self-supervised metrics' texts and their ids: the `corpus` table or python-docs."""
        from evals.byod import python_docs_corpus

        cfg = self.config
        if not cfg.corpus:
            texts = python_docs_corpus()
            return {"texts": texts, "ids": [f"python-docs:{i}" for i in range(len(texts))]}
        from datamill.records import column_texts, text_column

        table = ctx.read(cfg.corpus)
        texts = column_texts(table, text_column(table, cfg.corpus_column, f"evaluate corpus '{cfg.corpus}'"))
        if not texts:
            raise DatamillError(f"corpus table '{cfg.corpus}' is empty: the self-supervised metrics need text")
        ids = table["id"].cast(str).to_list() if "id" in table.columns else [str(i) for i in range(len(texts))]
        return {"texts": texts, "ids": ids}

    def _with_training_neighbours(self, ctx, table):
        """Join each example's density under the training rows and its nearest training row."""
        import polars as pl

        from datamill.records import column_texts, text_column
        from datamill.registry import function

        cfg = self.config
        train = ctx.read(cfg.training_data)
        if train.height == 0:
            raise DatamillError(f"training_data table '{cfg.training_data}' is empty")
        train_texts = column_texts(train, text_column(train, cfg.training_column,
                                                      f"evaluate training_data '{cfg.training_data}'"))
        examples = table.unique(["id", "task"], keep="first", maintain_order=True)
        texts = [f"{p or ''} {t or ''}".strip() for p, t in zip(examples["prompt"], examples["target"])]
        found = function("neighbours")(texts, train_texts)
        train_ids = train["id"].cast(str).to_list() if "id" in train.columns else [str(i) for i in range(train.height)]
        columns = {"id": examples["id"], "task": examples["task"],
                   "train_log_density": found["log_density"].tolist(),
                   "nearest_train_id": [train_ids[i] for i in found["nearest"]],
                   "nearest_train_similarity": found["similarity"].tolist()}
        if "select_score" in train.columns:
            scores = train["select_score"].to_list()
            columns["nearest_train_select_score"] = [scores[i] for i in found["nearest"]]
        ctx.stats["training_data"] = {"rows": train.height, "mean_log_density": float(found["log_density"].mean())}
        return table.join(pl.DataFrame(columns), on=["id", "task"], how="left", maintain_order="left")


def evaluate_unit(unit: tuple[str, str], *, settings: dict, include_paths: list[str], corpus: dict | None,
                  model_path: str, task_dir: str | None = None, lm=None, label: str = "evaluate") -> dict:
    """One lm-eval task (or group) or one self-supervised metric on a model: its per-example rows,
    metrics, lm-eval results, whether prompts went through the chat template, and the `lm_eval`
    command that gives the same numbers. A plain function of plain values, so a Ray worker can run
    it; `lm` is the model at `model_path` when the caller has loaded it (`hf_model`), else it is
    loaded here. `task_dir`: where the copy of your task folders goes (`task_folder`)."""
    from evals.harness import evaluate, hf_model, hf_model_args, lm_eval_command

    cfg = EvaluateConfig.model_validate(settings)
    if lm is None:
        lm = hf_model(model_path, device=cfg.device, batch_size=cfg.batch_size)
    chat = cfg.apply_chat_template
    if chat is None:
        chat = bool(getattr(lm.tokenizer, "chat_template", None))
    kind, name = unit
    if kind == "task":
        run = evaluate(lm, [name], include_paths=[Path(p) for p in include_paths], defaults=cfg.lm_eval_defaults,
                       num_fewshot=cfg.num_fewshot, limit=cfg.limit, apply_chat_template=chat, seed=cfg.seed,
                       gen_kwargs=cfg.gen_kwargs, work_dir=Path(task_dir) if task_dir else None)
        model_args, device = hf_model_args(model_path, cfg.device)  # as hf_model built `lm`
        command = lm_eval_command([name], model_args=model_args, device=device, batch_size=cfg.batch_size,
                                  include_path=run.task_folder, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                  apply_chat_template=chat, seed=cfg.seed, gen_kwargs=cfg.gen_kwargs)
        return {"samples": run.samples, "metrics": run.metrics, "results": run.results, "apply_chat_template": chat,
                "lm_eval_command": {name: command}}
    from datamill import progress
    from evals.byod import run_metric

    with progress.bar(label if label == name else f"{label}: {name}", total=None, unit="examples") as bar:
        found, summary = run_metric(name, lm.model, lm.tokenizer, corpus["texts"], max_examples=cfg.max_examples,
                                    batch_size=cfg.batch_size, progress=bar.advance)
    rows = [{"id": corpus["ids"][r["index"]], "task": f"byod_{name}", "doc_id": r["index"], "metric": name,
             "score": r["score"], "correct": None, "target": r["original"], "output": r["perturbed"],
             "generation": None, "loglikelihoods": None, "prompt": None} for r in found]
    return {"samples": rows, "metrics": {f"byod_{name}": summary}, "results": {}, "apply_chat_template": chat,
            "lm_eval_command": {}}


_NOT_METRICS = ("_stderr", "_ci_low", "_ci_high")


def _column(task: str, metric: str) -> str:
    """A per-example row's compared metric: "<task>.<metric>", a BYOD metric by its task name."""
    return task if task.startswith("byod_") else f"{task}.{metric}"


def _example_scores(table) -> dict:
    """{compared metric: ExampleScores} from per-example rows (task, doc_id, metric, score)."""
    import numpy as np

    from datamill.comparison import ExampleScores
    from evals import byod

    out = {}
    for (task, metric), rows in table.group_by(["task", "metric"], maintain_order=True):
        doc_ids = rows["doc_id"].to_list()
        seen: dict[int, int] = {}
        keys = []
        for doc in doc_ids:  # BYOD may draw several examples from one text: the n-th of doc d is "d#n"
            seen[doc] = seen.get(doc, -1) + 1
            keys.append(f"{doc}#{seen[doc]}")
        statistic = byod.AGGREGATION[task.removeprefix("byod_")] if task.startswith("byod_") else "mean"
        out[_column(task, metric)] = ExampleScores(keys, np.asarray(rows["score"].to_list(), dtype=float), statistic)
    return out


def _clean_subset(table) -> tuple[dict, dict]:
    """({task: examples contaminated}, {task: {metric: value on the clean examples, its interval,
    "examples": how many}}) of a table with a `contaminated` column."""
    import polars as pl

    from datamill import stats

    marked = table.filter(pl.col("contaminated").is_not_null())
    counts = {task: int(rows.select("doc_id", "contaminated").unique().get_column("contaminated").sum())
              for (task,), rows in marked.group_by(["task"], maintain_order=True)}
    clean: dict[str, dict] = {}
    for (task, metric), rows in marked.filter(~pl.col("contaminated")).group_by(["task", "metric"], maintain_order=True):
        scores = rows["score"].to_numpy()
        low, high = stats.interval(scores)
        clean.setdefault(task, {"examples": rows.height}).update(
            {metric: float(scores.mean()), f"{metric}_ci_low": low, f"{metric}_ci_high": high})
    return counts, clean


def _add_intervals(metrics: dict, table) -> None:
    """Each task metric's 95% bootstrap interval over its examples, beside it in the stats:
    `<metric>_ci_low` / `<metric>_ci_high` (a BYOD metric: `score_ci_low` / `score_ci_high`)."""
    from datamill import stats

    for column, scores in _example_scores(table).items():
        task, _, metric = column.partition(".")
        values = metrics.get(task)
        name = metric or "score"
        if not isinstance(values, dict) or name not in values or not len(scores.values):
            continue
        values[f"{name}_ci_low"], values[f"{name}_ci_high"] = stats.interval(scores.values, scores.statistic)


def _merge_results(into: dict, part: dict) -> None:
    """lm-eval results of one more task: its entries added to every per-task section (results,
    configs, versions, n-shot, ...); run-wide values (date, environment) kept from the first."""
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key].update(value)
        else:
            into.setdefault(key, value)
