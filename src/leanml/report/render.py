"""The search report: ``report.md`` and a self-contained ``report.html`` with the same content, plus the PNG figures."""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from pathlib import Path

import yaml

from .plots import MAX_LAYERS, num, quality_of, sensitivity_png, tradeoff_png

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.5em 0; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #b42318; font-weight: 600; }
"""


# ---------------------------------------------------------------- numbers


def fmt(x, unit: str = "") -> str:
    """About four significant digits; thousands separators from 10,000 up; ``-`` for missing values."""
    v = num(x)
    if v is None:
        return "-"
    text = f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return f"{text} {unit}" if unit else text


def fmt_bytes(x) -> str:
    v = num(x)
    if v is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(v) < 1000:
            return f"{v:.0f} B" if unit == "B" else f"{v:.4g} {unit}"
        v /= 1000
    return f"{v:.4g} TB"


def fmt_ratio(before, after) -> str:
    a, b = num(before), num(after)
    return f"{b / a:.3g}x" if a and b is not None else "-"


def fmt_drop(x, drop_type: str | None) -> str:
    v = num(x)
    if v is None:
        return "-"
    return f"{v * 100:.3g}%" if drop_type == "relative" else fmt(v)


def fmt_interval(drop, interval: dict | None, drop_type: str | None) -> str:
    """A drop with its interval: ``0.5% [0.1%, 0.9%]``."""
    text = fmt_drop(drop, drop_type)
    if interval and num(interval.get("low")) is not None:
        text += f" [{fmt_drop(interval['low'], drop_type)}, {fmt_drop(interval['high'], drop_type)}]"
    return text


def _yes_no(x) -> str:
    return "-" if x is None else ("yes" if x else "no")


# ---------------------------------------------------------------- content


def cost_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Before/after rows of the cost figures, with the after/before ratio."""
    m0, m1 = summary.get("before") or {}, summary.get("after") or {}
    item = m0.get("item") or m1.get("item") or "item"
    metric = summary.get("metric") or "quality"
    rows = [
        ("latency p50", lambda m: (m.get("latency_ms") or {}).get("p50"), lambda v: fmt(v, "ms")),
        ("latency p95", lambda m: (m.get("latency_ms") or {}).get("p95"), lambda v: fmt(v, "ms")),
        (f"throughput ({item}s per s)", lambda m: m.get("throughput_per_s"), fmt),
        ("peak memory (serving process)", lambda m: (m.get("serving_memory") or {}).get("peak_bytes"), fmt_bytes),
        ("peak memory (measuring process)", lambda m: m.get("peak_memory_bytes"), fmt_bytes),
        ("size on disk", lambda m: m.get("disk_bytes"), fmt_bytes),
        (f"energy per {item} (J)", lambda m: m.get("energy_j_per_item"), fmt),
        (f"$ per million {item}s", lambda m: m.get("usd_per_million"), fmt),
        (f"quality on test ({metric})", quality_of, fmt),
        (f"quality on selection ({metric})", lambda m: (m.get("selection") or {}).get("value"), fmt),
    ]
    after = f"after ({m1.get('runtime') or '-'})" if m1 else "after"
    head = ["", f"before ({m0.get('runtime') or '-'})", after, "after / before"]
    body = []
    for name, get, show in rows:
        a, b = get(m0), (get(m1) if m1 else None)
        body.append([name, show(a), show(b), fmt_ratio(a, b)])
    return head, body


