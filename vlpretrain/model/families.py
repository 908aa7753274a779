"""Which LLM families train packed, their adapters, and the refusal of those whose samples leak.

Packed rows hold several samples; each must attend only to itself. transformers' native
models derive that block-diagonal mask from restarting `position_ids` when there is no cache
(sdpa / eager / flash varlen); remote-code models build their own causal mask over the whole
row. So every family trains as a native model, and a family counts as supported only once
tests/unit/test_families_packed.py proves packed-row logits equal per-sample logits for it:

    model_type in config.json     trains as            InternVL LLMs
    qwen2                         Qwen2ForCausalLM     Qwen2 / Qwen2.5 (1B, 4B, 26B, 78B)
    qwen3                         Qwen3ForCausalLM     Qwen3 (InternVL3.5)
    llama                         LlamaForCausalLM     Yi-34B, Nous-Hermes-2 (Llama 3)
    phi3                          Phi3ForCausalLM      Phi-3-mini (InternVL2-4B)
    internlm2                     LlamaForCausalLM     internlm2(.5)-chat (converted, internlm2.py)

Each supported model_type has a FamilyAdapter (model/family_adapter.py): the identity for a
native family, a conversion both ways for a converted one (InternLM2, model/internlm2.py).
Call sites look it up (`family_adapter(config_dict)` on load, `adapter_of(native_config)` on
save) and never name a family. Anything else is refused before the model is built, naming the
family and the reason.

Dynamic-NTK RoPE (InternLM2's rope_scaling) rescales by the longest position in the *row*,
so it stays per-sample only while no sample exceeds max_position_embeddings: checked
against data.max_seq_length before the first step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import CONFIG_MAPPING

from vlpretrain.model import internlm2
from vlpretrain.model.family_adapter import FamilyAdapter

ADAPTERS: dict[str, FamilyAdapter] = {
    adapter.model_type: adapter
    for adapter in (
        FamilyAdapter("qwen2", "Qwen2ForCausalLM"),
        FamilyAdapter("qwen3", "Qwen3ForCausalLM"),
        FamilyAdapter("llama", "LlamaForCausalLM"),
        FamilyAdapter("phi3", "Phi3ForCausalLM"),
        internlm2.ADAPTER,
    )
}
"""model_type -> its adapter (packed isolation tested for each)."""
PACKED_FAMILIES = {model_type: adapter.trains_as for model_type, adapter in ADAPTERS.items()}
"""model_type -> the transformers-native class it trains as."""
CONVERTED = tuple(a for a in ADAPTERS.values() if not a.reads_directory_natively)
"""The adapters that convert (their native config's model_type is another family's)."""


def family_adapter(config: dict[str, Any], where: str) -> FamilyAdapter:
    """The adapter of `config` (an LLM config.json / llm_config dict); raises ValueError unless
    it is a family whose packed samples we can keep apart, naming `where` it came from."""
    check_family(config, where)
    return ADAPTERS[config["model_type"]]


def adapter_of(native_config: Any) -> FamilyAdapter:
    """The adapter that made `native_config` (a model's config): a converting one when it
    converted it, else the identity (also for a model not loaded from a family directory)."""
    for adapter in CONVERTED:
        if adapter.owns(native_config):
            return adapter
    model_type = str(getattr(native_config, "model_type", ""))
    return ADAPTERS.get(model_type) or FamilyAdapter(model_type, type(native_config).__name__)


def converted_tokenizer(directory: Path) -> Any | None:
    """The tokenizer of `directory` read by a converted family without its remote code, or
    None when no converted family claims it."""
    for adapter in CONVERTED:
        tokenizer = adapter.load_tokenizer(directory)
        if tokenizer is not None:
            return tokenizer
    return None


def check_family(config: dict[str, Any], where: str) -> None:
    """Raise ValueError unless `config` (an LLM config.json / llm_config dict) is a family whose
    packed samples we can keep apart."""
    model_type = config.get("model_type")
    if model_type in ADAPTERS:
        return
    supported = ", ".join(sorted(ADAPTERS))
    if model_type not in CONFIG_MAPPING:
        reason = (
            "it exists only as remote code, which builds its own causal mask over the whole "
            "packed row, so packed samples would attend to each other"
        )
    else:
        reason = (
            "its packed-row isolation is not proven (tests/unit/test_families_packed.py "
            "checks each supported family)"
        )
    raise ValueError(
        f"{where}: LLM model_type {model_type!r} cannot train packed: {reason}. "
        f"Supported families: {supported}"
    )


def check_packed_isolation(llm_config: Any, max_seq_length: int) -> None:
    """Raise ValueError when the LLM's settings would let one packed sample change another's
    output: dynamic RoPE with samples longer than its original context."""
    rope = getattr(llm_config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if "dynamic" not in str(kind):
        return
    context = rope.get("original_max_position_embeddings", llm_config.max_position_embeddings)
    if max_seq_length > context:
        raise ValueError(
            f"data.max_seq_length {max_seq_length} exceeds the LLM's max_position_embeddings "
            f"{context} with dynamic-NTK RoPE (rope_scaling {kind}): the rescaled frequencies "
            "would follow the longest sample of a packed row and change the others. Set "
            f"data.max_seq_length <= {context}"
        )
