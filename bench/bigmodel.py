"""Peak memory of compressing Llama-shaped models layer by layer, from random bf16 weights on disk.

Quality is meaningless here (random weights); memory and time are not. Each shape is written block by
block (never whole in memory) with the SmolLM2 tokenizer, then compressed by ``leanml compress --lazy
--no-measure`` in a child process whose resident memory (the whole process tree, sampled every 0.2 s)
gives the peak. Writes bench/results/bigmodel.json and .md.

    python bench/bigmodel.py --shapes 135m 1b --recipes rtn gptq      # add 3b 7b where disk and time allow
    python bench/bigmodel.py --shapes 7b:2 --recipes gptq             # the first 2 of 7B's 32 blocks: time a block

A shape ``NAME:L`` keeps only the first ``L`` blocks of NAME (same widths, so the same peak memory per
block); its row says so, and its wall time is that of ``L`` blocks plus the embeddings and head.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

import _common  # noqa: F401 - keeps bench/ from shadowing the standard library (bench/profile.py)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHAPES = {  # hidden, layers, intermediate, heads, kv heads (vocabulary: the SmolLM2 tokenizer's 49152)
    "135m": (576, 30, 1536, 9, 3),
    "1b": (2048, 16, 8192, 32, 8),
    "3b": (3072, 28, 8192, 24, 8),
    "7b": (4096, 32, 11008, 32, 32),
}
RECIPES = {
    "rtn": {"name": "w4-g64-rtn", "steps": [{"kind": "weight-only", "bits": 4, "group_size": 64, "method": "rtn"}]},
    "gptq": {
        "name": "w4-g64-gptq",
        "steps": [{"kind": "weight-only", "bits": 4, "group_size": 64, "method": "gptq", "calib_windows": 16, "window": 512}],
    },
}


def parse_shape(spec: str) -> tuple[str, int]:
    """``"7b"`` -> ("7b", 32); ``"7b:2"`` -> ("7b", 2): a shape and how many of its blocks to keep."""
    name, _, keep = spec.partition(":")
    if name not in SHAPES or (keep and not (keep.isdigit() and 0 < int(keep) <= SHAPES[name][1])):
        raise SystemExit(f"shape {spec!r} is not one of {', '.join(SHAPES)} (optionally NAME:L with 1 <= L <= its layers)")
    return name, int(keep) if keep else SHAPES[name][1]


def build(shape: str, folder: Path) -> Path:
    """A Llama-shaped model with random bf16 weights, written one block per file (plus an index);
    ``shape`` may be ``NAME:L`` (the first L blocks)."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    from leanml.models import load_model

    if (folder / "config.json").exists():
        return folder
    name, layers = parse_shape(shape)
    hidden, _, inter, heads, kv = SHAPES[name]
    tok = load_model("smollm2-135m").tokenizer
    config = tf.LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        architectures=["LlamaForCausalLM"],  # so the folder opens as a causal LM with its head, as a real one does
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in tf.LlamaForCausalLM(config).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    groups: dict[str, list[str]] = {}
    for key in shapes:
        part = key.split(".")[2] if key.startswith("model.layers.") else "rest"
        groups.setdefault(part, []).append(key)
    index = {}
    for part, keys in groups.items():
        name = f"model-{part}.safetensors"
        state = {}
        for k in keys:
            s = shapes[k]
            state[k] = torch.ones(s, dtype=torch.bfloat16) if len(s) == 1 else (0.02 * torch.randn(s, generator=gen)).bfloat16()
        save_file(state, str(folder / name), metadata={"format": "pt"})
        index.update({k: name for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run(argv: list[str], env: dict) -> dict:
    """Run ``argv``; its wall time and the peak resident memory of its process tree."""
    start = time.perf_counter()
    # cwd: the project root, so that `python -m` does not put bench/ (whose profile.py shadows the standard library) on the path
    proc = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    peak = 0
    try:
        while proc.poll() is None:
            try:
                root = psutil.Process(proc.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    out = proc.stdout.read() if proc.stdout else ""
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 1), "peak_rss_bytes": peak, "tail": out[-600:]}


GENERATE = """
import sys, time, torch, leanml
h = leanml.load(sys.argv[1])
ids = h.tokenizer("The history of the city", return_tensors="pt").input_ids
t = time.perf_counter()
with torch.no_grad():
    out = h.module.generate(ids, max_new_tokens=8, do_sample=False)
print("GENERATED", out.shape[1] - ids.shape[1], "tokens in", round(time.perf_counter() - t, 1), "s")
"""


def generate(folder: Path, env: dict) -> dict:
    """Load the artifact in a fresh process and generate 8 tokens greedily: peak RSS, wall, success."""
    r = run([sys.executable, "-c", GENERATE, str(folder)], env)
    ok = r["rc"] == 0 and "GENERATED 8 tokens" in r["tail"]
    return {"generates": ok, "load_generate_peak_rss_bytes": r["peak_rss_bytes"], "load_generate_wall_s": r["wall_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["135m", "1b"], help=f"of {', '.join(SHAPES)}, or NAME:L (first L blocks)")
    ap.add_argument("--recipes", nargs="+", default=["rtn", "gptq"], choices=list(RECIPES))
    ap.add_argument("--work", default=os.environ.get("LEANML_BIG_WORK", "/tmp/leanml-bigmodel"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torchrun", action="store_true", help="also run GPTQ with 2 torchrun processes")
    args = ap.parse_args()
    work = Path(args.work)
    out_json = RESULTS / "bigmodel.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    env = {**os.environ, "LEANML_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    for shape in args.shapes:
        name, layers = parse_shape(shape)
        folder = build(shape, work / f"llama-{shape.replace(':', '-')}")
        from leanml.models.lazy import fp32_bytes_of_folder

        fp32 = fp32_bytes_of_folder(folder)
        for recipe in args.recipes:
            rfile = work / f"{recipe}.json"
            rfile.write_text(json.dumps(RECIPES[recipe]))
            modes = [("1", [sys.executable, "-m", "leanml.cli"])]
            if args.torchrun and recipe == "gptq":
                modes.append(("2", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "leanml.cli"]))
            for procs, launcher in modes:
                threads = str(args.threads if procs == "1" else max(1, args.threads // 2))
                target = work / f"out-{shape.replace(':', '-')}-{recipe}-{procs}"
                cmd = [*launcher, "compress", str(folder), "--recipe", str(rfile), "--data", "lee", "--out", str(target)]
                cmd += ["--force", "--no-measure", "--lazy"]
                r = run(cmd, {**env, "OMP_NUM_THREADS": threads})
                r.update(shape=shape, recipe=recipe, processes=int(procs), fp32_bytes=fp32, threads_per_process=int(threads))
                r.update(blocks=layers, blocks_of_shape=SHAPES[name][1])
                if r["rc"] == 0 and procs == "1":
                    r.update(generate(target, {**env, "OMP_NUM_THREADS": str(args.threads)}))
                results[f"{shape}/{recipe}/{procs}"] = r
                print(json.dumps({k: v for k, v in r.items() if k != "tail"}), flush=True)
                RESULTS.mkdir(parents=True, exist_ok=True)
                tmp = out_json.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(results, indent=2))
                os.replace(tmp, out_json)
    rows = [
        "| shape | fp32 weights | recipe | processes | peak RSS | wall | reload + generate 8 tokens: peak RSS, wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        gen = "-"
        if "generates" in r:
            gen = f"{r['load_generate_peak_rss_bytes'] / 2**30:.2f} GiB, {r['load_generate_wall_s']:.0f} s"
            gen += "" if r["generates"] else " (failed)"
        shape = r["shape"]
        if ":" in shape:
            shape = f"{shape.split(':')[0]} (first {r['blocks']} of {r['blocks_of_shape']} blocks)"
        rows.append(
            f"| {shape} | {r['fp32_bytes'] / 2**30:.1f} GiB | {r['recipe']} | {r['processes']} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['wall_s']:.0f} s{'' if r['rc'] == 0 else ' (failed)'} | {gen} |"
        )
    (RESULTS / "bigmodel.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
