"""The training loop for every stage: `train()` -> `run_stage()` = `setup_stage()` (everything
built once into a StageRun) -> `fit()` (the optimizer steps, `train_step()` each) ->
`finish_stage()` (export and summary).

RunConfig --build_model--> VLM, tokenizer --run_facts--> RunFacts (tile, tokens per tile, ids)
VLM --freeze policy--> --parallelize (DDP/FSDP2)-->
meta.json --build_sources(RunFacts)--> sources --build_dataloader(RunFacts)--> micro-batches
loop: GA micro-batches -> train_step (global loss normalisation, clip, AdamW, schedule)
      -> metrics every logging_steps (stdout line with the time left, metrics.jsonl, the
         train.report_to trackers) -> DCP checkpoint every save_steps (and at the end)
      -> a preemption signal on any rank (train/preemption.py): every rank saves this step,
         and the process exits with PREEMPTED_EXIT instead of exporting
end: export the InternVL-layout model into output_dir (the next stage's input), then the
     summary and training_complete.json (train/summary.py), and loss_curves.png drawn from
     metrics.jsonl; a stage that already finished with this config trains nothing
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import vlpretrain
from vlpretrain.config import RunConfig, to_dict
from vlpretrain.data.build import build_sources
from vlpretrain.data.collate import PackedBatch
from vlpretrain.data.loader import build_dataloader
from vlpretrain.data.tiling import model_pixels
from vlpretrain.distributed.env import (
    DistEnv,
    all_reduce_host_sum,
    all_reduce_sum,
    arm_stack_dump,
    barrier,
    check_ranks_agree,
    disarm_stack_dump,
)
from vlpretrain.distributed.meta_init import RankZeroWeights, build_from_rank0, materialize
from vlpretrain.distributed.parallel import (
    compile_layers,
    enable_activation_checkpointing,
    gradient_sync,
    parallelize,
    unwrap,
    uses_meta_init,
)
from vlpretrain.facts import RunFacts
from vlpretrain.formats.internvl import save_internvl
from vlpretrain.log import MetricsWriter
from vlpretrain.model import attention
from vlpretrain.model.build import build_model, run_facts
from vlpretrain.model.families import check_packed_isolation
from vlpretrain.model.hub import lora_scalings, merge_lora_weights
from vlpretrain.model.vlm import InternVLModel
from vlpretrain.plots import plot_stage_or_say_how
from vlpretrain.train.checkpoint.lock import hold_run_lock
from vlpretrain.train.checkpoint.resume import (
    check_config_on_resume,
    flatten,
    set_aside_previous_run,
)
from vlpretrain.train.checkpoint.states import LoaderState, TrainState, training_states
from vlpretrain.train.checkpoint.store import (
    Checkpointer,
    check_resume_checkpoint,
    find_resume_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_shared,
)
from vlpretrain.train.eta import EtaClock
from vlpretrain.train.evaluate import (
    EVAL_LINE_KEYS,
    HeldOut,
    build_held_out,
    dataset_losses,
    evaluate,
)
from vlpretrain.train.flops import FlopsCounter, build_flops_counter, peak_tflops
from vlpretrain.train.freeze import apply_freeze_policy, apply_train_mode, log_trainable
from vlpretrain.train.memory import memory_metrics
from vlpretrain.train.nonfinite import (
    batch_sources,
    global_loss_and_finiteness,
    guard_nonfinite,
    refuse_nonfinite_weights,
)
from vlpretrain.train.optim import (
    build_optimizer,
    build_scheduler,
    log_parameter_groups,
    scheduled_learning_rates,
)
from vlpretrain.train.preemption import (
    PREEMPTED_EXIT,
    Preempted,
    StopRequest,
    catch_stop_signals,
    keep_worker_through_stop_signals,
)
from vlpretrain.train.skips import SkipRecorder
from vlpretrain.train.summary import (
    FINAL_MARKER,
    RECORDED_CONFIG,
    already_finished_line,
    finished_run,
    summary_lines,
)

logger = logging.getLogger(__name__)

LOADER_WAIT = "while waiting for the next micro-batch from the data loader"
"""What a stalled loop waits for when the loader yields nothing (e.g. a read on a dead mount)."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    weight_sum: float
    num_supervised: int
    applied: bool = True
    """False when the loss or gradient norm was not finite on some rank: no update was made."""
    dataset_loss_sums: tuple[float, ...] = ()
    """Loss sum per dataset index over all ranks (empty when data.log_per_dataset is off)."""
    dataset_weight_sums: tuple[float, ...] = ()
    """Loss-weight sum per dataset index over all ranks, as dataset_loss_sums."""


