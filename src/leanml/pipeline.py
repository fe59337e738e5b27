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
        for i, step in enumerate(recipe.steps):
            floor = fidelity_floor(step)
            ref = _reference_output(handle) if floor is not None else None
            handler_for(step)(handle, step, data)
            if ref is not None:
                _check_fidelity(handle, step, i, ref, floor)
    finally:
        if teacher_key:
            handle.meta.pop(teacher_key, None)
    return handle


def fidelity_floor(step) -> float | None:
    """The least output SQNR (dB) a near-lossless step must keep on the model's example inputs, or None
    for steps that are allowed to change the model (4-bit and lower, pruning, distillation). The floors
    sit far below what these steps give on real models (8-bit weights: 35-50 dB) and far above what a
    broken transform gives (a lost scale or a misread layout: below 10 dB)."""
    from .config import FloatCast, Int8Dynamic, Int8Static, SmoothQuant, WeightOnly

    if isinstance(step, WeightOnly) and step.bits >= 8 or isinstance(step, FloatCast):
        return 20.0
    if isinstance(step, (Int8Dynamic, Int8Static, SmoothQuant)):
        return 8.0
    return None


@torch.no_grad()
def _reference_output(handle: ModelHandle) -> torch.Tensor | None:
    from .models.handle import output_tensor

    if not handle.is_torch or handle.example_inputs is None or not isinstance(handle.module, torch.nn.Module):
        return None
    try:
        out = output_tensor(handle.call(handle.example_inputs))
    except Exception:  # noqa: BLE001 - a model the example inputs do not fit is checked elsewhere
        return None
    return out.detach().float().clone() if isinstance(out, torch.Tensor) and out.is_floating_point() else None


@torch.no_grad()
def _check_fidelity(handle: ModelHandle, step, index: int, ref: torch.Tensor, floor: float) -> None:
    """Refuse the result of a near-lossless step whose output moved too far (a bug, not a trade-off)."""
    from .errors import LeanmlError

    out = _reference_output(handle)
    if out is None or out.shape != ref.shape:
        return
    from .models.handle import sqnr_db

    sqnr = sqnr_db(ref, out)
    if not torch.isfinite(out).all():
        sqnr = float("-inf")
    handle.meta.setdefault("checks", []).append({"step": index, "kind": step.kind, "sqnr_db": sqnr, "floor_db": floor})
    if not sqnr >= floor:
        raise LeanmlError(
            f"step {index + 1} ({step.kind}) should be near-lossless but moved {handle.name!r}'s output to an SQNR of "
            f"{sqnr:.1f} dB (< {floor:g} dB) on its example inputs; the result is refused, not saved"
        )


def _inputs_from_data(handle: ModelHandle, data) -> None:
    """A plain module whose example inputs were guessed from its first layer (or are missing) takes a few
    rows of the data instead: the checks, the exports and the saved artifact then see real inputs."""
    from .data import TensorData

    if not isinstance(data, TensorData) or not handle.is_torch or handle.tokenizer is not None:
        return
    if handle.example_inputs is not None and not handle.meta.get("example_inputs"):
        return  # inputs the user or the loader chose
    from .models.inputs import data_example

    handle.example_inputs = data_example(data)
    handle.meta.pop("example_inputs", None)


FIDELITY_TEXTS = 256  # evaluation texts an encoder's embeddings are compared on when the data has no labels


@torch.no_grad()
def _embedding_reference(handle: ModelHandle, data) -> tuple[list[str], torch.Tensor] | None:
    """For an encoder on text with no quality metric (no pairs, no labels): the original's embeddings of
    some evaluation texts, kept so the compressed model gets a fidelity figure instead of nothing."""
    from .measure.quality import metric_for

    if data is None or handle.task != "sentence-embedding" or not hasattr(data, "documents"):
        return None
    if metric_for(handle, data) is not None:
        return None
    texts = data.documents("eval")[:FIDELITY_TEXTS]
    return (texts, handle.embed(texts)) if texts else None


@torch.no_grad()
def _embedding_fidelity(handle: ModelHandle, after, reference, notes: list[str]) -> None:
    if reference is None or after is None:
        return
    texts, ref = reference
    cos = torch.nn.functional.cosine_similarity(handle.embed(texts).float(), ref.float(), dim=-1)
    after.fidelity = {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "n_items": len(texts),
        "reference": "the model before compression",
    }
    notes.append(
        f"no quality metric for this data (no pairs or labels): fidelity is the mean cosine of the embeddings to the "
        f"model before compression, {float(cos.mean()):.4f} over {len(texts)} evaluation texts"
    )


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


WHOLE_MODEL_FACTOR = 2.0  # an in-memory run holds about twice the model's fp32 weights at its peak


