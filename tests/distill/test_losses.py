"""Distillation losses against hand computations (python loops) and torch.nn.functional compositions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from leanml.distill.losses import (
    FeatureProjection,
    attention_map_loss,
    feature_loss,
    hinton_kd,
    layer_map,
    rkd_angle,
    rkd_distance,
    token_kl,
)
from leanml.errors import LeanmlError

TOL = 1e-5  # float32 losses of tiny tensors vs float64 loops / functional compositions
ZERO = 1e-6  # student == teacher


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)) * scale


def _log_softmax_list(row: list[float]) -> list[float]:
    m = max(row)
    z = math.log(sum(math.exp(x - m) for x in row)) + m
    return [x - z for x in row]


def _kl_list(log_p: list[float], log_q: list[float]) -> float:
    return sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q, strict=True))


# --- hinton_kd ------------------------------------------------------------------------------------


def test_hinton_kd_matches_python_loop():
    s, t = _logits(2, 3, 5, seed=1), _logits(2, 3, 5, seed=2)
    labels = torch.tensor([[0, 4, -100], [2, -100, 1]])
    alpha, T = 0.3, 2.5
    ce, kl, n = 0.0, 0.0, 0
    for b, p in itertools.product(range(2), range(3)):
        y = int(labels[b, p])
        if y == -100:
            continue
        n += 1
        srow, trow = s[b, p].double().tolist(), t[b, p].double().tolist()
        ce -= _log_softmax_list(srow)[y]
        kl += _kl_list(_log_softmax_list([x / T for x in trow]), _log_softmax_list([x / T for x in srow]))
    expected = alpha * ce / n + (1 - alpha) * T * T * kl / n
    got = hinton_kd(s, t, labels, alpha=alpha, temperature=T)
    assert got.dim() == 0
    assert abs(got.item() - expected) < TOL


def test_hinton_kd_matches_functional_composition():
    s, t = _logits(6, 7, seed=3), _logits(6, 7, seed=4)
    labels = torch.randint(0, 7, (6,), generator=_gen(5))
    alpha, T = 0.6, 4.0
    soft = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T * T
    expected = alpha * F.cross_entropy(s, labels) + (1 - alpha) * soft
    assert torch.allclose(hinton_kd(s, t, labels, alpha=alpha, temperature=T), expected, atol=TOL)
    # labels=None: only the T²·KL term, alpha ignored
    assert torch.allclose(hinton_kd(s, t, alpha=0.9, temperature=T), soft, atol=TOL)
    # any float dtype, computed in float32
    assert torch.allclose(hinton_kd(s.double(), t.half(), labels, alpha=alpha, temperature=T), expected, atol=2e-2)


def test_hinton_kd_excludes_ignored_positions():
    s, t = _logits(4, 6, seed=6), _logits(4, 6, seed=7)
    labels = torch.tensor([1, -1, 3, -1])
    kept = torch.tensor([0, 2])
    got = hinton_kd(s, t, labels, alpha=0.5, temperature=2.0, ignore_index=-1)
    expected = hinton_kd(s[kept], t[kept], labels[kept], alpha=0.5, temperature=2.0)
    assert torch.allclose(got, expected, atol=TOL)
    # changing the teacher at an ignored position changes nothing
    t2 = t.clone()
    t2[1] = 100.0 * torch.arange(6.0)
    assert torch.allclose(hinton_kd(s, t2, labels, temperature=2.0, ignore_index=-1), got, atol=TOL)
    # every position ignored: 0, not nan
    none = hinton_kd(s, t, torch.full((4,), -1), ignore_index=-1)
    assert none.item() == 0.0


def test_t_squared_keeps_soft_gradient_scale():
    t = _logits(8, 10, seed=8, scale=0.5)
    t = t - t.mean(-1, keepdim=True)
    s0 = _logits(8, 10, seed=9, scale=0.5)
    s0 = s0 - s0.mean(-1, keepdim=True)

    def grad_norm(T: float, scaled: bool) -> float:
        s = s0.clone().requires_grad_(True)
        loss = hinton_kd(s, t, temperature=T)
        (loss if scaled else loss / (T * T)).backward()
        return s.grad.norm().item()

    ratio = grad_norm(4.0, True) / grad_norm(8.0, True)
    assert 0.8 < ratio < 1.25  # roughly independent of T
    unscaled = grad_norm(4.0, False) / grad_norm(8.0, False)
    assert 3.2 < unscaled < 5.0  # ~ (8/4)² = 4 without the T² factor


# --- token_kl -------------------------------------------------------------------------------------


def test_token_kl_forward_and_reverse_match_formulas():
    s, t = _logits(2, 3, 8, seed=10), _logits(2, 3, 8, seed=11)
    T = 2.0
    log_s, log_t = F.log_softmax(s.double() / T, -1), F.log_softmax(t.double() / T, -1)
    forward = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * T * T
    reverse = (log_s.exp() * (log_s - log_t)).sum(-1).mean() * T * T
    assert abs(token_kl(s, t, temperature=T).item() - forward.item()) < TOL
    assert abs(token_kl(s, t, direction="reverse", temperature=T).item() - reverse.item()) < TOL
    assert abs(forward.item() - reverse.item()) > 1e-3  # the two directions really differ here


def test_token_kl_top_k_full_vocab_equals_full_and_cached_equals_top_k():
    s, t = _logits(2, 4, 12, seed=12), _logits(2, 4, 12, seed=13)
    for direction in ("forward", "reverse"):
        full = token_kl(s, t, direction=direction, temperature=1.5)
        assert torch.allclose(token_kl(s, t, direction=direction, temperature=1.5, top_k=12), full, atol=TOL)
        top = token_kl(s, t, direction=direction, top_k=3)
        values, indices = t.topk(3, dim=-1)
        assert torch.allclose(token_kl(s, (values, indices), direction=direction), top, atol=TOL)
    # top_k by hand at one position: renormalise both over the teacher's top-3 indices
    idx = t[0, 0].topk(3).indices
    ls, lt = F.log_softmax(s[0, 0, idx], -1), F.log_softmax(t[0, 0, idx], -1)
    one = token_kl(s[:1, :1], t[:1, :1], top_k=3)
    assert abs(one.item() - (lt.exp() * (lt - ls)).sum().item()) < TOL


def test_token_kl_mask_excludes_positions():
    s, t = _logits(2, 5, 6, seed=14), _logits(2, 5, 6, seed=15)
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0]])
    got = token_kl(s, t, mask=mask)
    keep = mask.bool()
    assert torch.allclose(got, token_kl(s[keep], t[keep]), atol=TOL)
    assert torch.allclose(token_kl(s, t, mask=keep), got, atol=TOL)
    t2 = t.clone()
    t2[0, 2] += 50.0 * torch.arange(6.0)
    assert torch.allclose(token_kl(s, t2, mask=mask), got, atol=TOL)


def test_token_kl_supports_autograd():
    s = _logits(3, 5, seed=16).requires_grad_(True)
    token_kl(s, _logits(3, 5, seed=17), direction="reverse", top_k=2).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


# --- student == teacher -> 0 ----------------------------------------------------------------------


def test_identical_student_and_teacher_give_zero():
    x = _logits(2, 3, 9, seed=18)
    labels = torch.zeros(2, 3, dtype=torch.long)
    assert abs(hinton_kd(x, x.clone()).item()) < ZERO
    assert abs(hinton_kd(x, x.clone(), labels, alpha=0.0).item()) < ZERO
    for direction in ("forward", "reverse"):
        assert abs(token_kl(x, x.clone(), direction=direction).item()) < ZERO
        assert abs(token_kl(x, x.clone(), direction=direction, top_k=4).item()) < ZERO
    h = _logits(2, 3, 16, seed=19)
    for kind in ("mse", "cosine"):
        assert abs(feature_loss(h, h.clone(), kind=kind).item()) < ZERO
    e = _logits(5, 7, seed=20)
    assert abs(rkd_distance(e, e.clone()).item()) < ZERO
    assert abs(rkd_angle(e, e.clone()).item()) < ZERO
    a = torch.softmax(_logits(2, 4, 3, 5, seed=21), -1)
    assert abs(attention_map_loss(a, a.clone()).item()) < ZERO


# --- feature_loss / FeatureProjection / layer_map -------------------------------------------------


def test_feature_loss_matches_functional():
    s, t = _logits(2, 4, 8, seed=22), _logits(2, 4, 8, seed=23)
    assert torch.allclose(feature_loss(s, t), F.mse_loss(s, t), atol=TOL)
    cos = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    assert torch.allclose(feature_loss(s, t, kind="cosine"), cos, atol=TOL)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    assert torch.allclose(feature_loss(s, t, mask=mask), F.mse_loss(s[mask], t[mask]), atol=TOL)
    masked_cos = (1 - F.cosine_similarity(s[mask], t[mask], dim=-1)).mean()
    assert torch.allclose(feature_loss(s, t, kind="cosine", mask=mask), masked_cos, atol=TOL)


def test_feature_loss_width_mismatch_needs_projection():
    s, t = _logits(3, 6, seed=24), _logits(3, 10, seed=25)
    with pytest.raises(LeanmlError, match=r"student width 6 differs from teacher width 10"):
        feature_loss(s, t)


def test_projection_path_trains():
    s, t = _logits(16, 6, seed=26), _logits(16, 10, seed=27)
    proj = FeatureProjection.for_widths(6, 10)
    opt = torch.optim.SGD(proj.parameters(), lr=0.1)
    before = feature_loss(s, t, projection=proj)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = feature_loss(s, t, projection=proj)
    assert after.item() < before.item()


def test_feature_projection_init():
    eq = FeatureProjection(5, 5)
    x = _logits(3, 5, seed=28)
    assert torch.allclose(eq(x), x, atol=ZERO)
    wide = FeatureProjection.for_widths(4, 9)
    w = wide.linear.weight.detach()
    assert torch.allclose(w.T @ w, torch.eye(4), atol=1e-5)  # widening preserves norms
    assert torch.equal(w, FeatureProjection.for_widths(4, 9).linear.weight.detach())  # seeded
    with pytest.raises(LeanmlError, match="student width 0"):
        FeatureProjection(0, 4)


def test_layer_map_examples_and_errors():
    assert layer_map(3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert layer_map(4, 6) == [(1, 2), (2, 3), (3, 5), (4, 6)]
    assert layer_map(2, 2) == [(1, 1), (2, 2)]
    assert layer_map(1, 12) == [(1, 12)]
    assert layer_map(3, 6, strategy="last") == [(3, 6)]
    with pytest.raises(LeanmlError, match=r"a student deeper than its teacher \(7 > 6"):
        layer_map(7, 6)
    with pytest.raises(LeanmlError, match="student layers 0"):
        layer_map(0, 6)
    with pytest.raises(LeanmlError, match="teacher layers -1"):
        layer_map(1, -1)
    with pytest.raises(LeanmlError, match="'skip'"):
        layer_map(2, 4, strategy="skip")


# --- relational and attention losses -------------------------------------------------------------


def _huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_distance_matches_loops_and_is_scale_invariant():
    s, t = _logits(4, 3, seed=29), _logits(4, 5, seed=30)

    def dists(e: torch.Tensor) -> list[float]:
        rows = e.double().tolist()
        d = [math.dist(rows[i], rows[j]) for i in range(4) for j in range(4) if i != j]
        mean = sum(d) / len(d)
        return [x / mean for x in d]

    ds, dt = dists(s), dists(t)
    expected = sum(_huber(a, b) for a, b in zip(ds, dt, strict=True)) / len(ds)
    got = rkd_distance(s, t)
    assert abs(got.item() - expected) < TOL
    assert abs(rkd_distance(3 * s, t).item() - got.item()) < TOL


def test_rkd_angle_matches_triple_loop():
    s, t = _logits(4, 3, seed=31), _logits(4, 5, seed=32)

    def cosines(e: torch.Tensor) -> list[float]:
        rows = e.double().tolist()
        out = []
        for i, j, k in itertools.permutations(range(4), 3):
            u = [a - b for a, b in zip(rows[i], rows[j], strict=True)]
            v = [a - b for a, b in zip(rows[k], rows[j], strict=True)]
            out.append(sum(a * b for a, b in zip(u, v, strict=True)) / (math.hypot(*u) * math.hypot(*v)))
        return out

    cs, ct = cosines(s), cosines(t)
    expected = sum(_huber(a, b) for a, b in zip(cs, ct, strict=True)) / len(cs)
    assert abs(rkd_angle(s, t).item() - expected) < TOL


def test_rkd_supports_autograd_and_checks_batch():
    s = _logits(5, 4, seed=33).requires_grad_(True)
    (rkd_distance(s, _logits(5, 6, seed=34)) + rkd_angle(s, _logits(5, 6, seed=34))).backward()
    assert torch.isfinite(s.grad).all()
    with pytest.raises(LeanmlError, match="batch size 1 .* at least 2"):
        rkd_distance(_logits(1, 4), _logits(1, 4))
    with pytest.raises(LeanmlError, match="batch size 2 .* at least 3"):
        rkd_angle(_logits(2, 4), _logits(2, 4))


def test_attention_map_loss_matches_explicit_kl():
    s = torch.softmax(_logits(2, 2, 3, 4, seed=35), -1)
    t = torch.softmax(_logits(2, 2, 3, 4, seed=36), -1)
    expected = (t * (t.log() - s.log())).sum(-1).mean()
    assert torch.allclose(attention_map_loss(s, t), expected, atol=TOL)
    # different head counts: both averaged to one head
    t4 = torch.softmax(_logits(2, 4, 3, 4, seed=37), -1)
    s1, t1 = s.mean(1), t4.mean(1)
    expected = (t1 * (t1.log() - s1.log())).sum(-1).mean()
    assert torch.allclose(attention_map_loss(s, t4), expected, atol=TOL)
    # query-row mask (B, q)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    rows = (t * (t.log() - s.log())).sum(-1)  # (B, heads, q)
    expected = rows.permute(0, 2, 1)[mask.bool()].mean()
    assert torch.allclose(attention_map_loss(s, t, mask=mask), expected, atol=TOL)
    # zeros in the probabilities do not produce nan
    z = torch.zeros(1, 1, 2, 3)
    z[..., 0] = 1.0
    assert torch.isfinite(attention_map_loss(z, torch.softmax(_logits(1, 1, 2, 3), -1)))
    assert attention_map_loss(torch.softmax(_logits(1, 1, 2, 3), -1), z).item() >= 0


# --- bad inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan")])
def test_bad_temperature(temperature):
    x = _logits(2, 4)
    with pytest.raises(LeanmlError, match=rf"temperature {temperature!r} is not accepted; use .*> 0"):
        hinton_kd(x, x, temperature=temperature)
    with pytest.raises(LeanmlError, match=rf"temperature {temperature!r}"):
        token_kl(x, x, temperature=temperature)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_bad_alpha(alpha):
    x = _logits(2, 4)
    with pytest.raises(LeanmlError, match=rf"alpha {alpha!r} is not accepted; use a weight in \[0, 1\]"):
        hinton_kd(x, x, torch.zeros(2, dtype=torch.long), alpha=alpha)


def test_bad_token_kl_arguments():
    x = _logits(2, 3, 5)
    with pytest.raises(LeanmlError, match="direction 'sideways' is not accepted; use one of forward, reverse"):
        token_kl(x, x, direction="sideways")
    for k in (0, 6):
        with pytest.raises(LeanmlError, match=rf"top_k {k} is not accepted; use an integer in \[1, 5\]"):
            token_kl(x, x, top_k=k)
    with pytest.raises(LeanmlError, match="mask shape"):
        token_kl(x, x, mask=torch.ones(2, 4))
    values, indices = x.topk(2, dim=-1)
    with pytest.raises(LeanmlError, match="top_k 3 is not accepted with a cached top-2 teacher"):
        token_kl(x, (values, indices), top_k=3)


def test_bad_kind_and_shapes():
    x = _logits(2, 3, 5)
    with pytest.raises(LeanmlError, match="feature loss kind 'l1' is not accepted; use one of mse, cosine"):
        feature_loss(x, x, kind="l1")
    with pytest.raises(LeanmlError, match=r"student logits shape \(2, 3, 5\) does not match teacher logits shape \(2, 3, 6\)"):
        hinton_kd(x, _logits(2, 3, 6))
    with pytest.raises(LeanmlError, match=r"student logits shape \(2, 3, 5\) does not match teacher logits shape \(2, 4, 5\)"):
        token_kl(x, _logits(2, 4, 5))
    with pytest.raises(LeanmlError, match=r"labels shape \(2, 2\)"):
        hinton_kd(x, x, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(LeanmlError, match="student logits of type torch.int64"):
        hinton_kd(torch.zeros(2, 3, dtype=torch.long), x)
    with pytest.raises(LeanmlError, match=r"student attention shape \(1, 2, 3, 3\) does not match"):
        attention_map_loss(torch.ones(1, 2, 3, 3) / 3, torch.ones(1, 2, 3, 4) / 4)
