"""Structured surgery on Hugging Face transformers: FFN neurons, attention heads and whole layers.

The layout comes from the family adapter (:mod:`leanml.models.arch`): every family it knows (llama,
mistral, qwen2/3, gemma/2/3, phi3 with fused projections, gpt2, bert, roberta, distilbert) is pruned the
same way. A fused projection (Phi-3's ``qkv_proj``/``gate_up_proj``, GPT-2's ``c_attn``) is a layer
with several :class:`Part`s: each part is a row range, and a unit owns rows in every part.

Every layer loses the same number of units, so the result is described by the model's config, which is
updated through the adapter (:func:`leanml.models.arch.set_widths`: FFN width; head counts and an
explicit head size where the config can state them; layer count, and ``layer_types`` when present): a
model rebuilt from the saved config has the new shapes (this is how :mod:`leanml.artifact` reloads it).
Encoders whose config cannot describe fewer heads of the same size (BERT derives the head size as
``hidden_size / num_attention_heads``) keep their head count in the config; the artifact reloads such a
model from the saved tensor shapes instead. Families whose attention cannot run with fewer heads than
its config says (GPT-2 splits its fused projection by the hidden size) refuse head removal.

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
from leanml.models.arch import Found, hf_config, resolve, set_widths

from .surgery import expand_index, keep_columns, keep_row_positions

__all__ = ["Block", "Layout", "Part", "detect_layout", "drop_layers", "hf_config", "prune_ffn", "prune_heads"]

# families whose attention splits a fused projection by the hidden size, so fewer heads cannot run
_NO_HEAD_REMOVAL = ("gpt2",)


@dataclass(frozen=True)
class Part:
    """Rows ``rows`` (all rows when None) of layer ``layer``."""

    layer: str
    rows: tuple[int, int] | None = None

    def start(self) -> int:
        return 0 if self.rows is None else self.rows[0]


@dataclass(frozen=True)
class Block:
    """One transformer layer's prunable parts (full module names)."""

    index: int
    name: str
    ffn_rows: tuple[Part, ...]  # parts producing the FFN neurons (rows are removed)
    ffn_cols: str  # the layer reading them (columns are removed)
    ffn: str  # the module that records the width (``intermediate_size``), if any
    q: Part
    k: Part
    v: Part
    o: str
    attn: str  # the module that records the head counts

    @property
    def ffn_layers(self) -> list[str]:
        return list(dict.fromkeys([p.layer for p in self.ffn_rows] + [self.ffn_cols]))

    @property
    def attn_layers(self) -> list[str]:
        return list(dict.fromkeys([self.q.layer, self.k.layer, self.v.layer, self.o]))


