"""Stop a run cleanly when the scheduler asks: finish the step, agree, save, exit.

    SIGTERM / SIGUSR1 / SIGINT --C handler--> wakeup socket --watch thread-->
        first signal: stop requested (one warning line), the grace timer starts
        same again within DUPLICATE_SECONDS: the same request (torchrun forwards to its ranks
            what a scheduler already sent to every process of the job)
        another one later, or grace_seconds passed: exit at once, without a checkpoint
    loop, after each optimizer step: StopRequest.agreed() (one all-reduce with > 1 rank)
        --> every rank saves the same step, then Preempted ends the process with PREEMPTED_EXIT

The watch runs in its own thread and learns of signals from Python's wakeup fd, which the
C-level handler writes at once: a main thread blocked in a collective or a read that never
returns still exits on the second signal or at the end of the grace period. A process forked
meanwhile (a data-loader worker, which a scheduler or a launcher signals too) ignores the
signals and forgets the wakeup fd: its parent decides when it ends, and the save still reads
the loader's next batches. torch's workers then install their own SIGTERM handler, which dies
of a SIGTERM from anyone but the parent; `keep_worker_through_stop_signals` (the loader's
worker_init_fn) takes SIGTERM back: only the parent's (the DataLoader ending its workers)
ends a worker, and any other sender's is dropped.

This module decides when to stop; the loop decides what a stop saves (the usual checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from types import FrameType

import torch

from vlpretrain.distributed.env import all_reduce_host_sum, finish_after_launcher_death

logger = logging.getLogger(__name__)

PREEMPTED_EXIT = 124
"""Exit code of a run stopped by a preemption signal after saving its checkpoint. It is the
code timeout(1) gives a command stopped at its time limit: the job ran out of time, not into
an error; run it again (the same command, train.resume = "auto") and it continues from the
saved step. It differs from 0 (finished), 1 (an error) and 128 + N (killed by signal N
without a checkpoint), so a batch script can requeue on exactly this code."""
DUPLICATE_SECONDS = 2.0
"""A repeat of the first signal within this many seconds is the same request: a scheduler
signals every process of the job, and torchrun forwards the same signal to its ranks."""
CLOSING = 0
"""Byte that tells the watch thread the block ended (signal numbers start at 1)."""

_caught: set[int] = set()
"""Signals a catch_stop_signals block handles now (what a forked child must ignore)."""
_ignored_since_fork: set[int] = set()
"""In a forked child: the signals its parent was catching when it forked."""
_fork_hook = [False]
"""Whether the after-fork hook is registered (once per process; it cannot be removed)."""


class Preempted(SystemExit):
    """The run stopped on a preemption signal after saving `checkpoint` (exit PREEMPTED_EXIT)."""

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(PREEMPTED_EXIT)
        self.step = step
        self.checkpoint = checkpoint


class StopRequest:
    """Whether a preemption signal asked this rank to stop; `agreed` asks every rank."""

    def __init__(self, grace_seconds: float = 0.0) -> None:
        self.grace_seconds = grace_seconds
        self.signal_name = ""
        self._requested = threading.Event()

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def request(self, signal_name: str) -> None:
        self.signal_name = signal_name
        self._requested.set()

    def agreed(self, world_size: int) -> bool:
        """True on every rank when any rank was asked to stop. With several ranks this is one
        all-reduce of one number; the loop calls it right after the step's own reductions,
        when the ranks are in step with each other, so it waits for nobody."""
        if world_size == 1:
            return self.requested
        flag = torch.tensor(1.0 if self.requested else 0.0, dtype=torch.float64)
        return all_reduce_host_sum(flag) > 0  # a CPU scalar over gloo: no device sync


def signal_numbers(names: Sequence[str]) -> list[signal.Signals]:
    return [signal.Signals[name] for name in names]


def exit_at_once(why: str, signum: int) -> None:
    """End the process now (no checkpoint): 128 + signum, as a death by that signal reads."""
    sys.stderr.write(f"vlpretrain: {why}; exiting at once without a checkpoint\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def watch_signals(receiver: socket.socket, request: StopRequest, wanted: set[int]) -> None:
    """Thread body: turn the signal numbers read from `receiver` into the stop decisions."""
    first: tuple[int, float] | None = None  # (signal number, monotonic time)
    while True:
        if first is not None:
            remaining = first[1] + request.grace_seconds - time.monotonic()
            if remaining <= 0:
                grace = request.grace_seconds
                exit_at_once(f"no checkpoint within {grace:g} s of {request.signal_name}", first[0])
            receiver.settimeout(remaining)
        try:
            data = receiver.recv(64)
        except TimeoutError:
            continue  # the grace check above ends the process
        if not data or CLOSING in data:
            return  # the stage is over
        for signum in (number for number in data if number in wanted):
            name = signal.Signals(signum).name
            if first is None:
                first = (signum, time.monotonic())
                finish_after_launcher_death(request.grace_seconds)
                request.request(name)
                logger.warning(
                    "received %s: finishing this step, then saving a checkpoint and exiting "
                    "with code %d (another signal exits at once)", name, PREEMPTED_EXIT,
                )  # fmt: skip
            elif time.monotonic() - first[1] > DUPLICATE_SECONDS:
                exit_at_once(f"received {name} again while stopping", signum)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: the watch thread acts on the signal (via the wakeup fd)."""


