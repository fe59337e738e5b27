"""Export a decoder LM to a GGUF file (llama.cpp's format) from leanml's own quantized weights, and read
such a file back into a Hugging Face model.

Every family whose adapter (:mod:`leanml.models.arch`) names a llama.cpp architecture is accepted: llama
and mistral (``llama``), ``qwen2``, ``qwen3``, ``gemma``, ``gemma2``, ``gemma3``, ``phi3`` and ``gpt2``. The
module names come from :func:`~leanml.models.arch.resolve`; this module only knows llama.cpp's side: the
tensor names of each architecture (``gguf.MODEL_TENSORS``), its metadata keys, and the layout conventions
of ``convert_hf_to_gguf.py``:

* ``llama``: the rows of ``attn_q``/``attn_k`` (weights, biases, and so the rows of codes, scales and zero
  points) are permuted for llama.cpp's interleaved rotary embedding (transformers' loader undoes it); the
  other architectures use the half-split ("NEOX") rotary of Hugging Face and are written as they are;
* Gemma's ``(1 + w)`` RMS norms (``norm="rms+1"``, all norms including q/k norms) are stored as ``1 + w``;
* LayerNorm families (GPT-2) also write the norms' biases; learned positions are ``position_embd``;
* fused projections stay fused where the architecture has a fused tensor (Phi-3's ``attn_qkv`` and
  ``ffn_up`` = gate then up rows, GPT-2's ``attn_qkv``), and are split by rows otherwise;
* Gemma 2/3 metadata: logit soft-capping, the sliding window and the per-layer sliding pattern
  (``attention.sliding_window_pattern``; llama.cpp itself uses its fixed pattern, see the notes).

Nothing is re-quantized: a :class:`~leanml.quantize.modules.QuantLinear`'s integer codes, scales and zero
points are rewritten as GGUF's 32-column blocks, which is exact whenever every 32-column block of a row
lies in one quantization group (contiguous groups whose size is a multiple of 32, or per channel):

==================  ======  =========================  =========================================
leanml weight       GGUF    GGUF dequantization        block fields from leanml's
==================  ======  =========================  =========================================
symmetric 2-4 bit   Q4_0    ``x = d * (q - 8)``        ``q = code + 8``, ``d = scale``
symmetric 5 bit     Q5_0    ``x = d * (q - 16)``       ``q = code + 16``, ``d = scale``
symmetric 6-8 bit   Q8_0    ``x = d * q``              ``q = code``, ``d = scale``
asymmetric 2-4 bit  Q4_1    ``x = d * q + m``          ``q = code``, ``d = scale``, ``m = -zero * scale``
asymmetric 5 bit    Q5_1    ``x = d * q + m``          same as Q4_1
asymmetric 6-8 bit  Q8_0    ``x = d * q``              ``q = code - zero`` (must fit int8: always
                                                       for 6-7 bits, rarely for min/max 8 bits)
==================  ======  =========================  =========================================

``d`` and ``m`` are stored as fp16, so the file's weights equal leanml's up to the fp16 rounding of ``d``
and ``m``: at most ``(|q| + |zero|) * 2**-11`` quantization steps per weight (about 0.015 steps for 4 bits);
the report gives the measured worst case per tensor (``max_err_steps``). Narrower codes than the container
(2-3 bits in Q4, 6-7 bits in Q8_0) are exact too, at the container's size.

A quantized weight that cannot be expressed this way - act-order groups (``g_idx``) that are not 32-column
blocks, a group size that is not a multiple of 32, asymmetric 8-bit codes outside int8, codebook (k-means,
NF4, log2) layers, SmoothQuant-folded int8 layers - is written as its dequantized weight in F16 and listed
in the report under ``"fallback"`` with the reason; ``exact_only=True`` raises :class:`LeanmlError` instead.
Float matrices (unquantized linear layers, embeddings) are written in ``float_type`` (F32 by default), norms
and biases in F32. A head tied to the input embedding is written once, as ``token_embd.weight`` (from the
head's codes when the head is quantized), and ``output.weight`` is omitted.

:func:`read_gguf_model` is the inverse, for the loader: the config is rebuilt from llama.cpp's metadata
(what llama.cpp itself would run, e.g. its query scaling and sliding pattern where the file has no key for
them), the tensors are dequantized and the layout conventions above undone, module names again from
:func:`~leanml.models.arch.resolve`. transformers' own GGUF loader misses several of these families (no
``gemma``; ``qwen3``'s head_dim, ``gemma2``'s query scaling, ``gemma3``'s sliding pattern and ``gpt2``'s
FFN width and context are not read from the metadata).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LeanmlError
from ..models.arch import ADAPTERS, Arch, Found, hf_config, module_at, normalise, require, resolve

FLOAT_TYPES = ("f32", "f16")
BLOCK = 32
FP16_MAX = 65504.0
MAX_ERR_STEPS = 0.5  # beyond this fraction of a quantization step the fp16 block fields are not "exact"

# https://github.com/ggml-org/llama.cpp/blob/master/src/llama-vocab.cpp (pre-tokenizer names llama.cpp knows)
_PRE_BY_REGEX = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+"
    "|\\s+(?!\\S)|\\s+": "llama-bpe",
}

_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # llama.cpp's ggml_gelu is the tanh approximation


@dataclass(frozen=True)
class _Layout:
    """What llama.cpp's graph for one architecture assumes beyond the tensors it names
    (``llama-model.cpp``'s hyperparameter loading and ``convert_hf_to_gguf.py``)."""

    rope: bool = True  # rotary positions (False: learned position embeddings)
    permute_qk: bool = False  # interleaved rotary: q/k rows permuted from Hugging Face's half split
    key_length: bool = False  # the converter always states attention.key_length/value_length
    acts: tuple[str, ...] = ("silu",)
    swa: bool = False  # reads attention.sliding_window
    swa_period: int | None = None  # llama.cpp's fixed pattern: layer i slides unless i % n == n - 1
    swa_theta: float | None = None  # llama.cpp's fixed rope base on sliding layers
    softcap: tuple[str, ...] = ()  # logit soft-capping it reads: "attn", "final"
    query_scale: bool = False  # scales queries by head_dim ** -0.5, or (hidden / heads) ** -0.5 at wide_layers
    wide_layers: int | None = None  # the block count of the size llama.cpp scales by hidden / heads (27B)


_LAYOUTS = {
    "llama": _Layout(permute_qk=True),
    "qwen2": _Layout(),
    "qwen3": _Layout(key_length=True),
    "gemma": _Layout(key_length=True, acts=_GELU_TANH),
    "gemma2": _Layout(
        key_length=True, acts=_GELU_TANH, swa=True, swa_period=2, softcap=("attn", "final"), query_scale=True, wide_layers=46
    ),
    "gemma3": _Layout(
        key_length=True,
        acts=_GELU_TANH,
        swa=True,
        swa_period=6,
        swa_theta=10000.0,
        softcap=("final",),
        query_scale=True,
        wide_layers=62,
    ),
    "phi3": _Layout(swa=True),
    "gpt2": _Layout(rope=False, acts=_GELU_TANH),
}


@dataclass
class _Tensor:
    name: str  # GGUF name
    module: str  # where it comes from in the model
    data: np.ndarray
    qtype: Any  # gguf.GGMLQuantizationType
    exact: bool = True
    reason: str | None = None
    max_err_steps: float | None = None


@dataclass
class _Slot:
    """One GGUF tensor and where it lives in the model: ``kind`` is "matrix" (a weight matrix, encoded from
    leanml's layer), "bias" (a bias vector) or "norm" (a norm weight, stored as ``w + offset``); ``rows``
    indexes the module's output rows (a part of a fused layer and/or the rotary permutation)."""

    name: str
    module: str
    kind: str
    rows: torch.Tensor | None = None
    offset: float = 0.0


def export_gguf(
    handle, path: str | os.PathLike, *, force: bool = False, float_type: str = "f32", exact_only: bool = False, tokenizer=None
) -> dict:
    """Write ``handle`` (a :class:`~leanml.models.ModelHandle` of a causal LM of a family with a llama.cpp
    architecture, quantized or not) to the GGUF file ``path``, atomically, and return a report::

        {"path", "bytes", "arch", "types": {"Q4_1": n, "F32": n, ...}, "fallback": [{"tensor", "module",
         "type", "reason"}], "tensors": {name: {"type", "module", "exact", "max_err_steps"}}, "tied",
         "tokenizer", "notes": [...]}

    ``float_type`` ("f32" or "f16") is the type of float matrices; ``exact_only`` raises instead of writing
    a quantized weight as F16; ``tokenizer`` overrides ``handle.tokenizer`` (a Hugging Face fast tokenizer).
    ``notes`` says where llama.cpp will compute differently from the model (e.g. a sliding window its
    architecture has no key for).
    """
    gguf = _import_gguf()
    model = getattr(handle, "module", handle)
    if not isinstance(model, torch.nn.Module):
        raise LeanmlError(f"export_gguf needs a ModelHandle or nn.Module, got {type(handle).__name__}")
    if float_type not in FLOAT_TYPES:
        raise LeanmlError(f"float_type {float_type!r} is not accepted; use one of {', '.join(FLOAT_TYPES)}")
    normalise(model)  # GPT-2's Conv1D layers as nn.Linear (a ModelHandle has done it already)
    found = require(model, "GGUF export", kind="decoder", feature="gguf")
    if found.head is None:
        raise LeanmlError(f"GGUF export needs a causal LM with its output head; {type(model).__name__} has none")
    arch = found.arch.gguf
    layout = _LAYOUTS.get(arch)
    if layout is None:
        raise LeanmlError(f"GGUF export does not know llama.cpp's {arch!r} architecture")
    from ..outputs import check_file_target, fault_point, new_file

    out = check_file_target(path, force)
    notes: list[str] = []
    hp = _hparams(model, found, layout, notes)
    qfloat = gguf.GGMLQuantizationType.F32 if float_type == "f32" else gguf.GGMLQuantizationType.F16
    tensors, tied = _collect_tensors(model, found, layout, hp, qfloat, notes)
    fallback = [t for t in tensors if not t.exact]
    if fallback and exact_only:
        t = fallback[0]
        more = f" (and {len(fallback) - 1} more tensors)" if len(fallback) > 1 else ""
        raise LeanmlError(
            f"GGUF tensor {t.name} ({t.module}) cannot be written exactly: {t.reason}{more}; "
            f"pass exact_only=False to write such tensors as F16"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    with new_file(out, force) as tmp:  # same folder, published by one rename (or a no-clobber link)
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(str(getattr(handle, "name", "") or type(model).__name__))
        _add_hparams(gguf, writer, layout, hp)
        tok = tokenizer if tokenizer is not None else getattr(handle, "tokenizer", None)
        tok_kind = _add_tokenizer(gguf, writer, tok, hp["vocab_size"], _source_gguf(handle), notes, hp["pad_id"])
        writer.add_file_type(_file_type(gguf, tensors))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for t in tensors:
            raw = None if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else t.qtype
            writer.add_tensor(t.name, np.ascontiguousarray(t.data), raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        fault_point("export-written")
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "arch": arch,
        "types": dict(Counter(t.qtype.name for t in tensors)),
        "fallback": [{"tensor": t.name, "module": t.module, "type": t.qtype.name, "reason": t.reason} for t in fallback],
        "tensors": {
            t.name: {"type": t.qtype.name, "module": t.module, "exact": t.exact, "max_err_steps": t.max_err_steps}
            for t in tensors
        },
        "tied": tied,
        "tokenizer": tok_kind,
        "notes": notes,
    }


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise LeanmlError("exporting to GGUF needs the package gguf: pip install gguf") from None
    return gguf


# ----------------------------------------------------------------------------------------------- config


def _rope_parts(config) -> tuple[dict, dict | None]:
    """The rotary parameters of the (global) attention layers, and of the sliding layers where the config
    gives them separately (Gemma 3)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        rope = {**scaling, **rope}
    if isinstance(rope.get("full_attention"), dict):
        local = rope.get("sliding_attention")
        return dict(rope["full_attention"]), dict(local) if isinstance(local, dict) else None
    return rope, None


def _rope_kind(rope: dict) -> tuple[str, float | None]:
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind == "default":
        return kind, None
    if kind == "linear":
        return kind, float(rope["factor"])
    raise LeanmlError(f"GGUF export supports the default and linear rotary embeddings only; this model uses rope_type {kind!r}")


def _swa_layers(config, n_layers: int) -> list[bool]:
    """Which layers attend through a sliding window."""
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n_layers:
        return [t == "sliding_attention" for t in types]
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False:
        return [True] * n_layers
    return [False] * n_layers


def _llama_cpp_swa(layout: _Layout, n_layers: int) -> list[bool] | None:
    if layout.swa_period is None:
        return None
    n = layout.swa_period
    return [i % n < n - 1 for i in range(n_layers)]


def _query_scalar(layout: _Layout, n_layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """The ``d`` of llama.cpp's query scaling ``d ** -0.5`` (Gemma 2/3)."""
    return int(hidden // heads if n_layers == layout.wide_layers else head_dim)


def _hparams(model: torch.nn.Module, found: Found, layout: _Layout, notes: list[str]) -> dict:
    arch, config = found.arch, hf_config(model)
    gg = arch.gguf
    act = next(
        (getattr(config, f) for f in ("hidden_activation", "hidden_act", "activation_function") if getattr(config, f, None)),
        None,
    )
    if act not in layout.acts:
        if act == "gelu" and "gelu_pytorch_tanh" in layout.acts:
            notes.append("the model uses exact GELU; llama.cpp's GELU is the tanh approximation (differences ~1e-3)")
        else:
            raise LeanmlError(f"llama.cpp's {gg} architecture uses {layout.acts[0]} MLPs; this model's activation is {act!r}")
    n_layers = len(found.blocks)
    for b in found.blocks[1:]:  # one width per model in GGUF metadata (a per-layer pruned model has several)
        if (_cols_of(module_at(model, b.down)), _cols_of(module_at(model, b.o))) != (
            found.intermediate,
            found.n_heads * found.head_dim,
        ):
            raise LeanmlError(
                f"GGUF metadata states one FFN width and head count for all layers; block {b.index} of this model "
                f"differs from block 0 (per-layer structured pruning)"
            )
    embed = module_at(model, found.embed)
    vocab = int(getattr(embed, "num_embeddings", 0) or config.vocab_size)
    hp: dict[str, Any] = {
        "hidden": found.hidden,
        "layers": n_layers,
        "ffn": found.intermediate,
        "heads": found.n_heads,
        "kv_heads": found.n_kv,
        "head_dim": found.head_dim,
        "eps": float(getattr(config, arch.cfg_eps)),
        "layer_norm": arch.norm == "layer",
        "context": int(getattr(config, "max_position_embeddings", None) or 2048),
        "vocab_size": vocab,
        "tie": bool(getattr(config, "tie_word_embeddings", False)),
        "pad_id": getattr(config, "pad_token_id", None),
    }
    if layout.rope:
        rope, local = _rope_parts(config)
        kind, factor = _rope_kind(rope)
        hp["theta"] = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        hp["rope_scaling"] = factor
        partial = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))
        if partial != 1.0 and layout.permute_qk:
            raise LeanmlError(f"llama.cpp's {gg} architecture rotates whole heads; this model rotates {partial:g} of each")
        hp["rope_dims"] = int(found.head_dim * partial)
        original = getattr(config, "original_max_position_embeddings", None)
        hp["original_context"] = int(original) if original and gg == "phi3" else None
        if local is not None:
            local_kind, _ = _rope_kind(local)
            local_theta = float(local.get("rope_theta", hp["theta"]))
            if layout.swa_theta is not None and (local_theta != layout.swa_theta or local_kind != "default"):
                notes.append(
                    f"the sliding layers' rotary base is {local_theta:g} ({local_kind}); llama.cpp's {gg} uses "
                    f"{layout.swa_theta:g} there"
                )
    else:
        for flag, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if bool(getattr(config, flag, want)) != want:
                raise LeanmlError(f"llama.cpp's {gg} architecture cannot express this model's {flag}={not want}")
    # sliding windows
    swa = _swa_layers(config, n_layers)
    window = int(getattr(config, "sliding_window", None) or 0)
    hp["sliding_window"] = window if any(swa) and layout.swa else None
    hp["swa_pattern"] = swa if any(swa) and layout.swa_period is not None else None
    if any(swa):
        fixed = _llama_cpp_swa(layout, n_layers)
        if not layout.swa:
            notes.append(
                f"llama.cpp's {gg} architecture has no sliding-window attention: the model's {window}-token window "
                f"is not in the file (it matters for sequences longer than the window only)"
            )
        elif fixed is not None and fixed != swa:
            notes.append(
                f"the model's sliding-window layers {[i for i, s in enumerate(swa) if s]} differ from llama.cpp's "
                f"fixed {gg} pattern {[i for i, s in enumerate(fixed) if s]}; the file states them "
                f"(attention.sliding_window_pattern, read by leanml), llama.cpp uses its own"
            )
        elif fixed is None and not all(swa):
            notes.append(f"llama.cpp's {gg} applies the sliding window to every layer; this model to some only")
    # logit soft-capping
    for which in ("attn", "final"):
        cap = getattr(config, f"{which}_logit_softcapping", None)
        hp[f"{which}_softcap"] = float(cap) if cap and which in layout.softcap else None
        if cap and which not in layout.softcap:
            notes.append(f"llama.cpp's {gg} architecture has no {which} logit soft-capping; the model's {cap:g} is dropped")
    if layout.query_scale:
        want = _query_scalar(layout, n_layers, found.hidden, found.n_heads, found.head_dim)
        have = getattr(config, "query_pre_attn_scalar", None)
        if have is not None and float(have) != want:
            notes.append(
                f"llama.cpp scales {gg} queries by {want:g} ** -0.5; this model by query_pre_attn_scalar {have:g} ** -0.5"
            )
    return hp


def _add_hparams(gguf, writer, layout: _Layout, hp: dict) -> None:
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    if hp["layer_norm"]:
        writer.add_layer_norm_eps(hp["eps"])
    else:
        writer.add_layer_norm_rms_eps(hp["eps"])
    if layout.rope:
        writer.add_rope_freq_base(hp["theta"])
        writer.add_rope_dimension_count(hp["rope_dims"])
        if hp["rope_scaling"] is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(hp["rope_scaling"])
        if hp["original_context"]:
            writer.add_rope_scaling_orig_ctx_len(hp["original_context"])
    if layout.key_length or hp["head_dim"] * hp["heads"] != hp["hidden"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_vocab_size(hp["vocab_size"])
    if hp["attn_softcap"] is not None:
        writer.add_attn_logit_softcapping(hp["attn_softcap"])
    if hp["final_softcap"] is not None:
        writer.add_final_logit_softcapping(hp["final_softcap"])
    if hp["sliding_window"] is not None:
        writer.add_sliding_window(hp["sliding_window"])
    if hp["swa_pattern"] is not None:
        writer.add_sliding_window_pattern([bool(s) for s in hp["swa_pattern"]])


def _file_type(gguf, tensors: list[_Tensor]) -> int:
    """llama.cpp's ``general.file_type``: the type holding most of the 2-D weights."""
    q = gguf.GGMLQuantizationType
    names = {
        q.F32: "ALL_F32",
        q.F16: "MOSTLY_F16",
        q.Q4_0: "MOSTLY_Q4_0",
        q.Q4_1: "MOSTLY_Q4_1",
        q.Q5_0: "MOSTLY_Q5_0",
        q.Q5_1: "MOSTLY_Q5_1",
        q.Q8_0: "MOSTLY_Q8_0",
    }
    sizes = Counter()
    for t in tensors:
        if t.data.ndim == 2:
            block, type_size = gguf.GGML_QUANT_SIZES[t.qtype]
            sizes[t.qtype] += t.data.size // type_size * block if t.data.dtype == np.uint8 else t.data.size
    return int(getattr(gguf.LlamaFileType, names[sizes.most_common(1)[0][0]]) if sizes else gguf.LlamaFileType.ALL_F32)


# ------------------------------------------------------------------------------------- tensor layout


def _rotary_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """llama.cpp's ``permute`` of q/k rows (HF half-split rotary → interleaved) as a row index:
    ``gguf_rows = hf_rows[index]``."""
    idx = torch.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def _rows_of(module: torch.nn.Module) -> int:
    rows = getattr(module, "out_features", None)
    return int(rows) if rows is not None else int(module.weight.shape[0])


def _cols_of(module: torch.nn.Module) -> int:
    cols = getattr(module, "in_features", None)
    return int(cols) if cols is not None else int(module.weight.shape[1])


def _has_bias(module: torch.nn.Module | None) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


def _plan(model: torch.nn.Module, found: Found, layout: _Layout, tied: bool) -> list[_Slot]:
    """Every GGUF tensor of ``model`` in file order, with the module it comes from (shared by the export and
    the reader, so the two conventions cannot drift apart)."""
    gguf = _import_gguf()
    arch = found.arch
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch_enum]}

    def has(kind: str) -> bool:
        return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)] in allowed

    def name(kind: str, bid: int | None = None) -> str:
        template = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)]
        if template not in allowed:
            raise LeanmlError(f"llama.cpp's {arch.gguf} architecture has no {template} tensor, which this model needs")
        return template.format(bid=bid)

    offset = 1.0 if arch.norm == "rms+1" else 0.0
    slots: list[_Slot] = []

    def linear(gname: str, module_name: str, rows: torch.Tensor | None = None) -> None:
        slots.append(_Slot(f"{gname}.weight", module_name, "matrix", rows))
        if _has_bias(module_at(model, module_name)):
            slots.append(_Slot(f"{gname}.bias", module_name, "bias", rows))

    def norm(gname: str, module_name: str) -> None:
        slots.append(_Slot(f"{gname}.weight", module_name, "norm", offset=offset))
        if _has_bias(module_at(model, module_name)):
            slots.append(_Slot(f"{gname}.bias", module_name, "bias"))

    def part(block, what: str, heads: int | None) -> tuple[str, torch.Tensor | None]:
        layer, span = found.part(block, what)
        rows = None if span is None else torch.arange(*span)
        if layout.permute_qk and heads:
            n = len(rows) if rows is not None else _rows_of(module_at(model, layer))
            perm = _rotary_rows(n, heads)
            rows = perm if rows is None else rows[perm]
        return layer, rows

    slots.append(_Slot(f"{name('TOKEN_EMBD')}.weight", found.embed, "matrix"))
    if found.positions:
        slots.append(_Slot(f"{name('POS_EMBD')}.weight", found.positions, "matrix"))
    for b in found.blocks:
        i = b.index
        if b.attn_norm:
            norm(name("ATTN_NORM", i), b.attn_norm)
        if b.qkv and has("ATTN_QKV") and not layout.permute_qk:
            linear(name("ATTN_QKV", i), b.qkv)
        else:
            for what, kind, heads in (("q", "ATTN_Q", found.n_heads), ("k", "ATTN_K", found.n_kv), ("v", "ATTN_V", None)):
                layer, rows = part(b, what, heads)
                linear(name(kind, i), layer, rows)
        for role, kind in (("q_norm", "ATTN_Q_NORM"), ("k_norm", "ATTN_K_NORM")):
            if getattr(b, role):
                norm(name(kind, i), getattr(b, role))
        linear(name("ATTN_OUT", i), b.o)
        if b.post_attn_norm:
            norm(name("ATTN_POST_NORM", i), b.post_attn_norm)
        if b.mlp_norm:
            norm(name("FFN_NORM", i), b.mlp_norm)
        if b.gate_up and not has("FFN_GATE"):
            linear(name("FFN_UP", i), b.gate_up)  # fused: gate rows, then up rows (llama.cpp's fused SwiGLU)
        else:
            if arch.gated:
                layer, rows = part(b, "gate", None)
                linear(name("FFN_GATE", i), layer, rows)
            layer, rows = part(b, "up", None)
            linear(name("FFN_UP", i), layer, rows)
        linear(name("FFN_DOWN", i), b.down)
        if b.post_mlp_norm:
            norm(name("FFN_POST_NORM", i), b.post_mlp_norm)
    if found.final_norm:
        norm(name("OUTPUT_NORM"), found.final_norm)
    if not tied:
        if not has("OUTPUT"):
            raise LeanmlError(
                f"llama.cpp's {arch.gguf} architecture always reuses token_embd as the output head; this model's "
                f"head {found.head!r} is not tied to its embedding"
            )
        slots.append(_Slot(f"{name('OUTPUT')}.weight", found.head, "matrix"))
    return slots