def autocast(precision: str, device: torch.device) -> Any:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def weight_sum(batch: PackedBatch) -> float:
    """The batch's loss-weight sum, from the host's layout when collate made one."""
    if batch.layout is not None:
        return batch.layout.weight_sum
    return float(batch.loss_weight[:, 1:].sum())


def micro_batch_scales(
    batches: list[PackedBatch], all_gather: bool, world_size: int
) -> tuple[list[float], float]:
    """Factor per micro-batch turning its loss sum into its share of the step loss.

    all_gather: every position is weighted by 1 / (weight sum over all micro-batches and
    ranks); times world_size because DDP/FSDP average gradients over ranks. Otherwise each
    micro-batch is normalised by its own weight sum and micro-batches are averaged.
    Returns the scales and the global weight sum (for logging).
    """
    local = torch.tensor([weight_sum(b) for b in batches], dtype=torch.float64)
    total = all_reduce_host_sum(local.sum())
    if all_gather:
        scale = world_size / total if total > 0 else 0.0
        return [scale] * len(batches), total
    return [1.0 / (w * len(batches)) if w > 0 else 0.0 for w in local.tolist()], total


def read_step_values(
    loss_sum: torch.Tensor, grad_norm: torch.Tensor, dataset_sums: torch.Tensor | None = None
) -> tuple[float, float, list[float]]:
    """The step's one device-to-host read: whether to step depends on both values; the
    per-dataset loss sums (when logged) travel in the same transfer."""
    parts = [loss_sum.reshape(1), grad_norm.to(loss_sum).reshape(1)]
    if dataset_sums is not None:
        parts.append(dataset_sums.to(loss_sum))
    local_loss, norm, *per_dataset = torch.cat(parts).cpu().tolist()
    return local_loss, norm, per_dataset


def dataset_weight_sums(batches: list[PackedBatch]) -> list[float]:
    """Loss-weight sum per dataset index over the micro-batches, from their host layouts."""
    per_batch = [b.layout.dataset_weight_sums for b in batches if b.layout is not None]
    return [math.fsum(column) for column in zip(*per_batch, strict=True)]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[PackedBatch],
    config: RunConfig,
    env: DistEnv,
) -> StepResult:
    """One optimizer step over gradient-accumulation micro-batches.

    Reads the device once (loss, gradient norm and the per-dataset loss sums together) when
    the batches carry their host layout: every size and count the forward needs comes from
    the host."""
    scales, total_weight = micro_batch_scales(
        batches, config.train.loss_reduction_all_gather, env.world_size
    )
    per_dataset = config.data.log_per_dataset and all(b.layout is not None for b in batches)
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    dataset_sums: torch.Tensor | None = None
    num_supervised = 0
    for index, (batch, scale) in enumerate(zip(batches, scales, strict=True)):
        with gradient_sync(model, enabled=index == len(batches) - 1):
            with autocast(config.train.precision, env.device):
                out = model(
                    input_ids=batch.input_ids,
                    position_ids=batch.position_ids,
                    pixel_values=model_pixels(batch.pixel_values, config.data.normalize_type),
                    image_flags=batch.image_flags,
                    labels=batch.labels,
                    loss_weight=batch.loss_weight,
                    layout=batch.layout,
                    per_dataset=per_dataset,
                )
            (out.loss_sum * scale).backward()
        loss_sum += out.loss_sum.detach().double()
        if out.dataset_loss_sums is not None:
            part = out.dataset_loss_sums.double()
            dataset_sums = part if dataset_sums is None else dataset_sums + part
        num_supervised += out.num_supervised
    trainable = [p for p in model.parameters() if p.requires_grad]
    max_norm = config.optim.max_grad_norm if config.optim.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    local_loss, norm, local_sums = read_step_values(loss_sum, grad_norm, dataset_sums)
    extra = None
    if dataset_sums is not None:  # loss sums, then weight sums, per dataset index
        extra = torch.tensor(local_sums + dataset_weight_sums(batches), dtype=torch.float64)
    global_loss, finite, sums = global_loss_and_finiteness(
        torch.tensor(local_loss, dtype=torch.float64), norm, total_weight, extra
    )
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    half = len(sums) // 2
    return StepResult(global_loss, norm, total_weight, num_supervised, applied=finite,
                      dataset_loss_sums=tuple(sums[:half]),
                      dataset_weight_sums=tuple(sums[half:]))  # fmt: skip


