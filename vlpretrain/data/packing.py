"""Pack tokenized samples into rows under a token budget and a tile budget (best fit).

    TokenizedSample --fit_to_budget--> PackItem* --BestFitPacker.add--> PackRow (emitted)
                     (drop or split at                (open rows buffer)
                      image boundaries)

The packer keeps up to `max_buffer_size` open rows. A sample goes to the open row where it
fits under both budgets and leaves the least free token space; a row is emitted as soon as it
is full (free tokens <= `full_row_slack_tokens`); when a sample fits nowhere and the buffer is
full, the fullest row is emitted first. Samples are never split unless
`split_at_image_boundary`; a sample over a budget that cannot be split is reported to the
caller (who counts it as skipped), never dropped silently.
With `balance_flops` a row also has a FLOPs budget, and "room" and "fullest"
mean both budgets (data.balance), so every rank's rows cost about the same; the order in
which finished rows leave the stream is data.balance.SyncedRelease's, not the packer's.

Image-span ids come from RunFacts (the tokenizer's), not from PackingConfig.
What this module does not do: tensors for the model (data.collate), choosing samples
(data.mixing). Open rows are saved as `PieceRef`s (dataset, record, epoch, slice), never as
pixels; `load_state_dict` re-loads them through a callback.

Shapes: L = tokens of a sample, T = tiles of a sample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from vlpretrain.data.balance import RowBalance
from vlpretrain.data.samples import TokenizedSample
from vlpretrain.facts import RunFacts

logger = logging.getLogger(__name__)

LossReduction = Literal["token", "sample", "square"]
PACKER_STATE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class PackingConfig:
    """Budgets and behaviour of the packer and of the collate step."""

    max_packed_tokens: int = 16384
    """Token budget of one row (reference `max_packed_tokens`)."""
    num_images_expected: int = 48
    """Tile budget of one row (reference `num_images_expected`)."""
    max_buffer_size: int = 20
    """Open rows kept while looking for a best fit."""
    strict_mode: bool = False
    """Pad every row to max_packed_tokens tokens and num_images_expected tiles (flag 0)."""
    allow_overflow: bool = False
    """With split_at_image_boundary only: a sample that fits no open row when the buffer is full
    first tops up the fullest row with its head (cut at an image boundary); the tail goes on."""
    split_at_image_boundary: bool = False
    """Split samples over a budget at image-span boundaries instead of dropping them."""
    loss_reduction: LossReduction = "token"
    """Per-token loss weight: token 1, sample 1/n, square 1/sqrt(n), n = supervised tokens."""
    rows_per_batch: int = 1
    """Rows per micro-batch (reference per_device_train_batch_size)."""
    full_row_slack_tokens: int = 32
    """A row with at most this many free tokens is full and is emitted at once."""
    balance_flops: bool = False
    """Also cap each row's model FLOPs (ViT + LLM with per-sample attention) at a token-full
    row's mean cost, so every data-parallel rank's step costs about the same (data.balance;
    figures in bench/balance.py)."""
    balance_queue_rows: int = 8
    """With balance_flops: finished rows each stream holds back so that at every step all
    ranks release the row of the same cost rank among their own (data.balance); costs Q rows
    of memory per stream. 0: rows go out in packing order."""

    def __post_init__(self) -> None:
        positive = ("max_packed_tokens", "num_images_expected", "max_buffer_size")
        for name in (*positive, "rows_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"PackingConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.balance_queue_rows < 0:
            raise ValueError(
                f"PackingConfig.balance_queue_rows must be >= 0, got {self.balance_queue_rows}"
            )
        if self.loss_reduction not in ("token", "sample", "square"):
            raise ValueError(
                f"PackingConfig.loss_reduction must be 'token', 'sample' or 'square', "
                f"got {self.loss_reduction!r}"
            )
        if self.allow_overflow and not self.split_at_image_boundary:
            raise ValueError(
                "PackingConfig.allow_overflow only has a meaning with split_at_image_boundary "
                "(overflowing a row means splitting the sample); set both or neither"
            )


@dataclass(frozen=True)
class PieceRef:
    """Identity of a packed piece: a record of an epoch, possibly a slice of it."""

    dataset_index: int
    record_index: int
    epoch: int
    token_start: int
    token_end: int
    tile_start: int
    tile_end: int

    def as_tuple(self) -> tuple[int, ...]:
        return (
            self.dataset_index,
            self.record_index,
            self.epoch,
            self.token_start,
            self.token_end,
            self.tile_start,
            self.tile_end,
        )

    @classmethod
    def from_tuple(cls, values: tuple[int, ...] | list[int]) -> PieceRef:
        return cls(*(int(v) for v in values))

    @classmethod
    def whole(cls, sample: TokenizedSample, record_index: int, epoch: int) -> PieceRef:
        return cls(
            sample.dataset_index, record_index, epoch, 0, sample.num_tokens, 0, sample.num_tiles
        )


@dataclass(eq=False)
class PackItem:
    """A sample (or a slice of one) together with the reference that can re-create it."""

    ref: PieceRef
    sample: TokenizedSample
    cost: float = 0.0
    """Training FLOPs of the piece; set by the packer only when balancing (data.balance)."""


@dataclass(eq=False)
class PackRow:
    """One row under construction or emitted: samples in order."""

    items: list[PackItem] = field(default_factory=list)
    num_tokens: int = 0
    num_tiles: int = 0
    cost: float = 0.0

    def append(self, item: PackItem) -> None:
        self.items.append(item)
        self.num_tokens += item.sample.num_tokens
        self.num_tiles += item.sample.num_tiles
        self.cost += item.cost


@dataclass(frozen=True)
class ImageSpan:
    start: int
    end: int
    """Exclusive: one past `</img>`."""
    num_tiles: int


def image_spans(sample: TokenizedSample, start_id: int, end_id: int) -> list[ImageSpan]:
    """`<img> ... </img>` spans of a sample with the tile count of each image."""
    starts = [int(i) for i in (sample.input_ids == start_id).nonzero()[0]]
    ends = [int(i) for i in (sample.input_ids == end_id).nonzero()[0]]
    tiles = sample.num_tiles_per_image
    if not len(starts) == len(ends) == len(tiles) or any(
        e <= s for s, e in zip(starts, ends, strict=True)
    ):
        raise ValueError(
            f"{sample.source}: {len(starts)} <img>, {len(ends)} </img> and {len(tiles)} images"
            " do not pair up; cannot split at image boundaries"
        )
    return [ImageSpan(s, e + 1, t) for s, e, t in zip(starts, ends, tiles, strict=True)]


def slice_sample(sample: TokenizedSample, ref: PieceRef) -> TokenizedSample:
    """The piece of a whole sample that `ref` names (the sample itself for a whole ref)."""
    return _slice(sample, ref.token_start, ref.token_end, ref.tile_start, ref.tile_end)


def _slice(
    sample: TokenizedSample, token_start: int, token_end: int, tile_start: int, tile_end: int
) -> TokenizedSample:
    if token_start == 0 and token_end == sample.num_tokens:
        return sample
    tiles_per_image: list[int] = []
    offset = 0
    for num_tiles in sample.num_tiles_per_image:
        if tile_start <= offset and offset + num_tiles <= tile_end:
            tiles_per_image.append(num_tiles)
        offset += num_tiles
    return replace(
        sample,
        input_ids=sample.input_ids[token_start:token_end],
        labels=sample.labels[token_start:token_end],
        pixel_values=sample.pixel_values[tile_start:tile_end],
        num_tiles_per_image=tuple(tiles_per_image),
    )


def _head_cut(
    spans: list[ImageSpan], num_tokens: int, max_tokens: int, max_tiles: int
) -> int | None:
    """Largest cut (tokens in the head) that keeps image spans whole and fits both budgets."""
    cut = min(num_tokens, max_tokens)
    while cut > 0:
        inside = [s for s in spans if s.start < cut < s.end]
        if inside:
            cut = inside[0].start
            continue
        complete = [s for s in spans if s.end <= cut]
        if sum(s.num_tiles for s in complete) <= max_tiles:
            return cut
        cut = complete[-1].start
    return None


def _split_item(item: PackItem, cut: int, facts: RunFacts) -> tuple[PackItem, PackItem]:
    """Split a piece after `cut` tokens (an image boundary) into head and tail pieces."""
    sample, ref = item.sample, item.ref
    spans = _spans_of(sample, facts)
    head_tiles = sum(s.num_tiles for s in spans if s.end <= cut)
    head = _slice(sample, 0, cut, 0, head_tiles)
    tail = _slice(sample, cut, sample.num_tokens, head_tiles, sample.num_tiles)
    head_ref = replace(ref, token_end=ref.token_start + cut, tile_end=ref.tile_start + head_tiles)
    tail_ref = replace(
        ref, token_start=ref.token_start + cut, tile_start=ref.tile_start + head_tiles
    )
    return PackItem(head_ref, head), PackItem(tail_ref, tail)


def _spans_of(sample: TokenizedSample, facts: RunFacts) -> list[ImageSpan]:
    return image_spans(sample, facts.img_start_token_id, facts.img_end_token_id)


def _fits(sample: TokenizedSample, max_tokens: int, max_tiles: int) -> bool:
    return sample.num_tokens <= max_tokens and sample.num_tiles <= max_tiles


def fit_to_budget(item: PackItem, config: PackingConfig, facts: RunFacts) -> list[PackItem] | None:
    """The pieces to pack for one sample, or None if it exceeds a budget and cannot be split.

    Without split_at_image_boundary a sample over a budget is returned as None. With it, the
    sample is cut at image-span boundaries into consecutive pieces that fit; every piece is
    kept (one without supervised tokens gets loss weight 0), so nothing disappears unseen.
    """
    budget = (config.max_packed_tokens, config.num_images_expected)
    if _fits(item.sample, *budget):
        return [item]
    if not config.split_at_image_boundary:
        return None
    pieces: list[PackItem] = []
    rest = item
    while not _fits(rest.sample, *budget):
        cut = _head_cut(_spans_of(rest.sample, facts), rest.sample.num_tokens, *budget)
        if cut is None:
            return None
        head, rest = _split_item(rest, cut, facts)
        pieces.append(head)
    pieces.append(rest)
    return pieces


class BestFitPacker:
    """Best-fit packing of pieces into open rows; emits full rows. Stateful (by reference).

    With a `RowBalance` a row is measured by the tighter of its token and FLOPs budgets.
    """

    def __init__(
        self, config: PackingConfig, facts: RunFacts, balance: RowBalance | None = None
    ) -> None:
        if config.balance_flops and balance is None:
            raise ValueError("PackingConfig.balance_flops is on: BestFitPacker needs a RowBalance")
        self.config = config
        self.facts = facts
        self.balance = balance if config.balance_flops else None
        self._rows: list[PackRow] = []
        self.num_rows_emitted = 0
        self.num_tokens_emitted = 0

    @property
    def open_rows(self) -> list[PackRow]:
        return list(self._rows)

    def fill_ratio(self) -> float:
        """Real tokens over the token capacity of every row emitted so far."""
        capacity = self.num_rows_emitted * self.config.max_packed_tokens
        return self.num_tokens_emitted / capacity if capacity else 0.0

    def add(self, item: PackItem) -> list[PackRow]:
        """Place one piece (already within budget, see fit_to_budget); returns emitted rows."""
        config = self.config
        if not _fits(item.sample, config.max_packed_tokens, config.num_images_expected):
            raise ValueError(
                f"{item.sample.source}: {item.sample.num_tokens} tokens / {item.sample.num_tiles}"
                " tiles exceed the row budget; call fit_to_budget first"
            )
        emitted: list[PackRow] = []
        pending = [item]
        piece: PackItem | None  # None once _top_up has placed all of it
        while pending:
            piece = pending.pop(0)
            self._price(piece)
            row = self._best_fit(piece)
            if row is None and len(self._rows) >= config.max_buffer_size:
                fullest = self._fullest()
                if config.allow_overflow:
                    piece = self._top_up(fullest, piece, pending)
                emitted.append(self._emit(fullest))
                if piece is None:
                    continue
            if row is None:
                row = PackRow()
                self._rows.append(row)
            self._append(row, piece)
            if self._is_full(row):
                emitted.append(self._emit(row))
        return emitted

    def flush(self) -> list[PackRow]:
        """Emit every open row (end of a finite stream)."""
        rows = list(self._rows)
        for row in rows:
            self._emit(row)
        return rows

    def _price(self, item: PackItem) -> None:
        if self.balance is not None:
            item.cost = self.balance.price(item.sample)

    def _append(self, row: PackRow, item: PackItem) -> None:
        row.append(item)
        if self.balance is not None:
            self.balance.observe(item.sample.num_tokens, item.cost)

    def _best_fit(self, item: PackItem) -> PackRow | None:
        config = self.config
        if self.balance is not None:
            return self._best_balanced_fit(item, self.balance)
        best: PackRow | None = None
        best_free = config.max_packed_tokens + 1
        for row in self._rows:
            free = config.max_packed_tokens - row.num_tokens - item.sample.num_tokens
            tiles_ok = row.num_tiles + item.sample.num_tiles <= config.num_images_expected
            if 0 <= free < best_free and tiles_ok:
                best, best_free = row, free
        return best

    def _best_balanced_fit(self, item: PackItem, balance: RowBalance) -> PackRow | None:
        """The row that `item` leaves closest to full in both tokens and FLOPs."""
        config = self.config
        best: PackRow | None = None
        best_distance = math.inf
        for row in self._rows:
            tiles_ok = row.num_tiles + item.sample.num_tiles <= config.num_images_expected
            distance = balance.distance_to_full(
                row.num_tokens + item.sample.num_tokens, row.cost + item.cost
            )
            if distance < best_distance and tiles_ok:
                best, best_distance = row, distance
        return best

    def _fullest(self) -> PackRow:
        if self.balance is not None:
            balance = self.balance
            return min(self._rows, key=lambda row: balance.free_fraction(row.num_tokens, row.cost))
        return max(self._rows, key=lambda row: row.num_tokens)

    def _is_full(self, row: PackRow) -> bool:
        if self.balance is not None:
            return self.balance.is_full(row.num_tokens, row.cost)
        return self.config.max_packed_tokens - row.num_tokens <= self.config.full_row_slack_tokens

    def _top_up(self, row: PackRow, item: PackItem, pending: list[PackItem]) -> PackItem | None:
        """Put the head of `item` into `row`; returns the piece still to place (tail or all)."""
        config = self.config
        free_tokens = config.max_packed_tokens - row.num_tokens
        free_tiles = config.num_images_expected - row.num_tiles
        cut = _head_cut(
            _spans_of(item.sample, self.facts), item.sample.num_tokens, free_tokens, free_tiles
        )
        if cut is None or cut >= item.sample.num_tokens:
            return item
        head, tail = _split_item(item, cut, self.facts)
        self._price(head)
        self._append(row, head)
        pending.insert(0, tail)
        return None

    def _emit(self, row: PackRow) -> PackRow:
        self._rows.remove(row)
        self.num_rows_emitted += 1
        self.num_tokens_emitted += row.num_tokens
        return row

    def state_dict(self) -> dict[str, Any]:
        """Open rows as piece references plus counters; no pixel data."""
        state: dict[str, Any] = {
            "version": PACKER_STATE_VERSION,
            "rows": [[item.ref.as_tuple() for item in row.items] for row in self._rows],
            "num_rows_emitted": self.num_rows_emitted,
            "num_tokens_emitted": self.num_tokens_emitted,
        }
        if self.balance is not None:
            state["balance"] = self.balance.state_dict()
        return state

    def load_state_dict(
        self, state: dict[str, Any], load_piece: Callable[[PieceRef], TokenizedSample | None]
    ) -> None:
        """Rebuild the open rows by re-loading their pieces through `load_piece` (a piece it
        returns None for is left out, and a row left empty is dropped)."""
        if state.get("version") != PACKER_STATE_VERSION:
            raise ValueError(
                f"packer state version {state.get('version')!r} is not {PACKER_STATE_VERSION}"
            )
        if ("balance" in state) != (self.balance is not None):
            raise ValueError(
                "packer state was saved with packing.balance_flops="
                f"{'balance' in state} but this run has {self.balance is not None}; the open "
                "rows would be packed differently (set it as the checkpointed run did)"
            )
        rows = [rows_from_refs(refs, load_piece) for refs in state["rows"]]
        self._rows = [row for row in rows if row.items]
        self.num_rows_emitted = int(state["num_rows_emitted"])
        self.num_tokens_emitted = int(state["num_tokens_emitted"])
        if self.balance is not None:
            self.balance.load_state_dict(state["balance"])
            for row in self._rows:
                self._reprice(row)

    def start_from(
        self, num_rows_emitted: int, num_tokens_emitted: int, balance: tuple[int, float] | None
    ) -> None:
        """Counters and running FLOPs sums handed over from a job of another shape
        (data.elastic); the open rows are then filled through `add`."""
        if (balance is not None) != (self.balance is not None):
            raise ValueError(
                f"the saved streams ran with packing.balance_flops={balance is not None} but "
                f"this run has {self.balance is not None} (set it as the checkpointed run did)"
            )
        self.num_rows_emitted = num_rows_emitted
        self.num_tokens_emitted = num_tokens_emitted
        if self.balance is not None and balance is not None:
            self.balance.set_totals(*balance)

    def restore_rows(
        self, rows: list[list[Any]], load_piece: Callable[[PieceRef], TokenizedSample | None]
    ) -> list[PackRow]:
        """Finished rows re-created from saved piece references, priced as when packed (one
        per saved row, also when `load_piece` left all its pieces out)."""
        restored = [rows_from_refs(refs, load_piece) for refs in rows]
        for row in restored:
            self._reprice(row)
        return restored

    def _reprice(self, row: PackRow) -> None:
        """Re-create the costs of a restored row (summed in the same order as when packed)."""
        items, row.items, row.num_tokens, row.num_tiles, row.cost = row.items, [], 0, 0, 0.0
        for item in items:
            self._price(item)
            row.append(item)


def rows_from_refs(
    refs: list[tuple[int, ...]], load_piece: Callable[[PieceRef], TokenizedSample | None]
) -> PackRow:
    """One row re-created from saved piece references; a piece `load_piece` returns None for
    (a record that no longer loads, skipped by data.on_changed_media) is left out."""
    row = PackRow()
    for values in refs:
        ref = PieceRef.from_tuple(values)
        sample = load_piece(ref)
        if sample is not None:
            row.append(PackItem(ref, sample))
    return row
