"""Build the model once, on rank 0, and give every other rank only its FSDP2 shard.

    rank 0: build_model (real weights, full fp32) --state_dict + buffers--> kept for loading
            meta copy of the built model ------------broadcast_object_list---------> ranks 1..N
    every rank: freeze policy, checkpoint hooks, fully_shard on the meta model
            --to_empty(device)--> set_model_state_dict(broadcast_from_rank0) --> own shard only

So ranks 1..N never hold the full model (host RAM ~1/world of it plus a constant) and never
read the weight files; rank 0 holds it once, while loading. Non-persistent buffers (rotary
`inv_freq`) are not in a state dict: they travel with the meta copy's broadcast as values.
What it does not do: LoRA (the adapters are created after the build, so their fresh weights
would not come from rank 0); runs with LoRA build the full model on every rank.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from vlpretrain.distributed.env import DistEnv
from vlpretrain.model.build import BuiltModel

logger = logging.getLogger(__name__)


@dataclass
class RankZeroWeights:
    """What rank 0 loaded: the full state dict (empty on other ranks) and every buffer."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of `model` whose parameters and buffers live on the meta device."""
    memo: dict[int, object] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(
            torch.empty_like(parameter, device="meta"), requires_grad=parameter.requires_grad
        )
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def build_from_rank0(
    build: Callable[[], BuiltModel], env: DistEnv
) -> tuple[BuiltModel, RankZeroWeights]:
    """Rank 0 builds; every rank returns the same model on the meta device (and rank 0 the
    weights to load into it after sharding)."""
    weights = RankZeroWeights()
    payload: list[object] = [None]
    if env.is_main:
        built = build()
        weights.state = dict(built.model.state_dict())
        buffers = {name: b.detach().clone() for name, b in built.model.named_buffers()}
        # The RNG state after building (fresh projector init) too: every rank then continues
        # from the same state, as when each rank builds the model itself.
        payload = [(meta_copy(built.model), built.tokenizer, built.path, buffers,
                    torch.get_rng_state())]  # fmt: skip
        del built
    dist.broadcast_object_list(payload, src=0)
    received = payload[0]
    assert isinstance(received, tuple)  # what rank 0 sent
    model, tokenizer, path, weights.buffers, rng_state = received
    torch.set_rng_state(rng_state)
    logger.info("rank %d: model structure received on the meta device", env.rank)
    return BuiltModel(model=model, tokenizer=tokenizer, path=path), weights


def materialize(model: nn.Module, weights: RankZeroWeights, device: torch.device) -> None:
    """Allocate this rank's shards on `device` and fill them from rank 0's weights."""
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    state: dict[str, Any] = weights.state
    set_model_state_dict(model, state, options=options)
    weights.state.clear()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(weights.buffers[name])
    logger.info("rank %d: shards loaded from rank 0", dist.get_rank())