def _tied(model: torch.nn.Module, found: Found, notes: list[str]) -> tuple[bool, torch.nn.Module, str]:
    """Whether the head is the input embedding, and the module (and name) the embedding is written from."""
    from ..quantize.modules import QuantEmbedding

    embed, head = module_at(model, found.embed), module_at(model, found.head)
    config = hf_config(model)
    if isinstance(embed, QuantEmbedding):
        tied = embed.head is head
        if not tied:
            notes.append(f"the embedding reads its rows from {embed.tied_to!r}, not from {found.head!r}")
        return tied, embed.head, embed.tied_to
    head_w, embed_w = getattr(head, "weight", None), getattr(embed, "weight", None)
    tied = (
        isinstance(head, torch.nn.Linear)
        and isinstance(head_w, torch.Tensor)
        and isinstance(embed_w, torch.Tensor)
        and (head_w is embed_w or (head_w.data_ptr() == embed_w.data_ptr() and head_w.shape == embed_w.shape))
    )
    if getattr(config, "tie_word_embeddings", False) and not tied:
        notes.append(
            f"the config ties the embeddings but {found.head} and {found.embed} differ (the head was replaced "
            "alone); both token_embd.weight and output.weight are written"
        )
    return tied, embed, found.embed


def _collect_tensors(
    model: torch.nn.Module, found: Found, layout: _Layout, hp: dict, qfloat, notes: list[str]
) -> tuple[list[_Tensor], bool]:
    tied, embed_src, embed_name = _tied(model, found, notes)
    out = []
    for s in _plan(model, found, layout, tied):
        module = module_at(model, s.module)
        if s.kind == "matrix":
            if s.module == found.embed:
                out.append(_encode(s.name, embed_name, embed_src, None, qfloat))
            else:
                out.append(_encode(s.name, s.module, module, s.rows, qfloat))
        elif s.kind == "bias":
            b = module.bias.detach().to(torch.float32).cpu()
            out.append(_Tensor(s.name, f"{s.module}.bias", (b if s.rows is None else b[s.rows]).numpy(), _gguf_type("F32")))
        else:
            w = module.weight.detach().to(torch.float32).cpu() + s.offset
            out.append(_Tensor(s.name, s.module, w.numpy(), _gguf_type("F32")))
    if found.arch.gguf == "llama" and any(t.name.endswith(".bias") for t in out):
        notes.append(
            "the model has linear biases: llama.cpp reads them, but transformers' GGUF loader builds a Llama "
            "without biases (attention_bias/mlp_bias are not GGUF metadata) and drops them; leanml's loader keeps them"
        )
    if any(type(m).__name__ == "Int8ActLinear" for m in model.modules()):
        notes.append("W8A8 layers: their int8 weights are written; activation quantization is left to the runtime")
    return out, tied


