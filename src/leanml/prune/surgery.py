"""Module surgery for structured pruning: keep a subset of a layer's units by slicing its parameters.

Thin and in place: each function replaces a layer's parameters (and buffers) by the kept slices and
updates the size attributes (``out_features``, ``in_channels``, ``num_features``, ...), so the layer
object, its name and any hook on it stay. A unit owns ``chunk`` consecutive rows/columns (a head owns
``head_dim`` rows; a channel read after a flatten owns ``H*W`` input features).

Supported: ``nn.Linear`` (also :class:`~leanml.prune.modules.SparseLinear`, whose mask is sliced too),
``nn.Conv1d/2d/3d`` (dense, or depthwise for :func:`keep_channels`), ``nn.BatchNorm1d/2d/3d``. A layer of
any other type (for example an already quantized one) is refused with a one-line error: structured
pruning belongs before quantization.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from leanml.errors import LeanmlError

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def expand_index(idx: Sequence[int], chunk: int, device=None) -> torch.Tensor:
    """Row/column positions of units ``idx`` when each owns ``chunk`` consecutive positions."""
    base = torch.as_tensor(list(idx), dtype=torch.long, device=device)
    return (base[:, None] * chunk + torch.arange(chunk, device=device)[None, :]).reshape(-1)


def _replace(module: nn.Module, attr: str, data: torch.Tensor) -> None:
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(data.detach().contiguous().clone(), requires_grad=old.requires_grad))
    else:  # a buffer (running statistics, a sparse mask)
        setattr(module, attr, data.detach().contiguous().clone())


def check_resizable(module: nn.Module, name: str, types: tuple[type, ...]) -> None:
    """A one-line error unless ``module`` is one of ``types`` (the layers the surgery can resize)."""
    if not isinstance(module, types):
        raise LeanmlError(
            f"layer {name!r} is a {type(module).__name__}, which structured pruning cannot resize; "
            "apply structured pruning before quantization"
        )


def _slice(module: nn.Module, axis: int, positions: torch.Tensor, with_bias: bool) -> None:
    w = module.weight
    pos = positions.to(w.device)
    _replace(module, "weight", w.index_select(axis, pos))
    mask = getattr(module, "weight_mask", None)
    if isinstance(mask, torch.Tensor) and mask.shape == w.shape:
        _replace(module, "weight_mask", mask.index_select(axis, pos.to(mask.device)))
    if with_bias and getattr(module, "bias", None) is not None:
        _replace(module, "bias", module.bias.index_select(0, pos.to(module.bias.device)))


def keep_rows(module: nn.Module, idx: Sequence[int], chunk: int = 1, name: str = "") -> None:
    """Keep the output units ``idx`` of a Linear or dense Conv (weight rows and bias entries)."""
    keep_row_positions(module, expand_index(idx, chunk), name)


def keep_row_positions(module: nn.Module, positions: torch.Tensor, name: str = "") -> None:
    """Keep the output rows at ``positions`` (in that order) of a Linear or dense Conv."""
    check_resizable(module, name, (nn.Linear, *CONV))
    if isinstance(module, CONV) and module.groups != 1:
        raise LeanmlError(f"conv {name!r} has groups={module.groups}; only dense convs lose output filters this way")
    _slice(module, 0, positions, with_bias=True)
    if isinstance(module, nn.Linear):
        module.out_features = module.weight.shape[0]
    else:
        module.out_channels = module.weight.shape[0]


def keep_columns(module: nn.Module, idx: Sequence[int], chunk: int = 1, name: str = "") -> None:
    """Keep the input units ``idx`` of a Linear (weight columns) or dense Conv (input channels)."""
    check_resizable(module, name, (nn.Linear, *CONV))
    if isinstance(module, CONV) and module.groups != 1:
        raise LeanmlError(f"conv {name!r} has groups={module.groups}; only dense convs lose input channels this way")
    positions = expand_index(idx, chunk)
    _slice(module, 1, positions, with_bias=False)
    if isinstance(module, nn.Linear):
        module.in_features = module.weight.shape[1]
    else:
        module.in_channels = module.weight.shape[1]


def keep_channels(module: nn.Module, idx: Sequence[int], name: str = "") -> None:
    """Keep channels ``idx`` of a per-channel layer the channel passes through: BatchNorm (affine
    parameters and running statistics) or a depthwise conv (``groups == in == out``)."""
    check_resizable(module, name, (*BATCHNORM, *CONV))
    positions = expand_index(idx, 1)
    if isinstance(module, CONV):
        if not module.groups == module.in_channels == module.out_channels:
            raise LeanmlError(
                f"conv {name!r} is not depthwise (groups={module.groups}, in={module.in_channels}, "
                f"out={module.out_channels}); a channel cannot pass through it"
            )
        _slice(module, 0, positions, with_bias=True)
        module.in_channels = module.out_channels = module.groups = module.weight.shape[0]
        return
    for attr in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(module, attr, None)
        if value is not None:
            _replace(module, attr, value.index_select(0, positions.to(value.device)))
    module.num_features = len(idx)


def count_params(model: nn.Module) -> int:
    """Distinct parameters of ``model`` (a tied weight is one Parameter object, counted once)."""
    return sum(p.numel() for p in model.parameters())
