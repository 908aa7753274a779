"""InternLM2 / InternLM2.5 as a transformers-native Llama, and back to InternLM2's own layout.

InternLM2 ships as remote code whose attention builds its own causal mask, so packed samples
would attend to each other. Its maths is Llama's: RMSNorm, SwiGLU, RoPE (optionally with
linear or dynamic-NTK scaling computed from the sequence length), grouped-query attention.
Only the names differ, and q, k and v are fused into one `wqkv` matrix whose rows are grouped
per key/value head:

    wqkv rows = [ q(head g*r) ... q(head g*r + r-1), k(g), v(g) ]  for g in 0 .. kv_heads-1
                (r = heads / kv_heads query heads per group, each head_dim rows)

    InternLM2 (its checkpoints)              Llama (what we train)
    model.tok_embeddings                     model.embed_tokens
    model.layers.N.attention.wqkv       <->  model.layers.N.self_attn.{q,k,v}_proj
    model.layers.N.attention.wo              model.layers.N.self_attn.o_proj
    model.layers.N.feed_forward.w1/w3/w2     model.layers.N.mlp.gate_proj/up_proj/down_proj
    model.layers.N.attention_norm/ffn_norm   model.layers.N.input/post_attention_layernorm
    model.norm                               model.norm
    output                                   lm_head

Loading converts config and weights to Llama, so transformers' own packed-row masking
(position_ids restart, use_cache=False) applies; saving converts back, with the InternLM2
config keys (`model_type internlm2`, `auto_map`, `bias`, `rope_theta`, `rope_scaling`), so
the InternVL ecosystem loads the result with its InternLM2 code unchanged. The converted
model's logits equal the remote code's (golden file, tests/unit/test_internlm2.py).
`ADAPTER` wraps these conversions as InternLM2's FamilyAdapter (registered in
model/families.py), with its tokenizer read without remote code (model/sentencepiece_tokenizer.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig

from vlpretrain.model.family_adapter import FamilyAdapter
from vlpretrain.model.sentencepiece_tokenizer import (
    REMOTE_CLASS_NAMES,
    InternLM2SentencePieceTokenizer,
)

logger = logging.getLogger(__name__)

MODEL_TYPE = "internlm2"
SOURCE_KEY = "internlm2_source"
"""Attribute of a converted LlamaConfig: the InternLM2 config it came from and the directory
holding its remote-code files, so saving writes InternLM2 back. Never written to disk."""
REMOTE_CODE_FILES = (
    "configuration_internlm2.py",
    "modeling_internlm2.py",
    "tokenization_internlm2.py",
    "tokenization_internlm2_fast.py",
)
DEFAULT_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
"""auto_map of the released internlm2_5-*-chat directories (used when the source had none)."""

SAME_NAME_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
)
"""InternLM2Config keys that LlamaConfig reads under the same name and meaning."""
CONVERTED_KEYS = ("bias", "rope_theta", "rope_scaling", "pretraining_tp")
NO_EFFECT_KEYS = frozenset(
    {
        # InternLM2Config's own keys that do not change the forward pass.
        "attn_implementation", "use_cache", "auto_map", "architectures", "model_type",
        # PretrainedConfig's generic keys (transformers 4.37 and 5.x) a saved config carries.
        "_name_or_path", "add_cross_attention", "bad_words_ids", "begin_suppress_tokens",
        "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id",
        "diversity_penalty", "do_sample", "dtype", "early_stopping",
        "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "finetuning_task",
        "forced_bos_token_id", "forced_eos_token_id", "id2label", "is_decoder",
        "is_encoder_decoder", "label2id", "length_penalty", "max_length", "min_length",
        "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences",
        "output_attentions", "output_hidden_states", "output_scores", "prefix", "problem_type",
        "pruned_heads", "remove_invalid_values", "repetition_penalty", "return_dict",
        "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params",
        "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tokenizer_class", "top_k",
        "top_p", "torch_dtype", "torchscript", "transformers_version", "typical_p",
        "use_bfloat16", "_attn_implementation_autoset", "_commit_hash",
    }
)  # fmt: skip
"""Keys dropped on conversion (kept in the source dict and written back on save)."""


def is_internlm2(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


# ----------------------------------------------------------------------------- configs


def _rope_parameters(source: dict[str, Any], where: str) -> dict[str, Any]:
    theta = float(source.get("rope_theta", 10000))
    scaling = source.get("rope_scaling")
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in ("linear", "dynamic") or set(scaling) - {"type", "rope_type", "factor"}:
        raise ValueError(
            f"{where}: rope_scaling {scaling} is not InternLM2's {{type: linear|dynamic, factor}}"
        )
    return {"rope_type": kind, "rope_theta": theta, "factor": float(scaling["factor"])}


def llama_config_from_internlm2(
    source: dict[str, Any], code_dir: str | Path | None = None, where: str = "llm config"
) -> LlamaConfig:
    """The LlamaConfig computing what InternLM2 `source` computes; raises on keys whose effect
    it cannot reproduce (naming them and `where` they came from)."""
    known = set(SAME_NAME_KEYS) | set(CONVERTED_KEYS) | NO_EFFECT_KEYS
    unknown = sorted(set(source) - known)
    if unknown:
        raise ValueError(
            f"{where}: InternLM2 keys {unknown} have no Llama equivalent; refusing to convert "
            "(they might change the model's output)"
        )
    if source.get("pretraining_tp", 1) != 1:
        raise ValueError(f"{where}: pretraining_tp {source['pretraining_tp']} is not supported")
    values = {k: source[k] for k in SAME_NAME_KEYS if k in source}
    heads = values.get("num_attention_heads", 32)
    values.setdefault("num_key_value_heads", heads)
    bias = bool(source.get("bias", True))
    config = LlamaConfig(
        **values,
        head_dim=values.get("hidden_size", 4096) // heads,
        attention_bias=bias,
        mlp_bias=False,
        rope_parameters=_rope_parameters(source, where),
    )
    setattr(config, SOURCE_KEY, {"config": dict(source), "code_dir": str(code_dir or "")})
    return config


def _rope_scaling(rope: dict[str, Any]) -> dict[str, Any] | None:
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return None
    if kind not in ("linear", "dynamic"):
        raise ValueError(f"rope type {kind!r} has no InternLM2 equivalent")
    return {"type": kind, "factor": float(rope["factor"])}


def internlm2_config_from_llama(config: Any) -> dict[str, Any]:
    """The InternLM2 config dict of a converted Llama config (the source's other keys kept)."""
    source = getattr(config, SOURCE_KEY, None) or {"config": {}}
    out = dict(source["config"])
    out.pop("dtype", None)
    rope = dict(config.rope_parameters or {})
    out.update({k: getattr(config, k) for k in SAME_NAME_KEYS})
    out.update(
        model_type=MODEL_TYPE,
        architectures=["InternLM2ForCausalLM"],
        bias=bool(config.attention_bias),
        rope_theta=rope.get("rope_theta", 10000.0),
        rope_scaling=_rope_scaling(rope),
    )
    out.setdefault("auto_map", DEFAULT_AUTO_MAP)
    out.setdefault("attn_implementation", "eager")
    return out


def is_converted(config: Any) -> bool:
    """Whether `config` is a Llama config made from InternLM2 (saved back as InternLM2)."""
    return getattr(config, SOURCE_KEY, None) is not None


def source_code_dir(config: Any) -> Path | None:
    source = getattr(config, SOURCE_KEY, None)
    return Path(source["code_dir"]) if source and source["code_dir"] else None


# ----------------------------------------------------------------------------- weights

LAYER_RENAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_RENAMES = {
    "model.tok_embeddings": "model.embed_tokens",
    "model.norm": "model.norm",
    "output": "lm_head",
}
QKV = ("q_proj", "k_proj", "v_proj")


def _shape(config: Any) -> tuple[int, int, int]:
    """(kv_heads, query heads per kv head, head_dim)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    return kv_heads, heads // kv_heads, config.hidden_size // heads


def split_wqkv(wqkv: torch.Tensor, config: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's grouped wqkv (weight (rows, hidden) or bias (rows,)) -> q, k, v."""
    kv_heads, group, head_dim = _shape(config)
    grouped = wqkv.reshape(kv_heads, group + 2, head_dim, *wqkv.shape[1:])
    rest = wqkv.shape[1:]
    q = grouped[:, :group].reshape(kv_heads * group * head_dim, *rest)
    k = grouped[:, group].reshape(kv_heads * head_dim, *rest)
    v = grouped[:, group + 1].reshape(kv_heads * head_dim, *rest)
    return q, k, v


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Any) -> torch.Tensor:
    """Inverse of split_wqkv."""
    kv_heads, group, head_dim = _shape(config)
    rest = q.shape[1:]
    grouped = torch.cat(
        [
            q.reshape(kv_heads, group, head_dim, *rest),
            k.reshape(kv_heads, 1, head_dim, *rest),
            v.reshape(kv_heads, 1, head_dim, *rest),
        ],
        dim=1,
    )
    return grouped.reshape(-1, *rest)


