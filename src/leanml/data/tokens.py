"""Token windows that follow the model's tokenizer: a BOS token starts every window when the tokenizer
adds one (Gemma, Llama 3), nothing is added when it adds none (SmolLM2, GPT-2).

A window of ``W`` tokens is ``BOS + (W-1)`` text tokens (``W-1`` next-token predictions; the BOS
position is never a target, the first text token is predicted from it), or ``W`` text tokens when the
tokenizer has no BOS. The text tokens of consecutive windows are contiguous and do not overlap.
"""

from __future__ import annotations

import torch

from ..errors import LeanmlError

PROBE = "Hello world, this is a probe."


def bos_id(tokenizer) -> int | None:
    """The id of the BOS token ``tokenizer`` puts at the start of a text by default, or None.

    Found by tokenizing a probe string with and without special tokens: BOS is when the default call
    gives ``bos_token_id`` followed by the plain tokens. A tokenizer that adds only EOS/SEP at the end,
    or nothing, has no BOS (None); so has one that cannot be probed.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or not isinstance(bos, int) or isinstance(bos, bool):
        return None
    try:
        plain = list(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
        default = list(tokenizer(PROBE)["input_ids"])
    except Exception:  # noqa: BLE001 - a tokenizer that cannot be probed is taken as adding nothing
        return None
    if len(default) > len(plain) and default[0] == bos and (not plain or plain[0] != bos):
        return bos
    return None


def text_ids(tokenizer, text: str) -> list[int]:
    """The text tokens of ``text`` (no special tokens: windows add BOS themselves)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_windows(ids: torch.Tensor, window: int, bos: int | None = None, min_tokens: int = 2) -> list[torch.Tensor]:
    """Non-overlapping windows of at most ``window`` tokens over the token stream ``ids`` (1-D).

    With ``bos`` None: ``ids`` cut every ``window`` tokens. With a BOS id: each window is the BOS
    followed by the next ``window - 1`` text tokens. A short tail is kept when it has at least
    ``min_tokens`` tokens (BOS included), i.e. at least one next-token prediction.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    if bos is None:
        out = [ids[i : i + window] for i in range(0, len(ids), window)]
    else:
        if window < 2:
            raise LeanmlError(f"a window of {window} token(s) has no room for text after the BOS token; use 2 or more")
        step = window - 1
        head = torch.tensor([bos], dtype=torch.long)
        out = [torch.cat([head, ids[i : i + step]]) for i in range(0, len(ids), step)]
    return [w for w in out if len(w) >= min_tokens]


def tokenizer_windows(tokenizer, ids: torch.Tensor, window: int, min_tokens: int = 2) -> list[torch.Tensor]:
    """:func:`token_windows` with the BOS rule of ``tokenizer`` (:func:`bos_id`)."""
    return token_windows(ids, window, bos_id(tokenizer), min_tokens)


__all__ = ["bos_id", "text_ids", "token_windows", "tokenizer_windows"]
