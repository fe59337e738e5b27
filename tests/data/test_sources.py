"""Data sets: explicit, seeded, non-overlapping splits; clear errors for bad files."""

from __future__ import annotations

import json

import pytest
import torch

from leanml.data import SimilarityPairs, TensorData, TextCorpus, TextRecords, load_data, seeded_split
from leanml.errors import LeanmlError
from tests.conftest import CharTokenizer


def test_seeded_split_is_disjoint_covering_and_repeatable():
    calib, evals = seeded_split(101, 0.3, seed=7)
    assert not set(calib) & set(evals) and sorted(calib + evals) == list(range(101))
    assert len(evals) == 30
    assert seeded_split(101, 0.3, seed=7) == (calib, evals)
    assert seeded_split(101, 0.3, seed=8) != (calib, evals)


def test_text_corpus_splits_by_token_position(tiny_text):
    tok = CharTokenizer()
    ids = tiny_text.tokens(tok)
    n = len(ids)
    check = min(600 // 2, (n - 1200) // 10)  # the last tenth of what follows calib_start, at most eval_tokens // 2
    assert tiny_text.split_range(tok, "eval") == (0, 600)
    assert tiny_text.split_range(tok, "select") == (600, 1200)  # up to calib_start
    assert tiny_text.split_range(tok, "calib") == (1200, n - check)
    assert tiny_text.split_range(tok, "check") == (n - check, n)
    assert tiny_text.split_range(tok, "test") == tiny_text.split_range(tok, "eval")
    windows = tiny_text.windows(tok, "eval", window=128)
    assert [len(w) for w in windows] == [128] * 4 + [88]
    torch.testing.assert_close(torch.cat(windows), ids[:600])
    calib = torch.cat(tiny_text.windows(tok, "calib", window=128))
    torch.testing.assert_close(calib, ids[1200 : n - check])


def test_text_file_folder_jsonl_csv(tmp_path):
    (tmp_path / "a.txt").write_text("first file text " * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second file text " * 10)
    folder = load_data(tmp_path)
    assert isinstance(folder, TextCorpus) and "first" in folder.text and "second" in folder.text

    rows = [{"text": f"item {i}", "label": "pos" if i % 2 else "neg"} for i in range(10)]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rec = load_data(tmp_path / "r.jsonl")
    assert isinstance(rec, TextRecords) and rec.labels == [0, 1] * 5  # labels are numbered in sorted order: neg=0, pos=1
    texts, labels = rec.labelled("eval")
    assert len(texts) == 5 and not set(rec.indices("eval")) & set(rec.indices("calib"))

    (tmp_path / "p.csv").write_text("text_a,text_b,score\nx,y,0.5\ny,z,1.0\n")
    pairs = load_data(tmp_path / "p.csv")
    assert isinstance(pairs, SimilarityPairs) and pairs.texts == ["x", "y", "z"] and pairs.pairs == [(0, 1), (1, 2)]


def test_tensor_files(tmp_path):
    torch.save({"x": torch.randn(10, 3), "y": torch.arange(10)}, tmp_path / "d.pt")
    data = load_data(tmp_path / "d.pt")
    x, y = data.tensors("eval")
    assert isinstance(data, TensorData) and x.shape == (2, 3) and len(y) == 2
    with pytest.raises(LeanmlError, match="2 labels"):
        TensorData(name="bad", x=torch.randn(3, 1), y=torch.arange(2))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "", "is empty"),
        ("blank.txt", "   \n\n", "holds no text"),
        ("bad.jsonl", "{not json}", "line 1 is not valid JSON"),
        ("fields.jsonl", '{"foo": 1}', "expected one of text"),
        ("data.xyz", "abc", "unrecognised format '.xyz'"),
    ],
)
def test_bad_data_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(LeanmlError, match=message) as info:
        load_data(tmp_path / name)
    assert "\n" not in str(info.value)


def test_unknown_name_lists_accepted():
    with pytest.raises(LeanmlError, match="unknown data name 'wiki'.*lee, lee-sim, digits, enwiki"):
        load_data("wiki")


def test_lee_and_lee_sim_builtins():
    lee = load_data("lee")
    assert lee.eval_tokens == 8192 and lee.calib_start == 16384
    sim = load_data("lee-sim")
    assert len(sim.texts) == 50 and len(sim.pairs) == 1225
    # the human scores are symmetrised from the upper triangle and the background texts are disjoint
    assert all(0.0 <= s <= 1.0 for s in sim.scores)
    assert not set(sim.texts) & set(sim.calib_texts)


def test_digits_split():
    d = load_data("digits")
    x_eval, y_eval = d.tensors("eval")
    x_cal, _ = d.tensors("calib")
    assert x_eval.shape[1:] == (1, 8, 8) and len(x_eval) + len(x_cal) + len(d.indices("select")) + len(d.indices("check")) == 1797
    assert float(x_eval.max()) <= 1.0 and len(set(y_eval.tolist())) == 10


def test_enwiki_is_plain_text():
    wiki = load_data("enwiki")
    assert len(wiki.text) > 1_000_000
    for markup in ("[[", "]]", "{{", "'''", "<ref"):
        assert markup not in wiki.text
    assert wiki.text.startswith("Anarchism is a political philosophy")
