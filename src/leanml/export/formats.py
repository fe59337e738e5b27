"""`export`: write a (compressed) model in the format of the runtime that will serve it.

* ``onnx`` - causal LMs as leanml's ONNX Runtime graph (``MatMulNBits`` on leanml's own integers for
  weight-only layers, float ``MatMul`` otherwise, key/value cache inputs and outputs); other models
  exported by torch's ONNX exporter, fused by ONNX Runtime, and, when the model holds leanml's int8
  layers, with int8 kernels (dynamic ``DynamicQuantizeMatMul``/``QAttention``, or static QDQ calibrated
  on ``data``). ``dtype="fp16"`` writes fp16 weights (for GPU execution providers).
* ``safetensors`` - the leanml artifact folder (``model.safetensors`` + ``leanml.json``), which
  ``leanml.load`` rebuilds exactly.
* ``gguf`` - a GGUF file for decoder LLMs of the families in :mod:`leanml.models.arch` from leanml's own
  quantized weights (``Q8_0`` for symmetric 8-bit, ``Q4_1``/``Q4_0`` for 4-bit groups), readable by the
  ``gguf`` package and transformers.

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


def check_export_args(fmt: str, path, force: bool, dtype: str = "fp32") -> Path:
    """Every cheap check of an export, before the model is loaded."""
    from ..outputs import check_file_target, check_folder_target

    if fmt not in FORMATS:
        raise LeanmlError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "onnx" and dtype not in ONNX_DTYPES:
        raise LeanmlError(f"ONNX dtype {dtype!r} is not one of {', '.join(ONNX_DTYPES)}")
    if fmt == "safetensors":
        return check_folder_target(path, force)
    return check_file_target(path, force)


def _check_space(handle: ModelHandle, path: Path) -> None:
    """Refuse at once when the disk cannot hold the export (its float weights bound its size)."""
    import torch

    from ..measure.cost import weight_bytes
    from ..outputs import check_free_space

    if isinstance(handle.module, torch.nn.Module):
        check_free_space(path.parent, weight_bytes(handle.module), f"the export {str(path)!r}")


def _refuse(path: Path, force: bool) -> None:
    from ..outputs import check_file_target

    check_file_target(path, force)


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
    check_export_args(fmt, path, force, dtype)
    _check_space(handle, Path(path))
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
        return _export_llm_onnx(handle, path, accuracy_level, force)
    return _export_onnx_graph(handle, path, dtype, data, force)


SINGLE_FILE_LIMIT = 1_800_000_000  # protobuf's 2 GB limit, with room: larger graphs keep a weights file


def _export_llm_onnx(handle: ModelHandle, path: Path, accuracy_level: int, force: bool) -> dict:
    """The causal-LM graph, built in a temporary folder beside ``path`` and published atomically: one
    self-contained file when it fits, else the graph and a weights file whose name is new on every export
    (the graph is renamed into place last, so a reader sees the old pair or the new pair, never a mix)."""
    import shutil
    import uuid

    import onnx

    from ..accelerate.llm_onnx import build_llm_onnx, point_external_data
    from ..outputs import clean_leftovers, fault_point, new_file

    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    try:
        built = work / "model.onnx"
        report = build_llm_onnx(handle, built, accuracy_level=accuracy_level)
        data = built.with_name(built.name + ".data")
        size = built.stat().st_size + (data.stat().st_size if data.exists() else 0)
        old_data = _external_data_names(path) if path.exists() else set()
        with new_file(path, force) as tmp:
            if size < SINGLE_FILE_LIMIT:
                onnx.save_model(onnx.load(str(built)), str(tmp))  # weights inlined: one file
                new_data = None
            else:
                new_data = f"{path.name}.{uuid.uuid4().hex[:8]}.data"
                os.replace(data, path.parent / new_data)
                point_external_data(onnx, built, new_data)
                os.replace(built, tmp)
            fault_point("export-written")
        for name in old_data - {new_data}:  # the previous export's weights file, no longer referenced
            (path.parent / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files = [path] + ([path.parent / new_data] if new_data else [])
    report["bytes"] = sum(f.stat().st_size for f in files)
    return {"format": "onnx", "path": str(path), **report}


def _external_data_names(path: Path) -> set[str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX file: nothing of ours to remove
        return set()
    names = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return {n for n in names if n.startswith(path.name + ".") and n.endswith(".data") and os.sep not in n}


def _export_onnx_graph(handle: ModelHandle, path: Path, dtype: str, data, force: bool = False) -> dict:
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
        from ..outputs import fault_point, new_file

        with new_file(path, force) as tmp_out:
            onnx.save_model(model, str(tmp_out))
            fault_point("export-written")
    return {"format": "onnx", "path": str(path), "bytes": path.stat().st_size, **report}
