"""LLM attention kernels for packed rows: the selection rule, flex and the varlen path on CPU.

The CUDA kernels themselves cannot run here; the varlen path is checked end to end (rows
flattened, sample boundaries reaching every layer, GQA layout, output layout) with a CPU
reference kernel in place of torch.nn.attention.varlen. bench/gpu.py runs the real kernel.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers
from llm_families import tiny_qwen2

from vlpretrain.model import attention

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SAMPLE_LENGTHS = [[7, 11, 6], [9, 15]]
"""Two packed rows of 24 tokens each."""
FLEX_SAMPLE_LENGTHS = [[100, 28, 128], [200, 56]]
"""Two rows of 256 tokens. On CPU (torch 2.13), transformers' flex path gave wrong values
(batch 1) or NaN (batch 2) for the 24-token rows above, shorter than flex's 128-token block:
exact at these lengths. On CUDA the auto choice prefers a varlen kernel (torch >= 2.10)."""


def _qwen2(attn_implementation: str) -> transformers.Qwen2ForCausalLM:
    attention.register_kernels()
    return tiny_qwen2(attn_implementation)


def _rows(
    lengths: list[list[int]] = SAMPLE_LENGTHS,
) -> tuple[list[list[torch.Tensor]], torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    samples = [[torch.randint(0, 128, (n,), generator=generator) for n in row] for row in
               lengths]  # fmt: skip
    ids = torch.stack([torch.cat(row) for row in samples])
    positions = torch.stack([torch.cat([torch.arange(len(s)) for s in row]) for row in samples])
    return samples, ids, positions


@torch.no_grad()
def _per_sample_logits(samples: list[list[torch.Tensor]]) -> torch.Tensor:
    model = _qwen2("sdpa")
    return torch.stack(
        [torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in row])
         for row in samples]
    )  # fmt: skip


def test_auto_picks_sdpa_on_cpu_and_a_varlen_kernel_on_cuda(monkeypatch):
    assert attention.select_attention("auto", CPU)[0] == "sdpa"
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    assert attention.select_attention("auto", CUDA)[0] == "flash_attention_2"
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    assert attention.select_attention("auto", CUDA)[0] == "torch_varlen"
    monkeypatch.setattr(attention, "torch_has_varlen", lambda: False)
    assert attention.select_attention("auto", CUDA)[0] == "flex_attention"
    assert attention.select_attention("eager", CUDA) == ("eager", "set in the config")


def test_cuda_only_and_unknown_kernels_are_refused():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attention.select_attention("torch_varlen", CPU)
    with pytest.raises(ValueError, match="not one of"):
        attention.select_attention("flash", CPU)


def test_only_varlen_kernels_flatten_rows():
    assert [attention.is_varlen(k) for k in ("sdpa", "eager", "flex_attention")] == [False] * 3
    assert attention.is_varlen("torch_varlen") and attention.is_varlen("flash_attention_2")


def test_varlen_kwargs_are_the_cumulative_sample_lengths():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    kwargs = attention.varlen_kwargs(positions)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 4
    with pytest.raises(ValueError, match="start at 0"):
        attention.varlen_kwargs(torch.tensor([[1, 2, 0]]))


@pytest.mark.slow  # transformers compiles flex_attention (about 15 s of CPU here)
@torch.no_grad()
def test_flex_forward_equals_per_sample_sdpa():
    samples, ids, positions = _rows(FLEX_SAMPLE_LENGTHS)
    flex = _qwen2("flex_attention")(input_ids=ids, position_ids=positions, use_cache=False)
    assert (flex.logits - _per_sample_logits(samples)).abs().max() < 1e-5


def _reference_kernel(calls: list[int]):
    """Per-sample causal sdpa with the varlen kernel's signature: (N, H, K) layout."""

    def kernel(query_NHK, key_NHK, value_NHK, cu_seqlens, max_length, scale):
        calls.append(max_length)
        bounds = cu_seqlens.tolist()
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            q, k, v = (t[start:end].transpose(0, 1) for t in (query_NHK, key_NHK, value_NHK))
            outs.append(
                F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                               enable_gqa=True).transpose(0, 1)
            )  # fmt: skip
        return torch.cat(outs)

    return kernel


@torch.no_grad()
def test_varlen_path_on_flattened_rows_equals_per_sample(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(attention, "torch_varlen_kernel", _reference_kernel(calls))
    samples, ids, positions = _rows()
    flat_positions = positions.reshape(1, -1)
    out = _qwen2("torch_varlen")(
        input_ids=ids.reshape(1, -1),
        position_ids=flat_positions,
        use_cache=False,
        **attention.varlen_kwargs(flat_positions),
    )
    assert calls == [15, 15]  # every layer got the boundaries; the longest sample is 15
    expected = _per_sample_logits(samples).reshape(1, -1, 128)
    assert (out.logits - expected).abs().max() < 1e-5


@torch.no_grad()
def test_varlen_function_without_boundaries_runs_sdpa():
    """Generation (KV cache, no packing) with the varlen kernel selected stays exact."""
    samples, _, _ = _rows()
    sequence = samples[0][1][None]
    varlen = _qwen2("torch_varlen")(input_ids=sequence, use_cache=True).logits
    sdpa = _qwen2("sdpa")(input_ids=sequence, use_cache=True).logits
    assert (varlen - sdpa).abs().max() < 1e-6


def test_vlm_flattens_rows_only_for_a_varlen_kernel(tiny_model, make_vlm_batch, monkeypatch):
    """Two packed rows: the sdpa loss (rows kept apart) equals the varlen loss (one sequence)."""
    calls: list[int] = []
    monkeypatch.setattr(attention, "torch_varlen_kernel", _reference_kernel(calls))
    attention.register_kernels()
    model = tiny_model.model.eval()
    row = make_vlm_batch(tiny_model)
    batch = {k: torch.cat([v, v]) if k != "pixel_values" and k != "image_flags" else v
             for k, v in row.items()}  # fmt: skip
    batch["pixel_values"] = torch.cat([row["pixel_values"], row["pixel_values"]])
    batch["image_flags"] = torch.cat([row["image_flags"], row["image_flags"]])
    with torch.no_grad():
        sdpa = model(**batch)
        model.language_model.set_attn_implementation("torch_varlen")
        varlen = model(**batch)
    assert len(calls) == model.language_model.config.num_hidden_layers
    assert abs(float(sdpa.loss_sum) - float(varlen.loss_sum)) < 1e-5
    assert float(sdpa.loss_sum) > 0
