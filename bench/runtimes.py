"""Benchmark: compressed models on real runtimes, side by side with the peers, at 1 and 2 threads.

Sections (each its own module, runnable alone):
* `rt_llm.py` - SmolLM2-135M greedy decode: fp32 torch eager vs leanml W8 / W4 g64 on ONNX Runtime
  (`MatMulNBits` on leanml's integers, KV cache), torchao int8/int4 weight-only, ONNX Runtime's own
  4-bit quantizer; perplexity on the runtime vs the simulated model; artifact sizes.
* `rt_encoder.py` - MiniLM-L6, 50 sentences x 128 tokens: torch fp32 vs leanml int8 on ONNX Runtime
  (fused graph, per-channel dynamic int8) vs `quantize_dynamic` defaults; cosine and Spearman.
* `rt_cnn.py` - ResNet-18-style CNN, batch 8 x 224²: torch fp32 eager vs BN-folded static int8 QDQ on
  ONNX Runtime vs `quantize_static` defaults; accuracy on a digits-trained CNN.

Writes bench/results/runtimes.json and runtimes.md (the README table).

    python bench/runtimes.py [--threads 1 2] [--sections llm encoder cnn] [--quick]
"""

from __future__ import annotations

# isort: off
import _common  # noqa: F401  (first: fixes the import path and the environment)
# isort: on

import argparse
import json
import time

from _common import write_results
from leanml.measure.profile import host_info


def _f(x, spec=".1f") -> str:
    return "–" if x is None else format(x, spec)


def llm_table(sections: list[dict]) -> str:
    lines = [
        "| variant | runtime | threads | decode tok/s (spread) | × fp32 eager | prefill tok/s | × | roofline tok/s "
        "| perplexity | vs simulated |",
        "|" + "---|" * 10,
    ]
    for sec in sections:
        for r in sec["rows"]:
            spread = r.get("decode_spread") or [None, None]
            sim = r.get("perplexity_vs_simulated")
            lines.append(
                f"| {r['variant']} | {r['runtime']} | {r['threads']} | {_f(r['decode_tok_s'])} "
                f"({_f(spread[0])}–{_f(spread[1])}) | {_f(r.get('decode_vs_fp32_eager'), '.2f')}× | "
                f"{_f(r['prefill_tok_s'], '.0f')} | {_f(r.get('prefill_vs_fp32_eager'), '.2f')}× | "
                f"{_f(r.get('roofline_tok_s'))} | {_f(r.get('perplexity'), '.3f')} | "
                f"{'–' if sim is None else f'{sim * 100:+.2f}%'} |"
            )
    return "\n".join(lines)


def generic_table(sections: list[dict], title_key: str = "label") -> str:
    """Rows of the encoder/CNN sections: latency p50 (spread), speed-up and the fidelity columns they carry."""
    quality_keys = []
    for sec in sections:
        for r in sec["rows"]:
            for k in r:
                if any(t in k for t in ("cosine", "spearman", "sqnr", "accuracy", "top1")) and k not in quality_keys:
                    quality_keys.append(k)
    head = ["variant", "threads", "p50 ms (min–max)", "× torch fp32 eager", *quality_keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sec in sections:
        for r in sec["rows"]:
            speed = next((v for k, v in r.items() if k.startswith("speedup")), None)
            lo, hi = r.get("min_ms"), r.get("max_ms")
            cells = [
                str(r.get(title_key) or r.get("variant")),
                str(sec["threads"]),
                f"{_f(r.get('p50_ms'))} ({_f(lo)}–{_f(hi)})",
                f"{_f(speed, '.2f')}×",
            ]
            cells += [_f(r.get(k), ".4f") if isinstance(r.get(k), float) else str(r.get(k, "–")) for k in quality_keys]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sections", nargs="+", default=["llm", "encoder", "cnn"], choices=["llm", "encoder", "cnn"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = parser.parse_args()
    payload: dict = {"host": host_info(), "threads": args.threads, "sections": {}}
    started = time.time()
    md = [
        f"Measured on {payload['host']['cpu']} ({payload['host']['cores']} cores), medians of repeated runs "
        f"with min–max spreads; threads {', '.join(map(str, args.threads))}.\n"
    ]
    if "llm" in args.sections:
        import rt_llm

        runs = [rt_llm.run(t, quick=args.quick, quality=(i == 0)) for i, t in enumerate(args.threads)]
        sizes = rt_llm.sizes()
        payload["sections"]["llm"] = {"runs": runs, "sizes": sizes}
        md += [
            "### SmolLM2-135M decode (greedy, KV cache, 128-token prompt, 64 new tokens)\n",
            llm_table(runs),
            "",
            f"Artifact sizes (safetensors, embeddings as stored): fp32 {sizes['fp32_safetensors_bytes'] / 1e6:.1f} MB; "
            f"W8 {sizes['w8_vs_fp32']:.3f}×; W4 g64 {sizes['w4-g64_vs_fp32']:.3f}× of fp32.\n",
        ]
    if "encoder" in args.sections:
        import rt_encoder

        runs = [rt_encoder.run(t, quick=args.quick) for t in args.threads]
        payload["sections"]["encoder"] = runs
        md += ["### MiniLM-L6 sentence embeddings (batch 50 × 128 tokens)\n", generic_table(runs), ""]
    if "cnn" in args.sections:
        import rt_cnn

        runs = [rt_cnn.run(t, quick=args.quick) for t in args.threads]
        payload["sections"]["cnn"] = runs
        md += ["### ResNet-18-style CNN (batch 8 × 3 × 224 × 224)\n", generic_table(runs), ""]
        digits = runs[0].get("digits")
        if digits:
            md.append(f"Digits CNN accuracy: {json.dumps(digits)}\n")
    payload["seconds"] = round(time.time() - started, 1)
    write_results("runtimes", payload, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
