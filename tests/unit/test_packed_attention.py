"""Packed rows with restarting position_ids attend within each sample only (upstream pin).

transformers builds a block-causal mask from position_ids only when there is no attention
mask and no cache; with use_cache=True the samples of a row see each other. We rely on the
first behaviour and pin the second, so an upstream change shows up here.
"""

import pytest
import torch
from llm_families import tiny_qwen2


def _sequences():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (n,), generator=generator) for n in (7, 11, 5)]


def _packed(sequences, restart=True):
    ids = torch.cat(sequences)[None]
    if restart:
        positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    else:
        positions = torch.arange(ids.shape[1])[None]
    return ids, positions


def _split(logits, sequences):
    return torch.split(logits[0], [len(s) for s in sequences])


@torch.no_grad()
def test_packed_forward_equals_per_sample_forward():
    model, sequences = tiny_qwen2("sdpa"), _sequences()
    ids, positions = _packed(sequences)
    packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    for seq, got in zip(sequences, _split(packed, sequences), strict=True):
        alone = model(input_ids=seq[None], use_cache=False).logits[0]
        assert (got - alone).abs().max() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("case", ["use_cache", "no_position_restart"])
def test_upstream_leaks_across_samples_with_cache_or_without_restart(case):
    model, sequences = tiny_qwen2("sdpa"), _sequences()
    ids, positions = _packed(sequences, restart=case != "no_position_restart")
    packed = model(input_ids=ids, position_ids=positions, use_cache=case == "use_cache").logits
    second = _split(packed, sequences)[1]
    alone = model(input_ids=sequences[1][None], use_cache=False).logits[0]
    assert (second - alone).abs().max() > 1e-3
