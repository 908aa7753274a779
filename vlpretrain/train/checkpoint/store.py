"""Resumable checkpoints: save and restore the run's stateful parts in one fixed order.

    output_dir/checkpoints/step-00000100/
        .metadata, __R_0.distcp      model + optimizer tensors (DCP, sharded per rank)
        shared.json                  rank 0: format version, world size, step, config, scheduler,
                                     the model's and optimizer's non-tensor values (structures)
        rank-00000.json ...          per rank: train state and data-loader state (JSON)
        rank-00000.rng.safetensors   per rank: torch RNG states
        manifest.json                written last: size and content hash of every other file

The contract: the caller hands one `states` mapping, name -> Stateful (`state_dict()` /
`load_state_dict()`), with exactly the names of STATE_LAYOUT. The checkpointer owns where each
part is stored and the order of restoring them (STATE_LAYOUT order): model and optimizer first
(one DCP read), then scheduler, train state, loader, and the RNG last, because restoring the
loader creates its iterator (LoaderState), which draws from the torch RNG.

Nothing in a checkpoint is a pickle that we run: JSON for plain state, safetensors for RNG
tensors, DCP files that hold tensors only (the optimizer's lr, betas, ... are JSON in
shared.json, see tensors.py; DCP reads tensors with torch.load(weights_only=True)),
and DCP's `.metadata` is read with an unpickler that only builds DCP's own metadata classes
and refuses entries that are not tensors. Every file gets the umask's permissions.

A checkpoint is written into `step-N.tmp`, hashed (manifest.py) and renamed once
every rank has finished, so a crash never leaves a half-written directory under a final name;
resume verifies the manifest (which may name only files inside the checkpoint) and falls back
to the newest intact checkpoint. What a checkpoint does not hold is the exported model: that
is written once at the end of a stage (formats/internvl.py save_internvl).

Resume on another world size: DCP reshards the model and optimizer tensors (FSDP2 or DDP);
each `rank` part is `Reshardable` (states.py) and is handed every saved rank's state (also
the loader on the same world size with another worker count); the RNG of a rank that did
not exist comes from saved rank `rank % saved world size`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from vlpretrain.distributed.env import all_gather_objects, barrier, rank_and_world
from vlpretrain.files import apply_umask
from vlpretrain.train.checkpoint.manifest import (
    MANIFEST,
    CheckpointError,
    MetadataSafeReader,
    hash_files,
    read_json_file,
    verify_checkpoint,
    write_json_file,
)
from vlpretrain.train.checkpoint.states import Reshardable, Stateful
from vlpretrain.train.checkpoint.tensors import TensorOnlyLoadPlanner, join_tensors, split_tensors

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
FORMAT_VERSION = 4
"""4: DCP files hold tensors only, their other values are JSON in shared.json (3 kept them as
pickles in DCP byte entries; 2 pickled rank-N.pt files)."""
PICKLED_FORMATS = {2: "the per-rank state", 3: "the optimizer's settings (lr, betas, ...)"}
"""Earlier format versions and what they stored as pickles: refused, never unpickled."""
SHARED_FILE = "shared.json"

Storage = Literal["sharded", "shared", "rank", "rank_tensors"]
STATE_LAYOUT: tuple[tuple[str, Storage], ...] = (
    ("model", "sharded"),
    ("optimizer", "sharded"),
    ("scheduler", "shared"),
    ("train_state", "rank"),
    ("loader", "rank"),
    ("rng", "rank_tensors"),
)
"""Every stateful part, in restore order, and where it is stored: `sharded` in DCP files,
`shared` in rank 0's shared.json (identical on every rank), `rank` in rank-N.json, and
`rank_tensors` in rank-N.rng.safetensors."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Checkpoints under their final names (complete or not, see verify_checkpoint), oldest
    first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _rank_file(directory: Path, rank: int, suffix: str) -> Path:
    return directory / f"rank-{rank:05d}{suffix}"


def _check_names(states: Mapping[str, Stateful]) -> None:
    expected = [name for name, _ in STATE_LAYOUT]
    if sorted(states) != sorted(expected):
        raise ValueError(f"checkpoint states are {sorted(states)}; the layout needs {expected}")


