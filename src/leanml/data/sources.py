"""Resolve a data spec (a built-in name or a path) into a dataset.

Built-in names: ``lee`` (Lee news corpus, for perplexity), ``lee-sim`` (Lee 50-document human
similarity benchmark), ``digits`` (scikit-learn's 8×8 digits), ``enwiki`` (plain text cleaned from
the Wikipedia sample in gensim's test data, for calibration and training).
Files: ``.txt`` (or a folder of them), ``.jsonl``, ``.csv``, ``.pt``/``.pth``/``.npz`` tensors.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import LeanmlError
from .datasets import Dataset, SimilarityPairs, TensorData, TextCorpus, TextRecords

BUILTIN_DATA = ("lee", "lee-sim", "digits", "enwiki")
ACCEPTED = (
    f"a built-in name ({', '.join(BUILTIN_DATA)}), a .txt file or folder of them, a .jsonl or .csv file "
    "(text with optional label, or text_a/text_b/score pairs), or a .pt/.pth/.npz tensor file"
)
TEXT_KEYS = ("text", "sentence", "content", "document")
PAIR_KEYS = (("text_a", "text_b"), ("sentence1", "sentence2"), ("a", "b"))


def gensim_data_dir() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise LeanmlError("the built-in data sets need the package gensim==4.4.0: pip install gensim==4.4.0")
    return Path(spec.origin).parent / "test" / "test_data"


def load_data(spec: str | os.PathLike | Dataset, seed: int = 0) -> Dataset:
    """Load ``spec``: a built-in name, a path, or an already built dataset (returned as is)."""
    if isinstance(spec, (TextCorpus, TextRecords, SimilarityPairs, TensorData)):
        return spec
    text = str(spec)
    if text == "lee":
        return lee_corpus()
    if text == "lee-sim":
        return lee_similarity()
    if text == "digits":
        return digits(seed)
    if text == "enwiki":
        return enwiki()
    path = Path(text).expanduser()
    if not path.exists():
        what = (
            f"data path {text!r} does not exist"
            if (os.sep in text or path.suffix)
            else (f"unknown data name {text!r} (and no such file or folder)")
        )
        raise LeanmlError(f"{what}; accepted: {ACCEPTED}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise LeanmlError(f"data folder {text!r} holds no .txt files; accepted: {ACCEPTED}")
        body = "\n\n".join(_read_text(p) for p in files)
        return _corpus(path.name, body, text)
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise LeanmlError(f"data file {text!r} is empty")
    if suffix in (".txt", ".text", ".cor", ".md"):
        return _corpus(path.stem, _read_text(path), text)
    if suffix == ".jsonl":
        return _records(path, _read_jsonl(path), seed)
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            return _records(path, list(csv.DictReader(fh)), seed)
    if suffix in (".pt", ".pth", ".npz"):
        return _tensors(path, seed)
    raise LeanmlError(f"data file {text!r} has an unrecognised format {suffix or '(no suffix)'!r}; accepted: {ACCEPTED}")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _corpus(name: str, body: str, where: str) -> TextCorpus:
    if not body.strip():
        raise LeanmlError(f"data {where!r} holds no text")
    return TextCorpus(name=name, text=body)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise LeanmlError(f"data file '{path}' line {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise LeanmlError(f"data file '{path}' line {number} is not a JSON object")
        rows.append(row)
    return rows


def _records(path: Path, rows: list[dict], seed: int) -> Dataset:
    if not rows:
        raise LeanmlError(f"data file '{path}' holds no records")
    keys = set(rows[0])
    for a, b in PAIR_KEYS:
        if {a, b} <= keys and "score" in keys:
            return _pairs(path, rows, a, b)
    text_key = next((k for k in TEXT_KEYS if k in keys), None)
    if text_key is None:
        raise LeanmlError(
            f"data file '{path}' has fields {sorted(keys)}; expected one of {', '.join(TEXT_KEYS)} "
            "(with optional label) or text_a/text_b/score"
        )
    texts = [str(r[text_key]) for r in rows]
    labels = None
    if "label" in keys:
        raw = [r["label"] for r in rows]
        names = sorted({str(v) for v in raw})
        numeric = all(str(v).lstrip("-").isdigit() for v in raw)
        labels = [int(v) for v in raw] if numeric else [names.index(str(v)) for v in raw]
    return TextRecords(name=path.stem, texts=texts, labels=labels, seed=seed)


def _pairs(path: Path, rows: list[dict], a: str, b: str) -> SimilarityPairs:
    texts: list[str] = []
    index: dict[str, int] = {}
    pairs, scores = [], []
    for r in rows:
        ij = []
        for key in (a, b):
            t = str(r[key])
            if t not in index:
                index[t] = len(texts)
                texts.append(t)
            ij.append(index[t])
        pairs.append((ij[0], ij[1]))
        try:
            scores.append(float(r["score"]))
        except (TypeError, ValueError):
            raise LeanmlError(f"data file '{path}': score {r['score']!r} is not a number") from None
    return SimilarityPairs(name=path.stem, texts=texts, pairs=pairs, scores=scores)


def _tensors(path: Path, seed: int) -> TensorData:
    try:
        if path.suffix.lower() == ".npz":
            z = np.load(path)
            obj = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any loading failure is the file's fault
        raise LeanmlError(f"data file '{path}' could not be read as tensors ({type(exc).__name__})") from None
    if isinstance(obj, torch.Tensor):
        return TensorData(name=path.stem, x=obj, seed=seed)
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return TensorData(name=path.stem, x=obj[0], y=obj[1] if len(obj) > 1 else None, seed=seed)
    if isinstance(obj, dict) and "x" in obj:
        return TensorData(name=path.stem, x=obj["x"], y=obj.get("y"), seed=seed)
    raise LeanmlError(f"data file '{path}' must hold a tensor, a tuple (x, y) or a dict with keys x and y")


def lee_corpus() -> TextCorpus:
    """The Lee news corpus: evaluation = first 8,192 tokens, calibration = tokens after 16,384."""
    body = (gensim_data_dir() / "lee_background.cor").read_text(encoding="latin-1")
    return TextCorpus(name="lee", text=body, eval_tokens=8192, calib_start=16384)


def lee_similarity() -> SimilarityPairs:
    """Lee's 50 documents with 50×50 human similarity scores (upper triangle, symmetrised).

    The evaluation split is the 1,225 distinct document pairs; the calibration texts are the Lee
    background articles, which do not contain any of the 50 documents.
    """
    root = gensim_data_dir()
    docs = [d for d in (root / "lee.cor").read_text(encoding="latin-1").splitlines() if d.strip()]
    sims = np.loadtxt(root / "similarities0-1.txt")
    sims = np.triu(sims) + np.triu(sims, 1).T
    pairs = [(i, j) for i in range(len(docs)) for j in range(i + 1, len(docs))]
    scores = [float(sims[i, j]) for i, j in pairs]
    background = [d for d in (root / "lee_background.cor").read_text(encoding="latin-1").splitlines() if d.strip()]
    return SimilarityPairs(name="lee-sim", texts=docs, pairs=pairs, scores=scores, calib_texts=background)


def digits(seed: int = 0) -> TensorData:
    """scikit-learn's 1,797 handwritten digits as (N, 1, 8, 8) floats in [0, 1], 20% seeded evaluation split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    return TensorData(name="digits", x=x, y=torch.tensor(d.target, dtype=torch.long), seed=seed)


