"""Export a Llama-family causal LM to a GGUF file (llama.cpp's format) from leanml's own quantized weights.

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
and biases in F32.

Layout follows llama.cpp's ``convert_hf_to_gguf.py``: the rows of ``attn_q``/``attn_k`` (weights, biases and
so the rows of codes, scales and zero points) are permuted for llama.cpp's interleaved rotary embedding,
which transformers' GGUF loader undoes. A head tied to the input embedding is written once, as
``token_embd.weight`` (from the head's codes when the head is quantized), and ``output.weight`` is omitted.
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

ARCHITECTURES = ("LlamaForCausalLM",)
FLOAT_TYPES = ("f32", "f16")
BLOCK = 32
FP16_MAX = 65504.0
MAX_ERR_STEPS = 0.5  # beyond this fraction of a quantization step the fp16 block fields are not "exact"

# https://github.com/ggml-org/llama.cpp/blob/master/src/llama-vocab.cpp (pre-tokenizer names llama.cpp knows)
_PRE_BY_REGEX = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+"
    "|\\s+(?!\\S)|\\s+": "llama-bpe",
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


def export_gguf(
    handle, path: str | os.PathLike, *, force: bool = False, float_type: str = "f32", exact_only: bool = False, tokenizer=None
) -> dict:
    """Write ``handle`` (a :class:`~leanml.models.ModelHandle` of a ``LlamaForCausalLM``, quantized or not)
    to the GGUF file ``path``, atomically, and return a report::

        {"path", "bytes", "types": {"Q4_1": n, "F32": n, ...}, "fallback": [{"tensor", "module", "type",
         "reason"}], "tensors": {name: {"type", "module", "exact", "max_err_steps"}}, "tied", "tokenizer",
         "notes": [...]}

    ``float_type`` ("f32" or "f16") is the type of float matrices; ``exact_only`` raises instead of writing
    a quantized weight as F16; ``tokenizer`` overrides ``handle.tokenizer`` (a Hugging Face fast tokenizer).
    """
    gguf = _import_gguf()
    model = getattr(handle, "module", handle)
    if not isinstance(model, torch.nn.Module):
        raise LeanmlError(f"export_gguf needs a ModelHandle or nn.Module, got {type(handle).__name__}")
    arch = type(model).__name__
    config = getattr(model, "config", None)
    if arch not in ARCHITECTURES or getattr(config, "model_type", None) != "llama":
        model_type = getattr(config, "model_type", None)
        raise LeanmlError(
            f"GGUF export does not support the architecture {arch} (model_type {model_type!r}); "
            f"accepted: {', '.join(ARCHITECTURES)} (Llama family causal LMs)"
        )
    if float_type not in FLOAT_TYPES:
        raise LeanmlError(f"float_type {float_type!r} is not accepted; use one of {', '.join(FLOAT_TYPES)}")
    from ..outputs import check_file_target, fault_point, new_file

    out = check_file_target(path, force)
    hp = _hparams(config)
    qfloat = gguf.GGMLQuantizationType.F32 if float_type == "f32" else gguf.GGMLQuantizationType.F16
    notes: list[str] = []
    tensors, tied = _collect_tensors(model, hp, qfloat, notes)
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
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(str(getattr(handle, "name", "") or arch))
        _add_hparams(writer, hp)
        tok = tokenizer if tokenizer is not None else getattr(handle, "tokenizer", None)
        tok_kind = _add_tokenizer(gguf, writer, tok, hp["vocab_size"], _source_gguf(handle), notes)
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


def _hparams(config) -> dict:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise LeanmlError(f"GGUF llama models use SiLU gated MLPs; this model's hidden_act is {act!r}")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        rope = {**scaling, **rope}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise LeanmlError(f"GGUF export supports the default rotary embedding only; this model uses rope_type {rope_type!r}")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return {
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "ffn": config.intermediate_size,
        "heads": n_heads,
        "kv_heads": n_kv,
        "head_dim": head_dim,
        "eps": float(config.rms_norm_eps),
        "theta": float(theta),
        "context": int(getattr(config, "max_position_embeddings", 2048)),
        "vocab_size": config.vocab_size,
        "tie": bool(getattr(config, "tie_word_embeddings", False)),
    }


def _add_hparams(writer, hp: dict) -> None:
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_rope_freq_base(hp["theta"])
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] * hp["heads"] != hp["hidden"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_vocab_size(hp["vocab_size"])


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


# ---------------------------------------------------------------------------------------------- tensors


def _rotary_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """llama.cpp's ``permute`` of q/k rows (HF half-split rotary → interleaved) as a row index:
    ``gguf_rows = hf_rows[index]``."""
    idx = torch.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def _collect_tensors(model: torch.nn.Module, hp: dict, qfloat, notes: list[str]) -> tuple[list[_Tensor], bool]:
    from ..quantize.modules import QuantEmbedding

    try:
        embed = model.get_submodule("model.embed_tokens")
        head = model.get_submodule("lm_head")
        norm = model.get_submodule("model.norm")
        layers = model.get_submodule("model.layers")
    except AttributeError as exc:
        raise LeanmlError(f"this LlamaForCausalLM does not have the standard layout ({exc})") from None
    if isinstance(embed, QuantEmbedding):
        tied = embed.head is head
        embed_src, embed_name = embed.head, embed.tied_to
        if not tied:
            notes.append(f"the embedding reads its rows from {embed.tied_to!r}, not from lm_head")
    else:
        head_w = getattr(head, "weight", None)
        tied = (
            isinstance(head, torch.nn.Linear)
            and isinstance(head_w, torch.Tensor)
            and (head_w is embed.weight or (head_w.data_ptr() == embed.weight.data_ptr() and head_w.shape == embed.weight.shape))
        )
        embed_src, embed_name = embed, "model.embed_tokens"
        if hp["tie"] and not tied:
            notes.append(
                "the config ties the embeddings but lm_head and embed_tokens differ (the head was replaced "
                "alone); both token_embd.weight and output.weight are written"
            )
    out = [_encode("token_embd.weight", embed_name, embed_src, None, qfloat)]
    per_layer = (
        ("attn_q", "self_attn.q_proj", hp["heads"]),
        ("attn_k", "self_attn.k_proj", hp["kv_heads"]),
        ("attn_v", "self_attn.v_proj", None),
        ("attn_output", "self_attn.o_proj", None),
        ("ffn_gate", "mlp.gate_proj", None),
        ("ffn_up", "mlp.up_proj", None),
        ("ffn_down", "mlp.down_proj", None),
    )
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}"
        out.append(_norm(f"blk.{i}.attn_norm.weight", f"{prefix}.input_layernorm", layer.input_layernorm))
        for gname, mname, rot_heads in per_layer:
            module = layer.get_submodule(mname)
            rows = None if rot_heads is None else _rotary_rows(module.out_features, rot_heads)
            out.append(_encode(f"blk.{i}.{gname}.weight", f"{prefix}.{mname}", module, rows, qfloat))
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                b = bias.detach().to(torch.float32).cpu()
                out.append(
                    _Tensor(
                        f"blk.{i}.{gname}.bias",
                        f"{prefix}.{mname}.bias",
                        (b if rows is None else b[rows]).numpy(),
                        _gguf_type("F32"),
                    )
                )
        out.append(_norm(f"blk.{i}.ffn_norm.weight", f"{prefix}.post_attention_layernorm", layer.post_attention_layernorm))
    out.append(_norm("output_norm.weight", "model.norm", norm))
    if not tied:
        out.append(_encode("output.weight", "lm_head", head, None, qfloat))
    if any(t.name.endswith(".bias") for t in out):
        notes.append(
            "the model has linear biases: llama.cpp reads them, but transformers' GGUF loader builds a Llama "
            "without biases (attention_bias/mlp_bias are not GGUF metadata) and drops them"
        )
    if any(type(m).__name__ == "Int8ActLinear" for m in model.modules()):
        notes.append("W8A8 layers: their int8 weights are written; activation quantization is left to the runtime")
    return out, tied


def _gguf_type(name: str):
    return getattr(_import_gguf().GGMLQuantizationType, name)


def _norm(name: str, module_name: str, module: torch.nn.Module) -> _Tensor:
    return _Tensor(name, module_name, module.weight.detach().to(torch.float32).cpu().numpy(), _gguf_type("F32"))


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


def _add_tokenizer(gguf, writer, tok, vocab_size: int, source: Path | None, notes: list[str]) -> str | None:
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
