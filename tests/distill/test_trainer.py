"""The trainer: resume equals an uninterrupted run, gradient accumulation equals one big batch, a
2-process torchrun job equals the single-process run, the teacher cache changes nothing, a student
equal to its teacher has zero distillation loss."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import leanml
from leanml.distill import Distill, Items, batch_indices, build_student, train
from leanml.distill.trainer import CHECKPOINT
from leanml.errors import LeanmlError
from leanml.models import ModelHandle
from tests.conftest import CharTokenizer, tiny_llama_module

ROOT = Path(__file__).resolve().parents[2]


def teacher_and_items(n_items: int = 16, length: int = 24):
    teacher = ModelHandle(module=tiny_llama_module(layers=4), task="causal-lm", name="t", tokenizer=CharTokenizer())
    g = torch.Generator().manual_seed(1)
    items = Items("tokens", tokens=torch.randint(0, 128, (n_items, length), generator=g))
    return teacher, items


def run(cfg: Distill, items: Items, **kwargs) -> tuple[dict, dict]:
    teacher, _ = teacher_and_items()
    student, report = build_student(teacher, "drop-layers:0.5:every")
    result = train(student, teacher.module, cfg, items, layer_sources=report["layer_sources"], **kwargs)
    return result, {k: v.detach().clone() for k, v in student.module.state_dict().items()}


def test_batch_indices_are_a_function_of_the_step():
    a = [batch_indices(10, s, 4, seed=3) for s in range(6)]
    assert a == [batch_indices(10, s, 4, seed=3) for s in range(6)]
    assert sorted(a[0] + a[1]) == sorted(set(a[0] + a[1]))  # no repeats within an epoch
    assert batch_indices(10, 0, 4, 0, order=list(range(10))) == [0, 1, 2, 3]
    with pytest.raises(LeanmlError, match="fewer than one batch"):
        batch_indices(3, 0, 4, 0)


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    _, items = teacher_and_items()
    cfg = Distill(loss="kd+hidden", steps=6, batch_size=4, lr=1e-3, checkpoint_every=2)
    full, full_state = run(cfg, items, checkpoint_dir=tmp_path / "a")

    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # dies during step 4, after the checkpoint of step 2... and before the one of step 4
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, items, checkpoint_dir=tmp_path / "b")
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)["step"] == 2
    assert not [p for p in (tmp_path / "b").iterdir() if p.name != CHECKPOINT]  # no temp file left behind
    resumed, resumed_state = run(cfg, items, checkpoint_dir=tmp_path / "b", resume=True)
    assert resumed["resumed_from"] == 2
    assert resumed["losses"] == full["losses"]
    for k, v in full_state.items():
        torch.testing.assert_close(resumed_state[k], v, rtol=0, atol=1e-6)


def test_resume_refuses_other_settings_or_nothing(tmp_path):
    _, items = teacher_and_items()
    cfg = Distill(steps=2, batch_size=4, checkpoint_every=1)
    run(cfg, items, checkpoint_dir=tmp_path)
    with pytest.raises(LeanmlError, match="different configuration"):
        run(Distill(steps=2, batch_size=4, checkpoint_every=1, lr=1e-3), items, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(LeanmlError, match="found no checkpoint"):
        run(cfg, items, checkpoint_dir=tmp_path / "none", resume=True)


def test_gradient_accumulation_equals_one_batch():
    _, items = teacher_and_items()
    one, s1 = run(Distill(loss="kd+task", steps=3, batch_size=4, lr=1e-3), items)
    acc, s2 = run(Distill(loss="kd+task", steps=3, batch_size=4, grad_accum=2, lr=1e-3), items)
    assert acc["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for k, v in s1.items():
        torch.testing.assert_close(s2[k], v, rtol=1e-4, atol=1e-5)


def test_teacher_cache_matches_full_top_k():
    _, items = teacher_and_items()
    plain, s1 = run(Distill(steps=4, batch_size=4, top_k=16, lr=1e-3), items)
    cached, s2 = run(Distill(steps=4, batch_size=4, top_k=16, lr=1e-3, cache_teacher=True), items)
    assert cached["teacher_cached_items"] == 16
    assert cached["losses"] == pytest.approx(plain["losses"], rel=1e-5)


def test_student_equal_to_teacher_has_zero_distillation_loss():
    teacher, items = teacher_and_items()
    student, _ = build_student(teacher, "same")
    result = train(
        student, teacher.module, Distill(loss="kd+hidden", steps=1, batch_size=4, lr=1e-12), items, layer_sources=[0, 1, 2, 3]
    )
    assert result["losses"][0] == pytest.approx(0.0, abs=1e-6)


def test_sparse_masks_stay_fixed(tiny_llama, tiny_text):
    from leanml.prune import Prune, SparseLinear

    leanml.prune(tiny_llama, Prune(method="magnitude", sparsity=0.5))
    teacher = ModelHandle(module=tiny_llama_module(), task="causal-lm", name="t")
    _, items = teacher_and_items()
    train(tiny_llama, teacher.module, Distill(steps=2, batch_size=4, lr=1e-2), items)
    for m in tiny_llama.module.modules():
        if isinstance(m, SparseLinear):
            assert bool((m.weight[~m.weight_mask] == 0).all())


SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    sys.path.insert(0, {root!r})
    from tests.conftest import CharTokenizer, tiny_llama_module
    from leanml.distill import Distill, Items, build_student, init_distributed, train
    from leanml.models import ModelHandle
    torch.set_num_threads(1)
    init_distributed()
    teacher = ModelHandle(module=tiny_llama_module(layers=4), task="causal-lm", name="t", tokenizer=CharTokenizer())
    g = torch.Generator().manual_seed(1)
    items = Items("tokens", tokens=torch.randint(0, 128, (16, 24), generator=g))
    student, report = build_student(teacher, "drop-layers:0.5:every")
    cfg = Distill(loss="kd+task", steps=4, batch_size=4, lr=1e-3)  # per-item means: shards average exactly
    result = train(student, teacher.module, cfg, items, layer_sources=report["layer_sources"])
    if int(os.environ.get("RANK", "0")) == 0:
        w = student.module.model.layers[0].mlp.up_proj.weight
        json.dump({{"losses": result["losses"], "processes": result["processes"], "w": w.flatten()[:50].tolist()}},
                  open(sys.argv[1], "w"))
""")


PROBE = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2.0
    dist.destroy_process_group()
""")


def _torchrun(processes, script, env, *args) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a free port: a fixed one can be taken on a shared machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return processes.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            str(script),
            *args,
        ],
        env=env,
        timeout=300,
    )


@pytest.mark.process
def test_two_process_torchrun_matches_single_process(tmp_path, processes):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LEANML_QUIET": "1"}
    env.pop("WORLD_SIZE", None)
    single, multi = tmp_path / "one.json", tmp_path / "two.json"
    assert processes.run([sys.executable, str(script), str(single)], env=env).returncode == 0
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    ok = _torchrun(processes, probe, env)
    if ok.returncode != 0:  # the machine itself cannot host a 2-process gloo job (sandboxed network)
        tail = (ok.stderr.strip().splitlines() or ["?"])[-1][:300]
        pytest.skip(f"a bare 2-process gloo all-reduce fails on this machine: {tail}")
    job = _torchrun(processes, script, env, str(multi))
    assert job.returncode == 0, f"torchrun failed ({job.returncode}):\n{job.stdout[-3000:]}\n{job.stderr[-6000:]}"
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert a["processes"] == 1 and b["processes"] == 2
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-4, abs=1e-6)
    assert b["w"] == pytest.approx(a["w"], rel=1e-3, abs=1e-5)
