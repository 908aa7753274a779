"""Non-finite guards: a step with a NaN/inf loss or gradient norm is not applied, too many in
a row stop the run, and weights holding NaN/inf are never exported.

    train_step --global_loss_and_finiteness (one all-reduce: every rank decides alike)-->
      finite: optimizer.step()   not finite: no update (weights and moments stay)
    loop --guard_nonfinite--> count, warn with the step's data (file:line), stop after
      train.max_nonfinite_steps in a row
    export --refuse_nonfinite_weights--> NonFiniteError, the stage is not marked complete
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlpretrain.distributed.env import all_gather_objects, all_reduce_sum
from vlpretrain.errors import RefusedError
from vlpretrain.train.checkpoint.states import TrainState

logger = logging.getLogger(__name__)


class NonFiniteError(RefusedError, RuntimeError):
    """Training produced (or would export) non-finite values; the message says where."""


def global_loss_and_finiteness(
    loss_sum: torch.Tensor,
    grad_norm: float,
    weight_sum: float,
    extra_sums: torch.Tensor | None = None,
) -> tuple[float, bool, list[float]]:
    """The step loss over all ranks, whether every rank's loss and gradient norm are finite,
    and `extra_sums` (float64 vector, e.g. per-dataset sums) summed over ranks: one
    all-reduce, so all ranks take the same decision."""
    flag = torch.tensor(float(not math.isfinite(grad_norm)), dtype=torch.float64)
    parts = [loss_sum.double().reshape(1), flag.reshape(1)]
    if extra_sums is not None:
        parts.append(extra_sums.double().reshape(-1))
    total_loss_sum, num_nonfinite, *extra = all_reduce_sum(torch.cat(parts)).tolist()
    finite = math.isfinite(total_loss_sum) and num_nonfinite == 0
    return (total_loss_sum / weight_sum if weight_sum > 0 else float("nan")), finite, extra


def batch_sources(batches: list[Any], sources: list[Any], seed: int, limit: int = 8) -> str:
    """file:line of the first samples of a step's micro-batches (for a warning)."""
    by_index = {source.dataset_index: source for source in sources}
    refs = [ref for batch in batches for ref in batch.sample_ids]
    described = []
    for ref in refs[:limit]:
        source = by_index[ref.dataset_index]
        line = source.line_of(ref.record_index, ref.epoch, seed)
        described.append(str(source.source_of(line)))
    more = f" and {len(refs) - limit} more" if len(refs) > limit else ""
    return ", ".join(described) + more


def guard_nonfinite(
    state: TrainState,
    applied: bool,
    loss: float,
    grad_norm: float,
    describe_data: Callable[[], str],
    max_steps: int,
) -> None:
    """Count a step that was not applied; stop after `max_steps` consecutive ones."""
    if applied:
        state.consecutive_nonfinite_steps = 0
        return
    state.nonfinite_steps += 1
    state.consecutive_nonfinite_steps += 1
    logger.warning(
        "step %d not applied: loss %s, gradient norm %s (non-finite on some rank; %d in a row, "
        "%d in total); this rank's data: %s",
        state.step, loss, grad_norm, state.consecutive_nonfinite_steps,
        state.nonfinite_steps, describe_data(),
    )  # fmt: skip
    if state.consecutive_nonfinite_steps >= max_steps:
        raise NonFiniteError(
            f"{state.consecutive_nonfinite_steps} consecutive steps (up to step {state.step}) had"
            " a non-finite loss or gradient norm (train.max_nonfinite_steps "
            f"{max_steps}); the weights are those of step "
            f"{state.step - state.consecutive_nonfinite_steps}. Check the data named in the "
            "warnings above, lower optim.learning_rate, or resume from an earlier checkpoint."
        )


def refuse_nonfinite_weights(state: dict[str, torch.Tensor], output_dir: str | Path) -> None:
    """Raise NonFiniteError on every rank if any rank's `state` holds a NaN or inf."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    found = [names for names in all_gather_objects(bad) if names]
    if found:
        raise NonFiniteError(
            f"refusing to export into {output_dir}: {len(found[0])} of {len(state) or 'the'} "
            f"tensors hold NaN or inf (first: {', '.join(found[0][:5])}); the stage is not "
            "marked complete. Resume from an earlier checkpoint (train.resume) instead."
        )
