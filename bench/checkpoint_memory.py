"""Benchmark: activation memory of one training step with and without activation checkpointing,
in stage 1 (only the projector trains: ViT and LLM frozen, in eval mode) and stage 2.

    random ViT 2 x 128 (112-px tiles, 16 tokens each) + Qwen2 6 x 256 (vocab 8k), fp32, CPU
      --prepare (freeze policy, checkpoint hooks, train mode)--> train_step on one packed row
        of 4096 tokens (<= 48 tiles), after one warm-up step

Activation memory = peak RSS during the measured step minus RSS just before it (weights,
gradients and optimizer state already allocated). Each variant runs in its own process.
Goal: stage 1 with checkpointing <= 1/3 of without at 4k tokens.
Run: `.venv/bin/python bench/checkpoint_memory.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from rss import reset_peak, rss_mib
from workload import ModelShape, packed_batch, prepare, random_vlm, run_config

from vlpretrain.distributed.env import DistEnv
from vlpretrain.model.vision import VisionConfig
from vlpretrain.train.loop import train_step
from vlpretrain.train.optim import build_optimizer

SHAPE = ModelShape(
    vision=VisionConfig(
        image_size=112, qkv_bias=True, hidden_size=128, num_attention_heads=4,
        intermediate_size=512, qk_normalization=False, num_hidden_layers=2,
        norm_type="layer_norm", initializer_factor=1.0,
    ),
    llm={
        "model_type": "qwen2", "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": False, "use_sliding_window": False,
    },
    tile=112,
)  # fmt: skip
SHAPE_NAME = "ViT 2x128 on 112-px tiles + Qwen2 6x256"


def run_variant(stage: str, checkpointing: bool, tokens: int) -> dict:
    env = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")
    model = random_vlm(SHAPE, "sdpa")
    prepare(model, stage, checkpointing, env.device)
    optimizer = build_optimizer(model, run_config("fp32").optim)
    config = run_config("fp32")
    batch = packed_batch(model, rows=1, row_tokens=tokens, row_tiles=48)
    train_step(model, optimizer, [batch], config, env)  # warm-up: optimizer state, allocator
    before = rss_mib()
    reset_peak()
    start = time.process_time()
    train_step(model, optimizer, [batch], config, env)
    return {
        "activation_mib": rss_mib("VmHWM") - before,
        "cpu_seconds": time.process_time() - start,
        "tokens": batch.stats.num_real_tokens,
        "tiles": batch.stats.num_tiles,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.variant:
        stage, checkpointing = args.variant.split(":")
        print(json.dumps(run_variant(stage, checkpointing == "on", args.tokens)))
        return
    results = {}
    for stage in ("stage1", "stage2"):
        for checkpointing in ("off", "on"):
            done = subprocess.run(
                [sys.executable, __file__, "--variant", f"{stage}:{checkpointing}",
                 "--tokens", str(args.tokens)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results[(stage, checkpointing)] = json.loads(done.stdout.strip().splitlines()[-1])
    first = results[("stage1", "off")]
    print(
        f"one packed row of {args.tokens} tokens ({first['tokens']} real, "
        f"{first['tiles']} tiles), {SHAPE_NAME}, fp32; activation memory of a step:"
    )
    for stage in ("stage1", "stage2"):
        off, on = results[(stage, "off")], results[(stage, "on")]
        ratio = on["activation_mib"] / off["activation_mib"]
        print(f"  {stage}: checkpointing off {off['activation_mib']:6.0f} MiB "
              f"({off['cpu_seconds']:.2f} s CPU), on {on['activation_mib']:6.0f} MiB "
              f"({on['cpu_seconds']:.2f} s CPU): on/off {ratio:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
