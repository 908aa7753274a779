"""Give every data-parallel rank about the same work per step by capping each row's FLOPs.

Every rank runs the same number of packed rows per step and then waits for the slowest one
at the gradient reduction, so a step lasts as long as the costliest rank's rows. Packing to
a token budget alone makes rows equal in tokens, not in work: a row of long documents pays
attention quadratic in each sample's length, a row of many tiles pays a ViT pass per tile.
With balancing on, a row also has a FLOPs budget,

    budget = max_packed_tokens * (FLOPs / tokens of every piece this stream has packed so far)

i.e. the cost of a token-full row of average composition. A row is closed when either budget
is nearly reached; best fit and "emit the fullest row" use the tighter of the two fractions,
so cheap and costly samples end up mixed and rows stay close to token-full on average.
A piece that alone costs more than the budget (a very long document) still gets a row.

Costs come from the model's own FLOPs counter (`train.flops.FlopsCounter.step_flops`, handed
in as a callable because data/ does not import train/): ViT, projector, LLM with attention
per packed sample, and the LM head, forward plus the backward the freeze policy implies.
The running sums are part of the packer state, so a resumed stream is bit-identical.
`bench/balance.py` measures the effect (straggler ratio at 512 ranks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from vlpretrain.data.samples import TokenizedSample

StepFlops = Callable[[int, list[int], int], Mapping[str, float]]
"""(num_tiles, segment_lengths, num_supervised) -> FLOPs per model component."""

BALANCE_STATE_VERSION = 1


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

    def free_fraction(self, num_tokens: int, flops: float) -> float:
        """Room left in a row holding `num_tokens` / `flops`: the tighter of the two budgets."""
        token_room = (self.max_tokens - num_tokens) / self.max_tokens
        budget = self.budget
        if math.isinf(budget):
            return token_room
        return min(token_room, (budget - flops) / budget)

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


def straggler_ratio(per_rank_flops: list[float]) -> float:
    """Max over ranks / mean of per-rank step FLOPs (1.0: perfectly balanced)."""
    if not per_rank_flops:
        raise ValueError("straggler_ratio needs at least one rank")
    mean = sum(per_rank_flops) / len(per_rank_flops)
    return max(per_rank_flops) / mean if mean > 0 else 1.0
