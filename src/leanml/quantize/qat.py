"""Quantization-aware training: fine-tune with fake-quantized weights, then store real integers.

Each targeted linear layer computes with ``W + (Q(W) - W).detach()``: the forward pass sees the
quantized weight and the gradient reaches ``W`` unchanged (the straight-through estimator; with
min/max group ranges no weight is clipped, so the STE's pass-through region is every weight).
The loss is the KL divergence to the original model's outputs (``distill``) or the task loss.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..models.handle import output_tensor
from ..progress import progress
from ..targeting import get_module, set_module
from .gptq import rtn_quantize_weight


class FakeQuantLinear(torch.nn.Module):
    """A float linear layer that computes with its RTN-quantized weight (straight-through gradient)."""

    def __init__(self, linear: torch.nn.Linear, bits: int, group_size: int | None, symmetric: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().clone())
        self.bias = torch.nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def quantized(self):
        return rtn_quantize_weight(self.weight.detach(), self.bits, self.group_size, self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_q = self.quantized().weight.to(self.weight.dtype)
        return F.linear(x, self.weight + (w_q - self.weight).detach(), self.bias)


def qat_train(
    handle,
    names: list[str],
    batches: list,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    steps: int,
    lr: float,
    distill: bool = True,
    seed: int = 0,
) -> list[float]:
    """Replace ``names`` by :class:`FakeQuantLinear`, train ``steps`` steps, return the losses."""
    torch.manual_seed(seed)
    model = handle.module
    teacher = copy.deepcopy(model).eval() if distill else None
    for name in names:
        set_module(model, name, FakeQuantLinear(get_module(model, name), bits, group_size, symmetric))
    trainable = [get_module(model, n).weight for n in names]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in progress(range(steps), "QAT"):
        batch = batches[step % len(batches)]
        out = output_tensor(handle.call(batch)).float()
        if distill:
            with torch.no_grad():
                target = output_tensor(teacher(**batch) if isinstance(batch, dict) else teacher(*batch)).float()
            loss = F.kl_div(out.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean")
            if out.ndim == 3:
                loss = loss / out.shape[1]  # per token
        else:
            ids = batch["input_ids"]
            loss = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses
