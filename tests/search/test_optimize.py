"""`optimize` end to end on tiny models: outputs, choice, failures, budgets not met, resume, workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import leanml
from leanml.errors import LeanmlError
from leanml.measure.quality import evaluate
from leanml.search import optimize, pareto_front
from leanml.search.space import Space

from .worker import toy

WORKER = Path(__file__).with_name("worker.py")


def _check_choice(records, summary):
    done = [r for r in records if r["status"] == "complete"]
    ok = [r for r in done if r["meets_budget"]]
    assert summary["met_selection"] == bool(ok)
    chosen_rec = next((r for r in records if r["number"] == summary["chosen"]), {})
    assert summary["met"] == bool(ok and chosen_rec["test"]["meets_budget"])  # the verdict is the test split's
    for r in ok:  # within budget means the upper end of the drop's interval is
        iv = r["drop_interval"]
        assert iv["low"] <= r["quality_drop"] <= iv["high"] <= summary["budget"]["max_drop"] + 1e-12
    if ok:
        best = min(r["objective"] for r in ok)
        chosen = next(r for r in records if r["number"] == summary["chosen"])
        assert chosen["meets_budget"] and chosen["objective"] == best
    pts = [(r["quality_drop"], r["objective"]) for r in done]
    assert summary["pareto"] == [done[i]["number"] for i in pareto_front(pts)]


def test_optimize_writes_the_chosen_model_and_every_output(tmp_path):
    handle, data = toy()
    out = tmp_path / "opt"
    res = optimize(handle, data, budget="2%", runtime="torch", trials=4, out=out, threads=1)
    for name in (
        "model",
        "recipe.yaml",
        "before.json",
        "after.json",
        "trials.json",
        "report.md",
        "report.html",
        "summary.json",
        "study.db",
    ):
        assert (out / name).exists(), name
    before, after = (json.loads((out / f).read_text()) for f in ("before.json", "after.json"))
    # a profile, plus the quality on the selection split and the memory of a process serving only the model
    assert set(before) == set(after) == set(leanml.Measurement.__dataclass_fields__) | {"selection", "serving_memory"}
    assert after["quality"]["split"] == "eval" and after["selection"]["split"] == "select"
    records = json.loads((out / "trials.json").read_text())
    assert len([r for r in records if r["status"] != "running"]) == 4
    assert all(r["status"] in ("complete", "rejected", "failed") for r in records)
    assert all(r["measurement"]["runtime"] == "torch" for r in records if r["status"] == "complete")
    _check_choice(records, res.summary)
    # the saved model is the chosen one: reloaded, it gives the quality the trial recorded
    reloaded = leanml.load(out / "model")
    assert evaluate(reloaded, data, split="select")["value"] == pytest.approx(res.chosen["quality"], abs=1e-6)
    assert evaluate(reloaded, data)["value"] == pytest.approx(res.chosen["test"]["quality"], abs=1e-6)
    assert not any(p.name.startswith(".work") for p in out.iterdir() if p.is_dir() and any(p.iterdir()))
    with pytest.raises(LeanmlError, match="already exists; use --resume"):
        optimize(handle, data, budget="2%", runtime="torch", trials=1, out=out)


def test_a_failed_trial_is_recorded_and_the_search_goes_on(monkeypatch):
    real = Space.recipe

    def flaky(self, point):
        if point.get("quant") == "int8-dynamic":
            raise MemoryError("pretend the machine ran out of memory")
        return real(self, point)

    monkeypatch.setattr(Space, "recipe", flaky)
    handle, data = toy()
    res = optimize(handle, data, budget="2%", runtime="torch", trials=5, threads=1, sensitivity=False, seed=1)
    statuses = [r["status"] for r in res.trials]
    assert "failed" in statuses and "complete" in statuses
    failed = [r for r in res.trials if r["status"] == "failed"]
    assert all(r["reason"].startswith("MemoryError: pretend") for r in failed)
    assert all(r["params"]["quant"] == "int8-dynamic" for r in failed)
    assert res.chosen is not None and res.chosen["status"] == "complete"


@pytest.fixture
def llama128():
    """A tiny llama whose widths take 128-wide quantization groups."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from leanml.models import ModelHandle

    from ..conftest import CharTokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    handle = ModelHandle(module=LlamaForCausalLM(cfg).eval(), task="causal-lm", name="llama128", tokenizer=CharTokenizer())
    handle.example_inputs = {"input_ids": torch.randint(0, 128, (1, 16))}
    return handle


def test_a_budget_no_candidate_meets_still_saves_the_closest(llama128, tiny_text, tmp_path, monkeypatch):
    from leanml.search import study as mod

    def only_quantized(handle, runtime="auto", **kw):
        return Space(
            task=handle.task,
            choices={"quant": ["w8", "w4-g128-rtn"], "runtime": ["torch"]},
            seeds=[{"quant": "w8", "runtime": "torch"}],
        )

    monkeypatch.setattr(mod, "build_space", only_quantized)
    res = optimize(llama128, tiny_text, budget=0, runtime="torch", out=tmp_path / "o", gate=1e9, threads=1, min_fidelity=0)
    assert [r["status"] for r in res.trials] == ["complete", "complete"]
    assert all(r["drop_interval"]["high"] > 0 for r in res.trials)  # quantization noise is never exactly zero
    assert not res.summary["met"] and res.chosen is not None
    closest = min(res.trials, key=lambda r: r["drop_interval"]["high"])  # the closest by the interval's upper end
    assert res.chosen["number"] == closest["number"]
    assert res.summary["shortfall"] == pytest.approx(closest["drop_interval"]["high"])
    assert "NOT met" in (tmp_path / "o" / "report.md").read_text()
    assert "No candidate met the budget" in res.summary["why"]


def test_cheap_fidelity_rejects_before_measuring(llama128, tiny_text, monkeypatch):
    from leanml.search import study as mod

    monkeypatch.setattr(
        mod,
        "build_space",
        lambda handle, runtime="auto", **kw: Space(
            task=handle.task, choices={"quant": ["w4-g128-rtn"], "runtime": ["torch"]}, seeds=[]
        ),
    )
    monkeypatch.setattr(
        mod,
        "profile",
        lambda *a, **k: (
            pytest.fail("a rejected candidate must not be measured")
            if k.get("hardware") and a and a[0] is not llama128
            else _profile(*a, **k)
        ),
    )
    res = optimize(llama128, tiny_text, budget="0.01%", runtime="torch", threads=1, sensitivity=False)
    (r,) = res.trials
    assert r["status"] == "rejected" and "cheap fidelity" in r["reason"], r["reason"]
    assert r["estimate"] == pytest.approx(torch.tensor(r["fidelity"]["mean_kl"]).expm1().item())
    assert res.chosen is None and "No trial completed" in res.summary["why"]


def _profile(*a, **k):
    from leanml.measure import profile

    return profile(*a, **k)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"budget": "-3%"}, "max drop '-3%' must be >= 0"),
        ({"objective": "speed"}, "objective 'speed' is not one of"),
        ({"time_budget": "0.001s"}, "too small for one trial"),
        ({"trials": 0}, "trials 0 must be"),
        ({"runtime": "tpu"}, "runtime 'tpu' is not one of"),
        ({"resume": True, "out": "missing"}, "nothing to resume"),
    ],
)
def test_bad_input_gets_a_one_line_error(kwargs, words, tmp_path):
    handle, data = toy()
    if "out" in kwargs:
        kwargs = dict(kwargs, out=tmp_path / kwargs["out"])
    with pytest.raises(LeanmlError, match=words) as info:
        optimize(handle, data, **{"budget": "1%", **kwargs}, sensitivity=False)
    assert "\n" not in str(info.value)


def _env():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"), LEANML_QUIET="1", OMP_NUM_THREADS="1")
    return env


def _study(out: Path):
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{(out / 'study.db').resolve()}")
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def _records(out: Path) -> list[dict]:
    return json.loads((out / "trials.json").read_text())


@pytest.mark.process
def test_resume_after_a_killed_process_loses_and_repeats_no_trial(tmp_path, processes):
    out = tmp_path / "opt"
    # killed (SIGKILL, at a fixed point) as its third trial starts: two trials finished, one running
    env = dict(_env(), LEANML_KILL_AT="optimize-in-trial:3")
    proc = processes.popen([sys.executable, str(WORKER), str(out), "5"], env=env)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    trials = _study(out).get_trials(deepcopy=False)
    before = {t.number: t.user_attrs["record"] for t in trials if "record" in t.user_attrs}
    (killed_number,) = [t.number for t in trials if "record" not in t.user_attrs and t.params and "skipped" not in t.user_attrs]
    assert len(before) >= 2
    done = processes.run([sys.executable, str(WORKER), str(out), "5", "resume"], env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list((out / ".work").glob("*")), "the dead worker's work folder was not cleaned"
    records = [r for r in _records(out) if r["status"] != "running"]
    assert len(records) == 5
    for number, rec in before.items():  # finished trials are kept, not run again
        (kept,) = [r for r in records if r["number"] == number]
        assert kept["objective"] == rec["objective"] and kept["status"] == rec["status"]
    retries = [r for r in records if r["retry_of"] == killed_number]
    assert len(retries) == 1  # the killed trial ran again, once, with its parameters
    keys = [json.dumps(r["params"], sort_keys=True) for r in records]
    assert len(set(keys)) == len(keys)


def _hold(processes, argv, env, flag: Path):
    """Start a worker that stops at the start of its first trial until ``flag`` is removed."""
    proc = processes.popen(argv, env=dict(env, LEANML_PAUSE_AT="optimize-in-trial", LEANML_PAUSE_FILE=str(flag)))
    for _ in range(12000):
        if flag.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert flag.exists(), "the worker never reached its first trial"
    return proc


@pytest.mark.process
def test_two_worker_processes_share_one_study(tmp_path, processes):
    out = tmp_path / "opt"
    # both workers are held at their first trial until both are there: each surely runs trials of the study
    first = _hold(processes, [sys.executable, str(WORKER), str(out), "8"], _env(), tmp_path / "first")
    second = _hold(processes, [sys.executable, str(WORKER), str(out), "8", "resume"], _env(), tmp_path / "second")
    (tmp_path / "first").unlink()
    (tmp_path / "second").unlink()
    assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0
    records = [r for r in _records(out) if r["status"] != "running"]
    assert 8 <= len(records) <= 9  # each worker may start one trial while the other finishes the last
    workers = {r["worker"].rsplit(":", 1)[1] for r in records}
    assert workers == {str(first.pid), str(second.pid)}
    keys = [json.dumps(r["params"], sort_keys=True) for r in records]
    assert len(set(keys)) == len(keys)


@pytest.mark.process
def test_workers_that_create_a_new_study_at_the_same_instant_do_not_race(tmp_path, processes):
    """Four processes open one new SQLite study at once: the schema is created once, none fails."""
    db = tmp_path / "s" / "study.db"
    db.parent.mkdir()
    script = (
        "import sys; from leanml.search.study import _storage; import optuna; "
        "s = _storage(sys.argv[1]); optuna.create_study(study_name='x', storage=s, load_if_exists=True); print('ok')"
    )
    procs = [
        processes.popen([sys.executable, "-c", script, f"sqlite:///{db}"], env=_env(), stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0] and all(o.strip() == "ok" for o in outs)


def test_a_queued_trial_is_started_under_the_lock_file(tmp_path):
    """SQLite cannot lock the row: starting a waiting trial waits for the lock file, so of two workers that
    both read it as waiting, only the first to take the lock starts it (the second gets False)."""
    import fcntl
    import threading

    import optuna

    from leanml.search.study import _lock_path, _storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="x", storage=_storage(url))
    study.enqueue_trial({"a": 1})
    trial_id = study.get_trials(deepcopy=False)[0]._trial_id
    storage = study._storage
    started = []
    with open(_lock_path(url), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker holds the lock
        t = threading.Thread(
            target=lambda: started.append(storage.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING))
        )
        t.start()
        t.join(timeout=1.0)
        assert t.is_alive() and started == []  # blocked while the lock is held, whatever the timing
    t.join()
    assert started == [True]
    assert storage.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING) is False  # already started


def _one_recipe_on_two_runtimes(monkeypatch, quant: str) -> list:
    """A space of one recipe on torch and onnxruntime; returns the list every compression is appended to."""
    from leanml.search import study as mod

    seeds = [{"quant": quant, "runtime": "torch"}, {"quant": quant, "runtime": "onnxruntime"}]
    monkeypatch.setattr(
        mod,
        "build_space",
        lambda handle, runtime="auto", **kw: Space(
            task=handle.task, choices={"quant": [quant], "runtime": ["torch", "onnxruntime"]}, seeds=seeds
        ),
    )
    calls = []
    real = mod.apply_recipe
    monkeypatch.setattr(mod, "apply_recipe", lambda h, r, d: (calls.append(r.to_dict()), real(h, r, d))[1])
    return calls


