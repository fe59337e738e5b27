"""`optimize`: the cheapest model within a quality budget, searched across techniques and runtimes.

The data's splits keep the choice honest (:mod:`leanml.data.datasets`): calibration uses ``calib``;
every candidate is scored on ``select`` and only those scores choose; ``eval`` (the test split) is
scored once, after the search, for the original, the chosen model and the Pareto front, and the
budget's verdict is given on it. A candidate is within budget only when the upper end of the 90%
paired bootstrap interval of its quality drop is (:mod:`leanml.search.noise`), and it must pass the
fidelity guard on held-out calibration-domain inputs (:mod:`leanml.search.guard`). Cost is measured on
the candidate's runtime, and memory as the peak resident memory of a process that serves only it.

Each trial applies a recipe from :mod:`leanml.search.space` to a copy of the model, checks a cheap,
label-free fidelity first, and only then serves the model on its runtime. Work that does not depend
on the trial is done once per process: the original's measurements, per-layer sensitivity, and the
calibrated 4-bit pass that every "some layers at 8 bits" mix is assembled from. Trials live in an
Optuna study (SQLite in the output folder by default, any database URL with ``storage``), so a killed
search resumes and several workers can share one study.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ..artifact import replace_folder, temp_folder_for, write_artifact_files
from ..config import WeightOnly
from ..data import load_data
from ..errors import LeanmlError
from ..measure import profile
from ..measure.hardware import get_profile
from ..measure.quality import evaluate, fidelity
from ..measure.record import write_atomic
from ..models import ModelHandle, load_model
from ..outputs import dead_writer, pid_alive
from ..pipeline import apply_recipe
from ..progress import progress
from .budget import (
    Budget,
    check_objective,
    higher_is_better,
    objective_label,
    objective_value,
    parse_drop,
    parse_duration,
    parse_memory,
    serving_peak,
)
from .guard import fidelity_score, floor_for, score_name
from .noise import drop_interval
from .pareto import pareto_front
from .space import build_space

STUDY_FILE = "study.db"
WORK = ".work"
GATE = 3.0  # a cheap estimate this many times over the budget skips the full measurement
DISTILL_MIN_SECONDS = {"causal-lm": 3600.0}  # time budget from which distilled students join the space
DISTILL_MIN_DEFAULT = 1200.0
CACHE_MODELS = 2  # compressed models kept per process for the same recipe on another runtime


@dataclass
class OptimizeResult:
    handle: ModelHandle | None  # the chosen model (torch), or None when no trial completed
    chosen: dict | None
    trials: list[dict]
    summary: dict
    out: Path | None


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def clone(handle: ModelHandle) -> ModelHandle:
    """An independent copy of a torch model handle (the tokenizer is shared: it is never changed)."""
    meta = {k: copy.deepcopy(v) for k, v in handle.meta.items() if k not in ("torch_handle", "runtime_report")}
    return dataclasses.replace(handle, module=copy.deepcopy(handle.module), meta=meta)


def point_key(point: dict) -> str:
    return json.dumps(point, sort_keys=True)


def estimate_drop(task: str, fid: dict | None, budget: Budget, base: float) -> float | None:
    """A label-free estimate of the quality drop, in the budget's units, where one is known.

    For causal LMs the mean per-token KL(original ‖ candidate) on a few windows bounds how much the
    log-perplexity can rise to first order, so ``exp(KL) - 1`` estimates the relative perplexity increase.
    """
    if task == "causal-lm" and fid and fid.get("mean_kl") is not None:
        rel = math.expm1(max(0.0, fid["mean_kl"]))
        return rel if budget.drop_type == "relative" else rel * abs(base)
    return None


def acceptable(r: dict) -> bool:
    """A complete trial within the budget (the upper end of its drop interval) and the memory limit."""
    return r["status"] == "complete" and bool(r["meets_budget"]) and r.get("memory_ok", True) is not False


def choose(records: list[dict]) -> tuple[dict | None, bool]:
    """The cheapest acceptable trial (ties: smaller drop); else the complete one closest to the budget."""
    done = [r for r in records if r["status"] == "complete"]
    ok = [r for r in done if acceptable(r)]
    if ok:
        return min(ok, key=lambda r: (r["objective"], r["quality_drop"], r["number"])), True
    if done:
        return min(done, key=lambda r: (not r.get("memory_ok", True), _upper(r), r["objective"], r["number"])), False
    return None, False


def _upper(r: dict) -> float:
    """The upper end of a trial's drop interval (its drop when it has none)."""
    return (r.get("drop_interval") or {}).get("high", r["quality_drop"])


def untrained_cut(recipe: dict | None) -> bool:
    """Whether a recipe removes structure (neurons, heads, filters, layers) with no recovery training."""
    steps = (recipe or {}).get("steps", [])
    kinds = {st.get("kind") for st in steps}
    return "prune-structured" in kinds and not kinds & {"distill", "finetune"}


# ----------------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------------


STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


def check_storage(url: str | None) -> None:
    """Refuse a storage URL that cannot work, before anything is created: an unknown scheme, a database
    driver that is not installed, or an SQLite file in a folder that cannot be written."""
    if url is None:
        return
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:  # noqa: BLE001 - sqlalchemy raises several types for a malformed URL
        raise LeanmlError(
            f"--storage {url!r} is not a database URL; accepted: sqlite:///path/study.db, postgresql://..., mysql://..."
        ) from None
    scheme = parsed.get_backend_name()
    if scheme not in STORAGE_SCHEMES:
        raise LeanmlError(f"--storage {url!r} has the unknown scheme {scheme!r}; accepted: {', '.join(STORAGE_SCHEMES)}")
    try:
        parsed.get_dialect()
    except Exception as exc:  # noqa: BLE001 - the driver module is missing
        raise LeanmlError(f"--storage {url!r}: its database driver is not installed ({str(exc).splitlines()[0]})") from None
    if scheme == "sqlite":
        db = parsed.database
        if not db or db == ":memory:":
            raise LeanmlError(f"--storage {url!r} is an in-memory SQLite database; give a file: sqlite:///path/study.db")
        from ..outputs import check_parent

        path = Path(db)
        if path.is_dir():
            raise LeanmlError(f"--storage {url!r} names a folder; give a file: sqlite:///{db.rstrip('/')}/study.db")
        check_parent(path, "--storage")
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise LeanmlError(f"--storage {url!r}: the file {db!r} cannot be read and written")
        if not path.parent.exists() or not os.access(path.parent, os.W_OK):
            raise LeanmlError(f"--storage {url!r}: the folder of {db!r} does not exist or is not writable")


