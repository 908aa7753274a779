"""Apply the distribution strategy to a built model: DDP or FSDP2, plus activation checkpointing.

The loop never branches on the wrapper: it calls `model(...)` and `unwrap(model)` for the
plain module. FSDP2 (`fully_shard`) shards the vision tower as one unit, the LLM per decoder
block, and the rest (embeddings, head, projector) at the root. DeepSpeed configs given by
reference users map onto this (see `DistConfig.from_deepspeed`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from vlpretrain.distributed.env import DistEnv
from vlpretrain.model.vlm import InternVLModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    """How the model is spread over ranks."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: replicated weights; fsdp: FSDP2 fully_shard (ZeRO-3 style)."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered weights after forward (ZeRO-3); False keeps them (ZeRO-2 like)."""
    cpu_offload: bool = False
    """FSDP2: keep sharded parameters and optimizer state on CPU."""

    @classmethod
    def from_deepspeed(cls, path: str) -> DistConfig:
        """Map a reference DeepSpeed JSON onto our strategies.

        ZeRO-1/2 -> FSDP2 without resharding after forward; ZeRO-3 -> FSDP2 full shard;
        offload_param / offload_optimizer -> CPU offload. The file need not exist: the stage
        is then read from its name (`zero_stage{N}...json`), as the reference scripts name them.
        """
        stage, offload = None, False
        if Path(path).exists():
            zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
            stage = int(zero.get("stage", 0))
            offload = "offload_param" in zero or "offload_optimizer" in zero
        else:
            match = re.search(r"zero_stage(\d)", Path(path).name)
            if match is None:
                raise ValueError(
                    f"--deepspeed {path}: file not found and its name does not say the ZeRO "
                    "stage (expected zero_stage{1,2,3}...json)"
                )
            stage = int(match.group(1))
            offload = "offload" in Path(path).name
        if stage == 0:
            return cls(strategy="ddp")
        return cls(strategy="fsdp", reshard_after_forward=stage >= 3, cpu_offload=offload)


def enable_activation_checkpointing(model: InternVLModel, vision: bool, llm: bool) -> None:
    if vision:
        model.vision_model.encoder.gradient_checkpointing = True
    if llm:
        model.language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )


def _decoder_layers(model: InternVLModel) -> list[nn.Module]:
    decoder = model.language_model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError("FSDP: the LLM decoder has no `layers` list to shard per block")
    return list(layers)


def parallelize(model: InternVLModel, config: DistConfig, env: DistEnv) -> nn.Module:
    """Wrap or shard `model` (already on `env.device`) for `env.world_size` ranks."""
    if config.strategy == "fsdp":
        kwargs: dict[str, Any] = {"reshard_after_forward": config.reshard_after_forward}
        if config.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        fully_shard(model.vision_model, **kwargs)
        for layer in _decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model
    if env.world_size == 1:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Context in which backward does (or, for all but the last micro-batch, does not)
    all-reduce gradients; the same call for DDP, FSDP2 and a plain module."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> InternVLModel:
    """The InternVLModel behind a DDP wrapper (FSDP2 shards in place, nothing to unwrap)."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return cast(InternVLModel, inner)  # `model` comes from parallelize(InternVLModel)
