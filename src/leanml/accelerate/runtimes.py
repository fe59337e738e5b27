"""Runtimes: what runs a model, and so what is measured.

:func:`prepare` takes a :class:`~leanml.models.ModelHandle` (float or compressed) and returns a handle
whose module runs on the named runtime, with the same call signature, so every measurement
(latency, decode, perplexity, Spearman, accuracy) is taken the same way on each:

* ``torch`` - eager PyTorch, with Conv/Linear + BatchNorm folded (exact up to float rounding);
* ``torch-compile`` - the same, compiled by ``torch.compile`` (inductor);
* ``onnxruntime`` - ONNX Runtime with graph optimisation on and real integer kernels:
  causal LMs as a hand-built graph with ``MatMulNBits`` on leanml's integers and a key/value cache
  (:mod:`~leanml.accelerate.llm_onnx`); other models exported, fused (attention, layer norm, GELU for
  encoders) and, when the handle holds leanml's int8 layers, run on int8 kernels whose weights are
  exactly leanml's codes (dynamic: ``DynamicQuantizeMatMul``/``QAttention``; static: QDQ →
  ``QLinearConv``/``QLinearMatMul`` with ranges calibrated on the given data).

The runtime handle keeps the torch handle it came from in ``meta["torch_handle"]`` (parameters, FLOPs
and the roofline are properties of the model, counted there) and what the runtime did in
``meta["runtime_report"]`` (fusions, kernels, graph bytes, providers).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch

from ..errors import LeanmlError
from ..models.handle import ModelHandle

RUNTIMES = ("torch", "torch-compile", "onnxruntime")


def check_runtime(name: str) -> str:
    if name not in RUNTIMES:
        raise LeanmlError(f"runtime {name!r} is not one of {', '.join(RUNTIMES)}")
    return name


def _twin(handle: ModelHandle, module: torch.nn.Module, runtime: str, report: dict) -> ModelHandle:
    new = ModelHandle(
        module=module,
        task=handle.task,
        name=handle.name,
        tokenizer=handle.tokenizer,
        example_inputs=handle.example_inputs,
        source=handle.source,
        artifact=handle.artifact,
        runtime=runtime,
        max_length=handle.max_length,
    )
    new.meta.update({k: v for k, v in handle.meta.items() if k not in ("reports", "torch_handle", "runtime_report")})
    new.meta["torch_handle"] = handle
    new.meta["runtime_report"] = report
    return new


def prepare(
    handle: ModelHandle,
    runtime: str = "torch",
    *,
    threads: int | None = None,
    device: str = "auto",
    data=None,
    workdir: str | os.PathLike | None = None,
    accuracy_level: int = 4,
) -> ModelHandle:
    """``handle`` made ready to run on ``runtime`` (see the module docstring).

    ``data`` calibrates static int8 activations on ONNX Runtime (its calibration split); ``workdir``
    keeps the ONNX files (a temporary folder otherwise, removed once the session has loaded them);
    ``accuracy_level`` is the compute type of ONNX Runtime's 4-bit/8-bit weight-only products.
    """
    check_runtime(runtime)
    if handle.runtime != "torch":
        if handle.runtime == runtime:
            return handle
        raise LeanmlError(f"model {handle.name!r} already runs on {handle.runtime}; load the torch model to use {runtime}")
    if runtime == "torch":
        return _torch(handle)
    if runtime == "torch-compile":
        return _torch_compile(handle)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        return _onnxruntime(handle, Path(workdir), threads, device, data, accuracy_level)
    with tempfile.TemporaryDirectory(prefix="leanml-ort-") as tmp:
        return _onnxruntime(handle, Path(tmp), threads, device, data, accuracy_level)


def _has_batchnorm(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _torch(handle: ModelHandle) -> ModelHandle:
    if not _has_batchnorm(handle.module):
        return _twin(handle, handle.module, "torch", {"fusions": []})
    from .fusion import fold_batchnorm

    folded, fusions = fold_batchnorm(handle.module)
    return _twin(handle, folded, "torch", {"fusions": fusions})


def _torch_compile(handle: ModelHandle) -> ModelHandle:
    base = _torch(handle)
    compiled = torch.compile(base.module)
    report = {
        "fusions": base.meta["runtime_report"]["fusions"] + ["inductor: pointwise/reduction fusion, C++ codegen"],
        "backend": "inductor",
    }
    return _twin(handle, compiled, "torch-compile", report)


class _SamePadConv2d(torch.nn.Conv2d):
    """The float twin of an int8 conv with TensorFlow "SAME" padding computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..quantize.modules import same_pad

        return super().forward(same_pad(x, self.kernel_size, self.stride, self.dilation))


