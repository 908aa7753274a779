"""Held-out loss while training: per dataset, with the run's loss weights, every N steps.

    eval.meta --build_sources (once)--> held-out sources
    every eval.steps: a fresh one-pass stream per rank (num_epochs=1, no replacement: the
      strided shares of data.sharding, so every record is read by exactly one stream)
      --collate (the run's packing and loss_reduction weights)--> micro-batches
      --model in eval mode (no dropout / drop-path), no grad, the run's precision-->
      loss sum per dataset on the device, weights on the host
      --one read, one all-reduce--> eval/loss, eval/loss/<dataset>, eval/tokens, ...

Ranks step in lockstep: while any rank still has a micro-batch, a rank whose share is done
runs a filler micro-batch with no supervised token, so FSDP2's gathers line up; the filler
counts for nothing. The training stream, the RNG states (torch's global and the device's,
which a DataLoader with workers draws from) and every module's train/eval mode are as they
were before, so a run's training losses do not depend on whether it evaluates.

What it does not do: generation or task metrics (demo/evaluate.py scores saved models).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from vlpretrain.data.build import SampleConfig, build_sources
from vlpretrain.data.collate import PackedBatch, collate_rows
from vlpretrain.data.loader import StreamConfig, build_dataloader
from vlpretrain.data.packing import PackingConfig, PackItem, PackRow, PieceRef
from vlpretrain.data.samples import IGNORE_INDEX, SampleSource, TokenizedSample
from vlpretrain.data.tiling import NormalizeType, model_pixels
from vlpretrain.distributed.env import DistEnv, all_reduce_host_sum, all_reduce_sum
from vlpretrain.facts import RunFacts


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Held-out loss while training (reference flags in brackets)."""

    meta: str = ""
    """Meta JSON of the held-out datasets, in the training meta's format (the reference's);
    required when steps > 0 [--eval_meta_path]."""
    steps: int = 0
    """Evaluate every this many optimizer steps and after the last one; 0: never
    [--evaluation_strategy steps with --eval_steps]."""
    max_batches: int = 0
    """Micro-batches per rank per evaluation (the first ones of each rank's share); 0: the
    whole held-out set, every record counted exactly once across ranks."""

    def __post_init__(self) -> None:
        for name in ("steps", "max_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        if self.steps > 0 and not self.meta:
            raise ValueError(
                f"eval.steps = {self.steps} needs eval.meta, the meta JSON of the held-out data "
                "(the reference trainer passes no evaluation data; --eval_meta_path sets it)"
            )

    def due(self, step: int, max_steps: int) -> bool:
        """Whether to evaluate after optimizer step `step`."""
        return self.steps > 0 and (step % self.steps == 0 or step == max_steps)


def dataset_losses(
    loss_sums: tuple[float, ...], weight_sums: tuple[float, ...], names: dict[int, str], prefix: str
) -> dict[str, float]:
    """`<prefix>/<dataset name>`: each dataset's loss sum over its weight sum, for the
    datasets with weight. With the run's loss weights (token, sample or square), the
    weight-weighted mean of these values is the overall loss."""
    pairs = zip(loss_sums, weight_sums, strict=True)
    return {
        f"{prefix}/{names[index]}": loss_sum / weight
        for index, (loss_sum, weight) in enumerate(pairs)
        if weight > 0 and index in names
    }


@dataclass(frozen=True)
class EvalResult:
    """One evaluation over all ranks."""

    loss_sum: float
    weight_sum: float
    dataset_loss_sums: tuple[float, ...]
    dataset_weight_sums: tuple[float, ...]
    num_tokens: int
    """Real (non-padding) tokens evaluated."""
    num_samples: int
    """Packed samples (a split record counts once per piece)."""
    num_records: int
    """Held-out records read, skipped ones included."""
    num_skipped: int
    num_batches: int
    """Micro-batches over all ranks (fillers not counted)."""

    def metrics(self, names: dict[int, str]) -> dict[str, Any]:
        """The metrics.jsonl record (kind 'eval') of this evaluation."""
        loss = self.loss_sum / self.weight_sum if self.weight_sum > 0 else math.nan
        return {
            "kind": "eval",
            "eval/loss": loss,
            **dataset_losses(self.dataset_loss_sums, self.dataset_weight_sums, names, "eval/loss"),
            "eval/tokens": self.num_tokens,
            "eval/samples": self.num_samples,
            "eval/records": self.num_records,
            "eval/skipped": self.num_skipped,
            "eval/batches": self.num_batches,
        }


EVAL_LINE_KEYS = ("eval/loss", "eval/tokens", "eval/records", "eval/skipped")
"""Shown in the evaluation's log line (every eval/loss/<dataset> goes to metrics.jsonl)."""


def filler_batch(packing: PackingConfig, facts: RunFacts, num_datasets: int) -> PackedBatch:
    """A micro-batch of one two-token padding sample: nothing supervised, one dummy tile."""
    tile = facts.tile_size
    sample = TokenizedSample(
        input_ids=np.full(2, facts.pad_token_id, dtype=np.int64),
        labels=np.full(2, IGNORE_INDEX, dtype=np.int64),
        pixel_values=np.zeros((0, 3, tile, tile), dtype=np.uint8),
        num_tiles_per_image=(),
        dataset_index=0,
        source=SampleSource("evaluation filler", "", 0),
    )
    row = PackRow()
    row.append(PackItem(PieceRef.whole(sample, 0, 0), sample))
    return collate_rows([row], packing, facts, num_datasets=num_datasets)


class HeldOut:
    """The held-out data of a run: sources built once, a fresh one-pass stream per evaluation
    (the training stream's settings, without epochs, replacement or FLOPs balancing)."""

    def __init__(
        self,
        meta: str,
        sources: list[Any],
        packing: PackingConfig,
        stream: StreamConfig,
        facts: RunFacts,
        env: DistEnv,
    ) -> None:
        self.sources = sources
        self.names = {s.dataset_index: s.name for s in sources}
        self.packing = replace(packing, balance_flops=False)
        self.stream = replace(stream, num_epochs=1, replacement=False)
        self.facts = facts
        self.env = env
        num_streams = env.world_size * max(1, stream.num_workers)
        largest = max(len(s) for s in sources)
        if largest < num_streams:
            raise ValueError(
                f"eval.meta {meta}: its largest dataset has {largest} records, fewer than the "
                f"{num_streams} data streams (ranks x stream.num_workers); every stream needs "
                "at least one held-out record: add records or use fewer workers"
            )
        self.filler = filler_batch(self.packing, facts, max(self.names) + 1)

    def batches(self) -> Iterator[PackedBatch]:
        """This rank's share of the held-out set, once, in micro-batches."""
        loader = build_dataloader(
            self.sources, self.packing, self.facts, self.stream, self.env.rank,
            self.env.world_size,
        )  # fmt: skip
        return iter(loader)


def build_held_out(
    meta: str,
    sample_config: SampleConfig,
    packing: PackingConfig,
    stream: StreamConfig,
    facts: RunFacts,
    tokenizer: Any,
    env: DistEnv,
) -> HeldOut:
    """The held-out sources of `meta` (indexes built or loaded once, like the training ones)."""
    sources = build_sources(meta, sample_config, facts, tokenizer)
    return HeldOut(meta, sources, packing, stream, facts, env)


def lockstep(
    batches: Iterator[PackedBatch], filler: PackedBatch, max_batches: int
) -> Iterator[tuple[PackedBatch, bool]]:
    """(micro-batch, is_real) until no rank has one left (or each took `max_batches`): a rank
    that is done runs `filler` meanwhile. One host all-reduce per micro-batch."""
    taken = 0
    while True:
        batch = next(batches, None) if max_batches == 0 or taken < max_batches else None
        if all_reduce_host_sum(torch.tensor(float(batch is not None), dtype=torch.float64)) == 0:
            return
        taken += batch is not None
        yield (filler, False) if batch is None else (batch, True)


@dataclass
class _Totals:
    """Host counts of one rank's real micro-batches."""

    weight_sum: float = 0.0
    num_tokens: int = 0
    num_samples: int = 0
    num_records: int = 0
    num_skipped: int = 0
    num_batches: int = 0

    def add(self, batch: PackedBatch) -> None:
        assert batch.layout is not None  # collate_rows made it
        self.weight_sum += batch.layout.weight_sum
        self.num_tokens += batch.stats.num_real_tokens
        self.num_samples += batch.stats.num_samples
        self.num_records += batch.stats.num_loaded
        self.num_skipped += batch.stats.num_skipped
        self.num_batches += 1


def evaluate(
    model: nn.Module,
    held_out: HeldOut,
    max_batches: int,
    normalize_type: NormalizeType,
    autocast: Callable[[], AbstractContextManager[Any]],
    heartbeat: Callable[[], None] = lambda: None,
) -> EvalResult:
    """Held-out loss of `model` over every rank's share (a collective: every rank calls it).

    `autocast`: the run's autocast context; `heartbeat`: called before every micro-batch
    (the loop re-arms its stall watch: a long held-out set is progress, not a stall)."""
    env = held_out.env
    modes = {module: module.training for module in model.modules()}
    devices = [env.device] if env.device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return _evaluate(model, held_out, max_batches, normalize_type, autocast, heartbeat)
    finally:
        for module, training in modes.items():
            module.training = training


def _evaluate(
    model: nn.Module,
    held_out: HeldOut,
    max_batches: int,
    normalize_type: NormalizeType,
    autocast: Callable[[], AbstractContextManager[Any]],
    heartbeat: Callable[[], None],
) -> EvalResult:
    env = held_out.env
    num_datasets = len(held_out.filler.layout.dataset_weight_sums)  # type: ignore[union-attr]
    loss_sums = torch.zeros(1 + num_datasets, dtype=torch.float64, device=env.device)
    dataset_weights = np.zeros(num_datasets, dtype=np.float64)
    totals = _Totals()
    for batch, real in lockstep(held_out.batches(), held_out.filler, max_batches):
        heartbeat()
        device_batch = batch.to(env.device, non_blocking=True)
        with autocast():
            out = model(
                input_ids=device_batch.input_ids,
                position_ids=device_batch.position_ids,
                pixel_values=model_pixels(device_batch.pixel_values, normalize_type),
                image_flags=device_batch.image_flags,
                labels=device_batch.labels,
                loss_weight=device_batch.loss_weight,
                layout=device_batch.layout,
                per_dataset=True,
            )
        if real:
            assert batch.layout is not None and out.dataset_loss_sums is not None
            loss_sums[0] += out.loss_sum.double()
            loss_sums[1:] += out.dataset_loss_sums.double()
            dataset_weights += np.asarray(batch.layout.dataset_weight_sums)
            totals.add(batch)
    counts = [totals.weight_sum, totals.num_tokens, totals.num_samples, totals.num_records,
              totals.num_skipped, totals.num_batches]  # fmt: skip
    # One read of the device sums, one all-reduce of everything.
    local = torch.cat([loss_sums.cpu(), torch.tensor(counts, dtype=torch.float64),
                       torch.from_numpy(dataset_weights)])  # fmt: skip
    loss_sum, *rest = all_reduce_sum(local).tolist()
    dataset_loss_sums, rest = rest[:num_datasets], rest[num_datasets:]
    weight_sum, tokens, samples, records, skipped, batches = rest[: len(counts)]
    return EvalResult(
        loss_sum=loss_sum,
        weight_sum=weight_sum,
        dataset_loss_sums=tuple(dataset_loss_sums),
        dataset_weight_sums=tuple(rest[len(counts) :]),
        num_tokens=int(tokens),
        num_samples=int(samples),
        num_records=int(records),
        num_skipped=int(skipped),
        num_batches=int(batches),
    )
