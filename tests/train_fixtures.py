"""Shared helpers for the training tests (config, flags, optim, flops, e2e, dist tiers).

Imported by the test modules as `from train_fixtures import ...` (tests/ is on sys.path via
conftest.py). Everything is built in-process from seeds: a tiny ViT on 28-px tiles (4 patches
-> 1 LLM token per tile), a 2-layer 64-wide Qwen2 with a BPE tokenizer trained on the shapes
captions, and a small synthetic shapes dataset (4 deliberately corrupt lines per file).

    build_train_assets(dir) --> TrainAssets(components, data, cache_dir)
    stage_raw(assets, out, ...) --> nested dict --write_stage--> stage TOML for `vlpretrain train`
    read_metrics(out) <-- metrics.jsonl written by the run
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from vlpretrain.data.elastic import merge_stream_states
from vlpretrain.data.loader import stream_states
from vlpretrain.testing.components import TINY_VISION, TinyComponents, build_tiny_components
from vlpretrain.testing.shapes import caption_corpus
from vlpretrain.testing.synthetic import ShapesDataset, make_shapes_dataset

REPO = Path(__file__).resolve().parents[1]
TILE = 28
"""Tile side of the tiny ViT: (28 / 14)^2 = 4 patches -> 4 * 0.5^2 = 1 LLM token per tile."""
NUM_CAPTIONS = 60
"""Valid caption records. With the 4 corrupt lines per file, 6% (captions) to 14% (the QA +
half-captions mixture) of the records are skipped: data.max_skip_fraction is 0.2."""

DETERMINISTIC_ENV = {
    # One thread and one code path: the golden loss file must not depend on the core count
    # or on which SIMD kernels (AVX2 / AVX512) the CI machine picks.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
}


@dataclass(frozen=True)
class TrainAssets:
    components: TinyComponents
    data: ShapesDataset
    cache_dir: Path
    """Annotation index cache (kept out of ~/.cache)."""


def build_train_assets(root: str | Path) -> TrainAssets:
    """Tiny components + shapes dataset under `root`; a pure function of the fixed seeds."""
    root = Path(root)
    components = build_tiny_components(
        root / "components",
        seed=0,
        corpus=caption_corpus(0),
        vision_config=replace(TINY_VISION, image_size=TILE),
    )
    data = make_shapes_dataset(
        root / "data",
        seed=0,
        num_caption=NUM_CAPTIONS,
        num_qa=24,
        num_eval=0,
        image_size=TILE,
        held_out_fraction=0.0,  # no split: the golden loss file's data, drawn as it always was
    )
    return TrainAssets(components, data, root / "index_cache")


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory: pytest.TempPathFactory) -> TrainAssets:
    """Session-wide tiny components and dataset (about 0.5 s to build)."""
    return build_train_assets(tmp_path_factory.mktemp("train_assets"))


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the block with `num_threads` intra-op threads, then restore the previous count.

    The tiny model gains nothing from a second thread, and on a shared 2-core box a spinning
    OpenMP thread makes in-process runs several times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def stage_raw(
    assets: TrainAssets,
    output_dir: str | Path,
    *,
    stage: str = "stage1",
    max_steps: int = 5,
    save_steps: int = 100,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A complete stage config as a nested dict; `sections` entries update single sections.

    stage1: separate ViT + LLM (Path B), only the projector trains, captions.
    stage2: everything trains on the QA + captions mixture (set model.model_name_or_path or
    keep the Path B components).
    """
    raw: dict[str, Any] = {
        "model": {
            "vision_path": str(assets.components.vision_path),
            "llm_path": str(assets.components.llm_path),
            "force_image_size": TILE,
        },
        "freeze": {"freeze_backbone": True, "freeze_llm": True},
        "data": {
            "max_seq_length": 512,
            "max_dynamic_patch": 6,
            "max_skip_fraction": 0.2,
            "cache_dir": str(assets.cache_dir),
        },
        "packing": {
            "max_packed_tokens": 512,
            "num_images_expected": 16,
            "loss_reduction": "square",
        },
        "optim": {"learning_rate": 2e-3, "warmup_steps": 2},
        "train": {
            "meta_path": str(assets.data.meta_pretrain_path),
            "output_dir": str(output_dir),
            "max_steps": max_steps,
            "save_steps": save_steps,
            "report_to": "none",
            "progress_bar": False,
            "grad_checkpoint": False,
            "seed": 0,
        },
    }
    if stage == "stage2":
        raw["freeze"] = {}
        raw["train"]["meta_path"] = str(assets.data.meta_finetune_path)
        raw["optim"] = {"learning_rate": 1e-3, "warmup_steps": 1}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(raw: dict[str, dict[str, Any]]) -> str:
    """Tables of scalars (and lists of scalars) as TOML text."""
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def write_stage(path: str | Path, raw: dict[str, Any]) -> Path:
    path = Path(path)
    path.write_text(to_toml(raw))
    return path


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of output_dir/metrics.jsonl in file order (a resumed run appends)."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(output_dir: str | Path) -> dict[int, float]:
    """Loss of each step; with duplicates (a killed run's steps redone), the last one wins."""
    return {record["step"]: record["loss"] for record in read_metrics(output_dir)}


