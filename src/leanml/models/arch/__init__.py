"""Model families: the one place that knows module names (see :mod:`.spec` and :mod:`.families`).

* :func:`arch_of` - the adapter of a model (by its transformers ``model_type``), or None;
* :func:`resolve` - the adapter resolved on the model (:class:`Found`: full names, geometry), or None;
* :func:`require` - the same, or a one-line refusal naming the architecture and the supported families;
* :func:`producers` - per block, which module's output feeds which linears, and how a per-channel scale
  folds into it (for AWQ/SmoothQuant), derived from the declarations;
* :func:`normalise` - GPT-2's ``Conv1D`` layers (weights stored transposed) become ``nn.Linear`` with
  the same function, so every linear technique sees one layer type;
* :func:`set_widths` - the config fields that follow a structured removal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanml.errors import LeanmlError

from .families import ADAPTERS, BY_MODEL_TYPE
from .spec import Arch, Found, FoundBlock, module_at

__all__ = [
    "ADAPTERS",
    "Arch",
    "Found",
    "FoundBlock",
    "ProducerSpec",
    "arch_of",
    "hf_config",
    "module_at",
    "normalise",
    "producers",
    "require",
    "resolve",
    "set_widths",
    "supported",
]


def hf_config(model: nn.Module):
    """The (text) config a Hugging Face model is rebuilt from, or None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_type(model: nn.Module) -> str | None:
    config = hf_config(model)
    return None if config is None else getattr(config, "model_type", None)


def arch_of(model: nn.Module) -> Arch | None:
    """The adapter for ``model``'s family, or None (not a Hugging Face model, or an unknown family)."""
    mt = model_type(model)
    return BY_MODEL_TYPE.get(mt) if mt else None


def supported(kind: str | None = None, feature: str | None = None) -> list[str]:
    """Family names (optionally of one ``kind`` and with a truthy ``feature`` such as ``"gguf"``)."""
    return [a.family for a in ADAPTERS if (kind is None or a.kind == kind) and (feature is None or getattr(a, feature))]


def describe(model: nn.Module) -> str:
    mt = model_type(model)
    return f"{type(model).__name__} (model_type {mt!r})" if mt else type(model).__name__


def require(model: nn.Module, what: str, kind: str | None = None, feature: str | None = None) -> Found:
    """The resolved adapter of ``model``, or a one-line error: ``what`` needs one of the supported families."""
    found = resolve(model)
    ok = found is not None and (kind is None or found.arch.kind == kind) and (feature is None or getattr(found.arch, feature))
    if not ok:
        reason = "" if found is not None or arch_of(model) is None else " (its modules do not have the family's layout)"
        raise LeanmlError(
            f"{what} supports the model families {', '.join(supported(kind, feature))}; {describe(model)} is not one{reason}"
        )
    return found


# ------------------------------------------------------------------------------------------ resolution


def _find_layers(model: nn.Module, rel: str) -> tuple[str, str] | None:
    """``(layers_name, backbone_prefix)`` of the ModuleList at ``rel`` below some backbone."""
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if name == rel:
            return name, ""
        if name.endswith("." + rel):
            return name, name[: -len(rel) - 1]
    return None


def _join(prefix: str, rel: str | None) -> str | None:
    if rel is None:
        return None
    return f"{prefix}.{rel}" if prefix else rel


def _block(arch: Arch, name: str, i: int) -> FoundBlock:
    j = lambda rel: _join(name, rel)  # noqa: E731
    return FoundBlock(
        i,
        name,
        j(arch.attn),
        j(arch.mlp),
        j(arch.q),
        j(arch.k),
        j(arch.v),
        j(arch.qkv),
        j(arch.o),
        j(arch.gate),
        j(arch.up),
        j(arch.gate_up),
        j(arch.down),
        j(arch.attn_norm),
        j(arch.mlp_norm),
        j(arch.post_attn_norm),
        j(arch.post_mlp_norm),
        j(arch.q_norm),
        j(arch.k_norm),
    )


