"""Quality of a model on data: perplexity, accuracy, Spearman against human scores, and label-free
fidelity to a reference model (top-1 agreement, mean KL, mean cosine)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from ..data import SimilarityPairs, TensorData, TextCorpus, TextRecords
from ..errors import LeanmlError
from ..models.handle import ModelHandle, output_tensor
from ..progress import progress


def lm_logits(handle: ModelHandle, window: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) of a causal LM for one window of token ids (T,)."""
    return output_tensor(handle.call({"input_ids": window[None]}))[0].float()


@torch.no_grad()
def perplexity(handle: ModelHandle, windows: list[torch.Tensor], label: str = "perplexity") -> dict:
    """exp(mean next-token negative log-likelihood) over every window.

    Each window is scored independently on its T-1 next-token predictions (no context carried over),
    the negative log-likelihoods are summed over all windows and divided by the number of predictions.
    """
    total, count = 0.0, 0
    for window in progress(windows, label):
        logits = lm_logits(handle, window)
        nll = F.cross_entropy(logits[:-1], window[1:], reduction="sum")
        total += float(nll)
        count += len(window) - 1
    return {
        "metric": "perplexity",
        "value": math.exp(total / count),
        "higher_is_better": False,
        "n_items": len(windows),
        "n_tokens": count,
        "mean_nll": total / count,
    }


def cosine_spearman(embeddings: torch.Tensor, pairs: list[tuple[int, int]], scores: list[float]) -> float:
    """Spearman rank correlation between the cosine similarity of each pair and its human score."""
    e = F.normalize(embeddings.float(), dim=-1)
    i = torch.tensor([p[0] for p in pairs])
    j = torch.tensor([p[1] for p in pairs])
    cos = (e[i] * e[j]).sum(-1)
    return float(spearmanr(cos.numpy(), scores).statistic)


@torch.no_grad()
def classify(handle: ModelHandle, data, split: str = "eval", batch_size: int = 64) -> torch.Tensor:
    """Class logits of ``handle`` for a labelled split of ``data``."""
    outs = []
    if isinstance(data, TensorData):
        x, _ = data.tensors(split)
        for k in range(0, len(x), batch_size):
            outs.append(output_tensor(handle.call((x[k : k + batch_size],))).float())
    else:
        texts, _ = data.labelled(split)
        for k in range(0, len(texts), batch_size):
            enc = handle.tokenizer(
                texts[k : k + batch_size], padding=True, truncation=True, max_length=handle.max_length, return_tensors="pt"
            )
            outs.append(output_tensor(handle.call(dict(enc))).float())
    return torch.cat(outs)


def labels_of(data, split: str = "eval") -> torch.Tensor:
    if isinstance(data, TensorData):
        return data.tensors(split)[1]
    return torch.tensor(data.labelled(split)[1])


def evaluate(handle: ModelHandle, data) -> dict | None:
    """The task's quality metric on the evaluation split of ``data``, or None when none applies."""
    if handle.task == "causal-lm" and isinstance(data, TextCorpus):
        return perplexity(handle, data.windows(handle.tokenizer, "eval", 512))
    if handle.task == "sentence-embedding" and isinstance(data, SimilarityPairs):
        value = cosine_spearman(handle.embed(data.texts), data.pairs, data.scores)
        return {"metric": "spearman", "value": value, "higher_is_better": True, "n_items": len(data.pairs)}
    labelled = (isinstance(data, TensorData) and data.y is not None) or (
        isinstance(data, TextRecords) and data.labels is not None and handle.tokenizer is not None
    )
    if labelled and handle.task != "causal-lm":
        logits = classify(handle, data)
        y = labels_of(data)
        if logits.ndim != 2 or logits.shape[0] != len(y):
            raise LeanmlError(
                f"model {handle.name!r} gives outputs of shape {tuple(logits.shape)}; "
                f"accuracy needs (items, classes) for {len(y)} items"
            )
        acc = float((logits.argmax(-1) == y).float().mean())
        return {"metric": "accuracy", "value": acc, "higher_is_better": True, "n_items": len(y)}
    return None


@torch.no_grad()
def fidelity(handle: ModelHandle, reference: ModelHandle, data, max_items: int = 8) -> dict:
    """Label-free agreement of ``handle`` with ``reference`` on the evaluation split of ``data``.

    Causal LMs and classifiers: top-1 agreement and mean KL(reference ‖ model) per token/item.
    Encoders: mean cosine similarity of embeddings.
    """
    if handle.task == "causal-lm":
        agree = kl = 0.0
        n = 0
        for window in data.windows(handle.tokenizer, "eval", 512, limit=max_items):
            p = lm_logits(reference, window).log_softmax(-1)
            q = lm_logits(handle, window).log_softmax(-1)
            agree += float((p.argmax(-1) == q.argmax(-1)).sum())
            kl += float(F.kl_div(q, p, log_target=True, reduction="sum"))
            n += len(window)
        return {"top1_agreement": agree / n, "mean_kl": kl / n, "n_tokens": n}
    if handle.task == "sentence-embedding":
        texts = data.documents("eval")
        a, b = handle.embed(texts), reference.embed(texts)
        return {"mean_cosine": float(F.cosine_similarity(a, b, dim=-1).mean()), "n_items": len(texts)}
    if isinstance(data, (TensorData, TextRecords)):
        q, p = classify(handle, data), classify(reference, data)
        agree = float((q.argmax(-1) == p.argmax(-1)).float().mean())
        kl = float(F.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="batchmean"))
        return {"top1_agreement": agree, "mean_kl": kl, "n_items": len(q)}
    raise LeanmlError(f"no fidelity measure for task {handle.task!r} with data {data.name!r}")
