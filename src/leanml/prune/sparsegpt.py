"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot"): prune a linear weight and update the surviving weights to compensate, column by column, with
the Optimal Brain Surgeon update under the layer's input Hessian ``H ∝ XᵀX``.

The Hessian machinery is GPTQ's (:func:`leanml.quantize.gptq.inverse_hessian_cholesky`): with ``U`` the
upper Cholesky factor of ``H⁻¹`` (dampened), zeroing column ``j`` after columns ``< j`` are fixed moves the
error ``(w_j - q_j) / U[j, j]`` onto the later columns along row ``j`` of ``U`` - the same step GPTQ takes
for a rounding error, here for a pruned weight (``q_j = 0``) or a kept one (``q_j = w_j``, no update).

* lazy block updates: columns are processed in blocks of ``block_size``; inside a block the updates are
  applied to the block only, and the accumulated errors reach the later columns in one matrix product
  (an exact reordering of the column-by-column updates);
* adaptive mask selection: the mask of a block is chosen when the block is reached, on the weights the
  earlier blocks' updates produced, by the OBS saliency ``w² / U[j, j]²``. Unstructured: the lowest
  saliencies of the whole block (all rows) are pruned, and every block removes its share so the layer
  removes exactly ``round(sparsity * numel)`` weights. N:M: in every group of ``m`` consecutive columns
  of every row, the ``n`` largest saliencies are kept, the group's mask chosen when its first column is
  reached (``block_size`` is rounded up to a multiple of ``m`` so a group never spans two blocks);
* dead inputs (``H[j, j] == 0``, the input is always 0) are zeroed in W and get ``H[j, j] = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanml.errors import LeanmlError
from leanml.prune.masks import check_nm, check_sparsity, n_removed
from leanml.quantize.gptq import inverse_hessian_cholesky


@dataclass(frozen=True)
class PrunedWeight:
    """A pruned weight: ``weight`` (dtype of the input, zeros where ``mask`` is False) and its keep-mask
    ``mask`` (bool, True = kept). ``loss`` is SparseGPT's estimate ``sum (w - q)² / (2 U[j, j]²)`` of the
    added output error (in units of the given H)."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float


def _check_inputs(W: torch.Tensor, H: torch.Tensor, block_size: int) -> None:
    if W.dim() != 2 or W.numel() == 0:
        raise LeanmlError(f"weight must be a non-empty 2-D (out, in) tensor, got shape {tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise LeanmlError("weight contains inf or nan; only finite weights can be pruned")
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise LeanmlError(f"Hessian shape {tuple(H.shape)} does not match the weight's {cols} input columns")
    if not bool(torch.isfinite(H).all()):
        raise LeanmlError("Hessian contains inf or nan; accumulate it from finite calibration inputs")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise LeanmlError(f"block_size {block_size!r} is not a positive integer")


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> PrunedWeight:
    """SparseGPT of a linear weight ``W (out, in)`` given its input Hessian ``H (in, in)`` (any positive
    multiple of ``XᵀX``, e.g. :class:`~leanml.calibrate.hessian.HessianAccumulator`'s ``2/n XᵀX``).

    Either ``sparsity`` (unstructured, a fraction in [0, 1)) or ``n`` and ``m`` (keep n of every m
    consecutive input columns) is given. ``damp`` is the fraction of ``mean(diag H)`` added to the
    diagonal. See the module docstring for the algorithm.
    """
    nm = n is not None or m is not None
    if nm == (sparsity is not None):
        raise LeanmlError("sparsegpt needs either sparsity (unstructured) or n and m (N:M), not both or neither")
    _check_inputs(W, H, block_size)
    if nm:
        n, m = check_nm(n, m)
        if W.shape[1] % m:
            raise LeanmlError(f"N:M pattern {n}:{m} needs an input width divisible by {m}, got {W.shape[1]}")
        block_size = -(-block_size // m) * m
    else:
        sparsity = check_sparsity(sparsity)
    rows, cols = W.shape
    work = torch.promote_types(W.dtype, torch.float32)
    Wf = W.detach().to(work).clone()
    H = H.detach().to(W.device, torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    Wf[:, dead] = 0.0
    U = inverse_hessian_cholesky(H, damp).to(work)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    loss = 0.0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = Wf[:, i1:i2], U[i1:i2, i1:i2]
        d1 = U1.diagonal()
        keep1 = keep[:, i1:i2]
        if not nm:
            k = n_removed(sparsity, rows * i2) - n_removed(sparsity, rows * i1)
            if k > 0:
                saliency = (W1 * W1 / (d1 * d1)[None, :]).reshape(-1)
                order = torch.sort(saliency, stable=True).indices
                flat = keep1.reshape(-1).clone()
                flat[order[:k]] = False
                keep1.copy_(flat.reshape(keep1.shape))
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if nm and i % m == 0:
                group = W1[:, i : i + m]
                saliency = group * group / (d1[i : i + m] * d1[i : i + m])[None, :]
                order = torch.sort(saliency, dim=1, descending=True, stable=True).indices
                g_keep = torch.zeros_like(group, dtype=torch.bool)
                g_keep.scatter_(1, order[:, :n], True)
                keep1[:, i : i + m] = g_keep
            w = W1[:, i]
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q  # exact zeros (the update leaves q up to rounding)
            E1[:, i] = err
        Wf[:, i2:] -= E1 @ U[i1:i2, i2:]
        loss = loss + (E1 * E1).sum() / 2
    Wf[~keep] = 0.0
    return PrunedWeight(Wf.to(W.dtype), keep, float(loss))


def layer_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - Ŵ) H (W - Ŵ)ᵀ)``: ``||WX - ŴX||²_F`` when ``H = XᵀX`` (X rows are tokens)."""
    D = W.detach().to(torch.float64) - W_hat.detach().to(torch.float64)
    return float(((D @ H.detach().to(D.device, torch.float64)) * D).sum())
