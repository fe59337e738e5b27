"""Resolve a data spec (a built-in name or a path) into a dataset.

Built-in names: ``lee`` (Lee news corpus, for perplexity), ``lee-sim`` (Lee 50-document human
similarity benchmark), ``digits`` (scikit-learn's 8×8 digits), ``enwiki`` (plain text cleaned from
the Wikipedia sample in gensim's test data, for calibration and training).
Files: ``.txt`` (or a folder of them), ``.jsonl``, ``.csv``, ``.pt``/``.pth``/``.npz`` tensors.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import importlib.util
import io
import json
import math
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
FILE_SUFFIXES = (".jsonl", ".csv", ".pt", ".pth", ".npz")
# A text file may hold at most this share of control characters (other than tab, newline, vertical
# tab, form feed, carriage return and escape) or undecodable bytes, in the best of its readings
# (UTF-8, cp1252, latin-1). Real text in any of them stays near 0 %; random or compressed bytes give
# ≈ 10 % (as cp1252) to ≈ 23 % (as latin-1), and executables, images and UTF-16 without a BOM more.
MAX_BAD_FRACTION = 0.05
_BAD_CHARS = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f-\x9f\ufffd]")


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
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. a parent folder that cannot be searched
        raise LeanmlError(f"data path {text!r} cannot be read: {_why(exc)}") from None
    if not exists:
        what = (
            f"data path {text!r} does not exist"
            if (os.sep in text or path.suffix)
            else (f"unknown data name {text!r} (and no such file or folder)")
        )
        raise LeanmlError(f"{what}; accepted: {ACCEPTED}")
    suffix = path.suffix.lower()
    if path.is_dir():
        if suffix in FILE_SUFFIXES:
            raise LeanmlError(f"data path {text!r} is a folder, not a {suffix} file; accepted: {ACCEPTED}")
        if not os.access(path, os.R_OK | os.X_OK):
            raise LeanmlError(f"data folder {text!r} cannot be read: permission denied")
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise LeanmlError(f"data folder {text!r} holds no .txt files; accepted: {ACCEPTED}")
        body = "\n\n".join(_read_text(p) for p in files)
        return _corpus(path.name, body, text)
    if not path.is_file():
        raise LeanmlError(f"data path {text!r} is not a regular file or folder; accepted: {ACCEPTED}")
    if path.stat().st_size == 0:
        raise LeanmlError(f"data file {text!r} is empty")
    if suffix in (".txt", ".text", ".cor", ".md"):
        return _corpus(path.stem, _read_text(path), text)
    if suffix == ".jsonl":
        return _records(path, _read_jsonl(path), seed)
    if suffix == ".csv":
        return _records(path, _read_csv(path), seed)
    if suffix in (".pt", ".pth", ".npz"):
        _read_bytes(path, probe=True)  # an unreadable file is named as such, not as "not tensors"
        return _tensors(path, seed)
    raise LeanmlError(f"data file {text!r} has an unrecognised format {suffix or '(no suffix)'!r}; accepted: {ACCEPTED}")


def _why(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def _read_bytes(path: Path, probe: bool = False) -> bytes:
    """The file's bytes (only its first byte when ``probe``); an unreadable file is a LeanmlError."""
    try:
        with open(path, "rb") as fh:
            return fh.read(1) if probe else fh.read()
    except IsADirectoryError:
        raise LeanmlError(f"data path '{path}' is a folder where a file was expected") from None
    except OSError as exc:
        raise LeanmlError(f"data file '{path}' cannot be read: {_why(exc)}") from None


def bad_fraction(text: str) -> float:
    """Share of ``text`` that is control characters (bar tab, newlines, form feed, escape) or U+FFFD."""
    return (len(text) - len(_BAD_CHARS.sub("", text))) / len(text) if text else 0.0