def _forget_in_child() -> None:
    """After a fork inside the block: ignore the signals, stop writing to the parent's fd."""
    if not _caught:
        return
    with contextlib.suppress(ValueError):  # not forked from the main thread
        signal.set_wakeup_fd(-1)
        for number in _caught:
            signal.signal(number, signal.SIG_IGN)
        _ignored_since_fork.update(_caught)
    _caught.clear()


def keep_worker_through_stop_signals(worker_id: int) -> None:
    """A DataLoader worker_init_fn: a SIGTERM the parent catches does not end this worker
    unless the parent sends it.

    torch's worker handler (installed after the fork, before this runs) dies of a SIGTERM
    from any other process, so a launcher or scheduler signalling the process group would
    kill the workers while the parent still needs them for the save. Here SIGTERM is blocked
    and a thread takes each one with sigwaitinfo, which names the sender: the parent's (the
    DataLoader's terminate at shutdown) ends the worker with code 0, as torch's handler does;
    anyone else's is dropped. Nothing changes where the parent does not catch SIGTERM, or where
    the platform lacks sigwaitinfo (macOS).
    """
    if signal.SIGTERM not in _ignored_since_fork or not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later too
    parent = os.getppid()
    threading.Thread(
        target=_end_on_parents_sigterm, args=(parent,), name="vlpretrain-worker-sigterm",
        daemon=True,
    ).start()  # fmt: skip


def _end_on_parents_sigterm(parent: int) -> None:
    """Thread body in a worker: wait for SIGTERMs; exit on the parent's, drop the rest."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)


@contextlib.contextmanager
def catch_stop_signals(names: Sequence[str], grace_seconds: float) -> Iterator[StopRequest]:
    """Within the block, `names` request a clean stop instead of ending the process.

    Outside the main thread (where Python cannot install handlers) or with no names, the
    signals keep their usual effect and the request is never set.
    """
    request = StopRequest(grace_seconds)
    if not names or threading.current_thread() is not threading.main_thread():
        yield request
        return
    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    numbers = signal_numbers(names)
    previous = {number: signal.signal(number, _ignore) for number in numbers}
    previous_fd = signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    _caught.update(int(n) for n in numbers)
    if not _fork_hook[0]:
        os.register_at_fork(after_in_child=_forget_in_child)
        _fork_hook[0] = True
    watcher = threading.Thread(
        target=watch_signals,
        args=(receiver, request, {int(n) for n in numbers}),
        name="vlpretrain-stop-signals",
        daemon=True,
    )
    watcher.start()
    try:
        yield request
    finally:
        _caught.clear()
        signal.set_wakeup_fd(previous_fd)
        for number, handler in previous.items():
            signal.signal(number, handler)
        # not end-of-file: forked workers may still hold a copy of the sending end
        sender.send(bytes([CLOSING]))
        watcher.join()
        sender.close()
        receiver.close()
