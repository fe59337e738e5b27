"""Models larger than memory: a Hugging Face folder or a GGUF file opened without reading its weights.

:func:`open_lazy` builds the model on the ``meta`` device (accelerate's ``init_empty_weights``: names,
shapes and buffers, no parameter memory) and returns a :class:`LazyWeights` that reads one tensor at a
time from the folder's safetensors files (memory-mapped; bf16/fp16 converted to fp32 on read), or, for
a ``.gguf`` file of an architecture leanml writes, a :class:`GGUFWeights` that dequantizes one file
tensor at a time (memory-mapped; no fp32 copy of the model is written).
:func:`materialize` gives one sub-module (a block, the embeddings) its real weights and :func:`release`
sends it back to ``meta``, so a run that walks the blocks in order holds one block at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import LeanmlError
from .handle import ModelHandle

LAZY_KEY = "lazy_weights"  # handle.meta key of the LazyWeights of a lazily opened model


@dataclass
class LazyWeights:
    """The tensors of a folder's ``*.safetensors`` files, by name, read on demand."""

    folder: Path
    files: dict[str, Path]  # tensor name -> file
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    transposed: set[str] = field(default_factory=set)  # names of Conv1D weights, stored (in, out)
    prefix: str = ""  # the model's base prefix ("model."), tried when a name is not found as it is

    @classmethod
    def open(cls, folder: str | Path) -> LazyWeights:
        from safetensors import safe_open

        folder = Path(folder)
        paths = sorted(folder.glob("*.safetensors"))
        if not paths:
            raise LeanmlError(f"folder '{folder}' has no .safetensors files; layer-by-layer loading reads safetensors only")
        files, shapes, dtypes = {}, {}, {}
        for path in paths:
            try:
                with safe_open(str(path), framework="pt") as fh:
                    for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                        sl = fh.get_slice(key)
                        files[key], shapes[key], dtypes[key] = path, tuple(sl.get_shape()), str(sl.get_dtype())
            except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
                raise LeanmlError(f"'{path}' is not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None
        return cls(folder, files, shapes, dtypes)

    def key(self, name: str) -> str | None:
        if name in self.files:
            return name
        if self.prefix and name.startswith(self.prefix) and name[len(self.prefix) :] in self.files:
            return name[len(self.prefix) :]
        if self.prefix and self.prefix + name in self.files:
            return self.prefix + name
        return None

    def __contains__(self, name: str) -> bool:
        return self.key(name) is not None

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as fp32 (its own dtype for integer tensors), read from disk now."""
        from safetensors import safe_open

        key = self.key(name)
        if key is None:
            raise LeanmlError(f"'{self.folder}' holds no tensor {name!r} (the weight files do not match config.json)")
        with safe_open(str(self.files[key]), framework="pt") as fh:
            t = fh.get_tensor(key)
        if t.is_floating_point():
            t = t.to(torch.float32)
        return t.T.contiguous() if key in self.transposed or name in self.transposed else t

    def fp32_bytes(self) -> int:
        """What the weights take in memory as fp32 (the in-memory path's footprint)."""
        total = 0
        for key, shape in self.shapes.items():
            n = 1
            for d in shape:
                n *= d
            total += n * (4 if self.dtypes[key].startswith(("F", "BF")) else 1)
        return total


class GGUFWeights:
    """The tensors of a GGUF file by model parameter name, each dequantized to fp32 when read (the file
    is memory-mapped: reading a block touches that block's bytes only). A parameter the file splits or
    permutes (llama.cpp's rotary row order, a fused layer's parts) is put back together from its slots."""

    def __init__(self, plan):
        from ..export.gguf import slot_parameter

        self.plan = plan
        self.folder = plan.path  # named in messages, as a folder's path is
        self.shapes = {n: tuple(p.shape) for n, p in plan.model.named_parameters()}
        self.slots: dict[str, list] = {}
        for slot in plan.slots:
            self.slots.setdefault(slot_parameter(slot), []).append(slot)

    def key(self, name: str) -> str | None:
        return name if name in self.slots else None

    def __contains__(self, name: str) -> bool:
        return name in self.slots

    def get(self, name: str) -> torch.Tensor:
        """Parameter ``name`` as fp32, dequantized from the file now."""
        slots = self.slots.get(name)
        if not slots:
            raise LeanmlError(f"'{self.folder}' holds no tensor for {name!r} (the file does not match its metadata)")
        if len(slots) == 1 and slots[0].rows is None:
            return self.plan.values(slots[0])
        shape = self.shapes[name]
        out = torch.empty(shape)
        for slot in slots:
            data = self.plan.values(slot)
            want = (len(slot.rows), *shape[1:])
            if tuple(data.shape) != want:
                raise LeanmlError(
                    f"GGUF tensor {slot.name} of '{self.folder}' is {tuple(data.shape)}, but {want} for the model its "
                    "metadata describes"
                )
            out[slot.rows] = data
        return out

    def fp32_bytes(self) -> int:
        return self.plan.fp32_bytes()


def fp32_bytes_of_folder(folder: str | Path) -> int | None:
    """The fp32 size of a Hugging Face folder's safetensors weights, from the file headers (None when
    it has none or they are unreadable); nothing is loaded."""
    try:
        return LazyWeights.open(folder).fp32_bytes()
    except LeanmlError:
        return None


def fp32_bytes_of_gguf(path: str | Path) -> int | None:
    """The fp32 size of a GGUF file's tensors, from its header (None when it is unreadable)."""
    try:
        import gguf
    except ImportError:
        raise LeanmlError("reading a .gguf file needs the package gguf: pip install gguf") from None
    try:
        return sum(int(t.n_elements) * 4 for t in gguf.GGUFReader(str(path)).tensors)
    except Exception:  # noqa: BLE001 - a truncated or foreign file: the whole load says why
        return None


def open_lazy_gguf(path: str | Path, name: str | None = None) -> ModelHandle:
    """A :class:`ModelHandle` of the causal LM in a GGUF file, all its parameters on ``meta``; its
    ``meta[LAZY_KEY]`` is a :class:`GGUFWeights`. Architectures leanml writes only (its own reader's);
    another is a one-line error (loading it whole converts it through transformers)."""
    from ..export.gguf import gguf_plan
    from .inputs import default_example_inputs

    path = Path(path)
    try:
        plan = gguf_plan(path)
    except ImportError:
        raise LeanmlError("loading a .gguf file needs the package gguf: pip install gguf") from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        from .loaders import _first_line

        raise LeanmlError(f"GGUF file '{path}' could not be read as a causal LM: {_first_line(exc)}") from None
    if plan is None:
        raise LeanmlError(
            f"GGUF file '{path}' is not of an architecture leanml reads tensor by tensor (those its GGUF export "
            "writes); load it whole (--no-lazy) with enough memory"
        )
    try:
        tokenizer = plan.tokenizer()
    except (OSError, ValueError, KeyError) as exc:
        from .loaders import _first_line

        raise LeanmlError(f"the tokenizer of GGUF file '{path}' cannot be read: {_first_line(exc)}") from None
    handle = ModelHandle(
        module=plan.model,
        task="causal-lm",
        name=name or path.stem,
        tokenizer=tokenizer,
        source=str(path),
        artifact=path,
        max_length=512,
    )
    handle.meta[LAZY_KEY] = GGUFWeights(plan)
    handle.example_inputs = default_example_inputs(handle)
    return handle


def open_lazy(folder: str | Path, task: str | None = None, name: str | None = None) -> ModelHandle:
    """A :class:`ModelHandle` of the Hugging Face folder (or ``.gguf`` file) whose parameters are all on
    ``meta``; its ``meta[LAZY_KEY]`` reads them (see the module docstring)."""
    import transformers as tf

    if Path(folder).suffix.lower() == ".gguf" and Path(folder).is_file():
        if task not in (None, "causal-lm"):
            raise LeanmlError(f"a GGUF file holds a causal LM; task {task!r} is not one")
        return open_lazy_gguf(folder, name)

    from accelerate import init_empty_weights

    from . import loaders
    from .arch import _conv1d_type, normalise
    from .inputs import default_example_inputs

    folder = Path(folder)
    loaders._check_config_file(folder)
    weights = LazyWeights.open(folder)
    try:
        with loaders._quiet_transformers():
            config = tf.AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - any failure to parse the config is the folder's fault
        raise LeanmlError(f"folder '{folder}' is not a loadable Hugging Face model: {loaders._first_line(exc)}") from None
    task = task or loaders._detect_task(folder, config)
    auto = loaders.auto_class(task)
    if task == "sentence-embedding":
        config._attn_implementation = "eager"
    with init_empty_weights(include_buffers=False), loaders._quiet_transformers():
        model = auto.from_config(config, dtype=torch.float32)
    conv1d = _conv1d_type()
    if conv1d is not None:
        weights.transposed = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, conv1d)}
    normalise(model)
    weights.prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    model.eval()
    tokenizer = None
    if task == "image-classification":
        tokenizer = loaders._load_processor(folder, tf.AutoImageProcessor, "image processor")
    else:
        tokenizer = loaders._load_processor(folder, tf.AutoTokenizer, "tokenizer")
    handle = ModelHandle(
        module=model,
        task=task,
        name=name or folder.name,
        tokenizer=tokenizer,
        source=str(folder),
        artifact=folder,
        max_length=128 if task == "sentence-embedding" else 512,
    )
    handle.meta[LAZY_KEY] = weights
    handle.example_inputs = default_example_inputs(handle)
    return handle


