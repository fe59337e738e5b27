"""Memory-bounded layer-by-layer calibration (the "sequential" scheme of GPTQ/AWQ).

For a model built as a stack of blocks (the largest ``nn.ModuleList`` of same-type children that holds
target linears, e.g. ``model.layers`` of a llama or ``encoder.layer`` of a BERT):

1. the inputs of the first block (positional and keyword arguments: hidden states, attention mask,
   position embeddings, ...) are captured for every calibration window by a forward pre-hook that stops
   the forward right there;
2. for each block in turn, a callback receives a :class:`BlockContext`; it can gather the statistics of
   any of the block's target linears with :meth:`BlockContext.collect` (one
   :class:`~leanml.calibrate.hessian.HessianAccumulator` per group of linears that read the same input
   tensor, e.g. q/k/v or gate/up), and change the block (quantize its linears);
3. the (now modified) block is run on the cached inputs and its outputs replace them, so the next block
   is calibrated on what the QUANTIZED blocks before it produce (errors are fed forward).

Only one block's inputs are held in memory (plus one forward's activations); inside
:func:`activations_on_disk` not even those: each window's hidden states live in a file of their own,
read when that window runs and rewritten with the block's output (:class:`DiskCalls`). Targets outside the stack
(or every target, for a model without a stack) are handled afterwards in one extra "block" that is the
whole model run on the raw windows.

Windows: a 1-D integer tensor is called as ``model(input_ids=w[None])``, another tensor as ``model(w)``,
a dict as ``model(**w)`` and a tuple/list as ``model(*w)``. ``use_cache=False`` is passed when the model
accepts it, and any ``past_key_values`` a block receives is dropped.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanml.calibrate.hessian import HessianAccumulator, outlier_row_weights
from leanml.distributed import all_reduce_sum, shard, world
from leanml.errors import LeanmlError
from leanml.models.lazy import return_free_memory
from leanml.progress import progress

Call = tuple[tuple, dict]  # (args, kwargs) of one forward call


class _Stop(Exception):
    """Raised by a hook to end a forward early."""


def find_block_stack(model: nn.Module, targets: Sequence[str] = ()) -> tuple[str, nn.ModuleList] | None:
    """The ``(name, ModuleList)`` of the model's stack of blocks, or None.

    Candidates are ``nn.ModuleList``s whose children all have the same type; with ``targets`` only those
    holding at least one target count. The one holding the most targets wins, then the longest.
    """
    best: tuple[tuple[int, int], str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(child) for child in mod}) != 1:
            continue
        prefix = f"{name}." if name else ""
        held = sum(1 for t in targets if t.startswith(prefix))
        if targets and held == 0:
            continue
        key = (held, len(mod))
        if best is None or key > best[0]:
            best = (key, name, mod)
    return None if best is None else (best[1], best[2])


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def window_call(model: nn.Module, window: Any) -> Call:
    """The ``(args, kwargs)`` that feed one calibration window to ``model`` (see the module docstring)."""
    # the first parameter that holds data (a model loaded layer by layer keeps the others on "meta")
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))

    def move(x: Any) -> Any:
        return x.to(device) if isinstance(x, torch.Tensor) else x

    if isinstance(window, dict):
        args, kwargs = (), {k: move(v) for k, v in window.items()}
    elif isinstance(window, (tuple, list)):
        args, kwargs = tuple(move(v) for v in window), {}
    elif isinstance(window, torch.Tensor):
        if window.dim() == 1 and not window.is_floating_point():
            args, kwargs = (), {"input_ids": move(window)[None]}
        else:
            args, kwargs = (move(window),), {}
    else:
        raise LeanmlError(
            f"calibration window of type {type(window).__name__} is not supported; "
            "use a token id tensor, a tensor, a dict of tensors or a tuple of tensors"
        )
    if "use_cache" not in kwargs and _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


def _clean_kwargs(kwargs: dict) -> dict:
    out = dict(kwargs)
    for key in ("past_key_values", "past_key_value"):
        if key in out:
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    for key in ("hidden_states", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise LeanmlError(f"cannot find the hidden states in a block output of type {type(out).__name__}")


def _replace_hidden(call: Call, hidden: torch.Tensor) -> Call:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise LeanmlError("cannot find the hidden states among the block's inputs (no positional argument, no hidden_states)")


def _hidden_of(call: Call) -> torch.Tensor:
    args, kwargs = call
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise LeanmlError("cannot find the hidden states among the block's inputs (no positional argument, no hidden_states)")


_OFFLOAD: contextvars.ContextVar[Path | None] = contextvars.ContextVar("leanml_activations_on_disk", default=None)


@contextlib.contextmanager
def activations_on_disk(folder: str | Path | None):
    """Inside this context :func:`run_sequential` keeps the blocks' cached inputs in a temporary folder
    made under ``folder`` (removed when the run ends), instead of in memory. None keeps them in memory."""
    token = _OFFLOAD.set(None if folder is None else Path(folder))
    try:
        yield
    finally:
        _OFFLOAD.reset(token)


class DiskCalls:
    """The cached block inputs of every window with each window's hidden states in a file of its own
    (``torch.save``; read back whole on access, so only the window that runs is in memory). The other
    arguments (masks, rotary tables, positions: ``tokens x head_dim`` at most) stay in memory. Indexing
    reads a call, assigning one writes its hidden states, as with the list it replaces."""

    def __init__(self, calls: Sequence[Call], folder: Path, tag: str = "calls"):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(dir=folder, prefix=f".leanml-{tag}-"))
        self._rest: list[Call] = []
        try:
            for call in calls:
                self.append(call)
        except BaseException:
            self.close()
            raise

    def append(self, call: Call) -> None:
        self._rest.append(_replace_hidden(call, None))  # type: ignore[arg-type]
        self[len(self._rest) - 1] = call

    def clear(self) -> None:
        for k in range(len(self._rest)):
            self._path(k).unlink(missing_ok=True)
        self._rest.clear()

    def rest(self) -> list[Call]:
        """Every window's call without its hidden states (nothing read from disk)."""
        return list(self._rest)

    def _path(self, k: int) -> Path:
        return self.folder / f"{k:06d}.pt"

    def __len__(self) -> int:
        return len(self._rest)

    def __getitem__(self, k: int) -> Call:
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        k %= len(self)
        hidden = torch.load(self._path(k), weights_only=True)
        return _replace_hidden(self._rest[k], hidden)

    def __setitem__(self, k: int, call: Call) -> None:
        hidden = _hidden_of(call).detach().contiguous()
        tmp = self._path(k).with_suffix(".tmp")
        try:
            torch.save(hidden, tmp)
            tmp.replace(self._path(k))
        except (OSError, RuntimeError) as exc:
            tmp.unlink(missing_ok=True)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LeanmlError(
                f"cannot write the calibration inputs to '{self.folder}' ({first}); free disk space there or use fewer "
                "calibration windows"
            ) from None
        self._rest[k] = _replace_hidden(call, None)  # type: ignore[arg-type]

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]

    def copy(self, tag: str) -> DiskCalls:
        return DiskCalls(self, self.folder.parent, tag)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _linear_input(args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor):
        raise LeanmlError("a target linear was called without a tensor input")
    return x


