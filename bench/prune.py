"""Benchmark: leanml's pruning side by side with the peers, in one run.

Sections (``--sections``):
* ``llm`` - SmolLM2-135M, perplexity on the Lee corpus (first 8,192 tokens, 512-token windows),
  calibration after token 16,384, every linear layer except ``lm_head``: 50% unstructured by magnitude
  (leanml and the peer ``torch.nn.utils.prune.l1_unstructured``), Wanda and SparseGPT; 2:4 by Wanda and
  SparseGPT. Sparse storage (bitmask + values) vs dense and an exact reload; decode speed of the
  50%-sparse model measured (dense kernels: no speed-up is expected, and none is claimed).
* ``llm-structured`` - SmolLM2 with 25% of FFN neurons removed (recipe ``ffn-25``), before and after a
  short distillation fine-tune on the enwiki training text: perplexity, parameters, decode speed.
* ``encoder`` - MiniLM-L6 with 50% of FFN neurons removed, recovered by distillation on enwiki: Spearman.
* ``cnn`` - a digits CNN with 50% of conv filters removed and fine-tuned (accuracy), and a ResNet-style
  CNN (224x224, batch 8) with 50% of filters removed: measured latency; the Torch-Pruning peer when it
  is installed.

Writes bench/results/prune.json and prune.md.

    python bench/prune.py [--sections llm llm-structured encoder cnn] [--threads 2] [--quick]
"""

from __future__ import annotations

# isort: off
import _common  # noqa: F401  (first: fixes the import path and the environment)
# isort: on

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

import leanml
from _common import RESULTS, md_table, write_results
from leanml.artifact import load_artifact, save_artifact
from leanml.data import TensorData
from leanml.measure import evaluate, profile
from leanml.measure.cost import sparse_accounting
from leanml.measure.profile import host_info
from leanml.pipeline import apply_recipe
from leanml.prune import Prune
from leanml.recipe import Recipe

MODEL = "smollm2-135m"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 1)


def torch_prune_peer(handle, amount: float) -> None:
    """The peer: torch.nn.utils.prune's L1 unstructured pruning of every linear layer but lm_head."""
    import torch.nn.utils.prune as tprune

    for name, module in handle.module.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            tprune.l1_unstructured(module, "weight", amount=amount)
            tprune.remove(module, "weight")
    handle.meta["modified"] = True


def decode_speed(handle, lee, threads: int, repeats: int) -> dict:
    m = profile(handle, data=lee, threads=threads, repeats=repeats, measure_quality=False)
    return {
        "decode_tok_s": round(m.decode_tokens_per_s, 2),
        "prefill_tok_s": round(m.prefill_tokens_per_s, 1),
        "decode_p50_ms": m.latency_ms["p50"],
        "decode_spread_ms": [m.latency_ms.get("min"), m.latency_ms["p95"]],
        "params": m.params,
    }