def cli_env(deterministic: bool = False) -> dict[str, str]:
    """Environment for a `vlpretrain` subprocess: repo importable, no stray dist variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    if deterministic:
        env.update(DETERMINISTIC_ENV)
    return env


def cli_command(*args: str) -> list[str]:
    """`python -m vlpretrain ...` with the interpreter running the tests."""
    return [sys.executable, "-m", "vlpretrain", *args]


def run_cli(*args: str, deterministic: bool = False, timeout: float = 300) -> None:
    """Run `vlpretrain ...` in a subprocess; fail the test with its output on error."""
    done = subprocess.run(
        cli_command(*args),
        env=cli_env(deterministic),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        pytest.fail(f"vlpretrain {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")


def free_port() -> int:
    """A TCP port nobody listens on now (for a torchrun rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> None:
    """`torchrun --nproc_per_node nproc -m vlpretrain ...` on CPU/gloo; fail with its stderr."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(free_port()), "-m", "vlpretrain", *args,
    ]  # fmt: skip
    env = cli_env(deterministic=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(
            f"torchrun vlpretrain {' '.join(args)} exited {done.returncode}:\n{done.stderr[-6000:]}"
        )


def _rank_states(checkpoint: Path) -> list[dict[str, Any]]:
    return [json.loads(f.read_text())["states"] for f in sorted(checkpoint.glob("rank-*.json"))]


def records_seen(checkpoint: str | Path) -> int:
    """Records (samples and skips) of every batch trained up to a checkpoint, over all ranks."""
    return sum(int(s["train_state"]["records_seen"]) for s in _rank_states(Path(checkpoint)))


def records_read(checkpoint: str | Path, replacement: bool = False) -> int:
    """Records the checkpoint's data stream counts as read (data.elastic); equal to
    `records_seen` when every record was loaded exactly once."""
    states = _rank_states(Path(checkpoint))
    streams = [s for state in states for s in stream_states(state["loader"])]
    return merge_stream_states(streams, replacement).num_read()


class Interrupted(RuntimeError):
    """Raised by the patched train_step to end a run abruptly."""


def train_until_crash(stage_toml: Path, crash_step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """`vlpretrain train stage_toml` in this process, ended by an exception in step
    `crash_step` (the steps before it, and their checkpoints, complete)."""
    import vlpretrain.train.loop as loop
    from vlpretrain.cli import main

    real_step, calls = loop.train_step, []

    def step_then_crash(*args: Any, **kwargs: Any) -> Any:
        if len(calls) == crash_step - 1:
            raise Interrupted(f"crash in step {crash_step}")
        calls.append(1)
        return real_step(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "train_step", step_then_crash)
        with pytest.raises(Interrupted):
            main(["train", str(stage_toml)])


def finish_process(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Exit code and stderr of a started run; stderr closes when every process that inherited
    it (torchrun's ranks too) is gone. A run that outlives `timeout` fails the test."""
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{' '.join(process.args)} did not end within {timeout} s")
    return process.returncode, stderr


def last_logged_step(output_dir: Path) -> int:
    """The newest step in metrics.jsonl (0 before the first)."""
    metrics = output_dir / "metrics.jsonl"
    if not metrics.is_file() or not metrics.stat().st_size:
        return 0
    return int(read_metrics(output_dir)[-1]["step"])
