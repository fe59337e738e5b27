"""Every config refuses a bad value with a one-line LeanmlError naming the config, the field, the value
and what is accepted: ranges, choices, unknown fields, nan/inf in float fields, invalid regexes."""

from __future__ import annotations

import math
import typing

import pytest

from leanml.config import (
    CONFIG_TYPES,
    QAT,
    Codebook,
    Int8Static,
    MixedPrecision,
    SmoothQuant,
    TechniqueConfig,
    WeightOnly,
    coerce_config,
    config_from_dict,
)
from leanml.distill.config import Distill
from leanml.errors import LeanmlError
from leanml.prune.config import GradualPrune, Prune, StructuredPrune
from leanml.prune.finetune import Finetune
from leanml.targeting import check_pattern, select_layers


def raises(fn, match: str) -> str:
    with pytest.raises(LeanmlError, match=match) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text and "validation error" not in text and "errors.pydantic.dev" not in text
    return text


def test_errors_are_value_errors_not_validation_errors():
    from pydantic import ValidationError

    with pytest.raises(ValueError) as info:
        WeightOnly(bits=9)
    assert isinstance(info.value, LeanmlError) and not isinstance(info.value, ValidationError)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: WeightOnly(bits=9),
            r"^WeightOnly field 'bits' = 9 is not accepted: Input should be less than or equal to 8 "
            r"\(accepted: an integer >= 2 and <= 8\)$",
        ),
        (lambda: WeightOnly(bits="four"), "WeightOnly field 'bits' = 'four' is not accepted: Input should be a valid integer"),
        (lambda: WeightOnly(group_size=0), r"WeightOnly field 'group_size' = 0 .*\(accepted: an integer >= 1 or null\)"),
        (lambda: WeightOnly(method="best"), "WeightOnly field 'method' = 'best' is not accepted: Input should be 'rtn', 'gptq'"),
        (lambda: WeightOnly(colour="red"), "WeightOnly has no field 'colour' \\(given 'red'\\); accepted fields: kind, version"),
        (
            lambda: Int8Static(percentile=40),
            r"Int8Static field 'percentile' = 40 .*\(accepted: a finite number > 50 and <= 100\)",
        ),
        (lambda: SmoothQuant(alpha=-0.1), "SmoothQuant field 'alpha' = -0.1"),
        (lambda: Codebook(method="kmeans", bits=1), "Codebook field 'bits' = 1"),
        (lambda: MixedPrecision(candidates=[1, 4]), "MixedPrecision field 'candidates' = \\[1, 4\\] is not accepted: candidates"),
        (lambda: MixedPrecision(group_size=0), "MixedPrecision field 'group_size' = 0"),
        (lambda: QAT(group_size=-32), "QAT field 'group_size' = -32"),
        (lambda: Prune(sparsity=1.5), "Prune field 'sparsity' = 1.5"),
        (lambda: Prune(pattern="4:2"), "^Prune: N:M pattern 4:2 needs n < m"),
        (lambda: GradualPrune(initial_sparsity=0.6, final_sparsity=0.5), "^GradualPrune: initial_sparsity 0.6 is above"),
        (lambda: GradualPrune(seed=-1), "GradualPrune field 'seed' = -1"),
        (lambda: StructuredPrune(ratio=1.0), "StructuredPrune field 'ratio' = 1.0"),
        (lambda: Finetune(lr=-1), "Finetune field 'lr' = -1"),
        (lambda: Distill(loss="kd+magic"), "^Distill: loss 'kd\\+magic' is not accepted"),
        (lambda: Distill(student="shrink:2"), "^Distill: student spec part 'shrink:2' is not accepted"),
        (
            lambda: Distill(seed=2**70),
            r"Distill field 'seed' = 1180591620717411303424 .*\(accepted: an integer >= 0 and < 4294967296\)",
        ),
        (lambda: Distill(batch_size=6, grad_accum=4), "^Distill: batch_size 6 is not divisible by grad_accum 4"),
        (
            lambda: WeightOnly(targets="re:mlp"),
            "WeightOnly field 'targets' = 're:mlp' is not accepted: Input should be a valid list",
        ),
        (lambda: WeightOnly(targets=[3]), "WeightOnly field 'targets.0' = 3 is not accepted: Input should be a valid string"),
        (lambda: TechniqueConfig(), "TechniqueConfig field 'kind' is required"),
    ],
)
def test_bad_values_name_config_field_value_and_what_is_accepted(make, message):
    raises(make, message)


def test_a_long_value_is_shortened():
    text = raises(lambda: WeightOnly(method="x" * 500), "WeightOnly field 'method' = 'xxx")
    assert len(text) < 200


