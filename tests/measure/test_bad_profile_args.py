"""profile refuses what cannot be measured, with one line and before anything slow runs.

Wrong data for the task, too little data, thread counts, devices, prices and references - each refused
before the model is timed (``no_timing`` makes any timing call fail the test)."""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

from leanml.data import SimilarityPairs, TensorData, TextCorpus, TextRecords
from leanml.errors import LeanmlError
from leanml.measure import profile
from leanml.measure.hardware import get_profile
from leanml.measure.quality import (
    MIN_PERPLEXITY_TOKENS,
    check_data_for,
    check_reference,
    evaluate,
    fidelity,
    quality_notes,
)
from leanml.measure.system import check_threads
from leanml.models import ModelHandle
from tests.conftest import CharTokenizer, tiny_llama_module

PROFILE_MODULE = importlib.import_module("leanml.measure.profile")  # `leanml.measure.profile` is the function
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,'"
SENTENCES = [f"sentence {i} is about the {w} of the day." for i, w in enumerate(["sun", "rain", "wind", "snow"] * 6)]
# pairs(16) chains 17 of them: split by text, its evaluation and selection splits hold about 8 pairs each


@pytest.fixture
def no_timing(monkeypatch):
    """Any timing, FLOP count or runtime preparation fails the test: the refusal must come first."""
    import leanml.accelerate.runtimes as runtimes

    mod = PROFILE_MODULE

    def reached(*a, **k):
        raise AssertionError("a measurement started before the bad input was refused")

    for name in ("time_calls", "decode_benchmark", "count_flops", "evaluate", "fidelity"):
        monkeypatch.setattr(mod, name, reached)
    monkeypatch.setattr(runtimes, "prepare", reached)


