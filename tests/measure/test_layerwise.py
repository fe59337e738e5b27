"""Perplexity one block at a time against the whole model's, on tiny models of each decoder family
saved to disk (reference: :func:`leanml.measure.quality.perplexity` on the model loaded whole)."""

from __future__ import annotations

import pytest
import torch

from leanml.errors import LeanmlError
from leanml.measure.layerwise import perplexity_layer_by_layer
from leanml.measure.quality import perplexity
from leanml.models.lazy import on_meta, open_lazy
from leanml.models.loaders import load_hf_folder
from tests.families import DECODERS


@pytest.mark.parametrize("family", DECODERS)
def test_layer_by_layer_perplexity_is_the_whole_models(tmp_path, family):
    import transformers as tf

    from tests.conftest import _tiny_tokenizer
    from tests.families import config_for

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config_for(family)).eval()
    model.save_pretrained(tmp_path / family)
    _tiny_tokenizer("bpe").save_pretrained(tmp_path / family)
    g = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 90, (n,), generator=g) for n in (24, 17, 24)]
    ref = perplexity(load_hf_folder(tmp_path / family, task="causal-lm"), windows)
    lazy = open_lazy(tmp_path / family, task="causal-lm")
    got = perplexity_layer_by_layer(lazy, windows)
    assert got["n_tokens"] == ref["n_tokens"] == 62
    assert got["mean_nll"] == pytest.approx(ref["mean_nll"], rel=1e-5, abs=1e-6)
    assert got["value"] > 1.0 and got["value"] == pytest.approx(ref["value"], rel=1e-5)
    from leanml.calibrate.sequential import find_block_stack

    _, blocks = find_block_stack(lazy.module)
    assert all(on_meta(b) for b in blocks)  # every block was dropped, and the real stack is back


def test_layer_by_layer_perplexity_refusals(tmp_path):
    from tests.conftest import tiny_llama_module

    with pytest.raises(LeanmlError, match="was loaded whole"):
        from leanml.models import ModelHandle

        perplexity_layer_by_layer(ModelHandle(module=tiny_llama_module(), task="causal-lm", name="t"), [torch.arange(5)])
    tiny_llama_module().save_pretrained(tmp_path / "m")
    with pytest.raises(LeanmlError, match="no evaluation windows"):
        perplexity_layer_by_layer(open_lazy(tmp_path / "m", task="causal-lm"), [])
