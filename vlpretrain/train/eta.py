"""The time left to train.max_steps, from the recent steps of this process only.

A resumed run has done its earlier steps in another process (other load, other start-up), so
only the steps this process timed count. Its first step carries the start-up (loader workers
filling, compilation, allocator warm-up) and stands for the rest only until a second is timed;
after that the mean of the last `window` step times (checkpoint saves and logging included,
they recur) is the typical step.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class EtaClock:
    """Seconds to max_steps after each finished optimizer step."""

    def __init__(
        self, max_steps: int, window: int = 50, now: Callable[[], float] = time.perf_counter
    ) -> None:
        """Starts timing now: the first step timed is the one that finishes next."""
        self.max_steps = max_steps
        self._now = now
        self._last = now()
        self._first: float | None = None
        self._recent: deque[float] = deque(maxlen=window)

    def tick(self, step: int) -> float:
        """Record that `step` just finished; returns the estimated seconds to max_steps."""
        now = self._now()
        seconds, self._last = now - self._last, now
        if self._first is None:
            self._first = seconds  # start-up included: not typical of the steps to come
        else:
            self._recent.append(seconds)
        typical = sum(self._recent) / len(self._recent) if self._recent else self._first
        return typical * max(0, self.max_steps - step)
