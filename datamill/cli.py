"""The `datamill` command. Exit codes: 0 ok, 1 a step failed, 2 bad spec or usage.

User errors print one message per problem and no traceback (`--debug` shows it). Heavy
libraries are imported inside the commands that need them, so `--help`, `validate` and
`plan` answer fast.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from datamill import progress
from datamill.errors import EXIT_STEP_FAILED, DatamillError

app = typer.Typer(
    help="datamill: generate, clean, select, fine-tune and evaluate from one YAML spec; everything logged to MLflow.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
_state = {"debug": False}

SpecArg = typer.Argument(..., help="Path to the YAML spec.", show_default=False)
SetOpt = typer.Option(None, "--set", help="Override a field: --set steps.clean.dedup.exact=false (repeatable).")
PointOpt = typer.Option(None, "--point", help="One sweep point: its label (method=zipfit) or KEY=VALUE pairs "
                        "that match one point.", show_default=False)
GLOBAL_FLAGS = ("--debug", "--quiet", "-q")  # accepted after the subcommand too (see main)


def _print_version(value: bool) -> None:
    if value:
        from datamill import __version__

        typer.echo(f"datamill {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    version: bool = typer.Option(False, "--version", help="Print datamill's version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    _state["debug"] = debug
    progress.set_quiet(quiet)


@app.command()
def validate(spec: Path = SpecArg, set_: Optional[List[str]] = SetOpt) -> None:
    """Check a spec (types, references, files, cycles) without running anything."""
    from datamill.api import load

    points = load(spec, set_).points()
    n = len(points)
    typer.echo(f"{spec}: ok ({n} sweep point{'s' if n != 1 else ''})" if n > 1 or points[0].point else f"{spec}: ok")


@app.command()
def plan(spec: Path = SpecArg, set_: Optional[List[str]] = SetOpt) -> None:
    """Show the steps in order, each cached or to run, with row counts of cached outputs."""
    from rich.console import Console
    from rich.table import Table

    from datamill.api import plans
    from datamill.overlap import contamination_warnings
    from datamill.plan import describe

    console = Console()
    statuses = {"cached": "[green]cached[/green]", "to run": "[yellow]to run[/yellow]",
                "damaged": "[red]to run (damaged)[/red]"}
    for p in plans(spec, set_):
        title = f"{p.resolved.spec.name}" + (f"  [{p.resolved.label}]" if p.resolved.label else "")
        table = Table(title=title, title_justify="left")
        for col in ("step", "kind", "status", "rows", "reads", "key"):
            table.add_column(col, no_wrap=col in ("step", "status", "key"))
        described = describe(p)
        for row in described:
            rows = ", ".join(f"{n}" if t == "main" else f"{t}: {n}" for t, n in row["rows"].items())
            table.add_row(row["name"], row["kind"], statuses[row["status"]], rows, ", ".join(row["deps"]),
                          row["key"][:12])
        console.print(table)
        for row in described:
            if row["damaged"]:
                console.print(f"damaged: {row['name']}: {row['damaged']} (the next run runs it again)",
                              markup=False, highlight=False)
        for warning in contamination_warnings(p):
            console.print(warning.message, style="yellow", markup=False, highlight=False)
    console.print(f"workspace: {p.workspace.root}")


ExecutorOpt = typer.Option(None, "--executor", help="local or ray: where shardable steps run "
                           "(same as --set executor.kind=...).")


@app.command()
def run(spec: Path = SpecArg, set_: Optional[List[str]] = SetOpt, executor: Optional[str] = ExecutorOpt) -> None:
    """Run a spec (every sweep point); steps already in the workspace are reused."""
    from datamill.api import run as run_spec

    if executor:
        set_ = [*(set_ or []), f"executor.kind={executor}"]
    result = run_spec(spec, set_, quiet=progress.is_quiet())
    console = progress.console()
    if len(result.points) > 1:
        _print_comparison(console, result)
    else:
        _print_results(console, result)
    _print_models(console, result)
    ran = len(result.executed)
    total = sum(len(p.steps) for p in result.points)
    note = "everything was cached" if ran == 0 else f"{ran} step{'s' if ran != 1 else ''} ran, {total - ran} cached"
    console.print(f"[bold green]finished[/bold green]: {note}")
    sets = "".join(f" --set {shlex.quote(o)}" for o in set_ or [])
    point = " --point LABEL" if len(result.points) > 1 else ""
    console.print(f"tables: datamill sql {spec}{sets}{point} \"SELECT * FROM <table>\"   "
                  f"(catalog: {result.workspace.catalog_path})", markup=False)
    if result.run_id:
        again = " (logged by the earlier run: nothing new)" if result.logged_before else ""
        console.print(f"MLflow: {result.tracking_location}  run {result.run_id}{again}   open it with: datamill ui {spec}")


def _print_comparison(console, result) -> None:
    """The sweep's points side by side (the numbers its steps offer for comparison), each with its
    95% interval, and each point's paired test against the baseline (the base model's row)."""
    from rich.table import Table

    from datamill.comparison import comparison

    compared = comparison(result)
    if not compared.columns:
        return
    # every point labelled "method=...,": the column is "method" and the cells its values
    labels = [label for label in compared.rows if label not in compared.references]
    first = {label.split("=", 1)[0] for label in labels}
    key = first.pop() if len(first) == 1 and all("=" in label for label in labels) else None
    table = Table(title=f"{len(result.points)} sweep points", title_justify="left",
                  caption="\n".join(_comparison_notes(compared)) or None, caption_justify="left")
    table.add_column(key or "point", no_wrap=True)
    for header in _short_names(compared.columns):
        table.add_column(header, justify="right", overflow="fold")
    for i, label in enumerate(compared.rows):
        if label in compared.references:
            name = f"{label} (ref)"
        else:
            name = label.split("=", 1)[1] if key else label
        if label in compared.seeds:
            name += f" ({compared.seeds[label]} seeds)"
        table.add_row(name, *(_cell_text(compared, i, j) for j in range(len(compared.columns))))
    console.print(table)
    _print_tests(console, compared)


INTERVAL_NOTE = "half-width of the 95% interval (a bootstrap over examples; 1.96 x stderr where a step reports only that)"


def _comparison_notes(compared) -> list[str]:
    notes = []
    if compared.references:
        notes.append("(ref): the same in every point")
    if compared.has_intervals():
        notes.append(f"± {INTERVAL_NOTE}; exact bounds in MLflow")
    if compared.seeds:
        notes.append("seeds: mean over training seeds, interval over seeds and examples")
    if compared.has_tests():
        notes.append(f"* / ** differs from {compared.baseline}: paired test on the same examples, "
                     "Holm-adjusted p < 0.05 / 0.01")
    return notes


def _cell_text(compared, i: int, j: int) -> str:
    """"0.438±0.17*": a value, the half-width of its 95% interval, and its significance mark."""
    value = compared.values[i][j]
    if value is None:
        return ""
    band = compared.intervals[i][j]
    text = f"{value:.4g}" if band is None else f"{value:.3g}±{(band[1] - band[0]) / 2:.2g}"
    return text + compared.mark(i, j)


def _print_tests(console, compared) -> None:
    """Each row's paired test against the baseline, a line per metric: the difference, its 95%
    interval, the test and its adjusted p-value."""
    from rich.markup import escape

    names = _short_names(compared.columns)
    lines = []
    for j, name in enumerate(names):
        for i, label in enumerate(compared.rows):
            test = compared.tests[i][j]
            if test is None:
                continue
            lines.append(f"  {escape(name)}  {escape(label)} - {escape(compared.baseline)}: {test.difference:+.3g} "
                         f"[{test.low:+.2g}, {test.high:+.2g}], n={test.n}, {test.test} "
                         f"p={compared.p_values[i][j]:.2g}{compared.mark(i, j)}")
    if lines:
        console.print(f"paired tests against {escape(compared.baseline)} (difference [95% interval], "
                      "Holm-adjusted p):", highlight=False)
        for line in lines:
            console.print(line, highlight=False)


def _print_results(console, result) -> None:
    """A single run's headline numbers: each step's comparison metrics (evaluate: every task's
    metrics; select: its target precision), each with its 95% interval, and each trained model's
    final losses."""
    from rich.table import Table

    from datamill.comparison import comparison

    compared = comparison(result)
    rows = [(*column.split(".", 1), _cell_text(compared, 0, j)) for j, column in enumerate(compared.columns)
            if compared.values[0][j] is not None] if compared.rows else []
    for name, record in result.points[0].steps.items():
        if record.model_dir is not None:
            rows += [(name, loss, f"{record.stats[loss]:.4g}") for loss in ("final_loss", "final_eval_loss")
                     if isinstance(record.stats.get(loss), (int, float))]
    if not rows:
        return
    table = Table(title="results", title_justify="left",
                  caption=f"± {INTERVAL_NOTE}" if compared.has_intervals() else None, caption_justify="left")
    table.add_column("step", no_wrap=True)
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right")
    for step, metric, value in rows:
        table.add_row(step, metric, value)
    console.print(table)


def _print_models(console, result) -> None:
    """Where each trained model is: a folder to load or pass on (`datamill path SPEC STEP` prints it)."""
    from rich.markup import escape

    seen = set()
    for point in result.points:
        for name, record in point.steps.items():
            if record.model_dir is None or record.key in seen:
                continue
            seen.add(record.key)
            shared = all(p.steps.get(name) is not None and p.steps[name].key == record.key for p in result.points)
            where = "" if shared or not point.label else f" \\[{escape(point.label)}]"
            console.print(f"model {escape(name)}{where}: {escape(str(record.model_dir))}")


def _short_names(columns: list[str]) -> list[str]:
    """Each "<step>.<task>.<metric>" by its shortest dotted tail that no other column shares
    (tables must fit an 80-column CI log); the full names are in MLflow's comparison table."""
    parts = [c.split(".") for c in columns]
    names = []
    for p in parts:
        for n in range(1, len(p) + 1):
            tail = p[-n:]
            if sum(q[-n:] == tail for q in parts) == 1:
                break
        names.append(".".join(tail))
    return names


