"""Tiny LLMs of every family the InternVL stage scripts use, with the real families' settings.

    FAMILY_CONFIGS[name](vocab) -> transformers config (Qwen2.5: rope_theta 1e6, GQA; Qwen3:
                                   q/k norms; Llama/Yi: GQA, rope 5e6; Phi-3: fused qkv, ...)
    tiny_internlm2_config(vocab) -> InternLM2 config.json dict (rope_theta 1e6, dynamic NTK
                                   2.0, GQA 8/2 heads as internlm2_5-7b's 32/8)
    seeded_internlm2_state(config, seed) -> InternLM2-layout tensors, a pure function of the
                                   seed (independent of any model's init code), so the golden
                                   script (run once with the remote code) and the tests agree
    train_sentencepiece(dir, corpus) -> tokenizer.model shaped like InternLM2's (BPE, byte
                                   fallback, <unk>/<s>/</s> at 0/1/2, chat markers as pieces)
    write_internlm2_dir(dir, ...) -> an InternLM2 directory as released (config with auto_map,
                                   tokenizer_config naming InternLM2Tokenizer), minus the .py

Imported by tests (tests/ is on sys.path) and by tests/golden/make_internlm2_golden.py.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

INTERNLM2_SPECIAL_PIECES = (
    "<|im_start|>",
    "<|im_end|>",
    "<|action_start|>",
    "<|action_end|>",
    "<|interpreter|>",
    "<|plugin|>",
)
"""InternLM2's chat markers: pieces of its sentencepiece model (ids 92538..92543 in the real
one) that tokenizer_config.json declares as special added tokens."""
INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
INTERNLM2_TOKENIZER_AUTO_MAP = {
    "AutoTokenizer": [
        "tokenization_internlm2.InternLM2Tokenizer",
        "tokenization_internlm2_fast.InternLM2TokenizerFast",
    ]
}


def tiny_internlm2_config(
    vocab_size: int, max_position_embeddings: int = 32, bias: bool = False
) -> dict[str, Any]:
    """config.json of a 2-layer 64-wide InternLM2 with internlm2_5-7b-chat's settings."""
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": INTERNLM2_AUTO_MAP,
        "attn_implementation": "eager",
        "model_type": "internlm2",
        "bias": bias,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 160,
        "initializer_range": 0.02,
        "max_position_embeddings": max_position_embeddings,
        "num_attention_heads": 8,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def internlm2_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of InternLM2ForCausalLM (its checkpoint layout)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {
        "model.tok_embeddings.weight": (config["vocab_size"], hidden)
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "attention.wqkv.weight"] = ((heads + 2 * kv) * head_dim, hidden)
        shapes[p + "attention.wo.weight"] = (hidden, hidden)
        if config["bias"]:
            shapes[p + "attention.wqkv.bias"] = ((heads + 2 * kv) * head_dim,)
            shapes[p + "attention.wo.bias"] = (hidden,)
        shapes[p + "feed_forward.w1.weight"] = (inter, hidden)
        shapes[p + "feed_forward.w3.weight"] = (inter, hidden)
        shapes[p + "feed_forward.w2.weight"] = (hidden, inter)
        shapes[p + "attention_norm.weight"] = (hidden,)
        shapes[p + "ffn_norm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["output.weight"] = (config["vocab_size"], hidden)
    return shapes


def seeded_internlm2_state(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 tensors for every InternLM2 parameter, drawn in sorted-name order from one
    seeded generator: norms around 1, matrices scaled by 1/sqrt(fan_in), biases small."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(internlm2_shapes(config).items()):
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            value = 0.1 * noise
        elif "tok_embeddings" in name:
            value = noise
        else:
            value = noise / math.sqrt(shape[1])
        state[name] = value
    return state


def train_sentencepiece(
    directory: str | Path, corpus: Iterable[str], vocab_size: int = 400
) -> Path:
    """Train a BPE sentencepiece model like InternLM2's and write directory/tokenizer.model."""
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=list(INTERNLM2_SPECIAL_PIECES),
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    path = directory / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def internlm2_tokenizer_config(piece_id: Callable[[str], int]) -> dict[str, Any]:
    """tokenizer_config.json as internlm2_5-7b-chat's (remote InternLM2Tokenizer, BOS on)."""
    special = ["<unk>", "<s>", "</s>", *INTERNLM2_SPECIAL_PIECES]
    decoder = {
        str(piece_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in special
    }
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(INTERNLM2_SPECIAL_PIECES),
        "auto_map": INTERNLM2_TOKENIZER_AUTO_MAP,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
    }


def write_internlm2_dir(
    directory: str | Path,
    tokenizer_model: Path,
    seed: int = 0,
    max_position_embeddings: int = 32,
    bias: bool = False,
) -> dict[str, Any]:
    """An InternLM2 directory (weights, config, sentencepiece tokenizer); returns the config."""
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    config = tiny_internlm2_config(processor.get_piece_size(), max_position_embeddings, bias)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(
        seeded_internlm2_state(config, seed),
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    target = directory / "tokenizer.model"
    if tokenizer_model.resolve() != target.resolve():
        target.write_bytes(tokenizer_model.read_bytes())
    tokenizer_config = internlm2_tokenizer_config(processor.piece_to_id)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    special_map = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "additional_special_tokens": list(INTERNLM2_SPECIAL_PIECES),
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return config


REMOTE_FILES = (
    "configuration_internlm2.py",
    "modeling_internlm2.py",
    "tokenization_internlm2.py",
    "tokenization_internlm2_fast.py",
)
"""InternLM2's remote-code files (never in this repository; the golden script copies them)."""


def golden_sequences(vocab_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Three samples of 7, 11 and 5 tokens (packed: 23, under max_position_embeddings 32) and
    one of 45 tokens (over it: dynamic NTK active), drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, vocab_size, (n,), generator=generator) for n in (7, 11, 5)]
    long = torch.randint(3, vocab_size, (45,), generator=generator)
    return samples, long


TOKENIZER_TEXTS = (
    "the circle is red.",
    " two  spaces and a leading one",
    "<|im_start|>system\n你是书生·万象，英文名是InternVL。<|im_end|>\n<|im_start|>user\n"
    "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nhow many shapes?<|im_end|>\n"
    "<|im_start|>assistant\nthree<|im_end|>\n",
    "digits 12345 and bytes \u00e9\u4e2d\U0001f600 and <ref>box</ref><box>[[1, 2, 3, 4]]</box>",
    "<s>literal bos then text</s>",
)
"""Texts whose ids the native and remote InternLM2 tokenizers must agree on (after adding the
InternVL tokens as the reference does)."""
TOKENIZER_CORPUS = (
    "the quick brown fox jumps over the lazy dog. a red circle, a blue square and a green "
    "triangle. how many shapes are in the image? there are three shapes. what colour is the "
    "circle? the circle is red. describe the picture. system user assistant image yes no",
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
    "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n",
)


# ----------------------------------------------------------------------------- native families


def tiny_qwen2(attn_implementation: str) -> Any:
    """A seeded 2-layer Qwen2 (vocab 128, 32 wide, GQA 4/2) in eval mode, for attention tests."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads per key/value head
        attn_implementation=attn_implementation,
    )
    return tf.Qwen2ForCausalLM(config).eval()


def family_configs() -> dict[str, Callable[[int], Any]]:
    """Tiny transformers configs per native family, with each family's characteristic settings."""
    import transformers as tf

    common = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "attn_implementation": "sdpa",
    }

    def qwen2(vocab: int) -> Any:  # Qwen2.5-0.5B: theta 1e6, GQA 14/2, qkv bias, tied
        return tf.Qwen2Config(
            vocab_size=vocab, rope_theta=1e6, tie_word_embeddings=True, use_sliding_window=False,
            **common,
        )  # fmt: skip

    def qwen3(vocab: int) -> Any:  # Qwen3: q/k RMSNorm, head_dim not hidden/heads, theta 1e6
        return tf.Qwen3Config(vocab_size=vocab, rope_theta=1e6, head_dim=16, **common)

    def llama(vocab: int) -> Any:  # Yi / Hermes-2 (Llama 3): theta 5e6 / 5e5, GQA, no bias
        return tf.LlamaConfig(vocab_size=vocab, rope_theta=5e6, **common)

    def phi3(vocab: int) -> Any:  # Phi-3-mini: fused qkv and gate_up, MHA, sliding window
        values = {**common, "num_key_value_heads": 8}
        # Phi-3-mini-4k's window is 2047 tokens; 8 here, so the tiny rows exercise it.
        return tf.Phi3Config(
            vocab_size=vocab, rope_theta=1e4, sliding_window=8, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, **values,
        )  # fmt: skip

    return {"qwen2": qwen2, "qwen3": qwen3, "llama": llama, "phi3": phi3}
