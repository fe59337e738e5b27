"""The four splits of every data kind (eval/test, select, check, calib/train) are disjoint, seeded, and
leave the evaluation split what it was before the selection split existed."""

from __future__ import annotations

import itertools

import pytest

from leanml.data import SimilarityPairs, TextCorpus, TextRecords, seeded_split
from leanml.data.datasets import seeded_splits, split_pairs
from leanml.errors import LeanmlError
from tests.conftest import CharTokenizer


@pytest.mark.parametrize("n, frac", [(101, 0.3), (10, 0.5), (1797, 0.2), (5, 0.5)])
def test_seeded_splits_are_disjoint_covering_and_keep_the_eval_split(n, frac):
    parts = seeded_splits(n, frac, seed=3)
    assert sorted(itertools.chain(*parts.values())) == list(range(n))
    for a, b in itertools.combinations(parts.values(), 2):
        assert not set(a) & set(b)
    assert parts["eval"] == seeded_split(n, frac, seed=3)[1]  # profile's figures keep their meaning
    rest = n - len(parts["eval"])
    assert len(parts["select"]) == (min(len(parts["eval"]), rest // 2) if rest >= 4 else 0)
    assert parts["calib"], "calibration keeps items"
    assert seeded_splits(n, frac, seed=3) == parts and (n < 10 or seeded_splits(n, frac, seed=4) != parts)


def test_text_corpus_without_calib_start_gets_a_selection_split():
    body = " ".join(f"line {i} of a text that goes on." for i in range(200))
    corpus = TextCorpus(name="t", text=body, eval_tokens=500)
    tok = CharTokenizer()
    n = len(corpus.tokens(tok))
    ranges = [corpus.split_range(tok, s) for s in ("eval", "select", "calib", "check")]
    assert ranges[0] == (0, 500) and ranges[1] == (500, 1000)
    assert [r[1] for r in ranges[:-1]] == [r[0] for r in ranges[1:]] and ranges[-1][1] == n  # contiguous, covering
    with pytest.raises(LeanmlError, match="unknown split 'dev'; accepted: eval"):
        corpus.split_range(tok, "dev")


def test_documents_of_running_text_have_four_disjoint_splits():
    corpus = TextCorpus(name="t", text="\n".join(f"Paragraph {i}." for i in range(100)))
    parts = {s: corpus.documents(s) for s in ("eval", "select", "check", "calib")}
    assert [len(parts[s]) for s in ("eval", "select", "check", "calib")] == [25, 25, 5, 45]
    assert parts["check"] == [f"Paragraph {i}." for i in range(95, 100)]  # the tail of the calibration domain
    assert len(set(sum(parts.values(), []))) == 100


def test_records_splits_by_record():
    rec = TextRecords(name="r", texts=[f"t{i}" for i in range(40)], labels=[i % 2 for i in range(40)])
    sel, ev = set(rec.documents("select")), set(rec.documents("eval"))
    assert len(ev) == 20 and len(sel) == 10 and not sel & ev
    texts, labels = rec.labelled("select")
    assert [int(t[1:]) % 2 for t in texts] == labels


def test_pairs_of_a_complete_graph_split_by_text():
    texts = [f"doc {i}" for i in range(50)]
    pairs = [(i, j) for i in range(50) for j in range(i + 1, 50)]
    data = SimilarityPairs(name="p", texts=texts, pairs=pairs, scores=[float(i * j % 7) for i, j in pairs])
    ev, sel = data.pair_indices("eval"), data.pair_indices("select")
    assert len(ev) == len(sel) == 25 * 24 // 2  # two halves of 25 texts; pairs across them are in neither
    ev_texts = {t for k in ev for t in pairs[k]}
    sel_texts = {t for k in sel for t in pairs[k]}
    assert not ev_texts & sel_texts and len(ev_texts) == len(sel_texts) == 25
    t, p, s = data.scored("select")
    assert len(t) == 25 and len(p) == len(s) == len(sel)
    assert all(t[a] == texts[pairs[k][0]] and t[b] == texts[pairs[k][1]] for (a, b), k in zip(p, sel, strict=True))


def test_pairs_of_independent_sentences_split_by_pair():
    pairs = [(2 * i, 2 * i + 1) for i in range(30)]
    ev, sel = split_pairs(60, pairs, seed=0)
    assert len(ev) == len(sel) == 15 and not set(ev) & set(sel)  # nothing is dropped: no text is shared


def test_pairs_check_split_is_the_tail_of_the_calibration_texts():
    data = SimilarityPairs(
        name="p",
        texts=["a", "b", "c", "d"],
        pairs=[(0, 1), (2, 3)],
        scores=[0.1, 0.9],
        calib_texts=[f"bg {i}" for i in range(100)],
    )
    assert data.documents("check") == [f"bg {i}" for i in range(90, 100)]
    assert data.documents("calib") == [f"bg {i}" for i in range(90)]
    with pytest.raises(LeanmlError, match="eval and select splits, not 'calib'"):
        data.pair_indices("calib")
