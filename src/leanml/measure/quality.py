"""Quality of a model on data: perplexity, accuracy, Spearman against human scores, and label-free
fidelity to a reference model (top-1 agreement, mean KL, mean cosine)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from ..data import SimilarityPairs, TensorData, TextCorpus, TextRecords, load_data
from ..data.tokens import bos_id, text_ids, token_windows
from ..errors import LeanmlError
from ..models.handle import ModelHandle, output_tensor
from ..progress import progress

# How much evaluation data a figure needs to mean anything (chosen here; the numbers are in the messages):
# * perplexity: fewer than 128 scored tokens in the evaluation split is refused - a handful of tokens
#   gives a number (26,000 on 3 tokens) that says nothing about the model. 128 is a quarter of one
#   512-token evaluation window; a TextCorpus evaluates min(eval_tokens, half its tokens), so a text
#   needs at least 256 tokens.
# * Spearman: fewer than 5 scored pairs (or scores that are all equal) is refused - with 2 pairs the
#   rank correlation can only be ±1 and with equal scores it is undefined; below 30 pairs a note says
#   the figure is noisy.
# * accuracy: an empty evaluation split (a data set of one item) is refused; below 30 evaluation
#   items a note says how much one item moves the figure.
# * fidelity to a reference: a note when it is measured on fewer than 128 tokens or 30 items.
MIN_PERPLEXITY_TOKENS = 128
MIN_SPEARMAN_PAIRS = 5
FEW_ITEMS = 30
EVAL_WINDOW = 512

TEXT_FOR_LM = "running text or text records: lee, enwiki, a .txt file or folder, a .jsonl/.csv file of texts"
TEXT_FOR_ENCODER = "text: lee, lee-sim, enwiki, a .txt file or folder, a .jsonl/.csv file"
TENSORS = "tensors: digits, a .pt/.pth/.npz file"
TEXT_TASKS = ("sentence-embedding", "sequence-classification")


def describe(data) -> str:
    """What a data set holds, in words (for messages)."""
    if isinstance(data, TextCorpus):
        return "running text"
    if isinstance(data, TextRecords):
        return "text records" + (" with labels" if data.labels is not None else "")
    if isinstance(data, SimilarityPairs):
        return "similarity pairs"
    x = data.x
    return f"{'image ' if x.ndim == 4 else ''}tensors (items of shape {tuple(x.shape[1:])})"


def _accepted(handle: ModelHandle) -> tuple[tuple[type, ...], str]:
    """The data kinds ``handle``'s task can use, and how to say so."""
    if handle.task == "causal-lm":
        return (TextCorpus, TextRecords), TEXT_FOR_LM
    if handle.task in TEXT_TASKS:
        return (TextCorpus, TextRecords, SimilarityPairs), TEXT_FOR_ENCODER
    if handle.task == "generic" and handle.tokenizer is not None:  # a model of unknown kind that reads text
        return (TextCorpus, TextRecords, SimilarityPairs, TensorData), f"{TEXT_FOR_ENCODER}, or {TENSORS}"
    return (TensorData,), TENSORS


def _first_tensor(inputs) -> torch.Tensor | None:
    if isinstance(inputs, dict):
        inputs = list(inputs.values())
    if isinstance(inputs, (tuple, list)) and inputs and isinstance(inputs[0], torch.Tensor):
        return inputs[0]
    return inputs if isinstance(inputs, torch.Tensor) else None


@torch.no_grad()
def _check_tensor_items(handle: ModelHandle, data: TensorData, verb: str) -> None:
    """Items of ``data`` must fit ``handle`` when it has example inputs: equal per-item shape and dtype
    pass at once; otherwise one small batch is run (convolutions take other image sizes), as profile feeds it."""
    first = _first_tensor(handle.example_inputs)
    if first is None or first.ndim == 0:
        return
    want, got = tuple(first.shape[1:]), tuple(data.x.shape[1:])
    if want == got and first.dtype == data.x.dtype:
        return
    try:
        handle.call((data.x[: max(1, min(len(data.x), first.shape[0]))],))
    except Exception as exc:  # noqa: BLE001 - whatever the model raises, the cause is the data's shape or dtype
        why = (str(exc).strip().splitlines() or [""])[0][:200]
        raise LeanmlError(
            f"cannot {verb} model {handle.name!r} ({handle.task}) on data {data.name!r}: its items have shape {got} "
            f"({str(data.x.dtype).removeprefix('torch.')}) but the model takes {want} "
            f"({str(first.dtype).removeprefix('torch.')}); running it failed with {type(exc).__name__}: {why}"
        ) from None