def held_out_data(config: RunConfig, facts: Any, tokenizer: Any, env: DistEnv) -> HeldOut | None:
    """The held-out data of eval.meta, or None when the run does not evaluate."""
    if config.eval.steps == 0:
        return None
    return build_held_out(config.eval.meta, config.data, config.packing, config.stream, facts,
                          tokenizer, env)  # fmt: skip


def evaluate_held_out(model: nn.Module, held_out: HeldOut, config: RunConfig) -> dict[str, Any]:
    """The metrics record of one evaluation of the held-out set (a collective); the stall
    watch is re-armed for every micro-batch."""
    result = evaluate(
        model,
        held_out,
        config.eval.max_batches,
        config.data.normalize_type,
        partial(autocast, config.train.precision, held_out.env.device),
        partial(arm_stack_dump, 60 * config.train.collective_timeout_minutes),
    )
    return result.metrics(held_out.names)


def prepare_model(config: RunConfig, env: DistEnv) -> tuple[nn.Module, InternVLModel, Any, int]:
    """Build the model (on rank 0 only, for a meta-device FSDP2 build), then prepare it for
    training (prepare_built_model); also returns the number of trainable parameters."""
    torch.manual_seed(config.train.seed)
    uses_lora = bool(config.freeze.use_backbone_lora or config.freeze.use_llm_lora)
    meta = uses_meta_init(config.dist, env, uses_lora)
    # Ranks that receive the model from rank 0 never build it: register the kernels here.
    attention.register_kernels()
    build = partial(build_model, config.model, env.device, config.train.precision == "bf16")
    built, weights = build_from_rank0(build, env) if meta else (build(), None)
    parallel, num_trainable = prepare_built_model(built.model, config, env, weights)
    return parallel, built.model, built.tokenizer, num_trainable


def prepare_built_model(
    model: InternVLModel, config: RunConfig, env: DistEnv, weights: RankZeroWeights | None = None
) -> tuple[nn.Module, int]:
    """Freeze, checkpoint activations, move and parallelise a built model: every step between
    the build and the first train_step. `weights`: rank 0's weights of a meta-device build,
    loaded after sharding. Returns the wrapped model and its number of trainable parameters.

    A function of its own so that benchmarks put a random-weight model of real shape through
    exactly the training path (bench/gpu.py) without weight files.
    """
    check_packed_isolation(model.language_model.config, config.data.max_seq_length)
    apply_freeze_policy(model, config.freeze)
    num_trainable = log_trainable(model)
    train = config.train
    enable_activation_checkpointing(
        model, vision=train.vision_checkpointing, llm=train.llm_checkpoint_mode
    )
    if train.compile:
        compile_layers(model, train.compile_backend)
    if weights is None:
        model.to(env.device)
    apply_train_mode(model)
    parallel = parallelize(model, config.dist, env, config.train.precision)
    if weights is not None:
        materialize(parallel, weights, env.device)
    return parallel, num_trainable


