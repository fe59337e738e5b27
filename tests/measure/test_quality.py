"""Quality metrics against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from leanml.data import TensorData
from leanml.measure.quality import cosine_spearman, evaluate, fidelity, perplexity
from leanml.models import ModelHandle


def test_perplexity_matches_a_direct_cross_entropy_loop(tiny_llama):
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 128, (n,), generator=gen) for n in (32, 32, 17)]
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    losses = []
    with torch.no_grad():
        for w in windows:
            logits = tiny_llama.module(input_ids=w[None]).logits[0]
            for t in range(len(w) - 1):  # one prediction at a time
                losses.append(float(loss_fn(logits[t : t + 1], w[t + 1 : t + 2])))
    expected = math.exp(sum(losses) / len(losses))
    got = perplexity(tiny_llama, windows)
    assert got["n_tokens"] == 31 + 31 + 16
    assert got["value"] == pytest.approx(expected, rel=1e-5)


def test_perplexity_via_evaluate_uses_the_eval_split(tiny_llama, tiny_text):
    q = evaluate(tiny_llama, tiny_text)
    windows = tiny_text.windows(tiny_llama.tokenizer, "eval", 512)
    assert q["metric"] == "perplexity" and q["n_tokens"] == sum(len(w) - 1 for w in windows) == 598


def test_cosine_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    emb = torch.tensor(rng.normal(size=(6, 4)))
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    scores = rng.uniform(size=len(pairs)).tolist()
    e = emb.numpy() / np.linalg.norm(emb.numpy(), axis=1, keepdims=True)
    cos = [float(e[i] @ e[j]) for i, j in pairs]
    assert cosine_spearman(emb, pairs, scores) == pytest.approx(spearmanr(cos, scores).statistic, abs=1e-12)


def test_accuracy_and_self_fidelity(mlp):
    x = torch.randn(50, 20)
    y = mlp(x).argmax(-1)
    y[:5] = (y[:5] + 1) % 5  # five wrong labels
    data = TensorData(name="toy", x=x, y=y, eval_fraction=1.0)
    handle = ModelHandle(module=mlp, task="generic", name="mlp")
    q = evaluate(handle, data)
    assert q["metric"] == "accuracy" and q["value"] == pytest.approx(45 / 50)
    f = fidelity(handle, handle, data)
    assert f["top1_agreement"] == 1.0 and abs(f["mean_kl"]) < 1e-7


def test_lm_fidelity_detects_a_changed_model(tiny_llama, tiny_text):
    from tests.conftest import tiny_llama_module

    same = fidelity(tiny_llama, tiny_llama, tiny_text)
    assert same["top1_agreement"] == 1.0 and abs(same["mean_kl"]) < 1e-6
    other = ModelHandle(module=tiny_llama_module(seed=5), task="causal-lm", name="o", tokenizer=tiny_llama.tokenizer)
    diff = fidelity(other, tiny_llama, tiny_text)
    assert diff["mean_kl"] > 1e-3 and diff["top1_agreement"] < 1.0
