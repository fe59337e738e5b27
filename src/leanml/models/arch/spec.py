"""What an architecture adapter declares (:class:`Arch`) and what it resolves to on a model (:class:`Found`).

An adapter is data, not code: module paths relative to the backbone (``layers``, ``embed``...) and to
one block (``q``, ``gate_up``...), the norm kind, and the config fields that change when units are
removed. Everything below derives from those declarations; techniques, runtimes and exporters read
the resolved :class:`Found` (full module names) and never spell a module name themselves.

Conventions:

* a fused projection lists its parts in order: ``qkv`` holds q, k, v rows (in that order) and
  ``gate_up`` holds gate then up rows; :meth:`Found.sections` gives each part's row range;
* ``norm`` is ``"rms"`` (``w * x / rms(x)``), ``"rms+1"`` (Gemma: ``(1 + w) * x / rms(x)``) or
  ``"layer"`` (LayerNorm with bias);
* a norm that feeds only a block's projections (a pre-norm) can absorb per-channel scales exactly; a
  post-LN encoder (BERT) has none, so ``attn_norm``/``mlp_norm`` are None there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class Arch:
    """A model family's layout (see the module docstring)."""

    family: str
    model_types: tuple[str, ...]
    kind: str  # "decoder" or "encoder"
    layers: str  # the ModuleList of blocks, relative to the backbone
    embed: str  # token embedding, relative to the backbone
    final_norm: str | None = None  # relative to the backbone
    head: str | None = None  # output projection, relative to the model root
    positions: str | None = None  # learned position embedding (GPT-2), relative to the backbone
    attn: str = "self_attn"  # the attention module (holds head counts)
    mlp: str = "mlp"  # the FFN module (holds its width, if any)
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # fused q/k/v
    o: str = "self_attn.o_proj"
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None  # fused gate/up
    down: str = "mlp.down_proj"
    attn_norm: str | None = None  # pre-norm feeding q/k/v
    mlp_norm: str | None = None  # pre-norm feeding gate/up
    post_attn_norm: str | None = None  # norm of the attention output before the residual add (Gemma 2/3)
    post_mlp_norm: str | None = None
    q_norm: str | None = None  # per-head norms of q and k (Qwen3, Gemma 3)
    k_norm: str | None = None
    norm: str = "rms"
    gated: bool = True  # FFN is act(gate) * up
    embed_scale: str | None = None  # "sqrt_hidden": embeddings multiplied by sqrt(hidden) (Gemma)
    # config fields
    cfg_ffn: str = "intermediate_size"
    cfg_heads: str = "num_attention_heads"
    cfg_kv_heads: str | None = "num_key_value_heads"
    cfg_head_dim: str | None = "head_dim"  # None: the config derives head_dim = hidden / heads
    cfg_layers: str = "num_hidden_layers"
    cfg_hidden: str = "hidden_size"
    cfg_eps: str = "rms_norm_eps"
    # what the family supports beyond plain linear layers
    rotate: bool = False  # residual-stream rotation (needs RMS pre-norms only, no post-norms)
    gguf: str | None = None  # llama.cpp architecture name
    onnx_llm: bool = False  # the MatMulNBits/GQA/KV-cache graph
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def separate_qkv(self) -> bool:
        return self.qkv is None

    @property
    def heads_in_config(self) -> bool:
        """Whether the config can describe fewer heads of the same size (it states head_dim)."""
        return self.cfg_head_dim is not None


@dataclass(frozen=True)
class FoundBlock:
    """Full module names of one block's parts (None where the family has no such part)."""

    index: int
    name: str
    attn: str
    mlp: str
    q: str | None
    k: str | None
    v: str | None
    qkv: str | None
    o: str
    gate: str | None
    up: str | None
    gate_up: str | None
    down: str
    attn_norm: str | None
    mlp_norm: str | None
    post_attn_norm: str | None
    post_mlp_norm: str | None
    q_norm: str | None
    k_norm: str | None

    @property
    def qkv_layers(self) -> tuple[str, ...]:
        return (self.qkv,) if self.qkv else tuple(n for n in (self.q, self.k, self.v) if n)

    @property
    def ffn_in_layers(self) -> tuple[str, ...]:
        return (self.gate_up,) if self.gate_up else tuple(n for n in (self.gate, self.up) if n)

    @property
    def linears(self) -> tuple[str, ...]:
        return (*self.qkv_layers, self.o, *self.ffn_in_layers, self.down)


@dataclass(frozen=True)
class Found:
    """An :class:`Arch` resolved on one model: full names, attention geometry and widths."""

    arch: Arch
    backbone: str  # "" when the model is the backbone itself
    layers: str
    embed: str
    final_norm: str | None
    head: str | None
    positions: str | None
    blocks: tuple[FoundBlock, ...]
    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    intermediate: int

    @property
    def family(self) -> str:
        return self.arch.family

    @property
    def rep(self) -> int:
        return self.n_heads // self.n_kv

    def sections(self, fused: str) -> dict[str, tuple[int, int]]:
        """Row ranges ``(start, stop)`` of the parts of a fused projection (``"qkv"`` or ``"gate_up"``)."""
        if fused == "qkv":
            q, kv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
        if fused == "gate_up":
            n = self.intermediate
            return {"gate": (0, n), "up": (n, 2 * n)}
        raise ValueError(f"unknown fused projection {fused!r}")

    def part(self, block: FoundBlock, what: str) -> tuple[str, tuple[int, int] | None]:
        """``(layer, rows)`` holding ``what`` (q, k, v, gate, up) of ``block``: rows is None for a layer
        of its own, else the row range inside the fused layer."""
        if what in ("q", "k", "v"):
            return (getattr(block, what), None) if block.qkv is None else (block.qkv, self.sections("qkv")[what])
        if what in ("gate", "up"):
            if block.gate_up is None:
                return getattr(block, what), None
            return block.gate_up, self.sections("gate_up")[what]
        raise ValueError(f"unknown part {what!r}")


def module_at(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted ``path`` or None (an empty path is ``root``)."""
    mod = root
    for part in path.split(".") if path else ():
        mod = getattr(mod, part, None)
        if not isinstance(mod, nn.Module):
            return None
    return mod
