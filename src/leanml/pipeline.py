"""`compress`: apply a recipe, measure before and after with the same `Measurement`, and write the
compressed model, its recipe and both measurements into one folder (atomically)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .artifact import write_artifact_files
from .data import load_data
from .measure import Measurement, profile
from .models import ModelHandle, load_model
from .recipe import Recipe, load_recipe
from .registry import handler_for


@dataclass
class CompressResult:
    handle: ModelHandle
    recipe: Recipe
    before: Measurement | None
    after: Measurement | None
    out: Path | None
    notes: list[str] = field(default_factory=list)


def apply_recipe(handle: ModelHandle, recipe, data=None) -> ModelHandle:
    """Apply each step of ``recipe`` to ``handle`` in order (calibrating on ``data`` where needed)."""
    recipe = load_recipe(recipe)
    data = load_data(data) if data is not None else None
    teacher_key = None
    if any(getattr(step, "needs_teacher", False) for step in recipe.steps) and isinstance(handle.module, torch.nn.Module):
        from .prune.finetune import TEACHER_KEY, snapshot_teacher

        teacher_key = TEACHER_KEY  # distillation steps learn from the model as it was before the recipe
        handle.meta[teacher_key] = snapshot_teacher(handle.module)
    try:
        for step in recipe.steps:
            handler_for(step)(handle, step, data)
    finally:
        if teacher_key:
            handle.meta.pop(teacher_key, None)
    return handle


def _validate_first(handle: ModelHandle, recipe: Recipe, data, calib_data, profile_kwargs: dict) -> None:
    """Everything cheap that can be wrong, checked before anything is measured or calibrated."""
    from .measure.quality import check_data_for
    from .measure.system import check_threads
    from .recipe import validate_recipe

    check_threads(profile_kwargs.get("threads"))
    validate_recipe(handle, recipe)
    for d, verb in ((data, "compress"), (calib_data, "calibrate")):
        if d is not None:
            check_data_for(handle, d, verb=verb)


def compress(
    model: str | ModelHandle,
    recipe,
    data=None,
    calib=None,
    out: str | os.PathLike | None = None,
    force: bool = False,
    measure: bool = True,
    **profile_kwargs,
) -> CompressResult:
    """Load ``model``, measure it, apply ``recipe``, measure again, and save everything to ``out``.

    ``out`` is locked for the whole run and published at the end in one atomic swap (see
    :mod:`leanml.outputs`): a killed run leaves the old output or the complete new one."""
    from .outputs import FolderOutput, check_folder_target, check_free_space, fault_point

    recipe = load_recipe(recipe)  # a bad recipe fails here, before anything is loaded or written
    if out is not None:
        check_folder_target(out, force)
    handle = model if isinstance(model, ModelHandle) else load_model(model)
    data = load_data(data) if data is not None else None
    calib_data = load_data(calib) if calib is not None else data
    _validate_first(handle, recipe, data, calib_data, profile_kwargs)
    notes = []
    if calib_data is None:  # a step that needs activations refuses without data; the others are data-free
        notes.append("no --data or --calib: no step calibrated on data (this recipe's steps are data-free)")
    if data is None:
        notes.append("no --data: quality was not measured, only cost")
    if out is None:
        before = profile(handle, data=data, **profile_kwargs) if measure else None
        apply_recipe(handle, recipe, calib_data)
        after = profile(handle, data=data, **profile_kwargs) if measure else None
        return CompressResult(handle, recipe, before, after, None, notes)
    if isinstance(handle.module, torch.nn.Module):
        from .measure.cost import weight_bytes

        check_free_space(Path(out).parent, weight_bytes(handle.module), f"the compressed model at {str(out)!r}")
    with FolderOutput(out, "compress", force) as w:
        fault_point("compress-start")
        before = profile(handle, data=data, **profile_kwargs) if measure else None
        apply_recipe(handle, recipe, calib_data)
        fault_point("compress-applied")
        tmp = w.tmp
        reports = {name: json.dumps(value, indent=2) for name, value in handle.meta.get("reports", {}).items()}
        write_artifact_files(handle, tmp, recipe, {"recipe.yaml": recipe.to_yaml(), **reports})
        handle.artifact, handle.meta["modified"] = tmp, False  # the saved folder is what is measured on disk
        after = None
        if measure:
            after = profile(handle, data=data, **profile_kwargs)
            (tmp / "before.json").write_text(before.to_json() + "\n")
            (tmp / "after.json").write_text(after.to_json() + "\n")
        out_path = w.commit()
        handle.artifact = out_path
    return CompressResult(handle, recipe, before, after, out_path, notes)
