"""AdamW over per-module parameter groups (weight decay on matrices only; fused kernels on
CUDA, foreach elsewhere), and the LR schedule (transformers' helpers).

    named parameters --module (vision / projector / llm), ViT block, decays?--> groups
    group lr = module lr (optim.lr_vision, lr_projector, lr_llm; unset: learning_rate)
               x vision_layer_decay ** depth (ViT only) ; the schedule scales every group alike

The reference decays every trainable tensor (norms, biases, position embeddings, layer
scale); here decay applies to 2-D+ weight matrices except position and class embeddings.
Frozen parameters get no group, so a frozen module has none.

Layer-wise decay follows InternVL's own optimizer for InternViT (and BEiT's): with N encoder
blocks, block i (0-based) learns at lr_vision * decay ** (N - i), the embeddings at
lr_vision * decay ** (N + 1), and a ViT parameter outside both (none in InternViT) at
lr_vision. The last block is one step below lr_vision, as there.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import get_scheduler

logger = logging.getLogger(__name__)

NO_DECAY_NAMES = ("position_embedding", "class_embedding")

MODULES = ("vision", "projector", "llm")
"""The modules that can learn at rates of their own (optim.lr_<module>)."""
MODULE_ATTRIBUTES = {"vision_model": "vision", "projector": "projector", "language_model": "llm"}
"""InternVLModel attribute (a parameter name's first part) -> module."""
VISION_BLOCK = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")
"""A ViT encoder block's index in a parameter name, through any wrapper between the tower and
the block (PEFT's base_model.model, a checkpoint wrapper inside the block)."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    learning_rate: float = 2e-4
    """Peak learning rate, reached after warmup [--learning_rate]; the base of every module
    whose own rate is unset."""
    lr_vision: float | None = None
    """Peak learning rate of the vision tower (unset: learning_rate)."""
    lr_projector: float | None = None
    """Peak learning rate of the projector (unset: learning_rate)."""
    lr_llm: float | None = None
    """Peak learning rate of the language model (unset: learning_rate)."""
    vision_layer_decay: float = 1.0
    """Layer-wise LR decay over the ViT's N encoder blocks, in (0, 1]: block i (0-based) learns
    at lr_vision * decay^(N - i), the embeddings at lr_vision * decay^(N + 1); 1 is off."""
    weight_decay: float = 0.01
    """Applied to weight matrices only (not norms, biases, position/class embeddings)."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay [--adam_beta1]."""
    adam_beta2: float = 0.999
    """AdamW second-moment decay [--adam_beta2]."""
    adam_epsilon: float = 1e-8
    """AdamW denominator epsilon [--adam_epsilon]."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm (0 disables)."""
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warmup: constant, linear or cosine to 0 at max_steps [--lr_scheduler_type]."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many steps (0: use warmup_ratio) [--warmup_steps]."""
    warmup_ratio: float = 0.0
    """Used when warmup_steps is 0: warmup = ceil(ratio * max_steps)."""

    def __post_init__(self) -> None:
        problems = []
        if not self.learning_rate > 0:
            problems.append(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        for module in MODULES:
            rate = getattr(self, f"lr_{module}")
            # `not >=` also refuses NaN; an infinite rate would make every weight NaN.
            if rate is not None and not (rate >= 0 and math.isfinite(rate)):
                problems.append(f"optim.lr_{module} must be a finite number >= 0, got {rate}")
        if not 0.0 < self.vision_layer_decay <= 1.0:
            decay = self.vision_layer_decay
            problems.append(f"optim.vision_layer_decay must be in (0, 1], got {decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps < 0:
            problems.append(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if problems:
            # One error for the section, every problem in it (the config lists all sections').
            raise ValueError("; ".join(problems))

    def module_learning_rates(self) -> dict[str, float]:
        """The peak learning rate of each module, unset ones resolved to learning_rate."""
        rates = {module: getattr(self, f"lr_{module}") for module in MODULES}
        return {m: self.learning_rate if r is None else r for m, r in rates.items()}

    def describe_learning_rates(self) -> str:
        """One line: each module's resolved peak learning rate and the ViT's layer decay."""
        rates = ", ".join(f"{m} {r:g}" for m, r in self.module_learning_rates().items())
        line = f"learning rates (peak; an unset one is optim.learning_rate): {rates}"
        if self.vision_layer_decay == 1.0:
            return line + "; no ViT layer decay"
        decay = self.vision_layer_decay
        return (
            f"{line}; ViT layer decay {decay:g}: of N blocks, block i (0-based) learns at "
            f"lr_vision * {decay:g}^(N - i), the embeddings at lr_vision * {decay:g}^(N + 1)"
        )


def warmup_steps(config: OptimConfig, max_steps: int) -> int:
    if config.warmup_steps:
        return config.warmup_steps
    return math.ceil(config.warmup_ratio * max_steps)


def decays(name: str, parameter: torch.Tensor) -> bool:
    return parameter.ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)


def module_of(name: str) -> str:
    """The module ('vision', 'projector', 'llm') of a parameter of the VLM, wrapped or not.

    Raises:
        ValueError: the name starts with none of the VLM's components.
    """
    parts = name.split(".")
    # DDP registers the model as its `module`; FSDP2 shards in place and adds no prefix.
    first = parts[1] if parts[0] == "module" and len(parts) > 1 else parts[0]
    if first not in MODULE_ATTRIBUTES:
        raise ValueError(
            f"parameter {name!r} belongs to none of the VLM's components "
            f"({', '.join(MODULE_ATTRIBUTES)}); cannot pick its learning rate"
        )
    return MODULE_ATTRIBUTES[first]


def vision_layer_id(name: str, num_blocks: int) -> int:
    """A ViT parameter's depth as InternVL's layer decay counts it: 0 for the embeddings,
    i + 1 for encoder block i, num_blocks + 1 for anything above the blocks."""
    block = VISION_BLOCK.search(name)
    if block is not None:
        return int(block.group(1)) + 1
    return 0 if ".embeddings." in f".{name}" else num_blocks + 1


def vision_layer_scale(layer_id: int, num_blocks: int, decay: float) -> float:
    """lr_vision's factor at a depth: decay^(num_blocks + 1 - layer_id), so block i of N gets
    decay^(N - i) and the embeddings decay^(N + 1)."""
    return decay ** (num_blocks + 1 - layer_id)


def count_vision_blocks(names: Iterable[str]) -> int:
    """The number of ViT encoder blocks, frozen ones included (they still count in depth)."""
    indices = [
        int(block.group(1))
        for name in names
        if module_of(name) == "vision" and (block := VISION_BLOCK.search(name)) is not None
    ]
    return max(indices, default=-1) + 1


def group_of(
    name: str, parameter: torch.Tensor, num_vision_blocks: int, config: OptimConfig
) -> tuple[tuple[int, int, bool], str, float, float]:
    """(place in the group list, group name, peak learning rate, weight decay) of one
    trainable parameter. The list goes by module (vision, projector, llm), then ViT depth
    from the embeddings up, then decay before no decay."""
    module = module_of(name)
    rate = config.module_learning_rates()[module]
    prefix, layer_id = module, 0
    if module == "vision" and config.vision_layer_decay != 1.0:
        layer_id = vision_layer_id(name, num_vision_blocks)
        rate *= vision_layer_scale(layer_id, num_vision_blocks, config.vision_layer_decay)
        depth = {0: "embeddings", num_vision_blocks + 1: "other"}.get(layer_id)
        prefix = f"vision.{depth or f'layer{layer_id - 1}'}"
    decay = decays(name, parameter)
    place = (MODULES.index(module), layer_id, not decay)
    if decay:
        return place, f"{prefix}.decay", rate, config.weight_decay
    return place, f"{prefix}.no_decay", rate, 0.0


def parameter_groups(model: nn.Module, config: OptimConfig) -> list[dict[str, Any]]:
    """The trainable parameters in named groups, one per (module, ViT depth when layer decay
    is on, decay or not); frozen parameters are in none. Each group carries its `name`, peak
    `lr` and `weight_decay`, and its parameters in the order the model lists them."""
    named = list(model.named_parameters())
    num_vision_blocks = count_vision_blocks(name for name, _ in named)
    groups: dict[tuple[int, int, bool], dict[str, Any]] = {}
    for name, parameter in named:
        if not parameter.requires_grad:
            continue
        place, group_name, rate, weight_decay = group_of(name, parameter, num_vision_blocks, config)
        group = groups.setdefault(
            place, {"name": group_name, "params": [], "lr": rate, "weight_decay": weight_decay}
        )
        group["params"].append(parameter)
    return [groups[place] for place in sorted(groups)]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of the VLM (as wrapped by DDP or FSDP2: the
    optimizer must hold the wrapper's parameters), in `parameter_groups`."""
    groups = parameter_groups(model, config)
    return torch.optim.AdamW(
        groups,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        **adamw_implementation({p.device.type for g in groups for p in g["params"]}),
    )


def log_parameter_groups(optimizer: torch.optim.Optimizer) -> None:
    """One line per group: name, parameter count, peak learning rate, weight decay."""
    for group in optimizer.param_groups:
        # A DTensor's numel is its full (unsharded) size: the same count on every rank.
        count = sum(p.numel() for p in group["params"])
        logger.info(
            "param group %-24s %14s params  lr %.3e  weight decay %g",
            group["name"], f"{count:,}", group["lr"], group["weight_decay"],
        )  # fmt: skip


def adamw_implementation(device_types: set[str]) -> dict[str, bool]:
    """AdamW's kernels for parameters on these device types: fused on CUDA, foreach elsewhere.

    Both are set explicitly because torch's own default (foreach=None) uses foreach on CUDA
    only, and the one-tensor-at-a-time loop elsewhere: hundreds of small kernel launches per
    step. Under FSDP2 every parameter is a DTensor: DTensor registers sharding rules for the
    foreach ops and for `_fused_adamw_` (torch/distributed/tensor/_ops/_pointwise_ops.py), and
    foreach steps DTensors bit for bit like the loop (tests/unit/test_optim.py). The fused
    CUDA kernel differs from the loop by float rounding only (within 1e-7 in fp32); a run
    keeps one implementation, so resumes stay bit-exact. Off CUDA foreach, not torch's CPU
    fused kernel (faster still, bench/optimizer_step.py): foreach keeps the CPU losses equal
    to the loop's bit for bit, the golden loss files included.
    """
    fused = device_types == {"cuda"}
    return {"fused": fused, "foreach": not fused}


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    name = (
        "constant_with_warmup"
        if config.lr_scheduler_type == "constant"
        else config.lr_scheduler_type
    )
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps(config, max_steps),
        num_training_steps=max_steps,
    )


def schedule_factor(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """The schedule's multiplier of every group's peak learning rate at its current step."""
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR), type(scheduler)
    # LambdaLR sets each group's lr to its peak times this one value (one lambda for all).
    return float(scheduler.lr_lambdas[0](scheduler.last_epoch))


def scheduled_learning_rates(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: OptimConfig,
) -> dict[str, float]:
    """The current step's rates for the metrics: `lr` (learning_rate under the schedule, as
    before modules had rates of their own) and `lr/<module>` for each module that trains
    (its peak rate under the schedule, before any ViT layer decay)."""
    factor = schedule_factor(scheduler)
    trained = {group["name"].split(".")[0] for group in optimizer.param_groups}
    rates = config.module_learning_rates()
    per_module = {f"lr/{m}": rates[m] * factor for m in MODULES if m in trained}
    return {"lr": config.learning_rate * factor, **per_module}
