"""How well the demo's pretrained LLM answers from perfect "pictures in words", per question type.

    python bench/demo_llm_probe.py DEMO_OUT/components/llm [MORE_LLM_DIRS ...] [--per-type 100]

Each directory is an LLM that `vlpretrain demo` pretrained (bench/demo_figures.py leaves one per
seed under OUTPUT/seed_K/components/llm). It is asked held-out questions whose user turn shows
the scene as its exact cell words (demo.pretrain.picture_in_words), the way its pretraining
corpus does: greedy answers, scored as the demo scores stage 2. This is the ceiling stage 2 starts
from: a question type the LLM misses from perfect words, the VLM will miss from pixels. Prints
the accuracy per type for each directory, then the median and min-max over them.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from vlpretrain.data.templates import get_template
from vlpretrain.demo.pretrain import picture_in_words
from vlpretrain.demo.run import DemoConfig, component_config
from vlpretrain.demo.shapes import (
    BALANCED_NO,
    SINGLE_IMAGE_QUESTION_TYPES,
    SQUARE,
    chat_text,
    draw_scene,
    score_answer,
    single_image_question,
)


@torch.no_grad()
def probe(llm_dir: Path, per_type: int, seed: int) -> dict[str, float]:
    """Share of right greedy answers per question type on `per_type` held-out scenes each."""
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    model = Qwen2ForCausalLM.from_pretrained(llm_dir).eval()
    system = get_template("internvl2_5").default_system
    config = DemoConfig()
    held_out = config.held_out_fraction
    grid = component_config(config).cell_grid
    rng = np.random.default_rng([seed, 99])
    scores = {}
    for kind in SINGLE_IMAGE_QUESTION_TYPES:
        right = 0
        for _ in range(per_type):
            scene = draw_scene(rng, config.image_size, aspects=SQUARE,
                               held_out_fraction=held_out, held_out=True)  # fmt: skip
            question, answer = single_image_question(rng, scene, kind, BALANCED_NO)
            text = chat_text([(picture_in_words(scene, grid) + "\n" + question, "")], system)
            prompt = text.removesuffix("<|im_end|>\n")
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            generated = model.generate(ids, max_new_tokens=3, do_sample=False)
            right += score_answer(tokenizer.decode(generated[0, ids.shape[1] :]), answer)
        scores[kind] = right / per_type
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("llm_dirs", type=Path, nargs="+")
    parser.add_argument("--per-type", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe's scenes")
    args = parser.parse_args(argv)
    results = {str(d): probe(d, args.per_type, args.seed) for d in args.llm_dirs}
    for scores in results.values():
        scores["mean"] = sum(scores.values()) / len(scores)
    columns = (*SINGLE_IMAGE_QUESTION_TYPES, "mean")
    print("| LLM | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, scores in results.items():
        print(f"| {name} | " + " | ".join(f"{100 * scores[k]:.0f}" for k in columns) + " |")
    if len(results) > 1:
        cells = []
        for column in columns:
            values = [100 * scores[column] for scores in results.values()]
            cells.append(f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]")
        print("| median [min-max] | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
