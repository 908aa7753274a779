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

`torch_varlen` is registered under its name in transformers' `AttentionInterface`, the
extension point transformers offers for new kernels, so any native HF family can use it. It
is deliberately absent from the mask interface: transformers then builds no mask and does not
look for packed samples in position_ids (a device-to-host read per forward); the kernel gets
the sample boundaries instead.
Every process registers it before it builds or receives a model (a rank that gets its model
from rank 0 never ran the build).

The flash kernel behind `torch_varlen` takes q, k and v in one half dtype. Under bf16 autocast
over fp32 weights RoPE returns q and k in fp32 while `v_proj` returns bf16, so the wrapper
casts all three to the autocast dtype (as transformers' flash-attn wrapper does).
`varlen_attn`'s signature changed across torch releases; `varlen_call` adapts one call to the
installed one:

    torch 2.10   positional is_causal; no scale (q is pre-scaled instead); no GQA (k/v repeated)
    torch 2.11   keyword-only scale and window_size (-1, 0) = causal; no GQA
    torch 2.12+  as 2.11, plus enable_gqa

`torch_varlen_reference` is a CPU kernel with `varlen_attn`'s signature and its input checks,
computing per-sample causal sdpa; registered beside `torch_varlen` and routed through the same
wrapper, it lets tests (or a user, by naming it) run the varlen path without CUDA.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

logger = logging.getLogger(__name__)

TORCH_VARLEN = "torch_varlen"
TORCH_VARLEN_REFERENCE = "torch_varlen_reference"
VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3", TORCH_VARLEN, TORCH_VARLEN_REFERENCE)
"""Kernels that take one flattened sequence plus cumulative sample lengths."""
CUDA_ONLY_KERNELS = ("flash_attention_2", "flash_attention_3", TORCH_VARLEN)
HALF_PRECISION_KERNELS = CUDA_ONLY_KERNELS + (TORCH_VARLEN_REFERENCE,)
"""Kernels that take only fp16/bf16 inputs: they need bf16 training (autocast)."""
KNOWN_KERNELS = ("auto", "sdpa", "eager", "flex_attention", *VARLEN_KERNELS)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def torch_has_varlen() -> bool:
    """torch.nn.attention.varlen.varlen_attn exists (torch >= 2.10)."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def select_attention(
    requested: str, device: torch.device, half_precision: bool | None = None
) -> tuple[str, str]:
    """The LLM attention kernel for packed training on `device`, and why it was chosen.

    `half_precision`: whether training runs in bf16 (None: not known here, as when a model
    is built for export or chat). Flash kernels take no fp32, so fp32 training gets none.

    Raises:
        ValueError: an unknown kernel, a CUDA-only kernel requested off CUDA, or a half-
            precision kernel requested for fp32 training.
    """
    if requested not in KNOWN_KERNELS:
        raise ValueError(
            f"model.attn_implementation {requested!r} is not one of {list(KNOWN_KERNELS)}"
        )
    on_cuda = device.type == "cuda"
    if requested != "auto":
        if requested in CUDA_ONLY_KERNELS and not on_cuda:
            raise ValueError(
                f"model.attn_implementation {requested!r} needs a CUDA device, the run is on "
                f"{device.type}; use 'auto' or 'sdpa'"
            )
        if requested in HALF_PRECISION_KERNELS and half_precision is False:
            raise ValueError(
                f"model.attn_implementation {requested!r} takes only fp16/bf16 inputs; set "
                "train.precision = 'bf16' or use 'auto'"
            )
        return requested, "set in the config"
    if not on_cuda:
        return "sdpa", f"auto on {device.type}: dense block-diagonal mask"
    if half_precision is False:
        return "flex_attention", "auto on CUDA with fp32 training: flex document mask"
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


VarlenFunction = Callable[..., Any]
"""`torch.nn.attention.varlen.varlen_attn` or a function with its signature."""


def torch_varlen_function() -> VarlenFunction:
    from torch.nn.attention.varlen import varlen_attn

    return cast(VarlenFunction, varlen_attn)


@functools.cache
def _parameters(function: VarlenFunction) -> frozenset[str]:
    return frozenset(inspect.signature(function).parameters)


def varlen_call(
    function: VarlenFunction,
    query_NHK: torch.Tensor,
    key_NHK: torch.Tensor,
    value_NHK: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_length: int,
    scale: float | None,
) -> torch.Tensor:
    """Causal varlen attention through `function`, adapted to the parameters it has."""
    parameters = _parameters(function)
    extra: dict[str, Any] = {}
    if "window_size" in parameters:
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    default_scale = query_NHK.shape[-1] ** -0.5
    if "scale" in parameters:
        extra["scale"] = scale
    elif scale is not None and scale != default_scale:
        # softmax(q k^T * scale) == softmax((q * scale / default) k^T * default)
        query_NHK = query_NHK * (scale / default_scale)
    heads, kv_heads = query_NHK.shape[1], key_NHK.shape[1]
    if kv_heads != heads:
        if "enable_gqa" in parameters:
            extra["enable_gqa"] = True
        else:
            key_NHK = key_NHK.repeat_interleave(heads // kv_heads, dim=1)
            value_NHK = value_NHK.repeat_interleave(heads // kv_heads, dim=1)
    out = function(
        query_NHK, key_NHK, value_NHK, cu_seqlens, cu_seqlens, max_length, max_length, **extra
    )
    return out[0] if isinstance(out, tuple) else out


def reference_varlen_attn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux: Any = None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
) -> torch.Tensor:
    """`varlen_attn`'s signature and input checks, computed by per-sample sdpa on any device.

    Like the flash kernel: q, k, v one dtype in {fp16, bf16}, (T, H, D) layout, int32
    cumulative lengths, k/v heads fewer than q heads only with enable_gqa; accumulates in fp32
    and returns the input dtype. Only full (-1, -1) and causal (-1, 0) windows.
    """
    _check_varlen_inputs(query, key, value, cu_seq_q, cu_seq_k, enable_gqa)
    if window_size not in ((-1, -1), (-1, 0)):
        raise ValueError(f"reference_varlen_attn: window_size {window_size} is not implemented")
    bounds = cu_seq_q.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    if max(lengths, default=0) > max_q or max_q != max_k:
        raise ValueError(f"max_q {max_q} / max_k {max_k} do not cover the longest sample")
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q, k, v = (t[start:end].transpose(0, 1).float() for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=window_size == (-1, 0), scale=scale, enable_gqa=enable_gqa
        )
        outputs.append(out.transpose(0, 1).to(query.dtype))
    return torch.cat(outputs)


def _check_varlen_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    enable_gqa: bool,
) -> None:
    dtypes = {query.dtype, key.dtype, value.dtype}
    if len(dtypes) != 1 or query.dtype not in HALF_DTYPES:
        raise RuntimeError(
            "varlen_attn: query, key and value must share one dtype in {float16, bfloat16}, "
            f"got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if query.ndim != 3 or key.shape != value.shape or key.shape[0] != query.shape[0]:
        raise RuntimeError(
            f"varlen_attn: (T, H, D) inputs expected, got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    for cu_seq in (cu_seq_q, cu_seq_k):
        if cu_seq is not None and cu_seq.dtype != torch.int32:
            raise RuntimeError(f"varlen_attn: cu_seq must be int32, got {cu_seq.dtype}")
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads and not (enable_gqa and heads % kv_heads == 0):
        raise RuntimeError(
            f"varlen_attn: {heads} query heads and {kv_heads} key/value heads need enable_gqa "
            "and a whole number of query heads per key/value head"
        )


def kernel_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    """The one half dtype q, k and v go to the kernel in: autocast's when it is on (RoPE
    promotes q/k to fp32 there while v stays bf16), else the inputs' own half dtype."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtypes = {query.dtype, key.dtype, value.dtype}
    half = [dtype for dtype in HALF_DTYPES if dtype in dtypes]
    if len(half) != 1:
        raise ValueError(
            f"varlen attention needs fp16/bf16 inputs (train.precision = 'bf16'), got "
            f"{sorted(str(d) for d in dtypes)} without autocast"
        )
    return half[0]


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    varlen_function: Callable[[], VarlenFunction] = torch_varlen_function,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (1, H, N, K) q/k/v of a flattened packed sequence.

    Without sample boundaries (generation with a KV cache, an unpacked forward) it runs
    sdpa, which is exact there. Returns the output as (1, N, H, K), as transformers expects,
    in the kernel's half dtype.
    """
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(
            f"varlen attention takes one flattened sequence, got batch {query.shape[0]}"
        )
    if dropout > 0 and module.training:
        raise ValueError("varlen attention has no attention dropout; set attention_dropout 0")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("varlen attention does not implement sliding-window attention")
    dtype = kernel_dtype(query, key, value)
    out_NHK = varlen_call(
        varlen_function(),
        query[0].transpose(0, 1).to(dtype),
        key[0].transpose(0, 1).to(dtype),
        value[0].transpose(0, 1).to(dtype),
        cu_seqlens,
        int(kwargs["max_length_q"]),
        scaling,
    )
    return out_NHK.unsqueeze(0), None


def reference_attention_forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """`varlen_attention_forward` with `reference_varlen_attn` as the kernel."""
    return varlen_attention_forward(*args, varlen_function=lambda: reference_varlen_attn, **kwargs)


def register_kernels() -> None:
    """Make `torch_varlen` and `torch_varlen_reference` valid attn_implementations in this
    process (idempotent): before building a model, and before using one received from rank 0.
    """
    AttentionInterface.register(TORCH_VARLEN, varlen_attention_forward)
    AttentionInterface.register(TORCH_VARLEN_REFERENCE, reference_attention_forward)


def log_choice(name: str, reason: str) -> None:
    logger.info("LLM attention kernel: %s (%s)", name, reason)