def _split_layer_key(rest: str) -> tuple[str, str, str] | None:
    """'layers.N.module.path.param' -> ('N', 'module.path', 'param')."""
    parts = rest.split(".")
    if len(parts) < 4 or parts[0] != "layers":
        return None
    return parts[1], ".".join(parts[2:-1]), parts[-1]


FusedHook = Callable[[str, str, str, torch.Tensor, dict[str, torch.Tensor]], bool]
"""(layer prefix, module, param, tensor, out) -> True when it wrote (or skipped) the tensor."""


def _rename_state(
    state: dict[str, torch.Tensor],
    prefix: str,
    top: dict[str, str],
    layers: dict[str, str],
    fused: FusedHook,
    error: str,
) -> dict[str, torch.Tensor]:
    """Tensors under `prefix` renamed by the `top` and per-layer `layers` tables; `fused`
    handles the q/k/v <-> wqkv tensors. Others pass unchanged; an unknown name is an error."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        rest = key[len(prefix) :]
        module, _, param = rest.rpartition(".")
        if module in top:
            out[f"{prefix}{top[module]}.{param}"] = value
            continue
        layer = _split_layer_key(rest.removeprefix("model."))
        if layer is None:
            unknown.append(key)
            continue
        index, module, param = layer
        base = f"{prefix}model.layers.{index}."
        if fused(base, module, param, value, out):
            continue
        if module in layers:
            out[f"{base}{layers[module]}.{param}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{error}: {sorted(unknown)}")
    return out


def state_to_llama(
    state: dict[str, torch.Tensor], config: Any, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """InternLM2 tensors under `prefix` renamed (wqkv split) to Llama's; others unchanged."""

    def split(
        base: str, module: str, param: str, value: torch.Tensor, out: dict[str, torch.Tensor]
    ) -> bool:
        if module != "attention.wqkv":
            return False
        for name, part in zip(QKV, split_wqkv(value, config), strict=True):
            out[f"{base}self_attn.{name}.{param}"] = part
        return True

    return _rename_state(
        state, prefix, TOP_RENAMES, LAYER_RENAMES, split, "InternLM2 tensors without a Llama name"
    )


