"""Two `optimize` workers that open one new SQLite study at the same instant: no schema race, no lost or
duplicated trial.

Each repeat, in a fresh temporary folder, starts two worker processes (this file with ``--worker``). Each
imports everything and builds the tiny MLP of ``tests/search/worker.py`` (no downloads), writes a ready
file and waits; once both are ready the driver writes a start file holding an instant a moment ahead,
and each worker sleeps until that instant and calls ``optimize`` at once. Both share one SQLite study
(``storage=sqlite:///<tmp>/study.db``, the database file not yet existing), each with its own output
folder, asking for ``--trials`` trials in all (default 5: two or three per worker).

After both exit the study is read back: both exited 0, no trial is left RUNNING, no parameter set is
recorded twice, the number of recorded trials is what was asked (or one more: each worker may start one
trial while the other finishes the last), and the schema version was written once. Every process
started (and what it started in sessions of its own: the serving-memory children) is killed in a
``finally``, also on a failure or an interrupt.

    python bench/workers.py [--repeats 20] [--trials 5]
"""

from __future__ import annotations

# isort: off
import _common  # noqa: F401  (first: fixes the import path and the environment)
# isort: on

import argparse
import contextlib
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import md_table, write_results

ROOT = Path(__file__).resolve().parent.parent
WORKER_TIMEOUT = 300.0  # seconds a repeat may take before its workers are killed
LEAD = 0.3  # seconds between writing the start file and the instant both workers start


# ----------------------------------------------------------------------------------------------------
# the worker process
# ----------------------------------------------------------------------------------------------------


def worker(folder: Path, index: int, trials: int, serving_memory: bool) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests" / "search"))
    import optuna  # noqa: F401  (imported before the start, like all the rest: both start level)
    import sqlalchemy  # noqa: F401
    from worker import toy  # the tiny model and data of the process tests

    from leanml.search import optimize
    from leanml.search import study as study_mod

    # note when this process enters and leaves the opening of the storage (the lock + schema creation):
    # evidence that both really opened the new database together; the behaviour is unchanged
    timing = {}
    real = study_mod._storage

    def timed_storage(url):
        timing["storage_enter"] = time.time()
        try:
            return real(url)
        finally:
            timing["storage_exit"] = time.time()

    study_mod._storage = timed_storage
    if not serving_memory:  # the ~7 s child process per measured model has nothing to do with the study
        study_mod._serving_memory = lambda *a, **k: None
    handle, data = toy()
    (folder / f"ready-{index}").touch()
    go = folder / "go"
    while not go.exists():
        time.sleep(0.001)
    text = ""
    while not text:  # the driver writes the file atomically, but be safe
        text = go.read_text().strip()
    start = float(text)
    while time.time() < start - 0.002:
        time.sleep(0.001)
    while time.time() < start:
        pass
    timing["start"] = time.time()
    try:
        optimize(
            handle,
            data,
            budget="2%",
            runtime="torch",
            trials=trials,
            out=folder / f"out-{index}",
            storage=f"sqlite:///{folder / 'study.db'}",
            threads=1,
        )
    finally:
        timing["end"] = time.time()
        (folder / f"timing-{index}.json").write_text(json.dumps(timing))


# ----------------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------------


def _env() -> dict:
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT / "src"),
        LEANML_QUIET="1",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )


def _kill_all(procs: list[subprocess.Popen]) -> None:
    """Kill every started worker with its process group, and the process groups of what each started
    in a session of its own (gathered before the worker goes, while they are still its children)."""
    import psutil

    groups = set()
    for p in procs:
        groups.add(p.pid)
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(p.pid).children(recursive=True):
                with contextlib.suppress(OSError):
                    groups.add(os.getpgid(child.pid))
    groups.discard(os.getpgid(0))  # never our own group
    for g in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(Exception):
            p.wait(timeout=30)


