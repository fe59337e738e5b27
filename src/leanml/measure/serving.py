"""Peak memory of the process that serves a model, measured in a fresh process.

``profile`` reads the high-water mark of its own process, which inside ``leanml optimize`` also holds
the original model, cached candidates and calibration data. :func:`serving_memory` instead starts a
new Python process (``python -m leanml.measure.serving spec.json``) that loads only what serves the
model and runs the workload ``profile`` times:

* a torch handle is written as a leanml artifact (:func:`leanml.artifact.write_artifact_files`) into a
  temporary folder and rebuilt there with :func:`leanml.artifact.load_artifact`, as a user loads it;
* an ONNX Runtime handle (:class:`~leanml.accelerate.llm_onnx.OrtCausalLM` or
  :class:`~leanml.models.onnx_module.OrtModule`) is reopened from its ONNX file with the same class,
  providers and thread count; the torch model it was prepared from is never loaded there.

The workload is a greedy prefill of ``input_ids`` plus ``new_tokens`` decode steps for a causal LM
(:func:`~leanml.measure.cost.greedy_decode`), one forward call otherwise; it runs ``repeats`` times.
The peak is the child's kernel high-water mark (``VmHWM``) over its whole life: imports, loading and
serving (the mark is read once the model is loaded, then reset through ``/proc/self/clear_refs`` so
that the workload's own peak is known too); where ``/proc`` is absent, the largest RSS a sampling
thread saw. ``idle_bytes`` is the child's RSS after its imports (leanml and so torch, and onnxruntime
or transformers) and before the model is loaded: what any Python process serving it pays before the
first weight. A torch model's peak includes its load: :func:`~leanml.artifact.load_artifact` builds
the model with its own (random) weights and then copies the saved ones in, so a float model passes
through about twice its weights while loading.

A handle that cannot be measured this way raises a one-line :class:`~leanml.errors.LeanmlError`
rather than returning a partial figure: another runtime, a module that cannot be written as an
artifact (a class the child cannot import, such as one defined inside a function; TorchScript), an
ONNX file that is gone (prepare the runtime with a ``workdir``), a child that fails or runs past
``timeout``. The child is killed and the temporary folder removed on every way out, a
``KeyboardInterrupt`` included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LeanmlError

if TYPE_CHECKING:
    from ..models.handle import ModelHandle

RESULT_FILE = "result.json"
SPEC_FILE = "spec.json"
INPUTS_FILE = "inputs.pt"
LOG_FILE = "child.log"


# ----------------------------------------------------------------------------------------------------
# parent side
# ----------------------------------------------------------------------------------------------------


def serving_memory(
    handle: ModelHandle,
    inputs,
    *,
    threads: int | None = None,
    new_tokens: int = 8,
    timeout: float = 900.0,
    repeats: int = 3,
) -> dict:
    """Peak and idle resident memory (bytes) of a fresh process serving ``handle`` on ``inputs``.

    Returns ``{"peak_bytes", "idle_bytes", "method" ("VmHWM" or "rss-sampling"), "runtime"}`` and, as
    extra detail, ``loaded_bytes`` (RSS once the model is loaded), ``serve_peak_bytes`` (the peak while
    the workload ran, ``None`` when the high-water mark cannot be reset), ``threads`` and ``timing``
    (medians over the runs after the first: ``prefill_s`` and ``decode_step_s`` for a causal LM,
    ``call_s`` otherwise). ``threads`` defaults to the handle's own count (the ONNX Runtime session's,
    or torch's current one).
    """
    from .system import check_threads

    check_threads(threads)
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise LeanmlError(f"new_tokens {new_tokens!r} is not accepted; give a whole number ≥ 1")
    if not isinstance(repeats, int) or repeats < 1:
        raise LeanmlError(f"repeats {repeats!r} is not accepted; give a whole number ≥ 1")
    if not timeout or timeout <= 0:
        raise LeanmlError(f"timeout {timeout!r} is not accepted; give a number of seconds > 0")
    tmp = Path(tempfile.mkdtemp(prefix="leanml-serving-"))
    try:
        spec = _write_spec(handle, inputs, tmp, threads, new_tokens, repeats)
        result = _run_child(spec, tmp, timeout, handle.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["runtime"] = handle.runtime
    return result


def _write_spec(handle, inputs, tmp: Path, threads: int | None, new_tokens: int, repeats: int) -> Path:
    import torch

    spec: dict = {"task": handle.task, "new_tokens": new_tokens, "repeats": repeats, "name": handle.name}
    if handle.runtime == "torch":
        from ..artifact import write_artifact_files

        folder = tmp / "model"
        folder.mkdir()
        try:
            write_artifact_files(handle, folder)
        except LeanmlError as exc:
            raise LeanmlError(f"model {handle.name!r} cannot be written for the serving-memory process: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a module torch cannot pickle (a local class, TorchScript)
            raise LeanmlError(
                f"model {handle.name!r} cannot be written as an artifact for the serving-memory process: {_first_line(exc)}"
            ) from None
        spec.update(kind="artifact", path=str(folder), threads=threads or torch.get_num_threads())
    elif handle.runtime == "onnxruntime":
        from ..accelerate.llm_onnx import OrtCausalLM
        from ..models.onnx_module import OrtModule

        module = handle.module
        if isinstance(module, OrtCausalLM):
            kind = "ort-llm"
        elif isinstance(module, OrtModule):
            kind = "ort-module"
        else:
            raise LeanmlError(
                f"model {handle.name!r} runs on onnxruntime through a {type(module).__name__}; serving memory "
                "is measured for OrtCausalLM and OrtModule sessions"
            )
        path = Path(module.path)
        if not path.is_file():
            raise LeanmlError(
                f"the ONNX file '{path}' of model {handle.name!r} is gone; prepare the runtime with a workdir "
                "that outlives the session to measure its serving memory"
            )
        session = module.session
        own = session.get_session_options().intra_op_num_threads
        spec.update(
            kind=kind,
            path=str(path),
            threads=threads or (own if own > 0 else None),
            providers=list(session.get_providers()),
        )
    else:
        raise LeanmlError(
            f"serving memory is measured on the torch and onnxruntime runtimes; model {handle.name!r} runs on {handle.runtime}"
        )
    # plain containers of compact copies: a prompt sliced from a tokenized corpus shares (and would save)
    # the corpus's whole storage, and a BatchEncoding is not a weights-only type
    copy = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    if isinstance(inputs, dict) or hasattr(inputs, "keys"):
        inputs = {k: copy(v) for k, v in dict(inputs).items()}
    elif isinstance(inputs, (tuple, list)):
        inputs = tuple(copy(v) for v in inputs)
    else:
        inputs = copy(inputs)
    torch.save(inputs, tmp / INPUTS_FILE)
    spec.update(inputs=str(tmp / INPUTS_FILE), result=str(tmp / RESULT_FILE), sys_path=[p for p in sys.path if p])
    path = tmp / SPEC_FILE
    path.write_text(json.dumps(spec))
    return path


def _run_child(spec: Path, tmp: Path, timeout: float, name: str) -> dict:
    # the child's output goes to a file, not a pipe: a chatty child never blocks on a full pipe
    with open(tmp / LOG_FILE, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "leanml.measure.serving", str(spec)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so every thread and helper goes with it
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LeanmlError(
                f"the serving-memory process of model {name!r} did not finish within {timeout:g} s; it was stopped"
            ) from None
        finally:  # a timeout, an interrupt, any exception: the child does not outlive this call
            if proc.poll() is None:
                _kill(proc)
    result = None
    with contextlib.suppress(OSError, json.JSONDecodeError):
        result = json.loads((tmp / RESULT_FILE).read_text())
    if isinstance(result, dict) and "error" in result:
        raise LeanmlError(f"the serving-memory process of model {name!r} failed: {result['error']}")
    if code != 0 or not isinstance(result, dict):
        why = f"signal {-code}" if code < 0 else f"exit code {code}"
        raise LeanmlError(
            f"the serving-memory process of model {name!r} ended with {why} and no result: {_last_line(tmp / LOG_FILE)}"
        )
    return result


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL is not ignored; the bound is a safety net
        proc.wait(timeout=30)


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    return lines[-1][:300] if lines else "(it printed nothing)"


def _first_line(exc: BaseException) -> str:
    text = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------------
# child side
# ----------------------------------------------------------------------------------------------------


def _status_bytes(key: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (bytes), or None without /proc."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss() -> int:
    value = _status_bytes("VmRSS")
    if value is not None:
        return value
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _Sampler:
    """The largest RSS seen every millisecond (where ``/proc/self/status`` has no ``VmHWM``)."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.window = self.peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            self.peak, self.window = max(self.peak, rss), max(self.window, rss)
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        rss = self.proc.memory_info().rss  # a last look, so a peak held to the end is never missed
        self.peak, self.window = max(self.peak, rss), max(self.window, rss)