def trials_table(summary: dict, trials: list[dict]) -> tuple[list[str], list[list[str]]]:
    drop_type = (summary.get("budget") or {}).get("drop_type")
    front, chosen = set(summary.get("pareto") or []), summary.get("chosen")
    head = [
        "#",
        "label",
        "runtime",
        "status",
        "selection",
        "drop (90% interval)",
        "meets budget",
        "test",
        "test drop (90% interval)",
        "fidelity",
        "objective",
        "memory",
        "size MB",
        "seconds",
        "reason / flags",
    ]
    body = []
    for t in trials:
        n, status = t.get("number"), t.get("status") or "-"
        if n is not None and n == chosen:
            status += ", chosen"
        elif n is not None and n in front:
            status += ", front"
        size = num(t.get("size_bytes"))
        test = t.get("test") or {}
        m = t.get("measurement") or {}
        peak = (m.get("serving_memory") or {}).get("peak_bytes")
        memory = fmt_bytes(peak) + (" (over limit)" if t.get("memory_ok") is False else "")
        notes = [t.get("reason") or "", test.get("error") or "", *(t.get("flags") or [])]
        body.append(
            [
                str(n if n is not None else "-"),
                t.get("label") or "-",
                t.get("runtime") or "-",
                status,
                fmt(t.get("quality")),
                fmt_interval(t.get("quality_drop"), t.get("drop_interval"), drop_type),
                _yes_no(t.get("meets_budget")),
                fmt(test.get("quality")),
                fmt_interval(test.get("quality_drop"), test.get("drop_interval"), drop_type)
                + ("" if test.get("meets_budget") is None else (" ok" if test["meets_budget"] else " over")),
                fmt(t.get("fidelity_score")),
                fmt(t.get("objective")),
                memory if peak is not None else "-",
                fmt(size / 1e6 if size is not None else None),
                fmt(t.get("seconds")),
                "; ".join(x for x in notes if x),
            ]
        )
    return head, body


def _result_line(summary: dict, chosen: dict | None) -> tuple[str, bool]:
    met = bool(summary.get("met"))
    if chosen is not None:
        name = chosen.get("label") or f"trial {chosen.get('number')}"
        runtime = chosen.get("runtime") or summary.get("runtime")
        head = name if (runtime and name.endswith(f" on {runtime}")) else f"{name} on {runtime}"
    else:
        head = "No model chosen (no trial completed)"
    if met:
        return f"{head}: budget met on the test split.", True
    if summary.get("met_selection"):
        return f"{head}: budget met on the selection split but NOT on the test split.", False
    metric = summary.get("metric") or "quality"
    q = num(((chosen or {}).get("test") or {}).get("quality"))
    q = q if q is not None else num((chosen or {}).get("quality"))
    thr = num((summary.get("budget") or {}).get("threshold"))
    if q is not None and thr is not None:
        miss = f": misses by {fmt(abs(q - thr))} {metric} ({fmt(q)} against a worst allowed {fmt(thr)})"
    elif num(summary.get("shortfall")) is not None:
        miss = f": misses by {fmt(summary['shortfall'])}"
    else:
        miss = ""
    return f"{head}: budget NOT met{miss}.", False


