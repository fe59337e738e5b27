"""The perplexity of a causal LM larger than memory, computed one block at a time.

The model is opened on the ``meta`` device (:func:`leanml.models.lazy.open_lazy`). The embeddings are
read, every evaluation window is run up to the first block (its inputs are cached, as the calibration
runner caches them), then each block in turn is read, run on every window's cached hidden states and
dropped. Once the blocks are done the output head is read and the model's own forward runs once per
window with its stack replaced by stand-ins that hand the final hidden states on (so the final norm,
soft-capping, scaling or whatever the family applies after its blocks runs as written). The figure is
the one :func:`leanml.measure.quality.perplexity` gives for the whole model (same windows, same sum of
negative log-likelihoods), within float summation order; the peak memory is one block plus the
embeddings, the head and the windows' hidden states.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibrate.sequential import (
    _first_tensor,
    _hidden_of,
    capture_stack_inputs,
    copy_block_attributes,
    find_block_stack,
    stack_replaced,
)
from ..errors import LeanmlError
from ..models.handle import ModelHandle
from ..models.lazy import LAZY_KEY, materialize, release
from ..progress import memory_status, progress
from .quality import perplexity_result, window_nll


class _Relay(nn.Module):
    """Stands in for one block of the stack: hands on its input hidden states, or (the last one) the
    cached output of the real stack for the window being scored, in the real block's output form."""

    def __init__(self, shared: dict, last: bool, block: nn.Module) -> None:
        super().__init__()
        copy_block_attributes(self, block)
        self.shared, self.last = shared, last

    def forward(self, *args, **kwargs):
        hidden = self.shared["final"] if self.last else _hidden_of((args, kwargs))
        return (hidden,) if self.shared["tuple"] else hidden


@torch.no_grad()
def perplexity_layer_by_layer(
    handle: ModelHandle, windows: list[torch.Tensor], label: str = "perplexity, layer by layer", check=None
) -> dict:
    """:func:`~leanml.measure.quality.perplexity` of the lazily opened causal LM ``handle`` over
    ``windows`` (1-D token id tensors), one block in memory at a time; adds ``peak_status`` (the memory
    after the last block). ``check(where)`` runs after every block (a :class:`leanml.memory.MemoryCap`'s)."""
    from ..quantize.api import _output_heads

    weights = handle.meta.get(LAZY_KEY)
    if weights is None:
        raise LeanmlError(f"model {handle.name!r} was loaded whole; score it with leanml.measure.quality.perplexity")
    if handle.task != "causal-lm":
        raise LeanmlError(f"perplexity needs a causal LM; model {handle.name!r} is a {handle.task} model")
    if not windows:
        raise LeanmlError("no evaluation windows given; pass at least one")
    model = handle.module
    stack = find_block_stack(model)
    if stack is None:
        raise LeanmlError(f"model {handle.name!r} has no stack of blocks; load it whole to score it")
    stack_name, blocks = stack
    was_training = model.training
    model.eval()
    try:
        materialize(model, "", weights, skip=(stack_name, *_output_heads(model)))
        inputs = capture_stack_inputs(model, stack_name, blocks, list(windows))
        calls, inputs.calls = inputs.calls, []
        shared: dict = {"tuple": False, "final": None}
        done = [0]

        def status() -> str:
            if check is not None:
                check(f"block {done[0]} of {len(blocks)} of the perplexity pass")
            return memory_status()

        for i in progress(range(len(blocks)), label, status=status):
            prefix = f"{stack_name}.{i}"
            materialize(model, prefix, weights)
            for k, call in enumerate(calls):
                out = blocks[i](*call[0], **call[1])
                shared["tuple"] = isinstance(out, (tuple, list))
                calls[k] = inputs.call(i + 1, k, _first_tensor(out)) if i + 1 < len(blocks) else ((_first_tensor(out),), {})
            release(blocks[i])
            done[0] += 1
            status()
        materialize(model, "", weights, skip=stack_name)
        finals = [_hidden_of(c) for c in calls]
        del calls
        relays = nn.ModuleList([_Relay(shared, j == len(blocks) - 1, blocks[j]) for j in range(len(blocks))])
        nlls, counts = [], []
        with stack_replaced(model, stack_name, relays):
            for window, final in zip(windows, finals, strict=True):
                shared["final"] = final
                out = handle.call({"input_ids": window[None]})
                nll, n = window_nll(_logits(out)[0].float(), window)
                nlls.append(nll)
                counts.append(n)
    finally:
        model.train(was_training)
    return {**perplexity_result(nlls, counts), "method": "layer by layer", "peak_status": memory_status()}


def _logits(out) -> torch.Tensor:
    from ..models import output_tensor

    return output_tensor(out)


def evaluate_layer_by_layer(handle: ModelHandle, data, split: str = "eval", check=None) -> dict | None:
    """:func:`~leanml.measure.quality.evaluate` for a lazily opened model: its perplexity on ``split`` of
    ``data`` one block at a time, on the windows the whole-model evaluation uses; None where the task's
    metric is not perplexity (an encoder, data without text)."""
    from .quality import EVAL_WINDOW, _check_perplexity_tokens, metric_for

    if metric_for(handle, data) != "perplexity":
        return None
    _check_perplexity_tokens(handle, data, split)
    windows = data.windows(handle.tokenizer, split, EVAL_WINDOW)
    result = perplexity_layer_by_layer(handle, windows, label=f"perplexity ({split}), layer by layer", check=check)
    return {**result, "bos": data.bos(handle.tokenizer) is not None, "split": split}
