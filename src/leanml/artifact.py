"""Saving and reloading compressed models: a folder with ``model.safetensors`` (integer codes, scales,
zero points and float weights), ``leanml.json`` (the layer layout and the recipe), and the model's
config and tokenizer. ``leanml.load(folder)`` rebuilds the model and reproduces its outputs exactly."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import LeanmlError
from .models.handle import ModelHandle
from .targeting import set_module

FORMAT_VERSION = 1
META_FILE = "leanml.json"


def _layer_types() -> dict[str, type]:
    """Every custom layer class an artifact may hold (quantized and sparse), by class name."""
    from .prune.modules import LAYER_TYPES as SPARSE
    from .quantize.modules import LAYER_TYPES as QUANT

    return {**QUANT, **SPARSE}


def _layer_specs(model: torch.nn.Module) -> dict[str, dict]:
    LAYER_TYPES = _layer_types()
    return {n: m.to_spec() for n, m in model.named_modules() if type(m).__name__ in LAYER_TYPES and n}


def _dedup_state(model: torch.nn.Module, skip_meta: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each storage once; ``aliases`` maps dropped names to the kept one (tied weights).
    ``skip_meta`` leaves out tensors on ``meta`` (the blocks of a model compressed layer by layer, already
    written)."""
    state, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        if skip_meta and tensor.device.type == "meta":
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen and tensor.numel():
            aliases[name] = seen[key]
            continue
        seen[key] = name
        state[name] = tensor.detach().contiguous().clone() if tensor.storage_offset() else tensor.detach().contiguous()
    return state, aliases


def check_target(out: Path, force: bool) -> Path:
    """Refuse an output folder leanml may not write (see :func:`leanml.outputs.check_folder_target`)."""
    from .outputs import check_folder_target

    return check_folder_target(out, force)


def save_artifact(
    handle: ModelHandle, out: str | os.PathLike, recipe=None, extra: dict[str, str] | None = None, force: bool = False
) -> Path:
    """Write ``handle`` to the folder ``out`` atomically (a temporary folder swapped into place)."""
    from .outputs import FolderOutput

    with FolderOutput(out, "artifact", force) as w:
        write_artifact_files(handle, w.tmp, recipe, extra)
        return w.commit()


def temp_folder_for(out: Path) -> Path:
    """A fresh hidden folder beside ``out`` (same file system, so the final rename is atomic); for folders
    inside an output leanml already owns (an optimize study's work folder)."""
    from .outputs import dir_mode

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, dir_mode())
    return tmp


def replace_folder(tmp: Path, out: Path) -> None:
    """Put ``tmp`` at ``out``, replacing a folder leanml wrote there (never anything else)."""
    from .outputs import read_marker

    if out.exists():
        if out.is_dir() and any(out.iterdir()) and read_marker(out) is None:
            raise LeanmlError(f"{str(out)!r} holds files leanml did not write; it was kept")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def _guarded_write(path: Path, write) -> None:
    """Run ``write(path)``; a library that reports a failed write (a full disk, a size limit) as its own
    exception type is turned into the operating-system error it stands for."""
    try:
        write(path)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch's RuntimeError / safetensors' SafetensorError
        usage = shutil.disk_usage(path.parent)
        reason = "no space left on device" if usage.free < (1 << 20) else "the write failed"
        raise LeanmlError(f"could not write {str(path)!r}: {reason} ({_first_line(exc)})") from None


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


WEIGHTS_FILE = "model.safetensors"


def write_weights(tmp: Path, name: str, state: dict[str, torch.Tensor]) -> None:
    """One safetensors file of the artifact (leanml's header metadata; a failed write is one line)."""
    meta_st = {"format": "leanml", "version": str(FORMAT_VERSION)}
    _guarded_write(tmp / name, lambda p: save_file(state, str(p), metadata=meta_st))


def write_artifact_files(handle: ModelHandle, tmp: Path, recipe=None, extra: dict[str, str] | None = None) -> None:
    """Write the artifact's files into the (new, empty) folder ``tmp``."""
    model = handle.module
    state, aliases = _dedup_state(model)
    from .outputs import fault_point, read_marker, write_marker

    if read_marker(tmp) is None:
        write_marker(tmp, "artifact", complete=False)
    write_weights(tmp, WEIGHTS_FILE, state)
    fault_point("after-weights")
    write_artifact_meta(handle, tmp, recipe, extra, [WEIGHTS_FILE], aliases)


