"""The family adapter seam: one registry lookup per call site, whatever the LLM family.

A native family's adapter changes nothing; InternLM2's converts config and tensors to Llama
and back exactly; a converting adapter registered in model/families.py is all a new family
needs for loading, building from an llm_config, and saving back in its own layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from llm_families import family_configs, seeded_internlm2_state, tiny_internlm2_config
from transformers import LlamaConfig

from vlpretrain.model import families, hub, internlm2
from vlpretrain.model.families import PACKED_FAMILIES, adapter_of, family_adapter
from vlpretrain.model.family_adapter import FamilyAdapter
from vlpretrain.model.llm import llm_from_config, load_llm

PREFIX = "language_model."


def test_the_registry_refuses_unknown_model_types_naming_where():
    with pytest.raises(ValueError, match=r"cfg.json: LLM model_type 'mystery_lm' cannot train"):
        family_adapter({"model_type": "mystery_lm"}, "cfg.json")
    with pytest.raises(ValueError, match="'gpt2' cannot train packed: its packed-row isolation"):
        family_adapter({"model_type": "gpt2"}, "cfg.json")


def test_every_supported_family_has_its_adapter():
    for model_type, trains_as in PACKED_FAMILIES.items():
        adapter = family_adapter({"model_type": model_type}, "cfg.json")
        assert (adapter.model_type, adapter.trains_as) == (model_type, trains_as)
    assert family_adapter({"model_type": "internlm2"}, "cfg.json") is internlm2.ADAPTER


@pytest.mark.parametrize("family", sorted(family_configs()))
def test_a_native_family_round_trips_unchanged(family):
    on_disk = family_configs()[family](48).to_dict()
    adapter = family_adapter(on_disk, "config.json")
    native = adapter.native_config(on_disk, where="config.json")
    assert native.model_type == family and adapter_of(native) is adapter
    assert adapter.disk_config(native) == on_disk
    assert adapter.native_config_dict(on_disk, "config.json") is on_disk
    state = {f"{PREFIX}lm_head.weight": torch.ones(2, 2)}
    assert adapter.to_native_state(state, native, PREFIX) is state
    assert adapter.to_disk_state(state, native, PREFIX) is state


def test_internlm2_adapter_round_trips_tensors_under_the_prefix_and_its_config():
    source = tiny_internlm2_config(40, bias=True)
    layout = {f"{PREFIX}{k}": v for k, v in seeded_internlm2_state(source, seed=5).items()}
    state = {**layout, "vision_model.embeddings.class_embedding": torch.arange(3.0)}
    adapter = family_adapter(source, "llm_config")
    native = adapter.native_config(source, where="llm_config")
    assert isinstance(native, LlamaConfig) and adapter_of(native) is internlm2.ADAPTER
    trained = adapter.to_native_state(state, native, PREFIX)
    assert f"{PREFIX}model.layers.0.self_attn.q_proj.bias" in trained
    assert not any("wqkv" in key for key in trained)
    assert (
        trained["vision_model.embeddings.class_embedding"]
        is state["vision_model.embeddings.class_embedding"]
    )
    back = adapter.to_disk_state(trained, native, PREFIX)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert adapter.disk_config(native) == {**source, "architectures": ["InternLM2ForCausalLM"]}
    exported = adapter.native_config_dict(source, "llm_config")
    assert exported["model_type"] == "llama" and internlm2.SOURCE_KEY not in exported


class RenamedHeadAdapter(FamilyAdapter):
    """A made-up family: a Llama whose checkpoints call lm_head `output`."""

    reads_directory_natively = False

    def owns(self, native_config: Any) -> bool:
        return getattr(native_config, "renamed_head", False)

    def native_config(
        self, config_dict: dict[str, Any], code_dir: str | Path | None = None, where: str = ""
    ) -> LlamaConfig:
        values = {k: v for k, v in config_dict.items() if k != "model_type"}
        config = LlamaConfig(**values)
        config.renamed_head = True
        return config

    def disk_config(self, native_config: Any) -> dict[str, Any]:
        values = native_config.to_dict()
        values.pop("renamed_head")
        return {**values, "model_type": self.model_type}

    def to_native_state(self, state, native_config, prefix=""):
        return {k.replace(f"{prefix}output.", f"{prefix}lm_head."): v for k, v in state.items()}

    def to_disk_state(self, state, native_config, prefix=""):
        return {k.replace(f"{prefix}lm_head.", f"{prefix}output."): v for k, v in state.items()}


@pytest.fixture
def renamed_head_family(monkeypatch) -> RenamedHeadAdapter:
    adapter = RenamedHeadAdapter("renamed_head_llama", "LlamaForCausalLM")
    monkeypatch.setitem(families.ADAPTERS, adapter.model_type, adapter)
    monkeypatch.setattr(families, "CONVERTED", (*families.CONVERTED, adapter))
    return adapter


def test_a_registered_converting_adapter_is_all_a_new_family_needs(renamed_head_family, tmp_path):
    on_disk = {**family_configs()["llama"](48).to_dict(), "model_type": "renamed_head_llama"}
    on_disk["tie_word_embeddings"] = False
    reference = llm_from_config(on_disk)
    assert type(reference).__name__ == "LlamaForCausalLM"
    assert adapter_of(reference.config) is renamed_head_family
    with torch.no_grad():
        reference.lm_head.weight.normal_(generator=torch.Generator().manual_seed(1))
    hub.save_weights(renamed_head_family.to_disk_state(reference.state_dict(), None), tmp_path)
    hub.write_config(tmp_path, renamed_head_family.disk_config(reference.config))
    assert "output.weight" in hub.load_weights(tmp_path)
    loaded = load_llm(tmp_path)
    assert torch.equal(loaded.lm_head.weight, reference.lm_head.weight)
    assert adapter_of(loaded.config) is renamed_head_family
