"""``kill -9`` at five moments of compress, export, distill and optimize: the output is the old one or the
complete new one, never a partial folder; the user's files beside it survive; the next run cleans what the
killed one left; and ``--resume`` reaches the result of an uninterrupted run.

The moments are fixed crash points (``LEANML_KILL_AT``), so the tests do not depend on timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.process

ROOT = Path(__file__).parents[1]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), LEANML_QUIET="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("LEANML_KILL_AT", None)
    return {**env, **extra}


def leanml(processes, argv, cwd, kill_at=None):
    env = _env(**({"LEANML_KILL_AT": kill_at} if kill_at else {}))
    return processes.run([sys.executable, "-m", "leanml.cli", *argv], cwd=cwd, env=env, timeout=600)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def visible(root: Path) -> dict[str, bytes]:
    """What a user sees in the folder (hidden leftovers of a killed run excluded)."""
    return {k: v for k, v in snapshot(root).items() if not k.split("/")[0].startswith(".")}


@pytest.fixture
def workdir(tmp_path, mlp):
    work = tmp_path / "work"
    (work / "project").mkdir(parents=True)
    (work / "notes.txt").write_text("my notes")
    (work / "project" / "main.py").write_text("print('mine')")
    torch.save(mlp, work / "m.pt")
    torch.manual_seed(0)
    x = torch.randn(200, 20)
    with torch.no_grad():
        y = mlp(x).argmax(-1)
    torch.save({"x": x, "y": y}, work / "d.pt")
    return work


def _complete(folder: Path) -> bool:
    marker = json.loads((folder / ".leanml-output.json").read_text())
    return marker["complete"] is True


def _check_old_or_new(work: Path, out: str, old: dict, proc, loadable: str | None = "model.safetensors") -> str:
    """The killed run left the old output untouched, or the complete new one; the decoys are intact."""
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (work / "notes.txt").read_text() == "my notes" and (work / "project" / "main.py").read_text() == "print('mine')"
    now = snapshot(work / out)
    if now == old:
        return "old"
    assert _complete(work / out), "a partial output is visible"
    if loadable:
        load_file(str(work / out / loadable))
    return "new"


COMPRESS = ["compress", "m.pt", "--recipe", "int8-dynamic", "--data", "d.pt", "--repeats", "1", "--threads", "1"]
COMPRESS_MOMENTS = ["compress-start", "compress-applied", "after-weights", "before-commit", "after-swap"]


def test_compress_killed_at_five_moments_leaves_old_or_new(workdir, processes):
    first = leanml(processes, [*COMPRESS, "--out", "c"], workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    old = snapshot(workdir / "c")
    outcomes = {}
    for moment in COMPRESS_MOMENTS:
        proc = leanml(processes, [*COMPRESS, "--out", "c", "--force"], workdir, kill_at=moment)
        outcomes[moment] = _check_old_or_new(workdir, "c", old, proc)
        old = snapshot(workdir / "c")
    assert outcomes["compress-start"] == "old" and outcomes["after-swap"] == "new"
    again = leanml(processes, [*COMPRESS, "--out", "c", "--force"], workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    leftovers = [p.name for p in workdir.iterdir() if p.name.startswith(".c.")]
    assert leftovers == [], f"the killed runs' leftovers were not cleaned: {leftovers}"
    assert sorted(visible(workdir)) == sorted(visible(workdir))  # decoys still there (checked each time)


def test_two_compress_runs_to_one_folder_cannot_both_write_it(workdir, processes):
    """The first run holds the output; a second one started meanwhile is refused at once."""
    holder = _paused(processes, [*COMPRESS, "--out", "c"], workdir, "compress-start", workdir / ".c.paused")
    second = leanml(processes, [*COMPRESS, "--out", "c", "--force"], workdir)
    assert second.returncode == 2 and "another leanml run" in second.stderr
    assert second.stderr.count("\n") == 1
    (workdir / ".c.paused").unlink()  # let the first run finish
    holder.communicate(timeout=600)
    assert holder.returncode == 0
    assert _complete(workdir / "c")


EXPORT_CASES = [
    ("safetensors", "e", "after-weights"),
    ("safetensors", "e", "before-commit"),
    ("safetensors", "e", "after-swap"),
    ("onnx", "e.onnx", "export-written"),
    ("gguf", "e.gguf", "export-written"),
]


def test_export_killed_at_five_moments_leaves_old_or_new(workdir, processes, hf_llama_dir):
    art = workdir / "art"
    made = leanml(processes, ["compress", str(hf_llama_dir), "--recipe", "w8", "--out", str(art), "--repeats", "1"], workdir)
    assert made.returncode == 0, made.stderr[-3000:]
    for fmt, out, moment in EXPORT_CASES:
        model = "m.pt" if fmt == "onnx" else str(art)
        argv = ["export", model, "--format", fmt, "--out", out]
        if not (workdir / out).exists():
            first = leanml(processes, argv, workdir)
            assert first.returncode == 0, first.stderr[-3000:]
        target = workdir / out
        old = snapshot(target) if target.is_dir() else {"": target.read_bytes()}
        proc = leanml(processes, [*argv, "--force"], workdir, kill_at=moment)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        if fmt == "safetensors":
            _check_old_or_new(workdir, out, old, proc)
        else:  # a single file is replaced by one rename: killed before it, the old file is intact
            assert target.read_bytes() == old[""]
        assert (workdir / "notes.txt").read_text() == "my notes"
    for fmt, out in (("safetensors", "e"), ("gguf", "e.gguf"), ("onnx", "e.onnx")):  # the next run cleans up
        model = "m.pt" if fmt == "onnx" else str(art)
        again = leanml(processes, ["export", model, "--format", fmt, "--out", out, "--force"], workdir)
        assert again.returncode == 0, again.stderr[-3000:]
    left = [p.name for p in workdir.iterdir() if p.name.startswith((".e.", ".e.gguf."))]
    assert left == [], f"the killed runs' leftovers were not cleaned: {left}"


DISTILL = [
    "distill",
    "m.pt",
    "--data",
    "d.pt",
    "--student",
    "same",
    "--steps",
    "8",
    "--batch-size",
    "16",
    "--checkpoint-every",
    "2",
]


def _student(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_distill_killed_then_resumed_equals_an_uninterrupted_run(workdir, processes):
    ref = leanml(processes, [*DISTILL, "--out", "ref"], workdir)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = _student(workdir / "ref")
    for moment in ("distill-step:3", "distill-step:6"):
        previous = snapshot(workdir / "s") if (workdir / "s").exists() else None
        proc = leanml(processes, [*DISTILL, "--out", "s", "--force"], workdir, kill_at=moment)
        assert proc.returncode == -signal.SIGKILL
        now = snapshot(workdir / "s") if (workdir / "s").exists() else None
        assert now == previous  # nothing published before the end: the old student (or none) is there
        rerun = leanml(processes, [*DISTILL, "--out", "s"], workdir)
        assert rerun.returncode == 2 and "--resume" in rerun.stderr  # a checkpoint exists: said, not ignored
        resumed = leanml(processes, [*DISTILL, "--out", "s", "--resume", "--force"], workdir)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        got = _student(workdir / "s")
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
        assert not (workdir / "s.checkpoints").exists()
    old = snapshot(workdir / "s")
    for moment in ("after-weights", "before-commit", "after-swap"):
        proc = leanml(processes, [*DISTILL, "--out", "s", "--force"], workdir, kill_at=moment)
        _check_old_or_new(workdir, "s", old, proc)
        old = snapshot(workdir / "s")


def test_optimize_killed_then_resumed_reaches_the_uninterrupted_result(workdir, processes):
    argv = ["optimize", "m.pt", "--data", "d.pt", "--max-drop", "2%", "--runtime", "torch", "--trials", "4", "--threads", "1"]
    ref = leanml(processes, [*argv, "--out", "ref"], workdir)
    assert ref.returncode == 0, ref.stderr[-3000:]

    def chosen(out: str) -> tuple:
        s = json.loads((workdir / out / "summary.json").read_text())
        trials = json.loads((workdir / out / "trials.json").read_text())
        labels = sorted(t["label"] for t in trials if t["status"] != "running")
        return s["chosen"] is not None, labels

    for moment in ("optimize-start", "optimize-in-trial:2", "optimize-trial:3", "optimize-outputs"):
        proc = leanml(processes, [*argv, "--out", "o", "--force"], workdir, kill_at=moment)
        assert proc.returncode == -signal.SIGKILL
        assert (workdir / "notes.txt").read_text() == "my notes"
        marker = json.loads((workdir / "o" / ".leanml-output.json").read_text())
        assert marker["complete"] is False  # an unfinished study says so
        resumed = leanml(processes, [*argv, "--out", "o", "--resume"], workdir)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert _complete(workdir / "o")
        assert chosen("o")[1] == chosen("ref")[1]  # the same trials, none lost or repeated
        assert not [p for p in (workdir / "o" / ".work").glob("*")] if (workdir / "o" / ".work").exists() else True
    # killed while replacing a finished search: the old one is kept aside until the new one completes
    old = visible(workdir / "o")
    proc = leanml(processes, [*argv, "--out", "o", "--force"], workdir, kill_at="optimize-in-trial:2")
    assert proc.returncode == -signal.SIGKILL
    asides = [p for p in workdir.iterdir() if p.name.startswith(".o.old-")]
    assert len(asides) == 1 and visible(asides[0]) == old
    resumed = leanml(processes, [*argv, "--out", "o", "--resume"], workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [p for p in workdir.iterdir() if p.name.startswith(".o.old-")] == []  # dropped once the new one is complete


def _paused(processes, argv, cwd, point: str, flag: Path):
    """Start ``leanml argv`` and wait until it holds at ``point`` (it waits there until ``flag`` is removed)."""
    import time

    proc = processes.popen(
        [sys.executable, "-m", "leanml.cli", *argv],
        cwd=cwd,
        env=_env(LEANML_PAUSE_AT=point, LEANML_PAUSE_FILE=str(flag)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(12000):
        if flag.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert flag.exists(), f"the run never reached {point}: {proc.communicate()[1][-2000:]}"
    return proc


def test_two_profile_runs_to_one_json_file_lose_no_record(workdir, processes):
    """The second writer to finish does not replace the first one's record (without --force)."""
    argv = ["profile", "m.pt", "--data", "d.pt", "--repeats", "1", "--threads", "1", "--json", "p.json"]
    first = _paused(processes, argv, workdir, "profile-before-write", workdir / ".held")
    second = leanml(processes, argv, workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    record = (workdir / "p.json").read_text()
    (workdir / ".held").unlink()
    _, err = first.communicate(timeout=600)
    assert first.returncode == 2 and "appeared while leanml worked" in err and err.count("\n") == 1
    assert (workdir / "p.json").read_text() == record  # the first record to land is kept
    assert sorted(p.name for p in workdir.iterdir()) == sorted(["d.pt", "m.pt", "notes.txt", "p.json", "project"])


def test_a_folder_made_at_out_while_compress_runs_is_kept(workdir, processes):
    first = _paused(processes, [*COMPRESS, "--out", "c"], workdir, "before-commit", workdir / ".held")
    (workdir / "c").mkdir()
    (workdir / "c" / "mine.txt").write_text("made while it ran")
    (workdir / ".held").unlink()
    _, err = first.communicate(timeout=600)
    assert first.returncode == 2 and "appeared while leanml worked" in err
    assert sorted(p.name for p in (workdir / "c").iterdir()) == ["mine.txt"]
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".c.")] == []
