"""Fault harness: break the inputs and the run on purpose, watch what the real code does.

    python bench/faults.py                   # every fault class (about 75 s of CPU)
    python bench/faults.py --only signals    # one class; --verbose lists every case

Each case sets up one fault on tiny inputs (the tests' own fixtures and helpers, imported from
tests/), runs the code path a job would run, and files what it observed under one outcome:

    recovered      the run goes on with the right result: a counted skip naming file:line, a
                   damaged cache rebuilt, a fallback to the newest intact checkpoint, a
                   checkpoint and a resume equal to an uninterrupted run
    clean error    it stops with an error that names the file, key or holder to fix
    silent-wrong   it goes on with a wrong result (compared with a clean run or the truth)
    hang/blow-up   it runs past its time limit, or stops with an error that names nothing
                   (a traceback, a dead loader worker)

Every case says which outcome it expects; a case that lands elsewhere is listed under the
table. In-process cases run under a 60 s alarm, subprocesses under a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tests", REPO / "tests" / "unit", REPO / "tests" / "e2e"):
    sys.path.insert(0, str(folder))

RECOVERED, CLEAN, SILENT, HANG = "recovered", "clean error", "silent-wrong", "hang/blow-up"
OUTCOMES = (RECOVERED, CLEAN, SILENT, HANG)
CASE_SECONDS = 60
"""Alarm for one in-process case: beyond it the case is a hang."""
RUN_SECONDS = 120
"""Timeout of one training subprocess (a tiny run takes about 10 s)."""


class CaseTimedOut(Exception):
    """Raised by the alarm in a case that ran past CASE_SECONDS."""


@dataclass(frozen=True)
class Case:
    name: str
    expected: str
    run: Callable[[Path], tuple[str, str]]
    """Sets up the fault in a fresh folder; returns (outcome, what was observed)."""


def error_outcome(error: BaseException, *names: str) -> tuple[str, str]:
    """A clean error names every one of `names`; anything else is a blow-up."""
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return (CLEAN if all(name in str(error) for name in names) else HANG), text[:200]


def stderr_outcome(stderr: str, *names: str) -> tuple[str, str]:
    """A process that stopped on purpose: clean when its stderr names every one of `names`."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "(no stderr)"
    return (CLEAN if all(name in stderr for name in names) else HANG), last[:200]


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    def ring(signum: int, frame: Any) -> None:
        raise CaseTimedOut(f"no result within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- shared tiny inputs (built once, on first use) ------------------------------------------


class Inputs:
    """The tokenizer and the training assets the cases share, built on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tokenizer: Any = None
        self._assets: Any = None
        self._reference: dict[int, float] | None = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from vlpretrain.demo.tokenizer import train_tiny_tokenizer

            from vlpretrain.tokens import add_internvl_tokens

            self._tokenizer = train_tiny_tokenizer(self.root / "tokenizer")
            add_internvl_tokens(self._tokenizer)
        return self._tokenizer

    @property
    def assets(self) -> Any:
        if self._assets is None:
            from train_fixtures import build_train_assets

            self._assets = build_train_assets(self.root / "train_assets")
        return self._assets

    def stage(self, name: str, num_workers: int = 2, **train: Any) -> Path:
        """A 5-step stage-2 run, by default with two loader workers (signals reach them too)."""
        from train_fixtures import stage_raw, write_stage

        raw = stage_raw(self.assets, self.root / name, stage="stage2", max_steps=5)
        raw["stream"] = {"num_workers": num_workers}
        raw["train"].update(train)
        return write_stage(self.root / f"{name}.toml", raw)

    def reference_losses(self) -> dict[int, float]:
        """Losses of the uninterrupted run, which every signalled run must equal."""
        if self._reference is None:
            import test_train_preemption as preemption
            from train_fixtures import losses_by_step

            code, stderr = preemption.finish(preemption.start(self.stage("reference")))
            if code != 0:
                raise RuntimeError(f"the reference run failed ({code}): {stderr[-2000:]}")
            self._reference = losses_by_step(self.root / "reference")
        return self._reference


# -- hostile annotation records -------------------------------------------------------------


def skip_outcome(result: Any, annotation: Path, line: int, *names: str) -> tuple[str, str]:
    """A counted skip with its own reason, naming file:line (and `names`) is a recovery."""
    from vlpretrain.data.samples import SkippedSample

    if not isinstance(result, SkippedSample):
        return SILENT, f"became a sample: {result!r}"[:200]
    named = str(result).startswith(f"{annotation}:{line} ")
    named = named and all(name in result.detail for name in names)
    own_reason = result.reason != "unexpected_error"
    return (RECOVERED if named and own_reason else HANG), str(result)[:200]


def record_case(inputs: Inputs, line: str, **config: Any) -> Callable[[Path], tuple[str, str]]:
    """The hostile line between two good ones; the good ones must still build."""

    def run(folder: Path) -> tuple[str, str]:
        from test_data_hostile_records import conv, make_source, write_media

        from vlpretrain.data.samples import TokenizedSample

        write_media(folder)
        good = json.dumps({"conversations": conv()})
        source = make_source(folder, inputs.tokenizer, [good, line, good], **config)
        results = [source.load(i, 0, 0) for i in range(3)]
        if not all(isinstance(results[i], TokenizedSample) for i in (0, 2)):
            return SILENT, f"a good neighbour did not build: {results[0]!r} {results[2]!r}"
        return skip_outcome(results[1], folder / "ann.jsonl", 2)

    return run


def hostile_record_cases(inputs: Inputs) -> list[Case]:
    from test_data_hostile_records import HOSTILE, conv

    lines = dict(HOSTILE)
    lines.update({
        "nan_clip": '{"video": "clip.mp4", "clip": [NaN, 1], "conversations": '
                    + json.dumps(conv("<video>\nHi")) + "}",
        "infinite_clip": '{"video": "clip.mp4", "clip": [0, -Infinity], "conversations": '
                         + json.dumps(conv("<video>\nHi")) + "}",
        "image_is_a_number": json.dumps({"image": 5, "conversations": conv("<image>\nHi")}),
        "image_is_huge_int": '{"image": 1' + "0" * 400 + ', "conversations": '
                             + json.dumps(conv("<image>\nHi")) + "}",
        "conversations_is_text": json.dumps({"conversations": "Hi"}),
        "turn_role_is_a_list": json.dumps({"conversations": [{"from": [1], "value": "x"}]}),
        "turn_value_is_a_dict": json.dumps({"conversations": [{"from": "human", "value": {}}]}),
        "clip_is_text": json.dumps({"video": "clip.mp4", "clip": "0-1",
                                    "conversations": conv("<video>\nHi")}),
        "record_is_a_list": "[1, 2, 3]",
        "not_json": "{'single': 'quotes'}",
    })  # fmt: skip
    return [Case(name, RECOVERED, record_case(inputs, line)) for name, line in lines.items()]


# -- hostile media --------------------------------------------------------------------------


def media_case(
    inputs: Inputs, name: str, make: Callable[[Path], str], **config: Any
) -> Callable[[Path], tuple[str, str]]:
    """A record naming the media file `make` writes (it returns the record's tag)."""

    def run(folder: Path) -> tuple[str, str]:
        from test_data_hostile_records import conv, make_source

        key = make(folder)
        record = {key: name, "conversations": conv(f"<{key}>\nHi")}
        source = make_source(folder, inputs.tokenizer, [json.dumps(record)], **config)
        return skip_outcome(source.load(0, 0, 0), folder / "ann.jsonl", 1, name)

    return run


def hostile_media_cases(inputs: Inputs) -> list[Case]:
    from PIL import Image
    from test_data_guards import png_with_header_size

    def truncated_png(folder: Path) -> str:
        Image.effect_noise((64, 64), 50).convert("RGB").save(folder / "cut.png")
        data = (folder / "cut.png").read_bytes()
        (folder / "cut.png").write_bytes(data[: len(data) // 2])
        return "image"

    def garbage_png(folder: Path) -> str:
        (folder / "junk.png").write_bytes(os.urandom(4096))
        return "image"

    def header_bomb(folder: Path) -> str:
        png_with_header_size(folder / "bomb.png", 12000, 12000)  # 144 MP in a 100-byte file
        return "image"

    cases = [
        Case("truncated_png", RECOVERED, media_case(inputs, "cut.png", truncated_png)),
        Case("random_bytes_png", RECOVERED, media_case(inputs, "junk.png", garbage_png)),
        Case("pixel_bomb_in_header", RECOVERED, media_case(inputs, "bomb.png", header_bomb)),
        Case("missing_file", RECOVERED, media_case(inputs, "gone.png", lambda folder: "image")),
    ]
    try:
        from media_fixtures import write_growing_video, write_video
    except ImportError:  # no PyAV: the video cases are listed as not run
        return cases + [Case(n, "skipped", lambda folder: ("skipped", "PyAV is not installed"))
                        for n in ("truncated_video", "bomb_in_later_frames")]  # fmt: skip

    def truncated_video(folder: Path) -> str:
        write_video(folder / "cut.mp4", num_frames=8, size=32)
        data = (folder / "cut.mp4").read_bytes()
        (folder / "cut.mp4").write_bytes(data[: len(data) // 3])
        return "video"

    def later_frames_bomb(folder: Path) -> str:
        # the header says 64x48, frames 5-8 are 256x256: only a per-frame check sees them
        write_growing_video(folder / "grows.m4v", (64, 48), (256, 256))
        return "video"

    return cases + [
        Case("truncated_video", RECOVERED, media_case(inputs, "cut.mp4", truncated_video)),
        Case("bomb_in_later_frames", RECOVERED,
             media_case(inputs, "grows.m4v", later_frames_bomb, max_image_pixels=6144)),
    ]  # fmt: skip


# -- damaged index caches -------------------------------------------------------------------


def index_case(damage: Callable[[Path], None]) -> Callable[[Path], tuple[str, str]]:
    """Damage the cache of a 3-line file; the next index must read the true lines."""

    def run(folder: Path) -> tuple[str, str]:
        from test_data_meta_index import THREE, index_three

        from vlpretrain.data.index import AnnotationIndex

        path, target = index_three(folder)
        damage(target)
        try:
            index = AnnotationIndex(path, folder / "cache")
            lines = [index.read(i) for i in range(len(index))]
        except (OSError, ValueError) as error:
            return error_outcome(error, str(target))
        leftovers = [p.name for p in (folder / "cache").iterdir() if p.name.endswith(".tmp")]
        truth = [line.encode() for line in THREE.splitlines()]
        if lines != truth or leftovers:
            return SILENT, f"read {lines}, leftovers {leftovers}"
        return RECOVERED, "rebuilt: the 3 true lines"

    return run


def dead_builders_temp_file(target: Path) -> None:
    """What a build killed before its rename leaves: a full temp file of a dead process."""
    import subprocess

    from vlpretrain.data.index_cache import temp_name

    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (target.parent / temp_name(target, dead.pid)).write_bytes(target.read_bytes())
    target.unlink()  # the next index builds, and cleans up first


def index_cache_cases(inputs: Inputs) -> list[Case]:
    from test_data_meta_index import truncate_by_8, zero_offsets

    def garbage(target: Path) -> None:
        target.write_bytes(os.urandom(target.stat().st_size))

    return [
        Case("zeroed_offsets", RECOVERED, index_case(zero_offsets)),
        Case("zero_bytes", RECOVERED, index_case(lambda target: target.write_bytes(b""))),
        Case("truncated", RECOVERED, index_case(truncate_by_8)),
        Case("random_bytes", RECOVERED, index_case(garbage)),
        Case("dead_builders_temp_file", RECOVERED, index_case(dead_builders_temp_file)),
    ]


# -- damaged checkpoints --------------------------------------------------------------------


def payload_case(where: str) -> Callable[[Path], tuple[str, str]]:
    """A pickle that runs code, planted in DCP's .metadata or in a byte entry."""

    def run(folder: Path) -> tuple[str, str]:
        import pickle

        import test_checkpoint as checkpoints
        import torch

        from vlpretrain.train.checkpoint.manifest import MANIFEST, CheckpointError, hash_files
        from vlpretrain.train.checkpoint.store import load_checkpoint

        run = checkpoints.make_run(seed=0)
        checkpoints.step(run)
        path = checkpoints.save(run, folder / "run")
        marker = folder / "payload_ran"
        checkpoints.PLANTED_MARKER[:] = [str(marker)]
        if where == "metadata":
            (path / ".metadata").write_bytes(pickle.dumps(checkpoints.Payload()))
            manifest = json.loads((path / MANIFEST).read_text())
            manifest["files"].update(hash_files(path, 0, 1))
            (path / MANIFEST).write_text(json.dumps(manifest))
        else:
            buffer = io.BytesIO()
            torch.save(checkpoints.Payload(), buffer)
            checkpoints.plant_byte_entry(path, where, buffer.getvalue())
        try:
            load_checkpoint(path, checkpoints.make_run(seed=1)["states"])
        except CheckpointError as error:
            if marker.exists():
                return SILENT, "refused, but the payload ran"
            return error_outcome(error, "refusing")
        return SILENT, "loaded" + (" and the payload ran" if marker.exists() else "")

    return run


def outside_manifest(folder: Path) -> tuple[str, str]:
    import test_checkpoint as checkpoints

    from vlpretrain.train.checkpoint.manifest import CheckpointError
    from vlpretrain.train.checkpoint.store import check_resume_checkpoint

    path = checkpoints.save(checkpoints.make_run(seed=0), folder / "run")
    outside = folder / "secret.txt"
    outside.write_text("not part of any checkpoint\n")
    name = "../../../secret.txt"
    checkpoints.rewrite_manifest(path, name, outside)
    try:
        check_resume_checkpoint(path)
    except CheckpointError as error:
        return error_outcome(error, name, "outside the checkpoint")
    return SILENT, "accepted a manifest naming a file outside the checkpoint"


def damaged_latest(damage: Callable[[Path], None]) -> Callable[[Path], tuple[str, str]]:
    """Damage the newest of three checkpoints: resume must pick the second and restore it."""

    def run(folder: Path) -> tuple[str, str]:
        import test_checkpoint as checkpoints

        from vlpretrain.train.checkpoint.store import find_resume_checkpoint, load_checkpoint

        _, second, third = checkpoints.three_checkpoints(folder)
        damage(third / "__0_0.distcp")
        found = find_resume_checkpoint(folder)
        if found != second:
            return SILENT, f"resumed from {found}, not the intact {second}"
        resumed = checkpoints.make_run(seed=1)
        load_checkpoint(second, resumed["states"])
        if resumed["state"].step != 2:
            return SILENT, f"restored step {resumed['state'].step}, saved 2"
        return RECOVERED, "fell back to step 2 and restored it"

    return run


def flip_bytes(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[100:108] = b"\xff" * 8  # same size: only the hash tells
    shard.write_bytes(bytes(data))


def checkpoint_cases(inputs: Inputs) -> list[Case]:
    return [
        Case("pickle_in_metadata", CLEAN, payload_case("metadata")),
        Case("pickle_in_optimizer_setting", CLEAN, payload_case("optimizer.param_groups.0.lr")),
        Case("pickle_as_tensor_entry", CLEAN, payload_case("optimizer.state.weight.exp_avg")),
        Case("manifest_names_outside_file", CLEAN, outside_manifest),
        Case("truncated_shard", RECOVERED,
             damaged_latest(lambda shard: shard.write_bytes(shard.read_bytes()[:-64]))),
        Case("bad_hash_same_size", RECOVERED, damaged_latest(flip_bytes)),
    ]  # fmt: skip


# -- signals --------------------------------------------------------------------------------


def signalled_run(inputs: Inputs, signum: int) -> Callable[[Path], tuple[str, str]]:
    """Signal a 5-step run after step 2 (the way a scheduler does); it must save and exit
    PREEMPTED_EXIT, and the rerun must equal the uninterrupted run loss for loss."""

    def run(folder: Path) -> tuple[str, str]:
        import pytest
        import test_train_preemption as preemption
        from train_fixtures import last_logged_step, losses_by_step

        from vlpretrain.train.checkpoint.store import list_checkpoints
        from vlpretrain.train.preemption import PREEMPTED_EXIT

        reference = inputs.reference_losses()
        name = f"victim_{signal.Signals(signum).name}"
        config, output_dir = inputs.stage(name), inputs.root / name
        try:
            code, stderr = preemption.signal_after_step(config, output_dir, 2, signum)
            if code != PREEMPTED_EXIT:
                return HANG, f"exit {code}: {stderr.strip().splitlines()[-1][:160]}"
            saved = list_checkpoints(output_dir)[-1][0]
            if saved != last_logged_step(output_dir):
                return SILENT, f"saved step {saved}, trained {last_logged_step(output_dir)}"
            code, stderr = preemption.finish(preemption.start(config))
        except pytest.fail.Exception as failure:  # finish_process: past its timeout
            return HANG, str(failure)[:200]
        if code != 0:
            return HANG, f"rerun exit {code}: {stderr[-300:]}"
        losses = losses_by_step(output_dir)
        if {s: repr(v) for s, v in losses.items()} != {s: repr(v) for s, v in reference.items()}:
            return SILENT, f"losses {losses} differ from the uninterrupted {reference}"
        return RECOVERED, f"saved step {saved}, rerun equals the uninterrupted run"

    return run


def second_signal(folder: Path) -> tuple[str, str]:
    import subprocess

    from test_stop_signals import SECOND_SIGNAL, run_script

    try:
        code, stderr = run_script(SECOND_SIGNAL, timeout=CASE_SECONDS)
    except subprocess.TimeoutExpired:
        return HANG, f"still running after {CASE_SECONDS} s"
    if code != 128 + signal.SIGTERM:
        return HANG, f"exit {code}: {stderr[-300:]}"
    return stderr_outcome(stderr, "received SIGTERM again while stopping")


def signal_cases(inputs: Inputs) -> list[Case]:
    return [
        Case("sigterm_to_process_group", RECOVERED, signalled_run(inputs, signal.SIGTERM)),
        Case("sigusr1_to_every_process", RECOVERED, signalled_run(inputs, signal.SIGUSR1)),
        Case("second_signal_exits_at_once", CLEAN, second_signal),
    ]


# -- stuck loader ---------------------------------------------------------------------------


def stalled_training(inputs: Inputs, num_workers: int) -> Callable[[Path], tuple[str, str]]:
    """A run whose second fetch of micro-batches never returns (a read on a dead mount)."""

    def run(folder: Path) -> tuple[str, str]:
        import subprocess
        import textwrap

        from test_train_preemption import STALLING_RUN
        from train_fixtures import cli_env

        from vlpretrain.distributed.env import STALL_EXIT

        name = f"stalled_{num_workers}"
        config = inputs.stage(name, num_workers, collective_timeout_minutes=0.05)  # 3 s
        command = [sys.executable, "-c", textwrap.dedent(STALLING_RUN), str(config)]
        try:
            done = subprocess.run(command, env=cli_env(), capture_output=True, text=True,
                                  timeout=RUN_SECONDS)  # fmt: skip
        except subprocess.TimeoutExpired:
            return HANG, f"still running after {RUN_SECONDS} s"
        if done.returncode != STALL_EXIT:
            return HANG, f"exit {done.returncode}: {done.stderr[-300:]}"
        return stderr_outcome(done.stderr, "next micro-batch from the data loader")

    return run


def stuck_loader_cases(inputs: Inputs) -> list[Case]:
    return [
        Case("blocked_read_no_workers", CLEAN, stalled_training(inputs, 0)),
        Case("blocked_read_two_workers", CLEAN, stalled_training(inputs, 2)),
    ]


# -- bad configs ----------------------------------------------------------------------------


def config_case(
    write: Callable[[Path], Path], load: Callable[[Path], Any], *names: str, in_file: bool = True
) -> Callable[[Path], tuple[str, str]]:
    """A clean error names `names`, and the file unless the key alone says where."""

    def run(folder: Path) -> tuple[str, str]:
        path = write(folder)
        try:
            load(path)
        except ValueError as error:  # ConfigError is a ValueError
            return error_outcome(error, *([str(path)] if in_file else []), *names)
        return SILENT, "accepted"

    return run


def write_file(name: str, data: bytes) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return write


def huge_repeat_time(inputs: Inputs) -> Callable[[Path], tuple[str, str]]:
    def write(folder: Path) -> Path:
        from test_data_guards import conv

        (folder / "ten.jsonl").write_text(
            "".join(json.dumps({"conversations": conv(f"q{i}")}) + "\n" for i in range(10))
        )
        entry = {"root": str(folder), "annotation": "ten.jsonl", "repeat_time": 1e18,
                 "data_augment": False}  # fmt: skip
        (folder / "meta.json").write_text(json.dumps({"huge": entry}))
        return folder / "meta.json"

    def load(meta: Path) -> Any:
        from test_data_guards import SMALL, facts_of

        from vlpretrain.data.build import SampleConfig, build_sources

        config = SampleConfig(**SMALL, cache_dir=str(meta.parent / "cache"))
        return build_sources(meta, config, facts_of(inputs.tokenizer), inputs.tokenizer)

    return config_case(write, load, "'repeat_time' 1e+18", "above the limit")


def config_cases(inputs: Inputs) -> list[Case]:
    from test_flags import resolve

    from vlpretrain.config import load_toml

    def deepspeed(path: Path) -> Any:
        return resolve(["--vision_path", "v", "--llm_path", "l", "--deepspeed", str(path)])

    deep = b"[train]\nmax_steps = " + b"[" * 5000 + b"]" * 5000 + b"\n"
    return [
        Case("toml_not_utf8", CLEAN, config_case(
            write_file("latin1.toml", "[train]\noutput_dir = 'caf\u00e9'\n".encode("latin-1")),
            load_toml, "not UTF-8")),
        Case("toml_nested_5000_deep", CLEAN,
             config_case(write_file("deep.toml", deep), load_toml, "too deeply")),
        Case("toml_is_a_directory", CLEAN, config_case(lambda f: f, load_toml, "directory")),
        Case("toml_unknown_key", CLEAN, config_case(
            write_file("typo.toml", b"[train]\nmax_stepz = 3\n"),
            load_run_config, "unknown key train.max_stepz", "max_steps", in_file=False)),
        Case("deepspeed_json_invalid", CLEAN,
             config_case(write_file("ds.json", b"{not json"), deepspeed, "not valid JSON")),
        Case("deepspeed_json_not_utf8", CLEAN,
             config_case(write_file("ds.json", b'{"a": "\xff"}'), deepspeed, "not UTF-8")),
        Case("repeat_time_1e18", CLEAN, huge_repeat_time(inputs)),
    ]  # fmt: skip


def load_run_config(path: Path) -> Any:
    from vlpretrain.config import load_run_config as load

    return load(path)


# -- locks ----------------------------------------------------------------------------------


def foreign_lock(folder: Path) -> tuple[str, str]:
    from test_run_lock import plant

    from vlpretrain.train.checkpoint.lock import RunLockError, acquire, this_process

    plant(folder, replace(this_process(), host="dead-node", pid=4242), age_seconds=600)
    try:
        acquire(folder, this_process())
    except RunLockError as error:
        return error_outcome(error, "pid 4242 on dead-node", f"vlpretrain unlock {folder}")
    return SILENT, "a second run took a lock a live run on another node may hold"


def unlocked_foreign_lock(folder: Path) -> tuple[str, str]:
    from test_run_lock import plant

    from vlpretrain.cli import main
    from vlpretrain.train.checkpoint.lock import LOCK_FILE, acquire, read_holder, this_process

    plant(folder, replace(this_process(), host="dead-node", pid=4242), age_seconds=600)
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["unlock", str(folder)])
    me = this_process()
    acquire(folder, me)
    if code != 0 or read_holder(folder / LOCK_FILE) != me:
        return SILENT, f"unlock exit {code}"
    return RECOVERED, "unlocked, the next run took the lock"


def lock_left_by(alive: bool, torn: bool = False) -> Callable[[Path], tuple[str, str]]:
    def run(folder: Path) -> tuple[str, str]:
        from test_run_lock import other_process, plant

        from vlpretrain.train.checkpoint.lock import (
            LOCK_FILE,
            RunLockError,
            acquire,
            read_holder,
            this_process,
        )

        holder, process = other_process(alive=alive)
        try:
            plant(folder, holder, age_seconds=60)
            if torn:
                (folder / LOCK_FILE).write_text('{"run_id": "ab')
                os.utime(folder / LOCK_FILE, (time.time() - 60,) * 2)
            me = this_process()
            try:
                acquire(folder, me)
            except RunLockError as error:
                return error_outcome(error, f"pid {process.pid}")
            if alive:
                return SILENT, "took the lock of a live run"
            return (RECOVERED if read_holder(folder / LOCK_FILE) == me else SILENT), "taken over"
        finally:
            process.kill()
            process.wait()

    return run


def lock_cases(inputs: Inputs) -> list[Case]:
    return [
        Case("foreign_lock", CLEAN, foreign_lock),
        Case("unlock_foreign_lock", RECOVERED, unlocked_foreign_lock),
        Case("live_holder_this_host", CLEAN, lock_left_by(alive=True)),
        Case("dead_holder", RECOVERED, lock_left_by(alive=False)),
        Case("torn_lock_file", RECOVERED, lock_left_by(alive=False, torn=True)),
    ]


CLASSES: dict[str, tuple[str, Callable[[Inputs], list[Case]]]] = {
    "records": ("hostile annotation records", hostile_record_cases),
    "media": ("hostile media", hostile_media_cases),
    "index": ("damaged index caches", index_cache_cases),
    "checkpoints": ("damaged checkpoints", checkpoint_cases),
    "signals": ("signals during training", signal_cases),
    "loader": ("stuck loader", stuck_loader_cases),
    "configs": ("bad configs", config_cases),
    "locks": ("run locks", lock_cases),
}


# -- running and reporting ------------------------------------------------------------------


def run_case(case: Case, folder: Path) -> tuple[str, str]:
    folder.mkdir(parents=True)
    try:
        with alarm(CASE_SECONDS):
            return case.run(folder)
    except CaseTimedOut as error:
        return HANG, str(error)
    except Exception as error:  # the harness files what escaped; it never stops on it
        return HANG, f"{type(error).__name__}: {error}".replace("\n", " ")[:200]


def table(rows: list[tuple[str, dict[str, int]]]) -> str:
    lines = ["| fault class | cases tried | " + " | ".join(OUTCOMES) + " |",
             "|---|---:|" + "---:|" * len(OUTCOMES)]  # fmt: skip
    for title, counts in rows:
        tried = sum(counts[o] for o in OUTCOMES)
        lines.append(
            f"| {title} | {tried} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |"
        )
    return "\n".join(lines)


def cpu_seconds() -> float:
    """CPU time of this process and of the subprocesses it waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(CLASSES), action="append",
                        help="run this fault class only (repeatable)")  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="print every case's outcome")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.disable(logging.CRITICAL)  # the cases' own warnings are expected, and observed
    warnings.simplefilter("ignore")  # e.g. DCP's "no process group: saving in one process"
    import torch

    torch.set_num_threads(1)
    rows, surprises, not_run = [], [], []
    started = cpu_seconds(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vlpretrain-faults-") as root:
        inputs = Inputs(Path(root))
        for key in args.only or list(CLASSES):
            title, make_cases = CLASSES[key]
            counts = dict.fromkeys(OUTCOMES, 0)
            for case in make_cases(inputs):
                outcome, detail = run_case(case, Path(root) / key / case.name)
                if outcome == "skipped":
                    not_run.append(f"{key}/{case.name}: {detail}")
                    continue
                counts[outcome] += 1
                if args.verbose:
                    print(f"{key}/{case.name}: {outcome}: {detail}")
                if outcome != case.expected:
                    surprises.append(f"{key}/{case.name}: {outcome} (expected "
                                     f"{case.expected}): {detail}")  # fmt: skip
            rows.append((title, counts))
    print(table(rows))
    cpu, wall = cpu_seconds() - started[0], time.monotonic() - started[1]
    print(f"\n{wall:.0f} s wall, {cpu:.0f} s CPU (this process and its subprocesses)")
    for line in not_run:
        print(f"not run: {line}")
    for line in surprises:
        print(f"unexpected: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
