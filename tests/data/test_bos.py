"""Windows follow the model's tokenizer: BOS + (W-1) text tokens when it adds a BOS, today's slicing when not."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from leanml.calibrate.batches import calibration_batches
from leanml.data import TextCorpus, TextRecords
from leanml.data.tokens import bos_id, token_windows
from leanml.distill.api import training_items
from leanml.distill.config import Distill
from leanml.measure.quality import EVAL_WINDOW, evaluate, lm_windows
from leanml.measure.record import Measurement
from leanml.models import ModelHandle
from leanml.models.inputs import DEFAULT_TEXT, text_prompt
from leanml.prune.finetune import training_batches
from tests.families import VOCAB, tiny_model

SPECIALS = ["<unk>", "<s>", "</s>"]
UNK, BOS, EOS = 0, 1, 2


def _words() -> list[str]:
    words = sorted({w for w in DEFAULT_TEXT.replace(",", " ").replace(".", " ").lower().split()})
    return words[: VOCAB - len(SPECIALS)]


def _tokenizer(kind: str):
    """A real word-level tokenizer (vocabulary <= 96): ``bos`` adds "<s>" at the start (Llama 3, Gemma),
    ``eos`` adds "</s>" at the end only, ``plain`` adds nothing though it names a BOS (SmolLM2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + _words())}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bos":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    elif kind == "eos":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = _words()
    return " ".join(rng.choice(words) for _ in range(n_words))


