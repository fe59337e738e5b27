"""Damaged or mismatched model folders and files are refused with one-line errors instead of loading
with freshly initialised or non-finite weights (or a traceback later, in profile or export)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from leanml.errors import LeanmlError
from leanml.models import check_finite, load_model
from leanml.models.loaders import newly_initialised, safetensors_metadata


def raises(path, match: str) -> str:
    with pytest.raises(LeanmlError, match=match) as info:
        load_model(path)
    text = str(info.value)
    assert "\n" not in text
    return text


@pytest.fixture
def folder(tmp_path):
    """A tiny llama saved with save_pretrained (tied lm_head: the file holds only the embedding)."""
    from tests.conftest import tiny_llama_module

    tiny_llama_module().save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def rewrite_weights(folder, change, metadata=None):
    path = folder / "model.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, path, metadata=metadata or {"format": "pt"})


def test_the_intact_folder_loads_with_its_tied_head(folder):
    handle = load_model(folder)
    model = handle.module
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")  # tied: not stored, not "missing"


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.001])
def test_truncated_safetensors_names_the_file(folder, keep):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    raises(folder, r"weights file '.*llama/model\.safetensors' is damaged or truncated \(.*\); copy or download it again")


def test_empty_safetensors_names_the_file(folder):
    (folder / "model.safetensors").write_bytes(b"")
    raises(folder, r"model\.safetensors' is damaged or truncated")


def test_missing_config_json(folder):
    (folder / "config.json").unlink()
    raises(folder, r"holds weights but no config\.json; a Hugging Face model folder needs its config\.json")


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", r"config\.json' is not valid JSON \(line 1, column 2: Expecting property name"),
        ("", r"config\.json' is not valid JSON \(line 1, column 1"),
        ("[1, 2]", r"config\.json' holds a JSON list, not the object of a Hugging Face config"),
        ('{"hidden_size": 32}', r"config\.json' has no 'model_type', so it is not a Hugging Face model config"),
        ('{"model_type": "llama-of-my-own"}', r"is not a loadable Hugging Face model: .*llama-of-my-own"),
    ],
)
def test_config_json_that_is_not_a_config(folder, text, message):
    (folder / "config.json").write_text(text)
    raises(folder, message)


def test_config_json_not_utf8(folder):
    (folder / "config.json").write_bytes(b'{"model_type": "llama\xff"}')
    raises(folder, r"config\.json' is not UTF-8 text")


def test_config_of_a_wider_model(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64, "intermediate_size": 128}))
    raises(
        folder,
        r"the weights in '.*llama' do not fit its config\.json: 'model\.embed_tokens\.weight' is \(128, 32\) in the "
        r"weights but \(128, 64\) for the config \(and \d+ more\); the config belongs to another model",
    )


def test_config_of_another_architecture(folder):
    from transformers import BertConfig

    BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(
        folder
    )
    raises(folder, r"'.*llama' lacks \d+ weight\(s\) its config\.json needs \('embeddings\.word_embeddings\.weight', .* more\)")


def test_a_deleted_tensor_is_named(folder):
    rewrite_weights(folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    raises(
        folder,
        r"lacks 1 weight\(s\) its config\.json needs \('model\.layers\.1\.mlp\.up_proj\.weight'\), so they would be "
        r"freshly initialised",
    )


def test_several_deleted_tensors_show_the_first_three(folder):
    def drop(state):
        for name in [k for k in state if k.startswith("model.layers.0.")]:
            del state[name]

    rewrite_weights(folder, drop)
    text = raises(folder, r"lacks 9 weight\(s\)")
    assert "'model.layers.0.self_attn.q_proj.weight'" in text and "and 6 more" in text


def test_an_untied_head_that_is_missing_is_named(tmp_path):
    from tests.conftest import tiny_llama_module

    tiny_llama_module(layers=1, tie_word_embeddings=False).save_pretrained(tmp_path / "untied")
    assert load_model(tmp_path / "untied").module.lm_head.weight.data_ptr() != 0
    rewrite_weights(tmp_path / "untied", lambda s: s.pop("lm_head.weight"))
    raises(tmp_path / "untied", r"lacks 1 weight\(s\) its config\.json needs \('lm_head\.weight'\)")


def test_recomputed_buffers_and_tied_weights_are_not_flagged():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
    assert newly_initialised(bert, {"embeddings.position_ids", "embeddings.token_type_ids"}) == []
    assert newly_initialised(bert, {"pooler.dense.bias", "embeddings.position_ids"}) == ["pooler.dense.bias"]
    tied = torch.nn.Module()
    tied.emb, tied.head = torch.nn.Embedding(4, 3), torch.nn.Linear(3, 4, bias=False)
    tied.head.weight = tied.emb.weight
    assert newly_initialised(tied, {"head.weight"}) == []
    assert newly_initialised(tied, {"head.weight", "emb.weight"}) == ["emb.weight", "head.weight"]
    bn = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    assert newly_initialised(bn, {"0.running_mean", "0.num_batches_tracked"}) == ["0.running_mean"]


def test_a_leanml_artifact_without_leanml_json(tmp_path, mlp):
    from leanml.artifact import save_artifact
    from leanml.models import ModelHandle
    from tests.conftest import tiny_llama_module

    for name, handle in (
        ("hf", ModelHandle(module=tiny_llama_module(), task="causal-lm", name="t")),
        ("plain", ModelHandle(module=mlp, task="generic", name="mlp")),
    ):
        out = save_artifact(handle, tmp_path / name)
        assert safetensors_metadata(out / "model.safetensors")["format"] == "leanml"
        (out / "leanml.json").unlink()
        raises(out, rf"^'.*{name}' is a leanml artifact whose leanml\.json is missing; it cannot be rebuilt without it$")


def test_safetensors_metadata_is_empty_for_other_files(folder, tmp_path):
    assert safetensors_metadata(folder / "model.safetensors") == {"format": "pt"}
    assert safetensors_metadata(tmp_path / "absent.safetensors") == {}
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert safetensors_metadata(tmp_path / "junk.safetensors") == {}


@pytest.mark.parametrize("value, word", [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "inf")])
def test_non_finite_weights_in_a_folder(folder, value, word):
    def poison(state):
        state["model.layers.1.mlp.down_proj.weight"][3, 5] = value

    rewrite_weights(folder, poison)
    raises(
        folder,
        rf"model '.*llama' holds non-finite values \({word}\) in parameter 'model\.layers\.1\.mlp\.down_proj\.weight'; "
        "the weights are damaged",
    )


def test_non_finite_weights_in_a_pickled_module(tmp_path, mlp):
    with torch.no_grad():
        mlp[2].bias[0] = float("nan")
    torch.save(mlp, tmp_path / "m.pt")
    raises(tmp_path / "m.pt", r"model file '.*m\.pt' holds non-finite values \(nan\) in parameter '2\.bias'")
    torch.jit.trace(mlp, torch.randn(2, 20)).save(str(tmp_path / "m.torchscript"))
    raises(tmp_path / "m.torchscript", r"holds non-finite values \(nan\) in parameter '2\.bias'")


def test_check_finite_on_buffers():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    check_finite(net, "model 'x'")
    net[1].running_var[1] = float("inf")
    with pytest.raises(LeanmlError, match=r"^model 'x' holds non-finite values \(inf\) in buffer '1\.running_var'") as info:
        check_finite(net, "model 'x'")
    assert "\n" not in str(info.value)
    ok = torch.nn.Module()
    ok.register_buffer("mask", torch.full((2, 2), float("-inf")), persistent=False)  # recomputed, never loaded
    ok.register_buffer("codes", torch.zeros(4, dtype=torch.int8))
    ok.meta = torch.nn.Linear(2, 2, device="meta")
    check_finite(ok, "m")
    check_finite("not a module", "m")  # nothing to check


def test_a_folder_copy_loads(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "copy")
    assert load_model(tmp_path / "copy").task == "causal-lm"


def test_a_pickled_module_whose_class_cannot_be_imported_names_what_is_missing(tmp_path, monkeypatch):
    import sys

    (tmp_path / "usernets.py").write_text(
        "import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(4, 2)\n\n    def forward(self, x):\n        return self.fc(x)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import usernets

    torch.save(usernets.Net(), tmp_path / "net.pt")
    assert load_model(tmp_path / "net.pt").module.fc.out_features == 2  # importable: it loads
    # the user's module is not importable where leanml runs
    monkeypatch.delitem(sys.modules, "usernets")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    text = raises(tmp_path / "net.pt", r"needs the module 'usernets', which cannot be imported")
    assert "must be importable" in text and "PYTHONPATH" in text
    # the module is there but no longer has the class
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "usernets.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "other"))
    text = raises(tmp_path / "net.pt", r"needs a class that cannot be found .*Net")
    assert "must be importable" in text