def _names(storage: Storage) -> list[str]:
    return [name for name, kind in STATE_LAYOUT if kind == storage]


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind `error`: itself, its cause chain, or a DCP per-rank failure."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        failures = getattr(current, "failures", None)  # dcp CheckpointException
        if isinstance(failures, dict):
            for failure in failures.values():
                if isinstance(failure, BaseException):
                    pending.append(failure)
                elif (
                    isinstance(failure, tuple) and failure and isinstance(failure[0], BaseException)
                ):
                    pending.append(failure[0])
    return None


def _describe_write_error(error: BaseException, directory: Path) -> str:
    os_error = _os_error_in(error)
    if os_error is None:
        return f"{type(error).__name__}: {error}"
    where = os_error.filename or directory
    return f"{where}: [Errno {os_error.errno}] {os_error.strerror or os_error}"


@contextlib.contextmanager
def _ranks_agree(directory: Path, action: str) -> Iterator[None]:
    """Run a block on every rank; if it fails on any, raise one CheckpointError on all."""
    problem: str | None = None
    try:
        yield
    except (Exception, CheckpointException) as error:  # re-raised below on every rank
        problem = _describe_write_error(error, directory)
    problems = [p for p in all_gather_objects(problem) if p]
    if problems:
        rank, _ = rank_and_world()
        raise CheckpointError(
            f"could not {action} {directory} (rank {rank} sees: "
            + "; ".join(sorted(set(problems)))
            + "). Earlier checkpoints are untouched; free space or fix the file system and "
            "rerun to resume from the newest intact one."
        )


@dataclass
class _StartedSave:
    """A checkpoint whose files are (being) written into `tmp`, not yet hashed or renamed."""

    tmp: Path
    final: Path
    step: int
    output_dir: Path
    keep: int
    tensors_written: Future[Any] | None = None
    """DCP's asynchronous save of the tensors; None when they were written synchronously."""


def _start_save(
    output_dir: str | Path,
    states: Mapping[str, Stateful],
    step: int,
    config: dict[str, Any],
    keep: int,
    asynchronous: bool = False,
    group: dist.ProcessGroup | None = None,
) -> _StartedSave:
    """Write every file of the checkpoint into `step-N.tmp`. `asynchronous`: the tensors are
    copied to host memory here and written by DCP in a background thread that talks over
    `group` only (None: a single process)."""
    _check_names(states)
    rank, world_size = rank_and_world()
    root = checkpoint_root(output_dir)
    started = _StartedSave(
        root / f"step-{step:08d}.tmp", root / f"step-{step:08d}", step, Path(output_dir), keep
    )
    tmp = started.tmp
    with _ranks_agree(tmp, "create the checkpoint directory"):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    with _ranks_agree(tmp, "write the checkpoint"):
        tensors, structures = split_tensors({n: states[n].state_dict() for n in _names("sharded")})
        if not asynchronous:
            dcp.save(tensors, checkpoint_id=str(tmp))
        else:
            started.tensors_written = cast(
                "Future[Any]",
                dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=group),
            )
        _write_small_files(tmp, states, step, config, structures)
    return started


def _write_small_files(
    tmp: Path,
    states: Mapping[str, Stateful],
    step: int,
    config: dict[str, Any],
    structures: dict[str, Any],
) -> None:
    """Each rank's JSON and RNG files, and rank 0's shared.json."""
    rank, world_size = rank_and_world()
    write_json_file(
        _rank_file(tmp, rank, ".json"),
        {
            "format_version": FORMAT_VERSION,
            "rank": rank,
            "states": {n: states[n].state_dict() for n in _names("rank")},
        },
    )
    rng_tensors = {
        f"{name}.{key}": value.contiguous()
        for name in _names("rank_tensors")
        for key, value in states[name].state_dict().items()
    }
    rng_file = _rank_file(tmp, rank, ".rng.safetensors")
    save_file(rng_tensors, str(rng_file))
    apply_umask(rng_file)  # safetensors creates files 0600
    if rank == 0:
        shared = {
            "format_version": FORMAT_VERSION,
            "world_size": world_size,
            "step": step,
            "config": config,
            "states": {n: states[n].state_dict() for n in _names("shared")},
            "structures": structures,
        }
        write_json_file(tmp / SHARED_FILE, shared)


