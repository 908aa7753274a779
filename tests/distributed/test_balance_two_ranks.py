"""Two gloo ranks with FLOPs-balanced packing (packing.balance_flops): the CLI run trains,
checkpoints the packer's running FLOPs mean, and resumes to exactly the straight run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_two_ranks import torchrun, wait_ok
from train_fixtures import (
    losses_by_step,
    read_metrics,
    stage_raw,
    train_assets,  # noqa: F401  (pytest fixture)
    write_stage,
)

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _balance_states(state: Any) -> list[dict[str, Any]]:
    """Every packer 'balance' entry inside a (nested) data-loader state."""
    found = []
    if isinstance(state, dict):
        if "balance" in state and "rows" in state:
            found.append(state["balance"])
        for value in state.values():
            found += _balance_states(value)
    elif isinstance(state, list | tuple):
        for value in state:
            found += _balance_states(value)
    return found


def _rank_state(checkpoint: Path, rank: int) -> Any:
    """A rank's saved state, JSON (checkpoint format 3) or a pickle (format 2)."""
    as_json = checkpoint / f"rank-{rank:05d}.json"
    if as_json.is_file():
        return json.loads(as_json.read_text())
    return torch.load(checkpoint / f"rank-{rank:05d}.pt", weights_only=False)


def test_balanced_two_rank_run_resumes_exactly(train_assets, tmp_path):  # noqa: F811
    def stage(name: str, max_steps: int) -> Path:
        raw = stage_raw(
            train_assets,
            tmp_path / name,
            stage="stage2",
            max_steps=max_steps,
            optim={"learning_rate": 1e-3, "warmup_steps": 0, "lr_scheduler_type": "constant"},
            dist={"strategy": "ddp"},
        )
        raw["packing"]["balance_flops"] = True
        return write_stage(tmp_path / f"{name}.toml", raw)

    straight, resumed = stage("straight", 4), stage("resumed", 2)
    processes = [torchrun(straight), torchrun(resumed)]
    for process in processes:
        wait_ok(process)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-00000002"
    for rank in (0, 1):
        balances = _balance_states(_rank_state(checkpoint, rank))
        assert balances and all(b["total_tokens"] > 0 for b in balances)

    allow = 'train.allow_changed_on_resume=["train.max_steps"]'
    wait_ok(torchrun(resumed, "--set", "train.max_steps=4", "--set", allow))
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3, 4]
    losses = losses_by_step(tmp_path / "resumed")
    assert losses == losses_by_step(tmp_path / "straight")
    assert all(loss == loss for loss in losses.values())  # trained: finite, not NaN
