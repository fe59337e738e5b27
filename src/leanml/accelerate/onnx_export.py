"""Export a non-causal :class:`~leanml.models.ModelHandle` to ONNX with the TorchScript exporter.

The graph takes the handle's example inputs by name (Hugging Face text models: ``input_ids``,
``attention_mask`` and ``token_type_ids`` when the model takes it; image models: ``pixel_values``;
other modules: ``input`` or ``input_0, input_1, ...``) with a dynamic batch axis (and a dynamic
sequence axis for 2-D integer token inputs), and returns one tensor: the model's main output
(``last_hidden_state`` for encoders, ``logits`` for classifiers, else the first output).

Hugging Face models are exported with the eager attention implementation (restored afterwards): the
SDPA path traces to a graph that ONNX Runtime's BERT fusion does not recognise.

``dtype="fp16"`` writes fp16 weights and compute for GPUs (ONNX Runtime's float16 converter, with
``keep_io_types``: the graph's float inputs and outputs stay fp32, casts are inserted at the edges).
Causal LMs are not exported here; :mod:`leanml.accelerate.llm_onnx` builds their graph.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from leanml.errors import LeanmlError
from leanml.models.handle import ModelHandle, output_tensor

DTYPES = ("fp32", "fp16")
MIN_OPSET, MAX_OPSET = 14, 20  # 14: Trilu/HardSwish etc.; the TorchScript exporter stops at 20


class _MainOutput(torch.nn.Module):
    """Positional tensors in (in ``names`` order), the main output tensor out."""

    def __init__(self, model: torch.nn.Module, names: list[str] | None):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.names is None:
            return output_tensor(self.model(*args))
        return output_tensor(self.model(**dict(zip(self.names, args, strict=True))))


def _accepted_kwargs(model: torch.nn.Module) -> list[str] | None:
    """Keyword names ``model.forward`` takes, in order, or None when its signature cannot be read."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _inputs(handle: ModelHandle) -> tuple[list[str], list[torch.Tensor], bool]:
    """Input names, tensors, and whether they are passed by keyword."""
    example = handle.example_inputs
    if isinstance(example, torch.Tensor):
        example = (example,)
    if isinstance(example, dict):
        accepted = _accepted_kwargs(handle.module)
        items = [(k, v) for k, v in example.items() if isinstance(v, torch.Tensor) and (accepted is None or k in accepted)]
        if accepted is not None:  # the order of forward()'s signature: input_ids, attention_mask, token_type_ids
            items.sort(key=lambda kv: accepted.index(kv[0]))
        if not items:
            raise LeanmlError(
                f"model {handle.name!r}: none of its example inputs ({', '.join(example)}) is a tensor "
                "its forward() takes; give the handle example inputs to export it"
            )
        return [k for k, _ in items], [v for _, v in items], True
    if isinstance(example, (tuple, list)) and example and all(isinstance(v, torch.Tensor) for v in example):
        names = ["input"] if len(example) == 1 else [f"input_{i}" for i in range(len(example))]
        return names, list(example), False
    raise LeanmlError(
        f"model {handle.name!r} has no example inputs (a dict or tuple of tensors) to trace the export with; "
        "load it with data or set handle.example_inputs"
    )