def eval_token_count(handle: ModelHandle, data: TextCorpus, split: str = "eval") -> tuple[int, int]:
    """(tokens in ``split``, tokens in all) of ``data`` under ``handle``'s tokenizer."""
    lo, hi = data.split_range(handle.tokenizer, split)
    return hi - lo, len(data.tokens(handle.tokenizer))


def _check_perplexity_tokens(handle: ModelHandle, data: TextCorpus, split: str = "eval") -> None:
    n_eval, n_all = eval_token_count(handle, data, split)
    if n_eval < MIN_PERPLEXITY_TOKENS:
        if split in ("eval", "test"):
            cap = f"its eval_tokens={data.eval_tokens}" if data.eval_tokens < n_all // 2 else f"half of its {n_all} tokens"
            tokens, need = f"{n_eval} evaluation token{'s' * (n_eval != 1)}", 2 * MIN_PERPLEXITY_TOKENS
        else:
            cap, tokens = f"of its {n_all}", f"{n_eval} {split} token{'s' * (n_eval != 1)}"
            need = 3 * MIN_PERPLEXITY_TOKENS + MIN_PERPLEXITY_TOKENS // 2
        raise LeanmlError(
            f"data {data.name!r} gives model {handle.name!r} only {tokens} ({cap}); perplexity "
            f"needs at least {MIN_PERPLEXITY_TOKENS}, so give a text of at least {need} tokens"
        )


def _check_eval_size(handle: ModelHandle, data) -> None:
    """Refuse evaluation sets too small to mean anything (see the comment at the top of the module)."""
    if isinstance(data, TextCorpus) and handle.task == "causal-lm":
        _check_perplexity_tokens(handle, data)
    if isinstance(data, (TextRecords, TensorData)):
        n = len(data.texts) if isinstance(data, TextRecords) else len(data.x)
        if n < 2:
            unit = "record" if isinstance(data, TextRecords) else "item"
            raise LeanmlError(
                f"data {data.name!r} holds {n} {unit}; at least 2 are needed "
                f"(a seeded {data.eval_fraction:.0%} of them is the evaluation split)"
            )
    if isinstance(data, SimilarityPairs) and handle.task == "sentence-embedding":
        n_eval = len(data.pair_indices("eval"))
        if n_eval < MIN_SPEARMAN_PAIRS:
            raise LeanmlError(
                f"data {data.name!r} holds {len(data.pairs)} scored pairs, {n_eval} of them in the evaluation split "
                f"(pairs are split by text); Spearman needs at least {MIN_SPEARMAN_PAIRS}"
            )
        if len(set(data.scores)) < 2:
            raise LeanmlError(f"data {data.name!r}: every pair has the score {data.scores[0]}, so Spearman is undefined")


def check_data_for(handle: ModelHandle, data, verb: str = "profile") -> None:
    """Refuse, before anything is measured, ``data`` that ``handle``'s task cannot use.

    Causal LMs take running text or text records; sentence encoders and sequence classifiers take text
    (running text, records or similarity pairs); image and generic tensor models take tensors whose
    items fit the model's example inputs. Text needs the model's tokenizer. Unless ``verb`` is
    ``"calibrate"`` (which reads the calibration split), evaluation sets too small to give a meaningful
    figure are refused too. ``verb`` is what the caller is about to do, for the message.
    """
    if data is None:
        return
    data = load_data(data)
    kinds, accepted = _accepted(handle)
    if not isinstance(data, kinds):
        raise LeanmlError(
            f"cannot {verb} model {handle.name!r} ({handle.task}) on data {data.name!r}: the data holds "
            f"{describe(data)}; the model takes {accepted}"
        )
    if not isinstance(data, TensorData) and handle.tokenizer is None:
        raise LeanmlError(
            f"cannot {verb} model {handle.name!r} ({handle.task}) on text data {data.name!r}: the model has no "
            "tokenizer (load it from a Hugging Face folder or .gguf file that has one)"
        )
    if isinstance(data, TensorData):
        _check_tensor_items(handle, data, verb)
    if verb != "calibrate":
        _check_eval_size(handle, data)


