"""Spec SQL reads only the spec's tables: checked at validate by parsing (never binding or
running), and refused again by the run's sandbox; and table names that are SQL keywords."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import datamill
from datamill.errors import SpecError, StepFailed

HEAD = """\
name: t
tracking: {enabled: false}
sources:
  tasks: {path: data/tasks.jsonl}
steps:
"""

# Each reads outside the workspace, runs other SQL, or reads the environment.
LEAKS = {
    "passwd": "SELECT * FROM read_csv('/etc/passwd')",
    "passwd_string": "SELECT * FROM '/etc/passwd'",
    "stdin": "SELECT * FROM read_csv('/dev/stdin')",  # binding it would block on stdin
    "url": "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')",  # binding it would install httpfs
    "url_string": "SELECT * FROM 'http://127.0.0.1:9/x.csv'",
    "copy": "SELECT * FROM query('COPY (SELECT 1) TO ''leaked.csv''')",
    "env": "SELECT getenv('HOME') AS home",
    "catalog": "SELECT * FROM pragma_database_list()",
    "nested": "SELECT * FROM tasks WHERE id IN (SELECT id FROM read_parquet('/tmp/*.parquet'))",
}


def _leaky_spec(write_spec):
    lines = [f'  {name}:\n    sql: "{query}"\n' for name, query in LEAKS.items()]
    return write_spec(HEAD + "".join(lines))


def test_validate_refuses_spec_sql_that_reads_outside_the_workspace(write_spec, tmp_path):
    path = _leaky_spec(write_spec)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    # stdin is a pipe that stays open: reading /dev/stdin would hang until the timeout
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "datamill.cli", "validate", str(path)],
                                stdin=subprocess.PIPE, stdout=out, stderr=err, env=env, cwd=tmp_path)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("validate hung (it read from stdin?)")
        finally:
            proc.stdin.close()
    stderr = err_path.read_text()
    assert code == 2, stderr
    assert "internal error" not in stderr and "root:" not in stderr + out_path.read_text()
    text = path.read_text().splitlines()
    for name, query in LEAKS.items():
        line = text.index(f"  {name}:") + 2  # the `sql:` line under the step, 1-based
        problem = next((p for p in stderr.splitlines() if f"steps.{name}.sql.query" in p), None)
        assert problem is not None, f"{name} not reported:\n{stderr}"
        assert problem.startswith(f"error: {path}:{line}:"), problem
        assert "spec SQL reads only earlier tables by name" in problem
    assert "read_csv('/etc/passwd') (table function 'read_csv')" in stderr
    assert "'/etc/passwd' (a file or URL, not a table name)" in stderr
    assert "getenv('HOME') (reads the environment)" in stderr
    assert "pragma_database_list() (table function 'pragma_database_list')" in stderr
    assert not (home / ".duckdb").exists()  # no extension was installed for the URL
    assert not (tmp_path / "leaked.csv").exists()


NORMAL = HEAD + """\
  first:
    sql: SELECT id, family, messages[1].content AS question, messages[-1].content AS answer FROM tasks
  counted:
    sql: |
      WITH tasks AS (SELECT * FROM tasks WHERE family <> 'reverse'),  -- a CTE may shadow a table
           per AS (SELECT family, count(*) AS n FROM tasks GROUP BY family)
      SELECT t.id, upper(t.family) AS fam, p.n,
             row_number() OVER (PARTITION BY t.family ORDER BY t.id) AS rank,
             (SELECT count(*) FROM first) AS all_rows
      FROM tasks t JOIN per p USING (family)
      WHERE t.id IN (SELECT id FROM first WHERE length(answer) > 0)
  turns:
    sql: SELECT id, unnest(messages).role AS role FROM tasks
  roles:
    sql: SELECT DISTINCT m.role FROM tasks, unnest(tasks.messages) AS u(m) ORDER BY 1
  both_ways:
    sql: |
      SELECT id, 'a' AS side FROM first UNION ALL BY NAME SELECT id, 'b' AS side, fam FROM counted
  numbers:
    sql: |
      WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r WHERE n < 3)
      SELECT r.n, g.range AS g FROM r JOIN range(1, 4) g ON g.range = r.n
"""


def test_ordinary_queries_over_spec_tables_still_validate_and_run(write_spec):
    path = write_spec(NORMAL)
    plan = datamill.plans(path)[0]
    assert set(plan.by_name("counted").deps) == {"tasks", "first"}  # `per` is a CTE; `tasks` both
    result = datamill.run(path, quiet=True)
    tasks = result.table("tasks")
    kept = tasks.filter(tasks["family"] != "reverse")
    counted = result.table("counted")
    assert counted.height == kept.height and set(counted["all_rows"]) == {tasks.height}
    assert set(counted["fam"]) == {f.upper() for f in kept["family"]}
    assert set(result.table("turns")["role"]) == set(result.table("roles")["role"]) >= {"user", "assistant"}
    assert result.table("both_ways").height == tasks.height + counted.height
    assert result.table("numbers")["n"].to_list() == [1, 2, 3]


def test_the_run_sandbox_still_refuses_what_the_check_would_miss(write_spec, monkeypatch):
    """Defence in depth: were the parse check to let read_csv through, the run still refuses it,
    with a plain message rather than an internal error."""
    from datamill.steps import sql

    monkeypatch.setattr(sql, "ALLOWED_TABLE_FUNCTIONS", sql.ALLOWED_TABLE_FUNCTIONS | {"read_csv"})
    sql.query_tables.cache_clear()
    try:
        path = write_spec(HEAD + "  leak:\n    sql: SELECT * FROM read_csv('/etc/passwd')\n")
        with pytest.raises(StepFailed) as info:
            datamill.run(path, quiet=True)
    finally:
        sql.query_tables.cache_clear()  # forget the answers given with read_csv allowed
    message = str(info.value)
    assert message.startswith("step 'leak' (sql) failed: the query reads outside the workspace")
    assert "root:" not in message


def test_the_run_sandbox_installs_no_extension(tmp_path):
    """An http:// read in the run's sandbox is refused without installing httpfs under ~/.duckdb."""
    home = tmp_path / "home"
    home.mkdir()
    code = ("import duckdb\n"
            "from datamill.steps.sql import sandboxed_duckdb\n"
            "con = sandboxed_duckdb({})\n"
            "try:\n"
            "    con.sql(\"SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')\").fetchall()\n"
            "except duckdb.PermissionException:\n"
            "    print('refused')\n"
            "print(con.execute(\"SELECT current_setting('autoinstall_known_extensions'), "
            "current_setting('autoload_known_extensions')\").fetchone())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "HOME": str(home)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["refused", "(False, False)"]
    assert not (home / ".duckdb").exists()


def test_a_table_named_like_a_reserved_word_is_a_spec_error(write_spec):
    path = write_spec(HEAD.replace("  tasks:", "  order:") + "  unique:\n    sql: SELECT * FROM \"order\"\n"
                      "  fine:\n    sql: SELECT 1 AS x\n")
    with pytest.raises(SpecError) as info:
        datamill.plans(path)
    problems = info.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{path}:4:") and "sources.order: 'order' is a reserved word in DuckDB SQL: " \
        "rename the source (queries would need to quote it as \"order\")" in problems[0]
    assert problems[1].startswith(f"{path}:6:") and "steps.unique: 'unique' is a reserved word in DuckDB SQL: " \
        "rename the step (queries would need to quote it as \"unique\")" in problems[1]
