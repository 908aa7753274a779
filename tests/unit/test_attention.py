"""LLM attention kernels for packed rows: the selection rule, flex and the varlen path on CPU.

The CUDA kernels themselves cannot run here; the varlen path is checked end to end (rows
flattened, sample boundaries reaching every layer, GQA layout, output layout) with a CPU
reference kernel in place of torch.nn.attention.varlen. bench/gpu.py runs the real kernel.
"""

import functools

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


def test_fp32_training_gets_no_half_precision_kernel(monkeypatch):
    """Flash kernels take only fp16/bf16: with fp32 training auto picks flex on CUDA, and a
    varlen kernel named in the config is refused before the model is built."""
    monkeypatch.setattr(attention, "torch_has_varlen", lambda: True)
    assert attention.select_attention("auto", CUDA, half_precision=False)[0] == "flex_attention"
    assert attention.select_attention("auto", CUDA, half_precision=True)[0] == "torch_varlen"
    for kernel in ("torch_varlen", "torch_varlen_reference"):
        with pytest.raises(ValueError, match="train.precision = 'bf16'"):
            attention.select_attention(kernel, CUDA, half_precision=False)
    assert attention.select_attention("torch_varlen_reference", CPU, half_precision=True) == (
        "torch_varlen_reference",
        "set in the config",
    )


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


def _counting_reference(calls: list[int]):
    """reference_varlen_attn, recording each call's max_q (one call per layer)."""

    reference = attention.reference_varlen_attn

    @functools.wraps(reference)
    def kernel(*args, **kwargs):
        calls.append(args[5])
        return reference(*args, **kwargs)

    return kernel


BF16_LOGITS_TOLERANCE = 0.05
"""Packed varlen vs per-sample sdpa logits, both under bf16 autocast: the two paths round
differently in bf16 (8 mantissa bits, 0.4 % relative) through two layers; the logits of the
tiny model are within about +-5. A leak across samples or a wrong mask differs by ~1."""


@torch.no_grad()
def test_varlen_path_on_flattened_rows_equals_per_sample(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(attention, "reference_varlen_attn", _counting_reference(calls))
    samples, ids, positions = _rows()
    flat_positions = positions.reshape(1, -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _qwen2(attention.TORCH_VARLEN_REFERENCE)(
            input_ids=ids.reshape(1, -1),
            position_ids=flat_positions,
            use_cache=False,
            **attention.varlen_kwargs(flat_positions),
        )
        expected = _per_sample_logits(samples).reshape(1, -1, 128)
    assert calls == [15, 15]  # every layer got the boundaries; the longest sample is 15
    assert (out.logits.float() - expected.float()).abs().max() < BF16_LOGITS_TOLERANCE


@torch.no_grad()
def test_autocast_over_fp32_weights_reaches_the_kernel_in_one_dtype(monkeypatch):
    """RoPE returns q and k in fp32 under autocast while v_proj returns bf16: the wrapper
    casts all three to bf16, as the flash kernel (and its reference's checks) require."""
    seen: list[tuple[torch.dtype, ...]] = []
    reference = attention.reference_varlen_attn

    @functools.wraps(reference)
    def recording(query, key, value, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return reference(query, key, value, *args, **kwargs)

    monkeypatch.setattr(attention, "reference_varlen_attn", recording)
    _, ids, positions = _rows()
    flat_positions = positions.reshape(1, -1)
    model = _qwen2(attention.TORCH_VARLEN_REFERENCE)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(
            input_ids=ids.reshape(1, -1),
            position_ids=flat_positions,
            use_cache=False,
            **attention.varlen_kwargs(flat_positions),
        )
    assert seen == [(torch.bfloat16,) * 3] * 2


def test_reference_kernel_checks_what_the_flash_kernel_checks():
    q = torch.randn(6, 4, 8, dtype=torch.bfloat16)
    kv = torch.randn(6, 2, 8, dtype=torch.bfloat16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="one dtype"):
        attention.reference_varlen_attn(q.float(), kv, kv, cu, cu, 4, 4, enable_gqa=True)
    with pytest.raises(RuntimeError, match="int32"):
        attention.reference_varlen_attn(q, kv, kv, cu.long(), cu.long(), 4, 4, enable_gqa=True)
    with pytest.raises(RuntimeError, match="enable_gqa"):
        attention.reference_varlen_attn(q, kv, kv, cu, cu, 4, 4)
    out = attention.reference_varlen_attn(q, kv, kv, cu, cu, 4, 4, enable_gqa=True)
    assert out.shape == (6, 4, 8) and out.dtype == torch.bfloat16


def _signature_standins(calls: list[dict]):
    """Functions with varlen_attn's signature in each torch release that has it, computing
    through the reference kernel (which also checks dtypes, int32 lengths and GQA).

    2.9 has no torch.nn.attention.varlen (auto then picks flex_attention)."""
    reference = attention.reference_varlen_attn

    def torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                   return_aux=None):  # fmt: skip
        calls.append({"is_causal": is_causal})
        window = (-1, 0) if is_causal else (-1, -1)
        return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=window)

    def torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                   scale=None, window_size=(-1, -1)):  # fmt: skip
        calls.append({"scale": scale, "window_size": window_size})
        return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                         window_size=window_size)  # fmt: skip

    def torch_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                   scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
                   block_table=None, num_splits=None):  # fmt: skip
        calls.append({"scale": scale, "window_size": window_size, "enable_gqa": enable_gqa})
        return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                         window_size=window_size, enable_gqa=enable_gqa)  # fmt: skip

    return {"2.10": torch_2_10, "2.11": torch_2_11, "2.13": torch_2_13}


