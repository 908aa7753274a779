"""The training loop for every stage: `train()` and `train_step()`.

RunConfig --build_model--> VLM, tokenizer --run_facts--> RunFacts (tile, tokens per tile, ids)
VLM --freeze policy--> --parallelize (DDP/FSDP2)-->
meta.json --build_sources(RunFacts)--> sources --build_dataloader(RunFacts)--> micro-batches
loop: GA micro-batches -> train_step (global loss normalisation, clip, AdamW, schedule)
      -> metrics every logging_steps -> DCP checkpoint every save_steps (and at the end)
end: export the InternVL-layout model into output_dir (the next stage's input)
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vlpretrain.config import RunConfig, to_dict
from vlpretrain.data.build import SkipCounter, build_sources
from vlpretrain.data.collate import PackedBatch
from vlpretrain.data.loader import build_dataloader
from vlpretrain.distributed.env import DistEnv, all_reduce_sum, barrier
from vlpretrain.distributed.parallel import (
    enable_activation_checkpointing,
    gradient_sync,
    parallelize,
    unwrap,
)
from vlpretrain.log import MetricsWriter
from vlpretrain.model.build import build_model, run_facts, save_internvl
from vlpretrain.model.hub import lora_scalings, merge_lora_weights
from vlpretrain.model.vlm import InternVLModel
from vlpretrain.train.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from vlpretrain.train.flops import FlopsCounter, build_flops_counter, peak_tflops
from vlpretrain.train.freeze import apply_freeze_policy, apply_train_mode, log_trainable
from vlpretrain.train.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

FINAL_MARKER = "training_complete.json"
"""Written last into output_dir: the stage finished and its export is complete."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    weight_sum: float
    num_supervised: int


def autocast(precision: str, device: torch.device) -> Any:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def micro_batch_scales(
    batches: list[PackedBatch], all_gather: bool, world_size: int
) -> tuple[list[float], float]:
    """Factor per micro-batch turning its loss sum into its share of the step loss.

    all_gather: every position is weighted by 1 / (weight sum over all micro-batches and
    ranks); times world_size because DDP/FSDP average gradients over ranks. Otherwise each
    micro-batch is normalised by its own weight sum and micro-batches are averaged.
    Returns the scales and the global weight sum (for logging).
    """
    local = torch.tensor([float(b.loss_weight[:, 1:].sum()) for b in batches], dtype=torch.float64)
    total = float(all_reduce_sum(local.sum()))
    if all_gather:
        scale = world_size / total if total > 0 else 0.0
        return [scale] * len(batches), total
    return [1.0 / (w * len(batches)) if w > 0 else 0.0 for w in local.tolist()], total


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[PackedBatch],
    config: RunConfig,
    env: DistEnv,
) -> StepResult:
    """One optimizer step over gradient-accumulation micro-batches."""
    scales, weight_sum = micro_batch_scales(
        batches, config.train.loss_reduction_all_gather, env.world_size
    )
    loss_sum = torch.zeros((), dtype=torch.float64)
    num_supervised = 0
    for index, (batch, scale) in enumerate(zip(batches, scales, strict=True)):
        with gradient_sync(model, enabled=index == len(batches) - 1):
            with autocast(config.train.precision, env.device):
                out = model(
                    input_ids=batch.input_ids,
                    position_ids=batch.position_ids,
                    pixel_values=batch.pixel_values,
                    image_flags=batch.image_flags,
                    labels=batch.labels,
                    loss_weight=batch.loss_weight,
                )
            (out.loss_sum * scale).backward()
        loss_sum += out.loss_sum.detach().double().cpu()
        num_supervised += out.num_supervised
    trainable = [p for p in model.parameters() if p.requires_grad]
    max_norm = config.optim.max_grad_norm if config.optim.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    global_loss = float(all_reduce_sum(loss_sum)) / weight_sum if weight_sum > 0 else float("nan")
    return StepResult(global_loss, float(grad_norm), weight_sum, num_supervised)


