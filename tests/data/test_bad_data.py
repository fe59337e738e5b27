"""Hostile data files: binary bytes as text, other encodings, unreadable paths, records with holes."""

from __future__ import annotations

import json
import os
import random

import pytest

from leanml.data import SimilarityPairs, TextCorpus, TextRecords, load_data, sources
from leanml.errors import LeanmlError

SENTENCE = "The café on the corner serves crème brûlée and naïve little pâtés every day.\n"


def random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def refused(spec, match: str) -> str:
    with pytest.raises(LeanmlError, match=match) as info:
        load_data(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", ["x.txt", "x.jsonl", "x.csv", "x.md"])
def test_random_bytes_are_not_text(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(random_bytes())
    message = refused(path, r"is not text: \d+% of its characters are control or undecodable bytes")
    assert f"'{path}'" in message and "at most 5% accepted" in message


def test_a_binary_file_in_a_folder_is_named(tmp_path):
    (tmp_path / "a.txt").write_text(SENTENCE * 5)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "blob.txt").write_bytes(random_bytes(seed=3))
    message = refused(tmp_path, "is not text")
    assert "blob.txt" in message and "a.txt" not in message


def test_nul_bytes_that_decode_as_utf8_are_not_text(tmp_path):
    # NUL is valid UTF-8, so this decodes; it is still not text (UTF-16 without a byte-order mark looks like this)
    (tmp_path / "z.txt").write_bytes(b"h\0e\0l\0l\0o\0 \0w\0o\0r\0l\0d\0" * 20)
    refused(tmp_path / "z.txt", r"is not text: 50% of its characters")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_latin1_files_are_read_as_latin1(tmp_path, suffix):
    path = tmp_path / f"l{suffix}"
    if suffix == ".txt":
        body = SENTENCE * 4
    elif suffix == ".jsonl":
        body = "\n".join(json.dumps({"text": f"{i} {SENTENCE.strip()}", "label": i % 2}, ensure_ascii=False) for i in range(6))
    else:
        body = "text,label\n" + "".join(f"{i} {SENTENCE.strip()},{i % 2}\n" for i in range(6))
    raw = body.encode("latin-1")
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # the file really is not UTF-8
    path.write_bytes(raw)
    data = load_data(path)
    text = data.text if isinstance(data, TextCorpus) else " ".join(data.texts)
    assert "crème brûlée" in text and "Ã" not in text
    if suffix != ".txt":
        assert isinstance(data, TextRecords) and data.labels == [0, 1] * 3


def test_utf8_wins_over_latin1_and_utf16_with_a_bom_is_read(tmp_path):
    (tmp_path / "u.txt").write_bytes(SENTENCE.encode("utf-8"))
    assert load_data(tmp_path / "u.txt").text == SENTENCE  # not mojibake ("cafÃ©")
    (tmp_path / "w.txt").write_bytes(SENTENCE.encode("utf-16"))  # with a byte-order mark
    assert load_data(tmp_path / "w.txt").text == SENTENCE
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbf" + SENTENCE.encode("utf-8"))
    assert load_data(tmp_path / "b.txt").text == SENTENCE  # the UTF-8 byte-order mark is dropped


def test_cp1252_quotes_and_mostly_utf8_text_are_accepted():
    cp1252 = ("He said \u201cyes\u201d \u2013 and left. " * 20).encode("cp1252")
    assert sources.decode_text(cp1252, "q.txt").startswith("He said \u201cyes\u201d \u2013 and left.")
    mostly = ("Привет, мир. " * 50).encode("utf-8") + b"\xff"  # one stray byte in Cyrillic UTF-8
    text = sources.decode_text(mostly, "r.txt")
    assert text.startswith("Привет") and text.count("\ufffd") == 1


def test_the_threshold_is_between_real_text_and_random_bytes():
    assert sources.bad_fraction("plain text\twith tabs\r\nand newlines\f and \x1b[1mbold\x1b[0m") == 0.0
    assert sources.bad_fraction(random_bytes().decode("latin-1")) > 4 * sources.MAX_BAD_FRACTION
    assert sources.bad_fraction("ab\x00\x01") == 0.5
    for seed in range(50):  # even short random files are refused
        with pytest.raises(LeanmlError, match="is not text"):
            sources.decode_text(random_bytes(256, seed), "r.bin")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_chmod_000_file_is_refused(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text(SENTENCE)
    path.chmod(0)
    try:
        refused(path, "locked.txt' cannot be read: permission denied")
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("name", ["locked.txt", "locked.jsonl", "locked.csv", "locked.pt"])
def test_unreadable_file_is_refused_naming_it(tmp_path, monkeypatch, name):
    # the same as chmod 000 for a user that is not root (these tests may run as root)
    path = tmp_path / name
    path.write_text(SENTENCE)

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(sources, "open", denied, raising=False)
    refused(path, f"data file '{path}' cannot be read: permission denied")


def test_a_folder_where_a_file_was_expected(tmp_path, monkeypatch):
    (tmp_path / "rows.jsonl").mkdir()
    refused(tmp_path / "rows.jsonl", "'.*rows.jsonl' is a folder, not a .jsonl file")
    (tmp_path / "x.txt").write_text(SENTENCE)

    def is_dir(file, *args, **kwargs):
        raise IsADirectoryError(21, "Is a directory", str(file))

    monkeypatch.setattr(sources, "open", is_dir, raising=False)
    refused(tmp_path / "x.txt", "is a folder where a file was expected")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_chmod_000_folder_is_refused(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(SENTENCE)
    folder.chmod(0)
    try:
        refused(folder, "cannot be read: permission denied")
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize(
    "name, body, message",
    [
        ("gap.jsonl", '{"text": "a", "label": 1}\n{"label": 0}\n', "line 2 has no 'text' field"),
        ("nolabel.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "line 2 has no 'label' field"),
        ("pairs.csv", "text_a,text_b,score\nx,y,0.5\nx\n", "row 2 has no 'text_b' field"),
        ("nan.csv", "text_a,text_b,score\nx,y,0.5\ny,z,nan\n", "score 'nan' is not a finite number"),
        ("word.jsonl", '{"a": "x", "b": "y", "score": "high"}\n', "score 'high' is not a finite number"),
    ],
)
def test_records_with_holes(tmp_path, name, body, message):
    (tmp_path / name).write_text(body)
    refused(tmp_path / name, message)


def test_good_pairs_still_load(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"a": f"t{i}", "b": f"t{i + 1}", "score": i}) for i in range(6)))
    data = load_data(tmp_path / "p.jsonl")
    assert isinstance(data, SimilarityPairs) and len(data.pairs) == 6 and data.scores[-1] == 5.0


def test_tensor_file_with_a_scalar_is_refused(tmp_path):
    import torch

    torch.save(torch.tensor(3.0), tmp_path / "s.pt")
    refused(tmp_path / "s.pt", "holds a single number")