def _lock_path(url: str | None) -> Path | None:
    """The lock file beside an SQLite study, which leanml's workers on this machine take turns through."""
    if url and url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///") :]).with_suffix(".lock")
    return None


def _queue_lock(url: str | None):
    """Held while a worker looks at the study's queue and changes it (the seeds, re-queued trials)."""
    import contextlib
    import fcntl

    path = _lock_path(url)
    if path is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def held():
        with open(path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    return held()


def _storage(url: str):
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    lock_path = _lock_path(url)

    class Storage(optuna.storages.RDBStorage):
        """SQLite has no ``SELECT ... FOR UPDATE``: two workers can both read a queued trial as waiting and
        both start it. Starting a trial (waiting -> running) is done under the lock file, so exactly one
        worker sees it waiting; other databases lock the row themselves."""

        def set_trial_state_values(self, trial_id, state, values=None):
            if lock_path is None or state != optuna.trial.TrialState.RUNNING:
                return super().set_trial_state_values(trial_id, state, values)
            with _queue_lock(url):
                return super().set_trial_state_values(trial_id, state, values)

    # workers that start together would race to create the schema of a new database (both insert the
    # schema version): on one machine they take turns through the lock file beside an SQLite file, and
    # a worker that still loses the race (another machine) retries once the winner has created it
    with _queue_lock(url):
        for attempt in range(5):
            try:
                return Storage(
                    url,
                    engine_kwargs=kwargs,
                    heartbeat_interval=20,
                    grace_period=90,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
                )
            except Exception as exc:  # noqa: BLE001 - sqlalchemy IntegrityError / OperationalError
                if attempt == 4 or type(exc).__name__ not in ("IntegrityError", "OperationalError"):
                    raise
                time.sleep(0.5 * (attempt + 1))


def _retried_numbers(study) -> set[int]:
    import warnings

    import optuna

    out = set()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for t in study.get_trials(deepcopy=False):
        if "retry_of" in t.user_attrs:
            out.add(int(t.user_attrs["retry_of"]))
        n = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
        if n is not None:
            out.add(n)
    return out


def recover_interrupted(study) -> list[int]:
    """Trials of workers that died on this host (or ended by an interrupt) are failed and queued again,
    once each, with the same parameters; finished trials are kept as they are."""
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    retried = _retried_numbers(study)
    requeued = []
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        worker = t.user_attrs.get("worker", "")
        if t.state == TrialState.RUNNING:
            w_host, _, pid = worker.rpartition(":")
            if w_host != host or not pid.isdigit() or pid_alive(int(pid)):
                continue  # another machine's trial: its heartbeat decides
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if t.number in retried or not t.params:
            continue
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        requeued.append(t.number)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return requeued


def _records(study) -> list[dict]:
    from optuna.trial import TrialState

    out = []
    attrs = study.user_attrs
    for t in study.get_trials(deepcopy=False):
        rec = t.user_attrs.get("record")
        if rec is not None:
            extra = {"test": attrs[f"test-{t.number}"]} if f"test-{t.number}" in attrs else {}
            out.append(
                dict(rec, number=t.number, retry_of=t.user_attrs.get("retry_of"), worker=t.user_attrs.get("worker"), **extra)
            )
        elif t.state == TrialState.RUNNING:
            out.append(
                {
                    "number": t.number,
                    "status": "running",
                    "label": t.user_attrs.get("label", ""),
                    "runtime": t.params.get("runtime"),
                    "params": t.params,
                }
            )
    return out


# ----------------------------------------------------------------------------------------------------
# the search
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Context:
    """What every trial of one search needs: the original, the data, the budget and the original's
    figures on the selection split."""

    handle: ModelHandle
    data: object
    budget: Budget
    objective: str
    hardware: str
    threads: int | None
    space: object
    base: float  # the original's quality on the selection split
    base_samples: dict  # ... and what it is made of (for bootstrap intervals)
    hib: bool
    work: Path
    models: dict
    gate: float
    floor: float
    max_memory: float | None
    inputs: object = None  # what profile feeds the model, for the serving-memory process


class _Search:
    def __init__(self, ctx: _Context):
        self.ctx = ctx
        self.handle, self.data, self.budget = ctx.handle, ctx.data, ctx.budget
        self.threads, self.space, self.work, self.models = ctx.threads, ctx.space, ctx.work, ctx.models
        self.durations: list[float] = []
        self.eval_seconds: list[float] = []
        self.exhausted = False
        # a recipe is compressed once per process and served on each runtime: the last compressed
        # models (a bounded few: each is a whole model in memory), and every recipe's runtime-independent
        # checks (fidelity, simulated quality), which can reject it on any runtime without compressing again
        self.compressed: dict[str, ModelHandle] = {}
        self.checks: dict[str, dict] = {}
        self.cache_size = CACHE_MODELS
        # calibrated passes that mixes are assembled from (recipe without its upgrade → model)
        self.passes: dict[str, ModelHandle] = {}

    def drop(self, base: float, value: float) -> float:
        return self.budget.drop(base, value, self.ctx.hib)

    # one point of the space, start to finish
    def run(self, point: dict, number: int) -> dict:
        from ..outputs import fault_point

        fault_point("optimize-in-trial")
        t0 = time.perf_counter()
        rec = {
            "label": self.space.label(point),
            "runtime": point["runtime"],
            "params": point,
            "status": "failed",
            "reason": None,
            "quality": None,
            "quality_drop": None,
            "drop_interval": None,
            "meets_budget": None,
            "memory_ok": None,
            "objective": None,
            "size_bytes": None,
            "fidelity": None,
            "fidelity_score": None,
            "estimate": None,
            "measurement": None,
            "recipe": None,
            "flags": [],
        }
        try:
            recipe = self.space.recipe(point)
            rec["recipe"] = recipe.to_dict()
            key = json.dumps([point.get("model", "original"), rec["recipe"]["steps"]], sort_keys=True, default=str)
            if self.checks.get(key, {}).get("status") == "rejected":  # fails before any runtime is involved
                rec.update(self.checks[key], reused="checks")
            else:
                cand = self._compressed(key, point, recipe, rec)
                rec.update(self._measure(cand, point, number, key))
                if rec["status"] == "complete" and rec["quality_drop"] < 0 and untrained_cut(rec["recipe"]):
                    rec["flags"].append("noise, not an improvement: a gain from an untrained structural cut")
        except Exception as exc:  # a technique that does not apply, a memory error...: recorded, search goes on
            rec["reason"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        self.durations.append(rec["seconds"])
        return rec

    def _compressed(self, key: str, point: dict, recipe, rec: dict) -> ModelHandle:
        """A fresh copy of the model compressed by ``recipe``: from the cache when this process made it
        recently (the cache keeps its own copy: runtimes and measurement never see it), assembled from
        a calibrated pass this process made when only the upgraded layers differ, else made now."""
        hit = self.compressed.get(key)
        if hit is not None:
            self.compressed[key] = self.compressed.pop(key)  # most recently used last
            rec["reused"] = "compressed model"
            return clone(hit)
        original = self.models[point.get("model", "original")]
        steps = recipe.steps
        # one calibrated weight-only pass is kept for the mixes assembled from it (its own trial included)
        if len(steps) == 1 and isinstance(steps[0], WeightOnly) and steps[0].method == "gptq":
            cand = self._assembled(point, original, steps[0], rec)
        else:
            cand = clone(original)
            apply_recipe(cand, recipe, self.data)
        if self.cache_size > 0 and _fits_in_memory(cand, self.cache_size + 2):
            while len(self.compressed) >= self.cache_size:
                self.compressed.pop(next(iter(self.compressed)))
            self.compressed[key] = clone(cand)
        return cand

    def _assembled(self, point: dict, original: ModelHandle, step: WeightOnly, rec: dict) -> ModelHandle:
        """``step`` applied as its definition says: the calibrated pass without the upgrade (made once per
        process and kept), then the upgraded layers re-quantized from the original's weights."""
        from ..quantize.api import upgrade_layers
        from ..recipe import Recipe

        plain = step.model_copy(update={"upgrade": []})
        pass_key = json.dumps([point.get("model", "original"), plain.model_dump()], sort_keys=True, default=str)
        base = self.passes.get(pass_key)
        if base is None:
            base = clone(original)
            apply_recipe(base, Recipe(name="pass", steps=[plain]), self.data)
            if _fits_in_memory(base, self.cache_size + 3):
                self.passes[pass_key] = base
        else:
            rec["reused"] = "calibrated pass"
        cand = clone(base)
        upgrade_layers(cand, original, step)
        return cand

    def _checks(self, cand: ModelHandle, key: str) -> dict:
        """The runtime-independent checks of a compressed model: the fidelity guard on the held-out
        check split, a cheap estimate of its drop, and for tasks whose evaluation is cheap, the
        simulated model's quality on the selection split; ``status`` ``rejected`` when the fidelity is
        under its floor or the estimate far over the budget. Remembered per recipe."""
        if key in self.checks:
            return self.checks[key]
        fid = fidelity(cand, self.handle, self.data, max_items=4, split=_check_split(self.data))
        score = fidelity_score(cand.task, fid)
        est = estimate_drop(cand.task, fid, self.budget, self.ctx.base)
        out = {"fidelity": fid, "fidelity_score": score, "estimate": est}
        limit = self.ctx.gate * max(self.budget.max_drop, 1e-9)
        if score is not None and score < self.ctx.floor:
            out.update(
                status="rejected",
                reason=f"fidelity guard: {score_name(cand.task)} {score:.4g} < {self.ctx.floor:g} on held-out inputs",
            )
        elif est is not None and est > limit:
            out.update(status="rejected", reason=f"cheap fidelity: estimated drop {est:.4g} > {self.ctx.gate:g}x budget")
        elif cand.task != "causal-lm":  # evaluation is cheap: check the simulated model before serving it
            q = evaluate(cand, self.data, split="select")
            if q is not None:
                drop = self.drop(self.ctx.base, q["value"])
                out["estimate"] = drop
                if drop > limit:
                    out.update(
                        status="rejected",
                        reason=f"selection quality before export {q['value']:.4g}: drop {drop:.4g} > {self.ctx.gate:g}x budget",
                    )
        self.checks[key] = out
        return out

    def _measure(self, cand: ModelHandle, point: dict, number: int, key: str) -> dict:
        from ..accelerate.runtimes import prepare

        checks = self._checks(cand, key)
        if checks.get("status") == "rejected":
            return dict(checks)
        out = {k: checks[k] for k in ("fidelity", "fidelity_score", "estimate")}
        rt = cand
        if point["runtime"] != "torch":
            rt = prepare(
                cand, point["runtime"], threads=self.threads, data=self.data, workdir=self.work / f"trial-{number}" / "onnx"
            )
        t0 = time.perf_counter()
        q = evaluate(rt, self.data, split="select", samples=True)
        self.eval_seconds.append(time.perf_counter() - t0)
        if q is None:
            raise LeanmlError(f"no quality metric for data {self.data.name!r} on {point['runtime']}")
        interval = drop_interval(self.ctx.base_samples, q.pop("samples"), self.drop)
        m = profile(rt, data=self.data, hardware=self.ctx.hardware, threads=self.threads, measure_quality=False)
        md = m.to_dict()
        md["quality"] = q
        md["serving_memory"] = _serving_memory(rt, self.ctx.inputs, self.threads)
        self._keep(cand, number)
        peak = serving_peak(md)
        return dict(
            out,
            status="complete",
            quality=q["value"],
            quality_drop=interval["drop"],
            drop_interval=interval,
            meets_budget=interval["high"] <= self.budget.max_drop + 1e-12,
            memory_ok=None if self.ctx.max_memory is None else peak <= self.ctx.max_memory,
            objective=objective_value(self.ctx.objective, md),
            size_bytes=md["disk_bytes"],
            served=_served_file(rt),
            measurement=md,
        )

    def _keep(self, cand: ModelHandle, number: int) -> None:
        """Save the torch model of a complete trial under the work folder (pruned later unless chosen
        or on the Pareto front)."""
        folder = self.work / f"trial-{number}" / "model"
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_folder_for(folder)
        write_artifact_files(cand, tmp)
        replace_folder(tmp, folder)

    def tidy(self, keep: set[int]) -> None:
        for d in self.work.glob("trial-*"):
            try:
                n = int(d.name.split("-")[1])
            except ValueError:
                continue
            if n not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def served(self, rec: dict) -> ModelHandle | None:
        """The model of a complete trial of this worker as it was served (from its work folder), or None."""
        from ..artifact import load_artifact

        folder = self.work / f"trial-{rec['number']}"
        if not (folder / "model").exists():
            return None
        torch_handle = load_artifact(folder / "model")
        if rec["runtime"] == "torch":
            return torch_handle
        return _reopen(torch_handle, rec, self.threads)

    def objective_fn(self, seen: dict):
        import optuna

        def fn(trial):
            point = {k: trial.suggest_categorical(k, v) for k, v in self.space.choices.items()}
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            trial.set_user_attr("label", self.space.label(point))
            key = point_key(point)
            for t in trial.study.get_trials(deepcopy=False):  # other workers' trials, finished or running
                if t.number != trial.number and "worker" in t.user_attrs and "skipped" not in t.user_attrs and t.params:
                    seen.setdefault(point_key(t.params), t.number)
            invalid = not self.space.valid(point)
            if invalid or (key in seen and "retry_of" not in trial.user_attrs):
                trial.set_user_attr("skipped", "invalid combination" if invalid else f"same as trial {seen[key]}")
                unseen = [p for p in self.space.points() if point_key(p) not in seen]
                if unseen:
                    rng = __import__("random").Random(trial.number)
                    trial.study.enqueue_trial(rng.choice(unseen))
                else:
                    self.exhausted = True
                raise optuna.TrialPruned()
            seen[key] = trial.number
            rec = self.run(point, trial.number)
            trial.set_user_attr("record", _jsonable(rec))
            if rec["status"] != "complete":
                raise optuna.TrialPruned()
            return _upper(rec), rec["objective"]

        return fn


def _baseline_floor(handle: ModelHandle, data, inputs, threads: int | None) -> tuple[float, int, float]:
    """A lower bound on the seconds the original's measurement takes, from one timed forward call: the
    calls it surely makes (the profile's 3 warm-up and 20 timed calls, one per batch of the evaluation and
    selection splits; for LMs the 512-token windows of both, each at least 4 calls' worth of the 128-token
    prompt). Returns (seconds, calls, seconds per call)."""
    import torch

    from ..measure.quality import EVAL_WINDOW
    from ..measure.system import torch_threads

    try:
        with torch.no_grad(), torch_threads(threads):
            handle.call(inputs)  # the first call pays for lazy set-up
            t0 = time.perf_counter()
            handle.call(inputs)
            t_call = time.perf_counter() - t0
    except Exception:  # noqa: BLE001 - inputs the model refuses: the measurement says so in its own words
        return 0.0, 0, 0.0

    def items(split: str) -> int:
        if hasattr(data, "indices"):
            return len(data.indices(split))
        return len(data.documents(split)) if hasattr(data, "documents") else 0

    if handle.task == "causal-lm" and hasattr(data, "windows"):
        calls = 4 * sum(len(data.windows(handle.tokenizer, split, EVAL_WINDOW)) for split in ("eval", "select"))
    else:
        calls = 23 + math.ceil((items("eval") + items("select")) / 64)
    return calls * t_call, calls, t_call


def _check_split(data) -> str:
    """The split the fidelity guard reads: the held-out check split, or the selection split's inputs
    (label-free) for data that has no check split."""
    from ..data import TensorData, TextRecords

    if isinstance(data, (TensorData, TextRecords)):
        return "check" if data.indices("check") else "select"
    return "check" if data.documents("check") else "select"


def _served_file(rt: ModelHandle) -> str | None:
    path = getattr(rt.module, "path", None)
    return str(path) if path is not None else None


def _reopen(torch_handle: ModelHandle, rec: dict, threads: int | None) -> ModelHandle | None:
    """A trial's ONNX Runtime model opened again from the file it was served from."""
    from ..accelerate.runtimes import _twin

    path = rec.get("served")
    if not path or not Path(path).exists():
        return None
    if torch_handle.task == "causal-lm":
        from ..accelerate.llm_onnx import OrtCausalLM

        module = OrtCausalLM(path, threads=threads)
    else:
        from ..models.onnx_module import OrtModule

        module = OrtModule(Path(path), threads=threads)
    return _twin(torch_handle, module, rec["runtime"], dict(rec["measurement"].get("runtime_report") or {}))


def _serving_memory(rt: ModelHandle, inputs, threads: int | None) -> dict | None:
    """Peak memory of a process that serves only ``rt`` (None when it cannot be measured that way)."""
    try:
        from ..measure.serving import serving_memory
    except ImportError:  # pragma: no cover - the module ships with leanml
        return None
    try:
        return serving_memory(rt, inputs, threads=threads)
    except LeanmlError as exc:
        return {"error": str(exc)}


def fresh_study(out: Path) -> bool:
    """Whether the study in ``out`` has no finished trial (so removing it loses no work)."""
    import optuna

    db = out / STUDY_FILE
    if not db.exists():
        return True
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
        return not any(
            t.state.is_finished() and "record" in t.user_attrs
            for summary in optuna.get_all_study_summaries(storage)
            for t in optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(deepcopy=False)
        )
    except Exception:  # noqa: BLE001 - an unreadable database holds no finished work we could keep
        return True


def _clean_dead_workers(work_root: Path) -> None:
    """Remove the work folders of this machine's workers that died (a killed run's ``.work/<host>-<pid>``)."""
    host = socket.gethostname()
    for d in work_root.glob(f"{host}-*") if work_root.is_dir() else []:
        if dead_writer(d.name, f"{host}-"):
            shutil.rmtree(d, ignore_errors=True)


def _fits_in_memory(handle: ModelHandle, copies: int) -> bool:
    """Whether ``copies`` more copies of the model's tensors take under a quarter of the free memory."""
    import psutil
    import torch

    from ..measure.cost import weight_bytes

    if not isinstance(handle.module, torch.nn.Module):
        return False
    return copies * weight_bytes(handle.module) < 0.25 * psutil.virtual_memory().available


def _check_selection_split(handle: ModelHandle, data) -> None:
    """Refuse data whose selection split is too small to score a candidate on, before anything runs."""
    from ..data import SimilarityPairs, TensorData, TextCorpus, TextRecords
    from ..measure.quality import MIN_PERPLEXITY_TOKENS, MIN_SPEARMAN_PAIRS, eval_token_count

    if isinstance(data, TextCorpus) and handle.task == "causal-lm":
        n = eval_token_count(handle, data, "select")[0]
        if n < MIN_PERPLEXITY_TOKENS:
            raise LeanmlError(
                f"data {data.name!r} leaves {n} tokens for the selection split that optimize scores candidates on; "
                f"it needs at least {MIN_PERPLEXITY_TOKENS} (give a longer text)"
            )
    elif isinstance(data, SimilarityPairs):
        n = len(data.pair_indices("select"))
        if n < MIN_SPEARMAN_PAIRS:
            raise LeanmlError(
                f"data {data.name!r} leaves {n} scored pairs for the selection split (pairs are split by text); "
                f"optimize needs at least {MIN_SPEARMAN_PAIRS}"
            )
    elif isinstance(data, (TextRecords, TensorData)):
        n = len(data.indices("select"))
        if n < 2:
            unit = "records" if isinstance(data, TextRecords) else "items"
            raise LeanmlError(
                f"data {data.name!r} leaves {n} {unit} for the selection split; optimize needs at least 2 "
                "(give at least 10 items: evaluation, selection and calibration are disjoint)"
            )


def _kept(records: list[dict]) -> set[int]:
    """Trials whose models stay in the work folder: the chosen one and the Pareto front (scored on test)."""
    done = [r for r in records if r.get("status") == "complete"]
    keep = {done[i]["number"] for i in pareto_front([(r["quality_drop"], r["objective"]) for r in done])}
    chosen, _ = choose(done)
    return keep | ({chosen["number"]} if chosen else set())


def _test_reserve(search: _Search, records: list[dict]) -> float:
    """Seconds to keep for scoring the front and the chosen model on the test split after the search."""
    if not search.eval_seconds:
        return 0.0
    return (len(_kept(records)) + 1) * statistics.median(search.eval_seconds)


def _score_on_test(search: _Search, study, records: list[dict], numbers: set[int], base_samples: dict) -> None:
    """Score the trials ``numbers`` once on the test split (kept in their records in the study)."""
    from ..accelerate.runtimes import prepare

    todo = [r for r in records if r["number"] in numbers and r["status"] == "complete" and not r.get("test")]
    for rec in progress(todo, "test split") if todo else []:
        try:
            rt = search.served(rec)
            if rt is None:  # another worker's trial: compressed again here
                cand = clone(search.models[rec["params"].get("model", "original")])
                apply_recipe(cand, recipe_of(rec), search.data)
                rt = (
                    cand if rec["runtime"] == "torch" else prepare(cand, rec["runtime"], threads=search.threads, data=search.data)
                )
            q = evaluate(rt, search.data, split="eval", samples=True)
            iv = drop_interval(base_samples, q.pop("samples"), search.drop)
            rec["test"] = {
                "quality": q["value"],
                "quality_drop": iv["drop"],
                "drop_interval": iv,
                "meets_budget": iv["high"] <= search.budget.max_drop + 1e-12,
                "result": q,
            }
        except Exception as exc:  # noqa: BLE001 - recorded; the selection figures stand
            rec["test"] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        study.set_user_attr(f"test-{rec['number']}", _jsonable(rec["test"]))  # a finished trial cannot change


def _after(chosen: dict) -> dict:
    """The chosen trial's measurement, its quality the test split's (the selection's beside it)."""
    m = dict(chosen["measurement"])
    m["selection"] = m.get("quality")
    test = chosen.get("test") or {}
    m["quality"] = test.get("result") or m.get("quality")
    return m


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _base_quality(before: dict, data_name: str) -> tuple[float, str, bool]:
    q = before.get("quality") or {}
    if q.get("value") is None:
        raise LeanmlError(f"data {data_name!r} gives no quality metric for this model; optimize needs one to keep a budget")
    hib = q.get("higher_is_better")
    return float(q["value"]), q["metric"], higher_is_better(q["metric"]) if hib is None else bool(hib)


def optimize(
    model,
    data,
    budget: str | float | Budget = "1%",
    objective: str = "usd",
    *,
    drop_type: str = "relative",
    hardware: str | None = None,
    runtime: str = "auto",
    time_budget: str | float | None = None,
    trials: int | None = None,
    candidates: list | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    storage: str | None = None,
    force: bool = False,
    threads: int | None = None,
    seed: int = 0,
    gate: float = GATE,
    sensitivity: bool = True,
    max_memory: str | float | None = None,
    min_fidelity: float | None = None,
) -> OptimizeResult:
    """Search recipes × runtimes for the cheapest model (``objective``) whose quality on ``data`` is within
    ``budget`` of the original's; see the module docstring. ``max_memory`` (e.g. ``"1.5GB"``) bounds the
    peak memory of serving the chosen model; ``min_fidelity`` overrides the task's fidelity floor
    (:mod:`leanml.search.guard`). Returns the chosen model and every trial."""
    import optuna

    t_start = time.perf_counter()
    check_objective(objective)
    memory_cap = parse_memory(max_memory)
    bud = budget if isinstance(budget, Budget) else Budget(parse_drop(budget), drop_type)
    seconds = parse_duration(time_budget)
    if trials is not None and (not isinstance(trials, int) or trials < 1):
        raise LeanmlError(f"trials {trials!r} must be a whole number >= 1")
    if gate <= 1:
        raise LeanmlError(f"gate {gate!r} must be > 1 (how many times over the budget a cheap estimate may be)")
    hw = get_profile(hardware)
    from ..measure.quality import check_data_for
    from ..measure.system import check_threads
    from ..outputs import check_folder_target, drop_aside, fault_point, read_marker, replace_owned_folder, write_marker
    from .space import check_search_runtime

    check_threads(threads)
    check_search_runtime(runtime)
    check_storage(storage)
    out_path = Path(out) if out is not None else None
    if out_path is not None:  # every check of the output before anything is loaded or created
        marker = out_path / STUDY_FILE
        if resume:
            if out_path.exists() and not out_path.is_dir():
                raise LeanmlError(f"--out {str(out_path)!r} is a file; --resume needs the folder of a search")
            started = (read_marker(out_path) or {}).get("kind") == "optimize"  # killed before its study existed
            if storage is None and not marker.exists() and not started:
                raise LeanmlError(f"nothing to resume: {str(marker)!r} does not exist (start without --resume)")
            if out_path.exists() and any(out_path.iterdir()) and read_marker(out_path) is None and not marker.exists():
                raise LeanmlError(f"--out {str(out_path)!r} holds files leanml did not write; choose another folder")
        else:
            if out_path.is_dir() and any(out_path.iterdir()) and not force:
                raise LeanmlError(
                    f"output {str(out_path)!r} already exists; use --resume to continue its search or --force to replace it"
                )
            check_folder_target(out_path, force)
    # the model, the data and the candidates are loaded (and checked) before any output exists
    handle = model if isinstance(model, ModelHandle) else load_model(model)
    if handle.runtime != "torch":
        raise LeanmlError(f"model {handle.name!r} runs on {handle.runtime}; optimize starts from a torch model")
    data = load_data(data)
    check_data_for(handle, data, verb="optimize")
    floor = floor_for(handle.task, min_fidelity)
    _check_selection_split(handle, data)
    models = {"original": handle}
    for c in candidates or []:
        cand = c if isinstance(c, ModelHandle) else load_model(c)
        if cand.task != handle.task:
            raise LeanmlError(f"candidate {cand.name!r} is a {cand.task} model; the original is {handle.task}")
        models[cand.name] = cand
    url = storage
    aside = None
    if out_path is not None:
        if out_path.exists() and not resume and any(out_path.iterdir()):
            aside = replace_owned_folder(out_path)  # checked above: --force and a folder of leanml's
        fresh = not out_path.exists()
        out_path.mkdir(parents=True, exist_ok=True)
        if fresh or read_marker(out_path) is None:
            write_marker(out_path, "optimize", complete=False)
        url = url or f"sqlite:///{marker.resolve()}"
        _clean_dead_workers(out_path / WORK)
        work = out_path / WORK / f"{socket.gethostname()}-{os.getpid()}"  # one per worker: others never touch it
    else:
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="leanml-optimize-"))
    work.mkdir(parents=True, exist_ok=True)
    fault_point("optimize-start")

    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study_name = f"leanml-{handle.name}-{data.name}"
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
        stor = _storage(url) if url else optuna.storages.InMemoryStorage()
        study = optuna.create_study(
            study_name=study_name, storage=stor, directions=["minimize", "minimize"], sampler=sampler, load_if_exists=True
        )
        settings = {
            "model": handle.name,
            "data": data.name,
            "max_drop": bud.max_drop,
            "drop_type": bud.drop_type,
            "objective": objective,
            "hardware": hw.name,
            "runtime": runtime,
            "candidates": [str(c) for c in candidates or []],
            "max_memory": memory_cap,
            "min_fidelity": floor,
        }
        old = study.user_attrs.get("settings")
        if old is not None and old != settings:
            diff = ", ".join(f"{k} {old.get(k)!r} (now {v!r})" for k, v in settings.items() if old.get(k) != v)
            raise LeanmlError(f"the study {study_name!r} was started with other settings: {diff}")
        study.set_user_attr("settings", settings)

        # the original model, measured once for the whole study
        from ..measure.profile import example_inputs

        inputs = example_inputs(handle, data, None, None)[0]
        if "before" in study.user_attrs:
            before = study.user_attrs["before"]
            base_seconds = study.user_attrs.get("before_seconds", 0.0)
        else:
            if seconds is not None:  # refused now, not after a measurement longer than the whole budget
                floor_s, calls, t_call = _baseline_floor(handle, data, inputs, threads)
                if seconds < 2 * floor_s:
                    raise LeanmlError(
                        f"time budget {time_budget!r} is too small for one trial: measuring the original model takes at "
                        f"least {floor_s:.0f} s ({calls} forward calls of {t_call:.2f} s each), so give at least "
                        f"{math.ceil(2 * floor_s)} s"
                    )
            t0 = time.perf_counter()
            before = profile(handle, data=data, hardware=hw.name, threads=threads).to_dict()
            before["serving_memory"] = _serving_memory(handle, inputs, threads)
            selection = evaluate(handle, data, split="select", samples=True)
            before["selection"] = {k: v for k, v in selection.items() if k != "samples"}
            study.set_user_attr("selection_samples", _jsonable(selection["samples"]))
            base_seconds = time.perf_counter() - t0
            study.set_user_attr("before", _jsonable(before))
            study.set_user_attr("before_seconds", base_seconds)
        base_test, metric, hib = _base_quality(before, data.name)
        base_q = float(before["selection"]["value"])
        base_samples = study.user_attrs["selection_samples"]
        if seconds is not None and seconds < 2 * base_seconds:
            raise LeanmlError(
                f"time budget {time_budget!r} is too small for one trial: measuring the original model alone took "
                f"{base_seconds:.0f} s (give at least {math.ceil(2 * base_seconds)} s)"
            )

        sens = study.user_attrs.get("sensitivity")
        if sens is None and sensitivity:
            from .sensitivity import layer_sensitivity

            try:
                sens = layer_sensitivity(handle, data)
            except LeanmlError:
                sens = {}
            study.set_user_attr("sensitivity", _jsonable(sens))
        sens = sens or {}
        sensitive = list(sens) if handle.task == "causal-lm" else []  # most sensitive first
        n_layers = getattr(getattr(handle.module, "config", None), "num_hidden_layers", None)
        allow = seconds is None or seconds >= DISTILL_MIN_SECONDS.get(handle.task, DISTILL_MIN_DEFAULT)
        space = build_space(handle, runtime, allow_distill=allow, n_layers=n_layers, sensitive=sensitive)
        if len(models) > 1:
            space.choices = {"model": list(models), **space.choices}
            space.seeds = [dict(s, model="original") for s in space.seeds]
        with _queue_lock(url):  # workers that start together: the seeds are queued once
            if not study.trials:
                for s in space.seeds:
                    study.enqueue_trial(s)
            recover_interrupted(study)

        ctx = _Context(
            handle=handle,
            data=data,
            budget=bud,
            objective=objective,
            hardware=hw.name,
            threads=threads,
            space=space,
            base=base_q,
            base_samples=base_samples,
            hib=hib,
            work=work,
            models=models,
            gate=gate,
            floor=floor,
            max_memory=memory_cap,
            inputs=inputs,
        )
        search = _Search(ctx)
        seen = {
            point_key(t.params): t.number
            for t in study.get_trials(deepcopy=False)
            if "record" in t.user_attrs and len(t.params) == len(space.choices)
        }
        fn = search.objective_fn(seen)
        spent_before = float(study.user_attrs.get("search_seconds", 0.0))  # a resumed search has what is left
        budget_end = None if seconds is None else t_start + seconds - spent_before
        n_points = len(space.points())
        while True:
            recs = [r for r in _records(study) if r["status"] != "running"]
            if trials is not None and len(recs) >= trials:
                break
            if len(seen) >= n_points or search.exhausted:
                break
            if budget_end is not None:
                expected = statistics.median(search.durations) if search.durations else 2 * base_seconds
                if time.perf_counter() + expected + _test_reserve(search, recs) > budget_end:
                    break
            study.optimize(fn, n_trials=1, catch=())
            study.set_user_attr("search_seconds", spent_before + time.perf_counter() - t_start)
            fault_point("optimize-trial")
            search.tidy(_kept(_records(study)))

        records = sorted(_records(study), key=lambda r: r["number"])
        if budget_end is not None and not search.durations and not records:
            raise LeanmlError(
                f"time budget {time_budget!r} is too small for one trial: it ran out before the first "
                f"(measuring the original model took {base_seconds:.0f} s)"
            )
        chosen, met = choose(records)
        done = [r for r in records if r["status"] == "complete"]
        front = [done[i]["number"] for i in pareto_front([(r["quality_drop"], r["objective"]) for r in done])]
        base_test_samples = study.user_attrs.get("test_samples")
        if base_test_samples is None:
            base_test_samples = evaluate(handle, data, split="eval", samples=True)["samples"]
            study.set_user_attr("test_samples", _jsonable(base_test_samples))
        _score_on_test(search, study, records, set(front) | ({chosen["number"]} if chosen else set()), base_test_samples)
        test = (chosen or {}).get("test") or {}
        item = before.get("item", "item")
        summary = {
            "model": handle.name,
            "data": data.name,
            "metric": metric,
            "higher_is_better": hib,
            "budget": {
                "max_drop": bud.max_drop,
                "drop_type": bud.drop_type,
                "threshold": bud.threshold(base_test, hib),
                "text": bud.text(metric, hib),
                "base": base_test,
                "base_selection": base_q,
                "threshold_selection": bud.threshold(base_q, hib),
                "level": 0.9,
            },
            "fidelity_floor": floor,
            "fidelity_score": score_name(handle.task),
            "max_memory": memory_cap,
            "objective": objective,
            "objective_label": objective_label(objective, item),
            "hardware": hw.name,
            "runtime": chosen["runtime"] if chosen else None,
            "before": before,
            "after": _after(chosen) if chosen else None,
            "chosen": chosen["number"] if chosen else None,
            "met_selection": met,
            "met": bool(met and test.get("meets_budget")),
            "test": test or None,
            "shortfall": None if (met or not chosen) else _upper(chosen) - bud.max_drop,
            "pareto": front,
            "baseline": None,
            "elapsed_s": round(time.perf_counter() - t_start, 1),
            "time_budget_s": seconds,
            "trials_total": len(records),
            "sensitivity_bits": 4 if handle.task == "causal-lm" else 8,
        }
        summary["why"] = why(summary, records, chosen)
        result_handle = None
        if chosen is not None:
            result_handle = _materialize(search, chosen)
        if out_path is not None:
            import fcntl

            with open(out_path / ".lock", "w") as lock:  # workers on one machine finish one at a time
                fcntl.flock(lock, fcntl.LOCK_EX)
                _write_outputs(out_path, summary, records, sens, chosen, result_handle, search)
                write_marker(out_path, "optimize", complete=True)
            drop_aside(aside, out_path)
        else:
            shutil.rmtree(work, ignore_errors=True)
    except LeanmlError:
        # a run that fails before its first trial (a budget too small, data without a metric) leaves
        # nothing behind: the folder it created goes, and an output it was replacing comes back
        if out_path is not None and not resume and fresh_study(out_path):
            shutil.rmtree(out_path, ignore_errors=True)
            if aside is not None:
                os.rename(aside, out_path)
        raise
    return OptimizeResult(result_handle, chosen, records, summary, out_path)