def write_artifact_meta(
    handle: ModelHandle,
    tmp: Path,
    recipe,
    extra: dict[str, str] | None,
    weight_files: list[str],
    aliases: dict[str, str],
) -> None:
    """Everything of the artifact but its weights, which are already in ``tmp`` as ``weight_files``
    (one file, or one per block for a model compressed layer by layer): config, tokenizer, leanml.json."""
    model = handle.module
    config = getattr(model, "config", None)
    base = "hf" if config is not None and hasattr(config, "save_pretrained") else "pickle"
    if base == "hf":
        config.save_pretrained(tmp)
    else:  # the module's structure only: its tensors live in model.safetensors
        import copy

        _guarded_write(tmp / "module.pt", lambda p: torch.save(copy.deepcopy(model).to("meta"), p))
    has_tokenizer = handle.tokenizer is not None and hasattr(handle.tokenizer, "save_pretrained")
    if has_tokenizer:
        handle.tokenizer.save_pretrained(tmp)
    meta = {
        "format": "leanml",
        "format_version": FORMAT_VERSION,
        "name": handle.name,
        "task": handle.task,
        "base": base,
        "model_class": type(model).__name__,
        "max_length": handle.max_length,
        "source": handle.source,
        "layers": _layer_specs(model),
        "tied": aliases,
        "recipe": (recipe if isinstance(recipe, dict) else recipe.to_dict()) if recipe is not None else None,
        "tokenizer": bool(has_tokenizer),
        "inputs": _input_specs(handle),
        "weights": list(weight_files),
        "files": {
            name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
            for name in (*weight_files, "module.pt")
            if (tmp / name).exists()
        },
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)


def load_artifact(folder: str | os.PathLike) -> ModelHandle:
    """Rebuild a model saved by :func:`save_artifact`."""
    LAYER_TYPES = _layer_types()

    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LeanmlError(f"'{folder}' has no readable {META_FILE} ({type(exc).__name__})") from None
    if meta.get("format") != "leanml" or meta.get("format_version", 0) > FORMAT_VERSION:
        raise LeanmlError(f"'{folder}/{META_FILE}' is not a leanml artifact of format ≤ {FORMAT_VERSION}")
    for name, info in (meta.get("files") or {}).items():
        f = folder / name
        if not f.is_file():
            raise LeanmlError(f"'{folder}' is missing {name}, which its {META_FILE} lists")
        if f.stat().st_size != info.get("bytes") or _sha256(f) != info.get("sha256"):
            raise LeanmlError(
                f"'{f}' does not match the checksum in its {META_FILE} (a damaged or partial copy); copy the artifact again"
            )
    state = {}
    for name in meta.get("weights") or [WEIGHTS_FILE]:
        try:
            state.update(load_file(str(folder / name)))
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise LeanmlError(f"'{folder}/{name}' is not readable ({str(exc).splitlines()[0]})") from None
    try:
        if meta["base"] == "hf":
            model = _empty_hf_model(folder, meta["task"])
        else:
            model = torch.load(folder / "module.pt", weights_only=False).to_empty(device="cpu")
    except LeanmlError:
        raise
    except Exception as exc:  # noqa: BLE001 - a deleted, edited or foreign config / structure file
        what = "config.json" if meta.get("base") == "hf" else "module.pt"
        raise LeanmlError(f"'{folder}' cannot be rebuilt from its {what}: {_first_line(exc)}") from None
    try:
        for name, spec in meta["layers"].items():
            if spec["type"] not in LAYER_TYPES:
                raise LeanmlError(f"layer {name!r} in '{folder}' has unknown type {spec['type']!r}")
            # packed weights are built empty: their tensors are the saved ones (assigned below), never allocated twice
            with torch.device("meta") if spec["type"] == "QuantLinear" else contextlib.nullcontext():
                set_module(model, name, LAYER_TYPES[spec["type"]].from_spec(spec))
        for alias, kept in meta["tied"].items():
            state.setdefault(alias, state[kept])
        if meta["base"] == "hf":
            _follow_saved_linear_shapes(model, state)
            if getattr(model, "pooler", None) is not None and not any(k.startswith("pooler.") for k in state):
                model.pooler = None  # an encoder saved without its pooler (embeddings never use it)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        del state
    except LeanmlError:
        raise
    except Exception as exc:  # noqa: BLE001 - shapes edited in leanml.json or config.json, layers renamed
        raise LeanmlError(f"'{folder}' does not match its layout ({META_FILE} / config.json): {_first_line(exc)}") from None
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing or unexpected or empty:
        missing = missing or empty
        raise LeanmlError(f"'{folder}' does not match its layout: missing {missing[:3]}, unexpected {unexpected[:3]}")
    from .quantize.modules import QuantEmbedding, bind_embeddings

    bind_embeddings(model)
    quant_tied = any(isinstance(m, QuantEmbedding) for m in model.modules())
    if meta["tied"] and hasattr(model, "tie_weights") and not quant_tied:
        model.tie_weights()
    from .models.loaders import check_finite

    check_finite(model, str(folder))
    uncached = _fit_dequantized_weights(model)
    tokenizer = None
    if meta["task"] != "generic":
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception:  # noqa: BLE001 - missing or damaged tokenizer files
            tokenizer = None
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        expected = meta.get("tokenizer", meta["task"] in ("causal-lm", "sentence-embedding", "sequence-classification"))
        too_small = tokenizer is not None and (len(tokenizer) < 2 or (vocab and len(tokenizer) < 0.5 * vocab))
        if expected and (tokenizer is None or too_small):
            raise LeanmlError(
                f"'{folder}' has no usable tokenizer files (tokenizer.json / vocab); copy them from the original model"
            )
    handle = ModelHandle(
        module=model.eval(),
        task=meta["task"],
        name=meta["name"],
        tokenizer=tokenizer,
        source=str(folder),
        artifact=folder,
        max_length=meta.get("max_length", 512),
    )
    handle.meta["recipe"] = meta.get("recipe")
    if uncached:
        handle.meta.setdefault("notes", []).append(uncached)
    from .models.inputs import default_example_inputs

    handle.example_inputs = _inputs_from_specs(meta.get("inputs")) or default_example_inputs(handle)
    return handle


