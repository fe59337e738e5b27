"""Structured surgery on Hugging Face transformers: FFN neurons, attention heads and whole layers.

The layout is found from the module structure, not the model name, so every model built like these
two families works:

* **llama-style** decoders (Llama, Mistral, Qwen2, SmolLM...): a ``ModuleList`` of blocks with
  ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate_proj,up_proj,down_proj}`` (``gate_proj`` optional);
* **BERT-style** encoders (BERT, RoBERTa, MiniLM...): ``attention.self.{query,key,value}``,
  ``attention.output.dense``, ``intermediate.dense`` and ``output.dense``.

Every layer loses the same number of units, so the result is described by the model's config, which is
updated (``intermediate_size``; ``num_attention_heads``, ``num_key_value_heads`` and an explicit
``head_dim`` for llama-style models; ``num_hidden_layers``, and ``layer_types`` when present): a model
rebuilt from the saved config has the new shapes (this is how :mod:`leanml.artifact` reloads it).
BERT's config cannot describe fewer heads of the same size (it derives the head size as ``hidden_size /
num_attention_heads``), so after head pruning a BERT config keeps its head count; the artifact reloads
such a model from the saved tensor shapes instead.

Grouped-query attention (``n_kv < n_heads``; query head ``h`` reads key/value head ``h // rep``) is
pruned in one of two ways, both representable by the config: remove whole key/value groups (a kv head
and its ``rep`` query heads) or keep every kv head and remove the same number of query heads from each
group (``rep`` shrinks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanml.errors import LeanmlError

from .surgery import keep_columns, keep_rows


@dataclass(frozen=True)
class Block:
    """Names (relative to the model) of one transformer layer's prunable parts."""

    index: int
    name: str
    ffn_rows: tuple[str, ...]  # layers producing the FFN neurons (rows are removed)
    ffn_cols: str  # the layer reading them (columns are removed)
    ffn: str  # the module that records the width (``intermediate_size``), if any
    q: str
    k: str
    v: str
    o: str
    attn: str  # the module that records the head counts