def recipe_of(rec: dict):
    """The recipe a trial record holds (it may have no steps: the original model on another runtime)."""
    from ..config import config_from_dict
    from ..recipe import Recipe

    r = rec["recipe"]
    return Recipe(name=r.get("name", "custom"), steps=[config_from_dict(s) for s in r["steps"]])


def _materialize(search: _Search, chosen: dict) -> ModelHandle:
    """The chosen model as a torch handle: from the work folder when this worker kept it, else rebuilt."""
    from ..artifact import load_artifact

    folder = search.work / f"trial-{chosen['number']}" / "model"
    if folder.exists():
        return load_artifact(folder)
    cand = clone(search.models[chosen["params"].get("model", "original")])
    apply_recipe(cand, recipe_of(chosen), search.data)
    return cand


def _iv(d: dict | None) -> str:
    d = d or {}
    if d.get("low") is None:
        return ""
    return f" (90% interval {d['low']:.4g} to {d['high']:.4g})"


def why(summary: dict, records: list[dict], chosen: dict | None) -> str:
    """A short paragraph: what was chosen, against what, on which split, and what it gave up."""
    if chosen is None:
        return "No trial completed, so there is no model to choose; see the reasons in the trials table."
    m0 = summary["before"]
    base_obj = objective_value(summary["objective"], m0)
    ratio = chosen["objective"] / base_obj if base_obj else float("nan")
    metric, unit = summary["metric"], summary["objective_label"]
    done = [r for r in records if r["status"] == "complete"]
    ok = sorted((r for r in done if acceptable(r)), key=lambda r: r["objective"])
    text = (
        f"{chosen['label']} costs {chosen['objective']:.4g} {unit} against {base_obj:.4g} for the original "
        f"({ratio:.2f}x). On the selection split, which the search chose on, its {metric} is {chosen['quality']:.4g} "
        f"(original {summary['budget']['base_selection']:.4g}), a drop of {chosen['quality_drop']:.4g}"
        f"{_iv(chosen.get('drop_interval'))}. "
    )
    test = chosen.get("test") or {}
    if test.get("quality") is not None:
        text += (
            f"On the test split, scored once after the search, it is {test['quality']:.4g} "
            f"(original {summary['budget']['base']:.4g}), a drop of {test['quality_drop']:.4g}{_iv(test.get('drop_interval'))}. "
        )
    elif test.get("error"):
        text += f"Scoring it on the test split failed ({test['error']}). "
    if summary.get("met_selection"):
        if summary["met"]:
            text += f"It meets the budget ({summary['budget']['text']}) on the test split. "
        else:
            text += (
                f"It meets the budget ({summary['budget']['text']}) on the selection split but NOT on the test "
                "split: the selection figure was luck, so treat this choice with care (a larger data set narrows the intervals). "
            )
        text += f"It is the cheapest of the {len(ok)} candidates within the budget (the upper end of the interval counts). "
        if len(ok) > 1:
            nxt = ok[1]
            text += f"The next cheapest within budget, {nxt['label']}, costs {nxt['objective']:.4g}. "
        cheaper = [r for r in done if not acceptable(r) and r["objective"] < chosen["objective"]]
        if cheaper:
            c = min(cheaper, key=lambda r: r["objective"])
            why_not = (
                "needs more memory than allowed"
                if c.get("memory_ok") is False
                else f"may lose up to {_upper(c):.4g} (allowed {summary['budget']['max_drop']:.4g})"
            )
            text += f"Cheaper candidates broke a limit: {c['label']} costs {c['objective']:.4g} but {why_not}. "
    else:
        text += (
            f"No candidate met the budget ({summary['budget']['text']}) and limits; this is the closest, its "
            f"interval's upper end missing it by {summary['shortfall']:.4g}. "
        )
    flagged = [r for r in done if r.get("flags")]
    if flagged:
        text += f"{len(flagged)} candidates gained quality from an untrained structural cut: noise, not an improvement. "
    rejected = sum(r["status"] == "rejected" for r in records)
    failed = sum(r["status"] == "failed" for r in records)
    if rejected or failed:
        text += (
            f"{rejected} candidates were rejected by the fidelity guard or the cheap estimate and {failed} failed "
            "(reasons in the table)."
        )
    return text.strip()


