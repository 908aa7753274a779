"""LLM attention kernel for packed rows: choose one, and PyTorch's own varlen kernel for HF LLMs.

A packed row holds several samples; `position_ids` restart at 0 for each. What a kernel costs
for a row of L tokens holding samples of n_i tokens:

    sdpa / eager      dense block-diagonal mask built from position_ids: sum over rows of L^2
    flex_attention    block-sparse document mask (BlockMask), skips cross-sample blocks
    flash_attention_2 flash-attn's varlen kernel: sum of n_i^2 (per-sample cost)
    torch_varlen      torch.nn.attention.varlen (the flash kernel inside PyTorch): sum of n_i^2

`select_attention` picks, for `attn_implementation = "auto"`: on CUDA flash_attention_2 when
the flash-attn package is installed, else torch_varlen when the installed torch has it, else
flex_attention; on CPU sdpa (the varlen kernels are CUDA-only and flex has no CPU backward).
Varlen kernels take one flattened sequence with cumulative sample lengths (`varlen_kwargs`).

`torch_varlen` is registered under its name in transformers' `AttentionInterface` (and the
mask interface, as "no mask": the kernel gets the sample boundaries instead), which is the
extension point transformers offers for new kernels, so any native HF family can use it.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

logger = logging.getLogger(__name__)

TORCH_VARLEN = "torch_varlen"
VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3", TORCH_VARLEN)
"""Kernels that take one flattened sequence plus cumulative sample lengths."""
KNOWN_KERNELS = ("auto", "sdpa", "eager", "flex_attention", *VARLEN_KERNELS)


def torch_has_varlen() -> bool:
    """torch.nn.attention.varlen.varlen_attn exists (torch >= 2.10)."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def select_attention(requested: str, device: torch.device) -> tuple[str, str]:
    """The LLM attention kernel for packed training on `device`, and why it was chosen.

    Raises:
        ValueError: an unknown kernel, or a CUDA-only kernel requested off CUDA.
    """
    if requested not in KNOWN_KERNELS:
        raise ValueError(
            f"model.attn_implementation {requested!r} is not one of {list(KNOWN_KERNELS)}"
        )
    on_cuda = device.type == "cuda"
    if requested != "auto":
        if requested in VARLEN_KERNELS and not on_cuda:
            raise ValueError(
                f"model.attn_implementation {requested!r} needs a CUDA device, the run is on "
                f"{device.type}; use 'auto' or 'sdpa'"
            )
        return requested, "set in the config"
    if not on_cuda:
        return "sdpa", f"auto on {device.type}: dense block-diagonal mask"
    if flash_attn_installed():
        return "flash_attention_2", "auto on CUDA: flash-attn installed, per-sample varlen"
    if torch_has_varlen():
        return TORCH_VARLEN, "auto on CUDA: torch.nn.attention.varlen, per-sample varlen"
    return "flex_attention", "auto on CUDA: no varlen kernel, flex document mask"


def is_varlen(attn_implementation: str) -> bool:
    """Whether the kernel wants the rows flattened into one sequence with sample boundaries."""
    return attn_implementation in VARLEN_KERNELS


def varlen_kwargs(position_ids_1N: torch.Tensor) -> dict[str, Any]:
    """Cumulative sample lengths of a flattened packed sequence, as transformers names them.

    A sample (or padding segment) starts wherever position_ids is 0. One host sync per
    micro-batch (the max length), instead of one per layer.
    """
    positions_N = position_ids_1N.reshape(-1)
    starts = torch.nonzero(positions_N == 0).reshape(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("packed position_ids must start at 0 (every sample restarts at 0)")
    total = torch.tensor([positions_N.numel()], device=positions_N.device)
    cu_seqlens = torch.cat([starts, total]).to(torch.int32)
    max_length = int(torch.diff(cu_seqlens).max())
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen_kernel(
    query_NHK: torch.Tensor,
    key_NHK: torch.Tensor,
    value_NHK: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_length: int,
    scale: float | None,
) -> torch.Tensor:
    """Causal varlen attention with torch.nn.attention.varlen (API differs across versions)."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = _varlen_parameters()
    extra: dict[str, Any] = {"scale": scale}
    # torch 2.10 took is_causal; 2.11 replaced it by a (left, right) window.
    if "window_size" in parameters:
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    if key_NHK.shape[1] != query_NHK.shape[1]:
        if "enable_gqa" in parameters:
            extra["enable_gqa"] = True
        else:
            groups = query_NHK.shape[1] // key_NHK.shape[1]
            key_NHK = key_NHK.repeat_interleave(groups, dim=1)
            value_NHK = value_NHK.repeat_interleave(groups, dim=1)
    out = varlen_attn(
        query_NHK, key_NHK, value_NHK, cu_seqlens, cu_seqlens, max_length, max_length, **extra
    )
    return out[0] if isinstance(out, tuple) else out


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (1, H, N, K) q/k/v of a flattened packed sequence.

    Without sample boundaries (generation with a KV cache, an unpacked forward) it runs
    sdpa, which is exact there. Returns the output as (1, N, H, K), as transformers expects.
    """
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"{TORCH_VARLEN} takes one flattened sequence, got batch {query.shape[0]}")
    if dropout > 0 and module.training:
        raise ValueError(f"{TORCH_VARLEN} has no attention dropout; set attention_dropout 0")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"{TORCH_VARLEN} does not implement sliding-window attention")
    out_NHK = torch_varlen_kernel(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu_seqlens,
        int(kwargs["max_length_q"]),
        scaling,
    )
    return out_NHK.unsqueeze(0), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The varlen kernel gets sample boundaries, not a mask."""
    return None


def register_kernels() -> None:
    """Make `torch_varlen` a valid attn_implementation (idempotent; called before building)."""
    AttentionInterface.register(TORCH_VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(TORCH_VARLEN, _no_mask)


def log_choice(name: str, reason: str) -> None:
    logger.info("LLM attention kernel: %s (%s)", name, reason)
