"""The reference's InternVL 2.5 8B and 1B stage scripts, unchanged, on tiny components, 2 ranks.

Each stage is `torchrun --nproc_per_node 2 -m vlpretrain train <the stage's flag file>` with the
placeholder paths pointed at tiny stand-ins: an InternViT, an InternLM2 (internlm2_5-7b-chat's
settings: rope_theta 1e6, dynamic NTK 2.0, GQA, sentencepiece tokenizer, auto_map) and a
Qwen2.5 (rope_theta 1e6, GQA, tied embeddings). The flag files chain the stages themselves:
stage 1.5 loads `./work_dirs/internvl_chat_v2_5/<stage 1 name>/`, which is where stage 1's
OUTPUT_DIR points. Only sizes are overridden with --set (2 steps, 28-px tiles, 1k-token packs,
no loader workers). Then `vlpretrain chat` answers from the last stage, and both exports
(`--to hf`, then `--to internvl` back) give a directory that answers the same.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from llm_families import TOKENIZER_CORPUS, train_sentencepiece, write_internlm2_dir
from train_fixtures import REPO, run_torchrun
from transformers import Qwen2Config, Qwen2ForCausalLM

from vlpretrain.cli import main
from vlpretrain.model import hub
from vlpretrain.model.build import new_vision, save_vision
from vlpretrain.testing.components import TINY_VISION
from vlpretrain.testing.shapes import caption_corpus
from vlpretrain.testing.synthetic import make_shapes_dataset
from vlpretrain.testing.tokenizer import train_tiny_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.dist]

FLAGS_DIR = REPO / "tests" / "assets" / "reference_flags"
RECIPES = {
    "8b_internlm2": [
        "internvl2_5_8b_internlm2_5_7b_dynamic_res_stage1",
        "internvl2_5_8b_internlm2_5_7b_dynamic_res_stage1_5",
        "internvl2_5_8b_internlm2_5_7b_dynamic_res_stage2",
    ],
    "1b_qwen2_5": [
        "internvl2_5_1b_qwen2_5_0_5b_dynamic_res_stage1",
        "internvl2_5_1b_qwen2_5_0_5b_dynamic_res_stage2",
    ],
}
TILE = 28
TINY_SIZES = [
    "train.max_steps=2",
    f"model.force_image_size={TILE}",
    "data.max_seq_length=1024",
    "data.max_dynamic_patch=4",
    "data.max_skip_fraction=0.2",
    "packing.max_packed_tokens=1024",
    "packing.num_images_expected=8",
    "stream.num_workers=0",
    "train.report_to='none'",
    "train.progress_bar=false",
]
"""--set overrides: sizes only; every other setting is the flag file's."""
QUESTION = "<image>\nwhat colour is the circle?"


def tiny_qwen2_5(directory: Path) -> Path:
    """Qwen2.5-0.5B's shape rules at 64 wide: rope_theta 1e6, GQA, qkv bias, tied."""
    tokenizer = train_tiny_tokenizer(directory, caption_corpus(0))
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1e6, tie_word_embeddings=True, use_sliding_window=False,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(str(directory))
    return directory


def tiny_internlm2_5(directory: Path) -> Path:
    """internlm2_5-7b-chat's settings at 64 wide, with a sentencepiece tokenizer."""
    corpus = [*caption_corpus(0), *TOKENIZER_CORPUS]  # + the template's Chinese system prompt
    tokenizer_model = train_sentencepiece(directory / "sp", corpus, vocab_size=700)
    write_internlm2_dir(directory, tokenizer_model, max_position_embeddings=32768)
    return directory


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory) -> dict[str, Path]:
    """The flag files' placeholder paths -> tiny stand-ins."""
    root = tmp_path_factory.mktemp("reference_recipes")
    data = make_shapes_dataset(root / "data", seed=0, num_caption=40, num_qa=24, num_eval=0,
                               image_size=TILE)  # fmt: skip
    vision = save_vision(new_vision(replace(TINY_VISION, image_size=TILE), 0), root / "vit")
    return {
        "./pretrained/InternViT-300M-448px": vision,
        "./pretrained/InternViT-300M-448px-V2_5": vision,
        "./pretrained/internlm2_5-7b-chat": tiny_internlm2_5(root / "internlm2_5"),
        "./pretrained/Qwen2.5-0.5B-Instruct": tiny_qwen2_5(root / "qwen2_5"),
        "./path/to/pretrain/data/mixture.json": data.meta_pretrain_path,
        "./path/to/finetune/data/mixture.json": data.meta_finetune_path,
        "./path/to/finetune/data/mixture_4x.json": data.meta_finetune_path,
        "cache": root / "index_cache",
        "image": next(iter(sorted((data.root / "images").glob("*.png")))),
    }


