"""InternLM2 trains as a Llama with InternLM2's own outputs, and is saved back in its layout.

Golden files (tests/assets/golden_internlm2_*, made by tests/golden/make_internlm2_golden.py
with InternLM2's remote code under transformers 4.37.2): the converted model's logits equal
the remote code's, alone and past max_position_embeddings (dynamic NTK); the remote code
leaks across packed samples where the converted model does not; our sentencepiece tokenizer
gives the remote tokenizer's ids without running any code from the directory.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from llm_families import (
    INTERNLM2_AUTO_MAP,
    REMOTE_FILES,
    seeded_internlm2_state,
    tiny_internlm2_config,
    write_internlm2_dir,
)
from safetensors.torch import load_file

from vlpretrain.formats.hf import export_hf
from vlpretrain.formats.internvl import save_internvl
from vlpretrain.model import hub, internlm2
from vlpretrain.model.build import ModelConfig, build_model, new_vision, save_vision
from vlpretrain.model.hub import remote_code_files
from vlpretrain.model.llm import load_llm, load_tokenizer
from vlpretrain.model.sentencepiece_tokenizer import InternLM2SentencePieceTokenizer
from vlpretrain.testing.components import TINY_VISION

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TOKENIZER_MODEL = ASSETS / "internlm2_tiny_tokenizer.model"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def internlm2_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("internlm2") / "internlm2"
    write_internlm2_dir(directory, TOKENIZER_MODEL)
    return directory


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(ASSETS / "golden_internlm2_logits.safetensors"))


def logits(model, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None], position_ids=positions, use_cache=False).logits[0]


def test_converted_logits_equal_the_remote_code(internlm2_dir, golden):
    model = load_llm(internlm2_dir).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    for index in range(3):
        diff = (logits(model, golden[f"ids.{index}"]) - golden[f"alone.{index}"]).abs().max()
        assert diff < TOLERANCE, (index, float(diff))
    # 45 tokens > max_position_embeddings 32: dynamic NTK rescales the RoPE base.
    long = logits(model, golden["ids.long"])
    assert (long - golden["long"]).abs().max() < TOLERANCE
    assert (
        golden["ids.long"].numel()
        > json.loads((internlm2_dir / "config.json").read_text())["max_position_embeddings"]
    )


def test_remote_code_leaks_in_packed_rows_and_the_converted_model_does_not(internlm2_dir, golden):
    model = load_llm(internlm2_dir).eval()
    samples = [golden[f"ids.{i}"] for i in range(3)]
    alone = torch.cat([golden[f"alone.{i}"] for i in range(3)])
    positions = torch.cat([torch.arange(len(s)) for s in samples])[None]
    ours = logits(model, torch.cat(samples), positions)
    assert (ours - alone).abs().max() < TOLERANCE
    first = len(samples[0])
    # The remote code's first sample is fine, the later ones see their neighbours.
    assert (golden["packed"][:first] - alone[:first]).abs().max() < TOLERANCE
    assert (golden["packed"][first:] - alone[first:]).abs().max() > 0.1


def test_tokenizer_ids_equal_the_remote_tokenizer(internlm2_dir):
    expected = json.loads((ASSETS / "golden_internlm2_tokenizer.json").read_text())
    assert expected["tokenizer_class"] == "InternLM2Tokenizer"
    assert not any((internlm2_dir / name).exists() for name in REMOTE_FILES)
    tokenizer, added = load_tokenizer(internlm2_dir)
    assert isinstance(tokenizer, InternLM2SentencePieceTokenizer)
    assert (added, len(tokenizer)) == (expected["num_added"], expected["len"])
    for text, ids, plain in zip(
        expected["texts"], expected["ids"], expected["ids_no_special"], strict=True
    ):
        assert tokenizer(text).input_ids == ids, text
        assert tokenizer(text, add_special_tokens=False).input_ids == plain, text
    assert tokenizer.decode(tokenizer("the circle is red.").input_ids[1:]) == "the circle is red."


def test_wqkv_split_follows_the_grouped_layout():
    config = internlm2.llama_config_from_internlm2(tiny_internlm2_config(32, bias=True))
    kv_heads, group, head_dim = 2, 4, 8
    # Label each wqkv row by (kv group, slot in group, row in head).
    labels = torch.arange(kv_heads * (group + 2) * head_dim, dtype=torch.float32)
    q, k, v = internlm2.split_wqkv(labels, config)

    def slot(g: int, s: int) -> torch.Tensor:
        start = (g * (group + 2) + s) * head_dim
        return labels[start : start + head_dim]

    # Query head h = g * group + j is slot j of group g; k and v are the group's last two.
    assert torch.equal(q.reshape(kv_heads * group, head_dim)[5], slot(1, 1))
    assert torch.equal(k.reshape(kv_heads, head_dim)[1], slot(1, group))
    assert torch.equal(v.reshape(kv_heads, head_dim)[0], slot(0, group + 1))
    assert torch.equal(internlm2.fuse_wqkv(q, k, v, config), labels)


def test_state_and_config_round_trip_exactly():
    source = tiny_internlm2_config(40, bias=True)
    state = seeded_internlm2_state(source, seed=3)
    config = internlm2.llama_config_from_internlm2(source)
    llama = internlm2.state_to_llama(state, config)
    assert "model.layers.1.self_attn.k_proj.bias" in llama and "lm_head.weight" in llama
    back = internlm2.state_to_internlm2(llama, config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    written = internlm2.internlm2_config_from_llama(config)
    assert written == {**source, "architectures": ["InternLM2ForCausalLM"]}
    assert written["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert written["rope_theta"] == 1e6 and written["auto_map"] == INTERNLM2_AUTO_MAP


def test_unknown_internlm2_key_is_refused():
    source = {**tiny_internlm2_config(40), "qk_norm": True}
    with pytest.raises(ValueError, match=r"dir/config.json: InternLM2 keys \['qk_norm'\]"):
        internlm2.llama_config_from_internlm2(source, where="dir/config.json")


def test_internvl_save_is_internlm2_layout_and_reloads_equal(internlm2_dir, tmp_path):
    # Stand-ins for the remote-code files (our own text), to check they travel with the model.
    for name in REMOTE_FILES:
        (internlm2_dir / name).write_text(f"# stand-in for {name}\n")
    vision = save_vision(new_vision(replace(TINY_VISION, image_size=28), 0), tmp_path / "vit")
    config = ModelConfig(vision_path=str(vision), llm_path=str(internlm2_dir), force_image_size=28)
    built = build_model(config)
    out = save_internvl(built.model, built.tokenizer, tmp_path / "stage1")

    saved = hub.read_config(out)
    llm_config = saved["llm_config"]
    assert llm_config["model_type"] == "internlm2" and llm_config["auto_map"] == INTERNLM2_AUTO_MAP
    assert llm_config["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert llm_config["vocab_size"] == len(built.tokenizer) and not llm_config["bias"]
    assert internlm2.SOURCE_KEY not in json.dumps(saved)
    keys = set(hub.load_weights(out))
    assert "language_model.model.layers.0.attention.wqkv.weight" in keys
    assert {"language_model.output.weight", "language_model.model.tok_embeddings.weight"} <= keys
    assert not any("q_proj" in k or "embed_tokens" in k for k in keys)
    assert all((out / name).read_text() == f"# stand-in for {name}\n" for name in REMOTE_FILES)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "InternLM2Tokenizer"
    assert tokenizer_config["add_bos_token"] is True
    auto_tokenizer = tokenizer_config["auto_map"]["AutoTokenizer"]
    assert "tokenization_internlm2.InternLM2Tokenizer" in auto_tokenizer

    reloaded = build_model(ModelConfig(model_name_or_path=str(out)))
    assert isinstance(reloaded.tokenizer, InternLM2SentencePieceTokenizer)
    ids = torch.tensor(built.tokenizer("how many shapes?").input_ids)
    first, second = built.model.language_model.eval(), reloaded.model.language_model.eval()
    assert torch.equal(logits(first, ids), logits(second, ids))
    again = save_internvl(reloaded.model, reloaded.tokenizer, tmp_path / "stage1_5")
    assert hub.read_config(again)["llm_config"] == llm_config
    first_state, second_state = hub.load_weights(out), hub.load_weights(again)
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    assert all((again / name).is_file() for name in REMOTE_FILES)


def test_hf_export_carries_the_tokenizer_code_its_config_names(tmp_path):
    llm = tmp_path / "internlm2"
    write_internlm2_dir(llm, TOKENIZER_MODEL)
    for name in REMOTE_FILES:  # stand-ins for the remote-code files, as above
        (llm / name).write_text(f"# stand-in for {name}\n")
    vision = save_vision(new_vision(replace(TINY_VISION, image_size=28), 0), tmp_path / "vit")
    config = ModelConfig(vision_path=str(vision), llm_path=str(llm), force_image_size=28)
    built = build_model(config)
    hf = export_hf(save_internvl(built.model, built.tokenizer, tmp_path / "chat"), tmp_path / "hf")
    # The LLM is a native Llama there; only the tokenizer stays InternLM2's remote class, and
    # a trust_remote_code reader needs every module its auto_map names beside it.
    tokenizer_config = json.loads((hf / "tokenizer_config.json").read_text())
    named = remote_code_files(tokenizer_config["auto_map"])
    assert named == ["tokenization_internlm2.py", "tokenization_internlm2_fast.py"]
    assert all((hf / name).read_text() == f"# stand-in for {name}\n" for name in named)
    tokenizer, _ = load_tokenizer(hf)
    text = "<|im_start|>user\nhow many shapes?<|im_end|>"
    assert tokenizer(text).input_ids == built.tokenizer(text).input_ids


def test_missing_sentencepiece_names_the_packages(internlm2_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match=r"needs the 'sentencepiece' package: pip install"):
        load_tokenizer(internlm2_dir)