def metric_for(handle: ModelHandle, data) -> str | None:
    """The quality metric :func:`evaluate` gives for ``handle`` on ``data``, or None."""
    if handle.task == "causal-lm":
        return "perplexity" if isinstance(data, TextCorpus) else None
    if handle.task == "sentence-embedding":
        if isinstance(data, TextRecords) and data.labels is not None:
            return "accuracy"  # of the nearest class centroid of the embeddings (see centroid_predictions)
        return "spearman" if isinstance(data, SimilarityPairs) else None
    if isinstance(data, TensorData) and data.y is not None:
        return "accuracy"
    if isinstance(data, TextRecords) and data.labels is not None and handle.tokenizer is not None:
        return "accuracy"
    return None


def _eval_items(data, split: str = "eval") -> int:
    return len(data.indices(split))


def quality_notes(handle: ModelHandle, data) -> list[str]:
    """Plain words for a profile's notes: why there is no quality figure, or why it is a weak one."""
    metric = metric_for(handle, data)
    name = data.name
    if metric is None:
        if handle.task == "causal-lm":
            want = "perplexity, which needs running text (lee, enwiki, a .txt file or folder)"
        elif handle.task == "sentence-embedding":
            want = "Spearman on similarity pairs (lee-sim, or a .jsonl/.csv with text_a, text_b, score)"
        elif isinstance(data, TensorData):
            want = "accuracy, which needs labels (y) with the tensors"
        else:
            want = "accuracy, which needs labelled text records (a .jsonl/.csv with text and label)"
        return [
            f"no quality figure: model {handle.name!r} ({handle.task}) is scored by {want}; "
            f"data {name!r} holds {describe(data)}, so only cost was measured"
        ]
    if metric == "accuracy" and _eval_items(data) < FEW_ITEMS:
        n = _eval_items(data)
        return [
            f"accuracy is over only {n} evaluation item{'s' * (n != 1)} of data {name!r}, so one item moves it by "
            f"{1 / n:.1%}; give data with at least {FEW_ITEMS} evaluation items for a figure that means something"
        ]
    if metric == "spearman" and len(data.pair_indices("eval")) < FEW_ITEMS:
        return [
            f"Spearman is over only {len(data.pair_indices('eval'))} pairs of data {name!r} (its evaluation split); "
            f"below {FEW_ITEMS} pairs it is too noisy to compare models"
        ]
    return []


def fidelity_note(fid: dict) -> str | None:
    """A note when a fidelity figure rests on too little data."""
    if fid.get("n_tokens") is not None and fid["n_tokens"] < MIN_PERPLEXITY_TOKENS:
        return f"fidelity to the reference is over only {fid['n_tokens']} tokens; give more text for a stable figure"
    if fid.get("n_items") is not None and fid["n_items"] < FEW_ITEMS:
        return f"fidelity to the reference is over only {fid['n_items']} items; give more data for a stable figure"
    return None


def _config(handle: ModelHandle, key: str):
    value = getattr(getattr(handle.module, "config", None), key, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _lm_vocab_size(handle: ModelHandle) -> int | None:
    """Rows of a causal LM's output layer (what its logits cover), when it can be told."""
    get = getattr(handle.module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0])
    return _config(handle, "vocab_size")


def _tokenizer_vocab(tokenizer):
    """A tokenizer's vocabulary (a dict), else its size, else None."""
    get = getattr(tokenizer, "get_vocab", None)
    if callable(get):
        try:
            return dict(get())
        except Exception:  # noqa: BLE001 - a tokenizer that cannot list its vocabulary is compared by size
            pass
    size = getattr(tokenizer, "vocab_size", None)
    return size if isinstance(size, int) else None