def llm_unstructured(args, lee) -> dict:
    dense = leanml.load(MODEL)
    fp32_ppl = evaluate(dense, lee)["value"]
    rows = [{"method": "dense fp32", "tool": "-", "pattern": "-", "perplexity": round(fp32_ppl, 3), "seconds": 0.0}]
    print(rows[-1], flush=True)
    plans = [
        ("magnitude (layer-wise)", "leanml", "50%", [Prune(method="magnitude", sparsity=0.5)]),
        ("magnitude (layer-wise) torch.nn.utils.prune", "peer", "50%", None),
        ("wanda", "leanml", "50%", [Prune(method="wanda", sparsity=0.5, calib_windows=args.calib)]),
        ("sparsegpt, own-output targets", "leanml", "50%", [Prune(method="sparsegpt", sparsity=0.5)]),
        ("sparsegpt, dense targets (recipe sparse-50)", "leanml", "50%", "sparse-50"),
        ("wanda", "leanml", "2:4", [Prune(method="wanda", pattern="2:4", calib_windows=args.calib)]),
        ("sparsegpt, dense targets (recipe sparse-2of4)", "leanml", "2:4", "sparse-2of4"),
    ]
    best50 = None
    for label, tool, pattern, recipe in plans:
        handle = leanml.load(MODEL)
        if recipe is None:
            _, seconds = timed(lambda h=handle: torch_prune_peer(h, 0.5))
        else:
            _, seconds = timed(lambda h=handle, r=recipe: apply_recipe(h, r, lee))
        ppl = evaluate(handle, lee)["value"]
        row = {"method": label, "tool": tool, "pattern": pattern, "perplexity": round(ppl, 3), "seconds": seconds}
        acc = sparse_accounting(handle.module)
        if acc:
            row["sparsity"] = acc["sparsity"]
        rows.append(row)
        print(row, flush=True)
        if pattern == "50%" and tool == "leanml" and (best50 is None or ppl < best50[0]):
            best50 = (ppl, label, handle)
        del handle
    # storage and measured speed of the best 50% model
    ppl, label, best = best50
    acc = sparse_accounting(best.module)
    with tempfile.TemporaryDirectory() as tmp:
        save_artifact(best, f"{tmp}/m", recipe=Recipe(name="best50", steps=[]), force=True)
        again = load_artifact(f"{tmp}/m")
        ids = lee.windows(best.tokenizer, "eval", 128, limit=1)[0][None]
        with torch.no_grad():
            exact = bool(torch.equal(best.module(input_ids=ids).logits, again.module(input_ids=ids).logits))
        file_bytes = (Path(tmp) / "m" / "model.safetensors").stat().st_size
    dense_file = _safetensors_bytes(dense)
    storage = {
        "model": label,
        "sparse_layers_dense_bytes": acc["dense_bytes"],
        "sparse_layers_stored_bytes": acc["stored_bytes"],
        "stored_vs_dense": acc["stored_vs_dense"],
        "reload_logits_identical": exact,
        "file_bytes": file_bytes,
        "dense_file_bytes": dense_file,
        "file_vs_dense": round(file_bytes / dense_file, 4),
    }
    speed = {
        "dense": decode_speed(dense, lee, args.threads, args.repeats),
        "sparse-50": decode_speed(best, lee, args.threads, args.repeats),
    }
    speed["sparse_vs_dense_decode"] = round(speed["sparse-50"]["decode_tok_s"] / speed["dense"]["decode_tok_s"], 3)
    by = {(r["method"], r["pattern"]): r["perplexity"] for r in rows}
    best24 = min(v for (m, p), v in by.items() if p == "2:4")
    targets = {
        "best 50% unstructured ppl <= 50": ppl <= 50,
        "best 2:4 ppl <= 120": best24 <= 120,
        "stored weights <= 0.6x dense": acc["stored_vs_dense"] <= 0.6,
        "reload exact": exact,
    }
    return {"rows": rows, "storage": storage, "speed": speed, "targets": targets}


def _safetensors_bytes(handle) -> int:
    from leanml.measure.cost import disk_bytes

    h = copy.copy(handle)
    h.meta = {**handle.meta, "modified": True}
    return disk_bytes(h)[0]


def llm_table(sec: dict) -> str:
    rows = [
        [r["method"], r["tool"], r["pattern"], f"{r['perplexity']:.2f}", r.get("sparsity", "–"), r["seconds"]]
        for r in sec["rows"]
    ]
    st, sp = sec["storage"], sec["speed"]
    out = md_table(["method", "tool", "pattern", "Lee perplexity", "sparsity", "seconds"], rows)
    out += (
        f"\nStorage of the best 50% model ({st['model']}): pruned layers {st['stored_vs_dense']:.3f}x their dense "
        f"bytes (bitmask + values); whole safetensors file {st['file_vs_dense']:.3f}x the dense file "
        f"(embeddings stay dense); reload gives identical logits: {st['reload_logits_identical']}.\n"
        f"Measured decode (dense kernels, {sec.get('threads', '?')} threads): dense {sp['dense']['decode_tok_s']} tok/s, "
        f"50% sparse {sp['sparse-50']['decode_tok_s']} tok/s ({sp['sparse_vs_dense_decode']}x): unstructured "
        "sparsity saves storage, not time, on dense kernels.\n"
    )
    return out


# ----------------------------------------------------------------------------------------------------
# Structured
# ----------------------------------------------------------------------------------------------------


