"""The stateful parts of a training run, each with state_dict() / load_state_dict().

store.py saves and restores them (in its STATE_LAYOUT order); this module only says
what each part's state is. TrainState is the progress that is not a tensor.

A per-rank part that can resume on another world size (or, for the loader, another worker
count) is `Reshardable`: it gets the states of every saved rank and takes its own share.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None: ...


class Reshardable(Protocol):
    """A per-rank state that a job of another shape can resume from."""

    def needs_all_ranks(self, state_dict: dict[str, Any], /) -> bool:
        """Whether this rank's saved state alone cannot restore it (besides a world-size
        change, which always needs every rank's)."""
        ...

    def load_resharded_state_dict(
        self, saved: Sequence[dict[str, Any]], rank: int, world_size: int, /
    ) -> None:
        """Restore rank `rank` of `world_size` from the state of every saved rank (in rank
        order)."""
        ...


@dataclass
class TrainState:
    """Everything about progress that is not a tensor of the model or optimizer."""

    step: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped samples so far by 'dataset/reason'."""
    records_seen: int = 0
    """Samples plus skips: the denominator of the skip fraction."""
    nonfinite_steps: int = 0
    """Steps not applied because their loss or gradient norm was not finite."""
    consecutive_nonfinite_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        if set(state_dict) != names:
            raise ValueError(
                f"train state has fields {sorted(state_dict)}, expected {sorted(names)}"
            )
        for name in names:
            setattr(self, name, state_dict[name])

    def needs_all_ranks(self, state_dict: dict[str, Any]) -> bool:
        return False

    def load_resharded_state_dict(
        self, saved: Sequence[dict[str, Any]], rank: int, world_size: int
    ) -> None:
        """Global fields (step, non-finite counts) from rank 0, which every saved rank agrees
        on; the counters of saved rank r go to rank r % world_size, so their sums over ranks
        (what the skip policy and the logs use) are kept."""
        for state in saved:
            differing = [n for n in state if n not in RANK_COUNTERS and state[n] != saved[0][n]]
            if differing:
                raise ValueError(f"saved ranks disagree on the train state's {differing}")
        self.load_state_dict(dict(saved[0]))
        mine = [state for old_rank, state in enumerate(saved) if old_rank % world_size == rank]
        self.tokens_seen = sum(int(s["tokens_seen"]) for s in mine)
        self.samples_seen = sum(int(s["samples_seen"]) for s in mine)
        self.records_seen = sum(int(s["records_seen"]) for s in mine)
        self.skipped = {}
        for state in mine:
            for reason, count in state["skipped"].items():
                self.skipped[reason] = self.skipped.get(reason, 0) + int(count)


RANK_COUNTERS = ("tokens_seen", "samples_seen", "skipped", "records_seen")
"""TrainState fields counted per rank (the others are the same on every rank)."""


class ModelState:
    """The model's (possibly sharded) weights as a Stateful."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState:
    """The optimizer's moments and step counts, keyed by parameter name (DCP layout)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class LoaderState:
    """The data loader and its one iterator; restoring the state re-creates the iterator."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._iterator: Iterator[Any] | None = None

    @property
    def iterator(self) -> Iterator[Any]:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        return self._iterator

    def state_dict(self) -> dict[str, Any]:
        return dict(self.loader.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loader.load_state_dict(state_dict)
        self._iterator = iter(self.loader)  # draws from the torch RNG: restored after this

    def needs_all_ranks(self, state_dict: dict[str, Any]) -> bool:
        """A changed worker count (data.loader: each (rank, worker) owns a share)."""
        shape_changed = getattr(self.loader, "shape_changed", None)
        return shape_changed is not None and bool(shape_changed(state_dict))

    def load_resharded_state_dict(
        self, saved: Sequence[dict[str, Any]], rank: int, world_size: int
    ) -> None:
        """Every saved rank's loader state: this rank's streams continue the job's epoch
        (data.elastic); the loader knows its own rank and world size."""
        self.loader.load_resharded_state_dict(saved)
        self._iterator = iter(self.loader)


class RNGState:
    """The torch generators this process draws from (CPU, and the current CUDA device)."""

    def state_dict(self) -> dict[str, Any]:
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state()
        return states

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["cpu"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])


def training_states(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: Any,
    state: TrainState,
) -> dict[str, Stateful]:
    """The `states` mapping of a training run, named as STATE_LAYOUT names them."""
    return {
        "model": ModelState(model),
        "optimizer": OptimizerState(model, optimizer),
        "scheduler": scheduler,
        "train_state": state,
        "loader": LoaderState(loader),
        "rng": RNGState(),
    }