@pytest.mark.parametrize("release", ["2.10", "2.11", "2.13"])
def test_varlen_call_fits_each_torch_signature(release):
    """Same output on every signature: GQA (4 query heads, 2 key/value heads) and a scale
    other than 1/sqrt(head_dim) (2.10 has no scale: the query is pre-scaled)."""
    calls: list[dict] = []
    function = _signature_standins(calls)[release]
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(9, 4, 8, generator=generator).to(torch.bfloat16)
    k, v = (torch.randn(9, 2, 8, generator=generator).to(torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out = attention.varlen_call(function, q, k, v, cu, 5, scale=0.5)
    expected = torch.cat([
        F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1).float() for t in (q, k, v)),
                                       is_causal=True, scale=0.5, enable_gqa=True).transpose(0, 1)
        for a, b in ((0, 4), (4, 9))
    ])  # fmt: skip
    # bf16 output of an fp32 computation; 2.10's pre-scaled query adds one bf16 rounding.
    assert (out.float() - expected).abs().max() < 0.02
    expected_call = {
        "2.10": {"is_causal": True},
        "2.11": {"scale": 0.5, "window_size": (-1, 0)},
        "2.13": {"scale": 0.5, "window_size": (-1, 0), "enable_gqa": True},
    }[release]
    assert calls == [expected_call]


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
    monkeypatch.setattr(attention, "reference_varlen_attn", _counting_reference(calls))
    attention.register_kernels()
    model = tiny_model.model.eval()
    row = make_vlm_batch(tiny_model)
    batch = {k: torch.cat([v, v]) if k != "pixel_values" and k != "image_flags" else v
             for k, v in row.items()}  # fmt: skip
    batch["pixel_values"] = torch.cat([row["pixel_values"], row["pixel_values"]])
    batch["image_flags"] = torch.cat([row["image_flags"], row["image_flags"]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa = model(**batch)
        model.language_model.set_attn_implementation(attention.TORCH_VARLEN_REFERENCE)
        varlen = model(**batch)
    assert len(calls) == model.language_model.config.num_hidden_layers
    # Both in bf16 (8 mantissa bits): the same loss sum up to bf16 rounding.
    assert float(varlen.loss_sum) == pytest.approx(float(sdpa.loss_sum), rel=2e-2)
    assert float(sdpa.loss_sum) > 0