def _blocks(summary: dict, trials: list[dict], images: dict[str, bytes], n_layers: int) -> list[tuple]:
    """The report as a list of blocks: ("h1"|"h2", text), ("p", text[, css class]), ("table", head, rows),
    ("code", text), ("img", file name, alt text)."""
    metric = summary.get("metric") or "quality"
    budget = summary.get("budget") or {}
    number = summary.get("chosen")
    chosen = next((t for t in trials if number is not None and t.get("number") == number), None)
    label = summary.get("objective_label") or summary.get("objective") or "objective"
    result, ok = _result_line(summary, chosen)

    blocks: list[tuple] = [("h1", f"leanml optimize: {summary.get('model') or 'model'} on {summary.get('data') or 'data'}")]
    limit = f" (time budget {fmt(summary['time_budget_s'])} s)" if num(summary.get("time_budget_s")) is not None else ""
    blocks.append(
        (
            "p",
            f"Hardware: {summary.get('hardware') or '-'}. {summary.get('trials_total') or len(trials)} trials "
            f"in {fmt(summary.get('elapsed_s'))} s{limit}.",
        )
    )
    blocks += [("h2", "Result"), ("p", result, "ok" if ok else "bad")]
    budget_text = budget.get("text") or f"max drop {budget.get('max_drop')} ({budget.get('drop_type')})"
    blocks.append(
        ("p", f"Budget: {budget_text} (worst allowed {metric}: {fmt(budget.get('threshold'))}). Objective: minimise {label}.")
    )
    rules = (
        "Candidates are scored on the selection split; a candidate is within the budget only when the upper end of the "
        "90% paired bootstrap interval of its drop is. The test split is scored once, after the search, for the chosen "
        "model and the Pareto front, and the verdict above is given on it."
    )
    if num(summary.get("fidelity_floor")) is not None:
        rules += (
            f" Fidelity guard: {summary.get('fidelity_score') or 'fidelity'} at least {fmt(summary['fidelity_floor'])} "
            "on held-out calibration-domain inputs."
        )
    if num(summary.get("max_memory")) is not None:
        rules += f" Memory limit: {fmt_bytes(summary['max_memory'])} peak for the serving process."
    blocks.append(("p", rules))
    blocks += [("h2", "Cost before and after"), ("table", *cost_table(summary))]
    blocks += [("h2", "Why this one"), ("p", summary.get("why") or "-")]
    base = summary.get("baseline")
    if base:
        text = (
            f"Baseline: {base.get('recipe') or '-'} on {base.get('runtime') or '-'}: {fmt(base.get('objective'))} {label}, "
            f"{metric} {fmt(base.get('quality'))}."
        )
        if chosen is not None and num(chosen.get("objective")) is not None and num(base.get("objective")):
            text += f" The chosen model costs {fmt_ratio(base.get('objective'), chosen.get('objective'))} of the baseline."
        blocks.append(("p", text))
    blocks.append(("h2", "Chosen recipe"))
    if chosen is not None and chosen.get("recipe"):
        recipe = json.loads(json.dumps(chosen["recipe"], default=str))  # plain types only
        blocks.append(("code", yaml.safe_dump(recipe, sort_keys=False)))
    else:
        blocks.append(("p", "No recipe was chosen."))
    blocks += [("h2", f"Trials ({len(trials)})"), ("table", *trials_table(summary, trials))]
    blocks.append(("h2", "Figures"))
    alts = {
        "pareto.png": f"{metric} against {label}",
        "pareto_size.png": f"{metric} against size on disk",
        "sensitivity.png": "per-layer sensitivity",
    }
    for name in images:
        blocks.append(("img", name, alts.get(name, name)))
    if "sensitivity.png" in images and n_layers > MAX_LAYERS:
        blocks.append(("p", f"The sensitivity chart shows the {MAX_LAYERS} most sensitive of {n_layers} layers."))
    return blocks


# ---------------------------------------------------------------- output


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(f"**{rest[0]}**" if len(rest) > 1 else rest[0])
        elif kind == "table":
            head, rows = rest
            lines = ["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "code":
            out.append("```yaml\n" + rest[0].rstrip("\n") + "\n```")
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[tuple], images: dict[str, bytes]) -> str:
    e = html.escape
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f'<p class="{e(rest[1])}">{e(rest[0])}</p>' if len(rest) > 1 else f"<p>{e(rest[0])}</p>")
        elif kind == "table":
            head, rows = rest
            lines = ["<table>", "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead>", "<tbody>"]
            lines += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows]
            out.append("\n".join(lines + ["</tbody>", "</table>"]))
        elif kind == "code":
            out.append(f"<pre><code>{e(rest[0])}</code></pre>")
        elif kind == "img":
            data = base64.b64encode(images[rest[0]]).decode("ascii")
            out.append(f'<img src="data:image/png;base64,{data}" alt="{e(rest[1])}">')
    title = e(blocks[0][1]) if blocks and blocks[0][0] == "h1" else "leanml report"
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(out) + "\n</body>\n</html>\n"
    )


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(folder: Path, summary: dict, trials: list[dict], sensitivity: dict[str, float] | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` (images embedded) and the PNG figures into ``folder``; {file name: path}."""
    folder = Path(folder)
    summary, trials = summary or {}, list(trials or [])
    images = {"pareto.png": tradeoff_png(summary, trials, "objective"), "pareto_size.png": tradeoff_png(summary, trials, "size")}
    if sensitivity:
        png = sensitivity_png(sensitivity, summary.get("sensitivity_bits"))
        if png is not None:
            images["sensitivity.png"] = png
    n_layers = sum(num(v) is not None for v in (sensitivity or {}).values())
    blocks = _blocks(summary, trials, images, n_layers)
    files = {}
    for name, data in images.items():
        files[name] = folder / name
        _write_atomic(files[name], data)
    for name, text in (("report.md", to_markdown(blocks)), ("report.html", to_html(blocks, images))):
        files[name] = folder / name
        _write_atomic(files[name], text.encode("utf-8"))
    return files
