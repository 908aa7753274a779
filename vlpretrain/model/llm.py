"""Language-model loading for training: any local HF causal LM, untied, with InternVL tokens.

Jobs: load an `AutoModelForCausalLM` directory or build one from a config dict, give it the
InternVL special tokens (embedding resize with mean-initialised rows), and untie input and
output embeddings so that saving never drops `lm_head` (the reference loses it, spec 9.5).
Training always runs with `use_cache=False`: only then does transformers derive the
block-diagonal mask of packed rows from restarting `position_ids`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from vlpretrain.tokens import add_internvl_tokens

logger = logging.getLogger(__name__)

LORA_TARGETS: dict[str, list[str]] = {
    "internlm2": [
        "attention.wqkv",
        "attention.wo",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    ],
    "phi3": ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"],
    "default": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ],
}
"""LoRA target modules per LLM family (spec 7.7); Qwen2/Qwen3/Llama use 'default'."""


def slow_tokenizer_class(path: str | Path, trust_remote_code: bool) -> type | None:
    """The directory's own slow (sentencepiece) tokenizer class, or None when it has none.

    That is the first entry of tokenizer_config.json's `auto_map.AutoTokenizer` (InternLM2's
    InternLM2Tokenizer). transformers 5 ignores `use_fast` and keeps one tokenizer class per
    built-in family, so a directory without remote code has no slow alternative.
    """
    config_path = Path(path) / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    auto_map = json.loads(config_path.read_text()).get("auto_map") or {}
    refs = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
    if not isinstance(refs, list | tuple) or not refs or not refs[0]:
        return None
    return cast(type, get_class_from_dynamic_module(
        refs[0], str(path), trust_remote_code=trust_remote_code))  # fmt: skip


def load_tokenizer(path: str | Path, use_fast: bool = True) -> tuple[Any, int]:
    """The tokenizer with the InternVL tokens added, and how many were new (0 on Path A).

    `use_fast` False selects the directory's slow tokenizer where it has one (the reference's
    `--use_fast_tokenizer False`), else the one transformers 5 has (logged).
    """
    config_path = Path(path) / "config.json"
    extra = {}
    if (
        config_path.exists()
        and json.loads(config_path.read_text()).get("model_type") == "internvl_chat"
    ):
        # transformers has no config class for internvl_chat; without this it warns that it
        # is "instantiating a model of another type" while only reading the tokenizer.
        extra["config"] = PretrainedConfig()
    slow = None if use_fast else slow_tokenizer_class(path, trust_remote_code=True)
    if slow is not None:
        tokenizer = cast(Any, slow).from_pretrained(str(path), trust_remote_code=True, **extra)
    else:
        if not use_fast:
            logger.info("%s has no slow tokenizer of its own; using the fast one", path)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True, **extra)
    added = add_internvl_tokens(tokenizer)
    logger.info("tokenizer %s: %d InternVL tokens added, %d in total", path, added, len(tokenizer))
    return tokenizer, added


def load_llm(path: str | Path, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A pretrained causal LM from a local directory, in fp32 (autocast handles bf16)."""
    return AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=torch.float32,
        attn_implementation=attn_implementation,
        trust_remote_code=True,
    )


def llm_from_config(
    config_dict: dict[str, Any], attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    """An LLM shaped like `config_dict` (a saved `llm_config`); weights uninitialised."""
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=True)


def untie_embeddings(llm: PreTrainedModel) -> None:
    """Give lm_head its own copy of the embedding matrix and mark the config untied."""
    head = llm.get_output_embeddings()
    embed = llm.get_input_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone())
    llm.config.tie_word_embeddings = False
    text_config = getattr(llm.config, "text_config", None)
    if text_config is not None:
        text_config.tie_word_embeddings = False


def resize_for_tokens(llm: PreTrainedModel, vocab_size: int, num_new_tokens: int) -> None:
    """Resize embeddings to `vocab_size`; the last `num_new_tokens` rows get the mean row.

    The mean is taken over the rows of the tokens that existed before (not padding rows of
    checkpoints whose matrix is larger than their tokenizer, such as Qwen2.5). The reference
    sets new output rows to the mean and leaves new input rows to HF's random init (or to
    whatever a padding row held); we use the mean for both, which keeps stage 1 well
    conditioned.
    """
    if num_new_tokens == 0:
        return
    llm.resize_token_embeddings(vocab_size, mean_resizing=False)
    first_new = vocab_size - num_new_tokens
    with torch.no_grad():
        for embeddings in (llm.get_input_embeddings(), llm.get_output_embeddings()):
            matrix = cast(torch.Tensor, embeddings.weight)
            matrix[first_new:] = matrix[:first_new].mean(dim=0, keepdim=True)
    llm.config.vocab_size = vocab_size


def llm_family(llm: PreTrainedModel) -> str:
    model_type = getattr(llm.config, "model_type", "")
    return model_type if model_type in LORA_TARGETS else "default"
