"""The registry: technique config type → the function that applies it. Explicit, in one place."""

from __future__ import annotations

from collections.abc import Callable

from .config import TechniqueConfig
from .errors import LeanmlError

Handler = Callable[..., object]
_HANDLERS: dict[type[TechniqueConfig], Handler] = {}


def register(config_type: type[TechniqueConfig]) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        return fn

    return deco


def handler_for(config: TechniqueConfig) -> Handler:
    _load_handlers()
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise LeanmlError(f"no handler registered for technique {config.kind!r}") from None


def _load_handlers() -> None:
    # The modules below call `register` for their configs; importing them here keeps the table explicit.
    from .distill import api as _distill  # noqa: F401
    from .prune import api as _prune  # noqa: F401
    from .prune.finetune import apply_finetune  # noqa: F401
    from .quantize import api  # noqa: F401
