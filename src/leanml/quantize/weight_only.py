"""Weight-only quantization of a whole model, block by block (RTN, GPTQ, AWQ and AWQ+GPTQ).

:func:`quantize_weights` walks the model with :func:`leanml.calibrate.sequential.run_sequential`. In each
block the target linears are processed in "stages" of linears that read the same input (q/k/v, o,
gate/up, down in a decoder block), in forward order. For each stage:

1. the input Hessian ``H = 2/n XᵀX`` (optionally outlier-aware: huge-norm "attention sink" rows are
   clipped, see :class:`~leanml.calibrate.hessian.HessianAccumulator`) and ``mean |x|`` are gathered from
   the block's cached inputs - with ``true_sequential`` after the earlier stages of the block have been
   quantized, so each stage sees the inputs the quantized model produces;
2. AWQ methods search per-input-channel scales ``s = mean|x|^alpha`` (normalised) minimising the stage's
   output error ``tr(ΔW H ΔWᵀ)`` of round-to-nearest over ``alpha = 0, 1/n, ..., 1`` (``alpha = 0`` is
   ``s = 1``, so the scaling never makes the search objective worse) and fold them EXACTLY: ``W · s`` into
   every linear fed by the producer and ``1 / s`` into the producer - a norm's weight (and bias; Gemma's
   ``1 + w``), or the output rows (and bias) of the previous linear, which may be a row range of a fused
   projection. The producers come from the family adapter (:func:`leanml.models.arch.producers`: pre-norm
   -> q/k/v, pre-norm -> gate/up, up -> down in gated FFNs, value -> output projection with one scale
   per kv-head channel under grouped-query attention). A producer that is already quantized gets its row
   scales divided (codes unchanged, still exact). Stages without an exact producer (or models without an
   adapter) are not scaled;
3. each linear is quantized by RTN or GPTQ (``act_order``, dampening, MSE clipping) on the scaled weight
   with the scaled Hessian ``diag(1/s) H diag(1/s)``; ``refine_scales`` then refits each row's group
   scales by least squares on ``tr(ΔW H ΔWᵀ)`` for the chosen integer codes (kept only where it lowers
   that error);
4. the module's weight is replaced by the dequantized weight, so the returned
   :class:`~leanml.quantize.gptq.QuantizedWeight` codes dequantize exactly to what the module holds.

``rotate=True`` (decoders with RMS pre-norms only) first applies a QuaRot-style rotation of the residual
stream and per-head value rotations folded into the float weights (see :func:`rotate_residual`); outputs are
unchanged before quantization. It unties tied input/output embeddings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from leanml.calibrate.sequential import BlockContext, run_sequential
from leanml.distributed import active, all_gather_rows, all_local_threads, broadcast, even_split, world
from leanml.errors import LeanmlError
from leanml.quantize.awq import awq_scales
from leanml.quantize.gptq import (
    HessianFactor,
    QuantizedWeight,
    dequantize_groups,
    factor_hessian,
    gptq_quantize_weight,
    rtn_quantize_weight,
)
from leanml.quantize.primitives import CODE_DTYPE, check_bits, qrange

METHODS = ("rtn", "gptq", "awq", "awq+gptq")


@dataclass(frozen=True)
class WeightQuantSpec:
    """How to quantize the weights (see the module docstring).

    ``group_size=None`` is one range per output channel. ``static_groups`` (only with ``act_order``)
    keeps contiguous groups with qparams computed up front; the default lets GPTQ form the groups in
    processing order (``g_idx`` then is not monotonic). ``outlier_factor`` (e.g. 8) clips the Hessian
    weight of rows whose norm exceeds that multiple of the median; None is the plain Hessian.
    ``awq_grid`` is the number of alpha steps of the AWQ search; ``max_windows`` limits the calibration
    windows used (None: all).
    """

    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False
    method: str = "gptq"
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    mse_clip: bool = False
    outlier_factor: float | None = None
    awq_grid: int = 20
    refine_scales: bool = False
    true_sequential: bool = True
    rotate: bool = False
    rotation_seed: int = 0
    max_windows: int | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0):
            raise LeanmlError(f"group_size {gs!r} is not supported; use a positive integer or None (per channel)")
        if self.method not in METHODS:
            raise LeanmlError(f"method {self.method!r} is not supported; use one of {', '.join(METHODS)}")
        if not (isinstance(self.damp, (int, float)) and self.damp >= 0):
            raise LeanmlError(f"damp {self.damp!r} is out of range; use a fraction >= 0 of mean(diag H) (e.g. 0.01)")
        if self.outlier_factor is not None and not self.outlier_factor > 1:
            raise LeanmlError(f"outlier_factor {self.outlier_factor!r} is out of range; use a value > 1 (e.g. 8) or None")
        if isinstance(self.awq_grid, bool) or not isinstance(self.awq_grid, int) or self.awq_grid < 1:
            raise LeanmlError(f"awq_grid {self.awq_grid!r} is not a positive integer")
        mw = self.max_windows
        if mw is not None and (isinstance(mw, bool) or not isinstance(mw, int) or mw < 1):
            raise LeanmlError(f"max_windows {mw!r} is not a positive integer or None")

    @property
    def uses_gptq(self) -> bool:
        return self.method in ("gptq", "awq+gptq")

    @property
    def uses_awq(self) -> bool:
        return self.method in ("awq", "awq+gptq")

    @property
    def needs_hessian(self) -> bool:
        return self.uses_gptq or self.uses_awq or self.refine_scales


# ----------------------------------------------------------------------------------------------------
# Single-weight quantization
# ----------------------------------------------------------------------------------------------------


def quantize_one(
    W: torch.Tensor, H: torch.Tensor | None, spec: WeightQuantSpec, factor: HessianFactor | None = None
) -> QuantizedWeight:
    """RTN or GPTQ of one weight per ``spec`` (``H`` is needed for GPTQ and ``refine_scales``; GPTQ uses
    ``factor``, H's :func:`~leanml.quantize.gptq.factor_hessian`, when given)."""
    if spec.uses_gptq:
        qw = gptq_quantize_weight(
            W,
            H,
            spec.bits,
            spec.group_size,
            spec.symmetric,
            act_order=spec.act_order,
            damp=spec.damp,
            static_groups=spec.static_groups if spec.act_order else None,
            mse_clip=spec.mse_clip,
            factor=factor,
        )
    else:
        qw = rtn_quantize_weight(W, spec.bits, spec.group_size, spec.symmetric, spec.mse_clip)
    if spec.refine_scales and H is not None:
        qw = refit_scales(qw, W, H)
    return qw


def _weighted_error(E: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row ``e H eᵀ``."""
    return ((E @ H) * E).sum(1)


def refit_scales(qw: QuantizedWeight, W: torch.Tensor, H: torch.Tensor) -> QuantizedWeight:
    """Least-squares group scales for fixed codes and zero points: per row, minimise
    ``(w - ŵ) H (w - ŵ)ᵀ`` with ``ŵ_j = s_{g(j)} (c_j - z_{g(j)})``. Rows where the refit is not better
    (or gives a non-positive scale) keep their scales."""
    H = H.detach().to(torch.float64)
    Wd = W.detach().to(torch.float64)
    g_idx = qw.g_idx
    ng = qw.scales.shape[1]
    C = qw.codes.to(torch.float64) - qw.zero_points.to(torch.float64)[:, g_idx]
    G = torch.nn.functional.one_hot(g_idx, ng).to(torch.float64)  # (cols, ng)
    rows = W.shape[0]
    M = torch.empty(rows, ng, ng, dtype=torch.float64)
    for h in range(ng):
        cols = (g_idx == h).nonzero().flatten()
        T = C[:, cols] @ H[cols, :]  # (rows, cols): contribution of group h to C H
        M[:, :, h] = (C * T) @ G
    b = (C * (Wd @ H)) @ G
    ridge = 1e-9 * M.diagonal(dim1=1, dim2=2).abs().mean(1).clamp(min=1e-30)
    M = M + ridge[:, None, None] * torch.eye(ng, dtype=torch.float64)
    s_new = torch.linalg.solve(M, b[..., None])[..., 0]
    old = qw.scales.to(torch.float64)
    dead = M.diagonal(dim1=1, dim2=2) <= ridge[:, None] * 2
    s_new = torch.where(dead, old, s_new)
    err_old = _weighted_error(Wd - C * old[:, g_idx], H)
    err_new = _weighted_error(Wd - C * s_new[:, g_idx], H)
    ok = (err_new < err_old) & (s_new > 0).all(1) & torch.isfinite(s_new).all(1)
    scales = torch.where(ok[:, None], s_new, old).to(qw.scales.dtype)
    weight = dequantize_groups(qw.codes, scales, qw.zero_points, g_idx).to(qw.weight.dtype)
    return dataclasses.replace(qw, weight=weight, scales=scales)


def rescale_rows(qw: QuantizedWeight, r: torch.Tensor) -> QuantizedWeight:
    """The record of ``diag(r) · weight``: every row's scales multiplied by ``r`` (codes unchanged)."""
    scales = qw.scales * r.to(qw.scales.dtype)[:, None]
    weight = dequantize_groups(qw.codes, scales, qw.zero_points, qw.g_idx).to(qw.weight.dtype)
    return dataclasses.replace(qw, weight=weight, scales=scales)


# ----------------------------------------------------------------------------------------------------
# Producers of a stage's input (where AWQ scales can be folded exactly)
# ----------------------------------------------------------------------------------------------------


@dataclass
class Producer:
    """What outputs a stage's input ``X`` (resolved from :func:`leanml.models.arch.producers`): a norm
    (``kind="norm"``: weight, optional bias; ``offset`` 1 for Gemma's ``(1 + w)`` norms) or the output
    rows ``rows`` of a linear (all rows when None) that are X's channels (``"rows"``; ``"heads"`` with
    kv-head sharing: ``rep`` query heads of ``head_dim`` channels read each kv channel). ``consumers``
    are all linears that read X."""

    name: str
    module: nn.Module
    kind: str
    consumers: list[str]
    rep: int = 1
    head_dim: int = 1
    rows: tuple[int, int] | None = None
    offset: float = 0.0

    def expand(self, s_src: torch.Tensor) -> torch.Tensor:
        """Consumer-side scales from producer-side channel scales."""
        if self.kind != "heads" or self.rep == 1:
            return s_src
        n_kv = s_src.numel() // self.head_dim
        return s_src.view(n_kv, 1, self.head_dim).expand(n_kv, self.rep, self.head_dim).reshape(-1)

    def reduce(self, m: torch.Tensor) -> torch.Tensor:
        """Producer-side statistic from a consumer-side one (mean over the query heads of a kv head)."""
        if self.kind != "heads" or self.rep == 1:
            return m
        return m.view(-1, self.rep, self.head_dim).mean(1).reshape(-1)

    def row_factors(self, s_src: torch.Tensor) -> torch.Tensor:
        """Per output row of the producer linear: ``1 / s`` on its rows, 1 elsewhere."""
        r = torch.ones(self.module.weight.shape[0], dtype=torch.float64, device=s_src.device)
        a, b = self.rows or (0, r.numel())
        r[a:b] = 1.0 / s_src.double()
        return r


def _norm_scales_exactly(norm: nn.Module, offset: float = 0.0) -> bool:
    """Whether setting the norm's ``offset + weight`` (and bias) to themselves divided by s divides its
    output by s (checked numerically)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    bias = getattr(norm, "bias", None)
    n = weight.numel()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, n, generator=gen).to(weight.device, weight.dtype)
    s = torch.rand(n, generator=gen).add(0.5).to(weight.device, weight.dtype)
    with torch.no_grad():
        ref = norm(x)
        w0, b0 = weight.detach().clone(), None if bias is None else bias.detach().clone()
        _fold_norm(norm, s, offset)
        out = norm(x)
        weight.copy_(w0)
        if b0 is not None:
            bias.copy_(b0)
    return bool(torch.allclose(out * s, ref, rtol=1e-4, atol=1e-5))


def _fold_norm(norm: nn.Module, s: torch.Tensor, offset: float) -> None:
    w = norm.weight
    if offset:  # Gemma's (1 + w): the gain 1 + w is what is divided
        w.copy_((w.double() + offset).div(s.double()).sub(offset).to(w.dtype))
    else:
        w.div_(s.to(w.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))


def find_producer(modules: dict[str, nn.Module], found, prefix: str, stage: Sequence[str]) -> Producer | None:
    """The producer whose output feeds exactly ``stage`` (full names) and can absorb ``1/s``, or None
    (no adapter, or a stage without an exact producer)."""
    from leanml.models.arch import producers

    block = None if found is None else next((b for b in found.blocks if b.name == prefix), None)
    if block is None:
        return None
    for spec in producers(found, block):
        if not set(stage) <= set(spec.consumers):
            continue
        pmod = modules[spec.producer]
        cmods = [modules[c] for c in spec.consumers]
        if any(not isinstance(c, nn.Linear) for c in cmods):
            continue
        if spec.kind == "norm":
            if _norm_scales_exactly(pmod, spec.offset):
                return Producer(spec.producer, pmod, "norm", list(spec.consumers), offset=spec.offset)
            continue
        if not isinstance(pmod, nn.Linear):
            continue
        a, b = spec.rows or (0, pmod.out_features)
        width = cmods[0].in_features
        if b - a == width:
            return Producer(spec.producer, pmod, "rows", list(spec.consumers), rows=spec.rows)
        if spec.kind == "heads" and width % (b - a) == 0 and (b - a) % spec.head_dim == 0:
            return Producer(spec.producer, pmod, "heads", list(spec.consumers), width // (b - a), spec.head_dim, spec.rows)
    return None


@torch.no_grad()
def fold_scales(
    model_modules: dict[str, nn.Module], producer: Producer, s_src: torch.Tensor, records: dict[str, QuantizedWeight]
) -> torch.Tensor:
    """Fold ``1/s`` into the producer and ``s`` into every consumer; returns the consumer-side ``s``.

    A producer already quantized (in ``records``) gets its row scales divided by ``s``, and its module
    weight becomes the new dequantized weight.
    """
    s_cons = producer.expand(s_src)
    pmod = producer.module
    if producer.kind == "norm":
        _fold_norm(pmod, s_src, producer.offset)
    else:
        a, b = producer.rows or (0, pmod.weight.shape[0])
        if producer.name in records:
            records[producer.name] = set_weight(pmod, rescale_rows(records[producer.name], producer.row_factors(s_src)))
        else:
            pmod.weight[a:b].div_(s_src.to(pmod.weight.dtype)[:, None])
        if pmod.bias is not None:
            pmod.bias[a:b].div_(s_src.to(pmod.bias.dtype))
    for name in producer.consumers:
        lin = model_modules[name]
        if name in records:  # cannot happen in forward order; keep the record exact anyway
            raise LeanmlError(f"consumer {name!r} was quantized before its input scales were chosen")
        lin.weight.mul_(s_cons.to(lin.weight.dtype)[None, :])
    return s_cons


def awq_search(
    W: torch.Tensor,
    H: torch.Tensor,
    m: torch.Tensor,
    producer: Producer,
    spec: WeightQuantSpec,
    quantize_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Producer-side scales ``awq_scales(reduce(mean|x|), alpha)`` with the alpha of the grid minimising
    ``tr(ΔW H ΔWᵀ)``, ``ΔW = W - Q(W · s) / s`` (``W``: the stage's weights stacked by rows)."""
    Wd, Hd = W.double(), H.double()
    m_src = producer.reduce(m.double())
    best, best_s = math.inf, torch.ones_like(m_src)
    for i in range(spec.awq_grid + 1):
        alpha = i / spec.awq_grid
        s_src = awq_scales(m_src, alpha)
        s = producer.expand(s_src)
        dW = Wd - quantize_fn((Wd * s).to(W.dtype)).double() / s
        loss = float(_weighted_error(dW, Hd).sum())
        if loss < best:
            best, best_s = loss, s_src
    return best_s


# ----------------------------------------------------------------------------------------------------
# Rotations (QuaRot / SpinQuant style, folded into the float weights)
# ----------------------------------------------------------------------------------------------------


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, math.isqrt(n) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    residues = {(k * k) % q for k in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m by Paley's constructions (I: m-1 prime = 3 mod 4; II: m/2-1 prime =
    1 mod 4), or None."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        Q = _jacobsthal(q)
        S = torch.zeros(m, m, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, Q
        return torch.eye(m, dtype=torch.float64) + S
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        B = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)
    return None


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """An n x n Hadamard matrix (entries ±1, ``H Hᵀ = n I``) as ``Paley(m) ⊗ Sylvester(2^k)``, or None."""
    k = 0
    while n % (2 ** (k + 1)) == 0:
        k += 1
    H2 = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(k):
        H2 = torch.cat([torch.cat([H2, H2], 1), torch.cat([H2, -H2], 1)])
    for j in range(k, -1, -1):
        m = n // 2**j
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if base is not None:
            H = torch.kron(base, H2[: 2**j, : 2**j])
            if torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64)):
                return H
    return None