def prepare_model(config: RunConfig, env: DistEnv) -> tuple[nn.Module, InternVLModel, Any, int]:
    """Build, freeze, checkpoint activations, move and parallelise the model; also returns the
    number of trainable parameters."""
    torch.manual_seed(config.train.seed)
    built = build_model(config.model)
    model = built.model
    apply_freeze_policy(model, config.freeze)
    num_trainable = log_trainable(model)
    enable_activation_checkpointing(model, vision=True, llm=config.train.grad_checkpoint)
    model.to(env.device)
    apply_train_mode(model)
    return parallelize(model, config.dist, env), model, built.tokenizer, num_trainable


def next_micro_batches(
    iterator: Iterator[PackedBatch], count: int, device: torch.device
) -> list[PackedBatch]:
    return [next(iterator).to(device) for _ in range(count)]


def update_counters(state: TrainState, batches: list[PackedBatch]) -> None:
    for batch in batches:
        stats = batch.stats
        state.tokens_seen += stats.num_real_tokens
        state.samples_seen += stats.num_samples
        state.records_seen += stats.num_loaded
        for reason, count in stats.skipped_by_reason:
            state.skipped[reason] = state.skipped.get(reason, 0) + count


def check_skips(state: TrainState, max_fraction: float, min_records: int = 100) -> None:
    """Stop the run when the global skip fraction exceeds `max_fraction`."""
    counts = torch.tensor([sum(state.skipped.values()), state.records_seen], dtype=torch.float64)
    skipped, seen = all_reduce_sum(counts).tolist()
    if seen >= min_records and skipped / seen > max_fraction:
        top = sorted(state.skipped.items(), key=lambda kv: -kv[1])[:5]
        raise RuntimeError(
            f"{int(skipped)} of {int(seen)} records skipped ({skipped / seen:.2%}), above "
            f"data.max_skip_fraction {max_fraction:.2%}; most common on this rank: {top}. "
            "Run `vlpretrain data check` on the meta file to see every bad record."
        )


def step_metrics(
    result: StepResult,
    batches: list[PackedBatch],
    lr: float,
    seconds: float,
    flops: FlopsCounter,
    peak: float,
    world_size: int,
) -> dict[str, Any]:
    tokens = sum(b.stats.num_real_tokens for b in batches)
    tiles = sum(b.stats.num_tiles for b in batches)
    capacity = sum(b.stats.token_capacity for b in batches)
    segments = [int(n) for b in batches for n in torch.diff(b.cu_seqlens.cpu()).tolist()]
    all_tiles = sum(b.stats.num_tiles + b.stats.num_dummy_tiles for b in batches)
    per_component = flops.step_flops(all_tiles, segments, result.num_supervised)
    total_flops = sum(per_component.values())
    metrics = {
        "loss": result.loss,
        "lr": lr,
        "grad_norm": result.grad_norm,
        "seconds": seconds,
        "tokens_per_second": tokens * world_size / seconds,
        "tiles_per_second": tiles * world_size / seconds,
        "fill_ratio": tokens / capacity if capacity else 0.0,
        "samples": sum(b.stats.num_samples for b in batches),
        "dummy_tiles": sum(b.stats.num_dummy_tiles for b in batches),
        "padding_tokens": sum(b.stats.num_padding_tokens for b in batches),
        **{f"tflops_{k}": v / 1e12 for k, v in per_component.items()},
    }
    if peak > 0:
        metrics["mfu"] = total_flops / seconds / (peak * 1e12)
    return metrics


LINE_KEYS = ("loss", "lr", "grad_norm", "seconds", "tokens_per_second", "tiles_per_second", "mfu")


