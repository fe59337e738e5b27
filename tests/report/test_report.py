import base64
import copy
from html.parser import HTMLParser

import pytest

from leanml.report import write_report
from leanml.report.render import fmt, fmt_bytes

PNG = b"\x89PNG\r\n\x1a\n"


def _measurement(runtime: str, scale: float, ppl: float) -> dict:
    return {
        "runtime": runtime,
        "latency_ms": {"p50": 12.5 * scale, "p95": 15.0 * scale},
        "throughput_per_s": 80 / scale,
        "item": "token",
        "peak_memory_bytes": int(900e6 * scale),
        "disk_bytes": int(500e6 * scale),
        "weight_bytes": int(490e6 * scale),
        "params": 124_000_000,
        "energy_j_per_item": 0.4 * scale,
        "usd_per_million": 1.2 * scale,
        "quality": {"metric": "perplexity", "value": ppl},
    }


def _trial(number, label, status, quality=None, drop=None, meets=None, objective=None, size=None, reason=None, kind="quantize"):
    return {
        "number": number,
        "label": label,
        "runtime": label.split(" + ")[-1],
        "status": status,
        "reason": reason,
        "recipe": {"name": f"r{number}", "steps": [{"kind": kind, "bits": 8}]},
        "quality": quality,
        "quality_drop": drop,
        "meets_budget": meets,
        "objective": objective,
        "size_bytes": size,
        "fidelity": None,
        "seconds": 3.25 + number,
    }


@pytest.fixture
def inputs():
    trials = [
        _trial(0, "w8 + onnxruntime", "complete", 20.4, 0.02, True, 0.61, 130_000_000, kind="quantize"),
        _trial(1, "w4 + torch", "complete", 23.0, 0.15, False, 0.35, 80_000_000),
        _trial(2, "prune 30% | w8 + torch", "complete", 20.9, 0.045, True, 0.75, 300_000_000, kind="prune"),
        _trial(3, "w2 + torch", "rejected", reason="cheap fidelity: estimated drop 0.9 > 3x budget"),
        _trial(4, "distill + torch", "failed", reason="RuntimeError: out of memory"),
    ]
    summary = {
        "model": "gpt2",
        "data": "wikitext",
        "metric": "perplexity",
        "higher_is_better": False,
        "budget": {"max_drop": 0.05, "drop_type": "relative", "threshold": 21.0, "text": "≤ 5% relative increase in perplexity"},
        "objective": "usd",
        "objective_label": "$ per million tokens",
        "hardware": "cpu-x86",
        "runtime": "onnxruntime",
        "before": _measurement("torch", 1.0, 20.0),
        "after": _measurement("onnxruntime", 0.5, 20.4),
        "chosen": 0,
        "met": True,
        "shortfall": None,
        "why": "w8 + onnxruntime is the cheapest <within> budget & fast.",
        "pareto": [1, 0],
        "baseline": {"recipe": "w8", "runtime": "torch", "objective": 0.7, "quality": 20.3},
        "elapsed_s": 12.0,
        "time_budget_s": 60.0,
        "trials_total": 5,
    }
    return summary, trials


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def _images(text: str) -> list[bytes]:
    parser = _Images()
    parser.feed(text)
    parser.close()
    prefix = "data:image/png;base64,"
    assert all(src.startswith(prefix) for src in parser.srcs)
    return [base64.b64decode(src[len(prefix) :], validate=True) for src in parser.srcs]