def random_rotation(n: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal ``n x n`` matrix (float64): a Hadamard matrix with random column signs when
    one can be built for n (incoherent: every entry is ±1/sqrt(n)), else the Q of a Gaussian's QR."""
    gen = torch.Generator().manual_seed(seed)
    H = hadamard_matrix(n)
    if H is not None:
        signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
        return H * signs[None, :] / math.sqrt(n)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))[None, :]


def _rmsnorm_is_rotation_invariant(norm: nn.Module, n: int, offset: float) -> bool:
    import copy

    probe = copy.deepcopy(norm).float()
    with torch.no_grad():
        probe.weight.fill_(1.0 - offset)
        if getattr(probe, "bias", None) is not None:
            return False
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(4, n, generator=gen) * 3
        Q = random_rotation(n, 1).float()
        return bool(torch.allclose(probe(x @ Q), probe(x) @ Q, rtol=1e-4, atol=1e-4))


@torch.no_grad()
def rotate_residual(model: nn.Module, seed: int = 0) -> None:
    """Fold an orthogonal rotation ``R1`` of the residual stream and one ``R2`` per attention head
    (value rows / output-projection columns) into a decoder whose family supports it (RMS pre-norms
    only: :attr:`leanml.models.arch.Arch.rotate`); float outputs are unchanged.

    Norm weights are first folded into the linears they feed (norm weights become the identity); then
    ``E <- E R1`` for the embedding, ``W <- W R1`` for every linear reading the residual stream (q/k/v,
    gate/up, the head) and ``W <- R1ᵀ W`` (and ``b <- b R1``) for every linear writing it (o, down). Tied
    input/output embeddings are UNTIED (the head gets its own weight; ``config.tie_word_embeddings``
    is set to False).
    """
    from leanml.models.arch import require

    found = require(model, "rotate=True", kind="decoder", feature="rotate")
    get = model.get_submodule
    head, emb_mod, final = (get(n) if n else None for n in (found.head, found.embed, found.final_norm))
    if not isinstance(head, nn.Linear) or not isinstance(emb_mod, nn.Embedding) or final is None:
        raise LeanmlError(f"rotate=True needs an nn.Embedding, a final norm and a linear head; {type(model).__name__} lacks one")
    offset = 1.0 if found.arch.norm == "rms+1" else 0.0
    hidden = found.hidden
    norms = [final] + [get(n) for b in found.blocks for n in (b.attn_norm, b.mlp_norm)]
    if not all(_rmsnorm_is_rotation_invariant(nm, hidden, offset) for nm in norms):
        raise LeanmlError("rotate=True needs RMSNorms without bias (weight * x / rms(x)); this model's norms are not")
    R1 = random_rotation(hidden, seed)
    emb = emb_mod.weight
    if head.weight is emb or head.weight.data_ptr() == emb.data_ptr():
        head.weight = nn.Parameter(emb.detach().clone())
        if getattr(model, "config", None) is not None:
            model.config.tie_word_embeddings = False

    def gain(norm: nn.Module) -> torch.Tensor:
        return norm.weight.double() + offset

    def read(lin: nn.Linear, norm_gain: torch.Tensor) -> None:
        W = lin.weight.double() * norm_gain[None, :]
        lin.weight.copy_(W @ R1)

    def write(lin: nn.Linear) -> None:
        lin.weight.copy_(R1.T @ lin.weight.double())
        if lin.bias is not None:
            lin.bias.copy_(lin.bias.double() @ R1)

    emb.copy_(emb.double() @ R1)
    read(head, gain(final))
    final.weight.fill_(1.0 - offset)
    hd = found.head_dim
    R2 = random_rotation(hd, seed + 1)
    for b in found.blocks:
        attn_norm, mlp_norm = get(b.attn_norm), get(b.mlp_norm)
        for n in b.qkv_layers:
            read(get(n), gain(attn_norm))
        for n in b.ffn_in_layers:
            read(get(n), gain(mlp_norm))
        attn_norm.weight.fill_(1.0 - offset)
        mlp_norm.weight.fill_(1.0 - offset)
        o = get(b.o)
        write(o)
        write(get(b.down))
        v_name, rows = found.part(b, "v")
        v = get(v_name)
        a, z = rows or (0, v.out_features)
        n_kv, n_q = (z - a) // hd, o.in_features // hd
        Wv = v.weight[a:z].double().view(n_kv, hd, -1)
        v.weight[a:z] = torch.einsum("dk,hdi->hki", R2, Wv).reshape(z - a, -1).to(v.weight.dtype)
        if v.bias is not None:
            v.bias[a:z] = (v.bias[a:z].double().view(n_kv, hd) @ R2).reshape(-1).to(v.bias.dtype)
        Wo = o.weight.double().view(-1, n_q, hd)
        o.weight.copy_((Wo @ R2).reshape(o.weight.shape))


