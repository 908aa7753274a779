"""Every skipped record of a run on record: output_dir/skipped.jsonl, logs, the skip policy.

    batches of a step --add(step)--> this rank's pending entries (from BatchStats.skipped)
    flush(state): all-reduce (skipped, seen, pending) over ranks
        pending > 0: gather every rank's entries to rank 0 --> SkipLog.append (fsync'd)
                     + SkipTally (first 3 per dataset and reason logged with file:line)
        SkipPolicy.check on the global counts: every rank raises at the same step
    resume at step S: rank 0 cuts skipped.jsonl back to the entries of steps <= S and recounts
    them, so the steps redone after the checkpoint are listed once.

The loop calls flush() before every checkpoint, so a checkpoint never covers a skip that is
not on disk. Only rank 0 touches the file; the counts of the policy are the ranks' checkpointed
TrainState counters (records seen, skips by reason), all-reduced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from vlpretrain.data.collate import PackedBatch
from vlpretrain.data.skips import SKIP_LOG_NAME, SkipLog, SkipPolicy, SkipTally, skip_entry
from vlpretrain.distributed.env import DistEnv, all_reduce_sum

logger = logging.getLogger(__name__)


class SkipCounts(Protocol):
    """What the recorder reads of the train state (train/checkpoint/states.py TrainState has it)."""

    step: int
    skipped: dict[str, int]
    records_seen: int


def gather_to_main(items: list[Any]) -> list[list[Any]]:
    """Every rank's `items` on rank 0 (in rank order); other ranks get []."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [items]
    is_main = dist.get_rank() == 0
    gathered: list[Any] | None = [None] * dist.get_world_size() if is_main else None
    dist.gather_object(items, gathered, dst=0)
    return [list(part) for part in gathered] if gathered is not None else []


class SkipRecorder:
    """Collects the skips of consumed batches and writes them to output_dir/skipped.jsonl."""

    def __init__(
        self,
        output_dir: str | Path,
        dataset_names: Sequence[str],
        max_skip_fraction: float,
        env: DistEnv,
        resume_step: int,
        summary_every: int = 100,
    ) -> None:
        self.env = env
        self.policy = SkipPolicy(max_skip_fraction)
        self.log = SkipLog(Path(output_dir) / SKIP_LOG_NAME)
        self.tally = SkipTally(list(dataset_names))
        self.summary_every = summary_every
        self._pending: list[dict[str, Any]] = []
        self._flushed_step = -1
        self._summarised = (resume_step, 0)
        if env.is_main:
            for entry in self.log.truncate_after(resume_step):
                self.tally.add_entry(entry, log=False)
            self._summarised = (resume_step, self.tally.num_skipped)

    def add(self, batches: Sequence[PackedBatch], step: int) -> None:
        """Note the skips carried by the micro-batches of optimizer step `step`."""
        for batch in batches:
            self._pending.extend(skip_entry(s, step, self.env.rank) for s in batch.stats.skipped)

    def flush(self, state: SkipCounts) -> None:
        """Write every rank's pending skips (rank 0), then apply the skip policy (all ranks).

        Collective: every rank calls it at the same steps.

        Raises:
            TooManySkipsError: the global skip fraction is above data.max_skip_fraction.
        """
        if self._flushed_step == state.step:
            return
        self._flushed_step = state.step
        counts = [sum(state.skipped.values()), state.records_seen, len(self._pending)]
        reduced = all_reduce_sum(torch.tensor(counts, dtype=torch.float64)).tolist()
        num_skipped, num_seen, num_pending = (int(v) for v in reduced)
        if num_pending:
            gathered = gather_to_main(self._pending)
            entries = sorted((e for part in gathered for e in part), key=lambda e: e["step"])
            if self.env.is_main:
                self.log.append(entries)
                for entry in entries:
                    self.tally.add_entry(entry, log=True)
        self._pending = []
        self._log_summary(state.step, num_seen, force=False)
        if self.env.is_main:
            details = self.tally.summary(num_seen) + f"\nevery skipped record: {self.log.path}"
        else:
            details = f"see rank 0's log and {self.log.path}"
        self.policy.check(num_skipped, num_seen, details)

    def finish(self, state: SkipCounts) -> None:
        """Flush and log the final per-reason summary (collective)."""
        self.flush(state)
        reduced = all_reduce_sum(torch.tensor([state.records_seen], dtype=torch.float64))
        self._log_summary(state.step, int(reduced.item()), force=True)

    def _log_summary(self, step: int, num_seen: int, force: bool) -> None:
        """Rank 0: the per-reason summary, at most every `summary_every` steps, if it changed."""
        last_step, last_count = self._summarised
        count = self.tally.num_skipped
        due = force or step - last_step >= self.summary_every
        if not self.env.is_main or count == last_count or not due:
            return
        self._summarised = (step, count)
        logger.warning("%s\nevery skipped record: %s", self.tally.summary(num_seen), self.log.path)
