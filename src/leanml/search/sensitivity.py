"""Per-layer sensitivity, computed once per search: how much the model's output moves when only that
layer's weights are rounded to a low width (4 bits for causal LMs, 8 otherwise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..calibrate.batches import calibration_batches
from ..models.handle import ModelHandle, output_tensor
from ..progress import progress
from ..quantize.gptq import rtn_quantize_weight
from ..targeting import get_module, select_layers


def _distance(task: str, out: torch.Tensor, ref: torch.Tensor) -> float:
    if task == "causal-lm":  # mean KL(reference ‖ perturbed) per token
        p, q = ref.float().log_softmax(-1), out.float().log_softmax(-1)
        return float(F.kl_div(q, p, log_target=True, reduction="sum")) / (p.numel() / p.shape[-1])
    a, b = out.float().flatten(1), ref.float().flatten(1)  # 1 - cosine per item
    return float(1 - F.cosine_similarity(a, b, dim=-1).mean())


@torch.no_grad()
def layer_sensitivity(
    handle: ModelHandle, data, bits: int | None = None, batches: int = 2, group_size: int = 64
) -> dict[str, float]:
    """``{layer: output distance}`` with only that Linear/Conv layer rounded to ``bits`` (round to nearest),
    most sensitive first."""
    bits = bits or (4 if handle.task == "causal-lm" else 8)
    model = handle.module
    names = select_layers(model, (torch.nn.Linear, torch.nn.Conv2d), [], None, handle.task)
    inputs = calibration_batches(handle, data, batches, window=256)
    refs = [output_tensor(handle.call(b)) for b in inputs]
    out: dict[str, float] = {}
    for name in progress(names, "layer sensitivity"):
        layer = get_module(model, name)
        original = layer.weight.data.clone()
        flat = original.reshape(original.shape[0], -1)
        gs = group_size if bits < 8 and flat.shape[1] % group_size == 0 else None
        layer.weight.data = rtn_quantize_weight(flat, bits, gs, False).weight.to(original.dtype).reshape(original.shape)
        try:
            out[name] = sum(_distance(handle.task, output_tensor(handle.call(b)), r) for b, r in zip(inputs, refs, strict=True))
            out[name] /= len(inputs)
        finally:
            layer.weight.data = original
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
