"""An encoder on labelled text is scored by nearest-centroid accuracy (centroids fitted on the calibration
split, scored on the evaluation split), checked against a loop written out here; an encoder whose outputs are
per token is scored the same way over many batches, not a traceback; unlabelled text gets a fidelity figure."""

from __future__ import annotations

import copy

import torch

import leanml
from leanml.data import TextRecords
from leanml.measure.quality import CENTROIDS, centroid_predictions, evaluate, metric_for
from leanml.models import ModelHandle
from tests.families import handle as family_handle

WORDS = ["fox", "dog", "cat"]


def records(n: int = 150, labels: bool = True) -> TextRecords:
    gen = torch.Generator().manual_seed(0)
    texts, ys = [], []
    for i in range(n):
        y = int(torch.randint(0, 3, (1,), generator=gen))
        texts.append(f"the {WORDS[y]} number {i} runs {'fast' if i % 2 else 'slowly'} near the {WORDS[y]} house")
        ys.append(y)
    return TextRecords(name="animals", texts=texts, labels=ys if labels else None)


def by_hand(handle: ModelHandle, data: TextRecords) -> list[int]:
    """Nearest centroid, one text at a time, in plain Python over the embeddings."""
    fit_texts, fit_y = data.labelled("calib")
    fit = handle.embed(fit_texts).double()
    sums: dict[int, torch.Tensor] = {}
    for e, y in zip(fit, fit_y, strict=True):
        sums[y] = sums.get(y, torch.zeros_like(e)) + e / e.norm()
    preds = []
    for e in handle.embed(data.documents("eval")).double():
        best = max(sums, key=lambda c: float(e @ sums[c]) / (float(e.norm()) * float(sums[c].norm())))
        preds.append(best)
    return preds


def test_nearest_centroid_accuracy_matches_a_loop():
    handle, data = family_handle("bert"), records()
    assert metric_for(handle, data) == "accuracy"
    preds = centroid_predictions(handle, data).argmax(-1).tolist()
    assert preds == by_hand(handle, data)
    q = evaluate(handle, data)
    y = data.labelled("eval")[1]
    assert q["method"] == CENTROIDS and q["n_items"] == len(y)
    assert abs(q["value"] - sum(p == t for p, t in zip(preds, y, strict=True)) / len(y)) < 1e-12


def test_an_encoder_with_per_token_outputs_is_scored_over_many_batches():
    """A generic-task text model (one vector per token) on more than one batch of 64 texts."""
    enc = family_handle("bert")
    generic = ModelHandle(module=enc.module, task="generic", name="encoder", tokenizer=enc.tokenizer)
    data = records(300)
    assert len(data.documents("eval")) > 64
    q = evaluate(generic, data)
    assert q["method"] == CENTROIDS and 0 <= q["value"] <= 1
    assert q["value"] == evaluate(enc, data)["value"]  # the same embeddings, the same centroids


def test_compress_gives_unlabelled_text_a_fidelity_figure():
    handle, data = family_handle("bert"), records(labels=False)
    original = copy.deepcopy(handle)
    result = leanml.compress(handle, "int8-dynamic", data=data, repeats=1, threads=1)
    assert result.after.quality is None
    fid = result.after.fidelity
    texts = data.documents("eval")
    cos = torch.nn.functional.cosine_similarity(result.handle.embed(texts), original.embed(texts), dim=-1)
    assert fid["n_items"] == len(texts) and abs(fid["mean_cosine"] - float(cos.mean())) < 1e-5
    assert 0.5 < fid["mean_cosine"] <= 1.0
    assert [n for n in result.notes if "fidelity is the mean cosine" in n]