def layer_by_layer_plan(model, recipe, max_memory: int | None = None, lazy: bool | None = None) -> tuple[Path, int] | None:
    """``(folder, fp32 bytes)`` when ``model`` is to be compressed layer by layer, else None.

    ``lazy`` True asks for it, False forbids it; None decides: a Hugging Face folder (or a ``.gguf`` file)
    whose fp32 weights, twice over, exceed ``max_memory`` (default: the memory available now). A model too large for memory
    with a recipe that cannot run layer by layer is a one-line error, not a crash later."""
    from .calibrate.streaming import streamable
    from .errors import LeanmlError
    from .search.budget import parse_memory

    max_memory = parse_memory(max_memory)
    if lazy is False or isinstance(model, ModelHandle):
        return None
    path = Path(str(model)).expanduser()
    folder = path if path.is_dir() and (path / "config.json").is_file() and not (path / "leanml.json").exists() else None
    if folder is None and path.is_file() and path.suffix.lower() == ".gguf":
        from .models.lazy import fp32_bytes_of_gguf

        fp32 = fp32_bytes_of_gguf(path)
        if fp32 is None:
            if lazy:
                raise LeanmlError(f"'{path}' is not a readable GGUF file; layer-by-layer compression cannot read it")
            return None
        folder = path
    elif folder is None:
        if lazy:
            raise LeanmlError(
                "layer-by-layer compression reads a Hugging Face folder (config.json + *.safetensors) or a .gguf file; "
                f"{str(model)!r} is neither"
            )
        return None
    else:
        from .models.lazy import fp32_bytes_of_folder

        fp32 = fp32_bytes_of_folder(folder)
        if fp32 is None:
            if lazy:
                raise LeanmlError(f"layer-by-layer compression reads safetensors weights; '{folder}' has none")
            return None
    if lazy is None:
        import psutil

        budget = max_memory if max_memory is not None else psutil.virtual_memory().available
        if WHOLE_MODEL_FACTOR * fp32 <= budget:
            return None
        why = streamable(recipe)
        if why:
            raise LeanmlError(
                f"model '{folder}' takes {fp32 / 1e9:.1f} GB in fp32, too much for {budget / 1e9:.1f} GB of memory, and {why}"
            )
    return folder, fp32


def compress(
    model: str | ModelHandle,
    recipe,
    data=None,
    calib=None,
    out: str | os.PathLike | None = None,
    force: bool = False,
    measure: bool = True,
    max_memory: int | str | None = None,
    lazy: bool | None = None,
    **profile_kwargs,
) -> CompressResult:
    """Load ``model``, measure it, apply ``recipe``, measure again, and save everything to ``out``.

    ``out`` is locked for the whole run and published at the end in one atomic swap (see
    :mod:`leanml.outputs`): a killed run leaves the old output or the complete new one.

    A Hugging Face folder or GGUF file too large for ``max_memory`` (or any, with ``lazy=True``) is
    compressed layer by layer (:mod:`leanml.calibrate.streaming`); there ``max_memory``, when given, is
    also a cap on the run's peak resident memory, checked after every block (a one-line error past it).
    Under ``torchrun`` the calibration is split over the ranks
    and rank 0 alone measures and writes (:mod:`leanml.distributed`)."""
    from .distributed import init_distributed, world
    from .outputs import FolderOutput, check_folder_target, check_free_space, fault_point

    recipe = load_recipe(recipe)  # a bad recipe fails here, before anything is loaded or written
    if out is not None:
        check_folder_target(out, force)
    init_distributed()
    plan = layer_by_layer_plan(model, recipe, max_memory, lazy)
    if plan is not None:
        return _compress_layer_by_layer(plan, recipe, data, calib, out, force, measure, profile_kwargs, max_memory)
    handle = model if isinstance(model, ModelHandle) else load_model(model)
    data = load_data(data) if data is not None else None
    calib_data = load_data(calib) if calib is not None else data
    _inputs_from_data(handle, calib_data or data)
    _validate_first(handle, recipe, data, calib_data, profile_kwargs)
    if world()[0] != 0:  # another rank of a torchrun job: calibrate its share; rank 0 measures and writes
        apply_recipe(handle, recipe, calib_data)
        return CompressResult(handle, recipe, None, None, None, ["rank of a torchrun job: rank 0 writes the output"])
    notes = []
    if calib_data is None:  # a step that needs activations refuses without data; the others are data-free
        notes.append("no --data or --calib: no step calibrated on data (this recipe's steps are data-free)")
    if data is None:
        notes.append("no --data: quality was not measured, only cost")
    reference = _embedding_reference(handle, data) if measure else None
    if out is None:
        before = profile(handle, data=data, **profile_kwargs) if measure else None
        apply_recipe(handle, recipe, calib_data)
        notes += handle.meta.get("notes", [])
        after = profile(handle, data=data, **profile_kwargs) if measure else None
        _embedding_fidelity(handle, after, reference, notes)
        return CompressResult(handle, recipe, before, after, None, notes)
    if isinstance(handle.module, torch.nn.Module):
        from .measure.cost import weight_bytes

        check_free_space(Path(out).parent, weight_bytes(handle.module), f"the compressed model at {str(out)!r}")
    with FolderOutput(out, "compress", force) as w:
        fault_point("compress-start")
        before = profile(handle, data=data, **profile_kwargs) if measure else None
        apply_recipe(handle, recipe, calib_data)
        notes += handle.meta.get("notes", [])
        fault_point("compress-applied")
        tmp = w.tmp
        reports = {name: json.dumps(value, indent=2) for name, value in handle.meta.get("reports", {}).items()}
        write_artifact_files(handle, tmp, recipe, {"recipe.yaml": recipe.to_yaml(), **reports})
        handle.artifact, handle.meta["modified"] = tmp, False  # the saved folder is what is measured on disk
        after = None
        if measure:
            after = profile(handle, data=data, **profile_kwargs)
            _embedding_fidelity(handle, after, reference, notes)
            (tmp / "before.json").write_text(before.to_json() + "\n")
            (tmp / "after.json").write_text(after.to_json() + "\n")
        out_path = w.commit()
        handle.artifact = out_path
    return CompressResult(handle, recipe, before, after, out_path, notes)


