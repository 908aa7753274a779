"""Turn emitted pack rows into one `PackedBatch` of torch tensors (one micro-batch).

    [PackRow] * rows_per_batch --collate_rows--> PackedBatch (+ BatchStats)

Per row: samples back to back, then padding as its own segment. position_ids restart at 0
for every sample and for the padding; the first label of every sample is -100 so nothing
is learned across a sample boundary; loss weights follow `loss_reduction` and are 0 wherever
the label is -100. A micro-batch without any real tile gets exactly one zero dummy tile with
image flag 0 so that every rank runs the vision tower.

Legend for local names: B rows, L tokens per row, T tiles, S tile side in pixels.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from vlpretrain.data.packing import LossReduction, PackingConfig, PackRow, PieceRef
from vlpretrain.data.samples import IGNORE_INDEX, SkippedSample
from vlpretrain.facts import RunFacts


@dataclass(frozen=True)
class BatchStats:
    """Counts describing one micro-batch and what the stream did since the previous one."""

    num_rows: int
    num_samples: int
    """Packed samples (pieces of a split sample count once each)."""
    num_real_tokens: int
    num_padding_tokens: int
    num_tiles: int
    """Real tiles (image flag 1)."""
    num_dummy_tiles: int
    """Zero tiles with image flag 0 (strict-mode padding or the one dummy tile)."""
    samples_per_dataset: tuple[int, ...]
    """Packed samples per dataset index."""
    token_capacity: int
    """rows * max_packed_tokens: the budget the fill ratio is measured against."""
    num_loaded: int = 0
    """Records loaded since the previous batch, skipped ones included."""
    num_skipped: int = 0
    """Records skipped since the previous batch (sum of skipped_by_reason)."""
    skipped_by_reason: tuple[tuple[str, int], ...] = ()
    """(reason, count) of the records skipped since the previous batch, sorted by reason."""
    skipped: tuple[SkippedSample, ...] = ()
    """The records skipped since the previous batch, in load order (file, line, reason)."""

    @property
    def fill_ratio(self) -> float:
        return self.num_real_tokens / self.token_capacity if self.token_capacity else 0.0


@dataclass(frozen=True)
class PackedLayout:
    """What the host knows about a micro-batch's layout when it collates it, so that the
    model never reads it back from the device: each field stands for one device-to-host
    sync per micro-batch (a data-dependent size or a count) in the forward. Tensors travel
    with the batch; plain values stay on the host."""

    cu_seqlens: torch.Tensor
    """(segments + 1,) int32 boundaries over the flattened B*L tokens, padding included."""
    max_seqlen: int
    """Longest segment (varlen kernels take it as a host int)."""
    real_tiles: torch.Tensor
    """(T_real,) int64 indices of the tiles with image flag 1, in order."""
    num_image_slots: int
    """<IMG_CONTEXT> tokens in input_ids (must be T_real x tokens per tile)."""
    supervised: torch.Tensor
    """(K,) int64 flat indices into (B, L) of the positions whose next token is trained
    (label not -100 and weight > 0), in row-major order."""
    weight_sum: float
    """Sum of loss_weight[:, 1:] (as a float32 torch sum, like the model's)."""
    supervised_datasets: torch.Tensor
    """(K,) int64 dataset index of the sample each supervised position belongs to, aligned
    with `supervised` (the model sums the loss per dataset with it)."""
    dataset_weight_sums: tuple[float, ...]
    """Sum of loss_weight[:, 1:] per dataset index (one entry per dataset of the stream)."""

    @property
    def num_supervised(self) -> int:
        return int(self.supervised.shape[0])

    def varlen_kwargs(self) -> dict[str, Any]:
        """Sample boundaries as transformers' varlen attention functions name them."""
        return {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }


def packed_layout(
    input_ids_BL: torch.Tensor,
    labels_BL: torch.Tensor,
    loss_weight_BL: torch.Tensor,
    image_flags_T: torch.Tensor,
    boundaries: Sequence[int],
    img_context_token_id: int,
    datasets_BL: torch.Tensor | None = None,
    num_datasets: int = 1,
) -> PackedLayout:
    """The layout of a micro-batch from its CPU tensors (no device involved).

    `datasets_BL`: the dataset index of every token's sample (None: all of dataset 0)."""
    length = labels_BL.shape[1]
    targets_BL, weights_BL = labels_BL[:, 1:], loss_weight_BL[:, 1:]
    keep_BK = (targets_BL != IGNORE_INDEX) & (weights_BL > 0)  # K = L - 1 predictions per row
    rows, predictions = torch.nonzero(keep_BK, as_tuple=True)
    if datasets_BL is None:
        datasets_BL = torch.zeros_like(labels_BL)
    # A target and the position predicting it belong to the same sample: the first token of
    # every sample is never a target.
    targets_datasets_BK = datasets_BL[:, 1:]
    per_dataset = torch.zeros(num_datasets, dtype=torch.float64).index_add_(
        0, targets_datasets_BK.reshape(-1), weights_BL.reshape(-1).double()
    )
    return PackedLayout(
        cu_seqlens=torch.tensor(list(boundaries), dtype=torch.int32),
        max_seqlen=int(np.diff(np.asarray(boundaries)).max()),
        real_tiles=torch.nonzero(image_flags_T == 1).reshape(-1),
        num_image_slots=int((input_ids_BL == img_context_token_id).sum()),
        supervised=rows * length + predictions,
        weight_sum=float(weights_BL.sum()),
        supervised_datasets=targets_datasets_BK[rows, predictions],
        dataset_weight_sums=tuple(per_dataset.tolist()),
    )


@dataclass(frozen=True)
class PackedBatch:
    """One micro-batch ready for the model; tensors are on CPU until `to()`."""

    input_ids: torch.Tensor
    """(B, L) int64."""
    labels: torch.Tensor
    """(B, L) int64, aligned with input_ids (the model shifts); -100 not trained."""
    position_ids: torch.Tensor
    """(B, L) int64, restarting at 0 for every sample and for the padding segment."""
    cu_seqlens: torch.Tensor
    """(segments + 1,) int32 boundaries over the flattened B*L tokens, padding included."""
    max_seqlen: int
    """Longest segment in cu_seqlens (for varlen attention kernels)."""
    loss_weight: torch.Tensor
    """(B, L) float32, 0 where labels == -100."""
    pixel_values: torch.Tensor
    """(T, 3, S, S) uint8 RGB tiles in reading order of the image placeholders; the model's
    input is `data.tiling.model_pixels(pixel_values, data.normalize_type)`, computed where
    they are used (after the 4x smaller copy to the device)."""
    image_flags: torch.Tensor
    """(T,) int64: 1 real tile, 0 dummy or padding tile."""
    num_tiles_per_image: tuple[int, ...]
    """Tiles of every real image in order."""
    sample_ids: tuple[PieceRef, ...]
    """Which record (and slice) every packed sample is, in order."""
    stats: BatchStats
    layout: PackedLayout | None = None
    """Host-side layout (set by collate_rows); None: the model works it out on the device."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """Copy of the batch with every tensor moved to `device` (`non_blocking` overlaps
        the copy with compute when the batch is in pinned memory)."""
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        """Copy with pinned tensors (called by the DataLoader when pin_memory=True)."""
        return _map_tensors(self, lambda t: t.pin_memory())


def _map_tensors(
    instance: Any,
    fn: Callable[[torch.Tensor], torch.Tensor],
    done: dict[int, torch.Tensor] | None = None,
) -> Any:
    """Copy of a dataclass with `fn` applied to its tensors, and to those of its layout; a
    tensor both hold (cu_seqlens) is mapped once (`done`: id -> result)."""
    done = {} if done is None else done
    # Any: replace() checks **kwargs against every field type, not just the tensor ones.
    moved: dict[str, Any] = {}
    for f in fields(instance):
        value = getattr(instance, f.name)
        if isinstance(value, torch.Tensor):
            if id(value) not in done:
                done[id(value)] = fn(value)
            moved[f.name] = done[id(value)]
        elif isinstance(value, PackedLayout):
            moved[f.name] = _map_tensors(value, fn, done)
    return replace(instance, **moved)


def len2weight(num_supervised: int, reduction: LossReduction) -> float:
    """Loss weight of each supervised token of a sample with `num_supervised` such tokens."""
    if num_supervised == 0:
        return 0.0
    if reduction == "token":
        return 1.0
    if reduction == "sample":
        return 1.0 / num_supervised
    if reduction == "square":
        return 1.0 / math.sqrt(num_supervised)
    raise ValueError(f"unknown loss_reduction {reduction!r}; use token, sample or square")


def collate_rows(
    rows: list[PackRow],
    config: PackingConfig,
    facts: RunFacts,
    *,
    num_datasets: int,
    num_loaded: int = 0,
    skipped: Sequence[SkippedSample] = (),
) -> PackedBatch:
    """Build the tensors of one micro-batch from emitted rows."""
    if not rows:
        raise ValueError("collate_rows needs at least one row")
    longest = max(row.num_tokens for row in rows)
    seq_len = config.max_packed_tokens if config.strict_mode else longest
    num_rows = len(rows)
    ids_BL = np.full((num_rows, seq_len), facts.pad_token_id, dtype=np.int64)
    labels_BL = np.full((num_rows, seq_len), IGNORE_INDEX, dtype=np.int64)
    positions_BL = np.zeros((num_rows, seq_len), dtype=np.int64)
    weight_BL = np.zeros((num_rows, seq_len), dtype=np.float32)
    dataset_BL = np.zeros((num_rows, seq_len), dtype=np.int64)  # padding: 0, never supervised
    boundaries = [0]
    for b, row in enumerate(rows):
        offset = 0
        for item in row.items:
            n = item.sample.num_tokens
            labels_L = item.sample.labels.astype(np.int64, copy=True)
            labels_L[0] = IGNORE_INDEX
            supervised_L = labels_L != IGNORE_INDEX
            weight = len2weight(int(supervised_L.sum()), config.loss_reduction)
            ids_BL[b, offset : offset + n] = item.sample.input_ids
            labels_BL[b, offset : offset + n] = labels_L
            positions_BL[b, offset : offset + n] = np.arange(n)
            weight_BL[b, offset : offset + n] = np.where(supervised_L, weight, 0.0)
            dataset_BL[b, offset : offset + n] = item.ref.dataset_index
            offset += n
            boundaries.append(b * seq_len + offset)
        if offset < seq_len:
            positions_BL[b, offset:] = np.arange(seq_len - offset)
            boundaries.append((b + 1) * seq_len)
    pixels_TCHW, flags_T = _tiles(rows, config, facts.tile_size)
    stats = _stats(rows, config, num_datasets, int(seq_len * num_rows), flags_T)
    stats = replace(
        stats,
        num_loaded=num_loaded,
        num_skipped=len(skipped),
        skipped_by_reason=tuple(sorted(Counter(s.reason for s in skipped).items())),
        skipped=tuple(skipped),
    )
    input_ids, labels = torch.from_numpy(ids_BL), torch.from_numpy(labels_BL)
    loss_weight, image_flags = torch.from_numpy(weight_BL), torch.from_numpy(flags_T)
    layout = packed_layout(
        input_ids,
        labels,
        loss_weight,
        image_flags,
        boundaries,
        facts.img_context_token_id,
        torch.from_numpy(dataset_BL),
        num_datasets,
    )
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=torch.from_numpy(positions_BL),
        cu_seqlens=layout.cu_seqlens,
        max_seqlen=layout.max_seqlen,
        loss_weight=loss_weight,
        pixel_values=torch.from_numpy(pixels_TCHW),
        image_flags=image_flags,
        num_tiles_per_image=tuple(
            t for row in rows for item in row.items for t in item.sample.num_tiles_per_image
        ),
        sample_ids=tuple(item.ref for row in rows for item in row.items),
        stats=stats,
        layout=layout,
    )


def _tiles(rows: list[PackRow], config: PackingConfig, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Real tiles in reading order, strict-mode padding per row, or one dummy tile (S = side)."""
    chunks: list[np.ndarray] = []
    flags: list[np.ndarray] = []
    for row in rows:
        for item in row.items:
            if item.sample.num_tiles:
                chunks.append(_uint8_tiles(item.sample))
                flags.append(np.ones(item.sample.num_tiles, dtype=np.int64))
        missing = config.num_images_expected - row.num_tiles if config.strict_mode else 0
        if missing > 0:
            chunks.append(np.zeros((missing, 3, side, side), dtype=np.uint8))
            flags.append(np.zeros(missing, dtype=np.int64))
    if not chunks:
        # Every rank must run the vision tower each step (FSDP2 / ZeRO-3 would hang).
        chunks.append(np.zeros((1, 3, side, side), dtype=np.uint8))
        flags.append(np.zeros(1, dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(chunks)), np.concatenate(flags)


def _uint8_tiles(sample: Any) -> np.ndarray:
    if sample.pixel_values.dtype != np.uint8:
        raise TypeError(
            f"{sample.source}: tiles must be uint8 RGB (data.tiling.tile_pixels), got "
            f"{sample.pixel_values.dtype}"
        )
    return np.asarray(sample.pixel_values)


def _stats(
    rows: list[PackRow],
    config: PackingConfig,
    num_datasets: int,
    num_slots: int,
    flags_T: np.ndarray,
) -> BatchStats:
    per_dataset = [0] * num_datasets
    for row in rows:
        for item in row.items:
            per_dataset[item.ref.dataset_index] += 1
    num_real = sum(row.num_tokens for row in rows)
    num_tiles = int(flags_T.sum())
    return BatchStats(
        num_rows=len(rows),
        num_samples=sum(len(row.items) for row in rows),
        num_real_tokens=num_real,
        num_padding_tokens=num_slots - num_real,
        num_tiles=num_tiles,
        num_dummy_tiles=int(flags_T.shape[0]) - num_tiles,
        samples_per_dataset=tuple(per_dataset),
        token_capacity=len(rows) * config.max_packed_tokens,
    )