def _input_specs(handle: ModelHandle) -> list[dict] | None:
    """The shapes (batch axis left out) and dtypes of a plain module's positional example inputs, so a
    reloaded artifact is fed inputs of the size it was made for, not a guess from its first layer."""
    inputs = handle.example_inputs
    if handle.tokenizer is not None or not isinstance(inputs, tuple | list) or not inputs:
        return None
    if not all(isinstance(t, torch.Tensor) and t.ndim >= 1 for t in inputs):
        return None
    return [{"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")} for t in inputs]


def _inputs_from_specs(specs: list[dict] | None, batch: int = 8) -> tuple | None:
    if not specs:
        return None
    gen = torch.Generator().manual_seed(0)
    out = []
    for spec in specs:
        dtype = getattr(torch, str(spec.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            return None
        shape = (batch, *[int(n) for n in spec.get("shape", [])])
        out.append(torch.rand(shape, generator=gen).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
    return tuple(out)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _follow_saved_linear_shapes(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give plain linear layers the shapes of their saved weights: structured pruning can shrink a layer
    in a way the saved config cannot describe (BERT heads: its config derives the head size from the
    head count)."""
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if type(module) is torch.nn.Linear and weight is not None and tuple(weight.shape) != tuple(module.weight.shape):
            set_module(model, name, torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None))


def _empty_hf_model(folder: Path, task: str) -> torch.nn.Module:
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(folder)
    from .models.loaders import auto_class

    auto = auto_class(task)
    if task == "sentence-embedding":
        config._attn_implementation = "eager"
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on "meta": the saved tensors are assigned
        model = auto.from_config(config)
    from .models.arch import normalise

    normalise(model)  # saved Conv1D layers are nn.Linear (see leanml.models.arch.normalise)
    return model


DEQUANTIZED_SHARE = 0.5  # of the available memory that the cached dequantized weights may take


def _fit_dequantized_weights(model: torch.nn.Module) -> str | None:
    """Packed layers keep their dequantized fp32 weight after the first call, unless all of them together
    would take more than :data:`DEQUANTIZED_SHARE` of the available memory (a model compressed because it
    did not fit): then each layer dequantizes on each call, slower but within memory. Returns a note then."""
    from .quantize.modules import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    need = sum(4 * m.in_features * m.out_features for m in layers)
    if not layers:
        return None
    import psutil

    avail = psutil.virtual_memory().available
    if need <= DEQUANTIZED_SHARE * avail:
        return None
    for m in layers:
        m.cache_weight = False
    return (
        f"the dequantized weights ({need / 1e9:.1f} GB in fp32) would take more than half of the available memory "
        f"({avail / 1e9:.1f} GB): each layer is dequantized on each call instead of once"
    )
