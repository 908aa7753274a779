"""Skipped records: the one skip-fraction policy, per-reason tallies, and `skipped.jsonl`.

    SkippedSample --SkipTally.record--> counts per (dataset, reason) + rate-limited log lines
    (num_skipped, num_seen) --SkipPolicy.check--> TooManySkipsError naming datasets and reasons
    (epoch's skipped, epoch size) --SkipPolicy.judge--> data check's OK / FAIL line
    SkippedSample --skip_entry--> {"step", "rank", "dataset", "file", "line", "reason", "detail"}
      --SkipLog.append--> output_dir/skipped.jsonl   (SkipLog.truncate_after(step) on resume)

`vlpretrain data check` and the training loop use the same policy and tally; the loop's
recorder (train/skips.py) gathers every rank's skips to rank 0, which alone writes the file.
Nothing here knows about ranks or process groups.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpretrain.data.samples import SkippedSample
from vlpretrain.errors import RefusedError
from vlpretrain.files import write_atomic

logger = logging.getLogger(__name__)

SKIP_LOG_NAME = "skipped.jsonl"
"""File in output_dir listing every skipped record of the run, one JSON object per line."""
ENTRY_KEYS = ("step", "rank", "dataset", "file", "line", "reason", "detail")
"""Keys of one skipped.jsonl entry, in order."""


class TooManySkipsError(RefusedError, RuntimeError):
    """More records were skipped than data.max_skip_fraction allows."""


MIN_RECORDS_FOR_SKIP_POLICY = 100
"""Records a run must have seen before data.max_skip_fraction applies: with fewer, one bad
record would be a large fraction (1 of the first 10 is 10 %) and stop a run on its first
steps. A run that never sees this many records is never stopped by the policy."""


@dataclass(frozen=True)
class SkipPolicy:
    """Stop when more than `max_fraction` of the records seen were skipped.

    `min_records`: no verdict before that many records were seen, so that the first bad record
    of a run does not stop it. Training and `data check` both use the default.
    """

    max_fraction: float
    min_records: int = MIN_RECORDS_FOR_SKIP_POLICY

    def describe(self) -> str:
        """The rule in one sentence (show-config prints it)."""
        return (
            f"a run stops when more than data.max_skip_fraction ({self.max_fraction:.2%}) of "
            f"the records it has seen were skipped, judged from {self.min_records} records "
            "seen on (a run that sees fewer is never stopped by it); data check judges one "
            "epoch (records after repeat_time) the same way"
        )

    def judge(self, num_skipped: int, num_seen: int, what: str) -> tuple[bool, str]:
        """Whether `num_skipped` of `num_seen` records (`what`) pass, and the verdict line."""
        fraction = num_skipped / num_seen if num_seen else 0.0
        verdict = f"skip fraction {fraction:.2%} of {what} (max {self.max_fraction:.2%})"
        if num_seen >= self.min_records:
            passes = not self.exceeded(num_skipped, num_seen)
            return passes, ("OK: " if passes else "FAIL: ") + verdict
        note = (
            f"OK: {verdict}, not judged: the skip policy judges from {self.min_records} "
            f"records seen on"
        )
        if fraction > self.max_fraction:
            note += f" (a run that sees {self.min_records} or more of these records stops)"
        return True, note

    def exceeded(self, num_skipped: int, num_seen: int) -> bool:
        """True when the fraction is over the limit (and enough records were seen)."""
        return (
            num_seen > 0
            and num_seen >= self.min_records
            and (num_skipped / num_seen > self.max_fraction)
        )

    def check(self, num_skipped: int, num_seen: int, details: str = "") -> None:
        """Raise TooManySkipsError (with `details`, e.g. SkipTally.summary()) if exceeded."""
        if self.exceeded(num_skipped, num_seen):
            raise TooManySkipsError(
                f"{num_skipped} of {num_seen} records skipped ({num_skipped / num_seen:.2%}), "
                f"above data.max_skip_fraction {self.max_fraction:.2%}."
                + (f"\n{details}" if details else "")
            )


class SkipTally:
    """Counts seen and skipped records per dataset and reason; logs skips rate-limited.

    The first `log_first` skips of each (dataset, reason) are logged with file:line, then one
    in `log_every`; `summary()` gives one line per (dataset, reason). A record is logged and
    given as an example once: each epoch that reads a bad line again counts it again, but
    its line is already in the log (and in skipped.jsonl for every time it was read).
    """

    def __init__(self, dataset_names: list[str], log_first: int = 3, log_every: int = 100) -> None:
        self.dataset_names = list(dataset_names)
        self.log_first = log_first
        self.log_every = log_every
        self.seen: Counter[str] = Counter()
        self.skipped: Counter[tuple[str, str]] = Counter()
        self.examples: dict[tuple[str, str], list[str]] = {}
        self.reported: set[str] = set()
        """file:line of every record logged so far (or left by the run this one resumes)."""

    def name(self, dataset_index: int) -> str:
        """Dataset name of a meta-file position."""
        if 0 <= dataset_index < len(self.dataset_names):
            return self.dataset_names[dataset_index]
        return f"dataset {dataset_index}"

    def record(self, sample: Any) -> None:
        """Count one loaded result: seen, and skipped if it is a SkippedSample."""
        self.seen[self.name(sample.dataset_index)] += 1
        if isinstance(sample, SkippedSample):
            location = f"{sample.source.path}:{sample.source.line}"
            self.add_skip(sample.source.dataset, sample.reason, str(sample), True, location)

    def add_skip(
        self, dataset: str, reason: str, where: str, log: bool, location: str | None = None
    ) -> None:
        """Count one skip (already counted as seen); `where` is its file:line text, `location`
        the file:line that tells one record from another (default: `where`)."""
        key = (dataset, reason)
        self.skipped[key] += 1
        count = self.skipped[key]
        location = where if location is None else location
        if location in self.reported:
            return  # the same record read again in a later epoch: counted, not repeated
        self.reported.add(location)
        examples = self.examples.setdefault(key, [])
        if len(examples) < self.log_first:
            examples.append(where)
        if log and (count <= self.log_first or count % self.log_every == 0):
            logger.warning("%s [%s: %s #%d]", where, dataset, reason, count)

    def add_entry(self, entry: dict[str, Any], log: bool) -> None:
        """Count one skipped.jsonl entry."""
        where = f"{entry['file']}:{entry['line']}: skipped ({entry['reason']}) {entry['detail']}"
        location = f"{entry['file']}:{entry['line']}"
        self.add_skip(str(entry["dataset"]), str(entry["reason"]), where, log, location)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def num_seen(self) -> int:
        return sum(self.seen.values())

    def by_reason(self) -> Counter[str]:
        """Skips per reason over all datasets."""
        out: Counter[str] = Counter()
        for (_, reason), count in self.skipped.items():
            out[reason] += count
        return out

    def summary(self, num_seen: int | None = None) -> str:
        """One line per (dataset, reason), most frequent first, with file:line examples."""
        total = self.num_seen if num_seen is None else num_seen
        lines = [f"skipped {self.num_skipped} of {total} records"]
        for (dataset, reason), count in self.skipped.most_common():
            seen = f" of {self.seen[dataset]}" if self.seen[dataset] else ""
            lines.append(f"  {dataset}: {reason}: {count}{seen}")
            lines.extend(f"      e.g. {ex}" for ex in self.examples.get((dataset, reason), []))
        return "\n".join(lines)


def skip_entry(sample: SkippedSample, step: int, rank: int) -> dict[str, Any]:
    """The skipped.jsonl entry of a record skipped by `rank` in optimizer step `step`."""
    source = sample.source
    values = (step, rank, source.dataset, source.path, source.line, sample.reason, sample.detail)
    return dict(zip(ENTRY_KEYS, values, strict=True))


class SkipLog:
    """Append-only `skipped.jsonl`; entries carry the step that consumed the skipped record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """Every entry of the file (none if it does not exist); a torn last line is dropped."""
        if not self.path.is_file():
            return []
        entries = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d: unreadable entry dropped (torn write?)", self.path, number)
        return entries

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        """Keep only entries of steps <= `step` (a resumed run redoes the later ones)."""
        entries = self.read()
        kept = [e for e in entries if int(e.get("step", 0)) <= step]
        if len(kept) != len(entries) or (self.path.exists() and not entries):
            write_atomic(self.path, lambda handle: handle.write(_lines(kept)))
        return kept

    def append(self, entries: Iterable[dict[str, Any]]) -> None:
        """Append entries and flush them to disk (before the checkpoint that covers them)."""
        text = _lines(entries)
        if not text:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def _lines(entries: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8")