def stage_argv(name: str, placeholders: dict[str, Path], runs: Path) -> list[str]:
    """The flag file's argv, placeholder paths replaced; OUTPUT_DIR is runs/<stage name>."""
    argv = []
    for token in shlex.split((FLAGS_DIR / f"{name}.flags").read_text()):
        if token == "OUTPUT_DIR":
            token = str(runs / name)
        elif token.startswith("./work_dirs/internvl_chat_v2_5/"):
            token = str(runs / Path(token).name)
        elif token.startswith(("./pretrained/", "./path/to/")):
            token = str(placeholders[token])
        argv.append(token)
    return argv


def losses(stage_dir: Path) -> list[float]:
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if line.strip()]


def parts(stage_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    state = hub.load_weights(stage_dir)
    return {
        part: {k: v for k, v in state.items() if k.startswith(part)}
        for part in ("vision_model.", "mlp1.", "language_model.")
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def answer(model_dir: Path, image: Path, capsys) -> str:
    capsys.readouterr()
    args = ["chat", "--model", str(model_dir), "--image", str(image), "--max-new-tokens", "6"]
    assert main([*args, QUESTION]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_reference_stage_scripts_chain_chat_and_export(recipe, placeholders, tmp_path, capsys):
    runs = tmp_path / "work_dirs"
    cache = ["--set", f"data.cache_dir='{placeholders['cache']}'"]
    for name in RECIPES[recipe]:
        overrides = [arg for item in TINY_SIZES for arg in ("--set", item)]
        run_torchrun("train", *stage_argv(name, placeholders, runs), *overrides, *cache)
        stage = runs / name
        assert (stage / "training_complete.json").is_file(), name
        stage_losses = losses(stage)
        assert len(stage_losses) == 2 and all(math.isfinite(x) for x in stage_losses), name
    stages = [runs / name for name in RECIPES[recipe]]

    llm_config = hub.read_config(stages[-1])["llm_config"]
    theta = llm_config.get("rope_theta") or llm_config["rope_parameters"]["rope_theta"]
    assert theta == 1e6
    before, after = parts(stages[0]), parts(stages[-1])
    assert not same(before["vision_model."], after["vision_model."])  # stage 1.5 / 2 train it
    assert not same(before["language_model."], after["language_model."])  # stage 2 trains it
    if recipe.startswith("8b"):
        assert llm_config["model_type"] == "internlm2"
        assert llm_config["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
        assert "language_model.model.layers.0.attention.wqkv.weight" in after["language_model."]
        middle = parts(stages[1])
        # Stage 1.5 (--freeze_llm True) trains the ViT and projector only.
        assert same(before["language_model."], middle["language_model."])
        assert not same(before["vision_model."], middle["vision_model."])
    else:
        assert llm_config["model_type"] == "qwen2"

    said = answer(stages[-1], placeholders["image"], capsys)
    assert said.strip() or said == "\n"  # a tiny model may answer with spaces; it must answer
    hf_dir, back_dir = tmp_path / "hf", tmp_path / "back"
    assert main(["export", str(stages[-1]), "--to", "hf", str(hf_dir)]) == 0
    assert hub.read_config(hf_dir)["model_type"] == "internvl"
    assert main(["export", str(hf_dir), "--to", "internvl", str(back_dir)]) == 0
    assert answer(back_dir, placeholders["image"], capsys) == said