def next_micro_batches(
    iterator: Iterator[PackedBatch], count: int, device: torch.device
) -> list[PackedBatch]:
    # Pinned batches (stream.pin_memory) copy asynchronously, overlapping the previous step.
    return [next(iterator).to(device, non_blocking=True) for _ in range(count)]


def update_counters(state: TrainState, batches: list[PackedBatch]) -> None:
    for batch in batches:
        stats = batch.stats
        state.tokens_seen += stats.num_real_tokens
        state.samples_seen += stats.num_samples
        state.records_seen += stats.num_loaded
        for reason, count in stats.skipped_by_reason:
            state.skipped[reason] = state.skipped.get(reason, 0) + count


def step_metrics(
    result: StepResult,
    batches: list[PackedBatch],
    learning_rates: dict[str, float],
    seconds: float,
    flops: FlopsCounter,
    peak: float,
    world_size: int,
) -> dict[str, Any]:
    tokens = sum(b.stats.num_real_tokens for b in batches)
    tiles = sum(b.stats.num_tiles for b in batches)
    capacity = sum(b.stats.token_capacity for b in batches)
    # Model work only: padding segments and dummy tiles run but are not counted in MFU.
    per_component = flops.batches_flops(batches, result.num_supervised)
    total_flops = sum(per_component.values())
    metrics = {
        "loss": result.loss,
        **learning_rates,  # lr, and lr/<module> for each module that trains
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
    if peak > 0:  # no peak (a CPU without train.peak_tflops): no MFU at all
        metrics["mfu"] = total_flops / seconds / (peak * 1e12)
    return metrics


LINE_KEYS = (
    "loss",
    "lr",
    "grad_norm",
    "seconds",
    "data_wait_seconds",
    "tokens_per_second",
    "tiles_per_second",
    "mfu",
    "eta_seconds",
    "peak_host_rss_gib",
    "max_memory_allocated_gib",
)
"""Shown in the progress line; `seconds` is the whole step, `data_wait_seconds` the part of it
spent waiting for the loader (a starved loader shows here, not as a low MFU alone),
`eta_seconds` the time left to max_steps (train/eta.py); the memory peaks come from
train/memory.py (the device's on CUDA only)."""


SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
"""TrainConfig.export_precision -> the dtype of the exported weights."""


def export_model(
    model: nn.Module,
    tokenizer: Any,
    output_dir: str | Path,
    env: DistEnv,
    image_settings: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Gather full weights (from any wrapper) and write the InternVL layout on rank 0, with
    the tiling settings the data used (`SampleConfig.image_settings()`) in its config.json,
    floating weights in `dtype`."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # A full state dict holds plain tensors only (no DTensors or non-tensor values).
    state = merge_lora_weights(
        cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options)),
        lora_scalings(unwrap(model)),
    )
    refuse_nonfinite_weights(state if env.is_main else {}, output_dir)
    if env.is_main:
        save_internvl(
            unwrap(model),
            tokenizer,
            output_dir,
            state=state,
            image_settings=image_settings,
            dtype=dtype,
        )
    barrier()


def resume_path(config: RunConfig) -> Path | None:
    """The verified checkpoint to resume from (a collective), or None to start fresh."""
    if config.train.resume == "never":
        return None
    if config.train.resume == "auto":
        return find_resume_checkpoint(config.train.output_dir)
    return check_resume_checkpoint(config.train.resume)