@dataclass
class BlockContext:
    """One block being calibrated. ``targets`` are the full names of its target linears in call order;
    ``stages`` groups them by shared input tensor (e.g. ``[[q, k, v], [o], [gate, up], [down]]``)."""

    index: int
    prefix: str  # full name of the block ("" for the whole model)
    module: nn.Module
    targets: list[str]
    stages: list[list[str]]
    linears: dict[str, nn.Linear]
    calls: list[Call] | DiskCalls = field(repr=False)  # DiskCalls inside activations_on_disk
    outlier_factor: float | None = None
    hessian_dtype: torch.dtype = torch.float32
    dense_module: nn.Module | None = field(default=None, repr=False)  # the block before any change
    dense_calls: list[Call] | DiskCalls | None = field(default=None, repr=False)  # its inputs in the unchanged model

    def stage_of(self, name: str) -> list[str]:
        for stage in self.stages:
            if name in stage:
                return stage
        raise LeanmlError(f"{name!r} is not a target linear of block {self.prefix!r}")

    @torch.no_grad()
    def run(self) -> None:
        """Run the block on every cached input, for hooks to observe (the outputs are dropped)."""
        for args, kwargs in self.calls:
            self.module(*args, **kwargs)

    @torch.no_grad()
    def collect(self, names: Sequence[str], early_stop: bool = True) -> dict[str, HessianAccumulator]:
        """Run the block on every cached input and return a HessianAccumulator per name (shared by the
        names that read the same input). With ``early_stop`` the forward ends as soon as every named
        linear has been called once (each linear is assumed to be called once per forward)."""
        accs: dict[str, HessianAccumulator] = {}
        feeders: dict[str, HessianAccumulator] = {}
        for stage in self.stages:
            wanted = [n for n in stage if n in names]
            if wanted:
                acc = HessianAccumulator(dtype=self.hessian_dtype, outlier_factor=self.outlier_factor)
                accs.update({n: acc for n in wanted})
                feeders[wanted[0]] = acc
        missing = [n for n in names if n not in accs]
        if missing:
            raise LeanmlError(f"{missing[0]!r} is not a target linear of block {self.prefix!r}")
        fired: set[str] = set()
        want = set(names)

        def hook(name: str) -> Callable:
            def pre(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
                if name in feeders:
                    x = _linear_input(args, kwargs)
                    feeders[name].add(x if x.device.type == "cpu" else x.cpu())
                fired.add(name)
                if early_stop and fired >= want:
                    raise _Stop

            return pre

        handles = [self.linears[n].register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
        try:
            for args, kwargs in self.calls:
                fired.clear()
                with contextlib.suppress(_Stop):
                    self.module(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for acc in feeders.values():
            acc.reduce_across_ranks()
        return_free_memory()  # a forward's temporaries are freed now; keep the heap from holding them
        return accs

    @torch.no_grad()
    def collect_dense_cross(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(XᵀX, XᵀD)`` (float64, ``(in, in)``) for the target linear ``name``: X are its inputs in the
        model as it is now (rows are tokens), D the inputs of the same linear in the unchanged model on
        the same windows. Rows are weighted as :meth:`collect` weights them (``outlier_factor``, from X).
        Needs ``run_sequential(..., dense_inputs=True)``."""
        if self.dense_module is None or self.dense_calls is None:
            raise LeanmlError(
                f"block {self.prefix!r} has no dense reference; run_sequential needs dense_inputs=True "
                "and the target must sit in the stack of blocks"
            )
        if name not in self.linears:
            raise LeanmlError(f"{name!r} is not a target linear of block {self.prefix!r}")
        relative = name[len(self.prefix) + 1 :]
        dense_linear = dict(self.dense_module.named_modules())[relative]
        dense_x = _inputs_of(self.dense_module, dense_linear, self.dense_calls)
        xtx = xtd = None
        for k, x in enumerate(_inputs_of(self.module, self.linears[name], self.calls)):
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            d = dense_x[k].reshape(-1, x.shape[-1]).to(torch.float64)
            if self.outlier_factor is not None:
                w = outlier_row_weights(x.norm(dim=1), self.outlier_factor)
                xw = x * w[:, None]
            else:
                xw = x
            xtx = xw.T @ x if xtx is None else xtx + xw.T @ x
            xtd = xw.T @ d if xtd is None else xtd + xw.T @ d
        return all_reduce_sum(xtx), all_reduce_sum(xtd)


def _inputs_of(module: nn.Module, linear: nn.Module, calls: list[Call]) -> list[torch.Tensor]:
    """The input ``linear`` receives in each forward of ``module`` on ``calls`` (cpu; forwards end early)."""
    seen: list[torch.Tensor] = []

    def pre(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _linear_input(args, kwargs)
        seen.append(x.detach().cpu())
        raise _Stop

    handle = linear.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for args, kwargs in calls:
            with contextlib.suppress(_Stop):
                module(*args, **kwargs)
    finally:
        handle.remove()
    if len(seen) != len(calls):
        raise LeanmlError("a target linear was not called once per calibration window")
    return seen


@torch.no_grad()
def _probe_stages(module: nn.Module, call: Call, linears: dict[str, nn.Linear]) -> list[list[str]]:
    """Targets in call order, grouped by identical input tensors (one forward on one cached input)."""
    order: list[tuple[str, torch.Tensor]] = []

    def hook(name: str) -> Callable:
        def pre(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if all(n != name for n, _ in order):
                order.append((name, _linear_input(args, kwargs)))

        return pre

    handles = [lin.register_forward_pre_hook(hook(n), with_kwargs=True) for n, lin in linears.items()]
    try:
        module(*call[0], **call[1])
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    inputs: list[torch.Tensor] = []
    for name, x in order:
        for k, seen in enumerate(inputs):
            if x is seen:
                stages[k].append(name)
                break
        else:
            stages.append([name])
            inputs.append(x)
    never = [n for n in linears if all(n != m for m, _ in order)]
    return stages + [[n] for n in never]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, windows: Sequence[Any], store=None) -> list[Call]:
    """The ``(args, kwargs)`` the first block receives for each window (the forward stops there),
    appended to ``store`` (a list, or :class:`DiskCalls` to keep them on disk as they come) and returned."""
    calls = store if store is not None else []

    def pre(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((tuple(args), _clean_kwargs(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for w in windows:
            args, kwargs = window_call(model, w)
            try:
                model(*args, **kwargs)
            except _Stop:
                continue
            raise LeanmlError("the model's forward never reached its first block; it cannot be calibrated layer by layer")
    finally:
        handle.remove()
    return calls


def copy_block_attributes(stand_in: nn.Module, block: nn.Module) -> None:
    """Give ``stand_in`` the plain attributes of ``block`` that a model's loop over its blocks may read
    (``attention_type``, ``layer_idx``, ...)."""
    for key, value in vars(block).items():
        if not key.startswith("_") and key != "training" and isinstance(value, (str, int, float, bool, type(None))):
            setattr(stand_in, key, value)


class _Recorder(nn.Module):
    """Stands in for block ``index`` while the stack's inputs are captured: records what the block
    receives and hands its hidden states on (as a tensor or a 1-tuple); the last one ends the forward."""

    def __init__(self, index: int, block: nn.Module, sink: dict, last: bool) -> None:
        super().__init__()
        copy_block_attributes(self, block)
        self.index, self.sink, self.last = index, sink, last

    def forward(self, *args, **kwargs):
        self.sink[self.index] = (tuple(args), _clean_kwargs(kwargs))
        if self.last:
            raise _Stop
        hidden = _hidden_of((args, kwargs))
        return (hidden,) if self.sink["tuple"] else hidden


def _same(a: Any, b: Any) -> bool:
    """The same arguments: equal tensors (the same object, or equal values), equal other values, recursively."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if a is b:
            return True
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and a.device.type != "meta"
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values without a plain comparison
        return a is b


@dataclass
class StackInputs:
    """What every block of a stack receives for each window. ``calls`` are block 0's calls (hidden states
    included; the runner takes them over); :meth:`call` gives block ``i``'s call for window ``k`` with
    the given hidden states: its own masks and position tables where the family gives blocks different
    ones (Gemma 2/3's sliding and global layers), else block 0's."""

    calls: list[Call]
    later: dict[int, list[Call | None]] = field(default_factory=dict)  # block -> per window, None = as block 0
    rest: list[Call] = field(default_factory=list, repr=False)  # block 0's calls without their hidden states

    def __post_init__(self) -> None:
        if isinstance(self.calls, DiskCalls):
            self.rest = self.calls.rest()
        else:
            self.rest = [_replace_hidden(c, None) for c in self.calls]  # type: ignore[arg-type]

    def call(self, i: int, k: int, hidden: torch.Tensor) -> Call:
        own = self.later[i][k] if i in self.later else None
        return _replace_hidden(own if own is not None else self.rest[k], hidden)


_LAYER_KINDS = ("attention_type", "layer_type", "is_sliding", "sliding_window", "use_sliding_window")


def _kinds_differ(blocks: nn.ModuleList) -> str | None:
    """An attribute naming the kind of layer (sliding or global attention, ...) that differs between blocks."""
    for key in _LAYER_KINDS:
        values = {repr(getattr(b, key, None)) for b in blocks}
        values |= {repr(getattr(getattr(b, "self_attn", None), key, None)) for b in blocks}
        if len(values) > 1:
            return key
    return None


def _stack_parent(model: nn.Module, stack_name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = stack_name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


@contextlib.contextmanager
def stack_replaced(model: nn.Module, stack_name: str, stand_ins: nn.ModuleList):
    """Inside this context the model's stack ``stack_name`` is ``stand_ins`` (its own forward then runs
    them); the real stack is put back however the context ends."""
    parent, child = _stack_parent(model, stack_name)
    real = getattr(parent, child)
    setattr(parent, child, stand_ins)
    try:
        yield
    finally:
        setattr(parent, child, real)


def _record_windows(model: nn.Module, windows: Sequence[Any], sink: dict, n_blocks: int, first, later: dict) -> None:
    """One forward per window with recorders in place of the blocks: block 0's call into ``first``, each
    later block's into ``later[i]`` (None where it equals block 0's but for the hidden states)."""
    for w in windows:
        sink.update(dict.fromkeys(range(n_blocks)))
        args, kwargs = window_call(model, w)
        with contextlib.suppress(_Stop):
            model(*args, **kwargs)
        missing = [i for i in range(n_blocks) if sink[i] is None]
        if missing:
            raise RuntimeError(f"the forward did not reach block {missing[0]}")
        first.append(sink[0])
        base = _replace_hidden(sink[0], None)  # type: ignore[arg-type]
        for i in range(1, n_blocks):
            mine = _replace_hidden(sink[i], None)  # type: ignore[arg-type]
            later[i].append(None if _same(mine, base) else mine)


def capture_stack_inputs(
    model: nn.Module, stack_name: str, blocks: nn.ModuleList, windows: Sequence[Any], store=None
) -> StackInputs:
    """The inputs of every block of the stack ``stack_name`` for each window, in one forward per window
    that does not run the blocks (each is replaced by a recorder for the pass, so blocks may be on
    ``meta``). Block 0's calls go to ``store`` as they come (a list by default; :class:`DiskCalls` keeps
    them on disk). Where that forward cannot run with stand-ins, every block gets block 0's arguments,
    unless the blocks are of different kinds (sliding and global attention): then a one-line error."""
    parent, child = _stack_parent(model, stack_name)
    first = store if store is not None else []
    if len(blocks) < 2 or getattr(parent, child, None) is not blocks:
        return StackInputs(capture_block_inputs(model, blocks[0], windows, first))
    later: dict[int, list[Call | None]] = {i: [] for i in range(1, len(blocks))}
    failure: Exception | None = None
    for as_tuple in (False, True):
        sink: dict = {"tuple": as_tuple}
        recorders = nn.ModuleList([_Recorder(i, blocks[i], sink, i == len(blocks) - 1) for i in range(len(blocks))])
        first.clear()
        for lst in later.values():
            lst.clear()
        try:
            with stack_replaced(model, stack_name, recorders):
                _record_windows(model, windows, sink, len(blocks), first, later)
            failure = None
            break
        except (MemoryError, LeanmlError):
            raise
        except Exception as exc:  # noqa: BLE001 - this forward cannot run with stand-ins: try the other output form
            failure = exc
    if failure is not None:
        first.clear()
        key = _kinds_differ(blocks)
        if key is not None:
            why = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
            raise LeanmlError(
                f"the blocks of {stack_name!r} differ in {key!r} and need their own inputs, but the model's forward "
                f"cannot run with stand-ins for them ({why}); load a supported family"
            ) from None
        return StackInputs(capture_block_inputs(model, blocks[0], windows, first))
    return StackInputs(first, {i: v for i, v in later.items() if any(c is not None for c in v)})


def _resolve_targets(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    out: dict[str, nn.Linear] = {}
    for name in targets:
        mod = modules.get(name)
        if mod is None:
            raise LeanmlError(
                f"target {name!r} is not a module of the model; pass full names such as 'model.layers.0.mlp.up_proj'"
            )
        if not isinstance(mod, nn.Linear):
            raise LeanmlError(f"target {name!r} is a {type(mod).__name__}, not an nn.Linear; only linear layers can be targets")
        out[name] = mod
    if not out:
        raise LeanmlError("no target linears given; pass at least one nn.Linear name")
    return out


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    windows: Sequence[Any],
    targets: Sequence[str],
    process_block: Callable[[BlockContext], None],
    *,
    outlier_factor: float | None = None,
    hessian_dtype: torch.dtype = torch.float32,
    label: str = "calibrate",
    dense_inputs: bool = False,
    before_block: Callable[[int, str, nn.Module], None] | None = None,
    after_block: Callable[[int, str, nn.Module], None] | None = None,
    status: Callable[[], str] | None = None,
    run_last: bool = False,
) -> None:
    """Calibrate ``model`` block by block: ``process_block(ctx)`` is called once per block holding
    targets (in forward order), then once for the targets outside the stack, if any (see the module
    docstring). ``outlier_factor`` and ``hessian_dtype`` configure the accumulators of ``ctx.collect``.
    With ``dense_inputs`` each block of the stack also gets a copy of itself as it was before
    ``process_block`` and its inputs in the unchanged model (``ctx.dense_module``, ``ctx.dense_calls``), for
    :meth:`BlockContext.collect_dense_cross`; this holds a second set of cached inputs.

    ``before_block(i, prefix, block)`` runs before anything touches block ``i`` of the stack and
    ``after_block(i, prefix, block)`` once it is done (processed and run for the next block's inputs):
    a model loaded layer by layer reads a block's weights in the first and writes and drops them in the
    second. Each block but the last is run on its cached inputs after ``process_block`` (its outputs
    feed the next); ``run_last`` runs the last one too, for hooks that observe that forward. In a
    ``torchrun`` job each rank calibrates on its share of the windows and
    :meth:`BlockContext.collect` sums the statistics over ranks, so every rank sees the statistics of
    all the windows (see :mod:`leanml.distributed`)."""
    if len(windows) == 0:
        raise LeanmlError("no calibration windows given; pass at least one")
    _, size = world()
    if size > 1 and len(windows) < size:
        raise LeanmlError(f"{len(windows)} calibration windows cannot be split over {size} processes; pass at least {size}")
    windows = shard(windows)
    linears = _resolve_targets(model, targets)
    was_training = model.training
    model.eval()
    disk: list[DiskCalls] = []
    try:
        stack = find_block_stack(model, list(linears))
        remaining = dict(linears)
        if stack is not None:
            stack_name, blocks = stack
            offload = _OFFLOAD.get()
            store: list | DiskCalls = [] if offload is None else DiskCalls([], offload)
            if isinstance(store, DiskCalls):
                disk.append(store)
            inputs = capture_stack_inputs(model, stack_name, blocks, windows, store)  # on disk as they come
            calls, inputs.calls = inputs.calls, []
            dense_calls = None
            if dense_inputs:
                dense_calls = calls.copy("dense") if isinstance(calls, DiskCalls) else list(calls)
                if isinstance(dense_calls, DiskCalls):
                    disk.append(dense_calls)
            for i in progress(range(len(blocks)), label, status=status):
                block = blocks[i]
                prefix = f"{stack_name}.{i}" if stack_name else str(i)
                if before_block is not None:
                    before_block(i, prefix, block)
                mine = {n: m for n, m in linears.items() if n.startswith(prefix + ".")}
                if mine:
                    for n in mine:
                        remaining.pop(n)
                    stages = _probe_stages(block, calls[0], mine)
                    dense_block = copy.deepcopy(block) if dense_inputs else None
                    ctx = BlockContext(
                        i,
                        prefix,
                        block,
                        [n for s in stages for n in s],
                        stages,
                        mine,
                        calls,
                        outlier_factor,
                        hessian_dtype,
                        dense_block,
                        dense_calls,
                    )
                    process_block(ctx)
                else:
                    dense_block = block
                if i + 1 < len(blocks):  # the next block's inputs: its own masks/positions, these outputs
                    if dense_calls is not None:
                        for k, (args, kwargs) in enumerate(dense_calls):
                            dense_calls[k] = inputs.call(i + 1, k, _first_tensor(dense_block(*args, **kwargs)))
                    for k, (args, kwargs) in enumerate(calls):
                        calls[k] = inputs.call(i + 1, k, _first_tensor(block(*args, **kwargs)))
                elif run_last:  # nothing reads its outputs; the hooks watching its forward do
                    for args, kwargs in calls:
                        block(*args, **kwargs)
                del dense_block
                if after_block is not None:
                    after_block(i, prefix, block)
            del calls, dense_calls
        if remaining:
            calls = [window_call(model, w) for w in windows]
            stages = _probe_stages(model, calls[0], remaining)
            ctx = BlockContext(
                -1, "", model, [n for s in stages for n in s], stages, remaining, calls, outlier_factor, hessian_dtype
            )
            process_block(ctx)
    finally:
        for d in disk:
            d.close()
        model.train(was_training)
