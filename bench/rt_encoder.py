"""Benchmark section: MiniLM-L6 sentence embeddings on CPU runtimes, fp32 vs dynamic int8.

Input: the 50 lee-sim documents, tokenized and padded/truncated to 128 tokens (one batch of 50 x 128).
Timed with one protocol (warm-up calls, then repeated calls; p50, spread = (p95 - min) / p50, and the
process CPU time per call) at ``threads`` threads (``torch.set_num_threads`` and ONNX Runtime
``intra_op_num_threads``; one ORT session alive at a time, ``ORT_ENABLE_ALL``, sequential, default
spinning):

a. torch fp32 eager (the handle as loaded: eager attention); a_sdpa. the same with SDPA attention;
b. ONNX Runtime fp32 of the plain export (``export_onnx``);
c. ONNX Runtime fp32 fully fused (``optimize_onnx``: Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNorm);
   c_cpu. fused without SkipLayerNormalization/BiasGelu (``skip=CPU_INT8_SKIP``);
d. leanml int8: ``optimize_onnx(skip=CPU_INT8_SKIP)`` + ``quantize_dynamic_onnx`` (per-channel, QAttention);
   d_full. leanml int8 on the fully fused graph (c); d_dqmm. leanml int8 on the plain export (DynamicQuantizeMatMul
   everywhere, attention core unfused); d_pt. as (d) with per-tensor weight scales;
e. peer: ``onnxruntime.quantization.quantize_dynamic`` with its defaults on the plain export (b);
   e_fused. the peer on the fully fused graph (c) (defaults + ``DefaultTensorType=FLOAT``, which it asks for there).

glibc's malloc is told to keep big blocks on its heap (``mallopt``: mmap threshold 1 GiB, trim threshold 2 GiB)
before anything is timed: with its defaults every tensor over 32 MiB (here the 50 x 12 x 128 x 128 attention
scores and the 6400 x 1536 FFN activations, 39 MiB each) is mmapped and page-faulted afresh on each call,
which made torch eager ~30 % slower in a fresh process (1.65 s vs 1.18 s at 1 thread); ONNX Runtime's arena
allocator is not affected. The torch baseline is thus measured at its steady-state best.

For each: p50 latency, spread, speed-up vs (a), mean cosine of the mean-pooled embeddings vs fp32 torch
over the 50 documents, and Spearman on lee-sim (1,225 scored pairs). Also (d) with intra-op spinning off.

    python bench/rt_encoder.py [--threads 1,2] [--quick]     # prints JSON
"""

from __future__ import annotations

# isort: off
import _common  # noqa: F401  (first: fixes the import path and the environment)
# isort: on

import argparse
import atexit
import ctypes
import functools
import gc
import json
import os
import shutil
import tempfile
import time

import numpy as np
import onnx
import torch

import leanml
from leanml.accelerate.onnx_dynamic import quantize_dynamic_onnx
from leanml.accelerate.onnx_export import export_onnx
from leanml.accelerate.ort_optimize import CPU_INT8_SKIP, fused_ops_report, optimize_onnx
from leanml.measure.quality import cosine_spearman
from leanml.measure.stats import summarize

SEQ = 128
LABELS = {
    "a": "torch fp32 eager (eager attention)",
    "a_sdpa": "torch fp32 eager (SDPA attention)",
    "b": "ORT fp32 plain export",
    "c": "ORT fp32 fused (all BERT fusions)",
    "c_cpu": "ORT fp32 fused for CPU (no SkipLayerNorm/BiasGelu)",
    "d": "ORT int8 leanml (CPU-fused + dynamic int8 per-channel, QAttention)",
    "d_full": "ORT int8 leanml on the fully fused graph",
    "d_dqmm": "ORT int8 leanml on the plain export (no QAttention)",
    "d_pt": "ORT int8 leanml, per-tensor weight scales",
    "e": "ORT int8 peer quantize_dynamic (defaults, plain export)",
    "e_fused": "ORT int8 peer quantize_dynamic (defaults, fully fused graph)",
}

ORT_VARIANTS = [k for k in LABELS if not k.startswith("a")]


def steady_allocator() -> str:
    """Keep large blocks on glibc's heap (no mmap/munmap + page faults per call); returns what was set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "unchanged (no glibc)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, 1 << 31) == 1
    return "glibc mallopt M_MMAP_THRESHOLD=1GiB M_TRIM_THRESHOLD=2GiB" if ok else "unchanged (mallopt refused)"


@functools.lru_cache(maxsize=1)
def _setup() -> dict:
    """Model, data, batch and every ONNX variant, built once per process."""
    from onnxruntime.quantization import quantize_dynamic

    allocator = steady_allocator()

    handle = leanml.load("minilm-l6")
    data = leanml.load_data("lee-sim")
    enc = dict(handle.tokenizer(data.texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt"))
    tmp = tempfile.mkdtemp(prefix="rt_encoder-")
    atexit.register(shutil.rmtree, tmp, True)
    p = {k: os.path.join(tmp, f"{k}.onnx") for k in ORT_VARIANTS}
    seconds = {}
    t0 = time.perf_counter()
    export_onnx(handle, p["b"])
    seconds["export"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fusions = {"c": optimize_onnx(p["b"], p["c"])}
    seconds["optimize"] = time.perf_counter() - t0
    fusions["c_cpu"] = optimize_onnx(p["b"], p["c_cpu"], skip=CPU_INT8_SKIP)
    t0 = time.perf_counter()
    report = quantize_dynamic_onnx(p["c_cpu"], p["d"], per_channel=True)
    seconds["leanml_quantize"] = time.perf_counter() - t0
    report_full = quantize_dynamic_onnx(p["c"], p["d_full"], per_channel=True)
    quantize_dynamic_onnx(p["b"], p["d_dqmm"], per_channel=True)
    quantize_dynamic_onnx(p["c_cpu"], p["d_pt"], per_channel=False)
    t0 = time.perf_counter()
    quantize_dynamic(p["b"], p["e"])
    seconds["peer_quantize"] = time.perf_counter() - t0
    # on the fused graph the peer cannot type the contrib ops' outputs by itself: it asks for DefaultTensorType
    quantize_dynamic(p["c"], p["e_fused"], extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return {
        "handle": handle,
        "data": data,
        "enc": enc,
        "paths": p,
        "fusions": fusions,
        "report": report,
        "allocator": allocator,
        "report_full": report_full,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def ort_session(path: str, threads: int, spinning: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def timing(fn, warmup: int, repeats: int) -> dict:
    """Wall clock (p50, min, max, spread) and process CPU time (p50) of ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    s = summarize(wall)
    return {
        "p50_ms": round(s["p50"] * 1e3, 1),
        "min_ms": round(s["min"] * 1e3, 1),
        "max_ms": round(s["max"] * 1e3, 1),
        "spread_pct": round(100 * (s["p95"] - s["min"]) / s["p50"], 1),
        "cpu_p50_ms": round(summarize(cpu)["p50"] * 1e3, 1),
        "n": s["n"],
    }


