"""Benchmark: how long a checkpoint save holds up training, synchronous vs asynchronous.

    one process, a model + AdamW state of about 200 MB fp32 (a 6-layer MLP stack), CPU
    sync:  Checkpointer(asynchronous=False).save  -> the loop waits for the whole write
    async: Checkpointer(asynchronous=True).save   -> the loop waits for the copy to host
           memory; the write finishes in the background (then `finish` at the next save)

Side by side in one run, alternating, each save into a fresh directory; the figure is the
wall time `save` blocks the caller, median [min, max] over the repeats. The async save's
background write is waited for (untimed) before the next repeat, so each repeat starts
idle. On a GPU the copy is device-to-host and the write is the same, so the ratio of a
slow file system shows there too.
Run: `.venv/bin/python bench/checkpoint_save.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from vlpretrain.train.checkpoint.states import TrainState, training_states
from vlpretrain.train.checkpoint.store import Checkpointer

WIDTH, LAYERS = 2048, 6
"""6 x 2048^2 weights = 25M parameters: 100 MB of weights plus 200 MB of Adam moments."""


class _NoLoader:
    def __iter__(self):
        return iter(())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _states() -> dict:
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, WIDTH)).sum().backward()
    optimizer.step()  # the moments exist
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return training_states(model, optimizer, scheduler, _NoLoader(), TrainState())


def blocking_seconds(asynchronous: bool, states: dict, root: Path) -> float:
    checkpointer = Checkpointer(asynchronous)
    start = time.perf_counter()
    checkpointer.save(root, states, step=1, config={}, keep=1)
    seconds = time.perf_counter() - start
    checkpointer.finish()  # untimed: the background write completes before the next repeat
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    states = _states()
    times: dict[str, list[float]] = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for name in ("sync", "async"):
                root = Path(scratch) / f"{name}-{repeat}"
                times[name].append(blocking_seconds(name == "async", states, root))
    for name, values in times.items():
        print(f"{name:>5}: save blocks {statistics.median(values):.3f} s "
              f"[{min(values):.3f}, {max(values):.3f}] over {len(values)} saves")  # fmt: skip
    ratio = statistics.median(times["sync"]) / statistics.median(times["async"])
    print(f"async save blocks the loop {ratio:.1f}x less than a sync save")


if __name__ == "__main__":
    main()
