"""Give every data-parallel rank about the same work per step: a FLOPs cap per packed row,
and a release order of finished rows that all ranks follow in step without communicating.

Every rank runs the same number of packed rows per step and then waits for the slowest one
at the gradient reduction, so a step lasts as long as the costliest rank's rows. Packing to
a token budget alone makes rows equal in tokens, not in work: a row of long documents pays
attention quadratic in each sample's length, a row of many tiles pays a ViT pass per tile.
With balancing on, a row also has a FLOPs budget,

    budget = max_packed_tokens * (FLOPs / tokens of every piece this stream has packed so far)

i.e. the cost of a token-full row of average composition. A row is closed when either budget
is nearly reached. Best fit puts a piece in the row it leaves closest to full in both budgets
(least sum of the squared free fractions of tokens and FLOPs): a text piece goes where the
images already filled the FLOPs share, an image piece where text filled the tokens, so rows
end near both budgets at once instead of token-full and cheap. "Emit the fullest row" uses
the tighter of the two fractions.
A piece that alone costs more than the budget (a very long document) still gets a row.

Costs come from the model's own FLOPs counter (`train.flops.FlopsCounter.step_flops`, handed
in as a callable because data/ does not import train/): ViT, projector, LLM with attention
per packed sample, and the LM head, forward plus the backward the freeze policy implies.
The running sums are part of the packer state, so a resumed stream is bit-identical.

The cap cannot lift a cheap row. Token-full rows of mostly text (or a long document with no
room left for images) cost less than the budget, and with one row per rank per step
(InternVL2.5-1B stage 2, GA 1, where the ViT is most of the cost) a step still waits for the
ranks that drew a row at the cap while others ran a cheap one. So each stream also holds
back `packing.balance_queue_rows` = Q finished rows and releases them in a rank-synchronised
order, with no communication:

    at release t (counted per stream, the same on every rank at a given step), among the
    Q + 1 candidate rows (the Q held + the newest) release the (t mod (Q + 1))-th cheapest

Every rank draws its rows from the same mixture, so the j-th cheapest of Q + 1 rows costs
about the same on every rank: the steps on which all ranks release a cheap row are cheap
steps for everybody instead of idle time for most. Every order position comes up once per
Q + 1 steps, so rows keep flowing; a row that has waited `max_wait` = 8 (Q + 1) releases
leaves first (rare: the forced release is the only unsynchronised one). Ties go to the
earlier row, costs are recomputed bit-identically on restore, and the held rows and the
release counter are part of the stream state, so a resumed stream is bit-identical. On a
resume on another shape the held rows are ready rows like any other: data.elastic returns
their pieces to the pool, and every new stream restarts the counter at 0 (still in step).
Q = 0 releases rows in packing order (as without balancing).

Cost: Q more packed rows in memory per stream (up to Q x 48 tiles x 2.4 MB of float32
pixels at 448 px: 0.9 GB at the default Q = 8, beside the packer's 20 open rows), the first
batch waits for Q + 1 rows instead of one, and a row trains up to 8 (Q + 1) steps after it
was packed. Steady-state throughput is unchanged (one row packed per row released).
`bench/balance.py` measures the effect: the job's straggler ratio at 512 simulated ranks
(sum over steps of the slowest rank's FLOPs / sum of the mean rank's), 1B stage 2: 1.079 for
the reference's packer, 1.053 with the cap, 1.046 with the cap and the release order at
Q = 8, and 1.046 at Q = 4 (`--queue-rows 4`): there the spread of the 512 streams' running
means, not Q, sets the floor (with the means settled over 20000 samples instead of 2000,
`--settled-samples 20000`: 1.039 with the cap, 1.034 with the release order). Over a longer
window (`--warmup-rows 40 --steps 45`) Q = 8 gives 1.050, and on seed 0 Q = 4 gives 1.052
against Q = 8's 1.049 (`--seeds 0 --queue-rows 4`): hence the default Q = 8.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from vlpretrain.data.samples import TokenizedSample

StepFlops = Callable[[int, list[int], int], Mapping[str, float]]
"""(num_tiles, segment_lengths, num_supervised) -> FLOPs per model component."""

BALANCE_STATE_VERSION = 1
RELEASE_STATE_VERSION = 1
MAX_WAIT_CYCLES = 8
"""A held row is released at the latest this many cycles of Q + 1 releases after it came."""


def sample_flops(step_flops: StepFlops, sample: TokenizedSample) -> float:
    """Training FLOPs of one (piece of a) sample packed as its own attention segment."""
    parts = step_flops(sample.num_tiles, [sample.num_tokens], sample.num_supervised)
    return float(sum(parts.values()))


class RowBalance:
    """The FLOPs side of a row's budget: prices pieces and tracks the running cost per token."""

    def __init__(self, step_flops: StepFlops, max_tokens: int, slack_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.step_flops = step_flops
        self.max_tokens = max_tokens
        self.slack_fraction = slack_tokens / max_tokens
        self.total_tokens = 0
        self.total_flops = 0.0
        self.budget = math.inf
        """FLOPs of a token-full row at the mean cost per token so far (inf before any piece)."""

    def price(self, sample: TokenizedSample) -> float:
        return sample_flops(self.step_flops, sample)

    def observe(self, num_tokens: int, flops: float) -> None:
        """Count a piece that was placed in a row (updates the budget)."""
        self.total_tokens += num_tokens
        self.total_flops += flops
        self._update_budget()

    def set_totals(self, num_tokens: int, flops: float) -> None:
        """Start from running sums handed over by other streams (data.elastic)."""
        self.total_tokens, self.total_flops = num_tokens, flops
        self._update_budget()

    def _update_budget(self) -> None:
        if self.total_tokens > 0 and self.total_flops > 0.0:
            self.budget = self.max_tokens * (self.total_flops / self.total_tokens)
        else:
            self.budget = math.inf

    def _rooms(self, num_tokens: int, flops: float) -> tuple[float, float | None]:
        """Free fractions of a row holding `num_tokens` / `flops`: of the token budget, and
        of the FLOPs budget (None before any piece has set one)."""
        token_room = (self.max_tokens - num_tokens) / self.max_tokens
        budget = self.budget
        return token_room, None if math.isinf(budget) else (budget - flops) / budget

    def free_fraction(self, num_tokens: int, flops: float) -> float:
        """Room left in a row holding `num_tokens` / `flops`: the tighter of the two budgets."""
        token_room, flops_room = self._rooms(num_tokens, flops)
        return token_room if flops_room is None else min(token_room, flops_room)

    def distance_to_full(self, num_tokens: int, flops: float) -> float:
        """How far a row holding `num_tokens` / `flops` is from full in both budgets: the sum
        of the squared free fractions (inf when over a budget)."""
        token_room, flops_room = self._rooms(num_tokens, flops)
        flops_room = 0.0 if flops_room is None else flops_room
        if token_room < 0.0 or flops_room < 0.0:
            return math.inf
        return token_room * token_room + flops_room * flops_room

    def is_full(self, num_tokens: int, flops: float) -> bool:
        return self.free_fraction(num_tokens, flops) <= self.slack_fraction

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": BALANCE_STATE_VERSION,
            "total_tokens": self.total_tokens,
            "total_flops": self.total_flops,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != BALANCE_STATE_VERSION:
            raise ValueError(
                f"row-balance state version {state.get('version')!r} is not {BALANCE_STATE_VERSION}"
            )
        self.total_tokens = int(state["total_tokens"])
        self.total_flops = float(state["total_flops"])
        self._update_budget()


def build_row_balance(
    enabled: bool, step_flops: StepFlops | None, max_tokens: int, slack_tokens: int
) -> RowBalance | None:
    """The balance for a packer, or None when `packing.balance_flops` is off."""
    if not enabled:
        return None
    if step_flops is None:
        raise ValueError(
            "packing.balance_flops is on but the data stream got no FLOPs counter; pass the "
            "model's FlopsCounter.step_flops to build_dataloader(step_flops=...)"
        )
    return RowBalance(step_flops, max_tokens, slack_tokens)


class Priced(Protocol):
    @property
    def cost(self) -> float: ...


RowT = TypeVar("RowT", bound=Priced)


class SyncedRelease(Generic[RowT]):
    """Finished rows of one stream, released in the rank-synchronised cost order above.

    Rows are kept in arrival order (the stream saves them as ready rows in that order);
    `arrived_at[i]` is the release count when row i came, for the wait bound.
    """

    def __init__(self, hold: int) -> None:
        if hold < 0:
            raise ValueError(f"hold must be >= 0, got {hold}")
        self.hold = hold
        self.max_wait = MAX_WAIT_CYCLES * (hold + 1)
        self.rows: list[RowT] = []
        self.arrived_at: list[int] = []
        self.num_released = 0

    def wants_more(self) -> bool:
        """Fewer than Q + 1 candidates: pack more before releasing."""
        return len(self.rows) <= self.hold

    def push(self, rows: list[RowT]) -> None:
        self.rows.extend(rows)
        self.arrived_at.extend([self.num_released] * len(rows))

    def next_row(self, produce: Callable[[], list[RowT] | None]) -> RowT | None:
        """Call `produce` (the rows one more sample finished; None when nothing is left to
        pack) until there are Q + 1 candidates, then release one; None when all are out."""
        while self.wants_more():
            rows = produce()
            if rows is None:
                break
            self.push(rows)
        return self.release() if self.rows else None

    def release(self) -> RowT:
        """The next row to train on (Q + 1 candidates, or fewer at the end of a stream)."""
        if not self.rows:
            raise IndexError("no row to release")
        index = self._choose()
        self.num_released += 1
        del self.arrived_at[index]
        return self.rows.pop(index)

    def _choose(self) -> int:
        if self.hold == 0 or self.num_released - self.arrived_at[0] >= self.max_wait:
            return 0  # packing order, or the oldest row has waited long enough
        position = self.num_released % (self.hold + 1)
        rows = self.rows
        by_cost = sorted(range(len(rows)), key=lambda i: (rows[i].cost, i))
        return by_cost[min(position, len(by_cost) - 1)]

    def state_dict(self) -> dict[str, Any]:
        """Counter and arrival times; the rows themselves are saved by the stream."""
        return {
            "version": RELEASE_STATE_VERSION,
            "num_released": self.num_released,
            "arrived_at": list(self.arrived_at),
        }

    def restore(self, rows: list[RowT], state: dict[str, Any] | None) -> None:
        """Rows saved in arrival order and their state (None: a state from before the
        synchronised release; rows count as just arrived)."""
        if state is None:
            state = {"version": RELEASE_STATE_VERSION, "num_released": 0, "arrived_at": None}
        if state.get("version") != RELEASE_STATE_VERSION:
            raise ValueError(
                f"row-release state version {state.get('version')!r} is not {RELEASE_STATE_VERSION}"
            )
        self.num_released = int(state["num_released"])
        arrived = state["arrived_at"]
        self.arrived_at = (
            [self.num_released] * len(rows) if arrived is None else [int(a) for a in arrived]
        )
        if len(self.arrived_at) != len(rows):
            raise ValueError(
                f"row-release state has {len(self.arrived_at)} arrival times for {len(rows)} "
                "ready rows"
            )
        self.rows = list(rows)


def straggler_ratio(per_rank_flops: list[float]) -> float:
    """Max over ranks / mean of per-rank step FLOPs (1.0: perfectly balanced)."""
    if not per_rank_flops:
        raise ValueError("straggler_ratio needs at least one rank")
    mean = sum(per_rank_flops) / len(per_rank_flops)
    return max(per_rank_flops) / mean if mean > 0 else 1.0


def job_straggler_ratio(steps: list[list[float]]) -> float:
    """Sum over steps of the slowest rank's FLOPs / sum of the mean rank's ([step][rank]):
    a job's wall time over its useful work, when every step waits for its slowest rank."""
    if not steps:
        raise ValueError("job_straggler_ratio needs at least one step")
    slowest = sum(max(ranks) for ranks in steps)
    mean = sum(sum(ranks) / len(ranks) for ranks in steps)
    return slowest / mean if mean > 0 else 1.0
