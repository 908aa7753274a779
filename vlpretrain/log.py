"""Rank-aware logging set-up and the one writer of step metrics (stdout, JSONL, trackers)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlpretrain.trackers import Tracker, build_trackers

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


def format_duration(seconds: float) -> str:
    """'H:MM:SS' (days fold into hours), as the progress line shows the time left."""
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _line_item(key: str, value: Any) -> str:
    if key == "eta_seconds" and isinstance(value, int | float) and math.isfinite(value):
        return f"eta {format_duration(value)}"
    return f"{key} {_format(value)}"


class MetricsWriter:
    """Writes one record per logged step to stdout (one line), metrics.jsonl and the trackers
    train.report_to names (vlpretrain.trackers); only its numeric values reach the trackers."""

    def __init__(
        self,
        output_dir: str | Path,
        report_to: Sequence[str] = (),
        enabled: bool = True,
        start_step: int = 0,
    ) -> None:
        """`start_step`: the step the run starts after (a resumed checkpoint's); records of
        later steps, left by an interrupted run, are dropped (they will be written again)."""
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._trackers: list[Tracker] = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, start_step)
        self._trackers = build_trackers(report_to, Path(output_dir), start_step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The run's parameters (resolved config, facts) to every tracker."""
        for tracker in self._trackers:
            tracker.log_params(params)

    def write(self, step: int, metrics: dict[str, Any], line_keys: tuple[str, ...] = ()) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        numbers = {
            key: value
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        for tracker in self._trackers:
            tracker.log_metrics(step, numbers)
        keys = line_keys or tuple(metrics)
        logger.info(
            "step %d | %s",
            step,
            " | ".join(_line_item(k, metrics[k]) for k in keys if k in metrics),
        )

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Also on an exception: a tracker run left open would collide with the next stage's.
        self.close()


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