def _write_outputs(
    out: Path, summary: dict, records: list[dict], sens: dict, chosen: dict | None, handle: ModelHandle | None, search: _Search
) -> None:
    from ..accelerate.runtimes import prepare

    work = search.work

    from ..outputs import fault_point

    write_atomic(out / "before.json", json.dumps(summary["before"], indent=2) + "\n")
    fault_point("optimize-outputs")
    write_atomic(out / "trials.json", json.dumps(records, indent=2, default=str) + "\n")
    write_atomic(out / "sensitivity.json", json.dumps(sens, indent=2) + "\n")
    if chosen is not None:
        recipe = recipe_of(chosen)
        write_atomic(out / "recipe.yaml", recipe.to_yaml())
        write_atomic(out / "after.json", json.dumps(summary["after"], indent=2, default=str) + "\n")
        tmp = temp_folder_for(out / "model")
        try:
            write_artifact_files(handle, tmp, recipe)
            ort = work / f"trial-{chosen['number']}" / "onnx"
            if chosen["runtime"] == "onnxruntime":
                if ort.exists():
                    shutil.copytree(ort, tmp / "onnx")
                else:  # chosen from another worker's trial: export it here
                    prepare(handle, "onnxruntime", threads=search.threads, data=search.data, workdir=tmp / "onnx")
            replace_folder(tmp, out / "model")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    from ..report import write_report

    write_report(out, summary, records, sens or None)
    shutil.rmtree(work, ignore_errors=True)
