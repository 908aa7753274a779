"""Weighted cross-entropy from hidden states, in chunks, without the full logits tensor.

A 151k vocabulary at 16k tokens would need ~10 GB of fp32 logits; here only the positions
that are supervised are projected, `chunk_size` rows at a time, and each chunk's logits are
recomputed in backward (activation checkpointing) instead of being kept. The per-token
weights themselves come with the batch (data.collate.len2weight).

Shape legend: T supervised positions, D hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_loss(
    hidden_TD: torch.Tensor, head: nn.Module, targets_T: torch.Tensor, weights_T: torch.Tensor
) -> torch.Tensor:
    logits_TV = head(hidden_TD).float()
    losses_T = F.cross_entropy(logits_TV, targets_T, reduction="none")
    return (losses_T * weights_T).sum()


def weighted_cross_entropy_sum(
    hidden_TD: torch.Tensor,
    head: nn.Module,
    targets_T: torch.Tensor,
    weights_T: torch.Tensor,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Sum over positions of weight * cross-entropy(head(hidden), target), chunk by chunk."""
    total = hidden_TD.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden_TD.shape[0], chunk_size):
        end = start + chunk_size
        args = (hidden_TD[start:end], head, targets_T[start:end], weights_T[start:end])
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            total = total + _chunk_loss(*args)
    return total
