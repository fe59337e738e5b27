"""Layer targeting, one way everywhere: module names, ``re:`` regular expressions, and an ignore list."""

from __future__ import annotations

import re

import torch

from .errors import LeanmlError


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.startswith(pattern + ".")


def default_ignore(task: str) -> list[str]:
    """Layers left alone unless the user says otherwise: a causal LM's output head (embeddings are
    never linear layers, so they are not selected anyway)."""
    return ["re:(^|\\.)lm_head$"] if task == "causal-lm" else []


def select_layers(
    model: torch.nn.Module,
    types: tuple[type, ...],
    targets: list[str] | None,
    ignore: list[str] | None,
    task: str = "generic",
    what: str = "layer",
) -> list[str]:
    """Names of the modules of ``types`` chosen by ``targets`` (all when empty) minus ``ignore``.

    A pattern that matches no module of those types is an error, so a typo never silently does nothing.
    """
    candidates = [n for n, m in model.named_modules() if isinstance(m, types) and n]
    ignore = default_ignore(task) if ignore is None else ignore
    kinds = "/".join(t.__name__ for t in types)
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


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name)


def set_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Replace the submodule called ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
