"""Benchmark section: SmolLM2-135M decode on each runtime, leanml's W4/W8 against the peers.

Rows (all measured by `leanml.profile` the same way: greedy decode with a key/value cache after a
128-token Lee prompt, prefill of that prompt, perplexity on the Lee evaluation tokens):

* fp32 on torch eager (the baseline of every ratio) and fp32 on leanml's ONNX Runtime graph;
* leanml W8 (per channel) and W4 g64 (AWQ+GPTQ, the `w4-g64` recipe), both with the 8-bit output head
  and tied embedding, on ONNX Runtime (`MatMulNBits` fed with leanml's integers) and simulated on torch;
* peers: torchao int8 and int4 (g64) weight-only on torch, and ONNX Runtime's own 4-bit quantizer
  (`MatMulNBitsQuantizer`, block 64, asymmetric, accuracy level 4) applied to the fp32 graph.

The quantized models are cached under ~/.cache/leanml/bench (GPTQ takes minutes).
"""

from __future__ import annotations

# isort: off
import _common  # noqa: F401  (first: fixes the import path and the environment)
# isort: on

import os
import tempfile
from pathlib import Path

import torch

import leanml
from leanml.artifact import load_artifact, save_artifact
from leanml.measure.cost import path_bytes
from leanml.models import ModelHandle
from leanml.recipe import load_recipe

CACHE = Path(os.environ.get("LEANML_CACHE", Path.home() / ".cache" / "leanml")) / "bench"
MODEL = "smollm2-135m"


def quantized(recipe: str) -> ModelHandle:
    """The model compressed with a built-in recipe, from the cache when the recipe is unchanged."""
    folder = CACHE / f"{MODEL}-{recipe}"
    steps = [s.model_dump() for s in load_recipe(recipe).steps]
    if (folder / "leanml.json").exists():
        handle = load_artifact(folder)
        if handle.meta.get("recipe") and handle.meta["recipe"].get("steps") == steps:
            return handle
    handle = leanml.load(MODEL)
    lee = leanml.load_data("lee")
    from leanml.pipeline import apply_recipe

    apply_recipe(handle, load_recipe(recipe), lee)
    save_artifact(handle, folder, recipe=load_recipe(recipe), force=True)
    return load_artifact(folder)


