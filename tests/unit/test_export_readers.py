"""Exports load in transformers 4.37-era code (the reference's pin) as well as in ours.

The key lists below are facts read from the constructors' signatures: transformers v4.37.2
`Qwen2Config.__init__` and `LlamaConfig.__init__`, and InternVL's
internvl_chat/internvl/model/internlm2/configuration_internlm2.py `InternLM2Config.__init__`.
A 4.37 reader silently falls back to the constructor default for a missing key (rope_theta
10000 instead of Qwen2.5's 1e6), so every one of them must be in the exported llm_config.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import sentencepiece
import torch
from conftest import TINY_TILE
from safetensors import safe_open
from tokenizers import Tokenizer, models
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, Qwen2ForCausalLM

from vlpretrain.config import TrainConfig
from vlpretrain.formats.files import legacy_rope_keys
from vlpretrain.formats.internvl import save_internvl
from vlpretrain.model.build import ModelConfig, build_model
from vlpretrain.model.hub import copy_remote_code, load_weights, remote_code_files
from vlpretrain.model.llm import load_tokenizer
from vlpretrain.testing.components import tiny_llm_config
from vlpretrain.testing.shapes import caption_corpus
from vlpretrain.tokens import INTERNVL_TOKENS

QWEN2_437_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "initializer_range", "rms_norm_eps", "use_cache", "tie_word_embeddings", "rope_theta",
    "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout",
)  # fmt: skip
LLAMA_437_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id",
    "eos_token_id", "pretraining_tp", "tie_word_embeddings", "rope_theta", "rope_scaling",
    "attention_bias", "attention_dropout",
)  # fmt: skip
INTERNLM2_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "bias", "rope_theta", "rope_scaling",
    "attn_implementation",
)  # fmt: skip
BASE_437_KEYS = ("architectures", "torch_dtype", "model_type")
"""Read by PretrainedConfig / InternVLChatConfig (which dispatches on architectures[0])."""


def check_437_rope_scaling(rope_scaling: dict | None) -> None:
    """The validation 4.37's LlamaConfig and InternLM2Config run on rope_scaling."""
    if rope_scaling is None:
        return
    assert isinstance(rope_scaling, dict) and len(rope_scaling) == 2, rope_scaling
    assert rope_scaling["type"] in ("linear", "dynamic")
    assert isinstance(rope_scaling["factor"], float) and rope_scaling["factor"] > 1.0


def _sentencepiece_llama_dir(directory: Path) -> Path:
    """A tiny Llama dir with a real sentencepiece tokenizer.model (rope 5e5, dynamic x2)."""
    directory.mkdir(parents=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus(0)),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
    )  # fmt: skip
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", **special})
    )
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    config = LlamaConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500000.0},
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    return directory


def _qwen25_dir(tiny_components, directory: Path) -> Path:
    """The tiny Qwen2 LLM with Qwen2.5's rope_theta 1e6."""
    config = tiny_llm_config(vocab_size=384)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 1000000.0}
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tiny_components.llm_path / name).read_bytes())
    return directory


def _export(tiny_components, llm_dir: Path, out: Path, dtype=torch.float32):
    built = build_model(
        ModelConfig(
            vision_path=str(tiny_components.vision_path),
            llm_path=str(llm_dir),
            force_image_size=TINY_TILE,
        )
    )
    save_internvl(built.model, built.tokenizer, out, dtype=dtype)
    return built, json.loads((out / "config.json").read_text())


