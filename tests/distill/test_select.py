"""Data selection: exact and MinHash near duplicates, teacher scores, fraction selection."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from leanml.data import TensorData
from leanml.distill.select import (
    dedup,
    exact_duplicates,
    jaccard,
    minhash_signatures,
    near_duplicates,
    normalise_text,
    select,
    teacher_scores,
)
from leanml.errors import LeanmlError
from leanml.models import ModelHandle

VOCAB = [f"w{i}" for i in range(2000)]


def random_text(rng: random.Random, n: int = 60) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def mutate(rng: random.Random, text: str, changes: int) -> str:
    words = text.split()
    for pos in rng.sample(range(len(words)), changes):
        words[pos] = rng.choice(VOCAB)
    return " ".join(words)


def raises_one_line(fn, *args, match: str, **kwargs) -> None:
    with pytest.raises(LeanmlError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_exact_duplicates_collapse_case_whitespace_and_punctuation():
    assert normalise_text("  Hello,   WORLD!\n") == "hello world"
    texts = ["Hello, World!", "hello world", "  HELLO   world ", "Hello there", "hello, there.", "other", "Other"]
    assert exact_duplicates(texts) == [1, 2, 4, 6]
    assert exact_duplicates([]) == []
    raises_one_line(exact_duplicates, "not a list", match="list of strings")


def test_jaccard_exact_reference():
    assert jaccard("a b c d e f", "a b c d e f") == 1.0
    # 6 words -> shingles {abcde, bcdef}; changing the last word keeps one of three distinct shingles
    assert jaccard("a b c d e f", "a b c d e g") == pytest.approx(1 / 3)
    assert jaccard("tiny", "Tiny!") == 1.0  # shorter than a shingle: whole text is one shingle
    assert jaccard("tiny", "other") == 0.0


def test_minhash_estimate_matches_exact_jaccard():
    rng = random.Random(0)
    pairs = []
    for i in range(30):
        base = random_text(rng)
        pairs.append((base, mutate(rng, base, i % 15)))  # 0..14 changed words: Jaccard from 1 down to ~0.1
    sigs = minhash_signatures([t for pair in pairs for t in pair], num_perm=128)
    assert sigs.shape == (60, 128) and sigs.dtype == torch.int64
    errors = []
    for k, (a, b) in enumerate(pairs):
        estimate = (sigs[2 * k] == sigs[2 * k + 1]).double().mean().item()
        errors.append(abs(estimate - jaccard(a, b)))
    exact = [jaccard(a, b) for a, b in pairs]
    assert max(exact) == 1.0 and min(exact) < 0.3  # the pairs span the range
    assert sum(errors) / len(errors) <= 0.1  # tolerance: mean absolute error 0.1 at 128 permutations
    assert max(errors) <= 0.25


def test_signatures_are_deterministic():
    texts = [random_text(random.Random(i)) for i in range(4)] + ["short"]
    torch.testing.assert_close(minhash_signatures(texts, seed=3), minhash_signatures(texts, seed=3), rtol=0, atol=0)
    assert not torch.equal(minhash_signatures(texts, seed=3), minhash_signatures(texts, seed=4))


def test_near_duplicates_finds_planted_copy():
    rng = random.Random(1)
    texts = [random_text(rng) for _ in range(6)]
    words = texts[2].split()
    words[30] = "changed"  # one word in the middle of a 60-word text: exact Jaccard 51/61
    texts.append(" ".join(words))
    assert jaccard(texts[2], texts[6]) == pytest.approx(51 / 61)
    assert near_duplicates(texts, threshold=0.7) == [6]
    words[30], words[59] = texts[2].split()[30], "changed"  # a change at the end keeps 55 of 57 shingles
    assert near_duplicates(texts[:6] + [" ".join(words)]) == [6]
    assert near_duplicates(texts[:6]) == []  # unrelated texts are not flagged


def test_near_duplicates_against_brute_force():
    rng = random.Random(2)
    texts = [random_text(rng) for _ in range(15)]
    for _ in range(25):  # variants (and variants of variants) with 0..12 changed words
        texts.insert(rng.randrange(len(texts) + 1), mutate(rng, rng.choice(texts), rng.randrange(13)))
    threshold = 0.8
    drop = set(near_duplicates(texts, threshold=threshold))
    n = len(texts)
    sim = [[jaccard(texts[i], texts[j]) for j in range(n)] for i in range(n)]
    assert any(threshold - 0.3 < sim[i][j] < threshold + 0.1 for i in range(n) for j in range(i))  # a grey zone exists
    for i in range(n):
        for j in range(i + 1, n):
            if sim[i][j] >= threshold + 0.1:
                assert i in drop or j in drop, (i, j, sim[i][j])
    for j in drop:  # each dropped text is close to an earlier kept one, never dropped for a dissimilar pair
        assert max(sim[i][j] for i in range(j) if i not in drop) > threshold - 0.3
    kept = [i for i in range(n) if i not in drop]
    assert all(sim[i][j] < threshold + 0.1 for i in kept for j in kept if i < j)


def test_dedup_report():
    rng = random.Random(3)
    a, b = random_text(rng), random_text(rng)
    texts = [a, a.upper(), b, mutate(rng, b, 0) + " extra", random_text(rng)]
    kept, report = dedup(texts)
    assert kept == [0, 2, 4]
    assert report == {"items": 5, "exact_duplicates": 1, "near_duplicates": 1, "kept": 3}
    kept, report = dedup(texts, near=False)
    assert kept == [0, 2, 3, 4] and report["near_duplicates"] == 0


def test_teacher_scores_causal_lm_match_hand_computation(tiny_llama):
    module = tiny_llama.module
    items = [torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    module.train()
    loss = teacher_scores(tiny_llama, items, kind="loss", batch_size=2)
    entropy = teacher_scores(tiny_llama, items, kind="entropy", batch_size=2)
    assert module.training  # training mode is restored
    module.eval()
    with torch.no_grad():
        logits = [module(item[None]).logits[0, :-1].float() for item in items]
    hand_loss = torch.stack([F.cross_entropy(lg, item[1:]) for lg, item in zip(logits, items, strict=True)])
    p = [lg.softmax(-1) for lg in logits]
    hand_entropy = torch.stack([-(q * q.log()).sum(-1).mean() for q in p])
    torch.testing.assert_close(loss, hand_loss, atol=1e-5, rtol=0)  # tolerance 1e-5
    torch.testing.assert_close(entropy, hand_entropy, atol=1e-5, rtol=0)
    raises_one_line(teacher_scores, tiny_llama, [items[0], items[1][:5]], match="one length")
    raises_one_line(teacher_scores, tiny_llama, items, kind="margin", match="accepted: loss, entropy")


def test_teacher_scores_classifier(mlp):
    handle = ModelHandle(module=mlp, task="generic", name="mlp")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(11, 20, generator=gen), torch.randint(0, 5, (11,), generator=gen)
    with torch.no_grad():
        logits = mlp(x)
    torch.testing.assert_close(
        teacher_scores(handle, (x, y), batch_size=4), F.cross_entropy(logits, y, reduction="none"), atol=1e-5, rtol=0
    )
    p = logits.softmax(-1)
    hand_entropy = -(p * p.log()).sum(-1)
    torch.testing.assert_close(teacher_scores(handle, (x, None), kind="entropy"), hand_entropy, atol=1e-5, rtol=0)
    data = TensorData(name="t", x=x, y=y)
    torch.testing.assert_close(teacher_scores(handle, data, kind="entropy"), hand_entropy, atol=1e-5, rtol=0)
    raises_one_line(teacher_scores, handle, (x, None), kind="loss", match="needs labels")
    raises_one_line(teacher_scores, handle, ["some text"], match=r"tuple \(x, y\)")
    embedder = ModelHandle(module=mlp, task="sentence-embedding", name="emb")
    raises_one_line(teacher_scores, embedder, ["some text"], kind="entropy", match="needs a model with logits")


def test_select_orders_and_errors():
    scores = torch.tensor([0.5, 2.0, -1.0, 3.0, 1.0, 0.0])
    assert select(scores, 0.5, "hard") == [3, 1, 4]
    assert select(scores, 0.5, "easy") == [2, 5, 0]
    assert select(scores, 0.5, "curriculum") == [4, 1, 3]  # the hard subset, easiest first
    chosen = select(scores, 0.5, "random", seed=1)
    assert len(chosen) == 3 and chosen == sorted(chosen) and set(chosen) <= set(range(6))
    assert select(scores, 0.5, "random", seed=1) == chosen
    assert select(scores, 1.0, "random") == list(range(6))
    assert select(scores, 0.01, "hard") == [3]  # at least one item
    for bad in (0, 0.0, -0.1, 1.5, float("nan")):
        raises_one_line(select, scores, bad, match=r"fraction must be a number in \(0, 1\]")
    raises_one_line(select, scores, 0.5, "median", match="accepted: hard, easy, random, curriculum")
    raises_one_line(select, torch.tensor([1.0, float("nan")]), 0.5, match="non-finite")
