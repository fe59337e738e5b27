"""`export`: write a (compressed) model in the format of the runtime that will serve it.

* ``onnx`` - causal LMs as leanml's ONNX Runtime graph (``MatMulNBits`` on leanml's own integers for
  weight-only layers, float ``MatMul`` otherwise, key/value cache inputs and outputs); other models
  exported by torch's ONNX exporter, fused by ONNX Runtime, and, when the model holds leanml's int8
  layers, with int8 kernels (dynamic ``DynamicQuantizeMatMul``/``QAttention``, or static QDQ calibrated
  on ``data``). ``dtype="fp16"`` writes fp16 weights (for GPU execution providers).
* ``safetensors`` - the leanml artifact folder (``model.safetensors`` + ``leanml.json``), which
  ``leanml.load`` rebuilds exactly.
* ``gguf`` - a GGUF file for Llama-family LLMs from leanml's own quantized weights (``Q8_0`` for
  symmetric 8-bit, ``Q4_1``/``Q4_0`` for 4-bit groups), readable by the ``gguf`` package and transformers.

Every write goes through a temporary name and a rename; an existing target is refused unless ``force``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import LeanmlError
from ..models.handle import ModelHandle

FORMATS = ("onnx", "safetensors", "gguf")
ONNX_DTYPES = ("fp32", "fp16")


def _refuse(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise LeanmlError(f"{path} exists; pass --force to replace it")


def export(
    handle: ModelHandle,
    fmt: str,
    path: str | os.PathLike,
    *,
    force: bool = False,
    dtype: str = "fp32",
    data=None,
    accuracy_level: int = 4,
) -> dict:
    """Write ``handle`` as ``fmt`` to ``path`` and return a report (what was written, bytes, notes)."""
    if fmt not in FORMATS:
        raise LeanmlError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if handle.runtime != "torch":
        raise LeanmlError(f"model {handle.name!r} runs on {handle.runtime}; export takes a torch model or a leanml artifact")
    path = Path(path)
    if fmt == "safetensors":
        from ..artifact import save_artifact

        save_artifact(handle, path, recipe=handle.meta.get("recipe"), force=force)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return {"format": fmt, "path": str(path), "bytes": size, "reload": "leanml.load(path)"}
    if fmt == "gguf":
        if handle.task != "causal-lm":
            raise LeanmlError(f"GGUF holds causal LMs; model {handle.name!r} is a {handle.task} model (use onnx or safetensors)")
        from .gguf import export_gguf

        return {"format": fmt, **export_gguf(handle, path, force=force)}
    if dtype not in ONNX_DTYPES:
        raise LeanmlError(f"ONNX dtype {dtype!r} is not one of {', '.join(ONNX_DTYPES)}")
    _refuse(path, force)
    if handle.task == "causal-lm":
        if dtype != "fp32":
            raise LeanmlError(
                "the causal-LM ONNX graph is written in fp32 with leanml's integer weights; dtype fp16 is "
                "offered for other models"
            )
        from ..accelerate.llm_onnx import build_llm_onnx

        report = build_llm_onnx(handle, path, accuracy_level=accuracy_level)
        return {"format": fmt, "path": str(path), **report}
    return _export_onnx_graph(handle, path, dtype, data)


def _export_onnx_graph(handle: ModelHandle, path: Path, dtype: str, data) -> dict:
    """Export through the ONNX Runtime preparation (fusions, int8 kernels) and move the final graph to ``path``."""
    from ..accelerate.runtimes import _int8_mode

    with tempfile.TemporaryDirectory(prefix=".leanml-export-", dir=path.parent if path.parent.exists() else None) as tmp:
        work = Path(tmp)
        if dtype == "fp16":
            if _int8_mode(handle.module):
                raise LeanmlError("an int8 model cannot also be exported as fp16; export it in fp32 (its int8 kernels)")
            from ..accelerate.onnx_export import export_onnx

            export_onnx(handle, work / "model.onnx", dtype="fp16")
            report = {"dtype": "fp16"}
            final = work / "model.onnx"
        else:
            from ..accelerate.runtimes import prepare

            prepared = prepare(handle, "onnxruntime", workdir=work, data=data)
            report = {k: v for k, v in prepared.meta["runtime_report"].items() if k != "providers"}
            final = Path(prepared.module.path)
            del prepared
        path.parent.mkdir(parents=True, exist_ok=True)
        import onnx

        model = onnx.load(str(final))  # weights inlined: one self-contained file
        fd, tmp_out = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            onnx.save_model(model, tmp_out)
            os.replace(tmp_out, path)
        finally:
            if os.path.exists(tmp_out):
                os.unlink(tmp_out)
    return {"format": "onnx", "path": str(path), "bytes": path.stat().st_size, **report}