def _child_imports(kind: str) -> None:
    """What serving needs before the model: torch always; transformers or onnxruntime by kind."""
    import torch  # noqa: F401

    if kind == "artifact":
        import transformers  # noqa: F401

        import leanml.artifact  # noqa: F401
    else:
        import onnxruntime  # noqa: F401

        import leanml.accelerate.llm_onnx  # noqa: F401
        import leanml.models.onnx_module  # noqa: F401


def _load(spec: dict):
    kind, threads = spec["kind"], spec.get("threads")
    if kind == "artifact":
        from leanml.artifact import load_artifact

        return load_artifact(spec["path"]).module
    if kind == "ort-llm":
        from leanml.accelerate.llm_onnx import OrtCausalLM

        return OrtCausalLM(spec["path"], threads=threads, providers=spec.get("providers"))
    if kind == "ort-module":
        from leanml.models.onnx_module import OrtModule

        return OrtModule(Path(spec["path"]), threads=threads, providers=spec.get("providers"))
    raise LeanmlError(f"unknown serving kind {kind!r}")


def _call(module, inputs):
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, (tuple, list)):
        return module(*inputs)
    return module(inputs)


def _workload(module, inputs, spec: dict) -> dict:
    import torch

    runs, new_tokens = spec["repeats"], spec["new_tokens"]
    with torch.no_grad():
        if spec["task"] == "causal-lm":
            from leanml.measure.cost import greedy_decode

            if not isinstance(inputs, dict) or "input_ids" not in inputs:
                raise LeanmlError("a causal LM is served on a dict of inputs with input_ids")
            prefills, steps = [], []
            for _ in range(runs):
                prefill, step_times, _ = greedy_decode(module, inputs["input_ids"], new_tokens)
                prefills.append(prefill)
                steps.append(step_times)
            warm = slice(1, None) if runs > 1 else slice(None)
            warm_steps = [s for run in steps[warm] for s in run]
            return {
                "prefill_s": statistics.median(prefills[warm]),
                "decode_step_s": statistics.median(warm_steps) if warm_steps else None,
                "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "new_tokens": new_tokens,
            }
        calls = []
        for _ in range(runs):
            t0 = time.perf_counter()
            _call(module, inputs)
            calls.append(time.perf_counter() - t0)
        return {"call_s": statistics.median(calls[1:] if runs > 1 else calls)}