# ----------------------------------------------------------------------------------------------------
# The whole-model pass
# ----------------------------------------------------------------------------------------------------


def _check_targets(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Linear]:
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets:
        raise LeanmlError("targets must be a non-empty list of nn.Linear names")
    modules = dict(model.named_modules())
    out = {}
    for name in targets:
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            what = "not a module of the model" if mod is None else f"a {type(mod).__name__}, not an nn.Linear"
            raise LeanmlError(f"target {name!r} is {what}; pass full names of nn.Linear layers")
        out[name] = mod
    return out


@torch.no_grad()
def _process_stage(
    ctx: BlockContext,
    stage: list[str],
    accs: dict,
    spec: WeightQuantSpec,
    modules: dict[str, nn.Module],
    records: dict[str, QuantizedWeight],
    found=None,
) -> None:
    acc = accs[stage[0]] if accs else None
    H = None if acc is None else acc.take_hessian()  # float32 (GPTQ's factor converts); no copy
    if H is not None and (spec.uses_awq or spec.refine_scales):
        H = H.to(torch.float64)
    if spec.uses_awq and H is not None:
        producer = find_producer(modules, found, ctx.prefix, stage)
        if producer is not None:
            W = torch.cat([ctx.linears[n].weight.detach() for n in stage])
            cfg = dataclasses.replace(spec, method="rtn", refine_scales=False, mse_clip=False)  # plain RTN: fast search
            s_src = awq_search(W, H, acc.mean_abs, producer, spec, lambda w: quantize_one(w, None, cfg).weight)
            s = fold_scales(modules, producer, s_src, records)
            H = H / s.double()[:, None] / s.double()[None, :]
    factor = None
    if spec.uses_gptq and H is not None:  # one factorization for every linear of the stage (they share H)
        factor = shared_factor(H, spec, torch.promote_types(ctx.linears[stage[0]].weight.dtype, torch.float32))
    for name in stage:
        lin = ctx.linears[name]
        records[name] = set_weight(lin, quantize_rows(lin.weight.detach(), H, spec, factor))


