"""`leanml optimize` benchmark: the cheapest model within a quality budget, against the best single
built-in recipe that meets the same budget (measured in the same run, on the same runtime and hardware).

Sections (each can run alone; earlier results of the other sections are kept in the JSON):

* ``smollm2`` - SmolLM2-135M, at most 5% relative perplexity increase on Lee, objective $ per million tokens;
* ``minilm``  - MiniLM-L6, at most 0.01 absolute Spearman drop on lee-sim, objective $ per million sentences.

The search's folders (chosen model, report) go to ``bench/out/optimize-<model>``; the report's text and
plots are copied to ``bench/results/optimize/<model>/``.
"""

from __future__ import annotations

# isort: off
import _common  # noqa: F401  (first: fixes the import path and the environment)
# isort: on

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch

import leanml
from _common import RESULTS, md_table, write_results
from leanml.accelerate.runtimes import prepare
from leanml.measure.profile import host_info
from leanml.measure.quality import evaluate
from leanml.measure.record import write_atomic
from leanml.pipeline import apply_recipe
from leanml.search import Budget, parse_drop
from leanml.search.budget import objective_value, serving_peak
from leanml.search.noise import drop_interval
from leanml.search.study import clone

OUT = Path(__file__).parent / "out"
SECTIONS = {
    "smollm2": {
        "model": "smollm2-135m",
        "data": "lee",
        "max_drop": "5%",
        "drop_type": "relative",
        "builtins": ["w8", "w4-g64", "ffn-25"],
        "max_cost": 0.3,
        "min_candidates": 20,
    },
    "minilm": {
        "model": "minilm-l6",
        "data": "lee-sim",
        "max_drop": "0.01",
        "drop_type": "absolute",
        "builtins": ["int8-dynamic", "int8-static", "w8"],
        "max_cost": 0.4,
        "min_fidelity": 0.95,
    },
}


