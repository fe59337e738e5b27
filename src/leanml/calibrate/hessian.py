"""Layer-input statistics for post-training quantization.

:class:`HessianAccumulator` gathers, over batches of a linear layer's inputs ``x`` of shape
``(..., in_features)``:

* ``H = (2 / n) * sum_i w_i x_i^T x_i`` - the Hessian of the layer's squared output error used by GPTQ
  (Frantar et al. 2022). The raw sum is kept and divided only when read, so the result equals the
  one-shot ``(2 / n) X^T X`` up to floating-point summation order.
* per-input-channel ``mean |x|`` (AWQ, Lin et al. 2023; Wanda) and ``max |x|`` (SmoothQuant, Xiao et al.
  2022).

Row weights: ``n`` is the sum of the ``token_weights`` (1 per row by default; 0 drops a row, e.g. a
padding token, from every statistic). In outlier-aware mode (``outlier_factor=k``), a row whose L2 norm
exceeds ``k`` times the median row norm of its batch (e.g. an "attention sink" token) has its Hessian
contribution scaled by ``(k * median / norm)**2``, i.e. it counts as the same direction clipped to norm
``k * median``. It still counts once in ``n``, and ``mean |x|``/``max |x|`` see the raw values.
"""

from __future__ import annotations

import torch

from leanml.errors import LeanmlError


def outlier_row_weights(norms: torch.Tensor, factor: float) -> torch.Tensor:
    """Weights ``min(1, (factor * median(norms) / norm)**2)`` per row (1 everywhere if the median is 0).

    The median is ``torch.median`` (the lower middle value for an even count).
    """
    med = norms.median()
    if med <= 0:
        return torch.ones_like(norms)
    limit = factor * med
    return torch.where(norms > limit, (limit / norms.clamp(min=torch.finfo(norms.dtype).tiny)) ** 2, 1.0)


class HessianAccumulator:
    """Running ``H = (2/n) sum w_i x_i^T x_i`` plus per-channel ``mean |x|`` and ``max |x|``."""

    def __init__(
        self,
        in_features: int | None = None,
        dtype: torch.dtype = torch.float64,
        outlier_factor: float | None = None,
    ):
        if dtype not in (torch.float32, torch.float64):
            raise LeanmlError(f"dtype {dtype} is not supported; use torch.float32 or torch.float64")
        if outlier_factor is not None and not outlier_factor > 1.0:
            raise LeanmlError(f"outlier_factor {outlier_factor!r} is out of range; use a value > 1 (e.g. 8)")
        self.in_features = in_features
        self.dtype = dtype
        self.outlier_factor = outlier_factor
        self.n = 0.0
        self.rows = 0
        self._xtx: torch.Tensor | None = None
        self._abs_sum: torch.Tensor | None = None
        self._abs_max: torch.Tensor | None = None
        self._taken = False  # the sum was scaled into the Hessian in place (take_hessian)

    def _init(self, features: int) -> None:
        if self.in_features is not None and features != self.in_features:
            raise LeanmlError(f"input has {features} features; this accumulator expects {self.in_features}")
        self.in_features = features
        self._xtx = torch.zeros(features, features, dtype=self.dtype)
        self._abs_sum = torch.zeros(features, dtype=self.dtype)
        self._abs_max = torch.zeros(features, dtype=self.dtype)

    def _row_weights(self, x: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
        if token_weights is None:
            return torch.ones(x.shape[0], dtype=self.dtype)
        w = token_weights.detach().to(self.dtype).reshape(-1)
        if w.numel() != x.shape[0]:
            raise LeanmlError(f"token_weights has {w.numel()} values; the input has {x.shape[0]} rows")
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise LeanmlError("token_weights must be finite and >= 0")
        return w

    def add(self, x: torch.Tensor, token_weights: torch.Tensor | None = None) -> None:
        """Accumulate a batch ``x`` of shape ``(..., in_features)``; ``token_weights`` has shape ``(...)``."""
        if x.dim() < 1 or x.shape[-1] == 0:
            raise LeanmlError(f"input of shape {tuple(x.shape)} has no feature axis")
        if self._taken:
            raise LeanmlError("this accumulator's Hessian was taken (take_hessian); it accepts no more rows")
        x = x.detach().reshape(-1, x.shape[-1]).to(self.dtype)
        if self._xtx is None:
            self._init(x.shape[1])
        elif x.shape[1] != self.in_features:
            raise LeanmlError(f"input has {x.shape[1]} features; this accumulator expects {self.in_features}")
        w = self._row_weights(x, token_weights)
        hw = w if self.outlier_factor is None else w * outlier_row_weights(x.norm(dim=1), self.outlier_factor)
        self._xtx += (x * hw[:, None]).T @ x
        self._abs_sum += (x.abs() * w[:, None]).sum(0)
        live = x[w > 0]
        if live.numel():
            self._abs_max = torch.maximum(self._abs_max, live.abs().amax(0))
        self.n += float(w.sum())
        self.rows += x.shape[0]

    def reduce_across_ranks(self) -> None:
        """Sum the statistics over the ranks of a ``torchrun`` job (max for ``max |x|``), so each rank
        holds those of every rank's rows; nothing outside a job. Every rank must have added rows."""
        from leanml.distributed import active, all_reduce_max, all_reduce_sum

        if not active():
            return
        self._check()
        all_reduce_sum(self._xtx)
        all_reduce_sum(self._abs_sum)
        all_reduce_max(self._abs_max)
        counts = all_reduce_sum(torch.tensor([self.n, float(self.rows)], dtype=torch.float64))
        self.n, self.rows = float(counts[0]), int(counts[1])

    def _check(self) -> None:
        if self._xtx is None or self.n <= 0:
            raise LeanmlError("no input rows were accumulated; call add(x) with calibration inputs first")

    @property
    def hessian(self) -> torch.Tensor:
        """``(2 / n) * sum_i w_i x_i^T x_i``, shape ``(in_features, in_features)``."""
        self._check()
        return self._xtx.clone() if self._taken else self._xtx * (2.0 / self.n)

    def take_hessian(self) -> torch.Tensor:
        """:attr:`hessian` without a copy (for a layer of 11008 inputs, 0.5 GB in fp32): the running sum
        is scaled in place and returned, and the accumulator takes no more rows."""
        self._check()
        if not self._taken:
            self._xtx.mul_(2.0 / self.n)
            self._taken = True
        return self._xtx

    @property
    def mean_abs(self) -> torch.Tensor:
        """Per-input-channel weighted mean of ``|x|``."""
        self._check()
        return self._abs_sum / self.n

    @property
    def max_abs(self) -> torch.Tensor:
        """Per-input-channel max of ``|x|`` over rows with a positive token weight."""
        self._check()
        return self._abs_max.clone()