@app.command("eval")
def eval_(models: str = typer.Option(..., "--models", help="Comma-separated model references: builtin:..., "
                                   "model folders (a trained step's output), hub names.", show_default=False),
          tasks: str = typer.Option("", "--tasks", help="Comma-separated lm-eval tasks, e.g. datamill_capitals_mc."),
          self_supervised: str = typer.Option("", "--self-supervised",
                                              help="Comma-separated BYOD metrics, e.g. negation,word_order "
                                                   "(`datamill schema` lists every installed one)."),
          limit: Optional[int] = typer.Option(None, help="First N examples per task."),
          num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Default: each task's own."),
          batch_size: int = typer.Option(8, "--batch-size"),
          out: Path = typer.Option(Path("datamill-eval"), "--out", help="Folder for the generated spec and its workspace."),
          executor: Optional[str] = ExecutorOpt) -> None:
    """Evaluate models x tasks: one MLflow parent run, a child per model, a comparison heatmap.
    Each (model, task) pair runs once: rerunning with one more task or model runs only what is new."""
    import yaml
    from rich.table import Table

    from datamill.api import run as run_spec
    from datamill.comparison import comparison
    from datamill.errors import SpecError

    def split(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    refs = [str(Path(m).resolve()) if Path(m).exists() else m for m in split(models)]
    task_list, byod = split(tasks), split(self_supervised)
    if not refs or not (task_list or byod):
        raise SpecError("datamill eval needs --models and --tasks and/or --self-supervised")
    settings = {k: v for k, v in {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size}.items()
                if v is not None}
    steps = {re.sub(r"[^A-Za-z0-9_]", "_", t): {"evaluate": {"model": "model", "tasks": [t], **settings}}
             for t in task_list}
    if byod:  # one step for the self-supervised metrics; `limit` is their examples per metric
        byod_settings = {("max_examples" if k == "limit" else k): v for k, v in settings.items()}
        steps["self_supervised"] = {"evaluate": {"model": "model", "self_supervised": byod, **byod_settings}}
    spec_data = {"name": "eval", "models": {"model": refs[0]}, "steps": steps, "sweep": {"models.model": refs}}
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "eval.yaml"  # kept: the spec to rerun, query (`datamill sql`) and open (`datamill ui`)
    spec.write_text("# written by `datamill eval`: one evaluate step per task, a sweep point per model\n"
                    + yaml.safe_dump(spec_data, sort_keys=False, allow_unicode=True))
    result = run_spec(spec, [f"executor.kind={executor}"] if executor else None, quiet=progress.is_quiet())
    compared = comparison(result)
    table = Table(title="tasks x models", title_justify="left",
                  caption="\n".join(_comparison_notes(compared)) or None, caption_justify="left")
    table.add_column("task.metric")
    for ref in refs:
        table.add_column(ref if ref.startswith("builtin:") or not Path(ref).exists() else Path(ref).name,
                         justify="right")
    for j, column in enumerate(compared.columns):  # "<step>.<task>.<metric>": the step is named after the task
        table.add_row(column.split(".", 1)[1], *(_cell_text(compared, i, j) for i in range(len(compared.rows))))
    console = progress.console()
    console.print(table)
    _print_tests(console, compared)
    point = " --point LABEL" if len(refs) > 1 else ""
    console.print(f"spec: {spec}   tables: datamill sql {spec}{point} \"SELECT * FROM <step>\"", markup=False)
    if result.run_id:
        console.print(f"MLflow: {result.tracking_location}  parent run {result.run_id}   open it with: datamill ui {spec}")


@app.command()
def lineage(spec: Path = SpecArg, row_id: str = typer.Argument(..., help="A row's id (the `id` column)."),
            as_json: bool = typer.Option(False, "--json", help="Print the hits as JSON lines."),
            set_: Optional[List[str]] = SetOpt, point: Optional[str] = PointOpt) -> None:
    """Where a row came from and went: generation, each selector's decision, the models that saw
    it, eval results (and, for a training row, the eval examples nearest to it)."""
    from rich.console import Console
    from rich.markup import escape

    from datamill.lineage import lineage as find

    hits = find(spec, row_id, set_, point)
    if not hits:
        raise DatamillError(f"no table of {spec}'s workspace holds a row with id {row_id!r} (run the spec first?)")
    if as_json:
        for hit in hits:
            typer.echo(json.dumps(hit, ensure_ascii=False, default=str))
        return
    # the report is the command's output: stdout, for `| less` and `> file` (colour only on a terminal)
    console = Console(highlight=False, soft_wrap=True)
    shown: dict[str, dict] = {}  # point ("" = shared steps) -> what its earlier tables said about the row
    for hit in hits:
        where = f"\\[{escape(hit['point'])}] " if hit["point"] else ""
        how = ("" if hit["match"] == "id" else f"  (points at it: {hit['match']})") if "via" not in hit else \
            f"  (the row its {hit['via']} names)"
        console.print(f"[bold]{where}{escape(hit['table'])}[/bold] ({hit['kind']}){how}")
        fields = {c: v for c, v in hit["row"].items() if c != "id" and v is not None}
        if hit["match"] == "id" and "via" not in hit:
            seen = {**shown.get("", {}), **shown.get(hit["point"], {})}
            fields = {c: v for c, v in fields.items() if c not in seen or seen[c] != v}
            shown.setdefault(hit["point"], {}).update(fields)
            if not fields:
                console.print("    (the row as above)", style="dim")
        for column, value in fields.items():
            console.print(f"    {column}: {value}", markup=False)


@app.command()
def sql(spec: Path = SpecArg, query: str = typer.Argument(..., help="A SELECT over the spec's tables."),
        limit: int = typer.Option(50, help="Rows to print."),
        set_: Optional[List[str]] = SetOpt, point: Optional[str] = PointOpt) -> None:
    """Query the tables of the spec as given (--set, --point) with DuckDB SQL. Each table is a view by
    its name; a sweep adds "<table>@<label>" views (quote them) for every point's tables."""
    import duckdb
    import polars as pl

    from datamill.api import plans
    from datamill.plan import table_views
    from datamill.errors import FieldError
    from datamill.steps.sql import parse_select, sandboxed_duckdb

    views, missing = table_views(plans(spec, set_), point, set_)

    def check(name: str) -> None:  # a table of the spec that is not there: say why, not just "no table"
        if name.lower() in missing and name not in views:
            raise DatamillError(missing[name.lower()])

    try:  # parsed only (duckdb.get_table_names would bind: open files, or wait on /dev/stdin)
        referenced, _ = parse_select(query)  # what else it reads, the sandbox below refuses
    except FieldError as e:
        raise DatamillError(f"the query: {e.message}") from None
    for name in referenced:
        check(name)
    con = sandboxed_duckdb(views)  # reads only these parquet files, writes nothing
    try:
        relation = con.sql(query)
        df = relation.pl() if relation is not None else None
    except duckdb.Error as e:  # the user's SQL: DuckDB's own message and hint
        unknown = re.match(r"Catalog Error: Table with name (\S+) does not exist", str(e))
        if unknown:
            check(unknown.group(1))
        raise DatamillError(str(e)) from None
    finally:
        con.close()
    if df is None:
        return
    with pl.Config(tbl_rows=limit, fmt_str_lengths=80, tbl_width_chars=160):
        typer.echo(df.head(limit))
    if df.height > limit:
        typer.echo(f"({df.height} rows; showing {limit})")


@app.command("path")
def path_(spec: Path = SpecArg, step: str = typer.Argument(..., help="A step's name.", show_default=False),
          set_: Optional[List[str]] = SetOpt, point: Optional[str] = PointOpt) -> None:
    """Print a step's output folder: a training step's model folder, else the folder holding its
    tables/. Only the path, so that `$(datamill path spec.yaml sft)` works."""
    from datamill.api import plans
    from datamill.errors import SpecError
    from datamill.plan import find_step, not_run

    all_plans = plans(spec, set_)
    found = find_step(all_plans, step, point)
    if found is None:
        labels = ", ".join(p.resolved.label for p in all_plans)
        raise SpecError(f"step '{step}' differs between the sweep's points: choose one with --point (one of: {labels})")
    plan, ps = found
    if not plan.workspace.is_cached(ps.key):
        of = f" (point {plan.resolved.label})" if point else ""
        damage = plan.workspace.damaged(ps.key)
        raise DatamillError(not_run(all_plans, f"step '{step}'{of}", set_) +
                            (f"; its earlier output is damaged: {damage}" if damage else ""))
    folder = plan.workspace.step_dir(ps.key)
    typer.echo(folder / "model" if ps.step.produces_model else folder)


@app.command()
def ui(spec: Path = SpecArg, port: Optional[int] = typer.Option(None, help="Port (default: a free one)."),
       set_: Optional[List[str]] = SetOpt) -> None:
    """Open the MLflow UI for the spec's tracking store on 127.0.0.1 (Ctrl-C stops it)."""
    from datamill.api import plans
    from datamill.registry import tracker_class
    from datamill.run_tracking import tracking_target

    plan = plans(spec, set_)[0]
    uri, artifacts = tracking_target(plan)
    if uri.startswith("http"):
        typer.echo(f"this spec logs to a tracking server: open {uri}")
        return
    tracker = tracker_class(plan.resolved.spec.tracking.tracker)
    if not hasattr(tracker, "serve_ui"):
        raise DatamillError(f"tracker '{plan.resolved.spec.tracking.tracker}' has no UI to open")
    tracker.serve_ui(uri, artifacts, port=port)


@app.command()
def schema(output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to a file instead of stdout.")) -> None:
    """Print the JSON Schema of specs (for editor completion and checks)."""
    import json

    from datamill.spec import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if output:
        output.write_text(text)
        typer.echo(f"wrote {output}")
    else:
        typer.echo(text, nl=False)


def _global_flags_first(args: list[str]) -> list[str]:
    """`datamill validate spec.yaml --debug` read as `datamill --debug validate spec.yaml` (click
    reads a group's options only before the subcommand). An option's value (`--set --debug`) and
    whatever follows `--` stay where they are."""
    start = next((i for i, arg in enumerate(args) if not arg.startswith("-")), None)
    sub = typer.main.get_command(app).commands.get(args[start]) if start is not None else None
    if sub is None:
        return args
    takes_value = {name for param in sub.params if param.param_type_name == "option" and not param.is_flag
                   and not param.count for name in param.opts}
    moved, rest, i = [], [], start + 1
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg in GLOBAL_FLAGS:
            moved.append(arg)
        else:
            rest.append(arg)
            if arg in takes_value and i + 1 < len(args):  # its value, whatever it looks like
                i += 1
                rest.append(args[i])
        i += 1
    return args[:start] + moved + [args[start]] + rest


def main() -> None:
    try:
        app(args=_global_flags_first(sys.argv[1:]))
    except DatamillError as e:
        if _state["debug"]:
            raise
        from datamill.secrets import scrub

        problems = getattr(e, "problems", None) or [str(e)]
        for line in problems:
            print(scrub(f"error: {line}"), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug in datamill or a library: say so, keep the traceback behind --debug
        if _state["debug"]:
            raise
        from datamill.secrets import scrub

        print(scrub(f"error: {type(e).__name__}: {e}\n(internal error; rerun with --debug for the traceback)"),
              file=sys.stderr)
        sys.exit(EXIT_STEP_FAILED)


if __name__ == "__main__":
    main()
