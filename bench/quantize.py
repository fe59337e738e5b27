"""Benchmark: leanml's quantization methods side by side with torchao's configs on the same data.

SmolLM2-135M on the Lee corpus (perplexity on the first 8,192 tokens; calibration after token 16,384),
linear layers inside the decoder blocks (lm_head and embeddings kept); MiniLM-L6 on lee-sim (Spearman);
a small CNN trained on `digits` in this script (accuracy). Writes bench/results/quantize.json and .md.

    python bench/quantize.py [--skip-gptq] [--threads 2]
"""

from __future__ import annotations

# isort: off
import _common  # noqa: F401  (first: fixes the import path and the environment)
# isort: on

import argparse
import copy
import json
import time

import torch

import leanml
from _common import RESULTS, digits_cnn, md_table, write_results
from leanml.config import Int8Dynamic, Int8Static, WeightOnly
from leanml.measure import evaluate
from leanml.models import ModelHandle
from leanml.pipeline import apply_recipe
from leanml.recipe import load_recipe


def torchao_config(name: str):
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
    )

    return {
        "int8-weight-only": Int8WeightOnlyConfig(),
        "int8-dynamic": Int8DynamicActivationInt8WeightConfig(),
        "int4-g64": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)),
    }[name]


def run_torchao(handle: ModelHandle, name: str, skip: str | None) -> None:
    from torchao.quantization import quantize_

    def keep(module, fqn):
        return isinstance(module, torch.nn.Linear) and (skip is None or skip not in fqn)

    quantize_(handle.module, torchao_config(name), filter_fn=keep)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def smollm2_rows(args, lee) -> list[dict]:
    rows = []
    if not args.gptq_only:
        fp32 = evaluate(leanml.load("smollm2-135m"), lee)["value"]
        rows.append({"model": "smollm2-135m", "method": "fp32", "tool": "-", "quality": fp32, "seconds": 0.0})
    plans = (
        []
        if args.gptq_only
        else [
            ("w8 (RTN per-channel)", "w8", "int8-weight-only"),
            ("w4 g64 RTN", [WeightOnly(bits=4, group_size=64, method="rtn", mse_clip=False)], None),
            ("w3 g64 RTN", [WeightOnly(bits=3, group_size=64, method="rtn", mse_clip=False)], None),
            ("w8a8 SmoothQuant (dynamic)", "w8a8", "int8-dynamic"),
            ("int8 dynamic (no smoothing)", [Int8Dynamic()], None),
        ]
    )
    if not args.skip_gptq:
        plans += [
            ("w4 g64 leanml best (recipe w4-g64)", "w4-g64", "int4-g64"),
            ("w3 g64 leanml best (recipe w3-g64)", "w3-g64", None),
        ]
    for label, recipe, peer in plans:
        handle = leanml.load("smollm2-135m")
        _, seconds = timed(lambda h=handle, r=recipe: apply_recipe(h, r, lee))
        value = evaluate(handle, lee)["value"]
        row = {
            "model": "smollm2-135m",
            "method": label,
            "tool": "leanml",
            "quality": value,
            "seconds": seconds,
            "recipe": load_recipe(recipe).to_dict(),
        }
        rows.append(row)
        print(row, flush=True)
        if peer:
            handle = leanml.load("smollm2-135m")
            _, seconds = timed(lambda h=handle, p=peer: run_torchao(h, p, "lm_head"))
            peer_value = evaluate(handle, lee)["value"]
            rows.append(
                {
                    "model": "smollm2-135m",
                    "method": f"torchao {peer}",
                    "tool": "torchao",
                    "quality": peer_value,
                    "seconds": seconds,
                    "peer_of": label,
                }
            )
            row["vs_peer"] = value / peer_value
            print(rows[-1], flush=True)
    return rows


def minilm_rows(sim) -> list[dict]:
    rows = []
    base = leanml.load("minilm-l6")
    rows.append({"model": "minilm-l6", "method": "fp32", "tool": "-", "quality": evaluate(base, sim)["value"], "seconds": 0.0})
    for label, recipe in (
        ("int8 static (minmax, calibrated)", [Int8Static(observer="minmax")]),
        ("int8 dynamic", [Int8Dynamic()]),
    ):
        handle = leanml.load("minilm-l6")
        _, seconds = timed(lambda h=handle, r=recipe: apply_recipe(h, r, sim))
        rows.append(
            {
                "model": "minilm-l6",
                "method": label,
                "tool": "leanml",
                "quality": evaluate(handle, sim)["value"],
                "seconds": seconds,
            }
        )
    handle = leanml.load("minilm-l6")
    _, seconds = timed(lambda: run_torchao(handle, "int8-dynamic", None))
    rows.append(
        {
            "model": "minilm-l6",
            "method": "torchao int8-dynamic",
            "tool": "torchao",
            "quality": evaluate(handle, sim)["value"],
            "seconds": seconds,
        }
    )
    return rows


def cnn_rows(digits) -> list[dict]:
    net = digits_cnn()
    x, y = digits.tensors("calib")
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    fp32 = evaluate(ModelHandle(module=net, task="generic", name="digits-cnn"), digits)["value"]
    rows = [{"model": "digits-cnn", "method": "fp32", "tool": "-", "quality": fp32, "seconds": 0.0}]
    for observer in ("minmax", "percentile", "kl"):
        handle = ModelHandle(module=copy.deepcopy(net), task="generic", name="digits-cnn")
        _, seconds = timed(lambda h=handle, o=observer: apply_recipe(h, [Int8Static(observer=o)], digits))
        rows.append(
            {
                "model": "digits-cnn",
                "method": f"int8 static ({observer})",
                "tool": "leanml",
                "quality": evaluate(handle, digits)["value"],
                "seconds": seconds,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-gptq", action="store_true")
    parser.add_argument("--gptq-only", action="store_true", help="re-run only the GPTQ rows, keep the others")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.gptq_only:
        old = json.loads((RESULTS / "quantize.json").read_text())["rows"]
        rows = [r for r in old if "leanml best" not in r["method"] and r.get("peer_of", "").find("leanml best") < 0]
        rows += smollm2_rows(args, leanml.load_data("lee"))
    else:
        rows = cnn_rows(leanml.load_data("digits")) + minilm_rows(leanml.load_data("lee-sim"))
        rows += smollm2_rows(args, leanml.load_data("lee"))
    metric = {"smollm2-135m": "perplexity ↓", "minilm-l6": "Spearman ↑", "digits-cnn": "accuracy ↑"}
    table = [
        [
            r["model"],
            r["method"],
            f"{metric[r['model']]} {r['quality']:.4f}",
            f"{r['vs_peer']:.3f}" if "vs_peer" in r else "",
            f"{r['seconds']:.0f}",
        ]
        for r in rows
    ]
    md = (
        f"Quality after quantization ({args.threads} threads; compute simulated in float, integers stored). "
        "`vs torchao` = leanml's metric ÷ torchao's corresponding config on the same data "
        "(for perplexity lower is better).\n\n"
        + md_table(["model", "method", "quality", "vs torchao", "seconds to quantize"], table)
    )
    write_results("quantize", {"rows": rows, "threads": args.threads}, md)


if __name__ == "__main__":
    main()