def llm_structured(args, lee, wiki) -> dict:
    """ffn-25 on SmolLM2, then distillation from the dense model on enwiki (masks: none, shapes shrank)."""
    from leanml.prune import Finetune
    from leanml.recipe import load_recipe

    dense = leanml.load(MODEL)
    rows = [
        {
            "model": "dense",
            "perplexity": round(evaluate(dense, lee)["value"], 3),
            "seconds": 0.0,
            **decode_speed(dense, lee, args.threads, args.repeats),
        }
    ]
    print(rows[-1], flush=True)
    pruned = leanml.load(MODEL)
    _, seconds = timed(lambda: apply_recipe(pruned, "ffn-25", wiki))
    rows.append(
        {
            "model": "ffn-25 (no recovery)",
            "perplexity": round(evaluate(pruned, lee)["value"], 3),
            "seconds": seconds,
            **decode_speed(pruned, lee, args.threads, args.repeats),
        }
    )
    print(rows[-1], flush=True)
    tuned = leanml.load(MODEL)
    steps = 10 if args.quick else args.ft_steps
    recipe = Recipe(
        name="ffn-25+ft",
        steps=[*load_recipe("ffn-25").steps, Finetune(steps=steps, lr=1e-4, batch_size=4, window=256, loss="distill")],
    )
    _, seconds = timed(lambda: apply_recipe(tuned, recipe, wiki))
    ft = tuned.meta["reports"]["finetune.json"]
    rows.append(
        {
            "model": f"ffn-25 + {steps} distillation steps on enwiki",
            "perplexity": round(evaluate(tuned, lee)["value"], 3),
            "seconds": seconds,
            **decode_speed(tuned, lee, args.threads, args.repeats),
            "finetune_loss_first_last": [ft["first_loss"], ft["last_loss"]],
        }
    )
    print(rows[-1], flush=True)
    base = rows[0]
    for r in rows:
        r["params_vs_dense"] = round(r["params"] / base["params"], 4)
        r["decode_vs_dense"] = round(r["decode_tok_s"] / base["decode_tok_s"], 3)
    return {"rows": rows, "finetune": {"steps": steps, "batch": "4 x 256 tokens", "lr": 1e-4, "loss": "distill"}}