def _child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result_path = Path(spec["result"])
    for entry in spec.get("sys_path", []):  # the parent's import path: a pickled module's classes resolve
        if entry not in sys.path:
            sys.path.append(entry)
    try:
        result = _measure(spec)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent as one line
        message = str(exc) if isinstance(exc, LeanmlError) else _first_line(exc)
        result = {"error": " ".join(message.split()) or type(exc).__name__}
        code = 1
    else:
        code = 0
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, result_path)
    return code


def _measure(spec: dict) -> dict:
    kind = spec["kind"]
    _child_imports(kind)
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    sampler = None if _status_bytes("VmHWM") is not None else _Sampler()
    idle = _rss()
    inputs = torch.load(spec["inputs"], weights_only=True)
    module = _load(spec)
    if hasattr(module, "eval"):
        module.eval()
    loaded = _rss()
    if sampler is not None:
        sampler.window = loaded
        timing = _workload(module, inputs, spec)
        sampler.stop()
        peak, serve_peak, method = sampler.peak, sampler.window, "rss-sampling"
    else:
        load_peak = _status_bytes("VmHWM") or loaded  # the imports and the load
        resettable = _reset_hwm()  # from here the mark counts the workload only
        timing = _workload(module, inputs, spec)
        hwm = _status_bytes("VmHWM") or _rss()
        peak, serve_peak, method = max(load_peak, hwm), (hwm if resettable else None), "VmHWM"
    return {
        "peak_bytes": int(peak),
        "idle_bytes": int(idle),
        "loaded_bytes": int(loaded),
        "serve_peak_bytes": None if serve_peak is None else int(serve_peak),
        "method": method,
        "threads": spec.get("threads"),
        "timing": timing,
    }


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