def best_builtin(spec: dict, budget: Budget, threads: int, hardware: str) -> dict:
    """Each built-in recipe for this kind of model, served on ONNX Runtime and torch, measured like a trial."""
    base = leanml.load(spec["model"])
    data = leanml.load_data(spec["data"])
    before = leanml.profile(base, data=data, hardware=hardware, threads=threads).to_dict()
    q0 = before["quality"]["value"]
    hib = before["quality"].get("higher_is_better", True)
    # judged as the search's choice is: the upper end of the 90% paired bootstrap interval on the test split
    s0 = evaluate(base, data, split="eval", samples=True)["samples"]
    rows, runtimes = [], {}
    for name in spec["builtins"]:
        t0 = time.perf_counter()
        try:
            cand = clone(base)
            apply_recipe(cand, name, data)
        except Exception as exc:  # noqa: BLE001
            rows.append({"recipe": name, "runtime": "-", "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        for rt_name in ("onnxruntime", "torch"):
            try:
                rt = prepare(cand, rt_name, threads=threads, data=data) if rt_name != "torch" else cand
                m = leanml.profile(rt, data=data, hardware=hardware, threads=threads, measure_quality=False).to_dict()
                got = evaluate(rt, data, split="eval", samples=True)
            except Exception as exc:  # noqa: BLE001
                rows.append({"recipe": name, "runtime": rt_name, "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            q = got["value"]
            iv = drop_interval(s0, got["samples"], lambda a, c: budget.drop(a, c, hib))
            rows.append(
                {
                    "recipe": name,
                    "runtime": rt_name,
                    "quality": round(q, 4),
                    "drop": round(budget.drop(q0, q, hib), 5),
                    "interval": [round(iv["low"], 5), round(iv["high"], 5)],
                    "meets": bool(iv["high"] <= budget.max_drop + 1e-12),
                    "usd_per_million": objective_value("usd", m),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(rows[-1], flush=True)
            ok = [r for r in rows if r.get("meets")]
            if rows[-1] in ok and rows[-1] is min(ok, key=lambda r: r["usd_per_million"]):
                runtimes = {"best": rt}  # kept for the head-to-head with the chosen model; the others are freed
    ok = [r for r in rows if r.get("meets")]
    best = min(ok, key=lambda r: r["usd_per_million"]) if ok else None
    return {"before_usd": objective_value("usd", before), "rows": rows, "best": best, "_runtime": runtimes.get("best")}


def head_to_head(chosen_rt, builtin_rt, data, hardware: str, threads: int, rounds: int = 3) -> dict:
    """The chosen model and the best built-in measured alternately, ``rounds`` times each, back to back:
    the search's own figure and the baseline pass were taken minutes apart, and on a shared 2-core
    machine that alone moves a latency by several percent."""
    got: dict[str, list[float]] = {"chosen": [], "builtin": []}
    for _ in range(rounds):
        for key, rt in (("chosen", chosen_rt), ("builtin", builtin_rt)):
            m = leanml.profile(rt, data=data, hardware=hardware, threads=threads).to_dict()
            got[key].append(objective_value("usd", m))
    med = {k: sorted(v)[len(v) // 2] for k, v in got.items()}
    return {"rounds": rounds, "usd_per_million": got, "median": med, "ratio": med["chosen"] / med["builtin"]}


def section(name: str, args) -> dict:
    spec = SECTIONS[name]
    budget = Budget(parse_drop(spec["max_drop"]), spec["drop_type"])
    out = OUT / f"optimize-{spec['model']}"
    t0 = time.perf_counter()
    res = leanml.optimize(
        spec["model"],
        spec["data"],
        budget=budget,
        objective="usd",
        hardware=args.hardware,
        time_budget=getattr(args, f"{name}_time"),
        out=out,
        force=True,
        threads=args.threads,
    )
    seconds = round(time.perf_counter() - t0, 1)
    s = res.summary
    before_usd = objective_value("usd", s["before"])
    chosen = res.chosen
    ratio = chosen["objective"] / before_usd if chosen else None
    copy_to = RESULTS / "optimize" / spec["model"]
    copy_to.mkdir(parents=True, exist_ok=True)
    for f in ("report.md", "report.html", "pareto.png", "pareto_size.png", "sensitivity.png", "recipe.yaml", "summary.json"):
        if (out / f).exists():
            shutil.copy(out / f, copy_to / f)
    base = best_builtin(spec, budget, args.threads, args.hardware) if not args.no_baseline else None
    trials = [
        {
            **{
                k: r.get(k)
                for k in (
                    "number",
                    "label",
                    "status",
                    "reason",
                    "quality",
                    "quality_drop",
                    "meets_budget",
                    "objective",
                    "seconds",
                    "fidelity_score",
                )
            },
            "interval": [(r.get("drop_interval") or {}).get(k) for k in ("low", "high")],
            "test": (r.get("test") or {}).get("quality"),
            "test_interval": [((r.get("test") or {}).get("drop_interval") or {}).get(k) for k in ("low", "high")],
            "memory": ((r.get("measurement") or {}).get("serving_memory") or {}).get("peak_bytes"),
        }
        for r in res.trials
    ]
    before_mem = serving_peak(s["before"])
    mem_ratio = serving_peak(s["after"]) / before_mem if chosen else None
    measured = sum(r["status"] == "complete" for r in res.trials)
    targets = {
        f"cost <= {spec['max_cost']}x fp32 torch eager, within budget on test": bool(
            ratio is not None and s["met"] and ratio <= spec["max_cost"]
        ),
        "peak memory <= 1.0x fp32 torch eager (serving process)": bool(mem_ratio is not None and mem_ratio <= 1.0),
    }
    if spec.get("min_fidelity"):
        targets[f"fidelity >= {spec['min_fidelity']} on held-out text"] = bool(
            chosen and (chosen.get("fidelity_score") or 0) >= spec["min_fidelity"]
        )
    if spec.get("min_candidates"):
        targets[f"at least {spec['min_candidates']} candidates measured"] = measured >= spec["min_candidates"]
    h2h = None
    if base is not None:
        b = base["best"]
        builtin_rt = base.pop("_runtime")
        if chosen and s["met"] and b is not None and builtin_rt is not None and res.handle is not None:
            data = leanml.load_data(spec["data"])
            chosen_rt = (
                res.handle
                if chosen["runtime"] == "torch"
                else prepare(res.handle, chosen["runtime"], threads=args.threads, data=data)
            )
            h2h = head_to_head(chosen_rt, builtin_rt, data, args.hardware, args.threads)
            print({"head_to_head": h2h}, flush=True)
            del chosen_rt, builtin_rt
        # the same 2% measurement tolerance as before, now on figures taken back to back
        in_search = b is None or bool(chosen and chosen["objective"] <= b["usd_per_million"] * 1.02)
        cheap = h2h["ratio"] <= 1.02 if h2h else in_search
        targets["at least as cheap as the best built-in recipe within budget"] = bool(chosen and s["met"] and cheap)
    return {
        "spec": spec,
        "seconds": seconds,
        "time_budget": getattr(args, f"{name}_time"),
        "before_usd": before_usd,
        "before_quality": s["budget"]["base"],
        "chosen": chosen
        and {
            **{k: chosen[k] for k in ("label", "quality", "quality_drop", "objective", "runtime", "fidelity_score")},
            "interval": chosen.get("drop_interval"),
            "test": chosen.get("test"),
        },
        "met": s["met"],
        "met_selection": s.get("met_selection"),
        "cost_ratio": ratio,
        "memory_before": before_mem,
        "memory_ratio": mem_ratio,
        "measured": measured,
        "why": s["why"],
        "trials": trials,
        "baseline": base,
        "head_to_head": h2h,
        "targets": targets,
    }


def markdown(payload: dict) -> str:
    md = [
        f"Measured on {payload['host']['cpu']} ({payload['host']['cores']} cores), {payload['threads']} threads, "
        f"priced as {payload['hardware']}.\n"
    ]
    for sec in payload["sections"].values():
        spec = sec["spec"]
        c = sec["chosen"] or {}
        if "before_quality" not in sec:  # a section written before the test split existed
            md.append(f"### {spec['model']}: measured by an earlier version of this benchmark; run its section again\n")
            continue
        md.append(
            f"### {spec['model']} on {spec['data']}: max drop {spec['max_drop']} ({spec['drop_type']}), "
            f"objective $ per million items, time budget {sec['time_budget']}\n"
        )
        test = c.get("test") or {}
        md.append(
            f"Chosen: **{c.get('label', '-')}**: on the test split {spec['data']} quality {_f(test.get('quality'))} "
            f"(original {sec['before_quality']:.4g}), drop {_iv(test.get('quality_drop'), test.get('drop_interval'))}, "
            f"{'within' if sec['met'] else 'NOT within'} the budget; on the selection split {_f(c.get('quality'))}, "
            f"drop {_iv(c.get('quality_drop'), c.get('interval'))}; fidelity {_f(c.get('fidelity_score'))}; "
            f"cost {_f(c.get('objective'))} vs {sec['before_usd']:.4g} $/M = **{(sec['cost_ratio'] or float('nan')):.3f}×** "
            f"the fp32 torch-eager model; peak memory of the serving process "
            f"**{(sec.get('memory_ratio') or float('nan')):.2f}×** "
            f"({_f((sec.get('memory_before') or 0) / 1e9)} GB for fp32 torch); "
            f"{sec.get('measured', '-')} candidates measured; search wall-clock {sec['seconds']:.0f} s.\n"
        )
        md.append(
            md_table(
                [
                    "trial",
                    "candidate",
                    "status",
                    "selection",
                    "drop [90%]",
                    "test",
                    "test drop [90%]",
                    "fidelity",
                    "$ / M",
                    "memory GB",
                    "seconds",
                    "reason",
                ],
                [
                    [
                        t["number"],
                        t["label"],
                        t["status"],
                        _f(t["quality"]),
                        _iv(t["quality_drop"], dict(zip(("low", "high"), t["interval"], strict=True))),
                        _f(t.get("test")),
                        _iv(None, dict(zip(("low", "high"), t["test_interval"], strict=True))) if t.get("test") else "-",
                        _f(t.get("fidelity_score")),
                        _f(t["objective"]),
                        _f(t["memory"] / 1e9) if t.get("memory") else "-",
                        t["seconds"],
                        (t["reason"] or "")[:80],
                    ]
                    for t in sec["trials"]
                ],
            )
        )
        if sec.get("baseline"):
            b = sec["baseline"]
            md.append("\nBuilt-in recipes, same measurement, judged like the choice (upper end of the test interval):\n")
            md.append(
                md_table(
                    ["recipe", "runtime", "test quality", "test drop [90%]", "meets budget", "$ / M", "× fp32"],
                    [
                        [
                            r["recipe"],
                            r["runtime"],
                            _f(r.get("quality")),
                            _iv(r.get("drop"), dict(zip(("low", "high"), r["interval"], strict=True)))
                            if r.get("interval")
                            else _f(r.get("drop")),
                            r.get("meets", r.get("error")),
                            _f(r.get("usd_per_million")),
                            _f(r["usd_per_million"] / b["before_usd"]) if r.get("usd_per_million") else "-",
                        ]
                        for r in b["rows"]
                    ],
                )
            )
            best = b["best"]
            md.append(
                f"\nBest built-in within budget: {best['recipe']} on {best['runtime']} at {best['usd_per_million']:.4g} $/M\n"
                if best
                else "\nNo built-in recipe met the budget.\n"
            )
        if sec.get("head_to_head"):
            h = sec["head_to_head"]
            md.append(
                f"Head to head (measured alternately, {h['rounds']} times each, medians): chosen "
                f"{h['median']['chosen']:.4g} $/M vs best built-in {h['median']['builtin']:.4g} $/M = "
                f"**{h['ratio']:.3f}×**\n"
            )
    targets = {f"{n}: {k}": v for n, s in payload["sections"].items() if "before_quality" in s for k, v in s["targets"].items()}
    md.append("\nTargets: " + "; ".join(f"{k} — {'met' if v else 'MISSED'}" for k, v in targets.items()) + "\n")
    return "\n".join(md)


def _iv(drop, interval) -> str:
    interval = interval or {}
    lo, hi = interval.get("low"), interval.get("high")
    head = _f(drop) if drop is not None else ""
    return f"{head} [{_f(lo)}, {_f(hi)}]".strip() if lo is not None else (head or "-")


def _f(x):
    return "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hardware", default="aws-c6i.large")
    parser.add_argument("--smollm2-time", dest="smollm2_time", default="15m")
    parser.add_argument("--minilm-time", dest="minilm_time", default="15m")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / "optimize.json"
    payload = json.loads(path.read_text()) if path.exists() else {"sections": {}}
    # sections an earlier version of this benchmark wrote (no test split, no memory) are dropped, not shown
    payload["sections"] = {k: v for k, v in payload.get("sections", {}).items() if "memory_ratio" in v}
    payload.update({"host": host_info(), "threads": args.threads, "hardware": args.hardware})
    for name in args.sections:
        payload["sections"][name] = section(name, args)
        write_atomic(path, json.dumps(payload, indent=2) + "\n")  # the figures first, whatever the table does
        write_results("optimize", copy.deepcopy(payload), markdown(payload))


if __name__ == "__main__":
    main()