_WIKI_MARKUP = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)


def clean_wiki(markup: str) -> str:
    """Plain text from wiki markup: gensim's ``filter_wiki``, then bold/italic quotes, headings, blank runs."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = _WIKI_MARKUP.sub("", filter_wiki(markup))
    text = _HEADING.sub(r"\1", text)
    lines = [ln.strip() for ln in text.splitlines()]
    paragraphs = [ln for ln in lines if len(ln.split()) >= 4]  # drop list debris and stray fragments
    return "\n".join(paragraphs)


def enwiki() -> TextCorpus:
    """206 Wikipedia pages from gensim's test data, cleaned to plain text (redirects dropped).

    Evaluation = the first 8,192 tokens; calibration/training = everything after token 16,384.
    """
    from ..models.loaders import cache_dir

    cached = cache_dir() / "data" / "enwiki.txt"
    if not cached.exists():
        from gensim.corpora.wikicorpus import extract_pages

        source = gensim_data_dir() / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
        with bz2.open(source) as fh:
            pages = [clean_wiki(text) for _, text, _ in extract_pages(fh) if not text.lower().startswith("#redirect")]
        body = "\n\n".join(p for p in pages if p)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, cached)
    return TextCorpus(name="enwiki", text=cached.read_text(encoding="utf-8"), eval_tokens=8192, calib_start=16384)