@dataclass(frozen=True)
class Layout:
    """A transformer's prunable structure: ``family`` (``llama`` or ``bert``), the name of the
    ``ModuleList`` of layers, its blocks, and the attention geometry shared by all of them."""

    family: str
    layers: str
    blocks: tuple[Block, ...]
    head_dim: int
    n_heads: int
    n_kv: int
    intermediate: int

    @property
    def rep(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv


def _is_linear(module: nn.Module, *names: str) -> bool:
    """``module`` has submodules ``names`` (their types are checked by the surgery, which refuses
    layers it cannot resize, such as quantized ones)."""
    return all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def _llama_block(prefix: str, i: int, blk: nn.Module) -> Block | None:
    attn, mlp = getattr(blk, "self_attn", None), getattr(blk, "mlp", None)
    if attn is None or mlp is None or not _is_linear(attn, "q_proj", "k_proj", "v_proj", "o_proj"):
        return None
    if not _is_linear(mlp, "up_proj", "down_proj"):
        return None
    name = f"{prefix}.{i}"
    rows = tuple(f"{name}.mlp.{n}" for n in ("gate_proj", "up_proj") if _is_linear(mlp, n))
    a = f"{name}.self_attn"
    return Block(
        i, name, rows, f"{name}.mlp.down_proj", f"{name}.mlp", f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.o_proj", a
    )


def _bert_block(prefix: str, i: int, blk: nn.Module) -> Block | None:
    att = getattr(blk, "attention", None)
    sa, so = getattr(att, "self", None), getattr(att, "output", None)
    inter, out = getattr(blk, "intermediate", None), getattr(blk, "output", None)
    if any(m is None for m in (sa, so, inter, out)):
        return None
    if not (
        _is_linear(sa, "query", "key", "value")
        and _is_linear(so, "dense")
        and _is_linear(inter, "dense")
        and _is_linear(out, "dense")
    ):
        return None
    name = f"{prefix}.{i}"
    s = f"{name}.attention.self"
    return Block(
        i,
        name,
        (f"{name}.intermediate.dense",),
        f"{name}.output.dense",
        f"{name}.intermediate",
        f"{s}.query",
        f"{s}.key",
        f"{s}.value",
        f"{name}.attention.output.dense",
        s,
    )


def hf_config(model: nn.Module):
    """The (text) config a Hugging Face model is rebuilt from, or None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def detect_layout(model: nn.Module) -> Layout | None:
    """The prunable layout of a llama-style or BERT-style Hugging Face model, or None for other models."""
    if hf_config(model) is None:
        return None
    for prefix, ml in model.named_modules():
        if not isinstance(ml, nn.ModuleList) or len(ml) == 0 or not prefix:
            continue
        for family, make in (("llama", _llama_block), ("bert", _bert_block)):
            blocks = [make(prefix, i, blk) for i, blk in enumerate(ml)]
            if all(b is not None for b in blocks):
                return _geometry(model, family, prefix, tuple(blocks))
    return None


def _geometry(model: nn.Module, family: str, prefix: str, blocks: tuple[Block, ...]) -> Layout:
    widths = set()
    for b in blocks:
        attn = model.get_submodule(b.attn)
        head_dim = int(getattr(attn, "head_dim", 0) or getattr(attn, "attention_head_size", 0))
        if head_dim <= 0:
            raise LeanmlError(f"attention {b.attn!r} does not record its head size (head_dim)")
        q, k = (model.get_submodule(n).weight.shape[0] for n in (b.q, b.k))
        inter = model.get_submodule(b.ffn_cols).weight.shape[1]
        widths.add((head_dim, q // head_dim, k // head_dim, inter))
    if len(widths) != 1:
        raise LeanmlError(
            f"the layers of {prefix!r} have different widths {sorted(widths)[:2]}; structured pruning of a "
            "Hugging Face model keeps every layer alike, so it cannot continue from a non-uniform model"
        )
    head_dim, n_heads, n_kv, inter = widths.pop()
    if n_kv < 1 or n_heads % n_kv:
        raise LeanmlError(f"{n_heads} query heads do not split evenly over {n_kv} key/value heads")
    return Layout(family, prefix, blocks, head_dim, n_heads, n_kv, inter)


# ----------------------------------------------------------------------------------------------------
# Units: which weights belong to which unit (for scoring)
# ----------------------------------------------------------------------------------------------------


def ffn_slices(block: Block) -> list[tuple[str, int]]:
    """``(layer, axis)`` pairs holding the FFN neurons of ``block``: rows of the producers, columns of the
    reader."""
    return [(n, 0) for n in block.ffn_rows] + [(block.ffn_cols, 1)]


def head_slices(block: Block, kv_groups: bool) -> list[tuple[str, int]]:
    """``(layer, axis)`` pairs holding the attention units of ``block``: with ``kv_groups`` a unit is a
    key/value head with its query heads (q, k, v rows and o columns); otherwise a query head (q rows
    and o columns)."""
    pairs = [(block.q, 0), (block.o, 1)]
    return pairs + [(block.k, 0), (block.v, 0)] if kv_groups else pairs


# ----------------------------------------------------------------------------------------------------
# Surgery
# ----------------------------------------------------------------------------------------------------


def _check_uniform(keeps: dict[int, list[int]], what: str) -> int:
    sizes = {len(v) for v in keeps.values()}
    if len(sizes) != 1:
        raise LeanmlError(f"every layer must keep the same number of {what}, got {sorted(sizes)}")
    return sizes.pop()


@torch.no_grad()
def prune_ffn(model: nn.Module, layout: Layout, keep: dict[int, list[int]]) -> None:
    """Keep FFN neurons ``keep[i]`` (ascending) in block ``i``; every block must be listed, with the
    same count, which becomes ``config.intermediate_size``."""
    if set(keep) != {b.index for b in layout.blocks}:
        raise LeanmlError("FFN pruning of a Hugging Face model must cover every layer (the config has one width)")
    width = _check_uniform(keep, "FFN neurons")
    for b in layout.blocks:
        for name in b.ffn_rows:
            keep_rows(model.get_submodule(name), keep[b.index], 1, name)
        keep_columns(model.get_submodule(b.ffn_cols), keep[b.index], 1, b.ffn_cols)
        ffn = model.get_submodule(b.ffn)
        if isinstance(getattr(ffn, "intermediate_size", None), int):
            ffn.intermediate_size = width
    hf_config(model).intermediate_size = width


@torch.no_grad()
def prune_heads(model: nn.Module, layout: Layout, keep_q: dict[int, list[int]], keep_kv: dict[int, list[int]]) -> None:
    """Keep query heads ``keep_q[i]`` and key/value heads ``keep_kv[i]`` (ascending) in block ``i``.

    The kept query heads must still form equal groups over the kept kv heads, in order (query head j of
    the result reads kv head ``j // rep'``); the callers guarantee it by removing whole groups, or the same
    number of query heads from every group.
    """
    hd = layout.head_dim
    n_q = _check_uniform(keep_q, "query heads")
    n_kv = _check_uniform(keep_kv, "key/value heads")
    if n_q % n_kv:
        raise LeanmlError(f"{n_q} query heads do not split evenly over {n_kv} key/value heads")
    for b in layout.blocks:
        q_heads, kv_heads = keep_q[b.index], keep_kv[b.index]
        for h in q_heads:  # each kept query head must read one of the kept kv heads, in group order
            if h // layout.rep not in kv_heads:
                raise LeanmlError(f"query head {h} of {b.name!r} would lose its key/value head {h // layout.rep}")
        if [kv_heads.index(h // layout.rep) for h in q_heads] != [j // (n_q // n_kv) for j in range(n_q)]:
            raise LeanmlError(f"the kept query heads of {b.name!r} do not form equal groups over the kept kv heads")
        keep_rows(model.get_submodule(b.q), q_heads, hd, b.q)
        keep_columns(model.get_submodule(b.o), q_heads, hd, b.o)
        if len(kv_heads) != layout.n_kv:
            keep_rows(model.get_submodule(b.k), kv_heads, hd, b.k)
            keep_rows(model.get_submodule(b.v), kv_heads, hd, b.v)
        attn = model.get_submodule(b.attn)
        for attr, value in (
            ("num_heads", n_q),
            ("num_attention_heads", n_q),
            ("num_key_value_heads", n_kv),
            ("num_key_value_groups", n_q // n_kv),
            ("all_head_size", n_q * hd),
        ):
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, value)
    config = hf_config(model)
    if layout.family == "llama":
        config.num_attention_heads = n_q
        config.num_key_value_heads = n_kv
        config.head_dim = hd


@torch.no_grad()
def drop_layers(model: nn.Module, layout: Layout, remove: list[int]) -> None:
    """Remove blocks ``remove`` (indices) from the layer list; the others are renumbered (every
    ``layer_idx`` inside them, so a key/value cache has one slot per remaining layer) and the config's
    ``num_hidden_layers`` (and ``layer_types``) follow."""
    ml = model.get_submodule(layout.layers)
    n = len(ml)
    kept = [i for i in range(n) if i not in set(remove)]
    if not kept:
        raise LeanmlError(f"removing layers {sorted(remove)} would leave no layer in {layout.layers!r}")
    new = nn.ModuleList([ml[i] for i in kept])
    for new_idx, blk in enumerate(new):
        for sub in blk.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_idx
    parent, _, child = layout.layers.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    config = hf_config(model)
    config.num_hidden_layers = len(kept)
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n:
        config.layer_types = [types[i] for i in kept]