def prepare_output_dir(config: RunConfig, env: DistEnv) -> Path | None:
    """Clear the completion marker, pick the checkpoint to resume from (its config checked)
    or set an earlier run aside, and record the resolved config; returns the checkpoint."""
    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        (output_dir / FINAL_MARKER).unlink(missing_ok=True)
        if config.train.resume == "never":
            set_aside_previous_run(output_dir, config.train.keep_replaced_runs)
    barrier()
    checkpoint = resume_path(config)
    if checkpoint is not None:
        saved = read_shared(checkpoint)["config"]
        check_config_on_resume(
            checkpoint, saved, to_dict(config), config.train.allow_changed_on_resume
        )
    if env.is_main:
        (output_dir / RECORDED_CONFIG).write_text(json.dumps(to_dict(config), indent=2))
    return checkpoint


def job_facts(config: RunConfig, env: DistEnv, finished: bool = False) -> dict[str, Any]:
    """What every rank of a job must agree on: the resolved config, world size, versions, and
    whether the stage already finished (all ranks return at once, or none)."""
    return {
        **{f"config.{k}": v for k, v in flatten(to_dict(config)).items()},
        "world_size": env.world_size,
        "finished": finished,
        "torch": torch.__version__,
        "vlpretrain": vlpretrain.__version__,
    }


def run_params(config: RunConfig, facts: RunFacts) -> dict[str, Any]:
    """What the trackers record as the run's parameters: the resolved config and RunFacts."""
    facts_items = {f"facts.{k}": v for k, v in dataclasses.asdict(facts).items()}
    return {**flatten(to_dict(config)), **facts_items}


def train(config: RunConfig, env: DistEnv) -> dict[str, Any]:
    """Run one stage to max_steps (resuming if a checkpoint exists); returns final metrics.

    Every rank first checks that all run the same job; output_dir's run lock is held
    throughout (train/checkpoint/lock.py), and an iteration that takes longer than the collective
    timeout dumps every thread's stack to stderr (a loader that long silent ends the run).
    A preemption signal (train.preemption_signals) ends the stage after a checkpoint of the
    step in progress: Preempted, a SystemExit with code PREEMPTED_EXIT. A stage that already
    finished with this config trains nothing (train/summary.py): one line, and its recorded
    final metrics.
    """
    started = time.monotonic()
    finished = finished_run(config)
    check_ranks_agree(job_facts(config, env, finished is not None))
    if finished is not None:
        logger.info(already_finished_line(config, finished))
        return finished
    signals, grace = config.train.preemption_signals, config.train.preemption_grace_seconds
    with hold_run_lock(config.train.output_dir, env), catch_stop_signals(signals, grace) as stop:
        try:
            return run_stage(config, env, stop, started)
        finally:
            disarm_stack_dump()


@dataclass
class StageRun:
    """Everything a stage's loop works with, built once by `setup_stage`."""

    model: torch.nn.Module
    """The wrapped model (DDP / FSDP2) that trains."""
    plain_model: InternVLModel
    tokenizer: Any
    num_trainable: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sources: list[Any]
    held_out: HeldOut | None
    dataset_names: dict[int, str]
    state: TrainState
    states: dict[str, Any]
    """The checkpointed parts (train/checkpoint/states.py), `state` among them."""
    checkpointer: Checkpointer
    flops: FlopsCounter
    peak: float
    skips: SkipRecorder
    metrics: MetricsWriter
    start_step: int
    """The step this process started from (0, or the resumed checkpoint's)."""


def run_stage(
    config: RunConfig, env: DistEnv, stop: StopRequest | None = None, started: float | None = None
) -> dict[str, Any]:
    """The stage itself; `train` calls it holding the run lock and catching stop signals.
    `started`: time.monotonic() when the stage began (the summary's wall time)."""
    started = time.monotonic() if started is None else started
    stop = stop or StopRequest()
    run = setup_stage(config, env)
    last, stopping = fit(run, config, env, stop)
    if stopping and run.state.step < config.train.max_steps:
        saved = latest_checkpoint(Path(config.train.output_dir))  # this step's, finished in fit
        logger.info("stopped on %s at step %d of %d: saved %s; exiting with code %d (run "
                    "again to resume)", stop.signal_name or "another rank's signal",
                    run.state.step, config.train.max_steps, saved, PREEMPTED_EXIT)  # fmt: skip
        raise Preempted(run.state.step, str(saved))
    return finish_stage(run, config, env, last, started)


