"""Device selection: the torch device and the ONNX Runtime execution providers to use.

``auto`` picks the best hardware present (CUDA, then Apple MPS, then CPU for torch; for ONNX Runtime
the accelerated providers this build offers, in order of preference, always ending with CPU so any
node an accelerator cannot run falls back).
"""

from __future__ import annotations

import torch

from ..errors import LeanmlError

DEVICES = ("auto", "cpu", "cuda", "mps")
# preferred first; CPU is always appended as the fallback
ORT_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "DmlExecutionProvider",
    "CoreMLExecutionProvider",
    "OpenVINOExecutionProvider",
)


def check_device_name(device) -> None:
    """Refuse a device name other than :data:`DEVICES` (whether the hardware is present is not checked)."""
    if not isinstance(device, str) or device not in DEVICES:
        raise LeanmlError(f"device {device!r} is not one of {', '.join(DEVICES)}")


def torch_device(device: str = "auto") -> torch.device:
    """The torch device for ``device`` (``auto``: cuda, then mps, then cpu); absent hardware is an error."""
    check_device_name(device)
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if device == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if device == "cuda" and not cuda:
        raise LeanmlError("device 'cuda' was asked for but torch sees no CUDA GPU (available: cpu)")
    if device == "mps" and not mps:
        raise LeanmlError("device 'mps' was asked for but torch sees no Apple GPU (available: cpu)")
    return torch.device(device)


def ort_providers(device: str = "auto", available: list[str] | None = None) -> list[str]:
    """ONNX Runtime providers for ``device``, most preferred first, CPU last.

    ``available`` defaults to what the installed onnxruntime offers (a parameter so the choice is
    testable without the hardware).
    """
    check_device_name(device)
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    wanted = {
        "cuda": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider"),
        "mps": ("CoreMLExecutionProvider",),
        "auto": ORT_PREFERENCE,
    }[device]
    chosen = [p for p in ORT_PREFERENCE if p in wanted and p in available]
    if device != "auto" and not chosen:
        raise LeanmlError(f"device {device!r} was asked for but onnxruntime offers only {', '.join(available)}")
    return chosen + ["CPUExecutionProvider"]