def _finish_save(started: _StartedSave) -> Path:
    """Wait for the tensors, hash every file, write the manifest and rename the checkpoint
    into place (a collective: every rank calls it at the same point of the run)."""
    rank, world_size = rank_and_world()
    tmp, final = started.tmp, started.final
    with _ranks_agree(tmp, "write the checkpoint"):
        if started.tensors_written is not None:
            started.tensors_written.result()
    barrier()
    with _ranks_agree(tmp, "hash the checkpoint"):
        entries = hash_files(tmp, rank, world_size)
    gathered = all_gather_objects(entries)
    with _ranks_agree(tmp, "finish the checkpoint"):
        if rank == 0:
            files = {name: entry for part in gathered for name, entry in part.items()}
            write_json_file(
                tmp / MANIFEST,
                {
                    "format_version": FORMAT_VERSION,
                    "step": started.step,
                    "files": dict(sorted(files.items())),
                },
            )
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _prune(started.output_dir, started.keep)
    logger.info("saved checkpoint %s", final)
    return final


def save_checkpoint(
    output_dir: str | Path,
    states: Mapping[str, Stateful],
    *,
    step: int,
    config: dict[str, Any],
    keep: int,
) -> Path:
    """Write `states` for `step` on every rank (a collective); returns the final path.

    Raises CheckpointError on every rank when any rank fails to write (disk full, I/O error),
    naming the path and the OS error; the earlier checkpoints are not touched then.
    """
    return _finish_save(_start_save(output_dir, states, step, config, keep))


class Checkpointer:
    """Saves a run's checkpoints, synchronously or overlapped with training.

    Asynchronous: `save` copies the tensors to host memory and returns while DCP writes them
    in a background thread; that checkpoint is finished (hashed, manifest written, renamed
    into place) at the next `save` or at `finish`, which every rank reaches at the same
    step. Until then it is only `step-N.tmp`, which resume ignores, so a crash in between
    loses that checkpoint, never an earlier one. The background writes talk over a gloo
    group of their own, apart from the collectives of training.
    """

    def __init__(self, asynchronous: bool = False) -> None:
        self.asynchronous = asynchronous
        initialized = dist.is_available() and dist.is_initialized()
        self._group = dist.new_group(backend="gloo") if asynchronous and initialized else None
        self._pending: _StartedSave | None = None

    def save(
        self,
        output_dir: str | Path,
        states: Mapping[str, Stateful],
        *,
        step: int,
        config: dict[str, Any],
        keep: int,
    ) -> None:
        """Save `states` for `step` (a collective); asynchronously, finish the previous one."""
        self.finish()
        started = _start_save(
            output_dir, states, step, config, keep, self.asynchronous, self._group
        )
        if self.asynchronous:
            self._pending = started
        else:
            _finish_save(started)

    def finish(self) -> Path | None:
        """Finish the checkpoint still being written, if any; returns its path."""
        pending, self._pending = self._pending, None
        return _finish_save(pending) if pending is not None else None


def _prune(output_dir: str | Path, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def read_shared(path: str | Path) -> dict[str, Any]:
    """shared.json of a checkpoint (version checked): step, world size, config, ..."""
    path = Path(path)
    shared = read_json_file(path / SHARED_FILE)
    version = shared.get("format_version")
    if version in PICKLED_FORMATS:
        raise ValueError(
            f"{path} has checkpoint format version {version}, which stored "
            f"{PICKLED_FORMATS[version]} as pickles; loading them could run code planted in "
            f"the files, so this vlpretrain (version {FORMAT_VERSION}) does not resume it. Start "
            "the stage over with train.resume = 'never' (the checkpoints are moved aside), or "
            "finish it with the vlpretrain that wrote it if you trust every file in it."
        )
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {version!r}; this vlpretrain reads version "
            f"{FORMAT_VERSION}. Resume with the version that wrote it, or start a new stage "
            "from the exported weights (model.model_name_or_path)."
        )
    return shared


def _needs_all_ranks(part: Stateful, own: dict[str, Any]) -> bool:
    return hasattr(part, "needs_all_ranks") and bool(cast(Reshardable, part).needs_all_ranks(own))


def _read_rank_files(path: Path, saved_world: int) -> list[dict[str, Any]]:
    return [read_json_file(_rank_file(path, r, ".json")) for r in range(saved_world)]


