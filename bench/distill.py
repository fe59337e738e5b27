"""Distillation benchmark: students built from their teachers, distilled vs trained without a teacher,
and data selection, with the wall-clock time of every run on this machine.

Sections (each can run alone; results of earlier runs of the other sections are kept in the JSON):

* ``encoder``  - MiniLM-L6 → 3-layer student (teacher layers 2, 4, 6) distilled on enwiki text without labels;
  Spearman on lee-sim and measured speed (batch 50 × 128 tokens) against the teacher;
* ``digits``   - a CNN teacher trained on digits, a student with ≥ 4× fewer parameters trained on labels alone vs
  distilled (Hinton KD), mean over 3 seeds; and the data-selection ablation (full data, the hardest half by
  teacher loss, the same half as a curriculum, a random half; same steps);
* ``llm-ffn``  - SmolLM2-135M after ``ffn-25``, recovered by distillation from the dense model on enwiki;
* ``llm-layers`` - SmolLM2-135M → 24 layers (6 dropped by block influence), logit + hidden distillation on
  enwiki vs the same student trained with the plain language-model loss for the same steps.
"""

from __future__ import annotations

# isort: off
import _common  # noqa: F401  (first: fixes the import path and the environment)
# isort: on

import argparse
import copy
import json
import statistics
import time

import torch

import leanml
from _common import RESULTS, digits_cnn, md_table, write_results
from leanml.distill import Distill
from leanml.measure import evaluate
from leanml.measure.profile import host_info
from leanml.models import ModelHandle
from leanml.pipeline import apply_recipe
from leanml.recipe import Recipe, load_recipe
from rt_cnn import timing_interleaved

MODEL = "smollm2-135m"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 1)


# ----------------------------------------------------------------------------------------------------
# MiniLM
# ----------------------------------------------------------------------------------------------------