def decode_text(raw: bytes, where: str) -> str:
    """``raw`` as text: UTF-8 (or UTF-16 with a byte-order mark) when it decodes, or when most of its
    non-ASCII bytes are well-formed UTF-8 (the rest become U+FFFD); otherwise whichever of cp1252,
    latin-1 and UTF-8-with-replacements has the fewest bad characters (in that order on a tie).
    Bytes that do not read as text in any of them (:data:`MAX_BAD_FRACTION`) are a LeanmlError."""
    text = None
    if raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        try:
            text = raw.decode("utf-16")
        except UnicodeDecodeError:
            text = None
    if text is None:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            utf8 = raw.decode("utf-8", errors="replace")
            invalid = utf8.count("\ufffd")
            valid = len(utf8) - len(utf8.encode("ascii", "ignore")) - invalid  # well-formed non-ASCII characters
            if valid > invalid:  # UTF-8 with a few bad bytes (a latin-1 text has almost no valid sequences)
                text = utf8
            else:
                readings = []
                with contextlib.suppress(UnicodeDecodeError):  # latin-1 with curly quotes and dashes for C1 codes
                    readings.append(raw.decode("cp1252"))
                readings += [raw.decode("latin-1"), utf8]
                text = min(readings, key=bad_fraction)  # the first of equally good readings
    bad = bad_fraction(text)
    if bad > MAX_BAD_FRACTION:
        raise LeanmlError(
            f"data file {where!r} is not text: {bad:.0%} of its characters are control or undecodable bytes "
            f"(at most {MAX_BAD_FRACTION:.0%} accepted; text must be UTF-8, UTF-16 with a byte-order mark, latin-1 or cp1252)"
        )
    return text


def _read_text(path: Path) -> str:
    return decode_text(_read_bytes(path), str(path))


def _corpus(name: str, body: str, where: str) -> TextCorpus:
    if not body.strip():
        raise LeanmlError(f"data {where!r} holds no text")
    return TextCorpus(name=name, text=body)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
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


def _read_csv(path: Path) -> list[dict]:
    try:
        return list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
    except csv.Error as exc:
        raise LeanmlError(f"data file '{path}' is not valid CSV: {exc}") from None


def _missing(path: Path, rows: list[dict], keys: tuple[str, ...]) -> None:
    """Refuse a record that lacks a field the first record has (JSON lines: line N; CSV: row N)."""
    unit = "line" if path.suffix.lower() == ".jsonl" else "row"
    for number, row in enumerate(rows, 1):
        for key in keys:
            if row.get(key) is None:
                raise LeanmlError(f"data file '{path}' {unit} {number} has no {key!r} field (the first {unit} has it)")


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
    _missing(path, rows, (text_key, "label") if "label" in keys else (text_key,))
    texts = [str(r[text_key]) for r in rows]
    labels = None
    if "label" in keys:
        raw = [r["label"] for r in rows]
        names = sorted({str(v) for v in raw})
        numeric = all(str(v).lstrip("-").isdigit() for v in raw)
        labels = [int(v) for v in raw] if numeric else [names.index(str(v)) for v in raw]
    return TextRecords(name=path.stem, texts=texts, labels=labels, seed=seed)


def _pairs(path: Path, rows: list[dict], a: str, b: str) -> SimilarityPairs:
    _missing(path, rows, (a, b, "score"))
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
            score = float(r["score"])
        except (TypeError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            raise LeanmlError(f"data file '{path}': score {r['score']!r} is not a finite number")
        scores.append(score)
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
    if isinstance(obj, dict) and "x" in obj:
        obj = (obj["x"], obj["y"]) if obj.get("y") is not None else (obj["x"],)
    if isinstance(obj, torch.Tensor):
        obj = (obj,)
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        if obj[0].ndim == 0:
            raise LeanmlError(f"data file '{path}' holds a single number; x must have one row per item")
        return TensorData(name=path.stem, x=obj[0], y=obj[1] if len(obj) > 1 else None, seed=seed)
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
