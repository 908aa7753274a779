"""Resumable checkpoints with torch.distributed.checkpoint (DCP), written atomically.

    output_dir/checkpoints/step-00000100/   model + optimizer (DCP, sharded per rank)
                                            train_state.json (step, tokens, scheduler, config)
                                            rank-00000.pt ... (data-loader state, RNG) per rank

A checkpoint is written into `step-N.tmp` and renamed once every rank has finished, so a
crash never leaves a half-written directory under a final name; `latest_checkpoint` only
considers final names. The last `keep` checkpoints are kept. What a checkpoint does not hold
is the exported model: that is written once at the end of a stage (model.build.save_internvl).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from vlpretrain.distributed.env import barrier

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_VERSION = 2


@dataclass
class TrainState:
    """Everything about progress that is not a tensor of the model or optimizer."""

    step: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped samples so far by 'dataset/reason'."""
    records_seen: int = 0
    """Samples plus skips: the denominator of the skip fraction."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def save_checkpoint(
    output_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    loader: Any,
    resolved_config: dict[str, Any],
    keep: int,
) -> Path:
    """Write a checkpoint of the current step on every rank; returns its final path."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{state.step:08d}"
    tmp = root / f"step-{state.step:08d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    # Counters are per rank (each rank counts its own batches), so they live in its file.
    local = {
        "version": STATE_VERSION,
        "loader": loader.state_dict(),
        "rng": capture_rng(),
        "train_state": asdict(state),
    }
    torch.save(local, tmp / f"rank-{_rank():05d}.pt")
    if _rank() == 0:
        meta = {
            "version": STATE_VERSION,
            "world_size": _world(),
            "step": state.step,
            "scheduler": scheduler.state_dict(),
            "config": resolved_config,
        }
        (tmp / "train_state.json").write_text(json.dumps(meta, indent=2, default=str))
    barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(output_dir, keep)
    barrier()
    logger.info("saved checkpoint %s", final)
    return final


def _prune(output_dir: str | Path, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: Any,
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore everything saved by `save_checkpoint` in place.

    Returns this rank's train state and its saved RNG states, which the caller restores
    (`restore_rng`) once the data-loader iterator exists (creating it draws from the RNG).
    """
    path = Path(path)
    meta = json.loads((path / "train_state.json").read_text())
    if meta.get("version") != STATE_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {meta.get('version')!r}; this vlpretrain "
            f"reads version {STATE_VERSION}. Resume with the version that wrote it, or start a "
            "new stage from the exported weights (model.model_name_or_path)."
        )
    if meta["world_size"] != _world():
        raise ValueError(
            f"{path} was written by {meta['world_size']} ranks but this run has {_world()}; "
            "the data stream cannot be resumed exactly on a different world size. Start a new "
            "stage from its weights instead (model.model_name_or_path)."
        )
    model_state, optim_state = get_state_dict(model, optimizer)
    target: dict[str, Any] = {"model": model_state, "optim": optim_state}
    dcp.load(target, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"]
    )
    scheduler.load_state_dict(meta["scheduler"])
    local = torch.load(path / f"rank-{_rank():05d}.pt", weights_only=False)
    loader.load_state_dict(local["loader"])
    logger.info("resumed from %s (step %d)", path, meta["step"])
    return TrainState(**local["train_state"]), local["rng"]


def capture_rng() -> dict[str, torch.Tensor]:
    """The torch generators this process draws from (CPU, and the current CUDA device)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
