"""Language-model loading for training: an LLM of a supported family, untied, InternVL tokens.

Jobs: load an LLM directory (and its tokenizer) or build one from a config dict, give it the
InternVL special tokens (embedding resize with mean-initialised rows), and untie input and
output embeddings so that saving never drops `lm_head` (the reference loses it for tied LLMs).
Every family runs as a transformers-native model (converted ones through their adapter;
unsupported families refused, model/families.py), and training always
runs with `use_cache=False`: only then does transformers derive the block-diagonal mask of
packed rows from restarting `position_ids`. Nothing from a directory executes unless
`trust_remote_code` is set (model.trust_remote_code).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

from vlpretrain.model import hub
from vlpretrain.model.families import converted_tokenizer, family_adapter
from vlpretrain.tokens import add_internvl_tokens

logger = logging.getLogger(__name__)

LORA_TARGETS: dict[str, list[str]] = {
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
"""LoRA target modules per LLM family, by the native model_type it trains as:
Qwen2/Qwen3/Llama and InternLM2 (converted to a Llama) use 'default'."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return cast(dict[str, Any], json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None


def _tokenizer_needs_remote_code(directory: Path) -> str | None:
    """The remote tokenizer class `directory` names (through auto_map), if transformers has no
    class of that name; None when a native class reads it."""
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    tokenizer_config = _read_json(config_path)
    class_name = tokenizer_config.get("tokenizer_class")
    auto_map = tokenizer_config.get("auto_map", {})
    if not class_name or "AutoTokenizer" not in auto_map:
        return None
    if tokenizer_class_from_name(class_name) is not None:
        return None
    return str(class_name)


def slow_tokenizer_ref(directory: Path) -> str | None:
    """The directory's own slow (sentencepiece) tokenizer class reference, or None.

    That is the first entry of tokenizer_config.json's `auto_map.AutoTokenizer` (InternLM2's
    InternLM2Tokenizer). transformers 5 ignores `use_fast` and keeps one tokenizer class per
    built-in family, so a directory without remote code has no slow alternative.
    """
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    auto_map = _read_json(config_path).get("auto_map") or {}
    refs = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
    if not isinstance(refs, list | tuple) or not refs or not refs[0]:
        return None
    return str(refs[0])


def _directory_tokenizer(directory: Path, trust_remote_code: bool, use_fast: bool) -> Any:
    """The tokenizer `directory` names, through transformers (remote code only when allowed)."""
    extra: dict[str, Any] = {}
    config_path = directory / "config.json"
    if config_path.exists() and _read_json(config_path).get("model_type") == "internvl_chat":
        # transformers has no config class for internvl_chat; without this it warns that it
        # is "instantiating a model of another type" while only reading the tokenizer.
        extra["config"] = PretrainedConfig()
    if not use_fast and (slow_ref := slow_tokenizer_ref(directory)) is not None:
        if not trust_remote_code:
            raise ValueError(
                f"{directory}/tokenizer_config.json: the slow tokenizer {slow_ref} "
                "(use_fast_tokenizer false) exists only as remote code; loading it runs Python "
                "from that directory. Set model.trust_remote_code = true to allow it"
            )
        slow: Any = get_class_from_dynamic_module(slow_ref, str(directory), trust_remote_code=True)
        return slow.from_pretrained(str(directory), trust_remote_code=True, **extra)
    if not use_fast:
        logger.info("%s has no slow tokenizer of its own; using the fast one", directory)
    remote_class = _tokenizer_needs_remote_code(directory)
    if remote_class and not trust_remote_code:
        raise ValueError(
            f"{directory}/tokenizer_config.json: tokenizer_class {remote_class} exists only "
            "as remote code (auto_map); loading it runs Python from that directory. Set "
            "model.trust_remote_code = true to allow it"
        )
    return AutoTokenizer.from_pretrained(
        str(directory), trust_remote_code=trust_remote_code, **extra
    )


def load_tokenizer(
    path: str | Path, trust_remote_code: bool = False, use_fast: bool = True
) -> tuple[Any, int]:
    """The tokenizer with the InternVL tokens added, and how many were new (0 on Path A).

    A converted family's remote tokenizer is replaced by its adapter's (InternLM2's by
    InternLM2SentencePieceTokenizer: same ids, no code from the directory; it is the slow
    sentencepiece tokenizer either way). Any other tokenizer that only exists as remote code
    needs `trust_remote_code` (model.trust_remote_code); without it the error names that
    setting. `use_fast` False
    selects the directory's own slow tokenizer where it has one (the reference's
    `--use_fast_tokenizer False`; remote code, so it also needs `trust_remote_code`), else the
    one transformers 5 has (logged).
    """
    directory = Path(path)
    tokenizer = converted_tokenizer(directory)
    if tokenizer is None:
        tokenizer = _directory_tokenizer(directory, trust_remote_code, use_fast)
    added = add_internvl_tokens(tokenizer)
    logger.info("tokenizer %s: %d InternVL tokens added, %d in total", path, added, len(tokenizer))
    return tokenizer, added


def load_llm(path: str | Path, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A pretrained causal LM from a local directory, in fp32 (autocast handles bf16), as a
    transformers-native model whose packed rows are isolated (a converted family through its
    adapter: config and tensors converted, then handed to the native class).

    No LLM runs its remote code, whatever trust_remote_code says: the supported families are
    native or converted, the others are refused before loading (families.py). Nor Hub kernels:
    transformers 5.25 turns them on by default (code fetched from the Hub replaces layers), and
    its kernelize() then fails in train() on the meta device that FSDP's init builds on.
    """
    directory = Path(path)
    raw = _read_json(directory / "config.json")
    where = f"{directory}/config.json"
    adapter = family_adapter(raw, where)
    if adapter.reads_directory_natively:
        return AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=torch.float32, attn_implementation=attn_implementation,
            use_kernels=False,
        )  # fmt: skip
    config = adapter.native_config(raw, code_dir=directory, where=where)
    state = adapter.to_native_state(hub.load_weights(directory), config)
    return _from_state(config, state, attn_implementation, directory)


def _from_state(
    config: PretrainedConfig,
    state: dict[str, torch.Tensor],
    attn_implementation: str,
    directory: Path,
) -> PreTrainedModel:
    """The native causal LM of `config` from converted tensors (meta init, then the tensors
    cast to fp32)."""
    # Any: the lazy mapping's stub types its values as tuples; it returns the model class.
    model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # output_loading_info makes from_pretrained return (model, info); its stub says model only.
    loaded: Any = model_class.from_pretrained(
        None,
        config=config,
        state_dict=state,
        dtype=torch.float32,
        attn_implementation=attn_implementation,
        output_loading_info=True,
        use_kernels=False,  # see load_llm
    )
    model, info = loaded
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
    if problems:
        raise ValueError(f"{directory}: converted weights do not match: {problems}")
    return cast(PreTrainedModel, model)


def llm_from_config(
    config_dict: dict[str, Any],
    attn_implementation: str = "sdpa",
    code_dir: str | Path | None = None,
) -> PreTrainedModel:
    """An LLM shaped like `config_dict` (a saved `llm_config`); weights uninitialised.

    The family's adapter makes the native config (a converted family's `code_dir`: where its
    remote-code files are, copied again when saving); the weights must then go through the
    adapter's to_native_state.
    """
    adapter = family_adapter(config_dict, "llm_config")
    config = adapter.native_config(config_dict, code_dir=code_dir, where="llm_config")
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


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
