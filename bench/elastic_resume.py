"""Resume on another world size: DCP resharding checked exactly, and the cost of the data merge.

    python bench/elastic_resume.py [--records 10000000] [--ranks 512] [--workers 4] [--out DIR]

1. cli: the tiny stage-2 run of the test suite, `vlpretrain train` under torchrun: 2 ranks
   (FSDP2) for 2 steps; resumed on 3 ranks for 0 steps (its export must equal the 2-rank
   export bit for bit); on 3 ranks to step 4; then on 1 rank (DDP, 2 loader workers) to step
   40. At every checkpoint the records the batches were made of (records_seen, all ranks)
   must equal the records the data stream counts as read: none loaded twice, none skipped.
2. reshard: a tiny FSDP2 model + AdamW, three steps on 2 gloo ranks, saved by
   train.checkpoint.store.save_checkpoint; loaded by load_checkpoint on 3 ranks and on 1 rank
   (FSDP2 on 3, a plain module on 1, as the loop runs them). Every full model tensor and
   every AdamW moment must equal the saved ones bit for bit.
3. merge: the saved streams of a `--ranks` x `--workers` job half-way through an epoch of a
   `--records` dataset (each stream at a random position around the middle of its share, with
   a few open rows). Measures, in CPU seconds (median and range of 3), merging them
   (data.elastic) and building one new stream's share for a job with half the ranks, beside
   building a fresh epoch's share (today's cost of every epoch start); the peak traced memory
   of each; and the size of the consumed mask in a new stream's JSON state, as the bitmap
   written now (version 3) beside the [start, stop) ranges of version 2, with its encode and
   decode CPU time.

Prints one JSON summary (also OUT/summary.json). Not part of `make test` (the torchrun
start-ups take a few minutes of CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from train_fixtures import (  # noqa: E402
    build_train_assets,
    cli_env,
    read_metrics,
    records_read,
    records_seen,
    stage_raw,
    write_stage,
)

from vlpretrain.data import sharding  # noqa: E402
from vlpretrain.data.elastic import merge_stream_states  # noqa: E402
from vlpretrain.train.checkpoint.states import (  # noqa: E402
    LoaderState,
    ModelState,
    OptimizerState,
    RNGState,
    TrainState,
)
from vlpretrain.train.checkpoint.store import list_checkpoints, load_checkpoint, save_checkpoint  # noqa: E402


def _train(config: Path, num_ranks: int, *overrides: str) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_ranks),
        "--master_port", str(_free_port()), "-m", "vlpretrain", "train", str(config),
        *(part for item in overrides for part in ("--set", item)),
    ]  # fmt: skip
    done = subprocess.run(command, env=cli_env(deterministic=True), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-4000:]}")


def cli_check(out: Path) -> dict[str, Any]:
    assets = build_train_assets(out / "assets")
    run = out / "run"
    raw = stage_raw(
        assets, run, stage="stage2", max_steps=2, dist={"strategy": "fsdp"},
        optim={"learning_rate": 1e-3, "warmup_steps": 0, "lr_scheduler_type": "constant"},
    )  # fmt: skip
    config = write_stage(out / "run.toml", raw)
    allow = 'train.allow_changed_on_resume=["train.max_steps", "dist.strategy"]'
    _train(config, 2)
    exported = load_file(str(run / "model.safetensors"))
    # 0 steps: load on 3 ranks, export (a finished stage exports again only when its
    # checkpoint is named; train.resume = "auto" would leave it alone)
    _train(config, 3, f"train.resume={run / 'checkpoints' / 'step-00000002'}")
    reloaded = load_file(str(run / "model.safetensors"))
    _train(config, 3, "train.max_steps=4", allow)
    # The 3 ranks' open rows (about 20 rows each) come back first: 40 steps read new records.
    _train(config, 1, "train.max_steps=40", "dist.strategy=ddp", "stream.num_workers=2", allow)
    checkpoints = [path for _, path in list_checkpoints(run)]
    return {
        "2_to_3_ranks_export_bit_equal": all(
            torch.equal(exported[k], reloaded[k]) for k in exported
        )
        and exported.keys() == reloaded.keys(),
        "steps": [record["step"] for record in read_metrics(run)],
        "records_seen_equal_records_read": {
            path.name: [records_seen(path), records_read(path)] for path in checkpoints
        },
    }


class _NoLoader:
    """The loader part of the states mapping; this check is about the tensors."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def load_resharded_state_dict(self, saved: list[dict[str, Any]]) -> None:
        pass

    def __iter__(self) -> Any:
        return iter(())


