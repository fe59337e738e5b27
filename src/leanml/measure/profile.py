"""`profile`: measure a model's cost (and quality, when data is given) on a runtime and a hardware profile."""

from __future__ import annotations

import os
import platform
import time

import torch

from ..data import SimilarityPairs, TensorData, TextCorpus, TextRecords, load_data
from ..errors import LeanmlError
from ..models import ModelHandle, load_model
from ..models.inputs import default_example_inputs, text_batch, text_prompt
from .cost import count_flops, count_params, decode_benchmark, disk_bytes, sparse_accounting, time_calls, weight_bytes
from .hardware import get_profile, usd_per_million
from .quality import check_data_for, check_reference, evaluate, fidelity, fidelity_note, quality_notes
from .record import Measurement
from .stats import summarize
from .system import PeakMemory, RaplMeter, check_threads, cpu_name, memory_bandwidth_gbs, torch_threads

DEFAULT_PROMPT_TOKENS = 64
DEFAULT_NEW_TOKENS = 32
TORCH_RUNTIMES = ("torch", "torch-compile")


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise LeanmlError(f"{name} {value!r} is not accepted; give a whole number ≥ 1")


def check_device(handle: ModelHandle, runtime: str, device: str) -> list[str]:
    """Refuse a ``device`` the run would not use; the notes to add when ``auto`` leaves hardware unused.

    The torch runtimes are timed on the CPU (the timers, memory and energy meters here are the CPU's),
    so an explicit ``cuda``/``mps`` is refused for them rather than ignored, and absent hardware is an
    error (:func:`~leanml.accelerate.devices.torch_device`). On ONNX Runtime the providers follow
    ``device``; a model that already is an ONNX Runtime session keeps the providers it was loaded on,
    so an explicit device that differs from them is refused.
    """
    from ..accelerate.devices import ort_providers, torch_device

    if runtime in TORCH_RUNTIMES:
        chosen = torch_device(device)
        if chosen.type == "cpu":
            return []
        if device != "auto":
            raise LeanmlError(
                f"device {device!r} is not used by the {runtime} runtime: profile times torch models on the CPU "
                f"only; pass --device cpu or auto, or --runtime onnxruntime to run on {device}"
            )
        return [f"device auto: {chosen.type} is present, but the {runtime} runtime is profiled on the CPU"]
    providers = ort_providers(device)
    session = getattr(handle.module, "session", None)
    if runtime == handle.runtime and device != "auto" and hasattr(session, "get_providers"):
        used = list(session.get_providers())
        if used and used[0] != providers[0]:
            raise LeanmlError(
                f"model {handle.name!r} is an ONNX Runtime session already running on {used[0]}; device {device!r} "
                f"would need {providers[0]}: pass --device auto to profile it as loaded"
            )
    return []


def bytes_read_per_token(module: torch.nn.Module) -> int:
    """Weight bytes a decode step reads: every weight once, except embedding tables that are only
    indexed (one row per token) - unless the table is tied to the output projection."""
    total = weight_bytes(module)
    linear_ptrs = {m.weight.data_ptr() for m in module.modules() if isinstance(m, torch.nn.Linear)}
    for m in module.modules():
        if isinstance(m, torch.nn.Embedding) and m.weight.data_ptr() not in linear_ptrs:
            total -= m.weight.numel() * m.weight.element_size()
    return total