def encoder(args, wiki) -> dict:
    sim = leanml.load_data("lee-sim")
    teacher = leanml.load("minilm-l6")
    cfg = Distill(
        student=args.enc_student, loss="kd+hidden", steps=args.enc_steps, batch_size=32, lr=args.enc_lr, warmup=0.05, seed=0
    )
    student, seconds = timed(lambda: leanml.distill(teacher, cfg, wiki))
    report = student.meta["reports"]["distill.json"]
    batch = dict(teacher.tokenizer(sim.texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    with torch.no_grad():
        times = timing_interleaved(
            {"teacher": lambda: teacher.module(**batch), "student": lambda: student.module(**batch)}, 2, args.repeats
        )
    rows = []
    for name, h, secs in (("teacher (6 layers)", teacher, 0.0), (f"student {cfg.student} + {cfg.steps} steps", student, seconds)):
        key = "teacher" if h is teacher else "student"
        rows.append(
            {
                "model": name,
                "spearman": round(evaluate(h, sim)["value"], 4),
                "params": sum(p.numel() for p in h.module.parameters()),
                "batch50x128_p50_ms": times[key]["p50_ms"],
                "spread_ms": [times[key]["min_ms"], times[key]["max_ms"]],
                "seconds": secs,
            }
        )
        print(rows[-1], flush=True)
    t, s = rows
    s["spearman_delta"] = round(s["spearman"] - t["spearman"], 4)
    s["speedup"] = round(t["batch50x128_p50_ms"] / s["batch50x128_p50_ms"], 3)
    return {
        "rows": rows,
        "config": cfg.model_dump(),
        "train_items": report.get("dedup"),
        "layer_sources": report["layer_sources"],
        "loss_first_last": [report["first_loss"], report["last_loss"]],
        "targets": {
            "spearman at most 0.02 below the teacher": s["spearman_delta"] >= -0.02,
            "speed-up >= 1.8x": s["speedup"] >= 1.8,
        },
    }


# ----------------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------------


def student_cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 12, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(12, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def digits(args) -> dict:
    data = leanml.load_data("digits")
    teacher = ModelHandle(module=digits_cnn(), task="generic", name="digits-teacher")
    train_cfg = Distill(loss="task", steps=600, batch_size=64, lr=3e-3, warmup=0.05, seed=0, dedup=False)
    _, t_seconds = timed(lambda: leanml.distill(teacher, train_cfg, data, student=teacher.module))
    teacher.module.eval()
    t_acc = evaluate(teacher, data)["value"]
    print({"teacher_accuracy": t_acc, "params": _params(teacher.module), "seconds": t_seconds}, flush=True)

    def run(loss: str, seed: int, **kw) -> tuple[float, float]:
        cfg = Distill(
            loss=loss,
            steps=args.digit_steps,
            batch_size=64,
            lr=args.digit_lr,
            warmup=0.05,
            seed=seed,
            temperature=4.0,
            alpha=0.3,
            **kw,
        )
        student, seconds = timed(lambda: leanml.distill(teacher, cfg, data, student=student_cnn(seed)))
        student.module.eval()
        return evaluate(student, data)["value"], seconds

    variants = {"labels only": ("task", {}), "distilled (Hinton KD, T=4, alpha=0.3)": ("kd+task", {})}
    selection = {
        "full data": {},
        "hardest half (teacher loss)": {"select_fraction": 0.5, "select_by": "hard"},
        "hardest half as a curriculum": {"select_fraction": 0.5, "select_by": "curriculum"},
        "easiest half": {"select_fraction": 0.5, "select_by": "easy"},
        "random half": {"select_fraction": 0.5, "select_by": "random"},
    }
    seeds = list(range(args.seeds))
    rows, sel_rows = [], []
    for name, (loss, kw) in variants.items():
        accs, secs = zip(*[run(loss, s, **kw) for s in seeds], strict=True)
        rows.append(
            {
                "student": name,
                "accuracy_mean": round(statistics.mean(accs), 4),
                "accuracy_per_seed": [round(a, 4) for a in accs],
                "seconds_mean": round(statistics.mean(secs), 1),
            }
        )
        print(rows[-1], flush=True)
    for name, kw in selection.items():
        accs, secs = zip(*[run("kd+task", s, **kw) for s in seeds], strict=True)
        sel_rows.append(
            {
                "training data": name,
                "accuracy_mean": round(statistics.mean(accs), 4),
                "accuracy_per_seed": [round(a, 4) for a in accs],
                "seconds_mean": round(statistics.mean(secs), 1),
            }
        )
        print(sel_rows[-1], flush=True)
    full = sel_rows[0]["accuracy_mean"]
    rand = next(r for r in sel_rows if r["training data"] == "random half")["accuracy_mean"]
    best_half = max(
        (r for r in sel_rows[1:] if r["training data"] != "random half" and r["training data"] != "easiest half"),
        key=lambda r: r["accuracy_mean"],
    )
    return {
        "teacher": {"accuracy": round(t_acc, 4), "params": _params(teacher.module), "seconds": t_seconds},
        "student_params": _params(student_cnn(0)),
        "param_ratio": round(_params(teacher.module) / _params(student_cnn(0)), 2),
        "steps": args.digit_steps,
        "seeds": seeds,
        "rows": rows,
        "selection": sel_rows,
        "targets": {
            "student >= 4x fewer parameters": _params(teacher.module) >= 4 * _params(student_cnn(0)),
            "distilled > labels only (mean of seeds)": rows[1]["accuracy_mean"] > rows[0]["accuracy_mean"],
            f"selected half ({best_half['training data']}) within 2% of full data": best_half["accuracy_mean"] >= 0.98 * full,
            "selected half beats a random half": best_half["accuracy_mean"] > rand,
        },
    }


# ----------------------------------------------------------------------------------------------------
# SmolLM2
# ----------------------------------------------------------------------------------------------------


def llm_ffn(args, lee, wiki) -> dict:
    dense_ppl = evaluate(leanml.load(MODEL), lee)["value"]
    pruned = leanml.load(MODEL)
    _, p_seconds = timed(lambda: apply_recipe(pruned, "ffn-25", wiki))
    pruned_ppl = evaluate(pruned, lee)["value"]
    rows = [
        {"model": "dense", "perplexity": round(dense_ppl, 3), "seconds": 0.0},
        {"model": "ffn-25 (no recovery)", "perplexity": round(pruned_ppl, 3), "seconds": p_seconds},
    ]
    print(rows, flush=True)
    tuned = leanml.load(MODEL)
    step = Distill(loss="kd", steps=args.ffn_steps, batch_size=4, window=256, lr=args.ffn_lr, temperature=1.0)
    recipe = Recipe(name="ffn-25+distill", steps=[*load_recipe("ffn-25").steps, step])
    _, seconds = timed(lambda: apply_recipe(tuned, recipe, wiki))
    ppl = evaluate(tuned, lee)["value"]
    rep = tuned.meta["reports"]["distill.json"]
    rows.append(
        {
            "model": f"ffn-25 + {args.ffn_steps} distillation steps",
            "perplexity": round(ppl, 3),
            "seconds": seconds,
            "loss_first_last": [rep["first_loss"], rep["last_loss"]],
        }
    )
    print(rows[-1], flush=True)
    recovered = (pruned_ppl - ppl) / (pruned_ppl - dense_ppl)
    return {
        "rows": rows,
        "config": step.model_dump(),
        "recovered_fraction": round(recovered, 3),
        "targets": {"recovers >= half of the perplexity lost": recovered >= 0.5},
    }


def llm_layers(args, lee, wiki) -> dict:
    teacher = leanml.load(MODEL)
    t_ppl = evaluate(teacher, lee)["value"]
    rows = [{"model": "teacher (30 layers)", "perplexity": round(t_ppl, 3), "seconds": 0.0}]
    spec = "drop-layers:6:influence"
    base, _ = leanml.distill.build_student(teacher, spec, wiki)
    rows.append({"model": f"student {spec}, untrained", "perplexity": round(evaluate(base, lee)["value"], 3), "seconds": 0.0})
    print(rows, flush=True)
    del base
    for label, loss in (("plain LM loss", "task"), ("logit + hidden distillation", "kd+hidden")):
        cfg = Distill(
            student=spec,
            loss=loss,
            steps=args.llm_steps,
            batch_size=4,
            window=256,
            lr=args.llm_lr,
            temperature=1.0,
            hidden_weight=0.5,
            top_k=None,
        )
        student, seconds = timed(lambda c=cfg: leanml.distill(teacher, c, wiki))
        rows.append(
            {
                "model": f"student + {args.llm_steps} steps, {label}",
                "perplexity": round(evaluate(student, lee)["value"], 3),
                "seconds": seconds,
                "params": sum(p.numel() for p in student.module.parameters()),
            }
        )
        print(rows[-1], flush=True)
        del student
    best = rows[-1]
    return {
        "rows": rows,
        "steps": args.llm_steps,
        "lr": args.llm_lr,
        "targets": {
            "distilled <= 1.3x teacher perplexity": best["perplexity"] <= 1.3 * t_ppl,
            "distilled run within 45 minutes": best["seconds"] <= 45 * 60,
            "distilled beats plain LM loss": best["perplexity"] < rows[-2]["perplexity"],
        },
    }


# ----------------------------------------------------------------------------------------------------


def markdown(payload: dict) -> str:
    md = [
        f"Measured on {payload['host']['cpu']} ({payload['host']['cores']} cores), {payload['threads']} threads; "
        "seconds = wall-clock of the run.\n"
    ]
    sec = payload["sections"]
    if "encoder" in sec:
        e = sec["encoder"]
        md += [
            "### MiniLM-L6 → 3 layers, distilled on enwiki (no labels)\n",
            md_table(
                ["model", "lee-sim Spearman", "params", "batch 50×128 p50 ms", "speed-up", "seconds"],
                [
                    [
                        r["model"],
                        r["spearman"],
                        f"{r['params'] / 1e6:.1f} M",
                        r["batch50x128_p50_ms"],
                        r.get("speedup", 1.0),
                        r["seconds"],
                    ]
                    for r in e["rows"]
                ],
            ),
        ]
    if "digits" in sec:
        d = sec["digits"]
        md += [
            f"### digits: teacher CNN ({d['teacher']['params']:,} params, accuracy {d['teacher']['accuracy']}) → "
            f"student ({d['student_params']:,} params, {d['param_ratio']}× fewer), {d['steps']} steps, "
            f"mean of {len(d['seeds'])} seeds\n",
            md_table(
                ["student", "accuracy (mean)", "per seed", "seconds per run"],
                [[r["student"], r["accuracy_mean"], r["accuracy_per_seed"], r["seconds_mean"]] for r in d["rows"]],
            ),
            "\nData selection (distilled student, same steps):\n\n",
            md_table(
                ["training data", "accuracy (mean)", "per seed", "seconds per run"],
                [[r["training data"], r["accuracy_mean"], r["accuracy_per_seed"], r["seconds_mean"]] for r in d["selection"]],
            ),
        ]
    if "llm-ffn" in sec:
        f = sec["llm-ffn"]
        md += [
            f"### SmolLM2-135M after ffn-25, recovered by distillation (recovered {f['recovered_fraction']:.0%} of the "
            "perplexity lost)\n",
            md_table(["model", "Lee perplexity", "seconds"], [[r["model"], r["perplexity"], r["seconds"]] for r in f["rows"]]),
        ]
    if "llm-layers" in sec:
        s = sec["llm-layers"]
        md += [
            "### SmolLM2-135M → 24 layers (6 dropped by block influence)\n",
            md_table(["model", "Lee perplexity", "seconds"], [[r["model"], r["perplexity"], r["seconds"]] for r in s["rows"]]),
        ]
    targets = {f"{name}: {k}": v for name, s in sec.items() for k, v in s.get("targets", {}).items()}
    md += ["\nTargets: " + "; ".join(f"{k} — {'met' if v else 'MISSED'}" for k, v in targets.items()) + "\n"]
    return "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["encoder", "digits", "llm-ffn", "llm-layers"],
        choices=["encoder", "digits", "llm-ffn", "llm-layers"],
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--enc-student", default="drop-layers:3:every")
    parser.add_argument("--enc-steps", type=int, default=600)
    parser.add_argument("--enc-lr", type=float, default=2e-4)
    parser.add_argument("--digit-steps", type=int, default=1500)
    parser.add_argument("--digit-lr", type=float, default=1e-2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ffn-steps", type=int, default=150)
    parser.add_argument("--ffn-lr", type=float, default=2e-4)
    parser.add_argument("--llm-steps", type=int, default=400)
    parser.add_argument("--llm-lr", type=float, default=2e-4)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / "distill.json"
    payload = json.loads(path.read_text()) if path.exists() else {"sections": {}}
    payload.update({"host": host_info(), "threads": args.threads})
    lee = leanml.load_data("lee")
    wiki = leanml.load_data("enwiki")
    for name in args.sections:
        fn = {
            "encoder": lambda: encoder(args, wiki),
            "digits": lambda: digits(args),
            "llm-ffn": lambda: llm_ffn(args, lee, wiki),
            "llm-layers": lambda: llm_layers(args, lee, wiki),
        }[name]
        payload["sections"][name] = fn()
        write_results("distill", copy.deepcopy(payload), markdown(payload))


if __name__ == "__main__":
    main()