def check_reference(handle: ModelHandle, reference: ModelHandle, data) -> None:
    """Refuse, before anything is measured, a reference that fidelity cannot compare with ``handle`` on ``data``:
    it must do the same task; causal LMs need the same vocabulary (and tokenizer vocabulary when both
    have tokenizers), encoders the same embedding width, classifiers the same number of classes."""
    pair = f"model {handle.name!r} ({handle.task}) and reference {reference.name!r} ({reference.task})"
    if data is None:
        raise LeanmlError(f"{pair}: fidelity to a reference is measured on data; give data (--data) too")
    if reference.task != handle.task:
        raise LeanmlError(f"{pair} do different tasks; a reference must also be a {handle.task} model")
    if handle.task == "causal-lm":
        a, b = _lm_vocab_size(handle), _lm_vocab_size(reference)
        if a is not None and b is not None and a != b:
            raise LeanmlError(
                f"{pair} have vocabularies of {a} and {b} tokens; fidelity compares next-token "
                "distributions, so the reference needs the same vocabulary"
            )
        if handle.tokenizer is not None and reference.tokenizer is not None and handle.tokenizer is not reference.tokenizer:
            va, vb = _tokenizer_vocab(handle.tokenizer), _tokenizer_vocab(reference.tokenizer)
            sa, sb = (len(v) if isinstance(v, dict) else v for v in (va, vb))
            differ = va != vb if isinstance(va, dict) and isinstance(vb, dict) else sa != sb
            if va is not None and vb is not None and differ:
                raise LeanmlError(
                    f"{pair} have different tokenizers ({sa} and {sb} tokens); the reference is fed the "
                    "model's token ids, so it needs the same tokenizer"
                )
        return
    if handle.task == "sentence-embedding":
        a, b = _config(handle, "hidden_size"), _config(reference, "hidden_size")
        if a is not None and b is not None and a != b:
            raise LeanmlError(f"{pair} give embeddings of width {a} and {b}; cosine fidelity needs the same width")
        if reference.tokenizer is None:
            raise LeanmlError(f"{pair}: the reference has no tokenizer, so it cannot embed the texts of {data.name!r}")
        return
    if not isinstance(data, (TensorData, TextRecords)):
        raise LeanmlError(
            f"{pair}: fidelity of a {handle.task} model is measured on tensors or text records; "
            f"data {data.name!r} holds {describe(data)}"
        )
    if isinstance(data, TextRecords) and reference.tokenizer is None:
        raise LeanmlError(f"{pair}: the reference has no tokenizer, so it cannot read the texts of {data.name!r}")
    a, b = _config(handle, "num_labels"), _config(reference, "num_labels")
    if a is not None and b is not None and a != b:
        raise LeanmlError(f"{pair} have {a} and {b} classes; fidelity compares class outputs, so they must match")
    if isinstance(data, TensorData):
        _check_tensor_items(reference, data, "compare with the reference")


def lm_logits(handle: ModelHandle, window: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) of a causal LM for one window of token ids (T,)."""
    return output_tensor(handle.call({"input_ids": window[None]}))[0].float()


@torch.no_grad()
def perplexity(handle: ModelHandle, windows: list[torch.Tensor], label: str = "perplexity", samples: bool = False) -> dict:
    """exp(mean next-token negative log-likelihood) over every window.

    Each window is scored independently on its T-1 next-token predictions (no context carried over),
    the negative log-likelihoods are summed over all windows and divided by the number of predictions.
    A window that starts with the tokenizer's BOS token has its BOS position as context only (never a
    target): T-1 predictions, the first from BOS.
    """
    nlls, counts = [], []
    for window in progress(windows, label):
        nll, n = window_nll(lm_logits(handle, window), window)
        nlls.append(nll)
        counts.append(n)
    out = perplexity_result(nlls, counts)
    if samples:  # per window, for bootstrap intervals (leanml.search.noise)
        out["samples"] = {"kind": "perplexity", "nll": nlls, "tokens": counts}
    return out


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> tuple[float, int]:
    """The summed next-token negative log-likelihood of one window (logits ``(T, V)``) and its T-1 predictions."""
    return float(F.cross_entropy(logits[:-1].float(), window[1:], reduction="sum")), len(window) - 1


def perplexity_result(nlls: list[float], counts: list[int]) -> dict:
    """The perplexity record of per-window summed NLLs and prediction counts."""
    total, count = sum(nlls), sum(counts)
    return {
        "metric": "perplexity",
        "value": math.exp(total / count),
        "higher_is_better": False,
        "n_items": len(nlls),
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


class _PerToken(Exception):
    """The model's output has one vector per token (an encoder), so it holds no class logits."""


