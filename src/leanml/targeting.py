"""Layer targeting, one way everywhere: module names, ``re:`` regular expressions, and an ignore list."""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from .errors import LeanmlError

PATTERN_HELP = "use a module name or 're:REGEX' (a Python regular expression searched in the layer name)"


@lru_cache(maxsize=512)
def _compiled(regex: str) -> re.Pattern:
    return re.compile(regex)


def check_pattern(pattern: object, field: str = "targets") -> str:
    """``pattern`` itself when it is a usable layer pattern; a one-line error naming it otherwise (an
    empty string, a non-string, or a ``re:`` pattern that is not a valid regular expression)."""
    if not isinstance(pattern, str):
        raise LeanmlError(f"{field} entry {pattern!r} is a {type(pattern).__name__}, not a string; {PATTERN_HELP}")
    if not pattern.strip() or pattern == "re:":
        raise LeanmlError(f"{field} entry {pattern!r} is empty; {PATTERN_HELP}")
    if pattern.startswith("re:"):
        try:
            _compiled(pattern[3:])
        except (re.error, RecursionError, OverflowError) as exc:
            raise LeanmlError(f"{field} pattern {pattern!r} is not a valid regular expression ({exc}); {PATTERN_HELP}") from None
    return pattern


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return _compiled(check_pattern(pattern)[3:]).search(name) is not None
    return name == pattern or name.startswith(pattern + ".")


def default_ignore(task: str) -> list[str]:
    """Layers left alone unless the user says otherwise: a causal LM's output head (embeddings are
    never linear layers, so they are not selected anyway)."""
    return ["re:(^|\\.)lm_head$"] if task == "causal-lm" else []


def select_names(
    candidates: list[str],
    targets: list[str] | None,
    ignore: list[str] | None,
    task: str = "generic",
    kinds: str = "layer",
    what: str = "layer",
) -> list[str]:
    """The ``candidates`` (layer names) chosen by ``targets`` (all when empty) minus ``ignore``.

    A pattern that matches no candidate is an error, so a typo never silently does nothing. ``kinds``
    names the layer types in that message (e.g. ``Linear``).
    """
    ignore = default_ignore(task) if ignore is None else ignore
    for field, patterns in (("targets", targets or []), ("ignore", ignore)):
        for pattern in patterns:
            check_pattern(pattern, field)
    for pattern in list(targets or []) + [p for p in ignore if p not in default_ignore(task)]:
        if not any(_matches(n, pattern) for n in candidates):
            raise LeanmlError(
                f"layer pattern {pattern!r} matches no {kinds} layer of this model "
                f"(e.g. {', '.join(candidates[:3]) or 'none'}); use a module name or 're:REGEX'"
            )
    chosen = [n for n in candidates if not targets or any(_matches(n, p) for p in targets)]
    chosen = [n for n in chosen if not any(_matches(n, p) for p in ignore)]
    if not chosen:
        raise LeanmlError(f"no {kinds} {what} is left to transform after targets={targets} and ignore={ignore}")
    return chosen


def select_layers(
    model: torch.nn.Module,
    types: tuple[type, ...],
    targets: list[str] | None,
    ignore: list[str] | None,
    task: str = "generic",
    what: str = "layer",
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """Names of the modules of ``types`` chosen by ``targets`` (all when empty) minus ``ignore``
    (see :func:`select_names`); names in ``exclude`` are not candidates.

    A pattern that matches no module of those types is an error, so a typo never silently does nothing.
    """
    candidates = [n for n, m in model.named_modules() if isinstance(m, types) and n and n not in exclude]
    kinds = "/".join(t.__name__ for t in types)
    return select_names(candidates, targets, ignore, task, kinds, what)


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name)


def set_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Replace the submodule called ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