def _error(stderr: str) -> dict:
    """The first line of the last exception in a worker's stderr, and its deepest frame in study.py."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    exc = None
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln) or re.match(r"^[\w.]+: ", ln):
            exc = ln.strip()
            break
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', stderr)
    ours = [f for f in frames if f[0].endswith("leanml/search/study.py")]
    where = f"src/leanml/search/study.py:{ours[-1][1]} in {ours[-1][2]}" if ours else None
    raised = f"{frames[-1][0].split('site-packages/')[-1]}:{frames[-1][1]} in {frames[-1][2]}" if frames else None
    return {"error": exc or (lines[-1].strip() if lines else None), "where": where, "raised_at": raised}


def _check(folder: Path, trials: int) -> dict:
    import optuna
    from optuna.trial import TrialState

    db = folder / "study.db"
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    summaries = optuna.get_all_study_summaries(storage)
    out = {"studies": len(summaries)}
    states, records, keys, per_worker = {}, 0, [], {}
    skipped = 0
    for s in summaries:
        for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False):
            states[t.state.name] = states.get(t.state.name, 0) + 1
            if "skipped" in t.user_attrs:
                skipped += 1
            if "record" in t.user_attrs:
                records += 1
                keys.append(json.dumps(t.params, sort_keys=True))
                w = t.user_attrs.get("worker", "?").rsplit(":", 1)[-1]
                per_worker[w] = per_worker.get(w, 0) + 1
    with contextlib.closing(sqlite3.connect(db)) as con:
        out["schema_versions"] = con.execute("select count(*) from alembic_version").fetchone()[0]
    out.update(
        states=states,
        records=records,
        skipped=skipped,
        per_worker=sorted(per_worker.values()),
        duplicated=len(keys) - len(set(keys)),
        running=states.get(TrialState.RUNNING.name, 0),
    )
    out["checks"] = {
        "one study": out["studies"] == 1,
        "schema written once": out["schema_versions"] == 1,
        "no trial left running": out["running"] == 0,
        "no parameter set recorded twice": out["duplicated"] == 0,
        "records = trials asked (+1)": trials <= records <= trials + 1,
    }
    return out


def one_repeat(trials: int, serving_memory: bool) -> dict:
    procs: list[subprocess.Popen] = []
    t0 = time.perf_counter()
    rec: dict = {"ok": False, "seconds": None, "trials": trials, "records": None, "error": None, "where": None}
    with tempfile.TemporaryDirectory(prefix="leanml-workers-") as tmp, contextlib.ExitStack() as files:
        folder = Path(tmp)
        try:
            for i in range(2):
                # a file, not a pipe: a chatty worker never blocks on a full pipe
                log = files.enter_context(open(folder / f"stderr-{i}.txt", "w"))
                procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__, "--worker", str(folder), str(i), str(trials), str(int(serving_memory))],
                        env=_env(),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                        start_new_session=True,  # a process group of its own, killed whole in the finally
                    )
                )
            deadline = time.monotonic() + WORKER_TIMEOUT
            while not all((folder / f"ready-{i}").exists() for i in range(2)):
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError("a worker ended before it was ready")
                if time.monotonic() > deadline:
                    raise TimeoutError("the workers did not get ready in time")
                time.sleep(0.01)
            tmp_go = folder / "go.tmp"
            tmp_go.write_text(repr(time.time() + LEAD))
            os.replace(tmp_go, folder / "go")
            t0 = time.perf_counter()
            codes = []
            for p in procs:
                try:
                    codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    raise TimeoutError(f"a worker did not finish within {WORKER_TIMEOUT:g} s") from None
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            rec["exit_codes"] = codes
            timing = [json.loads(p.read_text()) for i in range(2) if (p := folder / f"timing-{i}.json").exists()]
            if len(timing) == 2:
                rec["start_skew_ms"] = round(abs(timing[0]["start"] - timing[1]["start"]) * 1000, 2)
                if all("storage_enter" in t for t in timing):
                    enters = sorted(t["storage_enter"] for t in timing)
                    rec["storage_enter_skew_ms"] = round((enters[1] - enters[0]) * 1000, 2)
                    rec["storage_open_ms"] = [
                        round((t["storage_exit"] - t["storage_enter"]) * 1000, 1)
                        for t in sorted(timing, key=lambda t: t["storage_enter"])
                    ]
            if codes != [0, 0]:
                for i, c in enumerate(codes):
                    if c != 0:
                        rec.update(_error((folder / f"stderr-{i}.txt").read_text()))
                        rec["worker"] = i
                        rec["traceback"] = (folder / f"stderr-{i}.txt").read_text()[-4000:]
                        break
            if (folder / "study.db").exists():
                rec.update(_check(folder, trials))
                checks = rec["checks"]
            else:
                checks = {}
            checks = {"both workers exited 0": codes == [0, 0], **checks}
            rec["checks"] = checks
            rec["ok"] = all(checks.values()) and len(checks) > 1
            if not rec["ok"] and rec["error"] is None:
                rec["error"] = "failed: " + ", ".join(k for k, v in checks.items() if not v)
        except Exception as exc:  # noqa: BLE001 - a broken repeat is recorded, the others still run
            rec["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            for i in range(len(procs)):
                tail = (folder / f"stderr-{i}.txt").read_text()[-4000:]
                if tail.strip():
                    rec.setdefault("traceback", tail)
        finally:
            _kill_all(procs)
    if rec["seconds"] is None:
        rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def markdown(payload: dict) -> str:
    reps = payload["repeats"]
    n = len(reps)
    ok = sum(r["ok"] for r in reps)
    names = []
    for r in reps:
        for k in r.get("checks", {}):
            if k not in names:
                names.append(k)
    rows = [[k, f"{sum(bool(r.get('checks', {}).get(k)) for r in reps)} of {n}"] for k in names]
    secs = [r["seconds"] for r in reps]
    skews = [r["storage_enter_skew_ms"] for r in reps if r.get("storage_enter_skew_ms") is not None]
    waits = [r["storage_open_ms"][1] for r in reps if r.get("storage_open_ms")]
    firsts = [r["storage_open_ms"][0] for r in reps if r.get("storage_open_ms")]
    split = sorted({tuple(r["per_worker"]) for r in reps if r.get("per_worker")})
    counts = sorted({r["records"] for r in reps if r.get("records") is not None})
    md = [
        "# Two workers opening one new SQLite study at the same instant\n",
        (f"Interrupted after {n} of {payload['asked_repeats']} repeats. " if payload.get("interrupted") else "")
        + f"{n} repeats; two worker processes per repeat start together (ready files + a start file holding a "
        f"shared instant) and run `optimize` on the tiny MLP of `tests/search/worker.py` with {payload['trials']} "
        f"trials asked in all, sharing one new SQLite study (serving memory {payload['serving_memory']}); "
        f"{payload['host']['cpus']} CPUs, "
        f"{payload['total_seconds']:.0f} s in all.\n",
        md_table(["check", "repeats passing"], rows),
        f"\nSeconds per repeat (both workers): median {statistics.median(secs):.1f}, max {max(secs):.1f}. "
        + (
            f"The two workers entered the storage opening {statistics.median(skews):.1f} ms apart (median; max "
            f"{max(skews):.1f} ms); opening it took the first {statistics.median(firsts):.0f} ms and the second, "
            f"which waits on the lock the first holds, {statistics.median(waits):.0f} ms (medians). "
            if skews
            else ""
        )
        + f"Trials recorded per repeat: {', '.join(map(str, counts))}; split between the workers: "
        + ", ".join("+".join(map(str, s)) for s in split)
        + ".\n",
    ]
    bad = [(i, r) for i, r in enumerate(reps) if not r["ok"]]
    if not bad:
        md.append(f"\n**{ok} of {n} repeats: both workers finished, every trial recorded once**\n")
    else:
        md.append(f"\n**{ok} of {n} repeats: both workers finished, every trial recorded once**; failures:\n")
        for i, r in bad:
            at = ", ".join(x for x in (r.get("where"), r.get("raised_at") and f"raised in {r['raised_at']}") if x)
            md.append(f"\n- repeat {i}: {r['error']}" + (f" (at {at})" if at else ""))
        md.append("\n")
    return "".join(md)


def _interrupt(signum, frame) -> None:
    """A SIGTERM ends the run like Ctrl-C: the ``finally`` of the running repeat kills its workers."""
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--trials", type=int, default=5, help="trials asked of the shared study (in all)")
    parser.add_argument(
        "--serving-memory",
        action="store_true",
        help="also measure each model's serving memory in a child process (as optimize does; ~7 s each, "
        "about 2.5x the run time); by default it is skipped",
    )
    parser.add_argument("--worker", nargs=4, metavar=("FOLDER", "INDEX", "TRIALS", "MEM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), int(args.worker[1]), int(args.worker[2]), args.worker[3] == "1")
        return

    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.perf_counter()
    reps = []
    interrupted = False
    for i in range(args.repeats):
        try:
            rec = one_repeat(args.trials, args.serving_memory)
        except KeyboardInterrupt:  # the workers are gone already (one_repeat's finally); keep what is done
            interrupted = True
            print(f"interrupted during repeat {i}", flush=True)
            break
        reps.append(rec)
        print(
            f"repeat {i}: {'ok' if rec['ok'] else 'FAILED'} {rec['seconds']} s, records {rec.get('records')}, "
            f"per worker {rec.get('per_worker')}, storage skew {rec.get('storage_enter_skew_ms')} ms"
            + ("" if rec["ok"] else f": {rec['error']} {rec.get('where') or ''}"),
            flush=True,
        )
    payload = {
        "trials": args.trials,
        "serving_memory": "measured" if args.serving_memory else "skipped",
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "total_seconds": round(time.perf_counter() - t0, 1),
        "ok": sum(r["ok"] for r in reps),
        "asked_repeats": args.repeats,
        "interrupted": interrupted,
        "repeats": reps,
    }
    if reps:
        write_results("workers", payload, markdown(payload))
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    main()