@torch.no_grad()
def classify(handle: ModelHandle, data, split: str = "eval", batch_size: int = 64) -> torch.Tensor:
    """Class logits of ``handle`` for a labelled split of ``data``; a text model whose outputs are per
    token (an encoder without a classification head) is scored by :func:`centroid_predictions` instead."""
    return class_scores(handle, data, split, batch_size)[0]


CENTROIDS = "nearest class centroid of the calibration split's embeddings"


def class_scores(handle: ModelHandle, data, split: str = "eval", batch_size: int = 64) -> tuple[torch.Tensor, str | None]:
    """:func:`classify`'s scores and how they were made (None: the model's own logits, or CENTROIDS)."""
    if handle.task == "sentence-embedding" and isinstance(data, TextRecords):
        return centroid_predictions(handle, data, split), CENTROIDS
    try:
        return _logits(handle, data, split, batch_size), None
    except _PerToken:
        return centroid_predictions(handle, data, split), CENTROIDS


def _logits(handle: ModelHandle, data, split: str, batch_size: int) -> torch.Tensor:
    outs = []
    if isinstance(data, TensorData):
        x, _ = data.tensors(split)
        for k in range(0, len(x), batch_size):
            outs.append(output_tensor(handle.call((x[k : k + batch_size],))).float())
    else:
        texts = data.documents(split)  # the same order as data.labelled(split); labels are not needed here
        for k in range(0, len(texts), batch_size):
            enc = handle.tokenizer(
                texts[k : k + batch_size], padding=True, truncation=True, max_length=handle.max_length, return_tensors="pt"
            )
            out = output_tensor(handle.call(dict(enc))).float()
            if out.ndim == 3:
                raise _PerToken
            outs.append(out)
    return torch.cat(outs)


CENTROID_FIT_ITEMS = 2000  # labelled calibration texts the class centroids are fitted on (at most)


@torch.no_grad()
def centroid_predictions(handle: ModelHandle, data, split: str = "eval") -> torch.Tensor:
    """Nearest-centroid scores of an encoder on labelled text: the class centroids are the means of the
    unit-length embeddings of the calibration split's texts (never the split scored), and each text's
    score for a class is its cosine to that centroid; a class missing from calibration scores -inf."""
    fit_texts, fit_labels = data.labelled("calib")
    if not fit_texts:
        raise LeanmlError(f"data {data.name!r} has no labelled calibration texts to fit the class centroids on")
    fit_texts, fit_labels = fit_texts[:CENTROID_FIT_ITEMS], torch.tensor(fit_labels[:CENTROID_FIT_ITEMS])
    texts = data.documents(split)
    n_classes = int(max(max(fit_labels.tolist()), max(data.labelled(split)[1], default=0))) + 1
    fit = F.normalize(handle.embed(fit_texts).float(), dim=-1)
    centroids = torch.zeros(n_classes, fit.shape[1]).index_add_(0, fit_labels, fit)
    present = torch.bincount(fit_labels, minlength=n_classes) > 0
    scores = F.normalize(handle.embed(texts).float(), dim=-1) @ F.normalize(centroids, dim=-1).T
    return scores.masked_fill(~present, float("-inf"))


def labels_of(data, split: str = "eval") -> torch.Tensor:
    if isinstance(data, TensorData):
        return data.tensors(split)[1]
    return torch.tensor(data.labelled(split)[1])