def export_model(
    model: nn.Module,
    tokenizer: Any,
    output_dir: str | Path,
    env: DistEnv,
    image_settings: dict[str, Any] | None = None,
) -> None:
    """Gather full weights (from any wrapper) and write the InternVL layout on rank 0, with
    the tiling settings the data used (`SampleConfig.image_settings()`) in its config.json."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # A full state dict holds plain tensors only (no DTensors or non-tensor values).
    state = merge_lora_weights(
        cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options)),
        lora_scalings(unwrap(model)),
    )
    if env.is_main:
        save_internvl(
            unwrap(model), tokenizer, output_dir, state=state, image_settings=image_settings
        )
    barrier()


def resume_path(config: RunConfig) -> Path | None:
    if config.train.resume == "never":
        return None
    if config.train.resume == "auto":
        return latest_checkpoint(config.train.output_dir)
    return Path(config.train.resume)


def train(config: RunConfig, env: DistEnv) -> dict[str, Any]:
    """Run one stage to max_steps (resuming if a checkpoint exists); returns final metrics."""
    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / FINAL_MARKER).unlink(missing_ok=True)
    if env.is_main:
        (output_dir / "config.resolved.json").write_text(json.dumps(to_dict(config), indent=2))
    model, plain_model, tokenizer, num_trainable = prepare_model(config, env)
    facts = run_facts(plain_model, tokenizer)
    logger.info("run facts: %s", facts)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.train.max_steps)
    sources = build_sources(config.train.meta_path, config.data, facts, tokenizer)
    loader = build_dataloader(
        sources, config.packing, facts, config.stream, env.rank, env.world_size, SkipCounter()
    )
    state, rng_state = TrainState(), None
    checkpoint = resume_path(config)
    if checkpoint is not None:
        state, rng_state = load_checkpoint(checkpoint, model, optimizer, scheduler, loader)
    flops = build_flops_counter(plain_model)
    peak = peak_tflops(env.device, config.train.peak_tflops)
    metrics = MetricsWriter(output_dir, config.train.report_to == "tensorboard", env.is_main)
    iterator = iter(loader)
    if rng_state is not None:
        restore_rng(rng_state)
    last: dict[str, Any] = {}
    bar = tqdm(
        total=config.train.max_steps,
        initial=state.step,
        disable=not (env.is_main and config.train.progress_bar),
        desc=output_dir.name,
        dynamic_ncols=True,
    )
    with logging_redirect_tqdm():
        while state.step < config.train.max_steps:
            start = time.perf_counter()
            batches = next_micro_batches(
                iterator, config.train.gradient_accumulation_steps, env.device
            )
            result = train_step(model, optimizer, batches, config, env)
            lr = cast(float, scheduler.get_last_lr()[0])  # our param groups use float lrs
            scheduler.step()
            state.step += 1
            update_counters(state, batches)
            is_last = state.step == config.train.max_steps
            last = step_metrics(
                result, batches, lr, time.perf_counter() - start, flops, peak, env.world_size
            )
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
            if state.step % config.train.logging_steps == 0 or is_last:
                check_skips(state, config.data.max_skip_fraction)
                metrics.write(state.step, last, LINE_KEYS)
            if state.step % config.train.save_steps == 0 or is_last:
                save_checkpoint(
                    output_dir,
                    model,
                    optimizer,
                    scheduler,
                    state,
                    loader,
                    to_dict(config),
                    config.train.save_total_limit,
                )
    bar.close()
    metrics.close()
    export_model(model, tokenizer, output_dir, env, config.data.image_settings())
    final = {
        "step": state.step,
        "trainable_params": num_trainable,
        "tokens_seen": state.tokens_seen,
        "samples_seen": state.samples_seen,
        "skipped": state.skipped,
        **last,
    }
    if state.skipped:
        logger.warning("skipped records on this rank: %s (see the log above for file:line)",
                       state.skipped)  # fmt: skip
    if env.is_main:
        (output_dir / FINAL_MARKER).write_text(json.dumps(final, indent=2))
    barrier()
    return final
