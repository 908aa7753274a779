"""Weighted cross-entropy from hidden states, in chunks, without the full logits tensor.

A 151k vocabulary at 16k tokens would need ~10 GB of fp32 logits; here only the positions
that are supervised are projected, `chunk_size` rows at a time, and each chunk's logits are
recomputed in backward (activation checkpointing) instead of being kept. The per-token
weights themselves come with the batch (data.collate.len2weight). The same per-position
losses can also be summed per group (the dataset of each position's sample), for reporting.

Shape legend: T supervised positions, D hidden size, V vocabulary, G groups.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_loss(
    hidden_TD: torch.Tensor,
    head: nn.Module,
    targets_T: torch.Tensor,
    weights_T: torch.Tensor,
    groups_T: torch.Tensor | None = None,
    num_groups: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    logits_TV = head(hidden_TD).float()
    losses_T = F.cross_entropy(logits_TV, targets_T, reduction="none")
    weighted_T = losses_T * weights_T
    if groups_T is None:
        return weighted_T.sum()
    # Detached: the per-group sums are reported, never differentiated.
    groups_G = weighted_T.new_zeros(num_groups).index_add_(0, groups_T, weighted_T.detach())
    return weighted_T.sum(), groups_G


def weighted_cross_entropy_sum(
    hidden_TD: torch.Tensor,
    head: nn.Module,
    targets_T: torch.Tensor,
    weights_T: torch.Tensor,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Sum over positions of weight * cross-entropy(head(hidden), target), chunk by chunk."""
    total, _ = weighted_cross_entropy_sums(
        hidden_TD, head, targets_T, weights_T, None, 0, chunk_size
    )
    return total


def weighted_cross_entropy_sums(
    hidden_TD: torch.Tensor,
    head: nn.Module,
    targets_T: torch.Tensor,
    weights_T: torch.Tensor,
    groups_T: torch.Tensor | None,
    num_groups: int,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weighted cross-entropy sum, and (with `groups_T`, each position's group in
    [0, num_groups)) its detached share per group, from the same per-position losses.

    The total is summed exactly as without groups, so it does not change by a bit."""
    total = hidden_TD.new_zeros((), dtype=torch.float32)
    groups_G = None if groups_T is None else total.new_zeros(num_groups)
    for start in range(0, hidden_TD.shape[0], chunk_size):
        end = start + chunk_size
        args: tuple[Any, ...] = (hidden_TD[start:end], head, targets_T[start:end],
                                 weights_T[start:end])  # fmt: skip
        if groups_T is not None:
            args = (*args, groups_T[start:end], num_groups)
        if torch.is_grad_enabled():
            out = checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            out = _chunk_loss(*args)
        if isinstance(out, tuple):
            chunk_total, chunk_groups_G = out
            total = total + chunk_total
            assert groups_G is not None  # groups were given
            groups_G = groups_G + chunk_groups_G
        else:
            total = total + out
    return total, groups_G