def _weight_rows(module: nn.Module | None) -> int | None:
    w = getattr(module, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def _cfg(config, field: str | None, default=None):
    value = getattr(config, field, None) if field else None
    return default if value is None else value


def resolve(model: nn.Module) -> Found | None:
    """``model``'s adapter resolved to full names and geometry, or None when it has no adapter or its
    modules do not follow the family's layout (e.g. a family member with different module names)."""
    arch = arch_of(model)
    if arch is None:
        return None
    hit = _find_layers(model, arch.layers)
    if hit is None:
        return None
    layers_name, backbone = hit
    blocks = tuple(_block(arch, f"{layers_name}.{i}", i) for i in range(len(model.get_submodule(layers_name))))
    for b in blocks:
        required = [b.o, b.down, *b.qkv_layers, *b.ffn_in_layers]
        required += [n for n in (b.attn_norm, b.mlp_norm, b.post_attn_norm, b.post_mlp_norm, b.q_norm, b.k_norm) if n]
        if any(module_at(model, n) is None for n in required):
            return None
        conv1d = _conv1d_type()
        if conv1d is not None and any(isinstance(module_at(model, n), conv1d) for n in required):
            return None  # GPT-2's Conv1D before normalise(): its weights are transposed
    config = hf_config(model)
    b0 = blocks[0]
    attn = module_at(model, b0.attn)
    hidden = int(_cfg(config, arch.cfg_hidden, 0))
    n_heads_cfg = int(_cfg(config, arch.cfg_heads, 0))
    head_dim = int(
        getattr(attn, "head_dim", 0)
        or getattr(attn, "attention_head_size", 0)
        or _cfg(config, arch.cfg_head_dim, 0)
        or (hidden // n_heads_cfg if n_heads_cfg else 0)
    )
    if head_dim <= 0:
        return None
    if b0.qkv:
        rows = _weight_rows(module_at(model, b0.qkv)) or 0
        if arch.cfg_kv_heads is None:
            n_heads = n_kv = rows // head_dim // 3
        else:
            n_kv = int(_cfg(config, arch.cfg_kv_heads, n_heads_cfg))
            n_heads = rows // head_dim - 2 * n_kv
    else:
        n_heads = (_weight_rows(module_at(model, b0.q)) or 0) // head_dim
        n_kv = (_weight_rows(module_at(model, b0.k)) or 0) // head_dim
    down = module_at(model, b0.down)
    inter = int(getattr(down, "in_features", 0) or down.weight.shape[1])
    if n_heads < 1 or n_kv < 1 or n_heads % n_kv:
        return None
    head = _join("", arch.head) if arch.head and module_at(model, arch.head) is not None else None
    return Found(
        arch,
        backbone,
        layers_name,
        _join(backbone, arch.embed),
        _join(backbone, arch.final_norm),
        head,
        _join(backbone, arch.positions),
        blocks,
        hidden,
        n_heads,
        n_kv,
        head_dim,
        inter,
    )


# ------------------------------------------------------------------------------------- scale folding


@dataclass(frozen=True)
class ProducerSpec:
    """The module whose output (or a row range of it) is the input of ``consumers``.

    ``kind``: ``"norm"`` (a norm's weight, and bias, absorb ``1/s``; ``offset`` is 1 for Gemma's
    ``(1 + w)`` norms), ``"rows"`` (the output rows ``rows`` of a linear), ``"heads"`` (the value rows of
    an attention: each kv channel is read by ``rep`` query heads of ``head_dim`` channels)."""

    producer: str
    consumers: tuple[str, ...]
    kind: str
    rows: tuple[int, int] | None = None
    offset: float = 0.0
    rep: int = 1
    head_dim: int = 1


def producers(found: Found, block: FoundBlock) -> list[ProducerSpec]:
    """Where a per-input-channel scale of each stage of ``block`` folds exactly (derived from the adapter)."""
    arch = found.arch
    offset = 1.0 if arch.norm == "rms+1" else 0.0
    out = []
    if block.attn_norm:
        out.append(ProducerSpec(block.attn_norm, block.qkv_layers, "norm", offset=offset))
    if block.mlp_norm:
        out.append(ProducerSpec(block.mlp_norm, block.ffn_in_layers, "norm", offset=offset))
    v_layer, v_rows = found.part(block, "v")
    out.append(ProducerSpec(v_layer, (block.o,), "heads", v_rows, rep=found.rep, head_dim=found.head_dim))
    if arch.gated:
        up_layer, up_rows = found.part(block, "up")
        out.append(ProducerSpec(up_layer, (block.down,), "rows", up_rows))
    return out


# ---------------------------------------------------------------------------------------- structure


def set_widths(
    model: nn.Module, found: Found, *, ffn: int | None = None, heads: tuple[int, int] | None = None, layers=None
) -> None:
    """Write the new widths into the config (and the modules that cache them) after a structured removal:
    ``ffn`` neurons per layer, ``heads = (query, kv)`` per layer, ``layers`` = kept layer indices."""
    arch, config = found.arch, hf_config(model)
    if ffn is not None:
        setattr(config, arch.cfg_ffn, ffn)
        for b in found.blocks:
            mod = module_at(model, b.mlp)
            if isinstance(getattr(mod, "intermediate_size", None), int):
                mod.intermediate_size = ffn
    if heads is not None:
        n_q, n_kv = heads
        for b in found.blocks:
            attn = module_at(model, b.attn)
            for attr, value in (
                ("num_heads", n_q),
                ("n_heads", n_q),
                ("num_attention_heads", n_q),
                ("num_key_value_heads", n_kv),
                ("num_key_value_groups", n_q // n_kv),
                ("all_head_size", n_q * found.head_dim),
            ):
                if isinstance(getattr(attn, attr, None), int):
                    setattr(attn, attr, value)
        if arch.heads_in_config:
            setattr(config, arch.cfg_heads, n_q)
            if arch.cfg_kv_heads:
                setattr(config, arch.cfg_kv_heads, n_kv)
            setattr(config, arch.cfg_head_dim, found.head_dim)
    if layers is not None:
        n = len(found.blocks)
        setattr(config, arch.cfg_layers, len(layers))
        types = getattr(config, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(types) == n:
            config.layer_types = [types[i] for i in layers]


# ------------------------------------------------------------------------------------------ Conv1D


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # noqa: BLE001 - transformers absent or broken: nothing to normalise
        return None
    return Conv1D


@torch.no_grad()
def normalise(model: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` (``y = x W + b`` with ``W`` stored ``(in, out)``) by an
    ``nn.Linear`` holding ``Wᵀ``: the same function, one layer type for every technique. Returns the
    number of layers replaced."""
    conv1d = _conv1d_type()
    if conv1d is None or not isinstance(model, nn.Module):
        return 0
    hits = [(n, m) for n, m in model.named_modules() if isinstance(m, conv1d)]
    for name, mod in hits:
        w = mod.weight
        lin = nn.Linear(w.shape[0], w.shape[1], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.copy_(w.T)
        if mod.bias is not None:
            lin.bias.copy_(mod.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    return len(hits)