def test_frozen_configs_and_model_validate_are_one_line_too():
    cfg = WeightOnly()
    raises(lambda: setattr(cfg, "bits", 3), r"WeightOnly is frozen, so 'bits' cannot be set; make a new one with model_copy")
    raises(lambda: WeightOnly.model_validate({"bits": 11}), "WeightOnly field 'bits' = 11")
    raises(lambda: WeightOnly.model_validate("w4"), "WeightOnly: Input should be a valid dictionary")
    assert WeightOnly.model_validate({"bits": 3}).bits == 3


FLOAT_FIELDS = [
    (cls, name)
    for cls in sorted({*CONFIG_TYPES.values(), Finetune, Distill}, key=lambda c: c.__name__)
    for name, info in cls.model_fields.items()
    if info.annotation is float or float in typing.get_args(info.annotation)
]


def test_the_sweep_covers_the_distill_floats():
    assert {n for c, n in FLOAT_FIELDS if c is Distill} >= {
        "lr",
        "temperature",
        "alpha",
        "warmup",
        "weight_decay",
        "clip",
        "select_fraction",
        "hidden_weight",
    }


@pytest.mark.parametrize("cls, field", FLOAT_FIELDS, ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize(
    "value, words",
    [
        (math.nan, "nan is not a number"),
        ("nan", "'nan' is not a number"),
        (math.inf, "inf is not finite"),
        (-math.inf, "-inf is not finite"),
        ("inf", "'inf' is not finite"),
    ],
)
def test_float_fields_refuse_nan_and_inf(cls, field, value, words):
    text = raises(lambda: cls(**{field: value}), f"^{cls.__name__} field '{field}' = {words}; accepted: a finite number")
    assert "finite number" in text


def test_finite_floats_and_other_strings_still_work():
    assert Distill(lr="0.001").lr == 0.001 and Distill(temperature=1e3).temperature == 1e3
    assert WeightOnly(outlier_factor=None).outlier_factor is None
    raises(lambda: Distill(lr="fast"), "Distill field 'lr' = 'fast' is not accepted: Input should be a valid number")


@pytest.mark.parametrize(
    "patterns, field, message",
    [
        (
            ["re:model.("],
            "targets",
            r"targets pattern 're:model\.\(' is not a valid regular expression \(missing \), unterminated",
        ),
        (["re:*mlp"], "targets", r"targets pattern 're:\*mlp' is not a valid regular expression \(nothing to repeat"),
        (["re:[a-"], "ignore", r"ignore pattern 're:\[a-' is not a valid regular expression"),
        ([""], "ignore", "ignore entry '' is empty"),
        (["re:"], "targets", "targets entry 're:' is empty"),
    ],
)
def test_invalid_patterns_are_refused_when_the_config_is_made(patterns, field, message):
    text = raises(lambda: WeightOnly(**{field: patterns}), f"WeightOnly field '{field}' = .* is not accepted: {message}")
    assert "use a module name or 're:REGEX'" in text
    raises(lambda: Prune(**{field: patterns}), message)
    raises(lambda: config_from_dict({"kind": "prune-structured", field: patterns}), message)


def test_select_layers_checks_patterns_given_directly(mlp):
    raises(lambda: select_layers(mlp, (type(mlp[0]),), ["re:0|("], None), r"targets pattern 're:0\|\(' is not a valid")
    raises(lambda: check_pattern(5), "targets entry 5 is a int, not a string")
    assert select_layers(mlp, (type(mlp[0]),), ["re:^[02]$"], None) == ["0", "2"]


@pytest.mark.parametrize(
    "config, message",
    [
        (
            "w4",
            r"leanml\.quantize takes a config object \(WeightOnly, .*\) or a dict with a 'kind' "
            r"\(weight-only, .*\), got str 'w4'",
        ),
        (None, r"leanml\.quantize takes a config object .* got NoneType None"),
        (4, "got int 4"),
        ({"bits": 4}, r"leanml\.quantize got a config dict without a 'kind'; accepted kinds: weight-only, int8-dynamic"),
        ({"kind": "prune"}, r"leanml\.quantize does not apply a Prune config \(kind 'prune'\); accepted kinds: weight-only"),
        (Prune(), "does not apply a Prune config"),
        ({"kind": "weight-only", "bits": 11}, "WeightOnly field 'bits' = 11"),
        ({"kind": "wieght-only"}, "unknown technique 'wieght-only'"),
    ],
)
def test_coerce_config_errors(config, message):
    from leanml.quantize.api import QUANTIZE_CONFIGS

    raises(lambda: coerce_config(config, QUANTIZE_CONFIGS, "leanml.quantize"), message)


def test_coerce_config_accepts_objects_and_dicts():
    assert coerce_config({"kind": "weight-only", "bits": 8}, (WeightOnly,), "f") == WeightOnly(bits=8)
    cfg = Prune(sparsity=0.3)
    assert coerce_config(cfg, (Prune, StructuredPrune), "f") is cfg
