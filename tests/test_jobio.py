"""Outputs are written atomically: a writer that breaks leaves the old file (or none), never a part of a new one."""

import json
import os

import pandas as pd
import pytest

from streamkv.jobio import atomic_path, write_json, write_table, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    write_json({"status": "ok"}, path)
    with pytest.raises(ValueError):  # strict JSON: a NaN is refused before anything is renamed
        write_json({"status": "ok", "ppl": float("nan")}, path)
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        with open(tmp, "w") as half:
            half.write('{"status": "o')
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"status": "ok"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "new" / "figure.png"):
        raise RuntimeError("broken")
    assert list((tmp_path / "new").iterdir()) == []


def test_tables_keep_their_format_and_files_get_the_usual_mode(tmp_path):
    frame = pd.DataFrame({"position": [1, 2], "nll": [0.5, 1.5]})
    write_table(frame, tmp_path / "t.parquet")
    write_table(frame, tmp_path / "t.csv")
    write_text("# page\n", tmp_path / "page.md")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), frame)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t.csv"), frame)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("t.parquet", "t.csv", "page.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