def _no_temp_files(folder):
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_full_report(tmp_path, inputs):
    summary, trials = inputs
    sens = {f"model.layers.{i}.mlp.c_fc": 1.0 / (i + 1) for i in range(200)}
    files = write_report(tmp_path, summary, trials, sens)
    assert set(files) == {"report.md", "report.html", "pareto.png", "pareto_size.png", "sensitivity.png"}
    for path in files.values():
        assert path.parent == tmp_path and path.stat().st_size > 0
    for name in ("pareto.png", "pareto_size.png", "sensitivity.png"):
        assert files[name].read_bytes().startswith(PNG)
    _no_temp_files(tmp_path)

    page = files["report.html"].read_text()
    images = _images(page)
    assert len(images) == 3 and all(img.startswith(PNG) for img in images)
    assert "kind: quantize" in page and "w8 + onnxruntime" in page
    assert "&lt;within&gt; budget &amp; fast" in page and "<within>" not in page
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page

    md = files["report.md"].read_text()
    assert md.startswith("# ") and "gpt2" in md and "wikitext" in md
    assert "budget met" in md and "NOT met" not in md
    assert "```yaml\nname: r0\nsteps:\n- kind: quantize" in md
    for t in trials:
        assert any(line.startswith(f"| {t['number']} | {t['label'].replace('|', chr(92) + '|')} |") for line in md.splitlines())
    assert "cheap fidelity: estimated drop 0.9" in md and "RuntimeError: out of memory" in md
    assert "60 most sensitive of 200 layers" in md
    assert "![" in md and "(pareto.png)" in md and "(sensitivity.png)" in md
    assert "500 MB" in md and "250 MB" in md  # size on disk before / after
    assert "Baseline: w8 on torch" in md


def test_budget_not_met(tmp_path, inputs):
    summary, trials = inputs
    summary.update(met=False, chosen=1, shortfall=0.1, runtime="torch")
    files = write_report(tmp_path, summary, trials)
    md = files["report.md"].read_text()
    assert "w4 + torch on torch: budget NOT met: misses by 2 perplexity" in md  # 23.0 against a threshold of 21.0
    assert "sensitivity.png" not in files and "sensitivity.png" not in md
    assert "| 1 | w4 + torch | torch | complete, chosen |" in md


def test_only_failed_trials(tmp_path, inputs):
    summary, trials = inputs
    failed = [
        dict(
            t,
            status="failed",
            quality=None,
            quality_drop=None,
            meets_budget=None,
            objective=None,
            size_bytes=None,
            recipe=None,
            reason="ValueError: nope",
        )
        for t in trials
    ]
    summary.update(
        chosen=None, after=None, met=False, shortfall=None, runtime=None, pareto=[], baseline=None, why="No trial completed."
    )
    files = write_report(tmp_path, summary, failed, None)
    assert set(files) == {"report.md", "report.html", "pareto.png", "pareto_size.png"}
    md = files["report.md"].read_text()
    assert "NOT met" in md and "No recipe was chosen." in md
    assert md.count("ValueError: nope") == len(failed)
    assert all(img.startswith(PNG) for img in _images(files["report.html"].read_text()))
    _no_temp_files(tmp_path)


def test_rewrite_and_sparse_inputs(tmp_path, inputs):
    summary, trials = inputs
    write_report(tmp_path, summary, trials)
    bare = {"metric": "accuracy", "met": False, "budget": None, "before": None}
    files = write_report(tmp_path, bare, [{"status": "running"}], {"a": None, "b": float("nan")})
    assert "NOT met" in files["report.md"].read_text() and "sensitivity.png" not in files
    _no_temp_files(tmp_path)


def test_failed_write_leaves_no_temp_file(tmp_path, inputs, monkeypatch):
    summary, trials = copy.deepcopy(inputs)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("leanml.report.render.os.replace", boom)
    with pytest.raises(OSError):
        write_report(tmp_path, summary, trials)
    assert list(tmp_path.iterdir()) == []


def test_number_formats():
    assert fmt(None) == "-" and fmt(float("nan")) == "-" and fmt(0.123456) == "0.1235" and fmt(123456.7) == "123,457"
    assert fmt(12.5, "ms") == "12.5 ms"
    assert fmt_bytes(999) == "999 B" and fmt_bytes(1_234_567) == "1.235 MB" and fmt_bytes(2.5e9) == "2.5 GB"