def _gguf_type(name: str):
    return getattr(_import_gguf().GGMLQuantizationType, name)


def _float(
    name: str, module_name: str, weight: torch.Tensor, rows: torch.Tensor | None, qtype, reason: str | None = None
) -> _Tensor:
    w = weight.detach().to(torch.float32).cpu()
    w = w if rows is None else w[rows]
    a = w.numpy()
    if qtype.name == "F16":
        if float(np.abs(a).max(initial=0.0)) > FP16_MAX:
            qtype = _gguf_type("F32")
            reason = f"{reason}; values exceed the fp16 range, so F32" if reason else None
        else:
            a = a.astype(np.float16)
    return _Tensor(name, module_name, a, qtype, exact=reason is None, reason=reason)


def _encode(name: str, module_name: str, module: torch.nn.Module, rows: torch.Tensor | None, qfloat) -> _Tensor:
    """The GGUF tensor for one weight matrix (``rows``: a row permutation applied to it)."""
    from ..quantize.modules import CastLinear, CodebookLinear, Int8ActLinear, QuantLinear

    f16 = _gguf_type("F16")
    if isinstance(module, QuantLinear):
        from ..quantize.gptq import dequantize_groups

        codes = _codes(module).cpu()
        scales, zeros = module.scales.to(torch.float32).cpu(), module.zero_points.to(torch.float32).cpu()
        gidx = module.group_index().cpu()
        if rows is not None:
            codes, scales, zeros = codes[rows], scales[rows], zeros[rows]
        enc = _blocks(codes, scales, zeros, gidx, module.bits, module.symmetric)
        if isinstance(enc, str):  # what module.dequantize() gives, rows permuted
            return _float(name, module_name, dequantize_groups(codes, scales, zeros, gidx), None, f16, enc)
        data, qtype, err = enc
        return _Tensor(name, module_name, data, qtype, max_err_steps=err)
    if isinstance(module, Int8ActLinear):
        w = module.weight
        if module.smooth_inv is not None:
            w = w * module.smooth_inv.reshape(1, -1)
            return _float(name, module_name, w, rows, f16, "SmoothQuant scales are folded into the int8 weight")
        codes = module.qweight.to(torch.int64).cpu()
        scales = module.w_scale.to(torch.float32).cpu().reshape(-1, 1)
        if rows is not None:
            codes, scales = codes[rows], scales[rows]
        gidx = torch.zeros(codes.shape[1], dtype=torch.int64)
        enc = _blocks(codes, scales, torch.zeros_like(scales), gidx, 8, True)
        if isinstance(enc, str):
            return _float(name, module_name, codes.to(torch.float32) * scales, None, f16, enc)
        data, qtype, err = enc
        return _Tensor(name, module_name, data, qtype, max_err_steps=err)
    if isinstance(module, CodebookLinear):
        return _float(name, module_name, module.weight, rows, f16, f"{module.method} codebook levels have no GGUF block type")
    if isinstance(module, CastLinear):
        exact = _gguf_type("F16") if module.weight.dtype == torch.float16 else _gguf_type("F32")
        return _float(name, module_name, module.weight, rows, exact)
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        return _float(name, module_name, module.weight, rows, qfloat)
    raise LeanmlError(
        f"GGUF export cannot write layer {module_name!r} of type {type(module).__name__}; accepted: "
        f"Linear, Embedding, QuantLinear, Int8ActLinear, CodebookLinear, CastLinear"
    )


