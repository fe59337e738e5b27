"""The report's figures as PNG bytes: quality against cost, and per-layer sensitivity.

matplotlib is imported inside the functions, so importing leanml does not import it.
"""

from __future__ import annotations

import io
import math

MAX_LAYERS = 60  # bars in the sensitivity chart

# objective name → how to read it from a Measurement dict
_OBJECTIVE_READERS = {
    "usd": lambda m: m.get("usd_per_million"),
    "latency": lambda m: (m.get("latency_ms") or {}).get("p50"),
    "size": lambda m: m.get("disk_bytes"),
    "energy": lambda m: m.get("energy_j_per_item"),
}


def num(x) -> float | None:
    """``x`` as a finite float, else None."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def objective_of(name: str | None, measurement: dict | None) -> float | None:
    """The objective's value for one Measurement dict (None when it cannot be read)."""
    reader = _OBJECTIVE_READERS.get(name or "")
    return num(reader(measurement)) if reader and measurement else None


def quality_of(measurement: dict | None) -> float | None:
    return num(((measurement or {}).get("quality") or {}).get("value"))


def front_of(points: list[tuple[float, float, dict]], higher_is_better: bool) -> list[tuple[float, float, dict]]:
    """The points no other point beats on both cost (lower) and quality, cheapest first."""
    sign = 1 if higher_is_better else -1
    out: list[tuple[float, float, dict]] = []
    for p in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not out or sign * p[1] > sign * out[-1][1]:
            out.append(p)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def tradeoff_png(summary: dict, trials: list[dict], axis: str = "objective") -> bytes:
    """Quality against the search objective (``axis="objective"``) or against size on disk (``axis="size"``)."""
    objective = summary.get("objective")
    hib = summary.get("higher_is_better", True) is not False
    metric = summary.get("metric") or "quality"
    if axis == "size":
        xlabel, scale, key = "size on disk (MB)", 1e-6, "size_bytes"
        base_x = num((summary.get("before") or {}).get("disk_bytes"))
    else:
        xlabel, key = summary.get("objective_label") or objective or "objective", "objective"
        scale = 1e-6 if objective == "size" else 1.0
        xlabel = "size on disk (MB)" if objective == "size" else xlabel
        base_x = objective_of(objective, summary.get("before"))
    points = []
    for t in trials:
        x, y = num(t.get(key)), num(t.get("quality"))
        if t.get("status") == "complete" and x is not None and y is not None:
            points.append((x * scale, y, t))

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    try:
        for ok, colour, name in ((True, "tab:green", "within budget"), (False, "tab:red", "over budget")):
            sel = [p for p in points if bool(p[2].get("meets_budget")) is ok]
            if sel:
                ax.scatter([p[0] for p in sel], [p[1] for p in sel], c=colour, s=28, alpha=0.8, label=name, zorder=3)
        if axis == "size":
            front = front_of(points, hib)
        else:
            members = set(summary.get("pareto") or [])
            front = sorted((p for p in points if p[2].get("number") in members), key=lambda p: p[0])
        if front:
            ax.step(
                [p[0] for p in front],
                [p[1] for p in front],
                where="post",
                c="tab:blue",
                lw=1.2,
                alpha=0.7,
                label="Pareto front",
                zorder=2,
            )
        number = summary.get("chosen")
        chosen = next((p for p in points if number is not None and p[2].get("number") == number), None)
        if chosen:
            ax.scatter([chosen[0]], [chosen[1]], s=160, facecolors="none", edgecolors="black", lw=1.8, label="chosen", zorder=4)
            ax.annotate(
                str(chosen[2].get("label") or f"trial {chosen[2].get('number')}"),
                (chosen[0], chosen[1]),
                xytext=(10, 10),
                textcoords="offset points",
                fontsize=8,
                arrowprops={"arrowstyle": "-", "color": "black", "lw": 0.8},
            )
        budget = summary.get("budget") or {}
        base_y = num(budget.get("base_selection"))  # the trials' points are selection-split figures
        base_y = quality_of(summary.get("before")) if base_y is None else base_y
        if base_x is not None and base_y is not None:
            ax.scatter(
                [base_x * scale], [base_y], marker="*", s=220, c="gold", edgecolors="black", lw=0.8, label="original", zorder=5
            )
        threshold = num(budget.get("threshold_selection", budget.get("threshold")))
        if threshold is not None:
            ax.axhline(threshold, ls="--", c="gray", lw=1, label="budget threshold")
        xs = [p[0] for p in points] + ([base_x * scale] if base_x is not None else [])
        if xs and min(xs) > 0 and max(xs) / min(xs) > 30:
            ax.set_xscale("log")
        if not points:
            ax.text(0.5, 0.5, "no completed trials", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_xlabel(xlabel + " (lower is better)")
        split = ", selection split" if budget.get("base_selection") is not None else ""
        ax.set_ylabel(f"{metric}{split} ({'higher' if hib else 'lower'} is better)")
        ax.set_title(f"{metric} vs {'size' if axis == 'size' else 'cost'}: {summary.get('model') or 'model'}", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        return _png(fig)
    finally:
        plt.close(fig)


def sensitivity_png(sensitivity: dict[str, float], bits: int | None = None) -> bytes | None:
    """Horizontal bars, one per layer in the given order; only the ``MAX_LAYERS`` most sensitive when there are more."""
    items = [(str(k), v) for k, v in ((k, num(v)) for k, v in (sensitivity or {}).items()) if v is not None]
    if not items:
        return None
    total = len(items)
    if total > MAX_LAYERS:
        keep = {k for k, _ in sorted(items, key=lambda kv: kv[1], reverse=True)[:MAX_LAYERS]}
        items = [kv for kv in items if kv[0] in keep]
    names = [k if len(k) <= 48 else "…" + k[-47:] for k, _ in items]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.2 * len(items) + 1.2)))
    try:
        ax.barh(range(len(items)), [v for _, v in items], color="tab:purple", height=0.7)
        ax.set_yticks(range(len(items)), names, fontsize=7 if len(items) > 30 else 8)
        ax.set_ylim(len(items) - 0.5, -0.5)  # first layer at the top
        rounded = f"rounded to {bits} bits" if bits else "rounded"
        ax.set_xlabel(f"output distance with only that layer {rounded}", fontsize=9)
        title = "per-layer sensitivity"
        if total > len(items):
            title += f" (the {len(items)} most sensitive of {total} layers)"
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        return _png(fig)
    finally:
        plt.close(fig)
