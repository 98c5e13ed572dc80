"""The local transport's workspace housekeeping (``local_fs``)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from fleet_worker.executors import local_fs


def test_a_removed_tree_leaves_its_path_at_once_and_is_deleted_later(tmp_path: Path) -> None:
    tree = tmp_path / "t-1"
    (tree / ".fleet").mkdir(parents=True)
    (tree / ".fleet" / "prompt.md").write_text("x")
    local_fs.remove_tree(str(tree))
    assert not tree.exists()
    (tree / ".fleet").mkdir(parents=True)  # a later attempt makes it again meanwhile
    assert local_fs.wait_removed(10)
    assert [p.name for p in tmp_path.iterdir()] == ["t-1"]
    assert (tree / ".fleet").is_dir()


def test_trees_removed_together_are_deleted_together_by_rm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(argv: list[str], **options: Any) -> Any:
        runs.append(list(argv))
        return real_run(argv, **options)

    monkeypatch.setattr(local_fs.subprocess, "run", recording_run)
    for n in range(20):
        (tmp_path / f"t-{n}" / ".fleet").mkdir(parents=True)
        local_fs.remove_tree(str(tmp_path / f"t-{n}"))
    assert local_fs.wait_removed(10)
    assert list(tmp_path.iterdir()) == []
    # Deleted outside the worker's process, a few rm for twenty trees (one, unless the machine
    # stalls for longer than the gathering between two removals).
    assert all(argv[:3] == ["rm", "-rf", "--"] for argv in runs)
    assert sorted(Path(p).name.split(".removing-")[0] for argv in runs for p in argv[3:]) == sorted(
        f".t-{n}" for n in range(20)
    )
    assert 1 <= len(runs) <= 3


def test_trees_a_dead_process_left_are_swept(tmp_path: Path) -> None:
    left = tmp_path / ".t-0.removing-1-7"
    (left / "deep").mkdir(parents=True)
    (tmp_path / ".t-9.removing-2-0").write_text("a file")
    (tmp_path / "t-keep").mkdir()
    (tmp_path / "t-2").mkdir()
    local_fs.remove_tree(str(tmp_path / "t-2"))
    assert local_fs.wait_removed(10)
    assert [p.name for p in tmp_path.iterdir()] == ["t-keep"]


def test_removing_what_is_not_there_or_a_file(tmp_path: Path) -> None:
    local_fs.remove_tree(str(tmp_path / "missing"))
    (tmp_path / "plain").write_text("x")
    local_fs.remove_tree(str(tmp_path / "plain"))
    assert local_fs.wait_removed(10)
    assert list(tmp_path.iterdir()) == []


def test_make_dirs_is_mkdir_p(tmp_path: Path) -> None:
    local_fs.make_dirs(str(tmp_path / "a" / "b" / "c"))
    local_fs.make_dirs(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b" / "c").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError):
        local_fs.make_dirs(str(tmp_path / "f"))
    with pytest.raises(NotADirectoryError):
        local_fs.make_dirs(str(tmp_path / "f" / "sub"))


def test_write_file_truncates_or_appends_and_is_private(tmp_path: Path) -> None:
    path = str(tmp_path / "w")
    local_fs.write_file(path, b"hello world")
    local_fs.write_file(path, b"bye")
    local_fs.write_file(path, b"!", append=True)
    assert Path(path).read_bytes() == b"bye!"
    assert Path(path).stat().st_mode & 0o777 == 0o600