def _codes(module) -> torch.Tensor:
    """``module.codes()``, unpacked without a per-bit stream when ``bits`` divides 8 (LSB-first packing)."""
    bits = module.bits
    if 8 % bits:
        return module.codes()
    from ..quantize.primitives import qrange

    numel = module.in_features * module.out_features
    packed = module.qweight.cpu().to(torch.int64)
    shifts = torch.arange(0, 8, bits, dtype=torch.int64)
    values = ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    return (values + qrange(bits, module.symmetric)[0]).reshape(module.out_features, module.in_features)


def _blocks(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, gidx: torch.Tensor, bits: int, symmetric: bool
) -> tuple[np.ndarray, Any, float] | str:
    """GGUF blocks holding exactly these codes (int64, rows, cols) with per-group ``scales``/``zeros`` indexed
    by ``gidx``, and the largest difference from ``(codes - zero) * scale`` in quantization steps; or the
    reason they cannot."""
    n_out, n_in = codes.shape
    if n_in % BLOCK:
        return f"{n_in} input columns are not a multiple of GGUF's {BLOCK}-column blocks"
    nb = n_in // BLOCK
    first = gidx.reshape(nb, BLOCK)[:, 0]
    if bool((gidx.reshape(nb, BLOCK) == first[:, None]).all()):
        bs, bz = scales[:, first], zeros[:, first]
    else:  # groups straddle blocks; still exact where the straddled groups share scale and zero point
        s_col = scales[:, gidx].reshape(n_out, nb, BLOCK)
        z_col = zeros[:, gidx].reshape(n_out, nb, BLOCK)
        if not (bool((s_col == s_col[..., :1]).all()) and bool((z_col == z_col[..., :1]).all())):
            if bool((gidx[1:] >= gidx[:-1]).all()):
                return (
                    f"group size {n_in // scales.shape[1]} is not a multiple of GGUF's {BLOCK}-column blocks "
                    f"(quantize with a group size that is, or per channel)"
                )
            return (
                f"act-order groups (g_idx) do not form contiguous {BLOCK}-column blocks "
                f"(quantize with act_order: false or static_groups: true for an exact export)"
            )
        bs, bz = s_col[..., 0], z_col[..., 0]
    gg = _import_gguf().GGMLQuantizationType
    q3 = codes.reshape(n_out, nb, BLOCK)
    m = None
    if symmetric:
        if bits <= 4:
            qtype, q, offset = gg.Q4_0, q3 + 8, 8
        elif bits == 5:
            qtype, q, offset = gg.Q5_0, q3 + 16, 16
        else:
            qtype, q, offset = gg.Q8_0, q3, 0
    else:
        if bits <= 5:
            qtype, q, offset = (gg.Q4_1 if bits <= 4 else gg.Q5_1), q3, 0
            m = -bz * bs
        else:
            qtype, q, offset = gg.Q8_0, q3 - bz[..., None].to(torch.int64), 0
            lo, hi = int(q.min()), int(q.max())
            if lo < -128 or hi > 127:
                return (
                    f"asymmetric {bits}-bit codes minus zero points span [{lo}, {hi}], outside Q8_0's int8 "
                    f"(quantize with symmetric: true for an exact Q8_0)"
                )
    d = bs.numpy()
    if not np.isfinite(d.astype(np.float16)).all() or (m is not None and not np.isfinite(m.numpy().astype(np.float16)).all()):
        return "scales or offsets exceed the fp16 range of GGUF block fields"
    d16 = d.astype(np.float16)
    m16 = None if m is None else m.numpy().astype(np.float16)
    qn = q.numpy()
    recon = d16.astype(np.float32)[..., None] * (qn - offset).astype(np.float32)
    if m16 is not None:
        recon = recon + m16.astype(np.float32)[..., None]
    # leanml's weight, as dequantize_groups computes it (the same float32 operations, block by block)
    target = ((q3.to(torch.float32) - bz[..., None]) * bs[..., None]).numpy()
    step = np.maximum(np.abs(d), np.finfo(np.float32).tiny)
    err = np.abs(recon - target).max(-1) / step
    max_err = float(err.max(initial=0.0))
    if max_err > MAX_ERR_STEPS:
        return f"fp16 block scales are off by up to {max_err:.2f} quantization steps (scales too small or too large)"
    return _pack(qtype, qn, d16, m16), qtype, max_err


