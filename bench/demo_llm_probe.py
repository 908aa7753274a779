"""How well the demo's pretrained LLM answers from perfect "pictures in words", per question type.

    python bench/demo_llm_probe.py vlpretrain/demo/assets/llm [MORE_LLM_DIRS ...] [--per-type 100]
    python bench/demo_llm_probe.py --pretrain 0 1 2 3 [--set pretrain.llm_lr=3e-3 ...] [--jobs 2]
                                   [--output llm_probe] [--two-turn]

Each directory is an LLM that tools/make_demo_components.py pretrained (the demo ships one in
vlpretrain/demo/assets/llm). With --pretrain, the LLM of each seed is pretrained first, as that
script does it, into OUTPUT/seed_K (`--jobs` at a time, one thread each; about four minutes per
seed on this project's 2-core machine), with its settings changed by --set as the script's
--set changes them.

It is asked held-out questions whose user turn shows the scene as its exact cell words
(make_demo_components.picture_in_words), the way its pretraining corpus does: greedy answers,
scored as the demo scores stage 2. This is the ceiling stage 2 starts from: a question type the
LLM misses from perfect words, the VLM will miss from pixels. Prints the accuracy per type for
each directory, then the median and min-max over them.

--two-turn adds the test for the "shape at" shortcut: in 2-shape scenes, the second of two
"shape at" questions after a first answer that was right, that named the other shape, or that
answered the same question. An LLM that reads the place answers all three alike; one that learnt
"name the kind not yet named" fails after the other shape's name.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from vlpretrain.config import ConfigError
from vlpretrain.data.templates import get_template
from vlpretrain.model.llm import load_llm
from vlpretrain.testing.shapes import (
    BALANCED_NO,
    SINGLE_IMAGE_QUESTION_TYPES,
    SQUARE,
    Scene,
    chat_text,
    draw_scene,
    question_about,
    score_answer,
    single_image_question,
)

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_demo_components.py"
_spec = importlib.util.spec_from_file_location("make_demo_components", TOOL)
assert _spec is not None and _spec.loader is not None
tool = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tool  # its dataclasses look their module up while being made
_spec.loader.exec_module(tool)
PretrainConfig, picture_in_words = tool.PretrainConfig, tool.picture_in_words
make_llm, pretrain_settings = tool.make_llm, tool.pretrain_settings
SETTINGS = PretrainConfig()
CELL_GRID = SETTINGS.cell_grid
TWO_TURN_CASES = ("alone", "after a right answer", "after the other shape", "same question twice")

Answerer = Callable[[list[tuple[str, str]]], str]


def answerer(llm_dir: Path) -> Answerer:
    """Greedy answer of the LLM in `llm_dir` to a conversation whose last answer is empty."""
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    model = load_llm(llm_dir).eval()
    system = get_template("internvl2_5").default_system

    @torch.no_grad()
    def answer(pairs: list[tuple[str, str]]) -> str:
        prompt = chat_text(pairs, system).removesuffix("<|im_end|>\n")
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
        return tokenizer.decode(generated[0, ids.shape[1] :])

    return answer


def draw_held_out(rng: np.random.Generator) -> tuple[Scene, str]:
    """A held-out demo scene and its picture in words (the line before the question)."""
    scene = draw_scene(rng, SETTINGS.tile_size, aspects=SQUARE,
                       held_out_fraction=SETTINGS.held_out_fraction, held_out=True)  # fmt: skip
    return scene, picture_in_words(scene, CELL_GRID) + "\n"


def probe(answer: Answerer, per_type: int, seed: int) -> dict[str, float]:
    """Share of right greedy answers per question type on `per_type` held-out scenes each."""
    rng = np.random.default_rng([seed, 99])
    scores = {}
    for kind in SINGLE_IMAGE_QUESTION_TYPES:
        right = 0
        for _ in range(per_type):
            scene, picture = draw_held_out(rng)
            question, gold = single_image_question(rng, scene, kind, BALANCED_NO)
            right += score_answer(answer([(picture + question, "")]), gold)
        scores[kind] = right / per_type
    return scores


def probe_two_turns(answer: Answerer, scenes: int, seed: int) -> dict[str, float]:
    """Share of right second "shape at" answers in 2-shape scenes, per TWO_TURN_CASES first turn."""
    rng = np.random.default_rng([seed, 98])
    right = dict.fromkeys(TWO_TURN_CASES, 0)
    asked = 0
    while asked < scenes:
        scene, picture = draw_held_out(rng)
        if len(scene.shapes) != 2:
            continue
        asked += 1
        (first, right_first), (second, gold) = (question_about(s, "shape_at") for s in scene.shapes)
        conversations = {
            "alone": [(picture + second, "")],
            "after a right answer": [(picture + first, right_first), (second, "")],
            "after the other shape": [(picture + first, gold), (second, "")],
            "same question twice": [(picture + second, gold), (second, "")],
        }
        for case, pairs in conversations.items():
            right[case] += score_answer(answer(pairs), gold)
    return {case: count / scenes for case, count in right.items()}


def pretrain_seed(seed: int, settings: PretrainConfig, directory: Path) -> Path:
    """The demo's LLM for `seed`, pretrained as tools/make_demo_components.py --set ... does."""
    if not (directory / "config.json").exists():
        start = time.perf_counter()
        make_llm(replace(settings, seed=seed), directory)
        print(f"seed {seed}: pretrained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return directory


def pretrain_all(seeds: list[int], settings: PretrainConfig, output: Path,
                 jobs: int) -> list[Path]:  # fmt: skip
    """One LLM per seed, `jobs` processes at a time, one thread each when more than one."""
    if jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers' torch
    directories = [output / f"seed_{seed}" for seed in seeds]
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        return list(pool.map(pretrain_seed, seeds, [settings] * len(seeds), directories))


def print_table(results: dict[str, dict[str, float]], columns: tuple[str, ...]) -> None:
    """Markdown table in percent, one row per LLM, then the median and min-max over them."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("llm_dirs", type=Path, nargs="*")
    parser.add_argument("--pretrain", type=int, nargs="+", default=[], metavar="SEED",
                        help="pretrain these seeds' LLMs first and probe them too")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="pretrain.FIELD=VALUE",
                        help="a component pretraining setting for --pretrain, as for "
                        "tools/make_demo_components.py, e.g. pretrain.llm_lr=3e-3")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="--pretrain seeds at the same time")
    parser.add_argument("--output", type=Path, default=Path("llm_probe"))
    parser.add_argument("--per-type", type=int, default=100)
    parser.add_argument("--two-turn", action="store_true", help="also the 'shape at' shortcut test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe's scenes")
    args = parser.parse_args(argv)
    try:
        settings = pretrain_settings(args.set)
    except ConfigError as error:
        parser.error(str(error))
    if not args.llm_dirs and not args.pretrain:
        parser.error("give LLM directories, --pretrain seeds, or both")
    directories = [*args.llm_dirs, *pretrain_all(args.pretrain, settings, args.output, args.jobs)]
    if args.pretrain:
        print(f"pretrained with {args.set or 'the demo settings'}", file=sys.stderr)
    answerers = {str(d): answerer(d) for d in directories}  # each LLM loaded once for both probes
    results = {name: probe(answer, args.per_type, args.seed) for name, answer in answerers.items()}
    for scores in results.values():
        scores["mean"] = sum(scores.values()) / len(scores)
    print_table(results, (*SINGLE_IMAGE_QUESTION_TYPES, "mean"))
    if args.two_turn:
        print("\nSecond 'shape at' answer in 2-shape scenes, by first turn:")
        two_turns = {name: probe_two_turns(answer, 150, args.seed)
                     for name, answer in answerers.items()}  # fmt: skip
        print_table(two_turns, TWO_TURN_CASES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
