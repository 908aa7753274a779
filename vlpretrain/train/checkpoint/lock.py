"""One run per output_dir: a lock file naming its holder, taken over only from a dead holder.

    rank 0: create output_dir/run.lock exclusively {run_id, pid, host, started, process_start}
            (held by a live process -> RunLockError naming it; by a dead one -> taken over)
    every rank: learns the run_id; a watch thread exits the process as soon as run.lock no
            longer names this run (a new run took over), so it never writes after that
    rank 0's watch also refreshes the file's mtime: the heartbeat that tells another host
            whether the holder is still alive

A holder on this host is alive while its pid exists with the same process start time (pids
are reused). A holder on another host cannot be asked, so it counts as alive until its
heartbeat is older than FOREIGN_STALE_SECONDS; the refusal says when that is, and
`vlpretrain unlock OUTPUT_DIR` (break_lock) removes such a lock at once, deliberately, when
the operator knows that host is gone (a requeue after a node died).
"""

from __future__ import annotations

import calendar
import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from vlpretrain.distributed.env import DistEnv, all_gather_objects
from vlpretrain.errors import RefusedError

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 1.0
FOREIGN_STALE_SECONDS = 30 * 60.0
"""A holder on another host whose heartbeat is older than this is taken for dead."""
TORN_GRACE_SECONDS = 10.0
"""An unreadable lock file younger than this is being written; older, it is a crash's."""
LOCK_LOST_EXIT = 75


class RunLockError(RefusedError, RuntimeError):
    """output_dir is held by another live run (or the lock could not be taken)."""


@dataclass(frozen=True)
class LockHolder:
    run_id: str
    pid: int
    host: str
    started: str
    """UTC start time, ISO 8601."""
    process_start: int | None
    """The process's start time in clock ticks since boot (/proc), to tell pid reuse."""

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (started {self.started})"


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3... of /proc/PID/stat (state, ppid, ...), or None without /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None  # field 22, starttime


def this_process() -> LockHolder:
    return LockHolder(
        run_id=uuid.uuid4().hex,
        pid=os.getpid(),
        host=socket.gethostname(),
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        process_start=_process_start(os.getpid()),
    )


def read_holder(path: Path) -> LockHolder | None:
    """The holder named in `path`, or None if it is missing or unreadable."""
    try:
        return LockHolder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def holder_alive(holder: LockHolder, path: Path) -> bool:
    if holder.host != socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            return time.time() - path.stat().st_mtime < FOREIGN_STALE_SECONDS
        return False
    if holder.pid == os.getpid() and holder.process_start == _process_start(os.getpid()):
        return False  # this very process, left over from a stage that ended in an exception
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _proc_stat(holder.pid)
    if fields is not None and fields[0] == "Z":
        return False  # exited, not yet reaped by its parent
    return holder.process_start is None or _process_start(holder.pid) == holder.process_start


def acquire(output_dir: Path, me: LockHolder, attempts: int = 20) -> None:
    """Create output_dir/run.lock for `me`; raises RunLockError if a live run holds it."""
    path = output_dir / LOCK_FILE
    for _ in range(attempts):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            _clear_if_dead(path, me)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(asdict(me)))
            handle.flush()
            os.fsync(handle.fileno())
        return
    raise RunLockError(f"could not take {path} after {attempts} attempts (another run races)")


