"""Rank-aware logging set-up and the one writer of step metrics (stdout, JSONL, TensorBoard)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger("vlpretrain.metrics")


def setup_logging(rank: int = 0, log_all_ranks: bool = False, verbose: bool = False) -> None:
    """Rank 0 logs INFO, other ranks WARNING unless `log_all_ranks`; called once by the CLI."""
    level = logging.INFO if (rank == 0 or log_all_ranks) else logging.WARNING
    if verbose:
        level = logging.DEBUG
    prefix = f"[rank{rank}] " if log_all_ranks else ""
    # No force=True: when a handler is already installed (pytest's, an embedding app's) we
    # keep it and only set our loggers' level.
    logging.basicConfig(
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("vlpretrain").setLevel(level)
    for noisy in ("httpx", "urllib3", "torch.distributed.checkpoint"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _format(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5) or math.isnan(value):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


class MetricsWriter:
    """Writes one record per logged step to stdout (one line), metrics.jsonl and TensorBoard."""

    def __init__(
        self, output_dir: str | Path, tensorboard: bool, enabled: bool = True, start_step: int = 0
    ) -> None:
        """`start_step`: the step the run starts after (a resumed checkpoint's); records of
        later steps, left by an interrupted run, are dropped (they will be written again)."""
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the interrupted run's events of the steps that are redone.
            self._tensorboard = SummaryWriter(
                str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1
            )

    def write(self, step: int, metrics: dict[str, Any], line_keys: tuple[str, ...] = ()) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self._tensorboard.add_scalar(key, value, step)
        keys = line_keys or tuple(metrics)
        logger.info(
            "step %d | %s",
            step,
            " | ".join(f"{k} {_format(metrics[k])}" for k in keys if k in metrics),
        )

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of steps <= last_step (and no torn last line) in a JSONL file."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = int(json.loads(line)["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False  # a line torn by a kill
        if keep:
            kept.append(line + "\n")
        else:
            dropped += int(bool(line.strip()))
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
        logger.info("%s: dropped %d records after step %d (redone now)", path, dropped, last_step)
