"""A tiny optimize run for the process tests: ``python worker.py OUT TRIALS [resume]``."""

from __future__ import annotations

import sys

import torch


def toy():
    from leanml.data import TensorData
    from leanml.models import ModelHandle

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)).eval()
    x = torch.randn(300, 20)
    with torch.no_grad():
        y = net(x).argmax(-1)
    handle = ModelHandle(module=net, task="generic", name="toy-mlp", example_inputs=(x[:8],))
    return handle, TensorData(name="toy", x=x, y=y)


if __name__ == "__main__":
    torch.set_num_threads(1)
    from leanml.search import optimize

    handle, data = toy()
    if len(sys.argv) > 3:  # a second worker: join once the first has created the study and measured the original
        import time
        from pathlib import Path

        import optuna

        db = Path(sys.argv[1]) / "study.db"
        for _ in range(1200):
            try:
                storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
                if "before" in optuna.get_all_study_summaries(storage)[0].user_attrs:
                    break
            except Exception:
                pass
            time.sleep(0.1)
    optimize(
        handle, data, budget="2%", runtime="torch", trials=int(sys.argv[2]), out=sys.argv[1], resume=len(sys.argv) > 3, threads=1
    )
