"""Spec loading under hostile or odd input (issue 16): alias bombs, deep nesting, bad bytes and
oversized files, empty and non-mapping files, and --set overrides that would change a value's
shape. Each is exit code 2 with a message naming the file and line (or the --set), in bounded
time and memory, never an "internal error"."""

from __future__ import annotations

import subprocess
import sys

import pytest

from datamill.api import load
from datamill.errors import SpecError

SPEC = """\
name: quickstart
sources:
  tasks: {path: data/tasks.jsonl}
steps:
  pool:
    sql: SELECT * FROM tasks
  clean:
    dedup: {input: pool, exact: true}
"""


def _limit_memory():
    # A regression must fail the test, not take the machine: 2 GiB of address space is plenty
    # for validating a spec (the 9-level bomb below needed over 6 GB before the fix).
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def validate(path, *sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "datamill.cli", "validate", str(path)]
    for item in sets:
        args += ["--set", item]
    # a generous timeout that only catches a hang (these answer in about a second)
    return subprocess.run(args, capture_output=True, text=True, timeout=30, preexec_fn=_limit_memory)


def assert_refused(out: subprocess.CompletedProcess, *parts: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr
    for part in parts:
        assert part in out.stderr, out.stderr


def alias_bomb(levels: int) -> str:
    """Billion laughs: each level lists the previous one nine times (9**levels values)."""
    names = "abcdefghijk"
    lines = ["name: t", "a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip(names, names[1:levels]):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- bombs and bad bytes


def test_alias_bomb_is_refused_at_the_alias_that_crosses_the_limit(write_spec):
    path = write_spec(alias_bomb(9))  # 387 million values expanded; ran out of memory before
    # a..e expand to 9 + 81 + 729 + 6,561 + 59,049 values; the first *e (line 7) crosses 100,000
    assert_refused(validate(path), f"{path}:7:", "alias *e", "100,000 values")


def test_an_alias_used_inside_its_own_anchor_is_refused(write_spec):
    path = write_spec("name: t\nloop: &a [1, *a]\n")  # walking it recursed forever before
    assert_refused(validate(path), f"{path}:2:", "alias *a is used inside its own anchor")


def test_aliases_that_nest_past_the_depth_limit_are_refused(write_spec):
    deep = "[" * 60 + "x" + "]" * 60  # 60 levels: fine alone, 120 once nested in itself
    path = write_spec(f"name: t\na: &a {deep}\nb: {'[' * 60}*a{']' * 60}\n")
    assert_refused(validate(path), f"{path}:3:", "alias *a nests the spec deeper than 100 levels")


def test_deep_nesting_is_refused_naming_the_line(write_spec):
    path = write_spec("name: t\ndescription: " + "[" * 5000 + "]" * 5000 + "\n")  # RecursionError before
    assert_refused(validate(path), f"{path}:2:", "nested deeper than 100 levels")


def test_invalid_utf8_names_the_line_and_byte_offset(write_spec):
    path = write_spec("")
    path.write_bytes(b"name: t\n# caf\xe9 au lait\nsteps: {}\n")  # UnicodeDecodeError before
    assert_refused(validate(path), f"{path}:2: invalid UTF-8: byte 0xe9 at byte offset 13")


def test_control_characters_name_the_line(write_spec):
    path = write_spec("name: t\ndescription: a\x01b\n")
    assert_refused(validate(path), f"{path}:2: invalid YAML: character #x0001")


def test_a_value_yaml_cannot_build_names_its_line(write_spec):
    path = write_spec("name: t\ndescription: 2024-13-01\n")  # a bare ValueError before
    assert_refused(validate(path), f"{path}:2:14:", "cannot read '2024-13-01' as timestamp: month must be in 1..12")


def test_oversized_file_says_its_size_and_the_limit(write_spec):
    path = write_spec("name: t\ndescription: '" + "x" * (1 << 20) + "'\n")
    size = path.stat().st_size
    assert_refused(validate(path), f"{path}: the file is {size:,} bytes, over the limit of 1,048,576 bytes (1 MiB)")


def test_small_anchors_aliases_and_merge_keys_still_work(write_spec):
    path = write_spec(SPEC.replace("dedup: {input", "dedup: &clean {input") + """\
  clean2:
    dedup:
      <<: *clean
      exact: false
  clean3: {dedup: *clean}
""")
    (point,) = load(path).points()
    steps = point.spec.steps
    assert (steps["clean"].dedup.exact, steps["clean2"].dedup.exact, steps["clean3"].dedup.exact) == (True, False, True)
    assert steps["clean2"].dedup.input == "pool"


def test_set_values_are_bounded_too(write_spec):
    bomb = "{" + ", ".join(alias_bomb(9).splitlines()[1:]) + "}"
    out = validate(write_spec(SPEC), f"description={bomb}")
    assert_refused(out, "--set description={a: &a [x, x", "alias *e", "100,000 values")
    out = validate(write_spec(SPEC), "description=" + "[" * 5000)
    assert_refused(out, "--set description=[[[", "nested deeper than 100 levels")


# --------------------------------------------------------------------------- empty and non-mapping files


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  # and another\n"])
def test_empty_file_names_line_1(write_spec, text):
    path = write_spec(text)
    assert_refused(validate(path), f"{path}:1: the file is empty (only comments/whitespace); "
                                   "a spec is a mapping with at least `name:`")


@pytest.mark.parametrize("text, holds", [("- name: t\n- steps: {}\n", "a list"),
                                         ("quickstart\n", "a string ('quickstart')"), ("42\n", "a number (42)")])
def test_a_file_that_is_not_a_mapping_says_what_it_holds(write_spec, text, holds):
    path = write_spec(text)
    assert_refused(validate(path), f"{path}:1:1: the file holds {holds}, expected a mapping with keys name, ")


# --------------------------------------------------------------------------- --set never changes a value's shape


def test_set_through_a_scalar_is_an_error_naming_the_override(write_spec):
    path = write_spec(SPEC)
    assert_refused(validate(path, "name.x=1"),
                   "--set name.x=1: cannot set 'name.x': 'name' is a string ('quickstart'), not a mapping")
    assert_refused(validate(path, "steps.clean.dedup.exact.on=1"),
                   "'steps.clean.dedup.exact' is a boolean (True), not a mapping")
    # a step written in shorthand (`sql: "SELECT ..."`) is its one field: set through it, by name
    assert_refused(validate(path, "steps.pool.sql.0=x"), "--set steps.pool.sql.0", "unknown key '0' (valid keys: query)")
    assert validate(path, "steps.pool.sql.query=SELECT 1 AS x FROM tasks").returncode == 0


def test_set_into_a_list_needs_an_index_in_range(write_spec):
    path = write_spec(SPEC + "  gen:\n    generate: {model: m, prompts: [a.yaml, b.yaml]}\n")
    out = validate(path, "steps.gen.generate.prompts.x=c.yaml")
    assert_refused(out, "--set steps.gen.generate.prompts.x=c.yaml: cannot set 'steps.gen.generate.prompts.x': "
                        "'steps.gen.generate.prompts' is a list of 2, so 'x' must be an index from 0 to 1")


def test_set_may_create_missing_mappings_and_their_errors_name_it(write_spec):
    path = write_spec(SPEC)
    (point,) = load(path, ["steps.clean.dedup.minhash.threshold=0.5"]).points()  # minhash is absent
    assert point.spec.steps["clean"].dedup.minhash.threshold == 0.5
    # a step made by --set: its missing field is the override's doing, not the file's `steps:` line
    assert_refused(validate(path, "steps.extra.dedup.exact=true"),
                   "--set steps.extra.dedup.exact: steps.extra.dedup.input: missing required field 'input'")
    with pytest.raises(SpecError) as info:
        load(path, ["steps.clean={dedup: {input: pool, exactt: 1}}"]).points()
    assert str(info.value).startswith("--set steps.clean: steps.clean.dedup.exactt: unknown key 'exactt'")


def test_set_sweep_to_a_scalar_blames_the_override(write_spec):
    out = validate(write_spec(SPEC), "sweep=5")
    assert_refused(out, "--set sweep: sweep: expected a mapping of dotted paths to lists, found 5 (int)")
    assert "spec.yaml:1" not in out.stderr
    out = validate(write_spec(SPEC), "sweep.mode=both")  # a sweep the file does not have
    assert_refused(out, "--set sweep.mode: sweep.mode: expected 'grid' or 'zip', found 'both'")