def evaluate(handle: ModelHandle, data, split: str = "eval", samples: bool = False) -> dict | None:
    """The task's quality metric on ``split`` of ``data`` (the evaluation split by default), or None when
    none applies (:func:`metric_for`; :func:`quality_notes` says why). ``samples`` adds what the figure is
    made of, per window, item or pair (``result["samples"]``), for bootstrap intervals."""
    metric = metric_for(handle, data)
    label = "perplexity" if split in ("eval", "test") else f"perplexity ({split})"
    if metric == "perplexity":
        _check_perplexity_tokens(handle, data, split)
        result = perplexity(handle, data.windows(handle.tokenizer, split, EVAL_WINDOW), label=label, samples=samples)
        return {**result, "bos": data.bos(handle.tokenizer) is not None, "split": split}
    if metric == "spearman":
        texts, pairs, scores = data.scored(split)
        if len(pairs) < MIN_SPEARMAN_PAIRS or len(set(scores)) < 2:
            raise LeanmlError(
                f"data {data.name!r} has {len(pairs)} scored pairs in its {split} split (pairs are split by text); "
                f"Spearman needs at least {MIN_SPEARMAN_PAIRS} with different scores"
            )
        emb = handle.embed(texts)
        value = cosine_spearman(emb, pairs, scores)
        out = {"metric": "spearman", "value": value, "higher_is_better": True, "n_items": len(pairs), "split": split}
        if samples:
            e = F.normalize(emb.float(), dim=-1)
            cos = [float(e[i] @ e[j]) for i, j in pairs]
            out["samples"] = {"kind": "spearman", "cos": cos, "scores": list(scores), "pairs": [list(p) for p in pairs]}
        return out
    if metric == "accuracy":
        if _eval_items(data, split) == 0:
            raise LeanmlError(f"data {data.name!r} has an empty {split} split; accuracy needs at least 2 items")
        logits, method = class_scores(handle, data, split)
        y = labels_of(data, split)
        if logits.ndim != 2 or logits.shape[0] != len(y):
            raise LeanmlError(
                f"model {handle.name!r} gives outputs of shape {tuple(logits.shape)}; "
                f"accuracy needs (items, classes) for {len(y)} items"
            )
        right = (logits.argmax(-1) == y).float()
        out = {"metric": "accuracy", "value": float(right.mean()), "higher_is_better": True, "n_items": len(y), "split": split}
        if method is not None:
            out["method"] = method
        if samples:
            out["samples"] = {"kind": "accuracy", "correct": [int(v) for v in right.tolist()]}
        return out
    return None


def lm_windows(handle: ModelHandle, data, limit: int | None = None, split: str = "eval") -> list[torch.Tensor]:
    """Windows of token ids of ``split``: from running text by position, from records one per text (its
    first window); each starts with BOS when the tokenizer adds one."""
    if isinstance(data, TextCorpus):
        return data.windows(handle.tokenizer, split, EVAL_WINDOW, limit=limit)
    out = []
    bos = bos_id(handle.tokenizer)
    for text in data.documents(split):
        out.extend(token_windows(torch.tensor(text_ids(handle.tokenizer, text), dtype=torch.long), EVAL_WINDOW, bos)[:1])
        if limit and len(out) >= limit:
            break
    if not out:
        raise LeanmlError(f"data {data.name!r} has no {split} text of 2 tokens or more")
    return out


@torch.no_grad()
def fidelity(handle: ModelHandle, reference: ModelHandle, data, max_items: int = 8, split: str = "eval") -> dict:
    """Label-free agreement of ``handle`` with ``reference`` on ``split`` of ``data`` (the evaluation
    split by default; ``optimize`` uses the held-out ``check`` split).

    Causal LMs and classifiers: top-1 agreement and mean KL(reference ‖ model) per token/item.
    Encoders: mean cosine similarity of embeddings. ``max_items`` bounds the windows of a causal LM.
    """
    if handle.task == "causal-lm":
        agree = kl = 0.0
        n = 0
        for window in lm_windows(handle, data, limit=max_items, split=split):
            p = lm_logits(reference, window).log_softmax(-1)
            q = lm_logits(handle, window).log_softmax(-1)
            agree += float((p.argmax(-1) == q.argmax(-1)).sum())
            kl += float(F.kl_div(q, p, log_target=True, reduction="sum"))
            n += len(window)
        return {"top1_agreement": agree / n, "mean_kl": kl / n, "n_tokens": n}
    if handle.task == "sentence-embedding":
        texts = data.documents(split)
        if not texts:
            raise LeanmlError(f"data {data.name!r} has no texts in its {split} split")
        a, b = handle.embed(texts), reference.embed(texts)
        return {"mean_cosine": float(F.cosine_similarity(a, b, dim=-1).mean()), "n_items": len(texts)}
    if isinstance(data, (TensorData, TextRecords)):
        if not data.indices(split):
            raise LeanmlError(f"data {data.name!r} has no items in its {split} split")
        q, p = classify(handle, data, split), classify(reference, data, split)
        agree = float((q.argmax(-1) == p.argmax(-1)).float().mean())
        kl = float(F.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="batchmean"))
        return {"top1_agreement": agree, "mean_kl": kl, "n_items": len(q)}
    raise LeanmlError(f"no fidelity measure for task {handle.task!r} with data {data.name!r}")