def test_a_recipe_is_compressed_once_and_served_on_each_runtime(monkeypatch):
    """Two runtimes of one recipe: one compression, and each runtime measures what a fresh compression gives."""
    from leanml.pipeline import apply_recipe
    from leanml.search import study as mod

    calls = _one_recipe_on_two_runtimes(monkeypatch, "int8-dynamic")
    handle, data = toy()
    res = optimize(handle, data, budget="50%", runtime="auto", threads=1, sensitivity=False)
    assert [r["status"] for r in res.trials] == ["complete", "complete"]
    assert len(calls) == 1
    assert res.trials[1].get("reused") == "compressed model"
    # the cached copy was not changed by the first runtime: the torch trial equals a fresh compression
    fresh = mod.clone(handle)
    apply_recipe(fresh, mod.recipe_of(res.trials[0]), data)
    assert evaluate(fresh, data)["value"] == pytest.approx(res.trials[0]["quality"], abs=1e-9)


def test_a_rejected_recipe_is_not_compressed_again_for_another_runtime(llama128, tiny_text, monkeypatch):
    calls = _one_recipe_on_two_runtimes(monkeypatch, "w4-g128-rtn")
    res = optimize(llama128, tiny_text, budget="0.01%", runtime="auto", threads=1, sensitivity=False)
    assert [r["status"] for r in res.trials] == ["rejected", "rejected"]
    assert len(calls) == 1 and res.trials[1]["reused"] == "checks"
    assert res.trials[1]["reason"] == res.trials[0]["reason"]


def test_a_run_that_fails_before_its_first_trial_leaves_nothing(tmp_path):
    """A budget too small for one trial is known only after the original is measured: the folder the run
    created is removed (so the corrected rerun is not blocked), and an output it was replacing comes back."""
    handle, data = toy()
    out = tmp_path / "opt"
    with pytest.raises(LeanmlError, match="too small for one trial"):
        optimize(handle, data, budget="2%", runtime="torch", time_budget="0.001s", out=out, threads=1, sensitivity=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    optimize(handle, data, budget="2%", runtime="torch", trials=1, out=out, threads=1, sensitivity=False)
    kept = sorted(p.name for p in out.iterdir())
    with pytest.raises(LeanmlError, match="too small for one trial"):
        optimize(
            handle, data, budget="2%", runtime="torch", time_budget="0.001s", out=out, force=True, threads=1, sensitivity=False
        )
    assert sorted(p.name for p in out.iterdir()) == kept and [p.name for p in tmp_path.iterdir()] == ["opt"]


def test_a_resumed_search_gets_the_time_that_is_left(tmp_path):
    handle, data = toy()
    out = tmp_path / "opt"
    optimize(handle, data, budget="2%", runtime="torch", trials=2, out=out, threads=1, sensitivity=False)
    study = _study(out)
    spent = study.user_attrs["search_seconds"]
    assert spent > 0
    study.set_user_attr("search_seconds", 3600.0)  # as if the first run had used the whole hour
    res = optimize(handle, data, budget="2%", runtime="torch", time_budget="1h", out=out, resume=True, threads=1)
    assert len([r for r in res.trials if r["status"] != "running"]) == 2  # no time left: no new trial


def test_a_budget_shorter_than_the_original_s_measurement_is_refused_before_it(monkeypatch, tmp_path):
    """One forward call is timed first; a model whose measurement surely outlasts the budget is refused
    without measuring it (each call sleeps 50 ms, so 23 calls alone take over 1.1 s: a 2 s budget is short)."""
    from leanml.data import TensorData
    from leanml.models import ModelHandle
    from leanml.search import study as mod

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            time.sleep(0.05)
            return self.fc(x)

    def measured(*a, **k):
        raise AssertionError("the original was measured before the refusal")

    monkeypatch.setattr(mod, "profile", measured)
    x = torch.randn(64, 4)
    handle = ModelHandle(module=Slow().eval(), task="generic", name="slow", example_inputs=(x[:8],))
    data = TensorData(name="toy", x=x, y=torch.zeros(64, dtype=torch.long))
    with pytest.raises(LeanmlError, match=r"too small for one trial: measuring the original model takes at least") as info:
        optimize(handle, data, budget="2%", runtime="torch", time_budget="2s", out=tmp_path / "o")
    assert "forward calls of" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()
