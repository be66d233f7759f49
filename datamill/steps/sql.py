"""`sql`: a DuckDB SELECT over earlier tables, referenced by name.

Spec SQL is checked without being run or bound: the query is parsed on a locked-down in-memory
connection and its syntax tree is walked for what it reads. Only earlier tables by plain name
(and a few table functions that compute rows from their arguments) pass; a file, a URL, a
table function such as read_csv or query, or getenv() is a spec error at validate. Binding would
already open files, install extensions or read stdin, so nothing here binds. The run then reads
only through `sandboxed_duckdb`, which refuses anything outside the step's input tables anyway.
"""

from __future__ import annotations

import functools
import json
import re
from typing import ClassVar

from datamill.errors import DatamillError, FieldError
from datamill.step import Env, Step, StepConfig

# Table functions that make rows from their arguments alone; every other one (read_csv, glob,
# query, pragma_*, duckdb_*, ...) reads files, URLs, other SQL or DuckDB's own state.
ALLOWED_TABLE_FUNCTIONS = frozenset({"unnest", "range", "generate_series", "json_each", "json_tree"})
# Scalar functions that read outside the data (the run's sandbox refuses them too, less clearly).
REFUSED_SCALAR_FUNCTIONS = frozenset({"getenv"})
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NO_LOCATION = 2**64 - 1  # what the parser writes for a node without a position in the query


class SqlConfig(StepConfig):
    """A DuckDB query over earlier tables. Shorthand: `sql: "SELECT ..."`."""

    __shorthand__: ClassVar[str] = "query"
    query: str
    """One SELECT statement; tables are referenced by their source/step names."""


class SqlStep(Step):
    """Make a table with DuckDB SQL over earlier tables."""

    kind = "sql"
    Config = SqlConfig

    def check(self, env: Env) -> None:
        query_tables(self.config.query)

    def input_tables(self):
        try:
            names = query_tables(self.config.query)
        except FieldError:
            return []  # reported by check()
        return [(("query",), name) for name in sorted(names)]

    def run(self, ctx) -> None:
        import duckdb

        out = ctx.table_path()
        con = sandboxed_duckdb(ctx.input_paths, writable=[out.parent])
        try:
            con.sql(self.config.query).write_parquet(str(out))
            rows = con.execute(f"SELECT count(*) FROM read_parquet({_quote(str(out))})").fetchone()[0]
        except duckdb.PermissionException as e:  # the sandbox refused: say why plainly
            raise DatamillError(
                "the query reads outside the workspace, which spec SQL may not do "
                f"(only earlier tables by name): {_first_line(e)}") from None
        except duckdb.Error as e:  # any other duckdb error is a problem in the query, not in datamill
            raise DatamillError(f"the query failed: {_first_line(e)}") from None
        finally:
            con.close()
        ctx.stats.setdefault("rows", {})["main"] = rows


@functools.lru_cache(maxsize=256)
def query_tables(query: str) -> frozenset[str]:
    """The table names one spec SELECT reads (CTE names excluded). Raises FieldError("query", ...)
    for SQL that is not one SELECT, or that reads anything but tables by name. Parses only: no
    file, URL, extension or environment variable is touched."""
    tables, refused = parse_select(query)
    if refused:
        raise FieldError("query", f"the query reads {'; '.join(dict.fromkeys(refused))}: spec SQL reads only "
                                  "earlier tables by name, not files, URLs, the environment or table functions "
                                  f"other than {', '.join(sorted(ALLOWED_TABLE_FUNCTIONS))}")
    return tables


def parse_select(query: str) -> tuple[frozenset[str], list[str]]:
    """(table names read, what else it reads) of one SELECT, by parsing only; FieldError for SQL
    that is not one SELECT. `datamill sql` takes the names and leaves the rest to its sandbox."""
    import duckdb

    con = locked_duckdb()
    try:
        try:
            statements = con.extract_statements(query)
        except duckdb.Error as e:
            raise FieldError("query", f"invalid SQL: {_first_line(e)}") from None
        if len(statements) != 1:
            raise FieldError("query", f"expected exactly one SQL statement, found {len(statements)}")
        if statements[0].type != duckdb.StatementType.SELECT:
            raise FieldError("query", f"expected a SELECT statement, found {statements[0].type.name}")
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [query]).fetchone()[0])
    finally:
        con.close()
    if tree.get("error"):
        raise FieldError("query", f"invalid SQL: {tree.get('error_message', 'could not be parsed')}")
    tables: set[str] = set()
    refused: list[str] = []
    _walk(tree["statements"], frozenset(), tables, refused, query.encode())
    return frozenset(tables), refused


