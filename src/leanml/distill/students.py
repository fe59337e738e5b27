"""Students built from the teacher, so they start close to it.

A student spec is a short string (the ``student`` field of :class:`~leanml.distill.config.Distill`, and
``--student`` on the command line):

* ``same`` - a copy of the teacher (distil a pruned or quantized model back towards the original);
* ``drop-layers:R[:influence|every]`` - remove transformer layers: ``R`` is a fraction of the layers
  (``0.5``) or a count (``6``). ``influence`` (the default) removes the layers with the lowest block
  influence ``1 - cos(input, output)`` on calibration data (they change the residual stream least;
  Men et al. 2024, "ShortGPT"); ``every`` keeps layers evenly spaced, always keeping the last one
  (6 → 3 keeps teacher layers 2, 4, 6), and needs no data;
* ``keep-layers:0,2,4`` - keep exactly these teacher layers (0-based);
* ``width:R`` - remove the fraction ``R`` of the FFN neurons of every layer (ranked by mean activation,
  the pruning package's structured removal);
* ``drop-layers:...+width:R`` - both, in that order.

Kept layers keep the teacher's weights. Any ``nn.Module`` can be passed instead of a spec (a handle is
made for it with the teacher's tokenizer and task). The report lists which teacher layer each student
layer came from (``layer_sources``), which the feature losses use to pair hidden states.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from ..errors import LeanmlError
from ..models.handle import ModelHandle
from ..prune.config import StructuredPrune
from ..prune.surgery import count_params
from ..prune.transformer import detect_layout, drop_layers

_SPEC = "same | drop-layers:R[:influence|every] | keep-layers:I,J,... | width:R, joined by '+'"
_PART = re.compile(r"^(drop-layers|keep-layers|width|same)(?::(.*))?$")


def parse_student(spec: str) -> list[tuple[str, list[str]]]:
    """``[(operation, [arguments...]), ...]`` of a spec string (see the module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise LeanmlError(f"student spec {spec!r} is not accepted; use {_SPEC}")
    parts = []
    for raw in spec.replace(" ", "").split("+"):
        hit = _PART.match(raw)
        if not hit:
            raise LeanmlError(f"student spec part {raw!r} is not accepted; use {_SPEC}")
        op, args = hit.group(1), [a for a in (hit.group(2) or "").split(":") if a != ""]
        if op == "same" and args:
            raise LeanmlError(f"student spec part {raw!r} takes no argument; use 'same'")
        if op in ("drop-layers", "width") and not args:
            raise LeanmlError(f"student spec part {raw!r} needs a ratio, e.g. {op}:0.5")
        if op == "drop-layers" and len(args) == 2 and args[1] not in ("influence", "every"):
            raise LeanmlError(f"layer choice {args[1]!r} is not accepted; use influence or every")
        if op in ("drop-layers", "width") and len(args) > (2 if op == "drop-layers" else 1):
            raise LeanmlError(f"student spec part {raw!r} has too many ':' arguments")
        if op in ("drop-layers", "width"):
            _ratio(args[0], "layer ratio" if op == "drop-layers" else "width ratio")
        if op == "keep-layers" and (len(args) != 1 or not re.fullmatch(r"\d+(,\d+)*", args[0])):
            raise LeanmlError(f"student spec part {raw!r} needs layer indices, e.g. keep-layers:0,2,4")
        parts.append((op, args))
    ops = [op for op, _ in parts]
    if len(set(ops)) != len(ops) or ("same" in ops and len(ops) > 1) or {"drop-layers", "keep-layers"} <= set(ops):
        raise LeanmlError(f"student spec {spec!r} repeats or mixes operations that exclude each other; use {_SPEC}")
    return parts


def _ratio(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LeanmlError(f"{what} {text!r} is not a number; use a fraction in (0, 1) or a count") from None
    return value


def every_kth(n_layers: int, keep: int) -> list[int]:
    """``keep`` evenly spaced layer indices of ``n_layers`` that always include the last one
    (``every_kth(6, 3) == [1, 3, 5]``)."""
    if not 1 <= keep <= n_layers:
        raise LeanmlError(f"cannot keep {keep} of {n_layers} layers; keep between 1 and {n_layers}")
    return sorted({round((i + 1) * n_layers / keep) - 1 for i in range(keep)})


def _n_drop(arg: str, n_layers: int) -> int:
    value = _ratio(arg, "layer ratio")
    if value >= 1:
        if value != int(value):
            raise LeanmlError(f"layer count {arg!r} is not an integer; use a fraction in (0, 1) or a whole count")
        k = int(value)
    elif value > 0:
        k = int(value * n_layers + 0.5)
    else:
        raise LeanmlError(f"layer ratio {arg!r} is not accepted; use a fraction in (0, 1) or a count")
    if not 1 <= k < n_layers:
        raise LeanmlError(f"dropping {k} of {n_layers} layers is not possible; drop between 1 and {n_layers - 1}")
    return k


def build_student(teacher: ModelHandle, spec, data=None, calib_windows: int = 16, window: int = 256) -> tuple[ModelHandle, dict]:
    """A student handle (its own module; the teacher is untouched) and a report with ``spec``,
    ``layer_sources`` (teacher layer index of each student layer, when the model has a layer stack),
    ``params_teacher`` and ``params_student``. ``data`` feeds the block-influence and activation rankings."""
    if isinstance(teacher.module, nn.Module) is False:
        raise LeanmlError(f"teacher {teacher.name!r} is not a torch module; distil from a PyTorch model")
    params_teacher = count_params(teacher.module)
    if isinstance(spec, nn.Module):
        module = spec
        student = ModelHandle(
            module=module,
            task=teacher.task,
            name=f"{teacher.name}-student",
            tokenizer=teacher.tokenizer,
            example_inputs=teacher.example_inputs,
            source="user module",
            max_length=teacher.max_length,
        )
        return student, {
            "spec": f"module:{type(spec).__name__}",
            "layer_sources": None,
            "params_teacher": params_teacher,
            "params_student": count_params(module),
        }
    parts = parse_student(spec)
    student = copy.copy(teacher)
    student.module = copy.deepcopy(teacher.module)
    student.meta = {}
    student.artifact = None
    student.name = f"{teacher.name}-student"
    layout = detect_layout(student.module)
    sources = list(range(len(layout.blocks))) if layout is not None else None
    details: dict = {}
    for op, args in parts:
        if op == "same":
            continue
        if layout is None:
            raise LeanmlError(
                f"student spec {op!r} needs a Hugging Face llama- or BERT-style model; {teacher.name!r} "
                "is not one: pass your own student nn.Module"
            )
        if op in ("drop-layers", "keep-layers"):
            n = len(layout.blocks)
            if op == "keep-layers":
                keep = sorted({int(i) for i in args[0].split(",")})
                if keep[-1] >= n:
                    raise LeanmlError(f"keep-layers index {keep[-1]} is out of range; the teacher has layers 0..{n - 1}")
            else:
                k = _n_drop(args[0], n)
                how = args[1] if len(args) > 1 else "influence"
                if how == "every":
                    keep = every_kth(n, n - k)
                else:
                    keep = _influence_keep(student, layout, k, data, calib_windows, window, details)
            drop_layers(student.module, layout, [i for i in range(n) if i not in keep])
            sources = [sources[i] for i in keep]
            layout = detect_layout(student.module)
        elif op == "width":
            ratio = _ratio(args[0], "width ratio")
            if not 0 < ratio < 1:
                raise LeanmlError(f"width ratio {args[0]!r} is not accepted; use a fraction in (0, 1)")
            from ..prune.structured import apply_structured_prune

            apply_structured_prune(
                student,
                StructuredPrune(unit="neurons", ratio=ratio, criterion="activation", calib_windows=calib_windows, window=window),
                data,
            )
            student.meta.pop("applied", None)
            layout = detect_layout(student.module)
    return student, {
        "spec": spec,
        "layer_sources": sources,
        "params_teacher": params_teacher,
        "params_student": count_params(student.module),
        **details,
    }


def _influence_keep(student: ModelHandle, layout, k: int, data, calib_windows: int, window: int, details: dict) -> list[int]:
    if data is None:
        raise LeanmlError("choosing layers by block influence needs calibration data; pass data, or use drop-layers:R:every")
    from ..calibrate.batches import calibration_batches
    from ..prune.structured import _block_influence

    batches = calibration_batches(student, data, calib_windows, window)
    with torch.no_grad():
        influence = _block_influence(student, batches, list(layout.blocks))
    scores = [influence[b.name] for b in layout.blocks]
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    gone = set(order[:k])
    details["block_influence"] = [round(s, 6) for s in scores]
    return [i for i in range(len(scores)) if i not in gone]


__all__ = ["build_student", "every_kth", "parse_student"]
