"""dlm.fileio.atomic_directory: a directory is replaced whole or not at all, and nothing temporary is left behind."""
from __future__ import annotations

import pytest

from dlm.fileio import atomic_directory


def test_success_replaces_the_old_directory_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "weights.bin").write_text("new")
        assert (target / "stale.bin").read_text() == "old"          # readers still see the old one meanwhile
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]          # no temp or .old copy left


def test_failure_keeps_the_old_directory_and_cleans_up(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights.bin").write_text("half-written")
            raise RuntimeError("crash while saving")
    assert (target / "weights.bin").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_creates_missing_parents(tmp_path):
    with atomic_directory(tmp_path / "a" / "b") as tmp:
        (tmp / "x").write_text("1")
    assert (tmp_path / "a" / "b" / "x").read_text() == "1"
