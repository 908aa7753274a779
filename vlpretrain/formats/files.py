"""What an exported InternVL chat directory carries besides its weights, for every reader.

The reference and its ecosystem pin transformers 4.37; we run transformers 5. A directory we
write must load unchanged in both, so this module owns the parts that differ:

    llm_config (5.x: rope_parameters, dtype) --with_legacy_keys--> + rope_theta, rope_scaling,
                                                                    torch_dtype, architectures
    tokenizer.save_pretrained (5.x files)    --complete_tokenizer--> + added_tokens_decoder,
                                               special_tokens_map.json, the slow tokenizer's
                                               vocabulary (tokenizer.model | vocab.json +
                                               merges.txt) copied from the source
    tokenizer.json (tokenizers 0.20+ form)   --write_legacy_bpe_files--> merges as "a b"
                                               strings (what tokenizers 0.15 reads), and
                                               vocab.json + merges.txt for a BPE the source
                                               gave no slow files for
    source LLM directory                     --copy_remote_code--> the *.py its auto_map names

The 4.x reader of an LLM config is the family's config constructor (`Qwen2Config`,
`LlamaConfig`, InternVL's `InternLM2Config`): it reads `rope_theta` and `rope_scaling`
({"type": "linear" | "dynamic", "factor": float}, exactly these two keys), never
`rope_parameters`, and InternVL's chat config picks the LLM class by `architectures[0]`.
What it does not do: convert weights or decide which LLM layout is saved (formats/hf.py,
model/build.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

logger = logging.getLogger(__name__)

LEGACY_ROPE_TYPES = ("linear", "dynamic")
"""rope_scaling types a transformers 4.37 reader accepts ({"type", "factor"} only)."""
SLOW_VOCABULARY_FILES = ("tokenizer.model", "vocab.json", "merges.txt")
"""The slow tokenizers' vocabulary: sentencepiece (InternLM2, Llama) or BPE (Qwen2)."""
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
"""Special-token attributes written to special_tokens_map.json when the source has none."""
MERGES_HEADER = "#version: 0.2"
"""First line of a merges.txt (GPT-2's format; the slow BPE tokenizers skip it)."""
FAST_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
"""transformers 5 generic tokenizer class names -> the name a 4.x reader resolves."""


