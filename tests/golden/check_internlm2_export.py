"""Check that an InternVL chat directory we wrote with an InternLM2 LLM loads in InternVL-era
code: transformers 4.37.2 + InternLM2's own remote code, reading `llm_config` and the
`language_model.*` tensors as InternVLChatModel does.

Two steps, one per environment:

    # 1. with the reference's transformers (see make_internlm2_golden.py for the set-up):
    PYTHONPATH=/tmp/tf437 python tests/golden/check_internlm2_export.py remote \
        --model STAGE_DIR --code /tmp/internvl_src/internvl_chat/internvl/model/internlm2 \
        --out /tmp/remote.pt
    # 2. with vlpretrain's environment:
    python tests/golden/check_internlm2_export.py ours --model STAGE_DIR --out /tmp/remote.pt

Step 1 loads the remote InternLM2 model and slow tokenizer from the directory's own files,
tokenises a prompt and records ids and logits; step 2 loads the same directory with
vlpretrain (Path A) and prints the id match and the max logit difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PROMPT = "<|im_start|>user\nhow many shapes are there?<|im_end|>\n<|im_start|>assistant\n"
PREFIX = "language_model."


def llm_state(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(model_dir / name)))
    return {k[len(PREFIX) :]: v.float() for k, v in state.items() if k.startswith(PREFIX)}


@torch.no_grad()
def remote(model_dir: Path, code: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm_config = json.loads((model_dir / "config.json").read_text())["llm_config"]
    with tempfile.TemporaryDirectory() as scratch:
        llm_dir = Path(scratch)
        (llm_dir / "config.json").write_text(json.dumps(llm_config))
        save_file(llm_state(model_dir), str(llm_dir / "model.safetensors"), {"format": "pt"})
        for name in ("configuration_internlm2.py", "modeling_internlm2.py"):
            shutil.copyfile(code / name, llm_dir / name)
        model = AutoModelForCausalLM.from_pretrained(
            str(llm_dir), trust_remote_code=True, torch_dtype=torch.float32
        ).eval()
    tokenizer = AutoTokenizer.from_pretrained(
        str(model_dir), trust_remote_code=True, use_fast=False
    )
    ids = tokenizer(PROMPT).input_ids
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    torch.save({"ids": ids, "logits": logits, "class": type(model).__name__}, out)
    print(f"remote {type(model).__name__} / {type(tokenizer).__name__}: {len(ids)} ids")


@torch.no_grad()
def ours(model_dir: Path, out: Path) -> None:
    from vlpretrain.model.build import ModelConfig, build_model

    recorded = torch.load(out, weights_only=True)
    built = build_model(ModelConfig(model_name_or_path=str(model_dir)))
    ids = built.tokenizer(PROMPT).input_ids
    llm = built.model.language_model.eval()
    logits = llm(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    diff = float((logits - recorded["logits"]).abs().max()) if ids == recorded["ids"] else None
    print(f"ids equal: {ids == recorded['ids']}; max |logit diff| vs remote code: {diff}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["remote", "ours"])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--code", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    if args.step == "remote":
        remote(args.model, args.code, args.out)
    else:
        ours(args.model, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