def _tied_source(model: nn.Module, module: nn.Module, pname: str) -> nn.Parameter | None:
    """The input embedding's weight when ``module.pname`` is the output head tied to it."""
    config = getattr(model, "config", None)
    if pname != "weight" or not getattr(config, "tie_word_embeddings", False):
        return None
    out = _embeddings(model, "output")
    if out is None or out is not module:
        return None
    emb = _embeddings(model, "input")
    return emb.weight if emb is not None and emb.weight.device.type != "meta" else None


def _embeddings(model: nn.Module, which: str) -> nn.Module | None:
    get = getattr(model, f"get_{which}_embeddings", None)
    try:
        return get() if get is not None else None
    except (NotImplementedError, AttributeError):
        return None


@torch.no_grad()
def materialize(
    model: nn.Module, prefix: str, weights: LazyWeights | GGUFWeights, skip: str | tuple[str, ...] | None = None
) -> int:
    """Read the real weights of every ``meta`` parameter of the sub-module ``prefix`` ("" for the whole
    model) from ``weights``, leaving out the sub-module(s) ``skip`` (e.g. the stack of blocks); returns
    the bytes read. An output head tied to the input embedding takes the embedding's parameter, so the tie
    holds."""
    root = model.get_submodule(prefix) if prefix else model
    skips = (skip,) if isinstance(skip, str) else tuple(skip or ())
    read = 0
    modules = list(root.named_modules())
    # the input embedding first, so a tied head finds it whatever the module order
    first = _embeddings(model, "input")
    modules.sort(key=lambda item: item[1] is not first)
    for mname, module in modules:
        full = f"{prefix}.{mname}" if prefix and mname else (prefix or mname)
        if any(full == s or full.startswith(s + ".") for s in skips):
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            key = f"{full}.{pname}" if full else pname
            if key not in weights:
                tied = _tied_source(model, module, pname)
                if tied is None:
                    what = "its metadata" if str(weights.folder).lower().endswith(".gguf") else "config.json"
                    raise LeanmlError(f"'{weights.folder}' holds no tensor {key!r} (the weights do not match {what})")
                module._parameters[pname] = tied
                continue
            t = weights.get(key)
            if tuple(t.shape) != tuple(param.shape):
                raise LeanmlError(
                    f"tensor {key!r} in '{weights.folder}' is {tuple(t.shape)}, but {tuple(param.shape)} in the model "
                    "its config.json describes"
                )
            module._parameters[pname] = nn.Parameter(t, requires_grad=False)
            read += t.numel() * t.element_size()
    return read


def release(module: nn.Module) -> None:
    """Send every parameter and buffer of ``module`` to ``meta`` (its memory is freed once nothing else
    holds it) and hand the freed memory back to the operating system (:func:`return_free_memory`)."""
    module.to("meta")
    return_free_memory()


def return_free_memory() -> bool:
    """Ask the C allocator to give its free memory back to the operating system; True where it could.

    glibc keeps freed blocks of a few MB in its heap once its adaptive mmap threshold has grown, so a
    run that reads, quantizes and frees one block after another keeps every block's pages resident
    (measured: the resident memory of a 30-block model grew by ~50 MB a block without this, and stayed
    flat with it). ``malloc_trim(0)`` returns those pages; elsewhere (musl, macOS, Windows) this does
    nothing.
    """
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


_LIBC = None  # the C library once looked up (False where it has no malloc_trim)


def on_meta(module: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters())
