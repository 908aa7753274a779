"""Benchmark: host RAM per rank of a 2-rank FSDP2 (gloo, CPU) model build, meta init vs full.

    tiny-tokenizer Qwen2 (24 x 1024, ~0.6 GiB fp32) + small InternViT, saved as HF dirs
      --> 2 spawned ranks, each: RSS after imports --prepare_model (the loop's)--> RSS
          meta_init=True : rank 0 builds, the others get their shard (distributed/meta_init.py)
          meta_init=False: every rank builds the full model, then fully_shard keeps a shard

Figures per rank, as a fraction of the full fp32 model's bytes: `peak` = VmHWM minus the RSS
before the build (the high-water mark of the build), `held` = RSS after prepare_model minus
that baseline. Goal: <= 0.6 on every rank but the loading one.
Run: `.venv/bin/python bench/fsdp_memory.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rss import reset_peak, rss_mib

from vlpretrain.config import build_run_config
from vlpretrain.distributed.env import DistEnv
from vlpretrain.testing.components import TINY_VISION, build_tiny_components
from vlpretrain.train.loop import prepare_model

TILE = 56


def rank_worker(rank: int, port: int, raw: dict, meta_init: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(minutes=5))
    config = build_run_config(raw)
    config = replace(config, dist=replace(config.dist, meta_init=meta_init))
    env = DistEnv(rank, rank, 2, torch.device("cpu"), "gloo")
    dist.barrier()
    reset_peak()
    before = rss_mib("VmRSS")
    model, _, _, _ = prepare_model(config, env)
    dist.barrier()
    # numel of a sharded DTensor parameter is its global size.
    full = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    result = {"peak": rss_mib("VmHWM") - before, "held": rss_mib("VmRSS") - before, "full": full}
    Path(out, f"rank{rank}-{meta_init}.json").write_text(json.dumps(result))
    del model
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        components = build_tiny_components(
            root / "components",
            vision_config=replace(TINY_VISION, image_size=TILE),
            llm_hidden_size=args.hidden,
            llm_layers=args.layers,
        )
        raw = {
            "model": {"vision_path": str(components.vision_path),
                      "llm_path": str(components.llm_path), "force_image_size": TILE},
            "train": {"meta_path": "unused.json", "output_dir": str(root / "out")},
            "dist": {"strategy": "fsdp"},
        }  # fmt: skip
        for meta_init in (True, False):
            mp.start_processes(rank_worker, args=(free_port(), raw, meta_init, tmp), nprocs=2,
                               start_method="spawn")  # fmt: skip
        results = {(m, r): json.loads((root / f"rank{r}-{m}.json").read_text())
                   for m in (True, False) for r in (0, 1)}  # fmt: skip
        full = results[(True, 0)]["full"]
        print(f"2 ranks, FSDP2, fp32 Qwen2 {args.layers}x{args.hidden} (untied) + ViT 2x64: "
              f"full model {full:.0f} MiB; RSS growth over prepare_model, per rank:")  # fmt: skip
        for meta_init, rank in ((True, 0), (True, 1), (False, 0), (False, 1)):
            r = results[(meta_init, rank)]
            name = "meta init (rank 0 loads)" if meta_init else "full build on every rank"
            print(f"  {name:26s} rank {rank}: peak {r['peak']:6.0f} MiB "
                  f"({r['peak'] / full:4.2f}x the full model), after {r['held']:6.0f} MiB "
                  f"({r['held'] / full:4.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