def torchao_peer(kind: str) -> ModelHandle:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup, quantize_

    handle = leanml.load(MODEL)
    config = Int8WeightOnlyConfig() if kind == "int8" else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64))
    quantize_(handle.module, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    handle.meta["modified"] = True
    return handle


def ort_quantizer_peer(work: Path, threads: int) -> ModelHandle:
    """ONNX Runtime's own 4-bit weight quantizer on leanml's fp32 graph."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from leanml.accelerate.llm_onnx import OrtCausalLM, build_llm_onnx

    base = leanml.load(MODEL)
    build_llm_onnx(base, work / "fp32.onnx")
    quantizer = MatMulNBitsQuantizer(onnx.load(str(work / "fp32.onnx")), block_size=64, is_symmetric=False, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(work / "ort-q4.onnx"), use_external_data_format=True)
    module = OrtCausalLM(work / "ort-q4.onnx", threads=threads)
    handle = ModelHandle(module=module, task="causal-lm", name=MODEL, tokenizer=base.tokenizer, runtime="onnxruntime")
    handle.meta["torch_handle"] = base
    handle.meta["runtime_report"] = {
        "bytes": path_bytes(work / "ort-q4.onnx") + path_bytes(work / "ort-q4.onnx.data"),
        "fusions": ["ORT MatMulNBitsQuantizer (block 64, asym, accuracy level 4)"],
    }
    return handle


def _row(label: str, tool: str, runtime: str, m, base=None) -> dict:
    row = {
        "model": MODEL,
        "variant": label,
        "tool": tool,
        "runtime": runtime,
        "threads": m.threads,
        "perplexity": m.quality["value"] if m.quality else None,
        "decode_tok_s": m.decode_tokens_per_s,
        "decode_spread": m.decode["decode_tokens_per_s_spread"],
        "prefill_tok_s": m.prefill_tokens_per_s,
        "roofline_tok_s": m.decode_roofline_tokens_per_s,
        "roofline_fraction": m.roofline_fraction,
        "disk_bytes": m.disk_bytes,
    }
    if base is not None:
        row["decode_vs_fp32_eager"] = m.decode_tokens_per_s / base.decode_tokens_per_s
        row["prefill_vs_fp32_eager"] = m.prefill_tokens_per_s / base.prefill_tokens_per_s
    return row


def run(threads: int, quick: bool = False, quality: bool = True) -> dict:
    """Rows for one thread count. ``quality``: measure perplexity (needed once; it does not depend on threads)."""
    lee = leanml.load_data("lee")
    repeats = 3 if quick else 7
    kw = {"threads": threads, "repeats": repeats, "seq_len": 128, "new_tokens": 64, "measure_quality": quality}
    rows = []
    base_handle = leanml.load(MODEL)
    base = leanml.profile(base_handle, data=lee, **kw)
    rows.append(_row("fp32", "-", "torch", base, base))
    print(rows[-1], flush=True)
    fp32_ort = leanml.profile(base_handle, data=lee, runtime="onnxruntime", **kw)
    rows.append(_row("fp32", "leanml graph", "onnxruntime", fp32_ort, base))
    print(rows[-1], flush=True)
    for recipe in ("w8", "w4-g64"):
        handle = quantized(recipe)
        rows.append(
            _row(f"leanml {recipe}", "leanml", "onnxruntime", leanml.profile(handle, data=lee, runtime="onnxruntime", **kw), base)
        )
        print(rows[-1], flush=True)
        if quality:
            sim = leanml.profile(handle, data=lee, **{**kw, "repeats": 1, "new_tokens": 4})
            rows[-1]["simulated_perplexity"] = sim.quality["value"]
            rows[-1]["perplexity_vs_simulated"] = rows[-1]["perplexity"] / sim.quality["value"] - 1
    for kind in ("int8", "int4-g64"):
        try:
            peer = torchao_peer(kind)
        except ImportError:
            print("torchao is not installed; skipping its rows (make bench installs it)")
            break
        rows.append(_row(f"torchao {kind} weight-only", "torchao", "torch", leanml.profile(peer, data=lee, **kw), base))
        print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        peer = ort_quantizer_peer(Path(tmp), threads)
        rows.append(
            _row("ORT MatMulNBitsQuantizer 4-bit g64", "onnxruntime", "onnxruntime", leanml.profile(peer, data=lee, **kw), base)
        )
        # its torch twin is the fp32 model, so the profile's roofline would be the fp32 one: use its own bytes
        # (every weight read once per token; the 4-bit head and the fp32 embedding it indexes are counted)
        rows[-1]["roofline_tok_s"] = base.memory_bandwidth_gbs * 1e9 / rows[-1]["disk_bytes"]
        rows[-1]["roofline_fraction"] = rows[-1]["decode_tok_s"] / rows[-1]["roofline_tok_s"]
        print(rows[-1], flush=True)
    return {"threads": threads, "rows": rows}


def sizes() -> dict:
    """Bytes of the W4/W8 leanml artifacts (safetensors, embeddings as stored) against the fp32 safetensors."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = leanml.load(MODEL)
        save_artifact(fp32, Path(tmp) / "fp32")
        ref = path_bytes(Path(tmp) / "fp32" / "model.safetensors")
    out["fp32_safetensors_bytes"] = ref
    for recipe in ("w8", "w4-g64"):
        quantized(recipe)
        size = path_bytes(CACHE / f"{MODEL}-{recipe}" / "model.safetensors")
        out[f"{recipe}_safetensors_bytes"] = size
        out[f"{recipe}_vs_fp32"] = size / ref
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 1, quick=True), indent=2))
    print(json.dumps(sizes(), indent=2))