def setup_stage(config: RunConfig, env: DistEnv) -> StageRun:
    """Model, optimizer, schedule, data, metrics and the resumed state, in that order."""
    arm_stack_dump(60 * config.train.collective_timeout_minutes)
    checkpoint = prepare_output_dir(config, env)
    model, plain_model, tokenizer, num_trainable = prepare_model(config, env)
    facts = run_facts(plain_model, tokenizer)
    logger.info("run facts: %s", facts)
    optimizer = build_optimizer(model, config.optim)
    log_parameter_groups(optimizer)
    scheduler = build_scheduler(optimizer, config.optim, config.train.max_steps)
    sources = build_sources(config.train.meta_path, config.data, facts, tokenizer)
    for source in sources:
        logger.info("tiles: %s", source.describe_tile_budget())
    flops = build_flops_counter(plain_model)
    loader = build_dataloader(
        sources,
        config.packing,
        facts,
        config.stream,
        env.rank,
        env.world_size,
        step_flops=flops.step_flops,
        on_changed_media=config.data.on_changed_media,
        worker_init_fn=keep_worker_through_stop_signals,
    )
    held_out = held_out_data(config, facts, tokenizer, env)
    state = TrainState()
    states = training_states(model, optimizer, scheduler, loader, state)
    if checkpoint is not None:
        load_checkpoint(checkpoint, states)  # restores `state` in place
    output_dir = Path(config.train.output_dir)
    skips = SkipRecorder(output_dir, [s.name for s in sources], config.data.max_skip_fraction,
                         env, state.step, summary_every=config.train.save_steps)  # fmt: skip
    metrics = MetricsWriter(output_dir, config.train.report_to, env.is_main, state.step)
    metrics.log_params(run_params(config, facts))
    return StageRun(
        model=model,
        plain_model=plain_model,
        tokenizer=tokenizer,
        num_trainable=num_trainable,
        optimizer=optimizer,
        scheduler=scheduler,
        sources=sources,
        held_out=held_out,
        dataset_names={s.dataset_index: s.name for s in sources},
        state=state,
        states=states,
        checkpointer=Checkpointer(config.train.async_checkpoint),
        flops=flops,
        peak=peak_tflops(env.device, config.train.peak_tflops),
        skips=skips,
        metrics=metrics,
        start_step=state.step,
    )