def refused(call, match: str) -> str:
    with pytest.raises(LeanmlError, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message == " ".join(message.split())
    return message


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(LETTERS) + [f"##{c}" for c in LETTERS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab_file=str(folder / "vocab.txt"))


def tiny_bert(tokenizer, hidden: int = 32, task: str = "sentence-embedding", num_labels: int = 2, name="tiny-bert"):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    if task == "sequence-classification":
        module = BertForSequenceClassification(config).eval()
    else:
        module = BertModel(config, add_pooling_layer=False).eval()
    handle = ModelHandle(module=module, task=task, name=name, tokenizer=tokenizer, max_length=64)
    handle.example_inputs = dict(tokenizer(SENTENCES[:2], padding=True, return_tensors="pt"))
    return handle


@pytest.fixture
def encoder(bert_tokenizer):
    return tiny_bert(bert_tokenizer)


def pairs(n: int, scores=None) -> SimilarityPairs:
    texts = SENTENCES[: n + 1]
    return SimilarityPairs(
        name="sim", texts=texts, pairs=[(i, i + 1) for i in range(n)], scores=scores or [i / n for i in range(n)]
    )


def digits_like(n: int = 40) -> TensorData:
    return TensorData(name="digits", x=torch.rand(n, 1, 8, 8), y=torch.randint(0, 10, (n,)))


def mlp_handle(mlp) -> ModelHandle:
    return ModelHandle(module=mlp, task="generic", name="mlp", example_inputs=(torch.randn(4, 20),))


# --- 2. data of the wrong kind for the model's task ------------------------------------------------


def test_encoder_refuses_image_tensors(encoder, no_timing):
    message = refused(lambda: profile(encoder, data=digits_like()), "data 'digits'")
    assert "the data holds image tensors (items of shape (1, 8, 8))" in message
    assert "model 'tiny-bert' (sentence-embedding)" in message
    assert "takes text: lee, lee-sim, enwiki, a .txt file or folder, a .jsonl/.csv file" in message


@pytest.mark.parametrize(
    "data, holds",
    [(digits_like(), "image tensors"), (pairs(16), "similarity pairs")],
)
def test_causal_lm_refuses_tensors_and_pairs(tiny_llama, no_timing, data, holds):
    message = refused(lambda: profile(tiny_llama, data=data), f"cannot profile model 'tiny-llama' \\(causal-lm\\).*{holds}")
    assert "takes running text or text records: lee, enwiki" in message


def test_tensor_model_refuses_text(mlp, tiny_text, no_timing):
    refused(lambda: profile(mlp_handle(mlp), data=tiny_text), "holds running text; the model takes tensors: digits, a .pt")


def test_tensor_items_must_fit_the_example_inputs(mlp, no_timing):
    bad = TensorData(name="wide", x=torch.randn(30, 7), y=torch.zeros(30, dtype=torch.long))
    message = refused(
        lambda: profile(mlp_handle(mlp), data=bad), r"its items have shape \(7,\) \(float32\) but the model takes \(20,\)"
    )
    assert "RuntimeError" in message
    refused(lambda: profile(mlp_handle(mlp), data=digits_like()), r"items have shape \(1, 8, 8\)")


def test_other_image_sizes_pass_when_the_model_takes_them():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    handle = ModelHandle(module=net.eval(), task="image-classification", name="cnn", example_inputs=(torch.randn(2, 3, 32, 32),))
    check_data_for(handle, TensorData(name="small", x=torch.randn(10, 3, 16, 16)))  # runs one batch: fits
    refused(lambda: check_data_for(handle, TensorData(name="gray", x=torch.randn(10, 1, 16, 16))), r"shape \(1, 16, 16\)")


def test_text_model_without_tokenizer_refuses_text(tiny_text, no_timing):
    bare = ModelHandle(module=tiny_llama_module(), task="causal-lm", name="bare")
    refused(lambda: profile(bare, data=tiny_text), "the model has no tokenizer")


def test_verb_names_what_was_asked(tiny_llama):
    refused(lambda: check_data_for(tiny_llama, digits_like(), verb="compress"), "^cannot compress model 'tiny-llama'")


def test_text_without_a_quality_metric_says_so_in_the_notes(encoder, tiny_text):
    m = profile(encoder, data=tiny_text, threads=1, repeats=1)
    assert m.quality is None
    (note,) = [n for n in m.notes if n.startswith("no quality figure")]
    assert "Spearman on similarity pairs (lee-sim" in note and "data 'tiny' holds running text" in note


def test_records_for_a_causal_lm_get_a_note_and_fidelity(tiny_llama):
    records = TextRecords(name="rows", texts=SENTENCES)
    check_data_for(tiny_llama, records)
    assert evaluate(tiny_llama, records) is None
    (note,) = quality_notes(tiny_llama, records)
    assert "perplexity, which needs running text" in note and "data 'rows' holds text records" in note
    fid = fidelity(tiny_llama, tiny_llama, records)  # a window per text of the evaluation split
    assert fid["top1_agreement"] == 1.0 and fid["n_tokens"] > 0


def test_labelled_records_for_an_encoder_are_a_nearest_centroid_accuracy(encoder):
    records = TextRecords(name="rows", texts=SENTENCES, labels=[i % 2 for i in range(len(SENTENCES))])
    q = evaluate(encoder, records)  # it used to fail on the (B, T, H) output after timing
    assert q["metric"] == "accuracy" and q["method"].startswith("nearest class centroid") and q["n_items"] == 12
    assert "accuracy is over only 12 evaluation items" in quality_notes(encoder, records)[0]


def test_unlabelled_tensors_get_a_note(mlp):
    data = TensorData(name="raw", x=torch.randn(200, 20))
    assert quality_notes(mlp_handle(mlp), data) == [
        "no quality figure: model 'mlp' (generic) is scored by accuracy, which needs labels (y) with the tensors; "
        "data 'raw' holds tensors (items of shape (20,)), so only cost was measured"
    ]


# --- 3. too little data ------------------------------------------------------------------------------


def test_perplexity_refuses_a_few_tokens(tiny_llama, no_timing):
    short = TextCorpus(name="three", text="abc")
    message = refused(
        lambda: profile(tiny_llama, data=short),
        "data 'three' gives model 'tiny-llama' only 1 evaluation token \\(half of its 3 tokens\\)",
    )
    assert f"perplexity needs at least {MIN_PERPLEXITY_TOKENS}" in message and "at least 256 tokens" in message
    refused(lambda: evaluate(tiny_llama, short), "perplexity needs at least 128")


def test_perplexity_names_a_small_eval_tokens(tiny_llama, tiny_text):
    small = TextCorpus(name="capped", text=tiny_text.text, eval_tokens=100)
    refused(lambda: check_data_for(tiny_llama, small), r"only 100 evaluation tokens \(its eval_tokens=100\)")


def test_perplexity_accepts_the_minimum(tiny_llama):
    text = TextCorpus(name="enough", text="x" * (2 * MIN_PERPLEXITY_TOKENS))  # CharTokenizer: a token a character
    check_data_for(tiny_llama, text)
    assert evaluate(tiny_llama, text)["n_tokens"] == MIN_PERPLEXITY_TOKENS - 1


def test_spearman_refuses_too_few_or_equal_scores(encoder, no_timing):
    refused(lambda: profile(encoder, data=pairs(2)), "holds 2 scored pairs, 2 of them in the evaluation split")
    refused(lambda: profile(encoder, data=pairs(16, [0.5] * 16)), "every pair has the score 0.5, so Spearman is undefined")
    assert "too noisy" in quality_notes(encoder, pairs(16))[0]


@pytest.mark.parametrize(
    "data, message",
    [
        (TensorData(name="one", x=torch.randn(1, 20), y=torch.zeros(1, dtype=torch.long)), "holds 1 item; at least 2"),
        (TextRecords(name="one", texts=["only one"], labels=[0]), "holds 1 record; at least 2"),
    ],
)
def test_one_item_is_refused(mlp, bert_tokenizer, no_timing, data, message):
    handle = mlp_handle(mlp) if isinstance(data, TensorData) else tiny_bert(bert_tokenizer, task="sequence-classification")
    refused(lambda: profile(handle, data=data), message)


def test_a_small_accuracy_gets_a_note(mlp):
    (note,) = quality_notes(mlp_handle(mlp), digits_like(40))
    assert note.startswith("accuracy is over only 8 evaluation items of data 'digits', so one item moves it by 12.5%")
    assert quality_notes(mlp_handle(mlp), TensorData(name="big", x=torch.randn(200, 20), y=torch.zeros(200))) == []


# --- 4. threads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [99999, 0, -1, 2.5, True, "4", os.cpu_count() + 1])
def test_check_threads_refuses(threads):
    refused(
        lambda: check_threads(threads), f"threads {threads!r} is not accepted; give a whole number from 1 to {os.cpu_count()}"
    )


def test_check_threads_accepts_none_and_the_cpu_count():
    check_threads(None)
    check_threads(1)
    check_threads(os.cpu_count())


def test_profile_refuses_huge_threads_first(mlp, no_timing):
    refused(lambda: profile(mlp_handle(mlp), threads=99999), "threads 99999 is not accepted")


# --- 5. device -----------------------------------------------------------------------------------------


def test_unknown_device_is_refused_before_loading(monkeypatch, no_timing):
    mod = PROFILE_MODULE

    monkeypatch.setattr(mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    refused(lambda: profile("smollm2-135m", device="tpu"), "device 'tpu' is not one of auto, cpu, cuda, mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_absent_cuda_is_refused(mlp, no_timing):
    refused(lambda: profile(mlp_handle(mlp), device="cuda"), "device 'cuda' was asked for but torch sees no CUDA GPU")


def test_present_cuda_is_not_silently_ignored_by_the_torch_runtime(mlp, monkeypatch, no_timing):
    mod = PROFILE_MODULE

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for runtime in (None, "torch-compile"):
        refused(
            lambda r=runtime: profile(mlp_handle(mlp), device="cuda", runtime=r),
            "device 'cuda' is not used by the torch(-compile)? runtime: profile times torch models on the CPU only",
        )
    assert mod.check_device(mlp_handle(mlp), "torch", "auto") == [
        "device auto: cuda is present, but the torch runtime is profiled on the CPU"
    ]


def test_cpu_device_runs(mlp):
    m = profile(mlp_handle(mlp), device="cpu", threads=1, repeats=1)
    assert m.throughput_per_s > 0 and not any("device" in n for n in m.notes)


def test_onnx_session_on_other_providers_is_refused():
    pytest.importorskip("onnxruntime")
    mod = PROFILE_MODULE

    class Session:
        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    class Loaded(torch.nn.Module):
        session = Session()

    handle = ModelHandle(module=Loaded(), task="generic", name="m.onnx", runtime="onnxruntime")
    refused(lambda: mod.check_device(handle, "onnxruntime", "cpu"), "already running on CUDAExecutionProvider; device 'cpu'")
    assert mod.check_device(handle, "onnxruntime", "auto") == []


# --- 6. price ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("price", [math.inf, float("1e999"), -math.inf, math.nan, -1.0, 0, "3.6", True])
def test_bad_prices(price):
    refused(lambda: get_profile(None, price_per_hour=price), "--price-per-hour .* is not accepted; give a finite, positive")


def test_profile_refuses_infinite_price_before_loading(monkeypatch, no_timing):
    mod = PROFILE_MODULE

    monkeypatch.setattr(mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    refused(lambda: profile("smollm2-135m", price_per_hour=float("inf")), "--price-per-hour inf")
    refused(lambda: profile("smollm2-135m", price_per_hour=float("nan")), "--price-per-hour nan")


# --- 7. reference --------------------------------------------------------------------------------------


def test_reference_of_another_task(tiny_llama, tiny_text, encoder, no_timing):
    message = refused(lambda: profile(tiny_llama, data=tiny_text, reference=encoder), "do different tasks")
    assert "model 'tiny-llama' (causal-lm) and reference 'tiny-bert' (sentence-embedding)" in message


def test_reference_with_another_vocabulary(tiny_llama, tiny_text, no_timing):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    other = ModelHandle(module=LlamaForCausalLM(config).eval(), task="causal-lm", name="small-vocab", tokenizer=CharTokenizer())
    refused(lambda: profile(tiny_llama, data=tiny_text, reference=other), "have vocabularies of 128 and 64 tokens")


def test_reference_with_another_tokenizer(tiny_llama, tiny_text, no_timing):
    class Listed(CharTokenizer):
        def __init__(self, shift: int):
            self.shift = shift

        def get_vocab(self):
            return {chr(i): (i + self.shift) % 128 for i in range(128)}

    model = ModelHandle(module=tiny_llama.module, task="causal-lm", name="a", tokenizer=Listed(0))
    ref = ModelHandle(module=tiny_llama_module(seed=1), task="causal-lm", name="b", tokenizer=Listed(1))
    refused(lambda: profile(model, data=tiny_text, reference=ref), "have different tokenizers \\(128 and 128 tokens\\)")
    check_reference(model, ModelHandle(module=tiny_llama.module, task="causal-lm", name="c", tokenizer=Listed(0)), tiny_text)


def test_reference_needs_data(tiny_llama, no_timing):
    refused(lambda: profile(tiny_llama, reference=tiny_llama), "fidelity to a reference is measured on data")


def test_encoder_reference_of_another_width(encoder, bert_tokenizer, no_timing):
    wide = tiny_bert(bert_tokenizer, hidden=64, name="wide")
    refused(lambda: profile(encoder, data=pairs(16), reference=wide), "give embeddings of width 32 and 64")


def test_classifier_reference_with_other_classes_or_data(bert_tokenizer, no_timing):
    two = tiny_bert(bert_tokenizer, task="sequence-classification", num_labels=2, name="two")
    three = tiny_bert(bert_tokenizer, task="sequence-classification", num_labels=3, name="three")
    records = TextRecords(name="rows", texts=SENTENCES, labels=[i % 2 for i in range(len(SENTENCES))])
    refused(lambda: profile(two, data=records, reference=three), "have 2 and 3 classes")
    refused(lambda: profile(two, data=pairs(16), reference=two), "measured on tensors or text records")


# --- the command line: exit 2 with one line ------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--threads", "99999"], "threads 99999 is not accepted"),
        (["--device", "tpu"], "device 'tpu' is not one of"),
        (["--price-per-hour", "1e999"], "--price-per-hour inf is not accepted"),
        (["--price-per-hour", "-2"], "--price-per-hour -2.0 is not accepted"),
        (["--data", "{p}/blob.txt"], "blob.txt' is not text"),
        (["--data", "{p}/d.pt"], r"items have shape (1, 8, 8)"),
        (["--data", "{p}/words.txt"], "holds running text; the model takes tensors"),
    ],
)
def test_cli_exits_2_with_one_line(tmp_path, capsys, mlp, extra, message):
    from leanml.cli import main

    torch.save(mlp, tmp_path / "m.pt")
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "words.txt").write_text("some words " * 50)
    torch.save({"x": torch.rand(30, 1, 8, 8), "y": torch.zeros(30, dtype=torch.long)}, tmp_path / "d.pt")
    with pytest.raises(SystemExit) as info:
        main(["profile", str(tmp_path / "m.pt"), *[a.format(p=tmp_path) for a in extra]])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("leanml: error: ") and err.count("\n") == 1
    assert message in err and "Traceback" not in err


def test_a_model_larger_than_memory_is_refused_before_loading(tmp_path, monkeypatch):
    import collections

    import psutil

    tiny_llama_module().save_pretrained(tmp_path / "m")
    Mem = collections.namedtuple("Mem", "available total")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem(1000, 2000))
    with pytest.raises(LeanmlError, match="takes 0.0 GB in fp32, more than the 0.0 GB of memory available.*--lazy"):
        profile(str(tmp_path / "m"))
