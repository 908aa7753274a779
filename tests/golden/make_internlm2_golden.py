"""Record InternLM2's own outputs on a seeded tiny model: the golden files of test_internlm2.py.

Runs the *remote* InternLM2 code (its configuration/modeling/tokenization files) on the tiny
model of tests/llm_families.py, in a temporary directory outside the repository; nothing of
that code is committed. Made once with the reference's pinned transformers (4.37.2):

    git --git-dir "$(fetch github:OpenGVLab/InternVL)" archive HEAD \
        internvl_chat/internvl/model/internlm2 | tar -x -C /tmp/internvl_src
    pip install --no-deps --target /tmp/tf437 transformers==4.37.2 tokenizers==0.15.2 \
        huggingface_hub==0.20.3
    PYTHONPATH=/tmp/tf437:tests python tests/golden/make_internlm2_golden.py \
        --code /tmp/internvl_src/internvl_chat/internvl/model/internlm2

Writes (tests/assets/):
    internlm2_tiny_tokenizer.model    the tiny sentencepiece model (trained here if absent)
    golden_internlm2_tokenizer.json   ids of TOKENIZER_TEXTS from the remote slow tokenizer
    golden_internlm2_logits.safetensors
        ids.{0,1,2} / alone.{0,1,2}   three samples and their logits, each run alone
        packed                        the three packed in one row (positions restart):
                                      the remote code leaks across samples here
        ids.long / long               one sample longer than max_position_embeddings, so
                                      the dynamic-NTK RoPE rescales
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from llm_families import (  # noqa: E402
    REMOTE_FILES,
    TOKENIZER_CORPUS,
    TOKENIZER_TEXTS,
    golden_sequences,
    seeded_internlm2_state,
    train_sentencepiece,
    write_internlm2_dir,
)

ASSETS = TESTS / "assets"
INTERNVL_TOKENS = [
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
]  # fmt: skip


def tokenizer_golden(directory: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(directory), trust_remote_code=True, use_fast=False, add_eos_token=False
    )
    added = tokenizer.add_tokens(INTERNVL_TOKENS, special_tokens=True)
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "num_added": added,
        "len": len(tokenizer),
        "texts": list(TOKENIZER_TEXTS),
        "ids": [tokenizer(text).input_ids for text in TOKENIZER_TEXTS],
        "ids_no_special": [
            tokenizer(text, add_special_tokens=False).input_ids for text in TOKENIZER_TEXTS
        ],
    }


@torch.no_grad()
def logits_golden(directory: Path, config: dict) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(directory), trust_remote_code=True, torch_dtype=torch.float32
    ).eval()
    expected = seeded_internlm2_state(config)
    loaded = model.state_dict()
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
    samples, long = golden_sequences(config["vocab_size"])
    out: dict[str, torch.Tensor] = {}
    # Short sequences first: the remote dynamic-NTK RoPE keeps its rescaled frequencies once
    # it has seen a long sequence.
    for index, ids in enumerate(samples):
        out[f"ids.{index}"] = ids
        out[f"alone.{index}"] = model(input_ids=ids[None], use_cache=False).logits[0]
    row = torch.cat(samples)[None]
    positions = torch.cat([torch.arange(len(s)) for s in samples])[None]
    out["packed"] = model(input_ids=row, position_ids=positions, use_cache=False).logits[0]
    out["ids.long"] = long
    out["long"] = model(input_ids=long[None], use_cache=False).logits[0]
    return {k: v.contiguous() for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", required=True, type=Path, help="InternVL's internlm2/ folder")
    args = parser.parse_args()
    import transformers

    tokenizer_model = ASSETS / "internlm2_tiny_tokenizer.model"
    if not tokenizer_model.exists():
        with tempfile.TemporaryDirectory() as scratch:
            trained = train_sentencepiece(scratch, TOKENIZER_CORPUS)
            shutil.copyfile(trained, tokenizer_model)
    with tempfile.TemporaryDirectory(prefix="internlm2_remote_") as scratch:
        directory = Path(scratch) / "internlm2"
        config = write_internlm2_dir(directory, tokenizer_model)
        for name in REMOTE_FILES:
            shutil.copyfile(args.code / name, directory / name)
        tokens = tokenizer_golden(directory)
        logits = logits_golden(directory, config)
    tokens["transformers_version"] = transformers.__version__
    (ASSETS / "golden_internlm2_tokenizer.json").write_text(json.dumps(tokens, indent=1) + "\n")
    metadata = {"transformers_version": transformers.__version__, "made_by": Path(__file__).name}
    save_file(logits, str(ASSETS / "golden_internlm2_logits.safetensors"), metadata=metadata)
    print(f"wrote golden files with transformers {transformers.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