@dataclass(frozen=True)
class Layout:
    """A transformer's prunable structure: its family, the name of the ``ModuleList`` of layers, its
    blocks, and the attention geometry shared by all of them."""

    family: str
    layers: str
    blocks: tuple[Block, ...]
    head_dim: int
    n_heads: int
    n_kv: int
    intermediate: int
    found: Found

    @property
    def rep(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv

    @property
    def heads_removable(self) -> bool:
        return self.family not in _NO_HEAD_REMOVAL


def _block(found: Found, i: int) -> Block:
    b = found.blocks[i]
    ffn_parts = tuple(Part(*found.part(b, w)) for w in (("gate", "up") if found.arch.gated else ("up",)))
    q, k, v = (Part(*found.part(b, w)) for w in ("q", "k", "v"))
    return Block(i, b.name, ffn_parts, b.down, b.mlp, q, k, v, b.o, b.attn)


def detect_layout(model: nn.Module) -> Layout | None:
    """The prunable layout of a Hugging Face transformer of a supported family, or None."""
    found = resolve(model)
    if found is None:
        return None
    blocks = tuple(_block(found, i) for i in range(len(found.blocks)))
    widths = set()
    for b in blocks:
        q = model.get_submodule(b.q.layer).weight.shape[0] if b.q.rows is None else b.q.rows[1] - b.q.rows[0]
        k = model.get_submodule(b.k.layer).weight.shape[0] if b.k.rows is None else b.k.rows[1] - b.k.rows[0]
        inter = model.get_submodule(b.ffn_cols).weight.shape[1]
        widths.add((q // found.head_dim, k // found.head_dim, inter))
    if len(widths) != 1:
        raise LeanmlError(
            f"the layers of {found.layers!r} have different widths {sorted(widths)[:2]}; structured pruning of a "
            "Hugging Face model keeps every layer alike, so it cannot continue from a non-uniform model"
        )
    n_heads, n_kv, inter = widths.pop()
    if n_kv < 1 or n_heads % n_kv:
        raise LeanmlError(f"{n_heads} query heads do not split evenly over {n_kv} key/value heads")
    return Layout(found.family, found.layers, blocks, found.head_dim, n_heads, n_kv, inter, found)


# ----------------------------------------------------------------------------------------------------
# Units: which weights belong to which unit (for scoring)
# ----------------------------------------------------------------------------------------------------


Slice = tuple[str, int, "tuple[int, int] | None"]  # (layer, axis, row range or None)


def ffn_slices(block: Block) -> list[Slice]:
    """``(layer, axis, rows)`` slices holding the FFN neurons of ``block``: rows of the producers (a
    range of a fused layer), columns of the reader."""
    return [(p.layer, 0, p.rows) for p in block.ffn_rows] + [(block.ffn_cols, 1, None)]


def head_slices(block: Block, kv_groups: bool) -> list[Slice]:
    """``(layer, axis, rows)`` slices holding the attention units of ``block``: with ``kv_groups`` a unit
    is a key/value head with its query heads (q, k, v rows and o columns); otherwise a query head (q rows
    and o columns)."""
    pairs = [(block.q.layer, 0, block.q.rows), (block.o, 1, None)]
    return pairs + [(block.k.layer, 0, block.k.rows), (block.v.layer, 0, block.v.rows)] if kv_groups else pairs


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
        prune_block_ffn(model, b, keep[b.index])
    set_widths(model, layout.found, ffn=width)


@torch.no_grad()
def prune_block_ffn(model: nn.Module, b: Block, keep: list[int]) -> None:
    """Keep FFN neurons ``keep`` (ascending) of block ``b`` alone; the config's width is the caller's."""
    _keep_parts(model, [(p, keep, 1) for p in b.ffn_rows])
    keep_columns(model.get_submodule(b.ffn_cols), keep, 1, b.ffn_cols)


def _keep_parts(model: nn.Module, parts: list[tuple[Part, list[int], int]]) -> None:
    """Keep units ``idx`` (of ``chunk`` rows each) in every part; the parts of one fused layer are cut
    together, so its row ranges stay in order."""
    by_layer: dict[str, list[torch.Tensor]] = {}
    for part, idx, chunk in parts:
        by_layer.setdefault(part.layer, []).append(part.start() + expand_index(idx, chunk))
    for layer, positions in by_layer.items():
        keep_row_positions(model.get_submodule(layer), torch.cat(positions), layer)


@torch.no_grad()
def prune_heads(model: nn.Module, layout: Layout, keep_q: dict[int, list[int]], keep_kv: dict[int, list[int]]) -> None:
    """Keep query heads ``keep_q[i]`` and key/value heads ``keep_kv[i]`` (ascending) in block ``i``.

    The kept query heads must still form equal groups over the kept kv heads, in order (query head j of
    the result reads kv head ``j // rep'``); the callers guarantee it by removing whole groups, or the same
    number of query heads from every group.
    """
    if not layout.heads_removable:
        raise LeanmlError(
            f"attention heads of {layout.family} models cannot be removed (its attention splits the fused "
            "projection by the hidden size); use unit 'neurons' or 'layers'"
        )
    n_q = _check_uniform(keep_q, "query heads")
    n_kv = _check_uniform(keep_kv, "key/value heads")
    if n_q % n_kv:
        raise LeanmlError(f"{n_q} query heads do not split evenly over {n_kv} key/value heads")
    for b in layout.blocks:
        prune_block_heads(model, layout, b, keep_q[b.index], keep_kv[b.index])
    set_widths(model, layout.found, heads=(n_q, n_kv))


@torch.no_grad()
def prune_block_heads(model: nn.Module, layout: Layout, b: Block, q_heads: list[int], kv_heads: list[int]) -> None:
    """Keep query heads ``q_heads`` and key/value heads ``kv_heads`` (ascending) of block ``b`` alone
    (see :func:`prune_heads`); the config's head counts are the caller's."""
    n_q, n_kv = len(q_heads), len(kv_heads)
    if not n_kv or n_q % n_kv:
        raise LeanmlError(f"{n_q} query heads do not split evenly over {n_kv} key/value heads")
    for h in q_heads:  # each kept query head must read one of the kept kv heads, in group order
        if h // layout.rep not in kv_heads:
            raise LeanmlError(f"query head {h} of {b.name!r} would lose its key/value head {h // layout.rep}")
    if [kv_heads.index(h // layout.rep) for h in q_heads] != [j // (n_q // n_kv) for j in range(n_q)]:
        raise LeanmlError(f"the kept query heads of {b.name!r} do not form equal groups over the kept kv heads")
    hd = layout.head_dim
    parts = [(b.q, q_heads, hd)]
    if len(kv_heads) != layout.n_kv or b.k.layer == b.q.layer:
        parts += [(b.k, kv_heads, hd), (b.v, kv_heads, hd)]
    _keep_parts(model, parts)
    keep_columns(model.get_submodule(b.o), q_heads, hd, b.o)


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
    set_widths(model, layout.found, layers=kept)
