"""Benchmark: CPU time of one AdamW step under FSDP2 for each implementation, side by side.

    random ViT 2 x 64 (28-px tiles) + Qwen2 24 x 64 (vocab 512), fp32, CPU, one gloo rank
      --parallelize (FSDP2: ViT one unit, each LLM block one unit, root)--> DTensor parameters
      --one forward + backward on a packed row--> gradients
      --build_optimizer's groups--> AdamW for-loop (foreach=False, the old setting) |
                                        foreach=True (build_optimizer's pick off CUDA) |
                                        fused=True (torch's CPU fused kernel, if present)

The model is deliberately narrow and deep: a few hundred small parameter tensors, so the step
is dominated by per-tensor dispatch (the DTensor wrapper and one kernel launch per tensor and
operation), which is what the foreach and fused kernels remove. Per repetition each variant
runs STEPS timed steps (after one untimed step that creates its state), in a rotating order;
figures are CPU milliseconds per step (time.process_time, one thread), median [min, max]
over the repetitions, and the for-loop's median over each variant's median.
Run: `.venv/bin/python bench/optimizer_step.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from workload import ModelShape, packed_batch, prepare, random_vlm

from vlpretrain.distributed.env import DistEnv
from vlpretrain.distributed.parallel import DistConfig, parallelize
from vlpretrain.model.vision import VisionConfig
from vlpretrain.train.optim import OptimConfig, build_optimizer

SHAPE = ModelShape(
    vision=VisionConfig(
        image_size=28, qkv_bias=True, hidden_size=64, num_attention_heads=4,
        intermediate_size=128, qk_normalization=False, num_hidden_layers=2,
        norm_type="layer_norm", initializer_factor=1.0,
    ),
    llm={
        "model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 24, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": False, "use_sliding_window": False,
    },
    tile=28,
)  # fmt: skip
SHAPE_NAME = "ViT 2x64 + Qwen2 24x64"
VARIANTS = {
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
"""AdamW keyword arguments of each implementation."""


def sharded_model_with_gradients() -> nn.Module:
    """The FSDP2-sharded model (every parameter a DTensor) after one backward."""
    env = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")
    model = random_vlm(SHAPE, "sdpa")
    prepare(model, "stage2", checkpointing=False, device=env.device)
    batch = packed_batch(model, rows=1, row_tokens=256, row_tiles=8)
    sharded = parallelize(model, DistConfig(strategy="fsdp"), env)
    out = sharded(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        pixel_values=batch.pixel_values,
        image_flags=batch.image_flags,
        labels=batch.labels,
        loss_weight=batch.loss_weight,
    )
    out.loss_sum.backward()
    return sharded


def optimizers(model: nn.Module) -> dict[str, torch.optim.Optimizer | str]:
    """One AdamW per variant over build_optimizer's groups (or why it cannot be built)."""
    config = OptimConfig()
    chosen = build_optimizer(model, config).param_groups
    built: dict[str, torch.optim.Optimizer | str] = {}
    for name, kwargs in VARIANTS.items():
        # New group dicts each time: AdamW writes its defaults (foreach, fused) into them.
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in chosen]
        try:
            built[name] = torch.optim.AdamW(
                groups,
                lr=config.learning_rate,
                betas=(config.adam_beta1, config.adam_beta2),
                eps=config.adam_epsilon,
                **kwargs,
            )
        except RuntimeError as error:  # fused kernels are missing for this device in old torch
            built[name] = f"unavailable ({error})"
    return built


def cpu_ms_per_step(step: Callable[[], object], steps: int) -> float:
    start = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repetition")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = sharded_model_with_gradients()
        parameters = [p for p in model.parameters() if p.requires_grad]
        kinds = sorted({type(p).__name__ for p in parameters})
        built = optimizers(model)
        runnable = {n: o for n, o in built.items() if isinstance(o, torch.optim.Optimizer)}
        for optimizer in runnable.values():
            optimizer.step()  # creates the moments: not part of a steady-state step
        times: dict[str, list[float]] = {name: [] for name in runnable}
        names = list(runnable)
        for repeat in range(args.repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(cpu_ms_per_step(runnable[name].step, args.steps))
    finally:
        dist.destroy_process_group()
    numel = sum(p.numel() for p in parameters)
    print(
        f"{SHAPE_NAME}, FSDP2 on 1 gloo rank, {len(parameters)} parameter tensors "
        f"({'/'.join(kinds)}, {numel / 1e6:.2f} M values), torch {torch.__version__}; "
        f"AdamW step, CPU ms, median [min, max] of {args.repeats} x {args.steps} steps:"
    )
    baseline = statistics.median(times["for-loop"])
    for name, optimizer in built.items():
        if isinstance(optimizer, str):
            print(f"  {name:9s} {optimizer}")
            continue
        values = times[name]
        median = statistics.median(values)
        print(
            f"  {name:9s} {median:7.2f} [{min(values):.2f}, {max(values):.2f}]"
            f"  for-loop / this {baseline / median:.2f}x"
        )


if __name__ == "__main__":
    main()
