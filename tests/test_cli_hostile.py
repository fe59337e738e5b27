"""Bad input on every verb, as a hostile but realistic user gives it: exit code 2, exactly one
``leanml: error:`` line naming the value, no traceback, and the folder exactly as it was (nothing written,
nothing removed) — checked against decoy files of the user's in the current folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leanml.cli import main

ROOT = Path(__file__).parents[1]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under ``root``, hidden ones included."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() else None
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory, hf_llama_dir, hf_bert_dir, text_file):
    """Models and data files of every kind, good and damaged, outside the working folder."""

    a = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)).eval()
    torch.save(mlp, a / "m.pt")
    x = torch.randn(120, 20)
    torch.save({"x": x, "y": mlp(x).argmax(-1).detach()}, a / "d.pt")
    (a / "three.txt").write_text("three short words")
    (a / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (a / "binary.jsonl").write_bytes(os.urandom(4096))
    (a / "latin1.jsonl").write_bytes('{"text": "caf\xe9 cr\xe8me br\xfbl\xe9e"}\n'.encode("latin-1") * 30)
    (a / "unlabelled.jsonl").write_text("".join(json.dumps({"text": f"sentence number {i}"}) + "\n" for i in range(40)))
    (a / "bad-utf8.yaml").write_bytes(b"name: x\nsteps:\n  - kind: weight-only\n    bits: 8 \xff\xfe\n")
    (a / "bad-regex.yaml").write_text("name: x\nsteps:\n  - kind: weight-only\n    bits: 8\n    targets: ['model.(']\n")
    (a / "no-kind.yaml").write_text("name: x\nsteps:\n  - bits: 8\n")
    (a / "syntax.yaml").write_text("name: x\nsteps:\n  - kind: weight-only\n   bits: [8\n")
    no_match = "name: x\nsteps:\n  - kind: weight-only\n    bits: 8\n    targets: ['nothing\\.like\\.this']\n"
    (a / "no-match.yaml").write_text(no_match)
    # a Hugging Face folder with a truncated weights file, one without config.json, one with NaN weights
    trunc = a / "truncated-llama"
    shutil.copytree(hf_llama_dir, trunc)
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    noconf = a / "no-config-llama"
    shutil.copytree(hf_llama_dir, noconf)
    (noconf / "config.json").unlink()
    nan = a / "nan-llama"
    shutil.copytree(hf_llama_dir, nan)
    from safetensors.torch import load_file, save_file

    state = load_file(str(nan / "model.safetensors"))
    key = next(k for k in state if k.endswith("q_proj.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    (a / "group-7.yaml").write_text("name: x\nsteps:\n  - kind: weight-only\n    bits: 4\n    group_size: 7\n")
    (a / "pairs.jsonl").write_text(
        "".join(json.dumps({"text_a": f"a {i}", "text_b": f"b {i}", "score": i % 5}) + "\n" for i in range(30))
    )
    # leanml artifacts, then damaged copies of them
    art = a / "art"
    assert _cli(["compress", str(hf_llama_dir), "--recipe", "w8", "--out", str(art), "--repeats", "1"]) == 0
    for name, damage in {
        "art-no-meta": lambda d: (d / "leanml.json").unlink(),
        "art-flipped": lambda d: _flip_byte(d / "model.safetensors"),
        "art-no-tokenizer": lambda d: [p.unlink() for p in d.iterdir() if "token" in p.name or p.name == "vocab.json"],
        "art-no-config": lambda d: (d / "config.json").unlink(),
        "art-shapes": lambda d: _edit_config(d, hidden_size=48),
        "art-swapped-config": lambda d: shutil.copy(hf_bert_dir / "config.json", d / "config.json"),
    }.items():
        shutil.copytree(art, a / name)
        damage(a / name)
    return a


def _cli(argv) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "project").mkdir(parents=True)
    (work / "notes.txt").write_text("my notes")
    (work / "project" / "main.py").write_text("print('mine')")
    (work / "results.json").write_text('{"mine": true}')
    monkeypatch.chdir(work)
    return work


A, LLAMA, BERT, TEXT = "{a}", "{llama}", "{bert}", "{text}"

# (argv, words the one line must contain); {a} = assets folder, {llama}/{bert} = tiny HF models, {text} = a .txt
CASES = {
    # ---- data loss: --force never removes what leanml did not write
    "compress-empty-out": (["compress", "{a}/m.pt", "--recipe", "w8", "--out", "", "--force"], "current folder"),
    "compress-dot-out": (["compress", "{a}/m.pt", "--recipe", "w8", "--out", ".", "--force"], "current folder"),
    "compress-root-out": (["compress", "{a}/m.pt", "--recipe", "w8", "--out", "/", "--force"], "root folder"),
    "compress-home-out": (["compress", "{a}/m.pt", "--recipe", "w8", "--out", "~", "--force"], "home folder"),
    "compress-user-folder": (["compress", "{a}/m.pt", "--recipe", "w8", "--out", "project", "--force"], "did not write"),
    "compress-ancestor": (["compress", "{a}/m.pt", "--recipe", "w8", "--out", "..", "--force"], "ancestor"),
    "optimize-empty-out": (
        ["optimize", "{a}/m.pt", "--data", "{a}/d.pt", "--trials", "1", "--out", "", "--force"],
        "current folder",
    ),
    "optimize-user-folder": (
        ["optimize", "{a}/m.pt", "--data", "{a}/d.pt", "--trials", "1", "--out", "project", "--force"],
        "did not write",
    ),
    "export-empty-out": (["export", "{a}/m.pt", "--format", "safetensors", "--out", "", "--force"], "current folder"),
    "export-user-folder": (["export", "{a}/m.pt", "--format", "safetensors", "--out", "project", "--force"], "did not write"),
    "distill-empty-out": (["distill", "{a}/m.pt", "--data", "{a}/d.pt", "--out", "", "--force"], "current folder"),
    "distill-user-folder": (["distill", "{a}/m.pt", "--data", "{a}/d.pt", "--out", "project", "--force"], "did not write"),
    # ---- output locations
    "compress-out-is-file": (["compress", "{a}/m.pt", "--recipe", "w8", "--out", "notes.txt"], "is a file"),
    "compress-parent-is-file": (["compress", "{a}/m.pt", "--recipe", "w8", "--out", "notes.txt/c"], "is a file, not a folder"),
    "profile-json-parent-file": (["profile", "{a}/m.pt", "--json", "notes.txt/p.json"], "is a file, not a folder"),
    "profile-json-folder": (["profile", "{a}/m.pt", "--json", "project", "--force"], "is a folder"),
    "profile-json-exists": (["profile", "{a}/m.pt", "--json", "results.json"], "pass --force"),
    "optimize-out-is-file": (
        ["optimize", "{a}/m.pt", "--data", "{a}/d.pt", "--out", "notes.txt", "--force"],
        "is a file",
    ),
    "export-onnx-into-folder": (["export", "{a}/m.pt", "--format", "onnx", "--out", "project", "--force"], "is a folder"),
    "export-bad-format": (["export", "{a}/m.pt", "--format", "pdf", "--out", "x.pdf"], "'pdf'"),
    "optimize-storage-scheme": (
        ["optimize", "{a}/m.pt", "--data", "{a}/d.pt", "--out", "o", "--storage", "foo://x/y"],
        "--storage",
    ),
    "optimize-storage-parent-file": (
        ["optimize", "{a}/m.pt", "--data", "{a}/d.pt", "--out", "o", "--storage", "sqlite:///notes.txt/s.db"],
        "--storage",
    ),
    # ---- numbers out of range
    "profile-threads-huge": (["profile", "{a}/m.pt", "--threads", "99999"], "99999"),
    "compress-threads-huge": (["compress", "{a}/m.pt", "--recipe", "w8", "--out", "c", "--threads", "99999"], "99999"),
    "optimize-threads-zero": (["optimize", "{a}/m.pt", "--data", "{a}/d.pt", "--out", "o", "--threads", "0"], "threads"),
    "optimize-threads-huge": (["optimize", "{a}/m.pt", "--data", "{a}/d.pt", "--out", "o", "--threads", "99999"], "99999"),
    "profile-price-inf": (["profile", "{a}/m.pt", "--price-per-hour", "1e999"], "price"),
    "profile-price-negative": (["profile", "{a}/m.pt", "--price-per-hour", "-1"], "price"),
    "profile-device-tpu": (["profile", "{a}/m.pt", "--device", "tpu"], "'tpu'"),
    "profile-device-absent": (["profile", "{a}/m.pt", "--device", "cuda" if not torch.cuda.is_available() else "mps"], "device"),
    "distill-lr-nan": (["distill", "{a}/m.pt", "--data", "{a}/d.pt", "--out", "s", "--lr", "nan"], "not a number"),
    # ---- wrong data for the task
    "profile-bert-images": (["profile", "{bert}", "--data", "{a}/d.pt"], "text"),
    "compress-bert-images": (["compress", "{bert}", "--recipe", "w8", "--data", "{a}/d.pt", "--out", "c"], "text"),
    "distill-bert-images": (["distill", "{bert}", "--data", "{a}/d.pt", "--out", "s"], "text"),
    "optimize-bert-images": (["optimize", "{bert}", "--data", "{a}/d.pt", "--out", "o"], "text"),
    "profile-llama-images": (["profile", "{llama}", "--data", "{a}/d.pt"], "text"),
    "profile-llama-three-tokens": (["profile", "{llama}", "--data", "{a}/three.txt"], "tokens"),
    "profile-mlp-text": (["profile", "{a}/m.pt", "--data", "{text}"], "text"),
    "profile-binary-text": (["profile", "{llama}", "--data", "{a}/binary.txt"], "not text"),
    "compress-binary-calib": (
        ["compress", "{llama}", "--recipe", "w4-g64", "--calib", "{a}/binary.jsonl", "--out", "c"],
        "binary.jsonl",
    ),
    "profile-reference-other-task": (["profile", "{llama}", "--data", "{text}", "--reference", "{bert}"], "reference"),
    "distill-task-loss-unlabelled": (
        ["distill", "{bert}", "--data", "{a}/unlabelled.jsonl", "--loss", "task", "--out", "s"],
        "labels",
    ),
    # ---- damaged inputs
    "profile-truncated-safetensors": (["profile", "{a}/truncated-llama"], "truncated-llama"),
    "export-truncated-safetensors": (
        ["export", "{a}/truncated-llama", "--format", "safetensors", "--out", "e"],
        "truncated-llama",
    ),
    "profile-no-config": (["profile", "{a}/no-config-llama"], "no-config-llama"),
    "profile-nan-weights": (["profile", "{a}/nan-llama"], "finite"),
    "profile-artifact-no-meta": (["profile", "{a}/art-no-meta"], "leanml.json"),
    "profile-artifact-flipped-bit": (["profile", "{a}/art-flipped"], "checksum"),
    "profile-artifact-no-tokenizer": (["profile", "{a}/art-no-tokenizer"], "tokenizer"),
    "profile-artifact-no-config": (["profile", "{a}/art-no-config"], "art-no-config"),
    "profile-artifact-shapes": (["profile", "{a}/art-shapes"], "art-shapes"),
    "profile-artifact-swapped-config": (["profile", "{a}/art-swapped-config"], "art-swapped-config"),
    "compress-recipe-group-size": (["compress", "{llama}", "--recipe", "{a}/group-7.yaml", "--out", "c"], "7"),
    "profile-llama-pairs": (["profile", "{llama}", "--data", "{a}/pairs.jsonl"], "pairs"),
    "optimize-budget-too-small": (
        ["optimize", "{a}/m.pt", "--data", "{a}/d.pt", "--out", "o", "--time-budget", "0.001s", "--threads", "1"],
        "too small",
    ),
    "compress-recipe-not-utf8": (["compress", "{a}/m.pt", "--recipe", "{a}/bad-utf8.yaml", "--out", "c"], "bad-utf8.yaml"),
    "compress-recipe-bad-regex": (["compress", "{llama}", "--recipe", "{a}/bad-regex.yaml", "--out", "c"], "model.("),
    "compress-recipe-no-kind": (["compress", "{a}/m.pt", "--recipe", "{a}/no-kind.yaml", "--out", "c"], "kind"),
    "compress-recipe-yaml-line": (["compress", "{a}/m.pt", "--recipe", "{a}/syntax.yaml", "--out", "c"], "line"),
    "compress-recipe-no-match": (["compress", "{llama}", "--recipe", "{a}/no-match.yaml", "--out", "c"], "nothing"),
    # ---- late checks made early
    "distill-resume-without-checkpoint": (["distill", "{a}/m.pt", "--data", "{a}/d.pt", "--out", "s", "--resume"], "checkpoint"),
    "optimize-missing-model": (["optimize", "{a}/missing.pt", "--data", "{a}/d.pt", "--out", "o"], "missing.pt"),
    "optimize-missing-candidate": (
        ["optimize", "{a}/m.pt", "--data", "{a}/d.pt", "--out", "o", "--candidates", "{a}/gone.pt"],
        "gone.pt",
    ),
    "optimize-bad-runtime": (["optimize", "{a}/m.pt", "--data", "{a}/d.pt", "--out", "o", "--runtime", "tpu"], "'tpu'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, assets, workdir, hf_llama_dir, hf_bert_dir, text_file, capsys):
    argv, words = CASES[case]
    subst = {"{a}": str(assets), "{llama}": str(hf_llama_dir), "{bert}": str(hf_bert_dir), "{text}": str(text_file)}
    argv = [_fill(arg, subst) for arg in argv]
    before = tree(workdir)
    assets_before = tree(assets)
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert info.value.code == 2, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("leanml: error: "), err
    assert words in lines[0], lines[0]
    assert tree(workdir) == before, "the working folder changed"
    assert tree(assets) == assets_before, "an input changed"


def _fill(arg: str, subst: dict) -> str:
    for k, v in subst.items():
        arg = arg.replace(k, v)
    return arg


def test_latin1_records_are_read_or_refused_in_one_line(assets, workdir, hf_bert_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["profile", str(hf_bert_dir), "--data", str(assets / "latin1.jsonl"), "--repeats", "1"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert info.value.code == 0 or (info.value.code == 2 and err.count("\n") == 1)


def test_export_of_a_compressed_artifact_as_safetensors_reloads(assets, workdir, capsys):
    from leanml.models import load_model

    assert _cli(["export", str(assets / "art"), "--format", "safetensors", "--out", "e"]) == 0
    a, b = load_model(str(assets / "art")), load_model("e")
    ids = torch.tensor([[1, 5, 9, 12]])
    torch.testing.assert_close(a.module(input_ids=ids).logits, b.module(input_ids=ids).logits, rtol=0, atol=0)


def test_compress_without_data_says_what_it_calibrated_on(assets, workdir, capsys):
    assert _cli(["compress", str(assets / "m.pt"), "--recipe", "w8", "--out", "c", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "no --data or --calib" in " ".join(out.split())


def test_a_closed_stdout_is_one_line_not_a_traceback():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "leanml.cli", "hardware"], stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=120
        )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("leanml: error: ")


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.process
def test_a_full_disk_is_one_line_and_leaves_no_partial_output(assets, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("this machine cannot mount a small tmpfs")
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
        (disk / "filler").write_bytes(b"\0" * (4 * 1024 * 1024 - 8192))  # nearly full
        (disk / "notes.txt").write_text("mine")
        for argv in (
            ["profile", str(assets / "m.pt"), "--repeats", "1", "--json", str(disk / "p.json")],
            ["compress", str(assets / "m.pt"), "--recipe", "w8", "--repeats", "1", "--out", str(disk / "c")],
        ):
            if not (disk / "filler2").exists():
                (disk / "filler2").write_bytes(b"\0" * 4096)
            cmd = [sys.executable, "-m", "leanml.cli", *argv]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
            assert sorted(p.name for p in disk.iterdir()) == ["filler", "filler2", "notes.txt"]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=60)


@pytest.mark.process
def test_a_write_cut_short_midway_leaves_no_partial_output(assets, tmp_path):
    """Where no tmpfs can be mounted: the per-file size limit (RLIMIT_FSIZE) fails the weights file midway."""
    work = tmp_path / "w"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    script = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048)); "
        "from leanml.cli import main; main(sys.argv[1:])"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    argv = ["compress", str(assets / "m.pt"), "--recipe", "w8", "--repeats", "1", "--out", "c"]
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env, cwd=work, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
