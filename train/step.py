"""`train`: fine-tune a causal LM on instruction tables; the output is an HF model folder.

The step tokenises its tables (chat template, loss mask; cached in the workspace's shared folder
by table digest and tokenizer, so a sweep over learning rates tokenises once), holds out an eval
split, runs `train.loop.train`, and writes:

    model/            the fine-tuned model (save_pretrained + tokenizer), what later steps load
    tables/main       one row per example: id, table, split, tokens, loss_tokens, truncated
    tables/log        one row per optimizer step: loss, lr, grad_norm, tokens/s, eval_loss, ...
    tables/rejected   rows that cannot train (no assistant turn, nothing left after truncation)
    loss_curve.png    train and eval loss (also logged to MLflow)

A killed run resumes from its last checkpoint (`checkpoint_every`) in the step's state folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from datamill.atomic import write_atomic
from datamill.errors import DatamillError, FieldError
from datamill.step import Step
from train.config import EXECUTION_ONLY, TrainConfig
from train.launch import following, launch_local, launch_ray

TOKENS_VERSION = "1"  # bump when tokenisation changes: cached token files are then rebuilt


class TrainStep(Step):
    """Fine-tune a model (LoRA or full) with packing, goldfish loss and NEFTune; resumable."""

    kind = "train"
    execution_only = EXECUTION_ONLY
    Config = TrainConfig
    version = "2"  # 2: the logged lr is the rate each step trained with (read before the scheduler steps)
    produces_model = True
    side_tables = ("log", "rejected")

    def key_config(self) -> dict:
        config = super().key_config()
        if config.get("launch"):
            config["launch"].pop("timeout_s", None)
        if config["objective"] == "sft":  # SFT keys stay what they were before preference objectives came
            for field in ("objective", "beta", "gamma", "reference"):
                config.pop(field)
        return config

    def input_tables(self):
        cfg = self.config
        tables = [(("data",) if isinstance(cfg.data, str) else ("data", t), t) for t in cfg.tables()]
        if cfg.eval_data:
            tables.append((("eval_data",), cfg.eval_data))
        return tables

    def model_refs(self):
        refs = [(("model",), self.config.model)]
        if self.config.reference_model():
            refs.append((("reference",), self.config.reference_model()))
        return refs

    def check(self, env) -> None:
        cfg = self.config
        if len(set(cfg.tables())) != len(cfg.tables()):
            raise FieldError("data", "a table is listed twice; give it a larger mixture weight instead")
        if cfg.weights() is not None and not any(w > 0 for w in cfg.weights().values()):
            raise FieldError("data", "mixture weights must include a positive one")
        config_file = self._config_file(env.base_dir)
        if config_file is not None and not config_file.is_file():
            raise FieldError(("launch", "config_file"), f"Accelerate config file not found: {config_file}")
        if cfg.eval_data in cfg.tables():
            raise FieldError("eval_data", f"'{cfg.eval_data}' is also a training table: hold out a separate table")

    def key_material(self, env) -> dict:
        config_file = self._config_file(env.base_dir)
        return {"launch_config_file": _digest(config_file)} if config_file else {}

    # --- running ---------------------------------------------------------------------------

    def run(self, ctx) -> None:
        import polars as pl

        from train.loop import TrainJob, train

        cfg = self.config
        model_dir = Path(ctx.model_path(cfg.model))
        examples, rejected = self._tokenise(ctx, model_dir)
        if not examples.filter(pl.col("split") == "train").height:
            raise DatamillError(f"no trainable rows in {', '.join(cfg.tables())} "
                                f"({rejected.height} rejected: see {ctx.name}__rejected)")
        state = Path(ctx.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        tokens_file = state / "examples.parquet"
        _write_parquet_atomic(examples, tokens_file)

        reference = cfg.reference_model()
        job = TrainJob(config=cfg.model_dump(mode="json"), model_dir=str(model_dir), examples=str(tokens_file),
                       out_dir=str(ctx.out_dir), state_dir=str(state),
                       live_log=str(state / "live.jsonl") if cfg.launch else None,
                       reference_dir=str(ctx.model_path(reference)) if reference else None)
        job.save(state / "job.json")  # the same job runs under `accelerate launch -m train.loop job.json`
        if cfg.launch is None:
            summary = train(job, log=ctx.log_metrics, progress_desc=f"{ctx.name}: train")
        else:
            self._launch(ctx, state / "job.json", Path(job.live_log))
            summary = json.loads((Path(ctx.out_dir) / "summary.json").read_text())
        history = _read_jsonl(Path(ctx.out_dir) / "log.jsonl")

        ctx.write(examples.drop("input_ids", "labels", "table").rename({"table_name": "table"}))
        ctx.write(pl.DataFrame(history, infer_schema_length=None), "log")
        ctx.reject(rejected)
        ctx.stats.update(summary)
        ctx.stats["data_digests"] = {t: _digest(ctx.input_path(t)) for t in cfg.tables()}
        plot = Path(ctx.out_dir) / "loss_curve.png"
        _loss_plot(history, plot, title=f"{ctx.name}: {Path(cfg.model).name if '/' in cfg.model else cfg.model}")
        ctx.log_artifact(plot)
        if cfg.log_model:
            ctx.log_artifact(Path(ctx.model_dir), f"{ctx.name}/model")

    def _launch(self, ctx, job_path: Path, live_log: Path) -> None:
        """The job in `launch.num_processes` processes: Ray Train workers on a Ray executor, else
        `accelerate launch` on this machine (train/launch.py). The processes' live log drives the
        progress bar here and reaches MLflow as it comes."""
        from datamill import progress

        with progress.bar(f"{ctx.name}: train", unit="steps") as bar:
            def header(total: int, start: int) -> None:
                bar.set_total(total)
                bar.advance(start - bar.done)
                if start:
                    progress.console().print(f"  resuming {ctx.name} at step {start}/{total}")

            def row(step: int, metrics: dict) -> None:
                bar.advance(step - bar.done)
                ctx.log_metrics(metrics, step)

            with following(live_log, header, row):
                self._start_processes(ctx, job_path)

    def _start_processes(self, ctx, job_path: Path) -> None:
        from train.loop import _mixed_precision

        cfg = self.config
        if ctx.shards.kind == "ray":
            if cfg.launch.config_file:  # silently running DDP instead would surprise a user who asked for FSDP
                raise DatamillError("launch.config_file (an Accelerate FSDP/DeepSpeed config) is not used by "
                                    "Ray Train, which runs DDP: remove it, or run with executor: local")
            shards = ctx.shards
            ray = shards.ray
            with shards.released():  # Ray Train works; another sweep point may use this process
                launch_ray(ray, job_path, num_processes=cfg.launch.num_processes, device=cfg.device,
                           num_cpus=shards.num_cpus, num_gpus=shards.num_gpus, storage=job_path.parent / "ray-train")
            ctx.stats["launcher"] = "ray-train"
        else:
            config_file = self._config_file(ctx.env.base_dir)
            launch_local(job_path, num_processes=cfg.launch.num_processes, mixed_precision=_mixed_precision(cfg),
                         device=cfg.device, config_file=config_file, log_path=job_path.parent / "launch.log",
                         timeout_s=cfg.launch.timeout_s)
            ctx.stats["launcher"] = "accelerate"

    def _config_file(self, base_dir: Path) -> Path | None:
        launch = self.config.launch
        return (Path(base_dir) / launch.config_file).resolve() if launch and launch.config_file else None

    def _tokenise(self, ctx, model_dir: Path):
        """All rows of all tables as tokenised examples (+ rejected rows), through the token cache."""
        import polars as pl

        cfg = self.config
        parts, rejected = [], []
        sources = [(t, "train") for t in cfg.tables()] + ([(cfg.eval_data, "eval")] if cfg.eval_data else [])
        for index, (table, split) in enumerate(sources):
            tokens, bad = self._tokenise_table(ctx, model_dir, table)
            parts.append(tokens.with_columns(pl.lit(index if split == "train" else -1, pl.Int64).alias("table"),
                                             pl.lit(table).alias("table_name"), pl.lit(split).alias("split")))
            rejected.append(bad.with_columns(pl.lit(table).alias("table_name")))
        examples = pl.concat(parts, how="vertical")
        if cfg.eval_fraction and not cfg.eval_data:
            examples = _hold_out(examples, cfg.eval_fraction, cfg.seed, by_id=cfg.preference)
        return examples, pl.concat(rejected, how="vertical")

    def _tokenise_table(self, ctx, model_dir: Path, table: str):
        import polars as pl
        from transformers import AutoTokenizer

        from datamill import progress
        from datamill.records import is_messages_column
        from train.data import TemplateError, encode

        cfg = self.config
        path = ctx.input_path(table)
        layout = "pairs" if cfg.preference else f"{cfg.column}|{cfg.loss_on}"
        cache_key = hashlib.sha256("|".join([
            TOKENS_VERSION, _digest(path), _tokenizer_fingerprint(model_dir), layout,
            str(cfg.max_len)]).encode()).hexdigest()[:24]
        cache = Path(ctx.shared_dir) / "train-tokens" / f"{cache_key}.parquet"
        cached_bad = cache.with_suffix(".rejected.parquet")
        if cache.is_file() and cached_bad.is_file():
            return pl.read_parquet(cache), pl.read_parquet(cached_bad)

        df = ctx.read(table)
        if cfg.preference:
            return self._tokenise_pairs(ctx, model_dir, table, df, cache, cached_bad)
        if cfg.column not in df.columns:
            raise DatamillError(f"table '{table}' has no column '{cfg.column}' (columns: {', '.join(df.columns)}); "
                                "set `column:` to the conversation or text column")
        conversational = is_messages_column(df, cfg.column)
        if not conversational and cfg.loss_on != "all":
            raise DatamillError(f"column '{cfg.column}' of '{table}' holds plain text, which has no assistant "
                                f"turns: set `loss_on: all` to train on every token")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = df["id"].to_list() if "id" in df.columns else [f"{table}:{i}" for i in range(df.height)]
        rows, bad = [], []
        for row_id, value in zip(ids, progress.track(df[cfg.column].to_list(), f"{ctx.name}: tokenise {table}")):
            reason = _unusable(value, conversational, cfg.loss_on)
            if reason is None:
                try:
                    ex = encode(tokenizer, value, cfg.loss_on, cfg.max_len)
                except TemplateError as e:
                    raise DatamillError(f"table '{table}': {e}") from None
                loss_tokens = sum(1 for x in ex.labels if x != -100)
                if loss_tokens == 0:
                    reason = (f"no loss-bearing token within max_len={cfg.max_len} tokens "
                              f"(the example has {len(ex.input_ids)}+ tokens of prompt)")
                else:
                    rows.append({"id": row_id, "input_ids": ex.input_ids, "labels": ex.labels,
                                 "tokens": len(ex.input_ids), "loss_tokens": loss_tokens,
                                 "truncated": ex.truncated})
                    continue
            bad.append({"id": row_id, "reason": reason})
        return _save_tokens(rows, bad, cache, cached_bad)

    def _tokenise_pairs(self, ctx, model_dir: Path, table: str, df, cache: Path, cached_bad: Path):
        """A preference table -> two examples per pair, chosen then rejected (rows 2p and 2p+1),
        labels on the completions; unusable pairs go to the rejected table with the reason."""
        from transformers import AutoTokenizer

        from datamill import progress
        from train.data import TemplateError, encode_completion

        cfg = self.config
        missing = [c for c in ("prompt", "chosen", "rejected") if c not in df.columns]
        if missing:
            raise DatamillError(
                f"objective: {cfg.objective} trains on preference pairs, but table '{table}' has no "
                f"{', '.join(repr(c) for c in missing)} column (columns: {', '.join(df.columns)}); make pairs with a "
                "`pairs` step, or read them with a source of `schema: preference`")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = df["id"].to_list() if "id" in df.columns else [f"{table}:{i}" for i in range(df.height)]
        rows, bad = [], []
        triples = zip(ids, df["prompt"].to_list(), df["chosen"].to_list(), df["rejected"].to_list())
        for row_id, prompt, chosen, rejected in progress.track(list(triples), f"{ctx.name}: tokenise {table}"):
            reason = _unusable_pair(prompt, chosen, rejected)
            if reason is None:
                try:
                    sides = [encode_completion(tokenizer, _turns(prompt), _turns(c), cfg.max_len)
                             for c in (chosen, rejected)]
                except TemplateError as e:
                    raise DatamillError(f"table '{table}': {e}") from None
                counts = [sum(1 for x in ex.labels if x != -100) for ex in sides]
                if min(counts) == 0:
                    reason = (f"no completion token within max_len={cfg.max_len} tokens (the prompt takes "
                              f"{min(len(ex.input_ids) for ex in sides)}+ tokens): raise max_len")
                else:
                    rows += [{"id": row_id, "side": side, "input_ids": ex.input_ids, "labels": ex.labels,
                              "tokens": len(ex.input_ids), "loss_tokens": n, "truncated": ex.truncated}
                             for side, ex, n in zip(("chosen", "rejected"), sides, counts)]
                    continue
            bad.append({"id": row_id, "reason": reason})
        return _save_tokens(rows, bad, cache, cached_bad, pairs=True)


def _save_tokens(rows: list[dict], bad: list[dict], cache: Path, cached_bad: Path, pairs: bool = False):
    """The tokenised rows and the rejected ones as frames, written to the token cache."""
    import polars as pl

    schema = {"id": pl.String, **({"side": pl.String} if pairs else {}), "input_ids": pl.List(pl.Int32),
              "labels": pl.List(pl.Int32), "tokens": pl.Int64, "loss_tokens": pl.Int64, "truncated": pl.Boolean}
    tokens = pl.DataFrame(rows, schema=schema)
    bad_df = pl.DataFrame(bad, schema={"id": pl.String, "reason": pl.String})
    cache.parent.mkdir(parents=True, exist_ok=True)
    _write_parquet_atomic(bad_df, cached_bad)
    _write_parquet_atomic(tokens, cache)
    return tokens, bad_df


def _turns(value) -> list[dict]:
    """A preference column's value as messages (a plain string is one turn: user for a prompt is
    not expected here, since sources normalise it; an assistant completion otherwise)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _unusable_pair(prompt, chosen, rejected) -> str | None:
    if not prompt:
        return "no prompt"
    if not chosen or not rejected:
        return "empty chosen or rejected completion"
    if _turns(chosen) == _turns(rejected):
        return "chosen and rejected are identical: the pair teaches nothing"
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" and m["content"] for m in _turns(side)):
            return f"the {name} completion has no assistant turn"
    return None