def float_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` with leanml's quantized layers turned back into float ones holding the
    dequantized weights (what an exporter can trace); the int8 codes are recovered exactly from these
    weights by a per-channel symmetric int8 quantizer."""
    from ..quantize.modules import CastLinear, CodebookLinear, Int8ActConv2d, Int8ActLinear, QuantEmbedding, QuantLinear
    from ..targeting import set_module

    twin = copy.deepcopy(module)
    for name, m in list(twin.named_modules()):
        if isinstance(m, (QuantLinear, Int8ActLinear, CodebookLinear, CastLinear)):
            layer = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            layer.weight = torch.nn.Parameter(m.weight.detach().float().clone())
            if m.bias is not None:
                layer.bias = torch.nn.Parameter(m.bias.detach().float().clone())
            set_module(twin, name, layer)
        elif isinstance(m, Int8ActConv2d):
            kind = _SamePadConv2d if m.pad_same else torch.nn.Conv2d
            conv = kind(m.in_channels, m.out_channels, m.kernel_size, bias=m.bias is not None, **m.conv_args)
            conv.weight = torch.nn.Parameter(m.weight.detach().float().clone())
            if m.bias is not None:
                conv.bias = torch.nn.Parameter(m.bias.detach().float().clone())
            set_module(twin, name, conv)
        elif isinstance(m, QuantEmbedding):
            set_module(
                twin,
                name,
                torch.nn.Embedding.from_pretrained(m.weight.detach().float().clone(), freeze=True, padding_idx=m.padding_idx),
            )
    return twin.eval()


def _int8_mode(module: torch.nn.Module) -> str | None:
    from ..quantize.modules import Int8ActConv2d, Int8ActLinear

    modes = {m.mode for m in module.modules() if isinstance(m, (Int8ActLinear, Int8ActConv2d))}
    if len(modes) > 1:
        raise LeanmlError("the model mixes static and dynamic int8 layers; ONNX Runtime takes one kind per graph")
    return modes.pop() if modes else None


def _onnx_scope(name: str) -> str:
    """The node-name scope the ONNX exporter gives module ``name``: ``encoder.layer.0.output.dense`` ->
    ``/encoder/layer.0/output/dense/`` (list indices stay joined to their list by a dot)."""
    out = ""
    for part in name.split("."):
        out += f".{part}" if part.isdigit() and out else f"/{part}"
    return out + "/"


def _float_nodes(module: torch.nn.Module, graph_path: Path) -> tuple[tuple[str, ...], str]:
    """The ONNX MatMul/Gemm nodes of the Linear layers leanml left float (targets/ignore, output heads), so
    ONNX Runtime quantizes exactly the layers the simulated model has in int8; and ``"float"`` for the fused
    attention when a float layer was fused into it (its MatMul is gone from the graph), else "qattention"."""
    import onnx

    from ..quantize.modules import Int8ActLinear

    kept = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and not isinstance(m, Int8ActLinear)]
    if not kept:
        return (), "qattention"
    nodes = [n for n in onnx.load(str(graph_path), load_external_data=False).graph.node if n.op_type in ("MatMul", "Gemm")]
    exclude, fused_away = [], False
    for name in kept:
        scope = _onnx_scope(name)
        mine = [n.name for n in nodes if scope in n.name]
        exclude += mine
        fused_away = fused_away or not mine
    return tuple(dict.fromkeys(exclude)), "float" if fused_away else "qattention"


def _calibration_feeds(handle: ModelHandle, data, names: list[str], limit: int = 16):
    """Calibration inputs for static int8 on ONNX Runtime, from ``data``'s calibration split."""
    from ..data import TensorData
    from ..models.inputs import text_batch

    if isinstance(data, TensorData):
        x, _ = data.tensors("calib")
        return [{names[0]: x[i : i + 8].numpy()} for i in range(0, min(len(x), 8 * limit), 8)]
    if data is not None and handle.tokenizer is not None and hasattr(data, "documents"):
        docs = data.documents("calib")[: 8 * limit]
        feeds = []
        for i in range(0, len(docs), 8):
            batch = text_batch(handle.tokenizer, docs[i : i + 8], handle.max_length)
            feeds.append({k: v.numpy() for k, v in batch.items() if k in names})
        return feeds
    raise LeanmlError("static int8 on onnxruntime needs calibration data (--data) with a calibration split")


def _onnxruntime(handle: ModelHandle, work: Path, threads: int | None, device: str, data, accuracy_level: int) -> ModelHandle:
    from .devices import ort_providers

    providers = ort_providers(device)
    if handle.task == "causal-lm":
        from .llm_onnx import OrtCausalLM, build_llm_onnx

        report = build_llm_onnx(handle, work / "model.onnx", accuracy_level=accuracy_level)
        module = OrtCausalLM(work / "model.onnx", threads=threads, providers=providers)
        report.update(
            {
                "providers": providers,
                "graph": "leanml LLM graph (GroupQueryAttention + KV cache)",
                "fusions": [
                    "q/k/v and gate/up products fused",
                    "residual add + norm (SkipSimplifiedLayerNorm, or SkipLayerNorm for LayerNorm families)",
                    "rotary + attention + cache (GroupQueryAttention)",
                ],
            }
        )
        return _twin(handle, module, "onnxruntime", report)
    from ..models.onnx_module import OrtModule
    from .onnx_export import export_onnx
    from .ort_optimize import CPU_INT8_SKIP, optimize_onnx

    mode = _int8_mode(handle.module)
    floaty = copy.copy(handle)
    floaty.module = float_twin(handle.module)
    folded = _torch(floaty)
    plain = export_onnx(folded, work / "plain.onnx")
    report: dict = {"providers": providers, "fusions": list(folded.meta["runtime_report"]["fusions"])}
    fused = work / "fused.onnx"
    if mode == "static":
        # static QDQ wants the graph before ORT's fusions; ORT fuses Q/DQ into integer kernels itself
        fused = plain
    else:
        # SkipLayerNorm/BiasGelu fusions are slower than the plain ops next to int8 MatMuls on CPU
        skip = CPU_INT8_SKIP if mode == "dynamic" and "CUDAExecutionProvider" not in providers else ()
        report["fusions"] += optimize_onnx(plain, fused, skip=skip)
    final = fused
    if mode == "dynamic":
        from .onnx_dynamic import quantize_dynamic_onnx

        final = work / "int8.onnx"
        exclude, attention = _float_nodes(handle.module, fused)
        report["int8"] = quantize_dynamic_onnx(fused, final, per_channel=True, exclude=exclude, attention=attention)
    elif mode == "static":
        import onnx

        from .onnx_static import quantize_static_onnx

        names = [i.name for i in onnx.load(str(plain), load_external_data=False).graph.input]
        final = work / "int8.onnx"
        report["int8"] = quantize_static_onnx(plain, final, _calibration_feeds(handle, data, names), per_channel=True)
    module = OrtModule(final, threads=threads, providers=providers)
    report["bytes"] = sum(p.stat().st_size for p in work.glob(final.name + "*"))
    if mode is not None:
        report["agreement"] = _check_int8_agreement(handle, module, data, mode)
    return _twin(handle, module, "onnxruntime", report)


INT8_AGREEMENT_DB = 8.0  # least SQNR of ONNX Runtime's int8 output against leanml's simulated int8 model


def _agreement_inputs(handle: ModelHandle, data):
    """Held-out inputs for the runtime check: the data's check split (not what calibrated), else the
    handle's example inputs."""
    from ..data import TensorData
    from ..models.inputs import text_batch

    if isinstance(data, TensorData):
        x, _ = data.tensors("check")
        if len(x) == 0:
            x, _ = data.tensors("eval")
        return (x[:64],), f"{min(64, len(x))} inputs of the data's check split"
    if data is not None and handle.tokenizer is not None and hasattr(data, "documents"):
        docs = data.documents("check")[:32] or data.documents("eval")[:32]
        if docs:
            return text_batch(handle.tokenizer, docs, handle.max_length), f"{len(docs)} texts of the data's check split"
    return handle.example_inputs, "the model's example inputs"


@torch.no_grad()
def _check_int8_agreement(handle: ModelHandle, module, data, mode: str) -> dict | None:
    """ONNX Runtime quantizes the float graph itself (its own activation ranges): its output must stay near
    the simulated int8 model leanml calibrated and measured, or the figures would be of another model."""
    from ..models.handle import output_tensor, sqnr_db

    inputs, what = _agreement_inputs(handle, data)
    if inputs is None:
        return None
    run = ModelHandle(module=module, task=handle.task, name=handle.name, runtime="onnxruntime")
    try:
        sim = output_tensor(handle.call(inputs)).double()
        got = output_tensor(run.call(inputs)).double()
    except Exception:  # noqa: BLE001 - inputs the graph does not take are refused when it is timed
        return None
    if sim.shape != got.shape:
        return None
    sqnr = sqnr_db(sim, got)
    out = {"inputs": what, "sqnr_db": sqnr, "floor_db": INT8_AGREEMENT_DB}
    if sim.ndim == 2 and sim.shape[1] > 1:
        out["top1_agreement"] = float((sim.argmax(-1) == got.argmax(-1)).double().mean())
    if not (torch.isfinite(got).all() and sqnr >= INT8_AGREEMENT_DB):
        top1 = f", top-1 agreement {out['top1_agreement']:.2f}" if "top1_agreement" in out else ""
        raise LeanmlError(
            f"ONNX Runtime's {mode} int8 graph of {handle.name!r} diverges from leanml's simulated int8 model: output "
            f"SQNR {sqnr:.1f} dB < {INT8_AGREEMENT_DB:g} dB{top1} on {what}; serve it with --runtime torch, or use "
            f"{'int8-dynamic' if mode == 'static' else 'weight-only 8-bit'} for onnxruntime"
        )
    return out
