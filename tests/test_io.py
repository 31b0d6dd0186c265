"""fourm.io: atomic writes leave the old file or the whole new one, and no stray temporaries."""

import json

import numpy as np
import pytest

from fourm import io


def test_atomic_write_replaces_whole_file_and_cleans_up(tmp_path):
    p = tmp_path / "sub" / "a.json"
    io.atomic_write_json(p, {"b": 1, "a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    io.atomic_write(p, "text")
    assert p.read_text() == "text"
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "keep.txt"
    p.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(p, b"new")
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keep.txt"]


def test_atomic_save_npy_round_trips_without_pickle(tmp_path):
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    p = io.atomic_save_npy(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(np.load(p, allow_pickle=False), a)
    with pytest.raises(ValueError):
        io.atomic_save_npy(tmp_path / "b.npy", np.array([{"x": 1}], dtype=object))
    assert not (tmp_path / "b.npy").exists()