def example_inputs(handle: ModelHandle, data, batch: int | None, seq_len: int | None):
    """Inputs for the timed calls and how many items they hold."""
    if handle.task == "causal-lm":
        length = seq_len or DEFAULT_PROMPT_TOKENS
        if isinstance(data, TextCorpus) and handle.tokenizer is not None:
            ids = data.tokens(handle.tokenizer)[:length]
            if len(ids) >= length:
                return {"input_ids": ids[None]}, length
        if handle.tokenizer is not None:
            return {"input_ids": text_prompt(handle.tokenizer, length)}, length
        return default_example_inputs(handle, seq_len=length), length
    if (
        handle.tokenizer is not None
        and handle.task in ("sentence-embedding", "sequence-classification")
        and (isinstance(data, (SimilarityPairs, TextRecords, TextCorpus)))
    ):
        docs = data.documents("eval")
        n = batch or min(50, len(docs))
        texts = [docs[i % len(docs)] for i in range(n)]
        return text_batch(handle.tokenizer, texts, seq_len or handle.max_length), n
    if isinstance(data, TensorData):
        x, _ = data.tensors("eval")
        n = batch or min(64, len(x))
        x = x[torch.arange(n) % len(x)]
        return (x,), n
    inputs = handle.example_inputs
    if inputs is None:
        raise LeanmlError(f"cannot tell what inputs model {handle.name!r} takes; pass --data with example inputs")
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
    if batch and handle.runtime == "torch":
        reps = (batch + first.shape[0] - 1) // first.shape[0]
        cut = lambda t: t.repeat(reps, *([1] * (t.ndim - 1)))[:batch]  # noqa: E731
        inputs = {k: cut(v) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(cut(v) for v in inputs)
        return inputs, batch
    return inputs, int(first.shape[0])


def _with_data_inputs(handle: ModelHandle, data: TensorData) -> ModelHandle:
    """A copy of ``handle`` (the same module) whose example inputs are a few rows of the data."""
    import copy

    from ..models.inputs import data_example

    out = copy.copy(handle)
    out.example_inputs = data_example(data)
    out.meta = {k: v for k, v in handle.meta.items() if k != "example_inputs"}
    return out


def profile(
    model: str | ModelHandle,
    data=None,
    hardware: str | None = None,
    threads: int | None = None,
    batch: int | None = None,
    seq_len: int | None = None,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    repeats: int | None = None,
    reference: str | ModelHandle | None = None,
    price_per_hour: float | None = None,
    measure_quality: bool = True,
    runtime: str | None = None,
    device: str = "auto",
) -> Measurement:
    """Measure ``model`` on ``runtime`` (default: the one it is loaded on): size, FLOPs, speed, memory,
    energy, dollars and quality. Parameters, FLOPs and the roofline are counted on the torch model a
    runtime was prepared from; bytes on disk are the runtime's own files."""
    check_threads(threads)
    for name, value in (
        ("threads", threads),
        ("batch", batch),
        ("seq_len", seq_len),
        ("new_tokens", new_tokens),
        ("repeats", repeats),
    ):
        _check_positive(name, value)
    if new_tokens < 2:
        raise LeanmlError(f"new_tokens {new_tokens} is too small; decode speed needs at least 2")
    from ..accelerate.devices import check_device_name

    check_device_name(device)
    if runtime is not None:
        from ..accelerate.runtimes import check_runtime

        check_runtime(runtime)
    profile_hw = get_profile(hardware, price_per_hour)
    # everything the user can get wrong is refused here, before a runtime is prepared or anything is timed
    if not isinstance(model, ModelHandle):
        check_fits_whole(model)
    handle = model if isinstance(model, ModelHandle) else load_model(model)
    notes: list[str] = check_device(handle, runtime or handle.runtime, device)
    data = load_data(data) if data is not None else None
    check_data_for(handle, data, verb="profile")
    ref = reference if (reference is None or isinstance(reference, ModelHandle)) else load_model(reference)
    if ref is not None:
        check_reference(handle, ref, data)
    if isinstance(data, TensorData) and handle.is_torch and handle.tokenizer is None:
        handle = _with_data_inputs(handle, data)  # a runtime is prepared (exported) for the data's shapes
    if runtime is not None and runtime != handle.runtime:
        from ..accelerate.runtimes import prepare

        handle = prepare(handle, runtime, threads=threads, device=device, data=data)
    twin = handle.meta.get("torch_handle") or handle
    if hasattr(handle.module, "set_threads") and threads:
        handle.module.set_threads(threads)
    if handle.meta.get("example_inputs") and not isinstance(data, TensorData):  # the inputs timed were guessed
        notes.append(handle.meta["example_inputs"])
    with torch_threads(threads) as n_threads:
        inputs, items = example_inputs(handle, data, batch, seq_len)
        flops = count_flops(twin, inputs)
        rapl, peak = RaplMeter(), PeakMemory()
        decode = None
        with torch.no_grad():
            if handle.task == "causal-lm":
                with peak, rapl:
                    t0 = time.perf_counter()
                    decode = decode_benchmark(handle, inputs["input_ids"], new_tokens, repeats or 5)
                    elapsed = time.perf_counter() - t0
                latency = {k: v * 1e3 if k != "n" else v for k, v in decode["step_s"].items()}
                throughput = decode["decode_tokens_per_s"]
                items_done = decode["step_s"]["n"] + (repeats or 5) * decode["prompt_tokens"]
                item, batch_size = "token", 1
            else:
                with peak, rapl:
                    t0 = time.perf_counter()
                    samples = time_calls(lambda: handle.call(inputs), warmup=3, repeats=repeats or 20, min_seconds=1.0)
                    elapsed = time.perf_counter() - t0
                stats = summarize(samples)
                latency = {k: v * 1e3 if k != "n" else v for k, v in stats.items()}
                throughput = items / stats["p50"]
                items_done = items * (len(samples) + 3)
                item, batch_size = ("sequence" if handle.tokenizer is not None else "input"), items
        seconds_per_item = 1.0 / throughput
        if rapl.joules is not None:
            energy, energy_source = rapl.joules / items_done, "rapl"
            notes.append("RAPL counts the whole CPU package, including other processes")
        else:
            energy, energy_source = profile_hw.power_w * seconds_per_item, "power-model"
        quality = evaluate(handle, data) if (data is not None and measure_quality) else None
        if data is not None and measure_quality:
            notes.extend(quality_notes(handle, data))
        fid = fidelity(handle, ref, data) if (ref is not None and data is not None) else None
        if fid is not None and fidelity_note(fid):
            notes.append(fidelity_note(fid))
        bandwidth = roofline = fraction = None
        if handle.task == "causal-lm" and twin.runtime == "torch":
            bandwidth = memory_bandwidth_gbs()
            roofline = bandwidth * 1e9 / bytes_read_per_token(twin.module)
            fraction = decode["decode_tokens_per_s"] / roofline
    is_torch = isinstance(twin.module, torch.nn.Module) and twin.runtime == "torch"
    report = handle.meta.get("runtime_report")
    if handle.runtime != "torch" and report and report.get("bytes"):
        disk, disk_source = int(report["bytes"]), f"{handle.runtime} files"
    else:
        disk, disk_source = disk_bytes(twin)
    if report and report.get("fusions"):
        notes.append("fusions: " + "; ".join(report["fusions"]))
    sparse = sparse_accounting(twin.module) if isinstance(twin.module, torch.nn.Module) else None
    if sparse:
        notes.append(
            f"{sparse['layers']} layers {sparse['sparsity']:.1%} sparse: stored as bitmask + values "
            f"({sparse['stored_vs_dense']:.2f}x their dense bytes); compute is dense, so the latency "
            "above is what the sparsity buys on this runtime"
        )
    seq = int(inputs["input_ids"].shape[1]) if isinstance(inputs, dict) and "input_ids" in inputs else None
    flops_per_item = None
    if flops is not None:
        flops_per_item = flops / (seq if handle.task == "causal-lm" else items)
    if elapsed > 0 and energy_source == "power-model":
        notes.append(f"energy = {profile_hw.power_w} W ({profile_hw.name}) × measured time per item")
    return Measurement(
        model=handle.name,
        task=handle.task,
        runtime=handle.runtime,
        hardware=profile_hw.name,
        threads=n_threads,
        item=item,
        batch_size=batch_size,
        seq_len=seq,
        params=count_params(twin.module) if is_torch else 0,
        weight_bytes=weight_bytes(twin.module) if is_torch else disk,
        disk_bytes=disk,
        disk_source=disk_source,
        flops_per_item=flops_per_item,
        latency_ms=latency,
        throughput_per_s=throughput,
        peak_memory_bytes=peak.peak_bytes,
        peak_memory_method=peak.method,
        energy_j_per_item=energy,
        energy_source=energy_source,
        usd_per_million=usd_per_million(seconds_per_item, profile_hw),
        usd_per_hour=profile_hw.usd_per_hour,
        quality=quality,
        fidelity=fid,
        prefill_tokens_per_s=decode["prefill_tokens_per_s"] if decode else None,
        decode_tokens_per_s=decode["decode_tokens_per_s"] if decode else None,
        decode_roofline_tokens_per_s=roofline,
        roofline_fraction=fraction,
        memory_bandwidth_gbs=bandwidth,
        decode=decode,
        sparse=sparse,
        host=host_info(),
        notes=notes,
    )


def host_info() -> dict:
    from .. import __version__

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "leanml": __version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def check_fits_whole(model) -> None:
    """A one-line error when ``model`` (a Hugging Face folder or a GGUF file) takes more memory in fp32
    than is available: measuring runs it whole, and the system would kill the process part way."""
    from pathlib import Path

    import psutil

    from ..models.lazy import fp32_bytes_of_folder, fp32_bytes_of_gguf

    path = Path(str(model)).expanduser()
    fp32 = None
    if path.is_file() and path.suffix.lower() == ".gguf":
        fp32 = fp32_bytes_of_gguf(path)
    elif path.is_dir() and (path / "config.json").is_file() and not (path / "leanml.json").exists():
        fp32 = fp32_bytes_of_folder(path)
    available = psutil.virtual_memory().available
    if fp32 is not None and fp32 > available:
        raise LeanmlError(
            f"model '{path}' takes {fp32 / 1e9:.1f} GB in fp32, more than the {available / 1e9:.1f} GB of memory "
            f"available, and profile runs a model whole; compress it layer by layer first (leanml compress '{path}' "
            "--lazy ..., which also measures the original's perplexity one block at a time) and profile the artifact"
        )
