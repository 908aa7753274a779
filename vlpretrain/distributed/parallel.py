"""Apply the distribution strategy to a built model: DDP or FSDP2, plus activation checkpointing.

The loop never branches on the wrapper: it calls `model(...)` and `unwrap(model)` for the
plain module. FSDP2 (`fully_shard`) shards each ViT layer, then the rest of the vision tower
(patch and position embeddings), each LLM decoder block, and the rest (embeddings, head,
projector) at the root, with forward prefetch, so each unit's all-gather overlaps the previous
unit's compute. Activation checkpointing (none / selective / full, per tower) and
torch.compile are applied to each layer in place before any of that. DeepSpeed configs given by
reference users map onto this (see `DistConfig.from_deepspeed`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import (
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
)
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from vlpretrain.distributed.env import DistEnv
from vlpretrain.files import read_user_text
from vlpretrain.model.vision import num_layers_run
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


CheckpointMode = Literal["none", "selective", "full"]
"""Per tower: none keeps every activation; selective keeps the GEMM and attention outputs and
recomputes the cheap ops between them (norms, activations, elementwise); full keeps only each
layer's input and recomputes the whole layer in backward."""

SAVED_OP_NAMES = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_flash_attention_forward",
        "aten::_efficient_attention_forward",
        "flash_attn::_flash_attn_forward",
        "flash_attn::_flash_attn_varlen_forward",
    }
)
"""Ops whose outputs selective checkpointing keeps: the matmuls and attention kernels, which
cost the FLOPs; by name, so kernels from packages imported later (flash-attn) match too."""


def _selective_policy(context: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op.name() in SAVED_OP_NAMES:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_selective_policy)


class _Recomputed(nn.Module):
    """Placed in front of a layer's own class: its forward runs under torch's checkpoint.

    The layer keeps its object, its parameter names and its hooks (DCP, FSDP2, LoRA and the
    export see no wrapper), and the checkpoint is called inside the module's call, so a
    compiled layer traces it as one region (torch.compile cannot trace hook-based checkpoints).
    Unlike transformers' flag, it does not depend on `module.training`.
    """

    # A partial, not a method: torch.compile reads the checkpoint's context_fn from it.
    recompute: Callable[..., Any] = functools.partial(torch_checkpoint, use_reentrant=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # The RNG state is restored for the recompute: dropout and drop-path draw the same masks.
        return self.recompute(super().forward, *args, **kwargs)


class _FullyRecomputed(_Recomputed):
    pass


class _SelectivelyRecomputed(_Recomputed):
    recompute = functools.partial(
        torch_checkpoint, use_reentrant=False, context_fn=_selective_contexts
    )


_RECOMPUTED_CLASSES: dict[tuple[type, type], type] = {}
"""One class per (mixin, layer class): the layers of a tower share it, and so share one
compiled graph."""


def _recomputed_class(mixin: type, layer_class: type) -> type:
    key = (mixin, layer_class)
    if key not in _RECOMPUTED_CLASSES:
        name = f"{mixin.__name__.lstrip('_')}{layer_class.__name__}"
        _RECOMPUTED_CLASSES[key] = type(name, (mixin, layer_class), {})
    return _RECOMPUTED_CLASSES[key]


def checkpoint_layer(layer: nn.Module, mode: CheckpointMode) -> None:
    """Recompute `layer` in backward as `mode` says, in place (see `_Recomputed`)."""
    if mode == "none":
        return
    if isinstance(layer, _Recomputed):
        raise ValueError(f"{type(layer).__name__} is already checkpointed")
    mixin = _SelectivelyRecomputed if mode == "selective" else _FullyRecomputed
    layer.__class__ = _recomputed_class(mixin, type(layer))


def enable_activation_checkpointing(
    model: InternVLModel, vision: CheckpointMode, llm: CheckpointMode
) -> None:
    """Checkpoint each ViT layer as `vision` says and each LLM decoder layer as `llm` says.

    Frozen layers are checkpointed too. That matters in stages 1 and 1.5: frozen parts stay in
    eval() (no dropout / drop-path) while backward still runs through them to reach the
    projector or the ViT, so they hold activations unless checkpointed too.
    Call before `compile_layers` and `parallelize`.
    """
    for layer in model.vision_layers():
        checkpoint_layer(layer, vision)
    for layer in _decoder_layers(model):
        checkpoint_layer(layer, llm)


def compile_layers(model: InternVLModel, backend: str = "inductor") -> None:
    """torch.compile each ViT layer and each LLM decoder layer in place (`Module.compile`).

    Per layer, not the whole model: the layers of a tower share one compiled graph, so a
    compile costs one layer of each type, and the code between layers (embedding, scatter of
    image features, loss) stays eager. Shapes are dynamic from the first step: packed rows
    change length and tile count every step, and without it the second shape would compile
    once more before dynamo marks the dimension dynamic.
    Call after `enable_activation_checkpointing` (the checkpoint is traced inside the layer)
    and before `parallelize` (FSDP2's hooks stay outside the compiled region).
    """
    for layer in [*model.vision_layers(), *_decoder_layers(model)]:
        layer.compile(backend=backend, dynamic=True)


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
        vision_layers = list(model.vision_layers())
        decoder_layers = _decoder_layers(model)
        for layer in vision_layers:
            fully_shard(layer, **kwargs)
        fully_shard(model.vision_model, **kwargs)
        for layer in decoder_layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        run = num_layers_run(len(vision_layers), model.config.select_layer)
        prefetch_forward([model, model.vision_model, *vision_layers[:run], *decoder_layers])
        return model
    if env.world_size == 1:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def prefetch_forward(units: list[nn.Module]) -> None:
    """Each FSDP2 unit, as its forward starts, all-gathers the next one's parameters too.

    `units` in the order their forwards run. Without it a unit's all-gather starts only when
    its own forward does and waits for the previous compute; with it the gather of layer i+1
    overlaps layer i's compute. Backward needs nothing: FSDP2 prefetches the next unit of
    backward by itself. Only units that run may be listed (a gathered unit that never runs
    would keep its full parameters).
    """
    for unit, following in zip(units, units[1:], strict=False):
        cast(FSDPModule, unit).set_modules_to_forward_prefetch([cast(FSDPModule, following)])


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
