"""Calibration inputs: batches from the calibration split of a dataset, shaped for one forward call."""

from __future__ import annotations

import torch

from ..data import SimilarityPairs, TensorData, TextCorpus, TextRecords
from ..errors import LeanmlError
from ..models.handle import ModelHandle


def calibration_batches(handle: ModelHandle, data, n: int, window: int = 512, batch_size: int = 16) -> list:
    """Up to ``n`` forward-call inputs from the calibration split of ``data``.

    Causal LMs get windows of ``window`` tokens (dicts with ``input_ids`` of shape (1, T)); text
    encoders and classifiers get tokenized batches of calibration texts; tensor data gets slices.
    """
    if data is None:
        raise LeanmlError(f"this technique needs calibration data for model {handle.name!r}; pass --data or --calib")
    if handle.task == "causal-lm":
        if not isinstance(data, TextCorpus):
            raise LeanmlError(f"calibrating causal LM {handle.name!r} needs running text, not {type(data).__name__}")
        return [{"input_ids": w[None]} for w in data.windows(handle.tokenizer, "calib", window, limit=n)]
    if isinstance(data, TensorData):
        x, _ = data.tensors("calib")
        return [(x[i : i + batch_size],) for i in range(0, len(x), batch_size)][:n]
    if isinstance(data, (TextRecords, SimilarityPairs, TextCorpus)) and handle.tokenizer is not None:
        docs = data.documents("calib")
        out = []
        for i in range(0, len(docs), batch_size):
            enc = handle.tokenizer(
                docs[i : i + batch_size], padding=True, truncation=True, max_length=handle.max_length, return_tensors="pt"
            )
            out.append(dict(enc))
        return out[:n]
    raise LeanmlError(f"cannot build calibration inputs for model {handle.name!r} from data {data.name!r}")


@torch.no_grad()
def run_batches(handle: ModelHandle, batches: list) -> None:
    for batch in batches:
        handle.call(batch)