def _clear_if_dead(path: Path, me: LockHolder) -> None:
    holder = read_holder(path)
    if holder is None:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - path.stat().st_mtime < TORN_GRACE_SECONDS:
                time.sleep(0.2)  # being written by a starting run
                return
    elif holder_alive(holder, path):
        raise RunLockError(_in_use_message(path, holder))
    # Rename first: of two runs taking over at once, only one rename succeeds.
    aside = path.with_name(f"{LOCK_FILE}.stale-{me.run_id}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return
    aside.unlink()
    logger.warning(
        "took over %s from a run that is gone (%s)",
        path,
        holder.describe() if holder else "unreadable lock file",
    )


def _in_use_message(path: Path, holder: LockHolder) -> str:
    message = f"{path.parent} is in use by another run: {holder.describe()}, lock {path}. "
    if holder.host == socket.gethostname():
        return message + (
            "Wait for it to end or stop it, or use another train.output_dir. (The lock is "
            "taken over automatically once that process is gone.)"
        )
    with contextlib.suppress(FileNotFoundError):
        expires = path.stat().st_mtime + FOREIGN_STALE_SECONDS
        message += (
            f"A run on another host cannot be asked whether it is alive, so its lock blocks "
            f"until its heartbeat is {FOREIGN_STALE_SECONDS / 60:.0f} min old: at "
            f"{_utc(expires)} (in {_minutes(expires - time.time())}), if that run is gone. "
        )
    return message + (
        f"If you know it is gone (its node died), take the lock over now with "
        f"`vlpretrain unlock {path.parent}`, or use another train.output_dir."
    )


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _minutes(seconds: float) -> str:
    return f"{round(max(seconds, 0.0) / 60)} min"


def _started_seconds(holder: LockHolder) -> float | None:
    with contextlib.suppress(ValueError):
        return calendar.timegm(time.strptime(holder.started, "%Y-%m-%dT%H:%M:%SZ"))
    return None


def break_lock(output_dir: Path) -> str | None:
    """Remove output_dir's run lock on purpose (`vlpretrain unlock`); returns what was removed
    (host, pid, start, heartbeat age), or None if there was no lock.

    Raises RunLockError, leaving the lock, if its holder is a live process on this host: that
    one can be stopped instead. A holder on another host that is still alive notices the lock
    is gone within a heartbeat and stops without writing anything more (LockWatch).
    """
    path = output_dir / LOCK_FILE
    try:
        heartbeat_age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    holder = read_holder(path)
    local = holder is not None and holder.host == socket.gethostname()
    if holder is not None and local and holder_alive(holder, path):
        raise RunLockError(
            f"{path} is held by {holder.describe()}, a live process on this host; stop it "
            f"(kill {holder.pid}) instead, and its lock is released or taken over"
        )
    removed = holder.describe() if holder else "an unreadable lock file"
    if holder is not None and (started := _started_seconds(holder)) is not None:
        removed += f", {_minutes(time.time() - started)} ago"
    removed += f"; last heartbeat {_minutes(heartbeat_age)} ago"
    aside = path.with_name(f"{LOCK_FILE}.unlock-{uuid.uuid4().hex}")
    try:
        path.rename(aside)  # of two takeovers at once, only one rename succeeds
    except FileNotFoundError:
        return None
    aside.unlink()
    logger.warning("removed the run lock %s on request: %s", path, removed)
    return removed


def release(output_dir: Path, me: LockHolder) -> None:
    path = output_dir / LOCK_FILE
    holder = read_holder(path)
    if holder is not None and holder.run_id == me.run_id:
        path.unlink()


class LockWatch:
    """Thread: exit the process when run.lock stops naming `run_id`; rank 0 heartbeats."""

    def __init__(self, path: Path, run_id: str, heartbeat: bool) -> None:
        self.path, self.run_id, self.heartbeat = path, run_id, heartbeat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlpretrain-lock-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            holder = read_holder(self.path)
            if holder is None or holder.run_id != self.run_id:
                if self._stop.is_set():
                    return
                sys.stderr.write(
                    f"vlpretrain: {self.path} now names "
                    f"{holder.describe() if holder else 'no run'}, not this run; stopping "
                    "without writing anything more\n"
                )
                sys.stderr.flush()
                os._exit(LOCK_LOST_EXIT)
            if self.heartbeat:
                with contextlib.suppress(OSError):
                    os.utime(self.path)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def hold_run_lock(output_dir: str | Path, env: DistEnv) -> Iterator[LockHolder]:
    """Hold output_dir's run lock on all ranks for the block (a collective on entry)."""
    output_dir = Path(output_dir)
    me, problem = this_process(), None
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        try:
            acquire(output_dir, me)
        except (RunLockError, OSError) as error:
            problem = str(error)
    me_dict, problem = all_gather_objects((asdict(me), problem))[0]
    if problem:
        raise RunLockError(problem)
    holder = LockHolder(**me_dict)
    watch = LockWatch(output_dir / LOCK_FILE, holder.run_id, heartbeat=env.is_main)
    try:
        yield holder
    finally:
        watch.stop()
        if env.is_main:
            release(output_dir, holder)