def legacy_rope_keys(rope_parameters: dict[str, Any]) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling` in the form transformers 4.x configs read.

    Linear and dynamic scaling become {"type", "factor"} (what 4.37 validates); other types
    (llama3, yarn, ...) are written in the 4.43+ form, which 4.37 cannot represent.
    """
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    extra = {
        k: v for k, v in rope_parameters.items() if k not in ("rope_theta", "rope_type", "type")
    }
    scaling: dict[str, Any] | None
    if rope_type == "default":
        scaling = None
    elif rope_type in LEGACY_ROPE_TYPES:
        scaling = {"type": rope_type, "factor": float(extra["factor"])}
        if set(extra) != {"factor"}:
            logger.warning("rope_scaling %s: 4.x readers see only type and factor", extra)
    else:
        scaling = {"type": rope_type, "rope_type": rope_type, **extra}
        logger.warning("rope_type %r has no transformers 4.37 form; 4.43+ readers only", rope_type)
    return {"rope_theta": float(rope_parameters["rope_theta"]), "rope_scaling": scaling}


def with_legacy_keys(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """A saved LLM config carrying the 4.x keys beside the 5.x ones.

    Args:
        config: the config dict as transformers 5 writes it (`rope_parameters`, `dtype`).
        dtype: the dtype of the saved weights ("bfloat16", "float32").

    Raises:
        ValueError: the config names no architecture and its model_type has no causal-LM class.
    """
    out = dict(config)
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        # "type" is a 4.x alias transformers 5 keeps when it reads a 4.x config; dropping it
        # keeps a save -> load -> save round trip identical.
        out["rope_parameters"] = {k: v for k, v in rope.items() if k != "type"}
        out.update(legacy_rope_keys(rope))
    out["dtype"] = dtype
    out["torch_dtype"] = dtype
    if not out.get("architectures"):
        model_type = str(out.get("model_type"))
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(
                f"llm_config of model_type {model_type!r} names no architectures; InternVL's "
                "chat config picks the LLM class by architectures[0]"
            )
        out["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    return out


def complete_tokenizer(tokenizer: Any, source: Path | None, destination: Path) -> list[str]:
    """Add what 4.x readers need to the tokenizer files transformers 5 wrote in `destination`.

    - tokenizer_config.json gets `added_tokens_decoder` (4.x slow tokenizers read added
      tokens, such as the InternVL ones, only from there) and a class name 4.x resolves;
    - special_tokens_map.json is copied from `source`, or written from the tokenizer;
    - the slow tokenizer's vocabulary files are copied from `source` where it has them;
    - a BPE tokenizer.json gets its older form and its slow files (write_legacy_bpe_files).
    Returns the names of the files added or changed.
    """
    written = []
    config_path = destination / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["added_tokens_decoder"] = {
        str(index): _token_state(token)
        for index, token in sorted(tokenizer.added_tokens_decoder.items())
    }
    tokenizer_class = config.get("tokenizer_class")
    config["tokenizer_class"] = FAST_ONLY_TOKENIZER_CLASSES.get(tokenizer_class, tokenizer_class)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    written.append(config_path.name)
    special_map = destination / "special_tokens_map.json"
    if source is not None and (source / special_map.name).is_file():
        if (source / special_map.name).resolve() != special_map.resolve():
            shutil.copyfile(source / special_map.name, special_map)
    elif not special_map.exists():
        tokens = {name: getattr(tokenizer, name) for name in SPECIAL_TOKEN_NAMES}
        present = {name: str(token) for name, token in tokens.items() if token is not None}
        special_map.write_text(json.dumps(present, indent=2, ensure_ascii=False) + "\n")
    written.append(special_map.name)
    for name in SLOW_VOCABULARY_FILES:
        if source is not None and (source / name).is_file():
            if (source / name).resolve() != (destination / name).resolve():
                shutil.copyfile(source / name, destination / name)
            written.append(name)
    written += [name for name in write_legacy_bpe_files(destination) if name not in written]
    return written


def _bpe_merges_as_text(model: dict[str, Any], path: Path) -> list[str] | None:
    """The BPE merges as "left right" strings; None (with a warning) if a piece has a space."""
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    pairs = [m for m in model["merges"] if not isinstance(m, str)]
    if any(" " in piece for pair in pairs for piece in pair):
        logger.warning(
            "%s: a BPE merge holds a space, which tokenizers 0.15 and the slow tokenizers "
            "cannot represent; readers older than tokenizers 0.20 cannot load it",
            path,
        )
        return None
    return merges


def write_legacy_bpe_files(directory: Path) -> list[str]:
    """Make `directory`'s BPE tokenizer readable by the reference's tokenizers and slow classes.

    tokenizers 0.20+ writes each BPE merge as a pair of strings; tokenizers 0.15 (the
    reference's, under transformers 4.37) reads only "left right" strings and refuses the
    whole file. Newer tokenizers read both, so tokenizer.json is rewritten with strings. The
    slow BPE tokenizers (Qwen2Tokenizer, the reference's `--use_fast_tokenizer False`) read
    vocab.json + merges.txt instead: they are written from tokenizer.json where the directory
    has none. Returns the names of the files written; a non-BPE tokenizer is left as it is.
    """
    path = directory / "tokenizer.json"
    if not path.is_file():
        return []
    content = json.loads(path.read_text(encoding="utf-8"))
    model = content.get("model", {})
    if model.get("type") != "BPE" or (merges := _bpe_merges_as_text(model, path)) is None:
        return []
    written = []
    if merges != model["merges"]:
        model["merges"] = merges
        path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(path.name)
    if not (directory / "vocab.json").exists() and not (directory / "merges.txt").exists():
        vocab = json.dumps(model["vocab"], ensure_ascii=False) + "\n"
        (directory / "vocab.json").write_text(vocab, encoding="utf-8")
        text = "\n".join([MERGES_HEADER, *merges]) + "\n"
        (directory / "merges.txt").write_text(text, encoding="utf-8")
        written += ["vocab.json", "merges.txt"]
    return written


def _token_state(token: Any) -> dict[str, Any]:
    state = dict(token.__getstate__())
    state.setdefault("special", False)
    return state