class _NoSchedule:
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _model(world_size: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    if world_size > 1:
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _states(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": ModelState(model),
        "optimizer": OptimizerState(model, optimizer),
        "scheduler": _NoSchedule(),
        "train_state": TrainState(step=3),
        "loader": LoaderState(_NoLoader()),
        "rng": RNGState(),
    }


def _rank(rank: int, world_size: int, port: int, out: str, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(minutes=3)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    model, optimizer = _model(world_size)
    if mode == "save":
        for step in range(3):
            torch.manual_seed(step)
            model(torch.randn(4, 6)).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        save_checkpoint(out, _states(model, optimizer), step=3, config={}, keep=1)
    else:
        load_checkpoint(Path(out) / "checkpoints" / "step-00000003", _states(model, optimizer))
    # Full state dicts, gathered on rank 0 (the other ranks get empty ones).
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    moments = get_optimizer_state_dict(model, optimizer, options=options)
    if rank == 0:
        full = {"model": weights, "optimizer": moments["state"]}
        torch.save(full, Path(out) / f"{mode}-{world_size}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    model = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moments = all(
        torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"][name][key]))
        for name, per_param in a["optimizer"].items()
        for key, value in per_param.items()
    )
    return model and moments and a["model"].keys() == b["model"].keys()


def reshard_check(out: Path) -> dict[str, Any]:
    for mode, world_size in (("save", 2), ("load", 3), ("load", 1)):
        mp.spawn(_rank, args=(world_size, _free_port(), str(out), mode), nprocs=world_size)
    saved = torch.load(out / "save-2.pt", weights_only=True)
    result: dict[str, Any] = {"tensors": len(saved["model"])}
    for world_size in (3, 1):
        loaded = torch.load(out / f"load-{world_size}.pt", weights_only=True)
        result[f"2_to_{world_size}_ranks_bit_equal"] = _equal(saved, loaded)
    return result


def _saved_streams(
    num_records: int, num_ranks: int, num_workers: int, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """Stream states of a job half-way through epoch 0 (the fields data.elastic reads)."""
    num_streams = num_ranks * num_workers
    share = num_records // num_streams
    positions = rng.binomial(share, 0.5, size=num_streams)
    open_row = [[0, 1, 0, 0, 10, 0, 1]] * 8  # 8 pieces in one open row
    return [
        {
            "world_size": num_ranks,
            "num_workers": num_workers,
            "rank": s // num_workers,
            "worker": s % num_workers,
            "seed": 0,
            "num_loaded": 0,
            "skipped": [],
            "mixer": {
                "lengths": [num_records],
                "positions": [int(positions[s])],
                "epochs": [0],
                "passes": 0,
                "consumed": [],
            },
            "packer": {"rows": [open_row] * 4, "num_rows_emitted": 1, "num_tokens_emitted": 1},
            "ready_rows": [],
        }  # fmt: skip
        for s in range(num_streams)
    ]


def _measured(function: Any, repeats: int = 3) -> tuple[Any, list[float], int]:
    """Result, CPU seconds of each repeat (untraced), peak traced bytes of one more run."""
    seconds = []
    for _ in range(repeats):
        start = time.process_time()
        function()
        seconds.append(time.process_time() - start)
    tracemalloc.start()
    value = function()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return value, sorted(seconds), peak


def _median_range(seconds: list[float]) -> str:
    return f"{seconds[len(seconds) // 2]:.3f} ({seconds[0]:.3f}-{seconds[-1]:.3f})"


def merge_cost(num_records: int, num_ranks: int, num_workers: int) -> dict[str, Any]:
    streams = _saved_streams(num_records, num_ranks, num_workers, np.random.default_rng(0))
    progress, merge_seconds, merge_peak = _measured(
        lambda: merge_stream_states(streams, replacement=False)
    )
    mask = progress.consumed[(0, 0)]
    new_streams = (num_ranks // 2) * num_workers
    share, share_seconds, share_peak = _measured(
        lambda: sharding.stream_share(num_records, 0, 0, 0, 0, new_streams, mask)
    )
    _, fresh_seconds, fresh_peak = _measured(
        lambda: sharding.stream_share(num_records, 0, 0, 0, 0, new_streams)
    )
    ranges = sharding.to_ranges(mask)
    entry, encode_seconds, _ = _measured(lambda: sharding.encode_mask(mask))
    _, decode_seconds, _ = _measured(lambda: sharding.decode_mask(entry, num_records))
    return {
        "records": num_records,
        "saved_streams": len(streams),
        "new_streams": new_streams,
        "consumed": int(mask.sum()),
        "pieces_returned": len(progress.pieces),
        "merge_cpu_seconds_median_range": _median_range(merge_seconds),
        "merge_peak_mib": round(merge_peak / 2**20, 1),
        "new_share_records": len(share),
        "new_share_cpu_seconds_median_range": _median_range(share_seconds),
        "new_share_peak_mib": round(share_peak / 2**20, 1),
        "fresh_share_cpu_seconds_median_range": _median_range(fresh_seconds),
        "fresh_share_peak_mib": round(fresh_peak / 2**20, 1),
        "consumed_ranges": len(ranges),
        "consumed_json_kib_version_2_ranges": round(len(json.dumps(ranges)) / 1024, 1),
        "consumed_json_kib_version_3_bitmap": round(len(json.dumps(entry)) / 1024, 1),
        "bitmap_encode_cpu_seconds_median_range": _median_range(encode_seconds),
        "bitmap_decode_cpu_seconds_median_range": _median_range(decode_seconds),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--ranks", type=int, default=512)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="elastic_resume_"))
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "cli": cli_check(out),
        "reshard": reshard_check(out),
        "merge": merge_cost(args.records, args.ranks, args.workers),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    summary = main()
    read = summary["cli"]["records_seen_equal_records_read"].values()
    exact = [v for k, v in summary["reshard"].items() if k.endswith("equal")]
    exact += [summary["cli"]["2_to_3_ranks_export_bit_equal"], all(a == b for a, b in read)]
    sys.exit(0 if all(exact) else 1)