def set_weight(lin: nn.Module, qw: QuantizedWeight) -> QuantizedWeight:
    """Put ``qw``'s dequantized weight into ``lin`` and return the record sharing ``lin``'s tensor: the
    same values, kept once instead of twice for every quantized layer."""
    with torch.no_grad():
        lin.weight.copy_(qw.weight)
    return dataclasses.replace(qw, weight=lin.weight.detach())


def shared_factor(H: torch.Tensor, spec: WeightQuantSpec, dtype: torch.dtype) -> HessianFactor:
    """H's GPTQ factor (:func:`~leanml.quantize.gptq.factor_hessian`). In a ``torchrun`` job rank 0
    computes it with the threads of every local rank while the others wait, and sends it to them."""
    if not active():
        return factor_hessian(H, spec.act_order, spec.damp, dtype)
    cols = H.shape[0]
    if world()[0] == 0:
        with all_local_threads():
            f = factor_hessian(H, spec.act_order, spec.damp, dtype)
        U, perm, dead = f.U.contiguous(), f.perm.contiguous(), f.dead.to(torch.uint8)
    else:
        U = torch.empty(cols, cols, dtype=dtype)
        perm, dead = torch.empty(cols, dtype=torch.long), torch.empty(cols, dtype=torch.uint8)
    for t in (U, perm, dead):
        broadcast(t, 0)
    return HessianFactor(U, perm, dead.bool(), bool(spec.act_order), float(spec.damp))


