"""Quantized layers. The stored integers, scales and zero points are real (they are what is saved
and exported); compute here is simulated in float (quantize → dequantize), and real integer kernels
come from the runtimes.

* :class:`QuantLinear` - weight-only n-bit (2..8) affine, per group / per channel, any column order.
* :class:`Int8ActLinear` / :class:`Int8ActConv2d` - int8 weights (symmetric per output channel) and
  int8 activations, either static (calibrated per-tensor range) or dynamic (per token at run time).
* :class:`CodebookLinear` - weights as indices into a small table of levels (k-means, NF4, log2).
* :class:`QuantEmbedding` - an input embedding tied to a quantized output head: it reads its rows from
  the head's codes, so the table is stored once, quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LeanmlError
from .gptq import QuantizedWeight, dequantize_groups
from .packing import pack_bits, unpack_bits
from .primitives import qrange


class QuantLinear(torch.nn.Module):
    """A linear layer whose weight is stored as packed ``bits``-bit codes with per-group scales."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        contiguous_groups: bool = True,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        n_groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros((out_features * in_features * bits + 7) // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, n_groups))
        self.register_buffer("zero_points", torch.zeros(out_features, n_groups, dtype=torch.uint8))
        if contiguous_groups:
            self.g_idx = None
        else:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("_weight", None, persistent=False)
        # keep the dequantized weight after the first forward (fast); off for a model whose float weights
        # would not fit in memory, which then dequantizes each layer on each call
        self.cache_weight = True

    @classmethod
    def from_quantized(cls, linear: torch.nn.Linear, qw: QuantizedWeight) -> QuantLinear:
        out_f, in_f = qw.codes.shape
        contiguous = bool(torch.equal(qw.g_idx.to(torch.int64), torch.arange(in_f) // qw.group_size))
        layer = cls(in_f, out_f, qw.bits, qw.group_size, qw.symmetric, linear.bias is not None, contiguous)
        qmin, _ = qrange(qw.bits, qw.symmetric)
        layer.qweight = pack_bits(qw.codes - qmin, qw.bits)
        layer.scales = qw.scales.to(torch.float32).clone()
        layer.zero_points = qw.zero_points.round().to(torch.uint8)  # 0 when symmetric
        if not contiguous:
            layer.g_idx = qw.g_idx.to(torch.int32).clone()
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.detach().clone())
        return layer

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.to(torch.int64)
        return torch.arange(self.in_features) // self.group_size

    def codes(self) -> torch.Tensor:
        """Signed or unsigned integer codes (out, in) as int64."""
        qmin, _ = qrange(self.bits, self.symmetric)
        numel = self.in_features * self.out_features
        return (unpack_bits(self.qweight, self.bits, numel) + qmin).reshape(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return dequantize_groups(self.codes(), self.scales, self.zero_points.to(torch.float32), self.group_index())

    @property
    def weight(self) -> torch.Tensor:
        if not self.cache_weight:
            return self._weight if self._weight is not None else self.dequantize()
        if self._weight is None:
            self._weight = self.dequantize()
        return self._weight

    def _load_from_state_dict(self, *args, **kwargs):
        self._weight = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def to_spec(self) -> dict:
        return {
            "type": "QuantLinear",
            "in": self.in_features,
            "out": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "bias": self.bias is not None,
            "contiguous_groups": self.g_idx is None,
        }

    @classmethod
    def from_spec(cls, s: dict) -> QuantLinear:
        return cls(s["in"], s["out"], s["bits"], s["group_size"], s["symmetric"], s["bias"], s["contiguous_groups"])

    def weight_numel(self) -> int:
        """Weights stored as integer codes (buffers, so not counted as parameters)."""
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
            f"{'sym' if self.symmetric else 'asym'}{'' if self.g_idx is None else ', act-order'}"
        )


def quantize_act(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Fake-quantize activations to int8 (uint8 when asymmetric) with the given scale/zero point."""
    qmin, qmax = (-128, 127) if symmetric else (0, 255)
    return (torch.clamp(torch.round(x / scale + zero_point), qmin, qmax) - zero_point) * scale


def dynamic_act(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """Symmetric int8 fake quantization with the range of each token (or the whole tensor) at run time."""
    amax = x.abs().amax(dim=-1, keepdim=True) if per_token else x.abs().amax()
    scale = torch.clamp(amax, min=1e-8) / 127.0
    return torch.clamp(torch.round(x / scale), -127, 127) * scale


def int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes and per-output-channel scales of a weight (out, ...)."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(1)
    scale = torch.clamp(amax, min=1e-12) / 127.0
    shape = (-1,) + (1,) * (w.ndim - 1)
    codes = torch.clamp(torch.round(w.detach() / scale.reshape(shape)), -127, 127).to(torch.int8)
    return codes, scale


class _Int8Act(torch.nn.Module):
    """Shared parts of int8 weight + int8 activation layers."""

    def _init_int8(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        mode: str,
        per_token: bool,
        symmetric_act: bool,
        smooth_inv: torch.Tensor | None = None,
    ) -> None:
        if mode not in ("static", "dynamic"):
            raise ValueError(f"activation mode {mode!r} is not static or dynamic")
        codes, scale = int8_weight(weight)
        self.register_buffer("smooth_inv", None if smooth_inv is None else smooth_inv.detach().to(torch.float32).clone())
        self.register_buffer("qweight", codes)
        self.register_buffer("w_scale", scale.to(torch.float32))
        self.register_buffer("act_scale", torch.ones(()))
        self.register_buffer("act_zero_point", torch.zeros(()))
        self.bias = torch.nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.mode, self.per_token, self.symmetric_act = mode, per_token, symmetric_act
        self.register_buffer("_weight", None, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        if self._weight is None:
            shape = (-1,) + (1,) * (self.qweight.ndim - 1)
            self._weight = self.qweight.to(torch.float32) * self.w_scale.reshape(shape)
        return self._weight

    def weight_numel(self) -> int:
        """Weights stored as int8 codes (buffers, so not counted as parameters)."""
        return self.qweight.numel()

    def _load_from_state_dict(self, *args, **kwargs):
        self._weight = None
        return super()._load_from_state_dict(*args, **kwargs)

    def set_act_range(self, lo: float, hi: float) -> None:
        """Fix the activation range (static mode), as an observer found it."""
        if self.symmetric_act:
            amax = max(abs(lo), abs(hi), 1e-8)
            self.act_scale = torch.tensor(amax / 127.0)
            self.act_zero_point = torch.tensor(0.0)
        else:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            scale = max(hi - lo, 1e-8) / 255.0
            self.act_scale = torch.tensor(scale)
            self.act_zero_point = torch.tensor(float(round(-lo / scale)))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth_inv is not None:
            x = x * self.smooth_inv
        if self.mode == "dynamic":
            return dynamic_act(x, self.per_token)
        return quantize_act(x, self.act_scale, self.act_zero_point, self.symmetric_act)


class Int8ActLinear(_Int8Act):
    """int8 weight (per output channel) × int8 activation (static per tensor, or dynamic per token)."""

    def __init__(
        self,
        linear: torch.nn.Linear,
        mode: str = "dynamic",
        per_token: bool = True,
        symmetric_act: bool = False,
        smooth_inv: torch.Tensor | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_int8(linear.weight, linear.bias, mode, per_token, symmetric_act, smooth_inv)

    def to_spec(self) -> dict:
        return {
            "type": "Int8ActLinear",
            "in": self.in_features,
            "out": self.out_features,
            "mode": self.mode,
            "per_token": self.per_token,
            "symmetric_act": self.symmetric_act,
            "bias": self.bias is not None,
            "smooth": self.smooth_inv is not None,
        }

    @classmethod
    def from_spec(cls, s: dict) -> Int8ActLinear:
        smooth = torch.ones(s["in"]) if s["smooth"] else None
        return cls(torch.nn.Linear(s["in"], s["out"], bias=s["bias"]), s["mode"], s["per_token"], s["symmetric_act"], smooth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, W8A8 {self.mode}"


def same_pad(x: torch.Tensor, kernel_size, stride, dilation) -> torch.Tensor:
    """``x`` padded as TensorFlow's "SAME" convolution pads it, from its size at run time (timm's
    ``pad_same``): ``max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)`` per axis, the odd one at the end."""
    pads = []
    for i, k, s, d in zip(x.shape[-2:], kernel_size, stride, dilation, strict=True):
        total = max((-(-i // s) - 1) * s + (k - 1) * d + 1 - i, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return F.pad(x, [left, right, top, bottom]) if top or bottom or left or right else x


class Int8ActConv2d(_Int8Act):
    """int8 convolution: int8 weights per output channel, int8 activations per tensor.

    The padding is the conv's: static (``conv_args["padding"]``, with its ``padding_mode``), or, with
    ``pad_same``, TensorFlow "SAME" computed from the input size at run time (timm's ``Conv2dSame``), so
    the layer runs at every input size the float one does. At stride 1 "SAME" is static (PyTorch's
    ``padding="same"``), so ``pad_same`` stays on only for strided convs; ``conv_args`` are the keyword
    arguments of an equivalent ``nn.Conv2d`` whenever it is off."""

    def __init__(self, conv: torch.nn.Conv2d, mode: str = "static", symmetric_act: bool = False, pad_same: bool = False):
        super().__init__()
        self.conv_args = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups}
        self.pad_same = bool(pad_same)
        if self.pad_same and tuple(conv.stride) == (1, 1):  # at stride 1, "SAME" pads d * (k - 1) at any size
            self.pad_same, self.conv_args["padding"] = False, "same"
        elif self.pad_same:
            self.conv_args["padding"] = (0, 0)
        padding_mode = getattr(conv, "padding_mode", "zeros")
        self._pre_pad = None
        if padding_mode != "zeros" and not self.pad_same:
            self.conv_args["padding_mode"] = padding_mode
            self._pre_pad = list(conv._reversed_padding_repeated_twice)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self._init_int8(conv.weight, conv.bias, mode, False, symmetric_act)

    def to_spec(self) -> dict:
        spec = {
            "type": "Int8ActConv2d",
            "in": self.in_channels,
            "out": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "mode": self.mode,
            "symmetric_act": self.symmetric_act,
            "bias": self.bias is not None,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in self.conv_args.items()},
        }
        if self.pad_same:
            spec["pad_same"] = True
        return spec

    @classmethod
    def from_spec(cls, s: dict) -> Int8ActConv2d:
        conv = torch.nn.Conv2d(
            s["in"],
            s["out"],
            tuple(s["kernel_size"]),
            stride=tuple(s["stride"]),
            padding=tuple(s["padding"]) if isinstance(s["padding"], list) else s["padding"],
            dilation=tuple(s["dilation"]),
            groups=s["groups"],
            bias=s["bias"],
            padding_mode=s.get("padding_mode", "zeros"),
        )
        return cls(conv, s["mode"], s["symmetric_act"], s.get("pad_same", False))

    def conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The float convolution of ``x`` by ``weight`` with this layer's padding, stride and groups."""
        args = {k: v for k, v in self.conv_args.items() if k != "padding_mode"}
        if self.pad_same:
            x = same_pad(x, self.kernel_size, args["stride"], args["dilation"])
        elif self._pre_pad is not None:
            x = F.pad(x, self._pre_pad, mode=self.conv_args["padding_mode"])
            args["padding"] = 0
        return F.conv2d(x, weight, self.bias, **args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.quantize_input(x), self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        pad = ", pad=SAME (dynamic)" if self.pad_same else ""
        return f"{self.in_channels}→{self.out_channels}, kernel={tuple(self.kernel_size)}{pad}, W8A8 {self.mode}"


class CodebookLinear(torch.nn.Module):
    """A linear layer whose weight entries are indices into a table of float levels."""

    def __init__(
        self,
        linear: torch.nn.Linear,
        codes: torch.Tensor,
        codebook: torch.Tensor,
        bits: int,
        method: str,
        row_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.method = linear.in_features, linear.out_features, bits, method
        self.register_buffer("qweight", pack_bits(codes.to(torch.int64), bits))
        self.register_buffer("codebook", codebook.to(torch.float32).clone())
        self.register_buffer("row_scale", row_scale.to(torch.float32).clone() if row_scale is not None else torch.ones(()))
        self.bias = torch.nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.register_buffer("_weight", None, persistent=False)

    def weight_numel(self) -> int:
        """Weights stored as indices into the codebook (buffers, so not counted as parameters)."""
        return self.in_features * self.out_features

    def dequantize(self) -> torch.Tensor:
        codes = unpack_bits(self.qweight, self.bits, self.in_features * self.out_features).reshape(self.out_features, -1)
        # one table per output row, or one for the whole tensor
        w = torch.gather(self.codebook, 1, codes) if self.codebook.ndim == 2 else self.codebook[codes]
        return w * (
            self.row_scale
            if self.row_scale.ndim == 0
            else self.row_scale.reshape(self.out_features, -1).repeat_interleave(
                self.in_features // self.row_scale.reshape(self.out_features, -1).shape[1], 1
            )
        )

    @property
    def weight(self) -> torch.Tensor:
        if self._weight is None:
            self._weight = self.dequantize()
        return self._weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def _load_from_state_dict(self, *args, **kwargs):
        self._weight = None
        return super()._load_from_state_dict(*args, **kwargs)

    def to_spec(self) -> dict:
        return {
            "type": "CodebookLinear",
            "in": self.in_features,
            "out": self.out_features,
            "bits": self.bits,
            "method": self.method,
            "bias": self.bias is not None,
            "codebook_shape": list(self.codebook.shape),
            "row_scale_shape": list(self.row_scale.shape),
        }

    @classmethod
    def from_spec(cls, s: dict) -> CodebookLinear:
        codes = torch.zeros(s["out"], s["in"], dtype=torch.int64)
        scale = torch.ones(s["row_scale_shape"]) if s["row_scale_shape"] else None
        return cls(
            torch.nn.Linear(s["in"], s["out"], bias=s["bias"]),
            codes,
            torch.zeros(s["codebook_shape"]),
            s["bits"],
            s["method"],
            scale,
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.method} {self.bits}-bit"


class CastLinear(torch.nn.Module):
    """A linear layer stored and computed in fp16/bf16; inputs and outputs keep the model's dtype."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        bias = linear.bias
        self.bias = torch.nn.Parameter(bias.detach().to(dtype), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    def to_spec(self) -> dict:
        return {
            "type": "CastLinear",
            "in": self.in_features,
            "out": self.out_features,
            "dtype": str(self.weight.dtype).removeprefix("torch."),
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, s: dict) -> CastLinear:
        return cls(torch.nn.Linear(s["in"], s["out"], bias=s["bias"]), getattr(torch, s["dtype"]))


class QuantEmbedding(torch.nn.Module):
    """An embedding whose table is the (tied) :class:`QuantLinear` output head named ``tied_to``: row ``v``
    is the head's dequantized row ``v``, times ``scale`` (Gemma's embeddings multiply the looked-up rows
    by sqrt(hidden); 1 elsewhere). It owns no tensors; :meth:`bind` attaches the head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tied_to: str, padding_idx: int | None = None, scale: float = 1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.tied_to = num_embeddings, embedding_dim, tied_to
        self.padding_idx = padding_idx
        self.scale = float(scale)
        self.__dict__["_head"] = None  # not a submodule: the head is saved once, where it lives

    def bind(self, head: QuantLinear) -> QuantEmbedding:
        if not isinstance(head, QuantLinear) or (head.out_features, head.in_features) != (
            self.num_embeddings,
            self.embedding_dim,
        ):
            raise ValueError(f"QuantEmbedding({self.num_embeddings}, {self.embedding_dim}) cannot read its rows from {head!r}")
        self.__dict__["_head"] = head
        return self

    @property
    def head(self) -> QuantLinear:
        if self._head is None:
            raise RuntimeError(f"QuantEmbedding tied to {self.tied_to!r} is not bound to its head")
        return self._head

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.head.weight, self.padding_idx)
        return rows if self.scale == 1.0 else rows * torch.tensor(self.scale, dtype=rows.dtype)

    def to_spec(self) -> dict:
        return {
            "type": "QuantEmbedding",
            "num": self.num_embeddings,
            "dim": self.embedding_dim,
            "tied_to": self.tied_to,
            "padding_idx": self.padding_idx,
            "scale": self.scale,
        }

    @classmethod
    def from_spec(cls, s: dict) -> QuantEmbedding:
        return cls(s["num"], s["dim"], s["tied_to"], s.get("padding_idx"), s.get("scale", 1.0))

    def extra_repr(self) -> str:
        scale = "" if self.scale == 1.0 else f" x {self.scale:g}"
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of {self.tied_to}{scale}"


@torch.no_grad()
def embedding_scale(emb: torch.nn.Embedding, name: str) -> float:
    """The constant ``c`` with ``emb(ids) == c * rows(ids)`` (1 for a plain embedding, sqrt(hidden) for
    Gemma's scaled one), checked numerically; an embedding that is not such a lookup is refused."""
    ids = torch.arange(min(emb.num_embeddings, 16), device=emb.weight.device)
    out, rows = emb(ids).double(), F.embedding(ids, emb.weight).double()
    denom = float(rows.pow(2).sum())
    c = float((out * rows).sum()) / denom if denom > 0 else 1.0
    if not torch.allclose(out, c * rows, rtol=1e-3, atol=1e-6):
        raise LeanmlError(
            f"the input embedding {name!r} ({type(emb).__name__}) is not a (scaled) row lookup, so it cannot "
            "read its rows from the quantized output head it is tied to; leave the head in float (head_bits: null)"
        )
    return 1.0 if abs(c - 1.0) < 1e-6 else c


def bind_embeddings(model: torch.nn.Module) -> None:
    """Attach every :class:`QuantEmbedding` of ``model`` to the head it names."""
    for module in model.modules():
        if isinstance(module, QuantEmbedding):
            module.bind(model.get_submodule(module.tied_to))


LAYER_TYPES = {c.__name__: c for c in (QuantLinear, Int8ActLinear, Int8ActConv2d, CodebookLinear, CastLinear, QuantEmbedding)}
