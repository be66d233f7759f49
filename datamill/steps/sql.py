"""`sql`: a DuckDB SELECT over earlier tables, referenced by name."""

from __future__ import annotations

from typing import ClassVar

from datamill.errors import FieldError
from datamill.step import Env, Step, StepConfig


class SqlConfig(StepConfig):
    """A DuckDB query over earlier tables. Shorthand: `sql: "SELECT ..."`."""

    __shorthand__: ClassVar[str] = "query"
    query: str
    """One SELECT statement; tables are referenced by their source/step names."""


class SqlStep(Step):
    """Make a table with DuckDB SQL over earlier tables."""

    kind = "sql"
    Config = SqlConfig

    def _parse(self):
        import duckdb

        try:
            statements = duckdb.extract_statements(self.config.query)
        except duckdb.Error as e:
            raise FieldError("query", f"invalid SQL: {_first_line(e)}") from None
        if len(statements) != 1:
            raise FieldError("query", f"expected exactly one SQL statement, found {len(statements)}")
        if statements[0].type != duckdb.StatementType.SELECT:
            raise FieldError("query", f"expected a SELECT statement, found {statements[0].type.name}")
        return duckdb.get_table_names(self.config.query)

    def check(self, env: Env) -> None:
        self._parse()

    def input_tables(self):
        try:
            names = self._parse()
        except FieldError:
            return []  # reported by check()
        return [(("query",), name) for name in sorted(names)]

    def run(self, ctx) -> None:
        out = ctx.table_path()
        con = sandboxed_duckdb(ctx.input_paths, writable=[out.parent])
        try:
            con.sql(self.config.query).write_parquet(str(out))
            rows = con.execute(f"SELECT count(*) FROM read_parquet({_quote(str(out))})").fetchone()[0]
        except Exception as e:  # duckdb errors are user errors in the query: name the cause plainly
            import duckdb

            if isinstance(e, duckdb.PermissionException):
                raise PermissionError(
                    "the query reads outside the workspace, which spec SQL may not do "
                    f"(only earlier tables by name): {_first_line(e)}") from None
            raise
        finally:
            con.close()
        ctx.stats.setdefault("rows", {})["main"] = rows


def sandboxed_duckdb(tables: dict, writable=()):
    """An in-memory DuckDB where `tables` are views and nothing else on disk is reachable."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET allowed_directories=[{', '.join(_quote(str(d) + '/') for d in writable)}]")
    con.execute(f"SET allowed_paths=[{', '.join(_quote(str(p)) for p in tables.values())}]")
    con.execute("SET enable_external_access=false")
    con.execute("SET lock_configuration=true")
    for name, path in tables.items():
        con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM read_parquet({_quote(str(path))})')
    return con


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]