def _old_windows(ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """The slicing used before BOS was followed (the reference for tokenizers that add nothing)."""
    out = [ids[i : i + window] for i in range(0, len(ids), window)]
    return [w for w in out if len(w) >= 2]


@pytest.fixture(scope="module")
def corpus():
    return TextCorpus(name="words", text=_text(2400), eval_tokens=1100)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")  # RoPE: 512-token windows run past its 128 positions


def _handle(module, kind: str) -> ModelHandle:
    return ModelHandle(module=module, task="causal-lm", name=f"tiny-llama-{kind}", tokenizer=_tokenizer(kind))


def test_bos_id_detects_a_bos_added_at_the_start_only():
    assert bos_id(_tokenizer("bos")) == BOS
    assert bos_id(_tokenizer("plain")) is None  # names a BOS but does not add it
    assert bos_id(_tokenizer("eos")) is None  # adds only an EOS at the end
    assert bos_id(None) is None


@pytest.mark.parametrize("window", [2, 7, 64, 512])
@pytest.mark.parametrize("split", ["eval", "calib", "train"])
def test_bos_windows_start_with_bos_and_cover_the_text_contiguously(corpus, split, window):
    tok = _tokenizer("bos")
    lo, hi = corpus.split_range(tok, split)
    text = corpus.tokens(tok)[lo:hi]
    assert BOS not in text.tolist()  # text tokens carry no special token
    wins = corpus.windows(tok, split, window)
    assert all(int(w[0]) == BOS and BOS not in w[1:].tolist() for w in wins)
    assert all(len(w) == window for w in wins[:-1]) and 2 <= len(wins[-1]) <= window
    assert torch.equal(torch.cat([w[1:] for w in wins]), text)  # contiguous, non-overlapping, complete
    assert sum(len(w) - 1 for w in wins) == hi - lo  # W-1 predictions each: every text token once


@pytest.mark.parametrize("kind", ["plain", "eos"])
@pytest.mark.parametrize("window", [2, 7, 64, 512])
@pytest.mark.parametrize("split", ["eval", "calib", "train"])
def test_no_bos_windows_are_exactly_the_old_slicing(corpus, kind, split, window):
    tok = _tokenizer(kind)
    lo, hi = corpus.split_range(tok, split)
    ids = torch.tensor(tok(corpus.text, add_special_tokens=False)["input_ids"], dtype=torch.long)[lo:hi]
    old, new = _old_windows(ids, window), corpus.windows(tok, split, window)
    assert len(new) == len(old) and all(torch.equal(a, b) for a, b in zip(old, new, strict=True))


def test_token_windows_tail_and_limits():
    ids = torch.arange(10, 20)
    assert [w.tolist() for w in token_windows(ids, 4)] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
    assert [w.tolist() for w in token_windows(ids, 4, bos=1)] == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18], [1, 19]]
    assert [w.tolist() for w in token_windows(torch.arange(9), 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert token_windows(torch.arange(7), 3)[-1].tolist() == [3, 4, 5]  # a 1-token tail has no prediction
    with pytest.raises(Exception, match="no room"):
        token_windows(ids, 1, bos=1)


def _brute_force_perplexity(module, windows: list[torch.Tensor]) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = module(ids[None]).logits[0].float()
            total += float(F.cross_entropy(logits[:-1], ids[1:], reduction="sum"))  # targets: positions 1..W-1
            count += len(ids) - 1
    return math.exp(total / count), count


def test_perplexity_with_bos_scores_w_minus_1_predictions_per_window(llama, corpus):
    handle = _handle(llama, "bos")
    q = evaluate(handle, corpus)
    lo, hi = corpus.split_range(handle.tokenizer, "eval")
    text = corpus.tokens(handle.tokenizer)[lo:hi]
    step = EVAL_WINDOW - 1
    windows = [torch.cat([torch.tensor([BOS]), text[i : i + step]]) for i in range(0, len(text), step)]
    expected, count = _brute_force_perplexity(llama, windows)
    assert q["bos"] is True and math.isfinite(q["value"])
    assert q["n_items"] == len(windows) == 3 and q["n_tokens"] == count == hi - lo == 1100
    assert q["value"] == pytest.approx(expected, rel=1e-5)


def test_perplexity_without_bos_keeps_todays_figure(llama, corpus):
    handle = _handle(llama, "plain")
    q = evaluate(handle, corpus)
    lo, hi = corpus.split_range(handle.tokenizer, "eval")
    ids = torch.tensor(handle.tokenizer(corpus.text, add_special_tokens=False)["input_ids"])[lo:hi]
    expected, count = _brute_force_perplexity(llama, _old_windows(ids, EVAL_WINDOW))
    assert q["bos"] is False and q["n_tokens"] == count == 1100 - 3
    assert q["value"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["bos", "plain"])
def test_measurement_records_bos(llama, corpus, kind):
    from leanml.measure.profile import profile

    m = profile(_handle(llama, kind), data=corpus, threads=1, new_tokens=2, repeats=1, seq_len=16)
    assert m.quality["metric"] == "perplexity" and m.quality["bos"] is (kind == "bos")
    back = Measurement.from_dict(json.loads(m.to_json()))
    assert back.quality["bos"] is (kind == "bos")
    old = json.loads(m.to_json())
    del old["quality"]["bos"]  # a record written before BOS was recorded still loads
    assert "bos" not in Measurement.from_dict(old).quality


def test_record_windows_start_with_bos(llama):
    handle = _handle(llama, "bos")
    data = TextRecords(name="recs", texts=[_text(n, seed=n) for n in (1, 5, 600, 40)], eval_fraction=1.0)
    wins = lm_windows(handle, data)
    assert len(wins) == 4 and all(int(w[0]) == BOS and 2 <= len(w) <= EVAL_WINDOW for w in wins)
    plain = _handle(llama, "plain")
    old = [plain.tokenizer(t, add_special_tokens=False)["input_ids"][:EVAL_WINDOW] for t in data.documents("eval")]
    old = [ids for ids in old if len(ids) >= 2]  # the 1-word text has no prediction without BOS
    assert [w.tolist() for w in lm_windows(plain, data)] == old and len(old) == 3


def test_calibration_training_and_distillation_windows_start_with_bos(llama, corpus):
    handle = _handle(llama, "bos")
    calib = calibration_batches(handle, corpus, n=4, window=32)
    assert len(calib) == 4 and all(b["input_ids"].shape == (1, 32) and int(b["input_ids"][0, 0]) == BOS for b in calib)
    batches = training_batches(handle, corpus, batch_size=4, window=32, seed=0)
    assert batches and all(b["input_ids"].shape == (4, 32) and (b["input_ids"][:, 0] == BOS).all() for b in batches)
    items = training_items(handle, corpus, Distill(window=32, batch_size=4))
    assert items.tokens.shape[1] == 32 and (items.tokens[:, 0] == BOS).all()
    plain = _handle(llama, "plain")
    old = _old_windows(corpus.tokens(plain.tokenizer)[slice(*corpus.split_range(plain.tokenizer, "calib"))], 32)[:4]
    assert all(torch.equal(b["input_ids"][0], w) for b, w in zip(calibration_batches(plain, corpus, 4, 32), old, strict=True))


def test_text_prompt_follows_the_tokenizer():
    bos, plain = _tokenizer("bos"), _tokenizer("plain")
    p = text_prompt(bos, 40)
    assert p.shape == (1, 40) and int(p[0, 0]) == BOS and BOS not in p[0, 1:].tolist()
    ids: list[int] = []
    while len(ids) < 40:
        ids.extend(plain(DEFAULT_TEXT, add_special_tokens=False)["input_ids"])
    assert text_prompt(plain, 40)[0].tolist() == ids[:40]
    assert text_prompt(bos, 1).shape == (1, 1)


def test_a_new_tokenizer_at_a_reused_address_is_not_given_another_ones_windows(corpus):
    # Tokenizers made and dropped one after another often get the same id(); the corpus' cache must not mix them.
    for i in range(12):
        kind = ("bos", "plain")[i % 2]
        wins = corpus.windows(_tokenizer(kind), "eval", 64)
        assert (int(wins[0][0]) == BOS) is (kind == "bos") and len(wins[0]) == 64