def _pack(qtype, q: np.ndarray, d16: np.ndarray, m16: np.ndarray | None) -> np.ndarray:
    """ggml block bytes (rows, blocks * type_size) for codes ``q`` (rows, blocks, 32) already offset to the
    block type's unsigned range (int8 for Q8_0)."""
    n_out, nb, _ = q.shape
    parts = [d16.view(np.uint8).reshape(n_out, nb, 2)]
    if m16 is not None:
        parts.append(m16.view(np.uint8).reshape(n_out, nb, 2))
    name = qtype.name
    if name == "Q8_0":
        parts.append(q.astype(np.int8).view(np.uint8))
    else:
        u = q.astype(np.uint8)
        if name in ("Q5_0", "Q5_1"):
            parts.append(np.packbits((u >> 4) & 1, axis=-1, bitorder="little"))  # bit j of a uint32 = element j
        parts.append((u[..., :16] & 0x0F) | ((u[..., 16:] & 0x0F) << 4))  # element j low nibble, j + 16 high
    return np.concatenate(parts, axis=-1).reshape(n_out, -1)


# -------------------------------------------------------------------------------------------- tokenizer


def _source_gguf(handle) -> Path | None:
    """The GGUF file the model was first loaded from, if it is still there."""
    candidates = [getattr(handle, "source", "")]
    artifact = getattr(handle, "artifact", None)
    if artifact is not None and Path(artifact).is_dir():
        for meta, key in (("leanml.json", "source"), ("leanml-source.json", "gguf")):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                candidates.append(json.loads((Path(artifact) / meta).read_text()).get(key, ""))
    for c in candidates:
        if c and str(c).endswith(".gguf") and Path(c).is_file():
            return Path(c)
    return None


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class _KV:
    vtype: int
    value: Any
    sub_type: int | None = None