def _is_text_ids(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and not t.is_floating_point() and name not in ("pixel_values",)


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Use the eager attention implementation of a Hugging Face model inside the block, then restore it."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None) if config is not None else None
    if config is None or before in (None, "eager"):
        yield
        return
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if callable(setter):
            setter("eager")
        else:
            config._attn_implementation = "eager"
        yield
    finally:
        if callable(setter):
            setter(before)
        else:
            config._attn_implementation = before


def _check(handle: ModelHandle, opset: int, dtype: str) -> None:
    if not isinstance(handle, ModelHandle):
        raise LeanmlError(f"export_onnx takes a ModelHandle, not a {type(handle).__name__}")
    if handle.task == "causal-lm":
        raise LeanmlError(
            f"model {handle.name!r} is a causal LM; export it with leanml.accelerate.llm_onnx.build_llm_onnx "
            "(it writes the decoder graph with a key/value cache), not export_onnx"
        )
    if not handle.is_torch:
        raise LeanmlError(
            f"model {handle.name!r} already runs on {handle.runtime} (from '{handle.source}'); only torch modules can be exported"
        )
    if dtype not in DTYPES:
        raise LeanmlError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise LeanmlError(f"opset {opset!r} is not supported; use an integer from {MIN_OPSET} to {MAX_OPSET}")


def export_onnx(handle: ModelHandle, path: str | os.PathLike, *, opset: int = 17, dtype: str = "fp32") -> Path:
    """Write ``handle``'s model to ``path`` as ONNX and return the path.

    Inputs are named after the handle's example inputs, with dynamic batch (and token sequence) axes;
    the single output is ``last_hidden_state``, ``logits`` or ``output`` (the main output tensor).
    ``dtype="fp16"``: fp16 weights, fp32 graph inputs/outputs (for GPU execution providers).
    The file is written atomically (temporary file + rename).
    """
    _check(handle, opset, dtype)
    names, tensors, by_keyword = _inputs(handle)
    model = handle.module
    wrapper = _MainOutput(model, names if by_keyword else None).eval()
    is_hf = hasattr(model, "config") and hasattr(model.config, "_attn_implementation")
    dynamic: dict[str, dict[int, str]] = {}
    for name, t in zip(names, tensors, strict=True):
        axes = {0: "batch"} if t.dim() >= 1 else {}
        if _is_text_ids(name, t) and (is_hf or handle.tokenizer is not None):
            axes[1] = "sequence"
        dynamic[name] = axes
    texty = any(1 in axes for axes in dynamic.values())
    with torch.no_grad(), eager_attention(model):
        probe = wrapper(*tensors)
        if not isinstance(probe, torch.Tensor):
            raise LeanmlError(f"model {handle.name!r} gives no tensor output to export")
        out_name = (
            "last_hidden_state"
            if handle.task == "sentence-embedding"
            else ("logits" if handle.task in ("sequence-classification", "image-classification") else "output")
        )
        out_axes = {0: "batch"} if probe.dim() >= 1 else {}
        if texty and probe.dim() >= 3:
            out_axes[1] = "sequence"
        dynamic[out_name] = out_axes
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper,
                    tuple(tensors),
                    tmp,
                    dynamo=False,
                    opset_version=opset,
                    input_names=names,
                    output_names=[out_name],
                    dynamic_axes=dynamic,
                    do_constant_folding=True,
                )
            _finish(tmp, _metadata(handle), dtype)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except LeanmlError:
            Path(tmp).unlink(missing_ok=True)
            raise
        except Exception as exc:
            Path(tmp).unlink(missing_ok=True)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LeanmlError(f"model {handle.name!r} could not be exported to ONNX (opset {opset}): {first}") from exc
    return out


def _metadata(handle: ModelHandle) -> dict[str, str]:
    """Facts the graph optimizer needs and cannot always read off a traced graph (heads, hidden size)."""
    meta = {"leanml.task": handle.task, "leanml.name": handle.name}
    config = getattr(handle.module, "config", None)
    for key, attr in (("model_type", "model_type"), ("num_heads", "num_attention_heads"), ("hidden_size", "hidden_size")):
        value = getattr(config, attr, None) if config is not None else None
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            meta[f"leanml.{key}"] = str(value)
    return meta


def read_metadata(model) -> dict[str, str]:
    """The ``leanml.*`` metadata an exported model carries (task, name, model_type, num_heads, hidden_size)."""
    return {p.key[len("leanml.") :]: p.value for p in model.metadata_props if p.key.startswith("leanml.")}


def _finish(path: str, meta: dict[str, str], dtype: str) -> None:
    """Add the metadata and, for fp16, convert the weights (the model file is rewritten in place)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(path, load_external_data=False)
    external = any(uses_external_data(t) for t in model.graph.initializer)  # > 2 GB: weights in files beside it
    if dtype == "fp16":
        if external:
            raise LeanmlError("dtype 'fp16' is supported for models under 2 GB; export fp32 and convert it separately")
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = convert_float_to_float16(model, keep_io_types=True)
        meta["leanml.dtype"] = "fp16"
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **meta})
    onnx.save_model(model, path)  # external tensors keep their references to the files the exporter wrote


__all__ = ["DTYPES", "eager_attention", "export_onnx", "read_metadata"]