def state_to_internlm2(
    state: dict[str, torch.Tensor], config: Any, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Inverse of state_to_llama: Llama tensors under `prefix` in InternLM2's layout."""

    def fuse(
        base: str, module: str, param: str, value: torch.Tensor, out: dict[str, torch.Tensor]
    ) -> bool:
        if module == "self_attn.q_proj":
            q, k, v = (state[f"{base}self_attn.{name}.{param}"] for name in QKV)
            out[f"{base}attention.wqkv.{param}"] = fuse_wqkv(q, k, v, config)
        return module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

    top = {v: k for k, v in TOP_RENAMES.items()}
    layers = {v: k for k, v in LAYER_RENAMES.items()}
    return _rename_state(
        state, prefix, top, layers, fuse, "Llama tensors without an InternLM2 name"
    )


# ----------------------------------------------------------------------------- files


TOKENIZER_CLASS = "InternLM2Tokenizer"
TOKENIZER_AUTO_MAP = {
    "AutoTokenizer": [
        "tokenization_internlm2.InternLM2Tokenizer",
        "tokenization_internlm2_fast.InternLM2TokenizerFast",
    ]
}


def save_internlm2_files(config: Any, tokenizer: Any, directory: Path) -> None:
    """After a save: InternLM2's remote-code files beside the config, and tokenizer_config.json
    naming InternLM2's own tokenizer class (we read it natively; InternVL-era readers use
    auto_map), with its BOS setting spelled out."""
    copy_remote_code(source_code_dir(config), directory)
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return
    tokenizer_config = json.loads(path.read_text())
    tokenizer_config.pop("backend", None)
    tokenizer_config.update(
        tokenizer_class=TOKENIZER_CLASS,
        add_bos_token=bool(getattr(tokenizer, "add_bos_token", True)),
        add_eos_token=bool(getattr(tokenizer, "add_eos_token", False)),
    )
    tokenizer_config.setdefault("auto_map", TOKENIZER_AUTO_MAP)
    path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


def copy_remote_code(source: Path | None, destination: Path) -> list[str]:
    """Copy InternLM2's remote-code files that exist in `source` (configuration, modeling,
    tokenization), which the saved `auto_map`s point at; returns the names copied."""
    if source is None or not source.is_dir():
        return []
    copied = [name for name in REMOTE_CODE_FILES if (source / name).is_file()]
    for name in copied:
        if (source / name).resolve() != (destination / name).resolve():
            shutil.copyfile(source / name, destination / name)
    missing = [name for name in REMOTE_CODE_FILES[:2] if name not in copied]
    if missing:
        logger.warning(
            "%s has no %s: readers that load InternLM2 through auto_map need them beside the "
            "saved config",
            source,
            ", ".join(missing),
        )
    return copied


# ----------------------------------------------------------------------------- adapter


def is_internlm2_tokenizer(directory: Path) -> bool:
    """Whether `directory` holds InternLM2's remote-code tokenizer (its tokenizer_config.json
    names InternLM2Tokenizer beside a sentencepiece tokenizer.model)."""
    config_path = directory / "tokenizer_config.json"
    if not (config_path.is_file() and (directory / "tokenizer.model").is_file()):
        return False
    try:
        tokenizer_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: invalid JSON ({error})") from None
    return tokenizer_config.get("tokenizer_class") in REMOTE_CLASS_NAMES


def require_sentencepiece(directory: Path) -> None:
    """Raise a clear ImportError naming the packages when sentencepiece is missing."""
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        raise ImportError(
            f"{directory}/tokenizer.model is an InternLM2 sentencepiece tokenizer, which needs "
            "the 'sentencepiece' package: pip install 'vlpretrain[internlm2]' "
            "(sentencepiece, einops)"
        ) from None


class InternLM2Adapter(FamilyAdapter):
    """InternLM2 trained as a Llama and saved back in its own layout (this module's functions)."""

    reads_directory_natively = False

    def owns(self, native_config: Any) -> bool:
        return is_converted(native_config)

    def native_config(
        self,
        config_dict: dict[str, Any],
        code_dir: str | Path | None = None,
        where: str = "llm config",
    ) -> LlamaConfig:
        return llama_config_from_internlm2(config_dict, code_dir=code_dir, where=where)

    def disk_config(self, native_config: Any) -> dict[str, Any]:
        return internlm2_config_from_llama(native_config)

    def native_config_dict(self, config_dict: dict[str, Any], where: str) -> dict[str, Any]:
        llm_config = self.native_config(config_dict, where=where).to_dict()
        llm_config.pop(SOURCE_KEY, None)
        return llm_config

    def to_native_state(
        self, state: dict[str, torch.Tensor], native_config: Any, prefix: str = ""
    ) -> dict[str, torch.Tensor]:
        return state_to_llama(state, native_config, prefix)

    def to_disk_state(
        self, state: dict[str, torch.Tensor], native_config: Any, prefix: str = ""
    ) -> dict[str, torch.Tensor]:
        return state_to_internlm2(state, native_config, prefix)

    def load_tokenizer(self, directory: Path) -> Any | None:
        if not is_internlm2_tokenizer(directory):
            return None
        require_sentencepiece(directory)
        return InternLM2SentencePieceTokenizer.from_pretrained(str(directory))

    def save_files(self, native_config: Any, tokenizer: Any, source: Path, directory: Path) -> None:
        # The remote code comes from the LLM's own directory (recorded on load), whichever
        # directory the tokenizer came from.
        save_internlm2_files(native_config, tokenizer, directory)


ADAPTER = InternLM2Adapter(MODEL_TYPE, "LlamaForCausalLM (converted from InternLM2's layout)")
"""InternLM2's FamilyAdapter (registered in model/families.py)."""
