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

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
)
from torch.nn.parallel import DistributedDataParallel

from vlpretrain.distributed.env import DistEnv
from vlpretrain.files import read_user_text
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
    meta_init: bool = True
    """FSDP2 with several ranks: rank 0 builds the model, the others get only their shards
    (distributed/meta_init.py); False builds the full model on every rank."""

    @classmethod
    def from_deepspeed(cls, path: str) -> DistConfig:
        """Map a reference DeepSpeed JSON onto our strategies.

        ZeRO-0 -> DDP; ZeRO-1/2 -> FSDP2 without resharding after forward; ZeRO-3 -> FSDP2
        full shard; offload_param / offload_optimizer -> CPU offload. The file need not exist:
        the stage is then read from its name (`zero_stage{N}...json`), as the reference
        scripts name them.

        Raises:
            ValueError: naming the file: unreadable, not a JSON object, or a ZeRO stage
                other than DEEPSPEED_ZERO_STAGES.
        """
        if Path(path).exists():
            zero = _zero_section(Path(path))
            stage = zero.get("stage", 0)
            offload = "offload_param" in zero or "offload_optimizer" in zero
        else:
            match = re.search(r"zero_stage(\d+)", Path(path).name)
            if match is None:
                raise ValueError(
                    f"{path}: file not found and its name does not say the ZeRO "
                    "stage (expected zero_stage{1,2,3}...json)"
                )
            stage = int(match.group(1))
            offload = "offload" in Path(path).name
        # bool is an int to Python, but "stage": true is no stage number
        if isinstance(stage, bool) or stage not in DEEPSPEED_ZERO_STAGES:
            accepted = ", ".join(map(str, DEEPSPEED_ZERO_STAGES[:-1]))
            raise ValueError(
                f"{path}: ZeRO stage {stage!r} is not supported; use {accepted} or "
                f"{DEEPSPEED_ZERO_STAGES[-1]} (zero_optimization.stage)"
            )
        if stage == 0:
            return cls(strategy="ddp")
        return cls(strategy="fsdp", reshard_after_forward=stage >= 3, cpu_offload=offload)


DEEPSPEED_ZERO_STAGES = (0, 1, 2, 3)
"""The ZeRO stages DeepSpeed has, each mapped onto DDP or FSDP2 by DistConfig.from_deepspeed."""


def _zero_section(path: Path) -> dict[str, Any]:
    """The zero_optimization object of a DeepSpeed JSON ({} when absent); ValueError otherwise."""
    text = read_user_text(path, "the DeepSpeed JSON file")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON (line {error.lineno} column {error.colno}): {error.msg}"
        ) from None
    except RecursionError:
        raise ValueError(f"{path} nests JSON arrays or objects too deeply to read") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{path} must hold a JSON object (a DeepSpeed config), got a {_json_kind(config)}"
        )
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f'{path}: "zero_optimization" must be an object, got a {_json_kind(zero)}')
    return zero


def _json_kind(value: Any) -> str:
    """JSON's name for the type of a parsed value."""
    kinds = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def enable_activation_checkpointing(model: InternVLModel, vision: bool, llm: bool) -> None:
    """Recompute each ViT layer (`vision`) and each LLM decoder layer (`llm`) in backward.

    Uses torch's composable `checkpoint`, which hooks the layer in place: parameter names stay
    the same (DCP, FSDP2, LoRA and the export see no wrapper) and, unlike transformers' flag,
    it does not depend on `module.training`. That matters in stages 1 and 1.5: frozen parts
    stay in eval() (no dropout / drop-path) while backward still runs through them to reach
    the projector or the ViT, so they hold activations unless checkpointed too.
    Call before `parallelize` (FSDP2 then shards the hooked layers).
    """
    layers: list[nn.Module] = []
    if vision:
        layers += list(model.vision_layers())
    if llm:
        layers += _decoder_layers(model)
    for layer in layers:
        checkpoint(layer)


def _decoder_layers(model: InternVLModel) -> list[nn.Module]:
    decoder = model.language_model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError("FSDP: the LLM decoder has no `layers` list to shard per block")
    return list(layers)


def uses_meta_init(config: DistConfig, env: DistEnv, uses_lora: bool) -> bool:
    """Whether the model is built once on rank 0 and sharded from the meta device."""
    return config.strategy == "fsdp" and config.meta_init and env.world_size > 1 and not uses_lora


def parallelize(
    model: InternVLModel, config: DistConfig, env: DistEnv, precision: str = "fp32"
) -> nn.Module:
    """Wrap or shard `model` (on `env.device`, or on meta for FSDP2) for `env.world_size` ranks.

    FSDP2 with bf16 precision gathers bf16 parameters and reduces gradients in fp32
    (MixedPrecisionPolicy): half the all-gather traffic, and no per-micro-batch recast of
    fp32 weights by autocast; the sharded master weights and optimizer state stay fp32.
    """
    if config.strategy == "fsdp":
        kwargs: dict[str, Any] = {"reshard_after_forward": config.reshard_after_forward}
        if config.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        if precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32
            )
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