def _load_resharded(part: Stateful, name: str, all_saved: list[dict[str, Any]]) -> None:
    """Restore a `rank` part from every saved rank's file (another job shape)."""
    if not hasattr(part, "load_resharded_state_dict"):
        raise CheckpointError(f"the {name!r} state cannot be resumed on another job shape")
    rank, world_size = rank_and_world()
    saved = [entry["states"][name] for entry in all_saved]
    cast(Reshardable, part).load_resharded_state_dict(saved, rank, world_size)


def load_checkpoint(path: str | Path, states: Mapping[str, Stateful]) -> dict[str, Any]:
    """Restore `states` in place, in STATE_LAYOUT order; returns the checkpoint's shared.json.

    The caller checks the checkpoint first (find_resume_checkpoint verifies its manifest).
    """
    _check_names(states)
    path = Path(path)
    rank, world_size = rank_and_world()
    shared = read_shared(path)
    saved_world = int(shared["world_size"])
    resized = saved_world != world_size
    if resized:
        logger.warning(
            "resuming %s, written by %d ranks, on %d ranks: the model and optimizer are "
            "resharded; the data stream continues each epoch without losing or repeating a "
            "record but in another order than an uninterrupted run, and the global batch is "
            "now %d/%d of the saved run's",
            path, saved_world, world_size, world_size, saved_world,
        )  # fmt: skip
    local = read_json_file(_rank_file(path, rank if rank < saved_world else 0, ".json"))
    tensors_file = _rank_file(path, rank % saved_world, ".rng.safetensors")
    rank_tensors = load_file(str(tensors_file))
    # DCP loads into the run's own tensors in place; the saved structure puts them together
    # with the saved non-tensor values.
    tensors, _ = split_tensors({n: states[n].state_dict() for n in _names("sharded")})
    reader = MetadataSafeReader(path)
    reader.read_metadata()  # refuses a tampered .metadata here, with our message
    # Model and optimizer come first in the layout, so one DCP read restores both in order.
    dcp.load(tensors, storage_reader=reader, planner=TensorOnlyLoadPlanner())
    sharded = join_tensors(shared.get("structures"), tensors)
    all_saved: list[dict[str, Any]] | None = None  # every saved rank's file, read if needed
    for name, storage in STATE_LAYOUT:
        if storage == "sharded":
            states[name].load_state_dict(sharded[name])
        elif storage == "shared":
            states[name].load_state_dict(shared["states"][name])
        elif storage == "rank":
            stateful, own = states[name], local["states"][name]
            if resized or _needs_all_ranks(stateful, own):
                all_saved = all_saved or _read_rank_files(path, saved_world)
                _load_resharded(stateful, name, all_saved)
            else:
                stateful.load_state_dict(own)
        else:
            prefix = f"{name}."
            part = {k[len(prefix) :]: v for k, v in rank_tensors.items() if k.startswith(prefix)}
            if not part:
                raise CheckpointError(f"{tensors_file} holds no {name!r} tensors")
            states[name].load_state_dict(part)
    logger.info("resumed from %s (step %d)", path, shared["step"])
    return shared


def find_resume_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest checkpoint in output_dir whose manifest verifies (a collective), or None if
    there is none at all.

    Each newer one that fails is reported with its path and reason; raises CheckpointError
    when checkpoints exist but none is intact.
    """
    problems: list[str] = []
    for _, path in reversed(list_checkpoints(output_dir)):
        reason = verify_checkpoint(path)
        if reason is None:
            for problem in problems:
                logger.warning("skipping checkpoint %s; resuming from %s instead", problem, path)
            return path
        problems.append(f"{path}: {reason}")
    if problems:
        raise CheckpointError(
            "no intact checkpoint to resume from:\n  - " + "\n  - ".join(problems) + "\nSet "
            "train.resume = 'never' to start over (the checkpoints are moved aside), or restore "
            "one of them."
        )
    return None


def check_resume_checkpoint(path: str | Path) -> Path:
    """An explicitly named checkpoint (train.resume = DIR): verified, no fallback."""
    reason = verify_checkpoint(Path(path))
    if reason is not None:
        raise CheckpointError(f"train.resume {path} cannot be used: {reason}")
    return Path(path)
