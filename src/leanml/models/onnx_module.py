"""An ONNX file run by ONNX Runtime, wrapped as an ``nn.Module`` so it is measured like any model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import LeanmlError
from .handle import ModelHandle

_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


class OrtModule(torch.nn.Module):
    """Calls an ``onnxruntime.InferenceSession``; positional or keyword tensors in, tensors out."""

    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None):
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        # the CPU arena and memory pattern stay on: measured in a fresh process (leanml.measure.serving)
        # on MiniLM int8 at batch 25 x 128, turning the arena off raised the peak by 55-140 MiB and the
        # other memory options (memory pattern, prepacking, initializer allocator) moved it by < 4 MiB
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers or ort.get_available_providers())
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise LeanmlError(f"ONNX file '{path}' could not be loaded by ONNX Runtime: {str(exc).splitlines()[0]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *args, **kwargs):
        feed = dict(zip(self.input_names, args, strict=False))
        feed.update({k: v for k, v in kwargs.items() if k in self.input_names})
        feed = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in feed.items()}
        outs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def example_feed(session, batch: int = 1) -> dict:
    """Random inputs matching the session's declared inputs (symbolic dims become ``batch`` or 16)."""
    gen = np.random.default_rng(0)
    feed = {}
    for meta in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (batch if j == 0 else 16) for j, d in enumerate(meta.shape)]
        dtype = _NP.get(meta.type, np.float32)
        if np.issubdtype(dtype, np.integer):
            value = np.ones(shape, dtype) if "mask" in meta.name else gen.integers(0, 100, size=shape).astype(dtype)
        else:
            value = gen.standard_normal(shape).astype(dtype)
        feed[meta.name] = torch.from_numpy(value)
    return feed


def load_onnx(path: Path, task: str | None = None) -> ModelHandle:
    module = OrtModule(path)
    handle = ModelHandle(
        module=module, task=task or "generic", name=Path(path).stem, source=str(path), artifact=Path(path), runtime="onnxruntime"
    )
    handle.example_inputs = example_feed(module.session)
    return handle
