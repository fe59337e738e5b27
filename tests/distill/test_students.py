"""Students built from the teacher: spec parsing, layer dropping (kept layers keep the teacher's
weights), block-influence choice against a separate computation, width shrinking."""

from __future__ import annotations

import pytest
import torch

from leanml.distill import build_student, every_kth, parse_student
from leanml.errors import LeanmlError
from leanml.models import ModelHandle
from tests.conftest import CharTokenizer, tiny_llama_module


def handle(layers: int = 4) -> ModelHandle:
    return ModelHandle(module=tiny_llama_module(layers=layers), task="causal-lm", name="t", tokenizer=CharTokenizer())


def test_every_kth_keeps_the_last_layer_and_spreads_evenly():
    assert every_kth(6, 3) == [1, 3, 5]
    assert every_kth(30, 24)[-1] == 29 and len(every_kth(30, 24)) == 24
    assert every_kth(4, 4) == [0, 1, 2, 3]
    with pytest.raises(LeanmlError, match="cannot keep 0 of 4"):
        every_kth(4, 0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("drop-layers", "needs a ratio"),
        ("drop-layers:0.5:sideways", "'sideways' is not accepted"),
        ("shrink:2", "is not accepted"),
        ("same+drop-layers:0.5", "exclude each other"),
        ("keep-layers:a,b", "needs layer indices"),
        ("", "is not accepted"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(LeanmlError, match=message):
        parse_student(spec)


def test_drop_every_keeps_teacher_weights_of_kept_layers():
    teacher = handle(4)
    student, report = build_student(teacher, "drop-layers:0.5:every")
    assert report["layer_sources"] == [1, 3]
    assert student.module.config.num_hidden_layers == 2 and len(student.module.model.layers) == 2
    assert teacher.module.config.num_hidden_layers == 4  # the teacher is untouched
    for i, src in enumerate(report["layer_sources"]):
        s_state = student.module.model.layers[i].state_dict()
        t_state = teacher.module.model.layers[src].state_dict()
        assert all(torch.equal(s_state[k], t_state[k]) for k in t_state)
        assert student.module.model.layers[i].self_attn.layer_idx == i
    assert torch.equal(student.module.model.embed_tokens.weight, teacher.module.model.embed_tokens.weight)
    assert report["params_student"] < report["params_teacher"]
    ids = torch.randint(0, 128, (1, 12))
    assert student.module(input_ids=ids).logits.shape == (1, 12, 128)


def test_influence_drops_the_least_influential_layers(tiny_text):
    """The layers dropped are those with the lowest mean 1 - cos(input, output), recomputed here with
    plain forward hooks on the teacher."""
    teacher = handle(4)
    student, report = build_student(teacher, "drop-layers:2", tiny_text, calib_windows=2, window=64)
    from leanml.calibrate.batches import calibration_batches

    sums = [[0.0, 0] for _ in range(4)]

    def hook(i):
        def fn(_m, args, kwargs, out):
            x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, 32).double()
            y = (out[0] if isinstance(out, tuple) else out).reshape(-1, 32).double()
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
            sums[i][0] += float((1 - cos).sum())
            sums[i][1] += cos.numel()

        return fn

    hs = [blk.register_forward_hook(hook(i), with_kwargs=True) for i, blk in enumerate(teacher.module.model.layers)]
    with torch.no_grad():
        for b in calibration_batches(teacher, tiny_text, 2, 64):
            teacher.module(**b)
    for h in hs:
        h.remove()
    influence = [s / c for s, c in sums]
    assert report["block_influence"] == pytest.approx(influence, abs=1e-6)  # the report rounds to 6 digits
    lowest = sorted(range(4), key=lambda i: influence[i])[:2]
    assert report["layer_sources"] == sorted(set(range(4)) - set(lowest))


def test_influence_needs_data_and_keep_layers_range():
    with pytest.raises(LeanmlError, match="needs calibration data"):
        build_student(handle(4), "drop-layers:0.5")
    with pytest.raises(LeanmlError, match="index 7 is out of range"):
        build_student(handle(4), "keep-layers:0,7")
    with pytest.raises(LeanmlError, match="dropping 4 of 4"):
        build_student(handle(4), "drop-layers:4:every")


def test_width_and_layers_together(tiny_text):
    teacher = handle(4)
    student, report = build_student(teacher, "keep-layers:0,3+width:0.5", tiny_text, calib_windows=2, window=64)
    assert report["layer_sources"] == [0, 3]
    assert student.module.config.intermediate_size == 32
    assert student.module.model.layers[1].mlp.down_proj.in_features == 32


def test_user_module_and_plain_modules(mlp):
    teacher = ModelHandle(module=mlp, task="generic", name="mlp")
    small = torch.nn.Sequential(torch.nn.Linear(20, 4), torch.nn.ReLU(), torch.nn.Linear(4, 5))
    student, report = build_student(teacher, small)
    assert student.module is small and report["params_student"] < report["params_teacher"]
    with pytest.raises(LeanmlError, match="needs a Hugging Face"):
        build_student(teacher, "drop-layers:0.5:every")
