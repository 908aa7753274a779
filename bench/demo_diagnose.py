"""Why a demo stage misses a question type: what its image tokens say, and train-side accuracy.

    python bench/demo_diagnose.py DEMO_OUT [--stages stage1 stage1_5 stage2] [--type shape_at]

Two measurements on a finished `vlpretrain demo` output directory:

1. What the projected image tokens carry. The pretrained LLM reads a cell word as the sum of
   the embeddings of the words it names (CellWordEmbedding in tools/make_demo_components.py),
   so a projector that imitates cell words writes those embeddings into each shape's token.
   For every shape of the held-out images, the token of its cell is scored against the
   embedding of each value of an attribute (the five place words, the three kinds, the four
   colours); the share whose best score is the true value is printed per attribute. Exact
   cell words score 100% on each.
2. The stage's accuracy on `--type` questions drawn from its own training data (the first
   question of single-image QA records, 200 at most), beside the held-out accuracy: equal
   figures mean the stage has not fitted the skill (more data would not help), a train-side
   figure far above the held-out one means it memorised.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vlpretrain.chat import ChatModel, load, tile_images
from vlpretrain.data.media import load_image
from vlpretrain.demo.evaluate import EvalItem, evaluate_model, read_jsonl
from vlpretrain.testing.shapes import (
    COLOURS,
    KINDS,
    POSITIONS,
    parse_caption,
    question_type,
    score_answer,
)
from vlpretrain.testing.synthetic import cell_index

ATTRIBUTES = {"place": POSITIONS, "kind": KINDS, "colour": COLOURS}
GRID = 3
"""Cells per side of the demo's tile (vlpretrain/demo/assets/recipe.toml: 48-px tiles, 9 tokens)."""


def token_attribute_accuracy(chat_model: ChatModel, data: Path, limit: int) -> dict[str, float]:
    """Per attribute: % of shapes whose cell token scores its true value's embedding highest."""
    model, tokenizer = chat_model.model, chat_model.tokenizer
    embedding_VD = model.language_model.get_input_embeddings().weight
    right = dict.fromkeys(ATTRIBUTES, 0)
    total = 0
    for record in read_jsonl(data / "eval_captions.jsonl")[:limit]:
        tiles, _ = tile_images([load_image(data / record["image"])], model.config)
        with torch.no_grad():
            tokens_TD = model.image_features(torch.as_tensor(tiles))[0]
        for shape in parse_caption(record["conversations"][-1]["value"]):
            token_D = tokens_TD[cell_index(shape.position, GRID)]
            total += 1
            for name, values in ATTRIBUTES.items():
                ids = [tokenizer(value)["input_ids"][0] for value in values]
                best = values[int((embedding_VD[ids] @ token_D).argmax())]
                right[name] += best == getattr(shape, "position" if name == "place" else name)
    return {name: 100 * count / total for name, count in right.items()}


def train_side_items(data: Path, kind: str, limit: int) -> list[EvalItem]:
    """The first question of single-image training QA records, where it is of type `kind`."""
    items = []
    for line in (data / "qa.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the planted malformed line
        turns = [t for t in record.get("conversations", []) if t.get("from") != "system"]
        if not isinstance(record.get("image"), str) or len(turns) < 2 or "id" not in record:
            continue  # multi-image, pure text, or one of the planted broken records
        if not (data / record["image"]).is_file():
            continue
        question, answer = turns[0]["value"], turns[1]["value"]
        if question_type(question) == kind:
            items.append(EvalItem(image=data / record["image"], question=question,
                                  question_type=kind, answer=answer, caption_request="",
                                  caption=""))  # fmt: skip
        if len(items) == limit:
            break
    return items


def accuracy(answers: list[str], items: list[EvalItem]) -> float:
    right = sum(score_answer(a, item.answer) for a, item in zip(answers, items, strict=True))
    return 100 * right / len(items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="a vlpretrain demo --output directory")
    parser.add_argument("--stages", nargs="+", default=["stage1", "stage1_5", "stage2"])
    parser.add_argument("--type", default="shape_at", help="question type of the train-side test")
    parser.add_argument("--limit", type=int, default=300, help="held-out images for test 1")
    args = parser.parse_args(argv)
    data = args.output / "data"
    train_items = train_side_items(data, args.type, 200)
    header = ["stage", *(f"token {name}" for name in ATTRIBUTES), f"train-side {args.type}"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for stage in args.stages:
        directory = args.output / "stages" / stage
        tokens = token_attribute_accuracy(load(directory), data, args.limit)
        train = accuracy(evaluate_model(directory, train_items, captions=False).answers,
                         train_items)  # fmt: skip
        cells = [stage, *(f"{tokens[name]:.1f}" for name in ATTRIBUTES), f"{train:.1f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"({len(train_items)} train-side questions; held-out accuracy: summary.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