def fit(
    run: StageRun, config: RunConfig, env: DistEnv, stop: StopRequest
) -> tuple[dict[str, Any], bool]:
    """Optimizer steps up to max_steps, or until the ranks agree to stop (then this step is
    saved); returns the last step's metrics and whether the run was asked to stop."""
    output_dir = Path(config.train.output_dir)
    stall_seconds = 60 * config.train.collective_timeout_minutes
    state = run.state
    iterator = cast(LoaderState, run.states["loader"]).iterator
    last: dict[str, Any] = {}
    bar = tqdm(
        total=config.train.max_steps,
        initial=state.step,
        disable=not (env.is_main and config.train.progress_bar),
        desc=output_dir.name,
        dynamic_ncols=True,
    )
    stopping = False
    eta = EtaClock(config.train.max_steps)
    with logging_redirect_tqdm(), run.metrics:
        while state.step < config.train.max_steps and not stopping:
            # Nothing ends a loader's silent wait (no collective runs then): the watch does.
            arm_stack_dump(stall_seconds, waiting_for=LOADER_WAIT)
            start = time.perf_counter()
            batches = next_micro_batches(
                iterator, config.train.gradient_accumulation_steps, env.device
            )
            data_wait = time.perf_counter() - start
            arm_stack_dump(stall_seconds)
            result = train_step(run.model, run.optimizer, batches, config, env)
            stopping = stop.agreed(env.world_size)  # the ranks are in step here: no wait
            rates = scheduled_learning_rates(run.optimizer, run.scheduler, config.optim)
            run.scheduler.step()
            state.step += 1
            update_counters(state, batches)
            run.skips.add(batches, state.step)
            describe_data = partial(batch_sources, batches, run.sources, config.stream.seed)
            guard_nonfinite(state, result.applied, result.loss, result.grad_norm, describe_data,
                            config.train.max_nonfinite_steps)  # fmt: skip
            is_last = state.step == config.train.max_steps or stopping
            last = step_metrics(
                result, batches, rates, time.perf_counter() - start, run.flops, run.peak,
                env.world_size,
            )  # fmt: skip
            last["data_wait_seconds"] = data_wait
            last["eta_seconds"] = eta.tick(state.step)
            last.update(dataset_losses(result.dataset_loss_sums, result.dataset_weight_sums,
                                       run.dataset_names, "loss"))  # fmt: skip
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{rates['lr']:.2e}")
            if state.step % config.train.logging_steps == 0 or is_last:
                run.skips.flush(state)  # skipped.jsonl + the skip policy
                last.update(memory_metrics(env.device))
                run.metrics.write(state.step, last, LINE_KEYS)
            if run.held_out is not None and config.eval.due(state.step, config.train.max_steps):
                run.metrics.write(state.step, evaluate_held_out(run.model, run.held_out, config),
                                  EVAL_LINE_KEYS)  # fmt: skip
            if state.step % config.train.save_steps == 0 or is_last:
                run.skips.flush(state)  # every skip the checkpoint covers is on disk
                run.checkpointer.save(
                    output_dir,
                    run.states,
                    step=state.step,
                    config=to_dict(config),
                    keep=config.train.save_total_limit,
                )
    run.checkpointer.finish()
    bar.close()
    return last, stopping


def finish_stage(
    run: StageRun, config: RunConfig, env: DistEnv, last: dict[str, Any], started: float
) -> dict[str, Any]:
    """Export the model, then the summary, training_complete.json and loss_curves.png."""
    output_dir = Path(config.train.output_dir)
    export_model(
        run.model,
        run.tokenizer,
        output_dir,
        env,
        config.data.image_settings(),
        SAVE_DTYPES[config.train.export_precision],
    )
    run.skips.finish(run.state)
    final = final_metrics(config, env, run.state, run.num_trainable, last)
    # rank 0's tally holds every rank's skips of the stage (skipped.jsonl, resumes included)
    final["skipped_all_ranks"] = dict(run.skips.tally.by_reason()) if env.is_main else {}
    final["steps_this_run"] = run.state.step - run.start_step
    final["wall_seconds"] = time.monotonic() - started
    if env.is_main:
        plot_stage_or_say_how(output_dir)
        (output_dir / FINAL_MARKER).write_text(json.dumps(final, indent=2))
        for line in summary_lines(final):
            logger.info(line)
    barrier()
    return final


def final_metrics(
    config: RunConfig, env: DistEnv, state: TrainState, num_trainable: int, last: dict[str, Any]
) -> dict[str, Any]:
    """training_complete.json: the stage's counters (this rank's, and tokens and samples over
    all ranks: a collective), where its model went, and the last step's metrics."""
    counts = torch.tensor([state.tokens_seen, state.samples_seen], dtype=torch.float64)
    tokens_all, samples_all = (int(v) for v in all_reduce_sum(counts).tolist())
    output_dir = Path(config.train.output_dir)
    return {
        "step": state.step,
        "max_steps": config.train.max_steps,
        "trainable_params": num_trainable,
        "tokens_seen": state.tokens_seen,
        "samples_seen": state.samples_seen,
        "tokens_seen_all_ranks": tokens_all,
        "samples_seen_all_ranks": samples_all,
        "world_size": env.world_size,
        "skipped": state.skipped,
        "nonfinite_steps": state.nonfinite_steps,
        "export_dir": str(output_dir.resolve()),
        "next_model_name_or_path": config.train.output_dir,
        **last,
    }
