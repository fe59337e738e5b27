"""The command line: one-line errors with exit code 2, JSON output, and the real models end to end."""

from __future__ import annotations

import json

import pytest
import torch

from leanml.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv_of, message",
    [
        (lambda p: ["profile", str(p / "missing.gguf")], "does not exist"),
        (lambda p: ["profile", "gpt-17"], "unknown model name 'gpt-17'"),
        (lambda p: ["profile", str(p / "notes.txt")], "unrecognised format '.txt'"),
        (lambda p: ["profile", str(p / "m.pt"), "--data", str(p / "empty.txt")], "is empty"),
        (lambda p: ["profile", str(p / "m.pt"), "--threads", "0"], "threads 0"),
        (lambda p: ["profile", str(p / "m.pt"), "--threads", "two"], "Invalid value for '--threads'"),
        (lambda p: ["profile", str(p / "m.pt"), "--hardware", "cray-1"], "unknown hardware 'cray-1'"),
        (lambda p: ["profile"], "Missing argument"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, mlp, argv_of, message):
    (tmp_path / "notes.txt").write_text("just some notes")
    (tmp_path / "empty.txt").write_text("")
    torch.save(mlp, tmp_path / "m.pt")
    code, out, err = run(argv_of(tmp_path), capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("leanml: error: ") and message in err
    assert "Traceback" not in out + err


def test_profile_writes_json_and_refuses_to_clobber(tmp_path, capsys, mlp):
    torch.save(mlp, tmp_path / "m.pt")
    torch.save({"x": torch.randn(30, 20), "y": torch.randint(0, 5, (30,))}, tmp_path / "d.pt")
    target = tmp_path / "out.json"
    argv = [
        "profile",
        str(tmp_path / "m.pt"),
        "--data",
        str(tmp_path / "d.pt"),
        "--threads",
        "1",
        "--repeats",
        "3",
        "--json",
        str(target),
    ]
    code, out, _ = run(argv, capsys)
    assert code == 0 and "accuracy" in out
    record = json.loads(target.read_text())
    assert record["model"] == "m" and record["quality"]["metric"] == "accuracy"
    target.write_text("mine")
    code, _, err = run(argv, capsys)
    assert code == 2 and "--force" in err and target.read_text() == "mine"
    code, _, _ = run(argv + ["--force"], capsys)
    assert code == 0 and json.loads(target.read_text())["model"] == "m"


def test_hardware_lists_profiles(capsys):
    code, out, _ = run(["hardware"], capsys)
    assert code == 0 and "aws-c6i.large" in out and "gcp-a2-highgpu-1g" in out


@pytest.mark.real
def test_smollm2_on_lee_perplexity(tmp_path, capsys):
    target = tmp_path / "p.json"
    code, out, _ = run(
        [
            "profile",
            "smollm2-135m",
            "--data",
            "lee",
            "--threads",
            "2",
            "--repeats",
            "2",
            "--new-tokens",
            "8",
            "--json",
            str(target),
        ],
        capsys,
    )
    assert code == 0
    d = json.loads(target.read_text())
    # first 8,192 tokens, 16 windows of 512, 511 predictions each, fp32 (observed 29.0667)
    assert d["quality"]["metric"] == "perplexity" and abs(d["quality"]["value"] - 29.07) <= 0.2
    assert d["quality"]["n_tokens"] == 16 * 511 and d["params"] == 134_515_008
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "decode_roofline_tokens_per_s"):
        assert d[key] > 0


@pytest.mark.real
def test_minilm_on_lee_sim_spearman(capsys, tmp_path):
    target = tmp_path / "m.json"
    code, _, _ = run(
        ["profile", "minilm-l6", "--data", "lee-sim", "--threads", "2", "--repeats", "2", "--json", str(target)], capsys
    )
    assert code == 0
    d = json.loads(target.read_text())
    # the 300 test pairs of lee-sim (25 documents; before the four-way split, all 1,225 pairs gave 0.5045)
    assert d["quality"]["metric"] == "spearman" and abs(d["quality"]["value"] - 0.45) <= 0.01  # observed 0.4500


def test_compress_then_profile_the_folder(tmp_path, capsys, mlp):
    torch.save(mlp, tmp_path / "m.pt")
    torch.save({"x": torch.randn(40, 20), "y": torch.randint(0, 5, (40,))}, tmp_path / "d.pt")
    out = tmp_path / "c"
    argv = [
        "compress",
        str(tmp_path / "m.pt"),
        "--recipe",
        "int8-dynamic",
        "--data",
        str(tmp_path / "d.pt"),
        "--out",
        str(out),
        "--threads",
        "1",
        "--repeats",
        "2",
    ]
    code, text, _ = run(argv, capsys)
    assert code == 0 and "after / before" in text
    after = json.loads((out / "after.json").read_text())
    before = json.loads((out / "before.json").read_text())
    assert set(after) == set(before) and after["disk_bytes"] > 0
    code, text, _ = run(["profile", str(out), "--data", str(tmp_path / "d.pt"), "--threads", "1", "--repeats", "2"], capsys)
    assert code == 0 and "accuracy" in text
    code, _, err = run(argv, capsys)  # refuses to clobber
    assert code == 2 and "--force" in err


def test_compress_with_a_prune_recipe_reports_sparsity(tmp_path, capsys, mlp):
    torch.save(mlp, tmp_path / "m.pt")
    torch.save({"x": torch.randn(64, 20), "y": torch.randint(0, 5, (64,))}, tmp_path / "d.pt")
    (tmp_path / "r.yaml").write_text(
        "steps:\n  - kind: prune\n    method: magnitude\n    sparsity: 0.5\n"
        "  - kind: finetune\n    loss: task\n    steps: 5\n    batch_size: 16\n"
    )
    out = tmp_path / "c"
    code, text, _ = run(
        [
            "compress",
            str(tmp_path / "m.pt"),
            "--recipe",
            str(tmp_path / "r.yaml"),
            "--data",
            str(tmp_path / "d.pt"),
            "--out",
            str(out),
            "--threads",
            "1",
            "--repeats",
            "2",
        ],
        capsys,
    )
    assert code == 0
    after = json.loads((out / "after.json").read_text())
    assert after["sparse"]["layers"] == 2 and abs(after["sparse"]["sparsity"] - 0.5) < 0.01
    assert json.loads((out / "finetune.json").read_text())["steps"] == 5
    code, text, _ = run(["profile", str(out), "--data", str(tmp_path / "d.pt"), "--threads", "1", "--repeats", "2"], capsys)
    assert code == 0 and "sparse layers" in text


@pytest.mark.parametrize(
    "recipe_text, message",
    [
        ("steps:\n  - kind: weight-only\n    bits: 9\n", "field 'bits' = 9"),
        ("steps:\n  - kind: prune-everything\n", "unknown technique 'prune-everything'"),
        ("steps:\n  - kind: weight-only\n    method: rtn\n    group_size: 7\n", "group_size 7 does not divide"),
        ("steps:\n  - kind: weight-only\n    method: rtn\n    targets: ['re:nothing']\n", "matches no Linear"),
        ("steps:\n  - kind: prune\n    sparsity: 1.5\n", "field 'sparsity' = 1.5"),
        ("steps:\n  - kind: prune\n    pattern: '4:2'\n", "needs n < m"),
        ("steps:\n  - kind: prune\n    method: magnitude\n    targets: ['re:nothing']\n", "matches no Linear"),
    ],
)
def test_bad_recipes_write_nothing(tmp_path, capsys, mlp, recipe_text, message):
    torch.save(mlp, tmp_path / "m.pt")
    (tmp_path / "r.yaml").write_text(recipe_text)
    out = tmp_path / "never"
    code, _, err = run(
        [
            "compress",
            str(tmp_path / "m.pt"),
            "--recipe",
            str(tmp_path / "r.yaml"),
            "--out",
            str(out),
            "--threads",
            "1",
            "--repeats",
            "1",
        ],
        capsys,
    )
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())