def encoder_structured(args, wiki) -> dict:
    """MiniLM-L6 with 50% of FFN neurons removed, recovered by distillation on enwiki paragraphs."""
    from leanml.prune import Finetune, StructuredPrune

    sim = leanml.load_data("lee-sim")
    dense = leanml.load("minilm-l6")
    batch = {
        k: v
        for k, v in dense.tokenizer(sim.texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt").items()
    }

    def speed(h) -> dict:
        m = profile(h, threads=args.threads, repeats=args.repeats, measure_quality=False)
        with torch.no_grad():
            fns = {"x": lambda: h.module(**batch)}
            from rt_cnn import timing_interleaved

            t = timing_interleaved(fns, 2, args.repeats)["x"]
        return {"params": m.params, "batch50x128_p50_ms": t["p50_ms"], "spread_ms": [t["min_ms"], t["max_ms"]]}

    rows = [{"model": "dense", "spearman": round(evaluate(dense, sim)["value"], 4), "seconds": 0.0, **speed(dense)}]
    print(rows[-1], flush=True)
    prune_step = StructuredPrune(unit="neurons", ratio=0.5, criterion="activation")
    pruned = leanml.load("minilm-l6")
    _, seconds = timed(lambda: apply_recipe(pruned, Recipe(name="ffn-50", steps=[prune_step]), wiki))
    rows.append(
        {
            "model": "50% FFN neurons removed",
            "spearman": round(evaluate(pruned, sim)["value"], 4),
            "seconds": seconds,
            **speed(pruned),
        }
    )
    print(rows[-1], flush=True)
    steps = 10 if args.quick else args.enc_steps
    tuned = leanml.load("minilm-l6")
    recipe = Recipe(
        name="ffn-50+ft", steps=[prune_step, Finetune(steps=steps, lr=1e-4, batch_size=16, window=128, loss="distill")]
    )
    _, seconds = timed(lambda: apply_recipe(tuned, recipe, wiki))
    rows.append(
        {
            "model": f"50% FFN neurons removed + {steps} distillation steps",
            "spearman": round(evaluate(tuned, sim)["value"], 4),
            "seconds": seconds,
            **speed(tuned),
        }
    )
    print(rows[-1], flush=True)
    base = rows[0]
    for r in rows:
        r["spearman_delta"] = round(r["spearman"] - base["spearman"], 4)
        r["speedup"] = round(base["batch50x128_p50_ms"] / r["batch50x128_p50_ms"], 3)
        r["params_vs_dense"] = round(r["params"] / base["params"], 4)
    return {"rows": rows, "targets": {"recovered spearman at most 0.03 below dense": rows[-1]["spearman_delta"] >= -0.03}}


def _train(net, x, y, epochs: int, lr: float = 3e-3, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


def _accuracy(net, x, y) -> float:
    with torch.no_grad():
        return round(float((net(x).argmax(1) == y).float().mean()), 4)


def torch_pruning_peer(model, example, ratio: float, ignored) -> str | None:
    """Torch-Pruning's magnitude pruner on the same model; returns None, or why it could not run."""
    try:
        import torch_pruning as tp
    except ImportError:
        return "torch-pruning is not installed (make bench installs it)"
    try:
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio, ignored_layers=ignored
        )
        pruner.step()
    except Exception as exc:  # noqa: BLE001 - a peer failing is a result, not a crash
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def recover(teacher: torch.nn.Module, student: torch.nn.Module, digits, args) -> None:
    """The same recovery for leanml's and the peer's pruned CNN: Hinton distillation from the dense model
    (alpha 0.3 on the labels, T = 4), AdamW + cosine, ``args.cnn_steps`` steps of 64 images."""
    from leanml.distill import Distill
    from leanml.models import ModelHandle

    cfg = Distill(loss="kd+task", steps=args.cnn_steps, batch_size=64, lr=3e-3, temperature=4.0, alpha=0.3, dedup=False)
    leanml.distill(ModelHandle(module=teacher, task="image-classification", name="dense"), cfg, digits, student=student)
    student.eval()


def cnn_structured(args) -> dict:
    from leanml.measure.cost import count_params
    from leanml.models import ModelHandle
    from rt_cnn import BATCH, SIZE, DigitsNet, images, resnet18, timing_interleaved

    digits = leanml.load_data("digits")
    x, y = digits.tensors("calib")
    xe, ye = digits.tensors("eval")
    torch.manual_seed(0)
    net = DigitsNet()
    epochs = 4 if args.quick else 15
    _train(net, x, y, epochs)
    dense_acc = _accuracy(net, xe, ye)
    from leanml.recipe import load_recipe

    step = load_recipe("filters-50").steps[0]
    rows = [{"model": "digits CNN dense", "tool": "-", "accuracy": dense_acc, "params": count_params(net)}]
    ours = copy.deepcopy(net)
    handle = ModelHandle(module=ours, task="image-classification", name="digits-cnn")
    apply_recipe(handle, Recipe(name="filters-50", steps=[step]), digits)
    rows.append(
        {
            "model": "50% filters removed",
            "tool": "leanml",
            "accuracy": _accuracy(handle.module, xe, ye),
            "params": count_params(handle.module),
        }
    )
    recover(net, handle.module, digits, args)
    rows.append(
        {
            "model": f"50% filters removed + {args.cnn_steps} distillation steps",
            "tool": "leanml",
            "accuracy": _accuracy(handle.module, xe, ye),
            "params": count_params(handle.module),
        }
    )
    peer = copy.deepcopy(net)
    why = torch_pruning_peer(peer, x[:2], 0.5, [peer.head[-1]])
    if why is None:
        rows.append(
            {
                "model": "50% filters removed",
                "tool": "torch-pruning",
                "accuracy": _accuracy(peer, xe, ye),
                "params": count_params(peer),
            }
        )
        recover(net, peer, digits, args)
        rows.append(
            {
                "model": f"50% filters removed + {args.cnn_steps} distillation steps",
                "tool": "torch-pruning",
                "accuracy": _accuracy(peer, xe, ye),
                "params": count_params(peer),
            }
        )
    for r in rows:
        r["accuracy_delta_points"] = round(100 * (r["accuracy"] - dense_acc), 2)
    # ResNet-18-style speed at 224x224, batch 8
    big = resnet18()
    inp = images(BATCH, 7, SIZE)
    small = copy.deepcopy(big)
    h = ModelHandle(module=small, task="image-classification", name="resnet18")
    calib = TensorData(name="images", x=images(32, 8, SIZE))
    apply_recipe(h, Recipe(name="filters-50", steps=[step]), calib)
    fns = {"dense": lambda: big(inp), "leanml 50% filters": lambda: h.module(inp)}
    peer_big = copy.deepcopy(big)
    why_big = torch_pruning_peer(peer_big, inp[:1], 0.5, [peer_big.fc])
    if why_big is None:
        fns["torch-pruning 50% filters"] = lambda: peer_big(inp)
    with torch.no_grad():
        times = timing_interleaved(fns, 2, 5 if args.quick else 15)
    speed = []
    for k, t in times.items():
        mod = {"dense": big, "leanml 50% filters": h.module, "torch-pruning 50% filters": peer_big}[k]
        speed.append({"model": k, **t, "params": count_params(mod), "speedup": round(times["dense"]["p50_ms"] / t["p50_ms"], 3)})
    ours_ft = next(r for r in rows if r["tool"] == "leanml" and "distillation" in r["model"])
    targets = {
        "digits accuracy within 1 point": ours_ft["accuracy_delta_points"] >= -1.0,
        "resnet 50% filters >= 1.6x": speed[1]["speedup"] >= 1.6,
    }
    return {
        "digits": rows,
        "resnet": speed,
        "peer_errors": {"digits": why, "resnet": why_big},
        "batch": [BATCH, 3, SIZE, SIZE],
        "targets": targets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["llm", "llm-structured", "encoder", "cnn"],
        choices=["llm", "llm-structured", "encoder", "cnn"],
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib", type=int, default=64, help="calibration windows of 512 tokens")
    parser.add_argument("--ft-steps", type=int, default=50, help="distillation steps after ffn-25 on SmolLM2")
    parser.add_argument("--enc-steps", type=int, default=300, help="distillation steps for MiniLM")
    parser.add_argument("--cnn-steps", type=int, default=700, help="distillation steps after filters-50 on digits")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps (a smoke run)")
    args = parser.parse_args()
    args.repeats = 3 if args.quick else 10
    torch.set_num_threads(args.threads)
    # sections not run now keep their results from the last run (bench/results/prune.json)
    path = RESULTS / "prune.json"
    payload: dict = json.loads(path.read_text()) if path.exists() else {"sections": {}}
    payload.update({"host": host_info(), "threads": args.threads})
    started = time.time()
    lee = leanml.load_data("lee")
    wiki = leanml.load_data("enwiki") if {"llm-structured", "encoder"} & set(args.sections) else None
    runs = {
        "llm": lambda: llm_unstructured(args, lee),
        "llm-structured": lambda: llm_structured(args, lee, wiki),
        "encoder": lambda: encoder_structured(args, wiki),
        "cnn": lambda: cnn_structured(args),
    }
    for name in args.sections:
        sec = runs[name]()
        sec["threads"] = args.threads
        payload["sections"][name] = sec
    payload["seconds"] = round(time.time() - started, 1)
    write_results("prune", payload, markdown(payload))


def markdown(payload: dict) -> str:
    md = [f"Measured on {payload['host']['cpu']} ({payload['host']['cores']} cores), {payload['threads']} threads.\n"]
    sections = payload["sections"]
    if "llm" in sections:
        md += ["### SmolLM2-135M: unstructured and 2:4 sparsity\n", llm_table(sections["llm"])]
    if "llm-structured" in sections:
        sec = sections["llm-structured"]
        md += [
            "### SmolLM2-135M: 25% of FFN neurons removed (structured)\n",
            md_table(
                ["model", "Lee perplexity", "params", "× dense", "decode tok/s", "× dense", "seconds"],
                [
                    [
                        r["model"],
                        f"{r['perplexity']:.2f}",
                        f"{r['params'] / 1e6:.1f} M",
                        r["params_vs_dense"],
                        r["decode_tok_s"],
                        r["decode_vs_dense"],
                        r["seconds"],
                    ]
                    for r in sec["rows"]
                ],
            ),
        ]
    if "encoder" in sections:
        sec = sections["encoder"]
        md += [
            "### MiniLM-L6: 50% of FFN neurons removed (structured)\n",
            md_table(
                ["model", "lee-sim Spearman", "Δ vs dense", "params", "batch 50×128 p50 ms (min–max)", "speed-up", "seconds"],
                [
                    [
                        r["model"],
                        r["spearman"],
                        r["spearman_delta"],
                        f"{r['params'] / 1e6:.1f} M",
                        f"{r['batch50x128_p50_ms']} ({r['spread_ms'][0]}–{r['spread_ms'][1]})",
                        f"{r['speedup']}×",
                        r["seconds"],
                    ]
                    for r in sec["rows"]
                ],
            ),
        ]
    if "cnn" in sections:
        sec = sections["cnn"]
        md += [
            "### CNNs: 50% of conv filters removed (structured)\n",
            md_table(
                ["digits CNN", "tool", "accuracy", "Δ points", "params"],
                [[r["model"], r["tool"], r["accuracy"], r["accuracy_delta_points"], r["params"]] for r in sec["digits"]],
            ),
            md_table(
                ["ResNet-18-style, batch 8×3×224×224", "p50 ms (min–max)", "speed-up", "params"],
                [
                    [r["model"], f"{r['p50_ms']} ({r['min_ms']}–{r['max_ms']})", f"{r['speedup']}×", f"{r['params'] / 1e6:.2f} M"]
                    for r in sec["resnet"]
                ],
            ),
        ]
        if any(sec["peer_errors"].values()):
            md.append(f"Torch-Pruning: {sec['peer_errors']}\n")
    targets = {f"{name}: {k}": v for name, sec in sections.items() for k, v in sec.get("targets", {}).items()}
    if targets:
        md.append("Targets: " + "; ".join(f"{k} — {'met' if v else 'MISSED'}" for k, v in targets.items()) + "\n")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