def _compress_layer_by_layer(plan, recipe, data, calib, out, force, measure, profile_kwargs, max_memory=None) -> CompressResult:
    from .artifact import load_artifact, write_artifact_meta
    from .calibrate.streaming import compress_layer_by_layer, streamable
    from .distributed import world
    from .errors import LeanmlError
    from .measure.system import check_threads
    from .models.lazy import open_lazy
    from .outputs import FolderOutput, check_free_space

    folder, fp32 = plan
    why = streamable(recipe)
    if why:
        raise LeanmlError(why)
    if out is None:
        raise LeanmlError("layer-by-layer compression writes the model block by block as it goes; pass --out")
    check_threads(profile_kwargs.get("threads"))
    handle = open_lazy(folder)
    data = load_data(data) if data is not None else None
    calib_data = load_data(calib) if calib is not None else data
    _validate_first(handle, recipe, data, calib_data, profile_kwargs)
    notes = [
        f"compressed layer by layer: the model takes {fp32 / 1e9:.1f} GB in fp32; the original was not loaded whole, "
        "so its speed and memory were not measured"
    ]
    from .search.budget import parse_memory

    cap = parse_memory(max_memory)
    if world()[0] != 0:  # calibration inputs too large for memory go beside the output on every rank
        compress_layer_by_layer(handle, recipe, calib_data, None, cap, scratch=Path(out).expanduser().resolve().parent)
        return CompressResult(handle, recipe, None, None, None, [*notes, "rank of a torchrun job: rank 0 writes the output"])
    check_free_space(Path(out).parent, fp32 // 4, f"the compressed model at {str(out)!r}")
    with FolderOutput(out, "compress", force) as w:
        facts = compress_layer_by_layer(handle, recipe, calib_data, w.tmp, cap)
        report = {k: v for k, v in facts.items() if k != "aliases"}
        extra = {name: json.dumps(value, indent=2) for name, value in handle.meta.get("reports", {}).items()}
        extra.update({"recipe.yaml": recipe.to_yaml(), "layer_by_layer.json": json.dumps(report, indent=2)})
        write_artifact_meta(handle, w.tmp, recipe, extra, facts["weights"], facts["aliases"])
        notes.append(
            f"{facts['blocks']} blocks, one at a time, in {len(facts['weights'])} weight files; peak resident memory "
            f"{facts['peak_rss_bytes'] / 2**30:.2f} GiB"
        )
        if measure and data is not None:  # the original's quality, one block at a time (torchrun ranks are done)
            from .measure.layerwise import evaluate_layer_by_layer
            from .memory import MemoryCap
            from .models.lazy import release

            release(handle.module)  # its blocks are gone already; the embeddings and head are read again
            with MemoryCap(cap) as quality_cap:
                before_quality = evaluate_layer_by_layer(open_lazy(folder), data, check=quality_cap.check)
            if before_quality is not None:
                (w.tmp / "before_quality.json").write_text(json.dumps(before_quality, indent=2) + "\n")
                notes.append(
                    f"the original's perplexity, computed layer by layer: {before_quality['value']:.4g} over "
                    f"{before_quality['n_tokens']} tokens of {data.name!r}"
                )
        after = None
        if measure:
            saved = load_artifact(w.tmp)
            notes += saved.meta.get("notes", [])
            after = profile(saved, data=data, **profile_kwargs)
            (w.tmp / "after.json").write_text(after.to_json() + "\n")
        out_path = w.commit()
    handle.artifact = out_path
    return CompressResult(handle, recipe, None, after, out_path, notes)
