"""Process-group set-up from torchrun's environment; device and backend choice; rank helpers.

Single-process runs also get a (world size 1) process group so the training code has one
path: DCP checkpoints, all-reduces and barriers behave the same with 1 or N ranks. Also what
keeps ranks from hanging or running on alone: a collective timeout in minutes, a stack dump
of a rank that waits too long (and its end, when nothing else would end the wait), a check
that every rank runs the same job, and a watch that stops a rank whose torchrun launcher died.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import hashlib
import json
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


DEFAULT_TIMEOUT_MINUTES = 10.0
"""Collective timeout when the caller has no config (torch's default is 30 minutes)."""
LAUNCHER_DIED_EXIT = 70
STALL_EXIT = 74
"""Exit code of a rank ended by a stall (EX_IOERR: typically a read that never returns)."""


def init_distributed(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistEnv:
    """Join (or create) the default process group; nccl on GPU, gloo on CPU.

    Under torchrun, first starts the launcher watch (watch_launcher): joining the group waits
    on the launcher's store, which never answers once the launcher is dead.
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    watch_launcher(rank)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # CPU tensors (loss and weight sums, skip counts) are reduced too: gloo serves them.
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "MASTER_ADDR" not in os.environ and world_size == 1:
            # One process needs no rendezvous: an in-process store opens no port, so two
            # single-rank runs on one machine never race for one.
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            if "MASTER_ADDR" not in os.environ:
                os.environ["MASTER_ADDR"] = "127.0.0.1"
                os.environ["MASTER_PORT"] = str(_free_port())
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return DistEnv(rank, local_rank, world_size, device, backend)


def watch_launcher(rank: int, interval_seconds: float = 1.0) -> None:
    """Under torchrun, end this rank within `interval_seconds` of the launcher's death.

    torchrun does not take its ranks down when it is killed (SIGKILL): they would go on
    training and writing into an output_dir that a restarted job also uses. The launcher is
    this process's parent; when it dies the process is re-parented, which we poll for
    (a launcher that died while this rank was still importing is caught when the parent is
    already init; one adopted by a subreaper in that window is not). A rank that is stopping
    on a preemption signal (finish_after_launcher_death) first finishes its checkpoint: the
    same signal may have ended a torchrun that does not handle it (SIGUSR1).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()  # 1: the launcher died before we got here (adopted by init)

    def watch() -> None:
        while os.getppid() == launcher and launcher != 1:
            time.sleep(interval_seconds)
        grace = _LAUNCHER_GRACE.remaining()
        if grace > 0:  # a scheduler's signal took the launcher down: let the save finish
            sys.stderr.write(
                f"vlpretrain rank {rank}: the torchrun launcher (pid {launcher}) died while "
                f"this rank is stopping; it saves its checkpoint first (at most {grace:.0f} s)\n"
            )
            sys.stderr.flush()
            time.sleep(grace)
        sys.stderr.write(
            f"vlpretrain rank {rank}: the torchrun launcher (pid {launcher}) died; stopping "
            "this rank now\n"
        )
        sys.stderr.flush()
        os._exit(LAUNCHER_DIED_EXIT)

    threading.Thread(target=watch, name="vlpretrain-launcher-watch", daemon=True).start()


class _Deadline:
    """A monotonic deadline that threads read (0: none)."""

    def __init__(self) -> None:
        self.until = 0.0

    def remaining(self) -> float:
        return max(0.0, self.until - time.monotonic())


_LAUNCHER_GRACE = _Deadline()


def finish_after_launcher_death(seconds: float) -> None:
    """Let this rank live up to `seconds` past its torchrun launcher's death (a clean stop)."""
    _LAUNCHER_GRACE.until = time.monotonic() + seconds


class _StallWatch:
    """One thread that ends the process when an armed wait outlasts its deadline.

    Waits that something else ends (a collective fails at the process group's timeout) only
    need a stack dump, which faulthandler writes. A wait that nothing would end, such as
    the data loader's read on a dead network mount, is ended here: stack dump, one line
    naming the wait, the error file torchrun reports as the root cause, exit STALL_EXIT.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._deadline: float | None = None
        self._seconds = 0.0
        self._waiting_for = ""
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, waiting_for: str) -> None:
        with self._condition:
            self._deadline = time.monotonic() + seconds
            self._seconds, self._waiting_for = seconds, waiting_for
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="vlpretrain-stall-watch", daemon=True
                )
                self._thread.start()
            self._condition.notify()

    def disarm(self) -> None:
        with self._condition:
            self._deadline = None
            self._condition.notify()

    def _watch(self) -> None:
        with self._condition:
            while True:
                if self._deadline is None:
                    self._condition.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._condition.wait(remaining)
                    continue
                end_stalled_process(self._seconds, self._waiting_for)


_STALL_WATCH = _StallWatch()


def _stderr() -> Any:
    """A stderr stream with a file descriptor (faulthandler writes to descriptors), or None."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.fileno()  # type: ignore[union-attr]  # None when detached
        except (AttributeError, OSError, ValueError):
            continue  # e.g. a capturing stand-in without a file descriptor
        return stream
    return None


def end_stalled_process(seconds: float, waiting_for: str) -> None:
    """Dump every thread's stack, name the stalled wait, leave torchrun's error file, exit."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    message = (
        f"vlpretrain rank {rank}: stalled: no progress for {seconds:g} s (the collective "
        f"timeout) {waiting_for}; every thread's stack follows; this rank exits with code "
        f"{STALL_EXIT}"
    )
    stream = _stderr()
    if stream is not None:
        stream.write(message + "\n")
        stream.flush()
        faulthandler.dump_traceback(file=stream, all_threads=True)
    write_torchrun_error_file(message)
    os._exit(STALL_EXIT)


def write_torchrun_error_file(message: str) -> None:
    """Under torchrun, the error file its root-cause report shows (message and the main
    thread's stack), in torchelastic's documented format; nothing otherwise."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
    # torchrun shows py_callstack; like a Python traceback, it ends with the error line
    record = {
        "message": {
            "message": message,
            "extraInfo": {"py_callstack": stack + message, "timestamp": str(int(time.time()))},
        }
    }
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps(record))


def arm_stack_dump(seconds: float, waiting_for: str = "") -> None:
    """Dump every thread's stack to stderr if not re-armed or disarmed within `seconds`.

    With `waiting_for` (what the process waits for, e.g. "waiting for the next micro-batch
    from the data loader"), the stall also ends the process (exit STALL_EXIT): use it for
    waits that no collective timeout would end.
    """
    if waiting_for:
        faulthandler.cancel_dump_traceback_later()
        _STALL_WATCH.arm(seconds, waiting_for)
        return
    _STALL_WATCH.disarm()
    stream = _stderr()
    if stream is not None:
        faulthandler.dump_traceback_later(seconds, exit=False, file=stream)


def disarm_stack_dump() -> None:
    faulthandler.cancel_dump_traceback_later()
    _STALL_WATCH.disarm()


def check_ranks_agree(facts: dict[str, Any]) -> None:
    """Raise one ValueError on every rank if any rank's `facts` differ from rank 0's.

    `facts` is a flat {name: JSON-like value} mapping (resolved config, world size, ...).
    One small all-gather of hashes; the full mappings only when they differ.
    """
    text = json.dumps(facts, sort_keys=True, default=str)
    digests = all_gather_objects(hashlib.sha256(text.encode()).hexdigest())
    if len(set(digests)) == 1:
        return
    everyone = all_gather_objects(json.loads(text))
    reference, lines = everyone[0], []
    for rank, theirs in enumerate(everyone[1:], start=1):
        for key in sorted(set(reference) | set(theirs)):
            if reference.get(key) != theirs.get(key):
                lines.append(
                    f"{key}: rank 0 has {reference.get(key)!r}, rank {rank} has {theirs.get(key)!r}"
                )
    raise ValueError(
        "the ranks of this job were started with different settings; every rank must run the "
        "same configuration:\n  - " + "\n  - ".join(lines)
    )


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_objects(value: object) -> list[Any]:
    """`value` of every rank, in rank order (JSON-like values; `[value]` with one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum across ranks (a no-op with one rank); returns the reduced tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_host_sum(value: torch.Tensor) -> float:
    """Sum of a CPU scalar across ranks, as a float. CPU tensors go over gloo (the CPU half of
    the process group), so no device is involved: reading the result stalls no GPU."""
    return float(all_reduce_sum(value))
