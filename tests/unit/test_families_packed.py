"""Every supported LLM family keeps packed samples apart; the others are refused up front.

For each family (tiny configs with the real families' settings, tests/llm_families.py) one
packed row of three samples with restarting position_ids gives the same logits as each
sample alone (< 1e-5). InternLM2 is checked as it trains: converted to a Llama.
"""

from __future__ import annotations

import pytest
import torch
from llm_families import family_configs, seeded_internlm2_state, tiny_internlm2_config

from vlpretrain.model import internlm2
from vlpretrain.model.families import PACKED_FAMILIES, check_family, check_packed_isolation

VOCAB = 128
TOLERANCE = 1e-5


def native_model(family: str):
    import transformers

    torch.manual_seed(0)
    config = family_configs()[family](VOCAB)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Non-trivial norm weights, so q/k norms (Qwen3) and final norms matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def internlm2_model():
    import transformers

    source = tiny_internlm2_config(VOCAB, max_position_embeddings=64)
    config = internlm2.llama_config_from_internlm2(source)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(internlm2.state_to_llama(seeded_internlm2_state(source), config))
    return model.eval()


def build(family: str):
    return internlm2_model() if family == "internlm2" else native_model(family)


def sequences() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in (9, 14, 6)]


@torch.no_grad()
def packed_vs_alone(model) -> float:
    """Max |packed - alone| over all positions of the three samples."""
    samples = sequences()
    ids = torch.cat(samples)[None]
    positions = torch.cat([torch.arange(len(s)) for s in samples])[None]
    packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    worst = 0.0
    for sample, got in zip(samples, torch.split(packed, [len(s) for s in samples]), strict=True):
        alone = model(input_ids=sample[None], use_cache=False).logits[0]
        worst = max(worst, float((got - alone).abs().max()))
    return worst


@pytest.mark.parametrize("family", sorted(PACKED_FAMILIES))
def test_packed_row_equals_samples_alone(family):
    model = build(family)
    diff = packed_vs_alone(model)
    print(f"{family}: packed vs alone max |diff| {diff:.2e}")
    assert diff < TOLERANCE


def test_families_have_their_characteristic_settings():
    configs = {name: make(VOCAB) for name, make in family_configs().items()}
    assert configs["qwen2"].rope_parameters["rope_theta"] == 1e6
    assert configs["qwen2"].num_key_value_heads < configs["qwen2"].num_attention_heads
    assert configs["qwen3"].head_dim * configs["qwen3"].num_attention_heads != 64
    assert configs["llama"].rope_parameters["rope_theta"] == 5e6
    converted = internlm2_model().config
    assert converted.rope_parameters == {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}


@torch.no_grad()
def test_packing_without_position_restart_would_leak():
    # The check above can fail: the same row with running positions changes the later samples.
    model = build("internlm2")
    samples = sequences()
    ids = torch.cat(samples)[None]
    running = model(input_ids=ids, use_cache=False).logits[0]
    second = torch.split(running, [len(s) for s in samples])[1]
    alone = model(input_ids=samples[1][None], use_cache=False).logits[0]
    assert (second - alone).abs().max() > 1e-2


def test_remote_code_family_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"cfg.json: LLM model_type 'mystery_lm' cannot train"):
        check_family({"model_type": "mystery_lm"}, "cfg.json")
    with pytest.raises(ValueError, match="remote code, which builds its own causal mask"):
        check_family({"model_type": "mystery_lm"}, "cfg.json")


def test_native_family_without_proof_is_refused():
    with pytest.raises(ValueError, match="'gpt2' cannot train packed: its packed-row isolation"):
        check_family({"model_type": "gpt2"}, "cfg.json")


def test_dynamic_rope_longer_than_context_is_refused():
    config = internlm2_model().config  # dynamic NTK, max_position_embeddings 64
    check_packed_isolation(config, 64)
    with pytest.raises(ValueError, match="data.max_seq_length 65 exceeds .* 64 with dynamic"):
        check_packed_isolation(config, 65)
    check_packed_isolation(native_model("qwen2").config, 100_000)  # plain RoPE: no limit