def _unusable(value, conversational: bool, loss_on: str) -> str | None:
    if value is None:
        return "empty row (null)"
    if not conversational:
        return None if str(value).strip() else "empty text"
    if not value:
        return "no messages"
    if loss_on != "all" and not any(m["role"] == "assistant" and m["content"] for m in value):
        return "no assistant turn to learn from"
    return None


def _hold_out(examples, fraction: float, seed: int, by_id: bool = False):
    """Mark round(fraction * n) training rows (at least one) as eval, chosen by a hash of (seed, id):
    the same row is held out whatever the table's order. `by_id`: n counts distinct ids and rows
    sharing an id go together (a preference pair's two sides)."""
    import polars as pl

    train = examples.filter(pl.col("split") == "train")
    ids = train["id"].to_list()
    score = [(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest(), k) for k, i in enumerate(ids)]
    if by_id:
        distinct = sorted({s for s, _ in score})
        chosen = set(distinct[:max(1, round(fraction * len(distinct)))])
        held = {k for s, k in score if s in chosen}
    else:
        n = max(1, round(fraction * train.height))
        held = set(sorted(range(train.height), key=lambda k: score[k])[:n])
    is_eval = pl.Series([k in held for k in range(train.height)])
    train = train.with_columns(split=pl.when(is_eval).then(pl.lit("eval")).otherwise(pl.lit("train")),
                               table=pl.when(is_eval).then(pl.lit(-1, pl.Int64)).otherwise(pl.col("table")))
    return pl.concat([train, examples.filter(pl.col("split") != "train")], how="vertical")


def _tokenizer_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                 "tokenizer.model"):
        f = model_dir / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _digest(path: Path) -> str:
    from datamill.hashing import hash_file

    return hash_file(path)[:32]


def _write_parquet_atomic(df, path: Path) -> None:
    write_atomic(path, df.write_parquet)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _loss_plot(history: list[dict], path: Path, title: str) -> None:
    from datamill.plots import line_plot

    series = {"train loss": ([r["step"] for r in history], [r["loss"] for r in history])}
    evals = [r for r in history if "eval_loss" in r]
    if evals:
        series["eval loss"] = ([r["step"] for r in evals], [r["eval_loss"] for r in evals])
    line_plot(path, series, title=title, xlabel="optimizer step", ylabel="cross-entropy (nats/token)")
