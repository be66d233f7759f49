"""write_atomic and replace_folder: a file or folder appears whole or not at all."""

from __future__ import annotations

import pytest

from datamill.atomic import replace_folder, write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = write_atomic(tmp_path / "meta.json", '{"a": 1}')
    assert path.read_text() == '{"a": 1}'

    def half_then_crash(tmp):
        tmp.write_text('{"a": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(path, half_then_crash)
    assert path.read_text() == '{"a": 1}' and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_writers_that_read_the_suffix_get_it(tmp_path):
    seen = []
    write_atomic(tmp_path / "chart.png", lambda tmp: (seen.append(tmp.suffix), tmp.write_bytes(b"png")))
    assert seen == [".png"] and (tmp_path / "chart.png").read_bytes() == b"png"


def test_replace_folder_swaps_a_stale_folder_for_the_new_one(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "stale.txt").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "model.bin").write_text("new")
    replace_folder(tmp_path / "new", tmp_path / "final")
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["model.bin"] and not (tmp_path / "new").exists()
