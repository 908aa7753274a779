"""Score a saved stage model on the held-out split: greedy answers and captions, in batches.

    eval.jsonl + eval_captions.jsonl (same held-out images, same order)
    --ChatModel.prompt_inputs (the training code's tiling, template, placeholders)--> prompts
    --left-padded batches, one prefill, cached greedy steps--> answers, captions
    --score_answer per question type; caption_scores per attribute--> StageEval

The image ablation runs the same prompts with every image replaced by a blank one of the
same size, so what is lost is exactly what the model read from the pixels.

Shape legend: B prompts in a batch, L longest prompt, N tiles, D LLM hidden.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlpretrain.chat import ChatModel, load
from vlpretrain.data.media import load_image
from vlpretrain.testing.shapes import (
    CAPTION_ATTRIBUTES,
    caption_scores,
    last_question_and_answer,
    question_type,
    score_answer,
)

BLANK_GREY = 238
"""Grey level of the ablation's blank images (the middle of the scenes' backgrounds)."""


@dataclass(frozen=True)
class EvalItem:
    """One held-out image with its question and its caption request."""

    image: Path
    question: str
    """As the record sends it (with its <image> tag)."""
    question_type: str
    answer: str
    caption_request: str
    """The caption record's question (with its <image> tag)."""
    caption: str
    """The true caption."""


@dataclass
class StageEval:
    """What one model did on the held-out split."""

    qa_by_type: dict[str, float] = field(default_factory=dict)
    """Share of right answers per question type."""
    caption_by_attribute: dict[str, float] = field(default_factory=dict)
    """Mean caption_scores per attribute; empty when captions were not generated."""
    answers: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)

    @property
    def qa_accuracy(self) -> float:
        """Mean over question types (types are balanced in the eval set)."""
        return sum(self.qa_by_type.values()) / len(self.qa_by_type)

    @property
    def caption_accuracy(self) -> float | None:
        """Mean over the caption attributes."""
        if not self.caption_by_attribute:
            return None
        return sum(self.caption_by_attribute.values()) / len(self.caption_by_attribute)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_items(eval_path: Path, eval_captions_path: Path, root: Path) -> list[EvalItem]:
    """Pair the question and the caption record of each held-out image."""
    items = []
    questions, captions = read_jsonl(eval_path), read_jsonl(eval_captions_path)
    if len(questions) != len(captions):
        raise ValueError(f"{eval_path} has {len(questions)} records, {eval_captions_path} "
                         f"{len(captions)}: they must describe the same images")  # fmt: skip
    for number, (qa, cap) in enumerate(zip(questions, captions, strict=True), 1):
        if qa["image"] != cap["image"]:
            raise ValueError(f"{eval_captions_path}:{number}: image {cap['image']!r} is not "
                             f"line {number}'s image of {eval_path} ({qa['image']!r})")  # fmt: skip
        question, answer = last_question_and_answer(qa)
        request, true_caption = last_question_and_answer(cap)
        items.append(
            EvalItem(
                image=root / qa["image"],
                question=question,
                question_type=question_type(question) or "other",
                answer=answer,
                caption_request=request,
                caption=true_caption,
            )
        )
    return items


def blank_like(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, (BLANK_GREY,) * 3)


@torch.no_grad()
def generate_batch(
    chat_model: ChatModel, images: Sequence[Image.Image], prompts: Sequence[str],
    max_new_tokens: int,
) -> list[str]:  # fmt: skip
    """Greedy completions of one-image prompts, all at once (left padding, one KV cache).

    Equal to ChatModel.chat per prompt: padding is masked out and positions start at 0 at
    each prompt's first real token.
    """
    pairs = zip(images, prompts, strict=True)
    inputs = [chat_model.prompt_inputs([image], prompt) for image, prompt in pairs]
    length = max(ids.shape[1] for ids, _ in inputs)
    pad_id = chat_model.tokenizer.pad_token_id or 0
    ids_BL = torch.full((len(inputs), length), pad_id, dtype=torch.long)
    mask_BL = torch.zeros((len(inputs), length), dtype=torch.long)
    for row, (ids, _) in enumerate(inputs):
        ids_BL[row, length - ids.shape[1] :] = ids[0]
        mask_BL[row, length - ids.shape[1] :] = 1
    pixels_N3SS = torch.cat([pixels for _, pixels in inputs])
    flags_N = torch.ones(pixels_N3SS.shape[0], dtype=torch.long)
    positions_BL = (mask_BL.cumsum(1) - 1).clamp(min=0)
    llm = chat_model.model.language_model
    out = llm(
        inputs_embeds=chat_model.model.embed(ids_BL, pixels_N3SS, flags_N),
        attention_mask=mask_BL,
        position_ids=positions_BL,
        use_cache=True,
        logits_to_keep=1,
    )
    generated: list[list[int]] = [[] for _ in inputs]
    done = torch.zeros(len(inputs), dtype=torch.bool)
    stop = torch.tensor(sorted(chat_model.stop_ids), dtype=torch.long)
    next_positions_B = positions_BL[:, -1] + 1
    for _ in range(max_new_tokens):
        tokens_B = out.logits[:, -1].argmax(-1)
        done |= torch.isin(tokens_B, stop)
        for row in (~done).nonzero().flatten().tolist():
            generated[row].append(int(tokens_B[row]))
        if bool(done.all()):
            break
        mask_BL = torch.cat([mask_BL, torch.ones((len(inputs), 1), dtype=torch.long)], dim=1)
        out = llm(
            input_ids=tokens_B.unsqueeze(1),
            attention_mask=mask_BL,
            position_ids=next_positions_B.unsqueeze(1),
            cache=out.cache,
            use_cache=True,
        )
        next_positions_B = next_positions_B + 1
    decode = chat_model.tokenizer.decode
    return [decode(ids, skip_special_tokens=True).strip() for ids in generated]


def generate_all(
    chat_model: ChatModel, images: Sequence[Image.Image], prompts: Sequence[str],
    max_new_tokens: int, batch_size: int = 64,
) -> list[str]:  # fmt: skip
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        outputs += generate_batch(chat_model, images[start:end], prompts[start:end],
                                  max_new_tokens)  # fmt: skip
    return outputs


def evaluate_model(
    model_dir: Path, items: Sequence[EvalItem], *, captions: bool = True, blank: bool = False
) -> StageEval:
    """Answers (and captions) of the model in `model_dir` on every held-out item."""
    chat_model = load(model_dir)
    images = [load_image(item.image) for item in items]
    if blank:
        images = [blank_like(image) for image in images]
    result = StageEval()
    result.answers = generate_all(chat_model, images, [i.question for i in items], 4)
    right: dict[str, list[bool]] = defaultdict(list)
    for item, answer in zip(items, result.answers, strict=True):
        right[item.question_type].append(score_answer(answer, item.answer))
    result.qa_by_type = {kind: sum(v) / len(v) for kind, v in sorted(right.items())}
    if captions:
        requests = [item.caption_request for item in items]
        result.captions = generate_all(chat_model, images, requests, 40)
        scores: dict[str, list[float]] = defaultdict(list)
        for item, text in zip(items, result.captions, strict=True):
            for attribute, value in caption_scores(text, item.caption).items():
                scores[attribute].append(value)
        result.caption_by_attribute = {a: sum(scores[a]) / len(scores[a])
                                       for a in CAPTION_ATTRIBUTES}  # fmt: skip
    return result
