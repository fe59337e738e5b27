"""Tiny models and data built in the tests (seconds, no downloads)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LEANML_QUIET", "1")


class CharTokenizer:
    """A byte-level tokenizer with the call signature the code uses (no special tokens)."""

    vocab_size = 128
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True, **kwargs):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [min(ord(c), 127) for c in text]}


def tiny_llama_module(seed: int = 0, layers: int = 2, **config_overrides):
    """A tiny Llama causal LM (vocabulary 128, width 32, tied head unless overridden), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(LlamaConfig(**{**settings, **config_overrides})).eval()


@pytest.fixture
def tiny_llama():
    from leanml.models import ModelHandle

    module = tiny_llama_module()
    handle = ModelHandle(module=module, task="causal-lm", name="tiny-llama", tokenizer=CharTokenizer())
    handle.example_inputs = {"input_ids": torch.randint(0, 128, (1, 16))}
    return handle


@pytest.fixture
def tiny_text():
    from leanml.data import TextCorpus

    body = " ".join(f"sentence number {i} says the quick brown fox jumps over the lazy dog." for i in range(80))
    return TextCorpus(name="tiny", text=body, eval_tokens=600, calib_start=1200)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)).eval()


class Processes:
    """Child processes of a test, each in a session of its own; every one still alive at the end of the
    test (also a failed one) is killed with its whole process group, so no test leaves a process behind."""

    def __init__(self):
        self.started = []

    def popen(self, argv, **kwargs):
        import subprocess

        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    def run(self, argv, timeout=300, **kwargs):
        """Like subprocess.run (stdout/stderr captured as text), killing the group on a timeout."""
        import subprocess

        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = self.popen(argv, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def kill_all(self):
        import signal

        for proc in self.started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):  # already reaped
                proc.wait(timeout=30)


@pytest.fixture
def processes():
    procs = Processes()
    try:
        yield procs
    finally:
        procs.kill_all()


_CORPUS = (
    "the cheap model runs fast and the small model runs on the phone. quantization keeps the weights in "
    "few bits; pruning removes what the model does not need; distillation teaches a small student. "
) * 8


def _tiny_tokenizer(kind: str):
    """A real, savable tokenizer trained in a moment on a short text (BPE for decoders, WordPiece for BERT)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<unk>", "<s>", "</s>"]
        trainer = trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator([_CORPUS], trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
        )
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([_CORPUS], trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory):
    """A tiny Llama causal LM saved as a Hugging Face folder with its tokenizer (a model a user brings)."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    tok = _tiny_tokenizer("bpe")
    model = tiny_llama_module(
        vocab_size=len(tok), max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_bert_dir(tmp_path_factory):
    """A tiny BERT sentence encoder saved as a Hugging Face folder with its tokenizer."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("models") / "tiny-bert"
    tok = _tiny_tokenizer("wordpiece")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    BertModel(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """Running English text (a few thousand words) as a .txt file."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text((_CORPUS + "\n\n") * 12)
    return path