def _walk(node, ctes: frozenset, tables: set, refused: list, query: bytes) -> None:
    """Collect table names and refused reads from a json_serialize_sql tree. `ctes` are the CTE
    names in scope: a reference to one of them is not a table."""
    if isinstance(node, list):
        for item in node:
            _walk(item, ctes, tables, refused, query)
        return
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind == "RECURSIVE_CTE_NODE":  # a recursive CTE reads itself
        ctes = ctes | {node["cte_name"]}
    definitions = (node.get("cte_map") or {}).get("map") or []
    for entry in definitions:  # each CTE sees the ones before it (as DuckDB binds them)
        _walk(entry["value"], ctes, tables, refused, query)
        ctes = ctes | {entry["key"]}
    if kind == "BASE_TABLE":
        name = node["table_name"]
        if node.get("schema_name") or node.get("catalog_name"):
            refused.append(f"{_snippet(node, query, name)} (a qualified name, not a table of the spec)")
        elif not _TABLE_NAME.match(name):
            refused.append(f"{_snippet(node, query, repr(name))} (a file or URL, not a table name)")
        elif name not in ctes:
            tables.add(name)
    elif kind == "TABLE_FUNCTION":
        name = node["function"]["function_name"]
        if name.lower() not in ALLOWED_TABLE_FUNCTIONS:
            refused.append(f"{_snippet(node, query, name + '(...)')} (table function '{name}')")
    elif node.get("class") == "FUNCTION" and node.get("function_name", "").lower() in REFUSED_SCALAR_FUNCTIONS:
        refused.append(f"{_snippet(node, query, node['function_name'] + '(...)')} (reads the environment)")
    for key, value in node.items():
        if key != "cte_map":
            _walk(value, ctes, tables, refused, query)


def _snippet(node: dict, query: bytes, fallback: str) -> str:
    """The query text of a node (the parser gives byte offsets), or `fallback` without one."""
    start, length = node.get("query_location", _NO_LOCATION), node.get("query_location_length", 0)
    if start == _NO_LOCATION or not length:
        return fallback
    return " ".join(query[start:start + length].decode(errors="replace").split())


def locked_duckdb(readable=(), writable=()):
    """An in-memory DuckDB that reaches only `readable` files and `writable` folders: no other
    file, no URL, no extension installed or loaded on demand, and settings that cannot be
    changed back. The extension settings go first: once external access is off, a query that
    names an http:// URL would otherwise still try to install httpfs under ~/.duckdb."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET autoinstall_known_extensions=false")
    con.execute("SET autoload_known_extensions=false")
    con.execute("SET python_enable_replacements=false")  # no Python variables as tables
    con.execute(f"SET allowed_directories=[{', '.join(_quote(str(d) + '/') for d in writable)}]")
    con.execute(f"SET allowed_paths=[{', '.join(_quote(str(p)) for p in readable)}]")
    con.execute("SET enable_external_access=false")
    con.execute("SET lock_configuration=true")
    return con


def sandboxed_duckdb(tables: dict, writable=()):
    """An in-memory DuckDB where `tables` are views and nothing else on disk is reachable."""
    con = locked_duckdb(readable=tables.values(), writable=writable)
    for name, path in tables.items():
        con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM read_parquet({_quote(str(path))})')
    return con


@functools.cache
def reserved_words() -> frozenset[str]:
    """DuckDB's reserved keywords (lower case): a table named like one must be quoted in SQL."""
    con = locked_duckdb()
    try:
        rows = con.execute("SELECT keyword_name FROM duckdb_keywords() WHERE keyword_category = 'reserved'")
        return frozenset(row[0].lower() for row in rows.fetchall())
    finally:
        con.close()


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]
