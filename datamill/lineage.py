"""Where a row went: every table of every sweep point that holds it, from generation to eval.

    from datamill.lineage import lineage
    for hit in lineage("examples/quickstart.yaml", "3f2a9c0d1e4b5a67"):
        print(hit["point"], hit["step"], hit["table"], hit["row"])

A row keeps its `id` from the step that made it to the last one that reads it, so its story is
the rows with that id in each step's tables: the generator prompt, index, topic, model and
request (`generate`), each selector's score, rank and decision (`<select>__scores`), the
training split a model saw it in (`train`), an eval example's per-metric results (`evaluate`),
and the rows that point at it through the columns a step declares as row references
(`Step.row_reference_columns`, e.g. evaluate's nearest training row). The rows a row points at
through those columns come too: a preference pair leads to its chosen and rejected responses, so
to their generation requests and the judge's verdicts on them. Only steps already run (cached in
the workspace) are read; nothing is computed.
"""

from __future__ import annotations

import json
from pathlib import Path

MAX_TEXT = 120  # characters of a text cell shown


def lineage(spec, row_id: str, overrides: list[str] | None = None, point: str | None = None) -> list[dict]:
    """Each table row that is `row_id` (or points at it through a column a step declares as a row
    reference), as {point, step, kind, table, match: "id" or that column, row: {column: value}}; then
    the rows that `row_id`'s own rows point at through such columns (a preference pair's chosen and
    rejected responses: their generation requests and judge verdicts), with "via": the column.
    Steps shared by sweep points (same key) are listed once, with point "" (all points). `point`
    (a label or KEY=VALUE pairs, see plan.choose_point) keeps to one sweep point."""
    import duckdb

    from datamill.api import plans
    from datamill.plan import choose_point
    from datamill.spec import side_table

    all_plans = plans(spec, overrides)
    keys_per_point = [{s.key for s in p.steps} for p in all_plans]
    # every table is searched for every declared column: a table made from one (an sql step) keeps it
    references = list(dict.fromkeys(c for p in all_plans for s in p.steps for c in s.step.row_reference_columns))
    tables = []  # (point label, planned step, table name, parquet path)
    seen = set()
    for plan in [choose_point(all_plans, point)] if point else all_plans:
        for planned in plan.steps:
            if planned.key in seen or not plan.workspace.is_cached(planned.key):
                continue
            seen.add(planned.key)
            shared = sum(planned.key in keys for keys in keys_per_point) > 1
            label = "" if shared or len(all_plans) == 1 else plan.resolved.label
            for path in sorted((plan.workspace.step_dir(planned.key) / "tables").glob("*.parquet")):
                tables.append((label, planned, side_table(planned.name, path.stem), path))

    with duckdb.connect() as con:
        names = {path: {r[0] for r in con.execute("SELECT name FROM parquet_schema(?)", [str(path)]).fetchall()}
                 for _, _, _, path in tables}

        def search(value: str, columns) -> list[dict]:
            found = []
            for label, planned, table, path in tables:
                for column in columns:
                    for row in (_rows(con, path, column, value) if column in names[path] else []):
                        found.append({"point": label, "step": planned.name, "kind": planned.kind, "table": table,
                                      "match": column, "row": row})
            return found

        hits = search(row_id, ("id", *references))
        pointed = dict.fromkeys((column, hit["row"][column]) for hit in hits if hit["match"] == "id"
                                for column in references if hit["row"].get(column) not in (None, row_id))
        for column, value in pointed:
            hits += [{**hit, "via": column} for hit in search(str(value), ("id",))]
    return hits


def _rows(con, path: Path, column: str, value: str) -> list[dict]:
    frame = con.execute(f'SELECT * FROM read_parquet(?) WHERE CAST("{column}" AS VARCHAR) = ?',
                        [str(path), value]).fetchall()
    names = [d[0] for d in con.description]
    return [{k: _short(v) for k, v in zip(names, row)} for row in frame]


def _short(value):
    if isinstance(value, (list, dict)):
        value = json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return value[:MAX_TEXT] + "..."
    return value