def _source_tokenizer_fields(source: Path | None) -> dict[str, _KV]:
    """The ``tokenizer.*`` metadata of a GGUF file (a small reader: gguf.GGUFReader takes seconds on the
    tens of thousands of vocabulary strings); empty when there is no readable file."""
    if source is None:
        return {}
    import mmap

    try:
        with open(source, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _read_kv(buf, "tokenizer.")
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return {}


def _read_kv(buf, prefix: str) -> dict[str, _KV]:
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("not a GGUF file")
    version, _, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version}")
    pos = 24

    def string(pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8"), pos + 8 + n

    def value(vtype: int, pos: int, keep: bool) -> tuple[Any, int, int | None]:
        if vtype in _SCALAR:
            return struct.unpack_from(_SCALAR[vtype], buf, pos)[0], pos + struct.calcsize(_SCALAR[vtype]), None
        if vtype == _STRING:
            return (*string(pos), None)
        if vtype != _ARRAY:
            raise ValueError(f"GGUF value type {vtype}")
        sub, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if sub in _SCALAR:
            width = struct.calcsize(_SCALAR[sub])
            items = np.frombuffer(bytes(buf[pos : pos + n * width]), dtype=np.dtype(_SCALAR[sub])).tolist() if keep else None
            return items, pos + n * width, sub
        items = []
        for _ in range(n):
            item, pos, _ = value(sub, pos, keep)
            if keep:
                items.append(item)
        return items, pos, sub

    out = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        keep = key.startswith(prefix)
        val, pos, sub = value(vtype, pos + 4, keep)
        if keep:
            out[key] = _KV(vtype, val, sub)
    return out


def _add_tokenizer(
    gguf, writer, tok, vocab_size: int, source: Path | None, notes: list[str], pad_id: int | None = None
) -> str | None:
    """Write the ``tokenizer.*`` keys; returns the tokenizer model written ("gpt2"), "copied" or None."""
    source_fields = _source_tokenizer_fields(source)
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else None
    if spec is not None and spec.get("model", {}).get("type") == "BPE" and _byte_level(spec):
        tokens, types, merges = _byte_level_vocab(gguf, spec, vocab_size)
        pre = None
        src_tokens = source_fields.get("tokenizer.ggml.tokens")
        if src_tokens is not None and "tokenizer.ggml.pre" in source_fields and src_tokens.value == tokens:
            pre = source_fields["tokenizer.ggml.pre"].value
        if pre is None:
            pre = _pre_name(spec)
            if pre is None:
                pre = "default"
                notes.append(
                    "the tokenizer's pre-tokenizer is not one llama.cpp names; tokenizer.ggml.pre is 'default', "
                    "so llama.cpp may split text differently from transformers"
                )
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        for attr, add in (
            ("bos_token_id", writer.add_bos_token_id),
            ("eos_token_id", writer.add_eos_token_id),
            ("unk_token_id", writer.add_unk_token_id),
            ("pad_token_id", writer.add_pad_token_id),
        ):
            value = getattr(tok, attr, None)
            if value is None and attr == "pad_token_id":
                value = pad_id  # the model config's, when the tokenizer has none
            if isinstance(value, int) and 0 <= value < vocab_size:
                add(value)
        for attr, add in (("add_bos_token", writer.add_add_bos_token), ("add_eos_token", writer.add_add_eos_token)):
            value = getattr(tok, attr, None)
            if isinstance(value, bool):
                add(value)
        writer.add_add_space_prefix(bool(_byte_level(spec).get("add_prefix_space", False)))
        template = getattr(tok, "chat_template", None)
        if not isinstance(template, str) and "tokenizer.chat_template" in source_fields:
            template = source_fields["tokenizer.chat_template"].value
        if isinstance(template, str) and template:
            writer.add_chat_template(template)
        return "gpt2"
    src_tokens = source_fields.get("tokenizer.ggml.tokens")
    if src_tokens is not None and len(src_tokens.value) == vocab_size:
        for key, kv in source_fields.items():
            sub = None if kv.sub_type is None else gguf.GGUFValueType(kv.sub_type)
            writer.add_key_value(key, kv.value, gguf.GGUFValueType(kv.vtype), sub_type=sub)
        notes.append(f"tokenizer metadata copied from the source GGUF {source.name}")
        return "copied"
    what = "no tokenizer" if tok is None else f"a {type(tok).__name__} that is not a byte-level BPE fast tokenizer"
    notes.append(
        f"the model has {what}: the GGUF carries no vocabulary, so llama.cpp and transformers cannot "
        f"tokenize with it; pass tokenizer= a Hugging Face fast tokenizer"
    )
    return None


def _pre_parts(spec: dict) -> list[dict]:
    pre = spec.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def _byte_level(spec: dict) -> dict | None:
    """The ByteLevel pre-tokenizer of a tokenizer.json, if it has one."""
    return next((p for p in _pre_parts(spec) if p.get("type") == "ByteLevel"), None)


def _pre_name(spec: dict) -> str | None:
    """llama.cpp's name (``tokenizer.ggml.pre``) for this byte-level pre-tokenizer, if it has one."""
    parts = _pre_parts(spec)
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        known = dict(_PRE_BY_REGEX)
        try:  # the splits transformers' GGUF loader knows, by the name llama.cpp uses
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

            for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
                known.setdefault(split, name)
        except ImportError:
            pass
        return known.get(regex)
    return None


def _byte_level_vocab(gguf, spec: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    model = spec["model"]
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i, t in added.items():
        by_id[i] = t["content"]
    n_tok = max(by_id, default=-1) + 1
    if n_tok > vocab_size:
        raise LeanmlError(
            f"the tokenizer has {n_tok} token ids but the model's embedding has {vocab_size} rows; "
            f"GGUF needs a row for every token (resize the embeddings first)"
        )
    tt = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(tt.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(tt.CONTROL if added[i].get("special") else tt.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(tt.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


# --------------------------------------------------------------------------------------------- reading

_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def _metadata(reader) -> dict[str, Any]:
    """The file's key/value metadata, without the vocabulary arrays (slow to read, not needed here)."""
    return {k: f.contents() for k, f in reader.fields.items() if k not in _BIG_ARRAYS and not k.startswith("GGUF.")}


def _family_of(arch_name: str | None, model_name: str) -> Arch | None:
    """The adapter for a llama.cpp architecture (llama.cpp writes mistral as llama: the name decides)."""
    candidates = [a for a in ADAPTERS if a.gguf and a.gguf == arch_name and arch_name in _LAYOUTS]
    named = [a for a in candidates if a.family in str(model_name).lower()]
    return (named or candidates or [None])[0]


def _config_from_metadata(family: Arch, layout: _Layout, meta: dict, tensors: dict) -> dict | None:
    """The transformers config fields a file of ``family`` states (what llama.cpp would run where the file has
    no key for something, e.g. its query scaling), or None when the file uses something leanml cannot rebuild."""
    a = family.gguf

    def key(name: str, default=None):
        return meta.get(f"{a}.{name}", default)

    hidden, layers, heads = key("embedding_length"), key("block_count"), key("attention.head_count")
    if not (hidden and layers and heads):
        return None
    head_dim = key("attention.key_length") or (key("rope.dimension_count") if layout.permute_qk else None) or hidden // heads
    embd = tensors.get("token_embd.weight")
    vocab = key("vocab_size") or (int(embd.shape[-1]) if embd is not None else None)
    kw: dict[str, Any] = {
        family.cfg_hidden: int(hidden),
        family.cfg_layers: int(layers),
        family.cfg_heads: int(heads),
        family.cfg_ffn: int(key("feed_forward_length")),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if family.cfg_kv_heads:
        kw[family.cfg_kv_heads] = int(key("attention.head_count_kv", heads))
    if family.cfg_head_dim:
        kw[family.cfg_head_dim] = int(head_dim)
    eps = key("attention.layer_norm_epsilon" if family.norm == "layer" else "attention.layer_norm_rms_epsilon")
    if eps is not None:
        kw[family.cfg_eps] = float(eps)
    for gkey, attr in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("padding_token_id", "pad_token_id")):
        value = meta.get(f"tokenizer.ggml.{gkey}")  # absent: None, not the config class's default (Phi-3's 32000)
        kw[attr] = int(value) if value is not None and 0 <= int(value) < int(vocab) else None
    if layout.rope:
        theta = float(key("rope.freq_base", 10000.0))
        scaling = key("rope.scaling.type")
        if scaling in (None, "none"):
            rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
        elif scaling == "linear":
            rope = {"rope_type": "linear", "factor": float(key("rope.scaling.factor", 1.0)), "rope_theta": theta}
        else:
            return None
        dims = key("rope.dimension_count")
        if dims and int(dims) != int(head_dim):
            if layout.permute_qk:
                return None
            rope["partial_rotary_factor"] = int(dims) / int(head_dim)
        if layout.swa_theta is not None:
            rope = {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": layout.swa_theta}}
        kw["rope_parameters"] = rope
    for which in layout.softcap:
        kw[f"{which}_logit_softcapping"] = key(f"{which}_logit_softcapping")
    if layout.swa:
        window = key("attention.sliding_window")
        kw["sliding_window"] = int(window) if window else None
        if layout.swa_period is not None:
            pattern = key("attention.sliding_window_pattern")
            if isinstance(pattern, list) and len(pattern) == layers:
                swa = [bool(p) for p in pattern]
            else:
                swa = _llama_cpp_swa(layout, int(layers))
            if not window:
                swa = [False] * int(layers)
                kw["sliding_window"] = 4096  # unused: no layer slides
            kw["layer_types"] = ["sliding_attention" if s else "full_attention" for s in swa]
    if layout.query_scale:
        kw["query_pre_attn_scalar"] = _query_scalar(layout, int(layers), int(hidden), int(heads), int(head_dim))
    if key("rope.scaling.original_context_length"):
        kw["original_max_position_embeddings"] = int(key("rope.scaling.original_context_length"))
    if layout.permute_qk:  # llama: biases are a config switch
        kw["attention_bias"] = "blk.0.attn_q.bias" in tensors
        kw["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    kw["max_position_embeddings"] = int(key("context_length", 2048))
    return kw


@dataclass
class GGUFPlan:
    """What a GGUF file of an architecture leanml writes holds, before any tensor is read: the
    transformers ``config`` its metadata states, the model on ``meta`` (``init_empty_weights``: buffers
    real, Conv1D as ``nn.Linear``), and where each file tensor goes in it (``slots``)."""

    path: Path
    reader: Any  # gguf.GGUFReader (its tensors are memory-mapped views of the file)
    config: Any
    model: torch.nn.Module
    slots: list[_Slot]

    def __post_init__(self) -> None:
        self.by_name = {t.name: t for t in self.reader.tensors}

    def values(self, slot: _Slot) -> torch.Tensor:
        """The slot's tensor dequantized to fp32 (its norm offset taken off), read from the file now."""
        gguf = _import_gguf()
        t = self.by_name[slot.name]
        data = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        self.drop_pages()
        return data - slot.offset if slot.offset else data

    def drop_pages(self) -> None:
        """Unmap the file pages read so far (the reader maps the whole file): they would otherwise count
        as this process's resident memory until the end, and a file larger than ``--max-memory`` would
        stop a run that holds one block. The pages stay in the system's file cache."""
        import contextlib
        import mmap

        mapped = getattr(getattr(self.reader, "data", None), "_mmap", None)
        if isinstance(mapped, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):  # a platform without it: the pages stay mapped
                mapped.madvise(mmap.MADV_DONTNEED)

    def fp32_bytes(self) -> int:
        """What the file's tensors take in memory as fp32."""
        return sum(int(t.n_elements) * 4 for t in self.reader.tensors)

    def tokenizer(self):
        """The file's tokenizer (None when it carries no vocabulary)."""
        import transformers as tf

        if "tokenizer.ggml.tokens" not in self.reader.fields:
            return None
        return tf.PreTrainedTokenizerFast.from_pretrained(str(self.path.parent), gguf_file=self.path.name)


def gguf_plan(path: str | os.PathLike) -> GGUFPlan | None:
    """The :class:`GGUFPlan` of a GGUF file of an architecture leanml writes (the inverse of
    :func:`export_gguf`). None when the file is of another architecture or uses something leanml does not
    rebuild (other rotary scalings, extra tensors). Errors reading the file are the ``gguf`` package's
    (ValueError, OSError...)."""
    gguf = _import_gguf()
    import transformers as tf

    from accelerate import init_empty_weights

    path = Path(path)
    reader = gguf.GGUFReader(str(path))
    meta = _metadata(reader)
    arch_name = meta.get("general.architecture")
    family = _family_of(arch_name, meta.get("general.name", ""))
    if family is None:
        return None
    layout = _LAYOUTS[arch_name]
    tensors = {t.name: t for t in reader.tensors}
    kw = _config_from_metadata(family, layout, meta, tensors)
    if kw is None:
        return None
    context = kw.pop("max_position_embeddings")
    config = tf.AutoConfig.for_model(family.model_types[0], **kw)
    config.max_position_embeddings = context  # an attribute alias on some configs (GPT-2's n_positions)
    config.architectures = None
    with init_empty_weights(include_buffers=False):  # the names and geometry; rotary buffers real
        shadow = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    normalise(shadow)  # Conv1D as nn.Linear (what resolve reads, and how the file stores it)
    found = resolve(shadow)
    if found is None:
        return None
    slots = _plan(shadow, found, layout, bool(config.tie_word_embeddings))
    if set(tensors) - {s.name for s in slots}:
        return None
    missing = [s.name for s in slots if s.name not in tensors]
    if missing:
        raise LeanmlError(f"GGUF file '{path}' lacks the tensor {missing[0]} its {arch_name} metadata implies")
    return GGUFPlan(path, reader, config, shadow.eval(), slots)


def slot_parameter(slot: _Slot) -> str:
    """The model parameter a slot fills (in the model with Conv1D as ``nn.Linear``)."""
    return f"{slot.module}.{'bias' if slot.kind == 'bias' else 'weight'}"


def read_gguf_model(path: str | os.PathLike):
    """``(model, tokenizer)`` rebuilt from a GGUF file of an architecture leanml writes (see
    :func:`gguf_plan`): an fp32 Hugging Face causal LM in eval mode, and its tokenizer (None when the file
    carries no vocabulary). None when :func:`gguf_plan` is; the caller then tries transformers' loader."""
    import transformers as tf
    from transformers.pytorch_utils import Conv1D

    plan = gguf_plan(path)
    if plan is None:
        return None
    model = tf.AutoModelForCausalLM.from_config(plan.config, dtype=torch.float32).eval()
    with torch.no_grad():
        for s in plan.slots:
            data = plan.values(s)
            module = module_at(model, s.module)
            if s.kind == "bias":
                target = module.bias.data
            elif s.kind == "matrix" and isinstance(module, Conv1D):
                target = module.weight.data.T  # Conv1D stores (in, out)
            else:
                target = module.weight.data
            want = tuple(target.shape) if s.rows is None else (len(s.rows), *target.shape[1:])
            if tuple(data.shape) != want:
                raise LeanmlError(
                    f"GGUF tensor {s.name} of '{plan.path}' is {tuple(data.shape)}, but {want} for the model its "
                    "metadata describes"
                )
            if s.rows is None:
                target.copy_(data)
            else:
                target[s.rows] = data
    return model, plan.tokenizer()
