"""Cost of a model: size, FLOPs and timed runs (latency, throughput, prefill and decode speed)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models.handle import ModelHandle
from .stats import summarize


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data: ``t`` itself, or the inner tensors of a wrapper subclass
    (e.g. torchao's packed weights, which have no storage of their own)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for name in names for leaf in _leaves(getattr(t, name))]


def unique_tensors(module: torch.nn.Module, buffers: bool = True) -> list[torch.Tensor]:
    """Parameters (and persistent buffers) of ``module``, each storage counted once (tied weights);
    wrapper tensor subclasses are counted by the tensors inside them."""
    seen: set[tuple[int, int]] = set()
    out = []
    tensors = list(module.parameters())
    if buffers:  # persistent buffers only: caches that are not saved are not the stored weights
        tensors += [
            b
            for m in module.modules()
            for name, b in m._buffers.items()
            if b is not None and name not in m._non_persistent_buffers_set
        ]
    for t in (leaf for tensor in tensors for leaf in _leaves(tensor)):
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        out.append(t)
    return out


def _code_numel(module: torch.nn.Module) -> int:
    """Weights a quantized layer stores as integer codes (buffers or packed params, not Parameters)."""
    own = getattr(module, "weight_numel", None)  # leanml's quantized layers
    if callable(own):
        return int(own())
    if type(module).__module__.startswith("torch.ao.nn.quantized") and callable(getattr(module, "weight", None)):
        bias = module.bias() if callable(getattr(module, "bias", None)) else None
        return module.weight().numel() + (0 if bias is None else bias.numel())
    return 0


def count_params(module: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings count once), quantized weights included: a layer
    that stores its weight as integer codes has as many weights as the float layer it replaced."""
    return sum(t.numel() for t in unique_tensors(module, buffers=False)) + sum(_code_numel(m) for m in module.modules())


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the weights as the module stores them (parameters and buffers, tied ones once)."""
    return sum(t.numel() * t.element_size() for t in unique_tensors(module))


def sparse_accounting(module: torch.nn.Module) -> dict | None:
    """For a model with pruned (masked) layers: how sparse they are, their dense bytes, and the bytes of
    their stored form (bitmask + kept values). None when nothing is stored sparse. Compute stays dense, so
    no speed-up follows from these figures; only measured latency says whether it got faster."""
    layers = [m for m in module.modules() if hasattr(m, "weight_mask") and hasattr(m, "stored_nbytes")]
    if not layers:
        return None
    total = sum(m.weight_mask.numel() for m in layers)
    kept = sum(int(m.weight_mask.sum()) for m in layers)
    dense = sum(
        m.weight.numel() * m.weight.element_size() + (0 if m.bias is None else m.bias.numel() * m.bias.element_size())
        for m in layers
    )
    stored = sum(m.stored_nbytes() for m in layers)
    return {
        "layers": len(layers),
        "sparsity": round(1 - kept / max(1, total), 6),
        "dense_bytes": dense,
        "stored_bytes": stored,
        "stored_vs_dense": round(stored / max(1, dense), 4),
    }


def path_bytes(path: Path) -> int:
    """Bytes of a file, or of the model files of a folder (weights, configs, tokenizer)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def disk_bytes(handle: ModelHandle) -> tuple[int, str]:
    """Bytes on disk of the model's saved artifact, and how they were obtained.

    When the handle still matches the file or folder it was loaded from, that artifact is measured;
    otherwise the weights are written to a temporary safetensors file and that file is measured.
    """
    if handle.artifact is not None and Path(handle.artifact).exists() and not handle.meta.get("modified"):
        return path_bytes(handle.artifact), str(handle.artifact)
    if not isinstance(handle.module, torch.nn.Module) or handle.runtime != "torch":
        return 0, "unknown"
    from safetensors.torch import save_file
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    state = {}
    for name, tensor in handle.module.state_dict(keep_vars=False).items():
        if is_traceable_wrapper_subclass(tensor):  # packed weights of other libraries: store their parts
            for i, leaf in enumerate(_leaves(tensor)):
                state.setdefault(f"{name}.{i}", leaf.contiguous())
            continue
        state.setdefault(name, tensor.contiguous())
    ptrs: set[int] = set()
    dedup = {}
    for name, tensor in state.items():
        if tensor.data_ptr() in ptrs:
            continue
        ptrs.add(tensor.data_ptr())
        dedup[name] = tensor.clone() if tensor.storage_offset() else tensor
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "model.safetensors")
        save_file(dedup, file)
        return os.path.getsize(file), "safetensors (serialised for measurement)"


def count_flops(handle: ModelHandle, inputs) -> int | None:
    """FLOPs of one forward call on ``inputs`` (torch's ``FlopCounterMode``; None for non-torch runtimes)."""
    if handle.runtime != "torch":
        return None
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        handle.call(inputs)
    return int(counter.get_total_flops())


def time_calls(fn, warmup: int = 3, repeats: int = 20, min_seconds: float = 0.0) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls
    (more repeats are taken until ``min_seconds`` of timed work have passed)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 10 * repeats:
            break
    return samples


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[float], torch.Tensor]:
    """Greedy generation with a key/value cache, as ``generate`` does it.

    Returns the prefill time (s), the time of each of the ``new_tokens`` decode steps (s), and the
    generated ids. Each step feeds only the last token and the cache, so the cost is the real
    per-token decode cost.
    """
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    next_id = out.logits[:, -1:].argmax(-1)
    prefill = time.perf_counter() - t0
    past = out.past_key_values
    steps, ids = [], [next_id]
    length = prompt.shape[1]
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        length += 1
        mask = torch.ones(prompt.shape[0], length, dtype=torch.long)
        out = model(input_ids=next_id, past_key_values=past, attention_mask=mask, use_cache=True)
        past = out.past_key_values
        next_id = out.logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - t0)
        ids.append(next_id)
    return prefill, steps, torch.cat(ids, dim=1)


def decode_benchmark(handle: ModelHandle, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 5) -> dict:
    """Prefill and decode speed of a causal LM: medians over ``repeats`` runs after one warm-up run."""
    greedy_decode(handle.module, prompt, min(new_tokens, 4))
    prefills, decode_totals, steps = [], [], []
    for _ in range(repeats):
        prefill, step_times, _ = greedy_decode(handle.module, prompt, new_tokens)
        prefills.append(prefill)
        decode_totals.append(sum(step_times))
        steps.extend(step_times)
    n_steps = new_tokens - 1
    prefill_stats = summarize(prefills)
    decode_stats = summarize(decode_totals)
    return {
        "prompt_tokens": int(prompt.shape[1]),
        "new_tokens": new_tokens,
        "prefill_s": prefill_stats,
        "prefill_tokens_per_s": prompt.shape[1] / prefill_stats["p50"],
        "decode_tokens_per_s": n_steps / decode_stats["p50"],
        "decode_tokens_per_s_spread": [n_steps / decode_stats["max"], n_steps / decode_stats["min"]],
        "step_s": summarize(steps),
    }
