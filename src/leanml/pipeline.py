"""`compress`: apply a recipe, measure before and after with the same `Measurement`, and write the
compressed model, its recipe and both measurements into one folder (atomically)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifact import check_target, replace_folder, temp_folder_for, write_artifact_files
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
    """Load ``model``, measure it, apply ``recipe``, measure again, and save everything to ``out``."""
    recipe = load_recipe(recipe)  # a bad recipe fails here, before anything is loaded or written
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_target(out_path, force)
    handle = model if isinstance(model, ModelHandle) else load_model(model)
    data = load_data(data) if data is not None else None
    calib_data = load_data(calib) if calib is not None else data
    before = profile(handle, data=data, **profile_kwargs) if measure else None
    apply_recipe(handle, recipe, calib_data)
    after = None
    if out_path is None:
        after = profile(handle, data=data, **profile_kwargs) if measure else None
        return CompressResult(handle, recipe, before, after, None)
    tmp = temp_folder_for(out_path)
    try:
        reports = {name: json.dumps(value, indent=2) for name, value in handle.meta.get("reports", {}).items()}
        write_artifact_files(handle, tmp, recipe, {"recipe.yaml": recipe.to_yaml(), **reports})
        handle.artifact, handle.meta["modified"] = tmp, False  # the saved folder is what is measured on disk
        if measure:
            after = profile(handle, data=data, **profile_kwargs)
            (tmp / "before.json").write_text(before.to_json() + "\n")
            (tmp / "after.json").write_text(after.to_json() + "\n")
        replace_folder(tmp, out_path)
        handle.artifact = out_path
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CompressResult(handle, recipe, before, after, out_path)
