"""Benchmark: `leanml profile` on the two offline models, at 1 and 2 threads.

Cross-checks each figure against a peer computed another way in the same run:
decode speed against Hugging Face ``generate`` (greedy, KV cache) and perplexity against the
model's own ``labels=`` loss. Writes bench/results/profile.json and profile.md.

    python bench/profile.py [--threads 1,2] [--repeats 5]
"""

from __future__ import annotations

# isort: off
import _common  # noqa: F401  (first: fixes the import path and the environment)
# isort: on

import argparse
import math
import time

import torch

from _common import md_table, write_results
from leanml import load_data, load_model, profile
from leanml.measure.cost import time_calls
from leanml.measure.stats import summarize


def generate_tokens_per_s(handle, prompt, new_tokens: int, repeats: int) -> float:
    """Greedy decode speed through ``generate``: (time(new) - time(1 token)) / (new - 1)."""
    model = handle.module
    run = lambda n: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
    full = summarize(time_calls(lambda: run(new_tokens), warmup=1, repeats=repeats))["p50"]
    first = summarize(time_calls(lambda: run(1), warmup=1, repeats=repeats))["p50"]
    return (new_tokens - 1) / (full - first)


@torch.no_grad()
def hf_loss_perplexity(handle, data) -> float:
    windows = data.windows(handle.tokenizer, "eval", 512)
    nll = sum(float(handle.module(input_ids=w[None], labels=w[None]).loss) * (len(w) - 1) for w in windows)
    return math.exp(nll / sum(len(w) - 1 for w in windows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    lee, lee_sim = load_data("lee"), load_data("lee-sim")
    lm, enc = load_model("smollm2-135m"), load_model("minilm-l6")
    records, rows = [], []
    for n in threads:
        t0 = time.perf_counter()
        m = profile(lm, data=lee, threads=n, repeats=args.repeats)
        wall = time.perf_counter() - t0
        torch.set_num_threads(n)
        peer_decode = generate_tokens_per_s(lm, lee.tokens(lm.tokenizer)[:64][None], 32, args.repeats)
        peer_ppl = hf_loss_perplexity(lm, lee)
        records.append(
            {
                "measurement": m.to_dict(),
                "peer": {"generate_decode_tokens_per_s": peer_decode, "hf_loss_perplexity": peer_ppl},
                "wall_s": wall,
            }
        )
        rows.append(
            [
                "smollm2-135m",
                "lee",
                n,
                f"ppl {m.quality['value']:.3f} (HF loss: {peer_ppl:.3f})",
                f"{m.params / 1e6:.1f} M",
                f"{m.weight_bytes / 1e6:.0f} MB",
                f"{m.flops_per_item / 1e6:.0f} M/token",
                f"{m.latency_ms['p50']:.1f} / {m.latency_ms['p95']:.1f}",
                f"decode {m.decode_tokens_per_s:.1f} tok/s ({m.decode_tokens_per_s / peer_decode:.2f}× generate); "
                f"prefill {m.prefill_tokens_per_s:.0f} tok/s",
                f"{m.decode_roofline_tokens_per_s:.1f} ({100 * m.roofline_fraction:.0f}%)",
                f"{m.peak_memory_bytes / 1e6:.0f} MB",
                f"{m.energy_j_per_item:.3f} J",
                f"{m.usd_per_million:.3f}",
            ]
        )
        t0 = time.perf_counter()
        e = profile(enc, data=lee_sim, threads=n, repeats=args.repeats * 2)
        wall = time.perf_counter() - t0
        records.append({"measurement": e.to_dict(), "wall_s": wall})
        rows.append(
            [
                "minilm-l6",
                "lee-sim",
                n,
                f"Spearman {e.quality['value']:.4f}",
                f"{e.params / 1e6:.1f} M",
                f"{e.weight_bytes / 1e6:.0f} MB",
                f"{e.flops_per_item / 1e9:.2f} G/sequence",
                f"{e.latency_ms['p50']:.0f} / {e.latency_ms['p95']:.0f} (batch {e.batch_size}×{e.seq_len or 128})",
                f"{e.throughput_per_s:.1f} sequences/s",
                "-",
                f"{e.peak_memory_bytes / 1e6:.0f} MB",
                f"{e.energy_j_per_item:.3f} J",
                f"{e.usd_per_million:.3f}",
            ]
        )
    host = records[0]["measurement"]["host"]
    header = [
        "model",
        "data",
        "threads",
        "quality",
        "params",
        "weights",
        "FLOPs",
        "latency p50 / p95 ms",
        "speed",
        "decode roofline tok/s",
        "peak RSS",
        "energy / item",
        "$ / M items",
    ]
    md = (
        f"Measured on {host['cpu']} ({host['cores']} cores), torch {host['torch']}, torch eager, priced as "
        f"{records[0]['measurement']['hardware']} (${records[0]['measurement']['usd_per_hour']}/h, power model). "
        "Items are decoded tokens for SmolLM2 and sentences for MiniLM.\n\n" + md_table(header, rows)
    )
    write_results("profile", {"records": records}, md)


if __name__ == "__main__":
    main()