def test_qwen25_export_has_every_437_key_and_the_real_rope_theta(tiny_components, tmp_path):
    llm = _qwen25_dir(tiny_components, tmp_path / "qwen25")
    _, config = _export(tiny_components, llm, tmp_path / "out")
    llm_config = config["llm_config"]
    missing = [k for k in (*QWEN2_437_KEYS, *BASE_437_KEYS) if k not in llm_config]
    assert not missing
    assert llm_config["rope_theta"] == 1e6  # a 4.37 reader would otherwise use 10000
    assert llm_config["architectures"] == ["Qwen2ForCausalLM"]
    assert llm_config["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}


def test_llama_export_keeps_dynamic_rope_scaling_in_the_437_form(tiny_components, tmp_path):
    llm = _sentencepiece_llama_dir(tmp_path / "llama")
    built, config = _export(tiny_components, llm, tmp_path / "out")
    llm_config = config["llm_config"]
    assert not [k for k in (*LLAMA_437_KEYS, *BASE_437_KEYS) if k not in llm_config]
    assert llm_config["rope_theta"] == 500000.0
    assert llm_config["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    check_437_rope_scaling(llm_config["rope_scaling"])
    # transformers 5 reads the two forms as one: the reloaded model has the source's rope
    # (plus the 4.x alias "type") and the same logits on 100 tokens, past
    # max_position_embeddings 64, where dynamic NTK scaling changes the frequencies.
    reloaded = build_model(ModelConfig(model_name_or_path=str(tmp_path / "out")))
    rope = reloaded.model.language_model.config.rope_parameters
    assert {k: v for k, v in rope.items() if k != "type"} == (
        built.model.language_model.config.rope_parameters
    )
    input_ids = torch.arange(100)[None]
    with torch.no_grad():
        logits = [b.model.language_model(input_ids).logits for b in (built, reloaded)]
    assert torch.equal(*logits)
    # ... and saving again writes the same config (no drift from the 4.x alias keys).
    save_internvl(reloaded.model, reloaded.tokenizer, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == config


def test_export_carries_the_slow_tokenizer_files(tiny_components, tmp_path):
    llm = _sentencepiece_llama_dir(tmp_path / "llama")
    built, _ = _export(tiny_components, llm, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "tokenizer.model").read_bytes() == (llm / "tokenizer.model").read_bytes()
    assert json.loads((out / "special_tokens_map.json").read_text()) == json.loads(
        (llm / "special_tokens_map.json").read_text()
    )
    # 4.x slow tokenizers learn added tokens only from tokenizer_config's added_tokens_decoder.
    decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    contents = {entry["content"]: int(index) for index, entry in decoder.items()}
    for token in INTERNVL_TOKENS:
        assert contents[token] == built.tokenizer.convert_tokens_to_ids(token)
        assert decoder[str(contents[token])]["special"] is True
    # Path A reads its own export back: same ids for a prompt with InternVL tokens.
    reloaded = build_model(ModelConfig(model_name_or_path=str(out)))
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img> a red circle<|im_end|>"
    assert reloaded.tokenizer(text).input_ids == built.tokenizer(text).input_ids


def test_bpe_export_is_in_the_form_tokenizers_015_and_slow_classes_read(tiny_components, tmp_path):
    llm = _qwen25_dir(tiny_components, tmp_path / "qwen25")
    assert not (llm / "merges.txt").exists()  # the source has tokenizer.json only
    built, _ = _export(tiny_components, llm, tmp_path / "out")
    out = tmp_path / "out"
    # tokenizers 0.15 refuses a merge written as a pair ("data did not match any variant of
    # untagged enum ModelWrapper"); "left right" strings are read by every version.
    merges = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(m, str) and m.count(" ") == 1 for m in merges)
    # The slow BPE files carry the same vocabulary and merges: swapped into the fast
    # tokenizer, they give the same ids.
    lines = (out / "merges.txt").read_text().splitlines()
    assert lines == ["#version: 0.2", *merges]
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    slow = Tokenizer.from_file(str(out / "tokenizer.json"))
    slow.model = models.BPE.from_file(str(out / "vocab.json"), str(out / "merges.txt"))
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img> a red circle, the quick fox<|im_end|>"
    ids = built.tokenizer(text, add_special_tokens=False).input_ids
    assert fast.encode(text, add_special_tokens=False).ids == ids
    assert slow.encode(text, add_special_tokens=False).ids == ids


def test_weights_are_saved_in_the_requested_dtype(tiny_components, tmp_path):
    _, config = _export(
        tiny_components, tiny_components.llm_path, tmp_path / "out", dtype=torch.bfloat16
    )
    assert config["torch_dtype"] == config["llm_config"]["torch_dtype"] == "bfloat16"
    assert config["vision_config"]["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_slice(key).get_dtype() for key in weights.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    reloaded = build_model(ModelConfig(model_name_or_path=str(tmp_path / "out")))
    head = reloaded.model.language_model.lm_head.weight
    assert head.dtype == torch.float32  # trained in fp32 again, from the bf16 values
    assert torch.equal(head, load_weights(tmp_path / "out")[
        "language_model.lm_head.weight"].float())  # fmt: skip


@pytest.mark.parametrize(
    ("precision", "save_dtype", "expected"),
    [("bf16", "auto", "bf16"), ("fp32", "auto", "fp32"), ("bf16", "fp32", "fp32")],
)
def test_save_dtype_follows_the_training_precision(precision, save_dtype, expected):
    config = TrainConfig(precision=precision, save_dtype=save_dtype)
    assert config.export_precision == expected


def test_legacy_rope_keys_per_rope_type():
    assert legacy_rope_keys({"rope_type": "default", "rope_theta": 1e6}) == {
        "rope_theta": 1e6,
        "rope_scaling": None,
    }
    linear = legacy_rope_keys({"rope_type": "linear", "factor": 4, "rope_theta": 1e4})
    assert linear["rope_scaling"] == {"type": "linear", "factor": 4.0}
    check_437_rope_scaling(linear["rope_scaling"])
    llama3 = legacy_rope_keys({"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5,
                               "low_freq_factor": 1.0})  # fmt: skip
    assert llama3["rope_scaling"]["rope_type"] == "llama3"  # the 4.43+ form


def test_remote_code_named_by_auto_map_is_copied(tmp_path, caplog):
    source, out = tmp_path / "src", tmp_path / "out"
    source.mkdir(), out.mkdir(), (out / "again").mkdir()
    for name in ("configuration_internlm2.py", "modeling_internlm2.py", "tokenization_x.py"):
        (source / name).write_text(f"# {name}\n")
    llm_map = {
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
    }
    tokenizer_map = {"AutoTokenizer": ["tokenization_x.Slow", None]}
    assert remote_code_files(tokenizer_map) == ["tokenization_x.py"]
    copied = copy_remote_code(source, out, [llm_map, tokenizer_map, None])
    assert copied == ["configuration_internlm2.py", "modeling_internlm2.py", "tokenization_x.py"]
    assert (out / "modeling_internlm2.py").read_text() == "# modeling_internlm2.py\n"
    (source / "modeling_internlm2.py").unlink()
    with caplog.at_level(logging.WARNING):
        assert copy_remote_code(source, out / "again", [llm_map]) == ["configuration_internlm2.py"]
    assert "['modeling_internlm2.py']" in caplog.text


def test_the_437_key_lists_are_real_config_fields():
    # Every listed key except the 4.x-only ones is a field transformers 5 still writes, so
    # the lists cannot drift into names no config has.
    legacy_only = {"rope_theta", "rope_scaling", "bias", "attn_implementation"}
    for model_type, keys in (("qwen2", QWEN2_437_KEYS), ("llama", LLAMA_437_KEYS)):
        written = AutoConfig.for_model(model_type).to_dict()
        assert not [k for k in keys if k not in written and k not in legacy_only], model_type


TOKENIZER_CODE = '''
from transformers import LlamaTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class TinySlowTokenizer(SentencePieceBackend):
    """Python sentencepiece, as InternLM2Tokenizer."""


class TinyFastTokenizer(LlamaTokenizer):
    """tokenizers-backed, as InternLM2TokenizerFast."""
'''


def _remote_tokenizer_dir(directory: Path) -> Path:
    """The sentencepiece Llama dir with its tokenizer as remote code: [slow, fast] auto_map."""
    _sentencepiece_llama_dir(directory)
    (directory / "tokenization_tiny.py").write_text(TOKENIZER_CODE)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {
        "AutoTokenizer": [
            "tokenization_tiny.TinySlowTokenizer",
            "tokenization_tiny.TinyFastTokenizer",
        ]
    }
    config_path.write_text(json.dumps(config))
    return directory


def test_use_fast_tokenizer_false_selects_the_directory_slow_tokenizer(tiny_components, tmp_path):
    llm = _remote_tokenizer_dir(tmp_path / "llm")
    slow, _ = load_tokenizer(llm, trust_remote_code=True, use_fast=False)
    fast, _ = load_tokenizer(llm, trust_remote_code=True, use_fast=True)
    assert (type(slow).__name__, type(fast).__name__) == ("TinySlowTokenizer", "TinyFastTokenizer")
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img> a small red square<|im_end|>"
    assert slow(text).input_ids == fast(text).input_ids

    def build(**source):
        config = ModelConfig(
            force_image_size=TINY_TILE, use_fast_tokenizer=False, trust_remote_code=True, **source
        )
        return build_model(config)

    built = build(vision_path=str(tiny_components.vision_path), llm_path=str(llm))
    assert type(built.tokenizer).__name__ == "TinySlowTokenizer"
    out = save_internvl(built.model, built.tokenizer, tmp_path / "out")
    assert (out / "tokenization_tiny.py").read_text() == TOKENIZER_CODE
    reloaded = build(model_name_or_path=str(out))  # stage 1.5 reads stage 1's export
    assert type(reloaded.tokenizer).__name__ == "TinySlowTokenizer"
    assert reloaded.tokenizer(text).input_ids == slow(text).input_ids


def test_slow_remote_tokenizer_needs_trust_remote_code(tmp_path):
    llm = _remote_tokenizer_dir(tmp_path / "llm")
    with pytest.raises(ValueError, match="TinySlowTokenizer.*trust_remote_code = true"):
        load_tokenizer(llm, use_fast=False)


def test_use_fast_tokenizer_false_without_a_slow_tokenizer_keeps_the_fast_one(tiny_components):
    tokenizer, _ = load_tokenizer(tiny_components.llm_path, use_fast=False)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"  # transformers 5 has no other


def test_internlm2_export_has_every_key_its_config_reads(tiny_components, tmp_path):
    # The tiny InternLM2 directory builder comes with the InternLM2 family support.
    llm_families = pytest.importorskip("llm_families")
    assets = Path(__file__).resolve().parents[1] / "assets"
    llm = tmp_path / "internlm2"
    llm_families.write_internlm2_dir(llm, assets / "internlm2_tiny_tokenizer.model")
    _, config = _export(tiny_components, llm, tmp_path / "out")
    llm_config = config["llm_config"]
    assert not [k for k in (*INTERNLM2_KEYS, *BASE_437_KEYS) if k not in llm_config]
    assert llm_config["architectures"] == ["InternLM2ForCausalLM"]
    check_437_rope_scaling(llm_config["rope_scaling"])
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (
        llm / "tokenizer.model"
    ).read_bytes()