def quantize_rows(
    W: torch.Tensor, H: torch.Tensor | None, spec: WeightQuantSpec, factor: HessianFactor | None = None
) -> QuantizedWeight:
    """:func:`quantize_one`; in a ``torchrun`` job each rank quantizes its share of the output rows (RTN,
    GPTQ given the shared factor, and the scale refit treat rows independently) and the ranks exchange
    their integer codes, scales and zero points, so every rank holds the whole result."""
    rows = W.shape[0]
    if not active() or rows < world()[1]:
        return quantize_one(W, H, spec, factor)
    a, b = even_split(rows)[world()[0]]
    part = quantize_one(W[a:b], H, spec, factor)
    qmin = qrange(part.bits, part.symmetric)[0]
    codes = all_gather_rows((part.codes - qmin).to(torch.uint8), rows).to(CODE_DTYPE) + qmin  # bits <= 8
    scales, zeros = all_gather_rows(part.scales, rows), all_gather_rows(part.zero_points, rows)
    weight = dequantize_groups(codes, scales, zeros, part.g_idx).to(W.dtype)  # the documented identity
    return dataclasses.replace(part, weight=weight, codes=codes, scales=scales, zero_points=zeros)


def quantize_weights(
    model: nn.Module,
    calib_windows: Sequence,
    spec: WeightQuantSpec,
    targets: Sequence[str],
    *,
    before_block: Callable[[int, str, nn.Module], None] | None = None,
    after_block: Callable[[int, str, nn.Module, dict[str, QuantizedWeight]], None] | None = None,
    status: Callable[[], str] | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize the ``targets`` (full ``nn.Linear`` names) of ``model`` in place, block by block, on
    ``calib_windows`` (see the module docstring); returns the QuantizedWeight of every target.

    ``before_block(i, prefix, block)`` and ``after_block(i, prefix, block, records)`` bracket each block of
    the stack (see :func:`~leanml.calibrate.sequential.run_sequential`); ``after_block`` receives the
    block's QuantizedWeights, which are then handed over: they are left out of the result (a model
    compressed layer by layer writes them and keeps none). They need a Hessian method (GPTQ/AWQ).
    In a ``torchrun`` job every rank ends with the same weights (each computes a share of every layer's rows)."""
    if not isinstance(spec, WeightQuantSpec):
        raise LeanmlError(f"spec must be a WeightQuantSpec, got {type(spec).__name__}")
    _check_targets(model, targets)
    windows = list(calib_windows)[: spec.max_windows] if spec.max_windows else list(calib_windows)
    if not windows:
        raise LeanmlError("no calibration windows given; pass at least one")
    if spec.rotate:
        rotate_residual(model, seed=spec.rotation_seed)
    from leanml.models.arch import resolve

    found = resolve(model)
    modules = dict(model.named_modules())
    records: dict[str, QuantizedWeight] = {}

    def process(ctx: BlockContext) -> None:
        if not spec.needs_hessian:
            for stage in ctx.stages:
                _process_stage(ctx, stage, {}, spec, modules, records, found)
            return
        accs = {} if spec.true_sequential else ctx.collect(ctx.targets, early_stop=False)
        for stage in ctx.stages:
            stage_accs = ctx.collect(stage) if spec.true_sequential else accs
            _process_stage(ctx, stage, stage_accs, spec, modules, records, found)

    def done(i: int, prefix: str, block: nn.Module) -> None:
        mine = {n: records.pop(n) for n in list(records) if n.startswith(prefix + ".")}
        after_block(i, prefix, block, mine)

    if spec.needs_hessian:
        run_sequential(
            model,
            windows,
            list(targets),
            process,
            outlier_factor=spec.outlier_factor,
            label="quantize",
            before_block=before_block,
            after_block=done if after_block is not None else None,
            status=status,
        )
        if after_block is not None:
            return dict(records)
    elif before_block is not None or after_block is not None:
        raise LeanmlError("block hooks need a calibrated method (gptq, awq, awq+gptq); RTN runs layer by layer without them")
    else:
        for name in targets:
            lin = modules[name]
            records[name] = set_weight(lin, quantize_one(lin.weight.detach(), None, spec))
    return {name: records[name] for name in targets}
