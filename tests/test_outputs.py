"""Output safety: leanml replaces only what it wrote, atomically, and never a user's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leanml import outputs
from leanml.errors import LeanmlError
from leanml.outputs import MARKER, FolderOutput, check_file_target, check_folder_target, read_marker, write_file


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def decoys(tmp_path, monkeypatch):
    """A working folder full of the user's files, made the current folder."""
    work = tmp_path / "work"
    (work / "project").mkdir(parents=True)
    (work / "notes.txt").write_text("my notes")
    (work / "project" / "main.py").write_text("print('mine')")
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("bad", ["", " ", ".", "..", "./", "/", "~"])
def test_protected_and_empty_targets_are_refused_even_with_force(decoys, bad):
    before = snapshot(decoys)
    with pytest.raises(LeanmlError) as info:
        check_folder_target(bad, force=True)
    assert "\n" not in str(info.value)
    assert snapshot(decoys) == before


def test_an_ancestor_of_the_current_folder_is_refused(decoys):
    (decoys / "project" / "deep").mkdir()
    os.chdir(decoys / "project" / "deep")
    with pytest.raises(LeanmlError, match="ancestor of the current folder"):
        check_folder_target(str(decoys), force=True)


def test_a_folder_leanml_did_not_write_is_never_replaced(decoys):
    before = snapshot(decoys)
    with pytest.raises(LeanmlError, match="exists and is not empty; pass --force"):
        check_folder_target("project", force=False)
    with pytest.raises(LeanmlError, match="leanml did not write"):
        FolderOutput("project", "compress", force=True)
    assert snapshot(decoys) == before


def test_force_replaces_a_marked_folder_only_when_the_new_one_is_complete(decoys):
    with FolderOutput("out", "compress") as w:
        (w.tmp / "a.txt").write_text("first")
        w.commit()
    assert read_marker(decoys / "out")["complete"] is True and (decoys / "out" / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), FolderOutput("out", "compress", force=True) as w:
        (w.tmp / "a.txt").write_text("second")
        raise RuntimeError("the run failed before it finished")
    assert (decoys / "out" / "a.txt").read_text() == "first"  # the old output is intact
    assert [p.name for p in decoys.iterdir() if p.name.startswith(".out")] == []  # nothing left behind
    with FolderOutput("out", "compress", force=True) as w:
        (w.tmp / "a.txt").write_text("second")
        w.commit()
    assert (decoys / "out" / "a.txt").read_text() == "second"


def test_the_swap_without_an_atomic_exchange_still_replaces(decoys, monkeypatch):
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    for text in ("first", "second"):
        with FolderOutput("out", "compress", force=True) as w:
            (w.tmp / "a.txt").write_text(text)
            w.commit()
    assert (decoys / "out" / "a.txt").read_text() == "second"
    assert sorted(p.name for p in decoys.iterdir()) == ["notes.txt", "out", "project"]


def test_a_second_run_on_the_same_target_is_refused_while_the_first_holds_it(decoys):
    with FolderOutput("out", "compress") as w:
        with pytest.raises(LeanmlError, match="another leanml run"):
            FolderOutput("out", "compress", force=True).__enter__()
        w.commit()
    with FolderOutput("out", "compress", force=True) as w:  # released: a later run may write it
        w.commit()


def test_a_folder_that_appears_during_the_run_is_kept(decoys):
    with FolderOutput("out", "compress") as w:
        (decoys / "out").mkdir()
        (decoys / "out" / "user.txt").write_text("made meanwhile")
        with pytest.raises(LeanmlError, match="appeared while leanml worked"):
            w.commit()
    assert (decoys / "out" / "user.txt").read_text() == "made meanwhile"
    with FolderOutput("out2", "compress", force=True) as w:
        (decoys / "out2").mkdir()
        (decoys / "out2" / "user.txt").write_text("made meanwhile")
        with pytest.raises(LeanmlError, match="did not write"):
            w.commit()  # --force replaces only leanml's own folders, also at the last moment
    assert (decoys / "out2" / "user.txt").read_text() == "made meanwhile"


def test_file_targets(decoys):
    with pytest.raises(LeanmlError, match="is a folder"):
        check_file_target("project", force=True)
    with pytest.raises(LeanmlError, match="exists; pass --force"):
        check_file_target("notes.txt", force=False)
    with pytest.raises(LeanmlError, match="is a file, not a folder"):
        check_file_target("notes.txt/x.json", force=False)
    with pytest.raises(LeanmlError, match="is empty"):
        check_file_target("", force=True)
    # a file that appears between the check and the write is kept, not replaced
    with pytest.raises(LeanmlError, match="appeared while leanml worked"), outputs.new_file(decoys / "r.json", False) as tmp:
        tmp.write_text("new")
        (decoys / "r.json").write_text("theirs")
    assert (decoys / "r.json").read_text() == "theirs"
    write_file(decoys / "r.json", "new", force=True)
    assert (decoys / "r.json").read_text() == "new"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_refused_before_any_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(LeanmlError, match="not writable"):
            check_folder_target(ro / "out", force=False)
        with pytest.raises(LeanmlError, match="not writable"):
            check_file_target(ro / "p.json", force=False)
    finally:
        ro.chmod(0o700)


def test_outputs_follow_the_umask(decoys):
    old = os.umask(0o022)
    try:
        with FolderOutput("out", "compress") as w:
            write_file(w.tmp / "r.json", "{}", force=True)
            w.commit()
    finally:
        os.umask(old)
    assert (decoys / "out").stat().st_mode & 0o777 == 0o755
    assert (decoys / "out" / "r.json").stat().st_mode & 0o777 == 0o644


def test_leftovers_of_dead_runs_are_removed_and_foreign_ones_kept(decoys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    ours = decoys / f".out.tmp-{pid}-abc"
    ours.mkdir()
    (ours / MARKER).write_text(json.dumps({"writer": "leanml", "kind": "compress", "complete": False}))
    foreign = decoys / f".out.tmp-{pid}-xyz"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not leanml's")
    stale_file = decoys / f".out.tmp-{pid}-q.tmp"
    stale_file.write_text("partial")
    with FolderOutput("out", "compress") as w:
        w.commit()
    assert not ours.exists() and not stale_file.exists()
    assert (foreign / "keep.txt").read_text() == "not leanml's"


def test_a_swap_killed_between_its_two_renames_brings_the_old_output_back(decoys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = decoys / f".out.old-{int(dead.stdout)}-k"
    aside.mkdir()
    (aside / MARKER).write_text(json.dumps({"writer": "leanml", "kind": "compress", "complete": True}))
    (aside / "a.txt").write_text("old")
    outputs.clean_leftovers(decoys / "out")
    assert (decoys / "out" / "a.txt").read_text() == "old" and not aside.exists()