def pooled(hidden: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    m = torch.from_numpy(mask[..., None].astype(np.float32))
    return (torch.from_numpy(np.asarray(hidden, np.float32)) * m).sum(1) / m.sum(1).clamp_min(1.0)


def run(threads: int, quick: bool = False) -> dict:
    """Time and score the variants at ``threads`` threads; returns a JSON-able dict."""
    setup = _setup()
    handle, data, enc, paths = setup["handle"], setup["data"], setup["enc"], setup["paths"]
    torch.set_num_threads(threads)
    warmup, repeats = (1, 5) if quick else (2, 10)
    mask = enc["attention_mask"].numpy()
    feed = {k: v.numpy() for k, v in enc.items()}
    load_before = os.getloadavg()
    times, embeddings = {}, {}
    model = handle.module
    with torch.inference_mode():
        embeddings["a"] = pooled(model(**enc).last_hidden_state.numpy(), mask)
        times["a"] = timing(lambda: model(**enc), warmup, repeats)
        before = model.config._attn_implementation
        model.set_attn_implementation("sdpa")
        try:
            embeddings["a_sdpa"] = pooled(model(**enc).last_hidden_state.numpy(), mask)
            times["a_sdpa"] = timing(lambda: model(**enc), warmup, repeats)
        finally:
            model.set_attn_implementation(before)
    gc.collect()
    for key in ORT_VARIANTS:  # one ORT session alive at a time
        sess = ort_session(paths[key], threads)
        names = {i.name for i in sess.get_inputs()}
        f = {k: v for k, v in feed.items() if k in names}
        embeddings[key] = pooled(sess.run(None, f)[0], mask)
        times[key] = timing(lambda s=sess, f=f: s.run(None, f), warmup, repeats)
        del sess
        gc.collect()
    spin_off = ort_session(paths["d"], threads, spinning=False)
    no_spin = timing(lambda s=spin_off: s.run(None, feed), warmup, repeats)
    del spin_off
    ref = embeddings["a"]
    spearman = {k: cosine_spearman(e, data.pairs, data.scores) for k, e in embeddings.items()}
    base = times["a"]["p50_ms"]
    rows = []
    for key, label in LABELS.items():
        cos = float(torch.nn.functional.cosine_similarity(embeddings[key], ref, dim=-1).mean())
        rows.append(
            {
                "variant": key,
                "label": label,
                **times[key],
                "speedup_vs_a": round(base / times[key]["p50_ms"], 2),
                "cpu_speedup_vs_a": round(times["a"]["cpu_p50_ms"] / times[key]["cpu_p50_ms"], 2),
                "mean_cosine_vs_fp32": round(cos, 5),
                "spearman": round(spearman[key], 4),
                "spearman_delta": round(spearman[key] - spearman["a"], 4),
            }
        )
    by = {r["variant"]: r for r in rows}
    d, e = by["d"], by["e"]
    targets = {
        "d_speedup_vs_a>=1.7": d["speedup_vs_a"] >= 1.7,
        "d_at_least_as_fast_as_e": d["p50_ms"] <= e["p50_ms"],
        "d_cosine>=0.99": d["mean_cosine_vs_fp32"] >= 0.99,
        "d_spearman_within_0.005": abs(d["spearman_delta"]) <= 0.005,
    }
    return {
        "threads": threads,
        "batch": [len(data.texts), SEQ],
        "quick": quick,
        "rows": rows,
        "targets": targets,
        "d_vs_e_speed": round(e["p50_ms"] / d["p50_ms"], 3),
        "d_vs_e_cpu": round(e["cpu_p50_ms"] / d["cpu_p50_ms"], 3),
        "d_no_spinning": {**no_spin, "speedup_vs_a": round(base / no_spin["p50_ms"], 2)},
        "fusions": setup["fusions"],
        "quantize_report": setup["report"],
        "quantize_report_full": setup["report_full"],
        "ort_kernels": {k: fused_ops_report(paths[k]) for k in ("d", "e")},
        "setup_seconds": setup["seconds"],
        "allocator": setup["allocator"],
        "load_avg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--quick", action="store_true", help="fewer warm-up and timed calls")
    args = parser.parse_args()
    results = [run(int(t), args.quick) for t in args.threads.split(",")]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
