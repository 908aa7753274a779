"""The shapes world in words: scenes, captions, questions, answers, scoring and text corpora.

Pure functions over small frozen dataclasses and seeded generators; no pixels and no files
(testing.synthetic draws the scenes and writes the dataset). The grammar is closed: every
answer is one word from answer_vocabulary(), so accuracy is an exact match on the first word.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

KINDS = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
IMAGE_ORDINALS = ("first", "second")
YES_NO = ("yes", "no")

SYSTEM_PROMPT = "You answer questions about pictures of shapes in one word."
"""System turn of the few QA records that carry one."""
DESCRIBE = "Describe the image."
"""The caption request of every caption record."""

PLACES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
"""How a position reads inside a caption or question."""

QuestionType = Literal[
    "colour",
    "count",
    "exists",
    "position",
    "size",
    "shape_at",
    "more_shapes",
    "which_has",
    "add",
    "next",
]

QUESTION_TEMPLATES: dict[QuestionType, str] = {
    "colour": "What colour is the {kind}?",
    "count": "How many shapes are there?",
    "exists": "Is there a {kind}?",
    "position": "Where is the {kind}?",
    "size": "Is the {kind} small or large?",
    "shape_at": "What shape is {place}?",
    "more_shapes": "Which image has more shapes?",
    "which_has": "Which image has a {kind}?",
    "add": "What is {a} plus {b}?",
    "next": "What number comes after {a}?",
}
"""Every question the dataset asks, one template per type."""

SINGLE_IMAGE_QUESTION_TYPES: tuple[QuestionType, ...] = (
    "colour",
    "count",
    "exists",
    "position",
    "size",
    "shape_at",
)

Aspects = tuple[tuple[int, int], ...]
"""Image shapes a scene may take: (width, height) in half units of the image size."""

ASPECTS: Aspects = ((2, 2), (3, 2), (2, 3), (4, 2), (2, 4), (4, 3))
"""Square, 3:2, 2:3, 2:1, 1:2 and 4:3, so dynamic tiling yields grids from 1x1 up to 3x2."""
SQUARE: Aspects = ((2, 2),)
"""Square images only: one tile each, no thumbnail."""
# Salt of the text corpora's generators, apart from testing.synthetic's salts 1-4.
_SALT_TEXT = 5
# Text corpora never render their scenes; any size gives the same words.
_CORPUS_IMAGE_SIZE = 56

CHAT_MARKERS = (
    "<|im_start|>system\n",
    "<|im_start|>user\n",
    "<|im_start|>assistant\n",
    "<|im_end|>\n",
)


@dataclass(frozen=True)
class Shape:
    """One shape of a scene."""

    kind: str
    colour: str
    size: str
    position: str
    jitter: tuple[int, int] = (0, 0)
    """Pixel offset of the centre; keeps renders of the same description apart."""


@dataclass(frozen=True)
class Scene:
    """A picture: its pixel size, grey background level and shapes (distinct kinds)."""

    width: int
    height: int
    background: int
    shapes: tuple[Shape, ...]


def sample_scene(
    rng: np.random.Generator,
    image_size: int,
    num_shapes: int | None = None,
    aspects: Aspects = ASPECTS,
) -> Scene:
    """Draw a scene: 1-3 shapes of distinct kinds at distinct positions."""
    n = int(rng.integers(1, 4)) if num_shapes is None else num_shapes
    if not 1 <= n <= len(KINDS):
        raise ValueError(f"num_shapes must be in 1..{len(KINDS)}, got {n}")
    kinds = rng.permutation(len(KINDS))[:n]
    positions = rng.permutation(len(POSITIONS))[:n]
    colours = rng.integers(0, len(COLOURS), n)
    sizes = rng.integers(0, len(SIZES), n)
    jitter = rng.integers(-1, 2, (n, 2))
    aspect_w, aspect_h = aspects[int(rng.integers(len(aspects)))]
    shapes = [
        Shape(
            kind=KINDS[kinds[i]],
            colour=COLOURS[colours[i]],
            size=SIZES[sizes[i]],
            position=POSITIONS[positions[i]],
            jitter=(int(jitter[i, 0]), int(jitter[i, 1])),
        )
        for i in range(n)
    ]
    shapes.sort(key=lambda s: POSITIONS.index(s.position))
    return Scene(
        width=image_size * aspect_w // 2,
        height=image_size * aspect_h // 2,
        background=int(rng.integers(220, 256)),
        shapes=tuple(shapes),
    )


def caption(scene: Scene) -> str:
    """'a large red circle on the left and a small blue square at the top.'"""
    parts = [f"a {s.size} {s.colour} {s.kind} {PLACES[s.position]}" for s in scene.shapes]
    if len(parts) == 1:
        return parts[0] + "."
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def layout(scene: Scene) -> tuple[tuple[str, str, str, str], ...]:
    """What a caption states about a scene: (kind, colour, size, position) of each shape."""
    return tuple((s.kind, s.colour, s.size, s.position) for s in scene.shapes)


def is_held_out(scene: Scene, fraction: float) -> bool:
    """Whether the scene's layout falls in the held-out share `fraction` of all layouts.

    A stable hash of the layout decides, so the split needs no bookkeeping: no training image
    (dataset, ViT pretraining or text corpus) ever shows a held-out layout, in any rendering.
    """
    digest = hashlib.sha256(repr(layout(scene)).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def draw_scene(
    rng: np.random.Generator,
    image_size: int,
    *,
    aspects: Aspects = ASPECTS,
    held_out_fraction: float = 0.0,
    held_out: bool = False,
) -> Scene:
    """sample_scene, redrawn until it lies on the asked-for side of the held-out split.

    With held_out_fraction 0 there is no split: one draw, exactly sample_scene.
    """
    if held_out and held_out_fraction <= 0:
        raise ValueError("held-out scenes need held_out_fraction > 0")
    scene = sample_scene(rng, image_size, aspects=aspects)
    if held_out_fraction <= 0:
        return scene
    while is_held_out(scene, held_out_fraction) != held_out:
        scene = sample_scene(rng, image_size, aspects=aspects)
    return scene


@dataclass(frozen=True)
class Mention:
    """One shape as a caption names it; None where the caption leaves a field out."""

    kind: str
    colour: str | None
    size: str | None
    position: str | None


CAPTION_ATTRIBUTES = ("colour", "shape", "count", "position")
"""What a generated caption is scored on (caption_scores)."""

_PLACE_NAMES = {phrase: name for name, phrase in PLACES.items()}


def parse_caption(text: str) -> list[Mention]:
    """The shapes a caption names, in order: phrases split at ',' and 'and', one kind each.

    Lenient on purpose (a half-trained model's caption still parses): a phrase without a
    kind word is ignored, a missing colour, size or place is None.
    """
    mentions = []
    for phrase in re.split(r",| and ", text.lower()):
        words = re.findall(r"[a-z]+", phrase)
        kinds = [w for w in words if w in KINDS]
        if not kinds:
            continue
        place = next((name for p, name in _PLACE_NAMES.items() if p in phrase), None)
        mentions.append(
            Mention(
                kind=kinds[0],
                colour=next((w for w in words if w in COLOURS), None),
                size=next((w for w in words if w in SIZES), None),
                position=place,
            )
        )
    return mentions


def caption_scores(prediction: str, truth: str) -> dict[str, float]:
    """Per-attribute accuracy in [0, 1] of a generated caption against the true caption.

    shape: true kinds named / max(true shapes, named shapes), so extra shapes cost too;
    colour, position: share of the true shapes named with the right colour (position);
    count: 1 if the caption names as many shapes as there are. Kinds are distinct within a
    scene, so a named shape is matched to the true one of its kind.
    """
    true = parse_caption(truth)
    if not true:
        raise ValueError(f"the true caption {truth!r} names no shape")
    named = parse_caption(prediction)
    by_kind: dict[str, Mention] = {}
    for mention in named:
        by_kind.setdefault(mention.kind, mention)
    matched = [(t, by_kind.get(t.kind)) for t in true]
    return {
        "colour": sum(m is not None and m.colour == t.colour for t, m in matched) / len(true),
        "shape": sum(m is not None for _, m in matched) / max(len(true), len(named)),
        "count": float(len(named) == len(true)),
        "position": sum(m is not None and m.position == t.position for t, m in matched) / len(true),
    }


def human_turn(question: str, num_images: int) -> str:
    """Prefix the question with its image placeholders ('Image-k:' labels when several)."""
    if num_images == 1:
        return "<image>\n" + question
    labels = "".join(f"Image-{k}: <image>\n" for k in range(1, num_images + 1))
    return labels + question


# sample_scene draws 1..len(KINDS) shapes of distinct kinds, uniformly: in a 1/len(KINDS) share
# of the scenes every kind is present and "exists" can only be answered yes. Asking for an
# absent kind with this probability in the other scenes makes half of all the answers "no".
BALANCED_NO = 0.5 / (1 - 1 / len(KINDS))


def exists_question(rng: np.random.Generator, scene: Scene, answer: str) -> tuple[str, str]:
    """'Is there a {kind}?' asking for a present kind (answer 'yes') or an absent one ('no')."""
    present = [s.kind for s in scene.shapes]
    pool = present if answer == "yes" else [k for k in KINDS if k not in present]
    if answer not in YES_NO or not pool:
        raise ValueError(f"cannot ask an exists question answered {answer!r} about {scene}")
    kind = pool[int(rng.integers(len(pool)))]
    return QUESTION_TEMPLATES["exists"].format(kind=kind), answer


SHAPE_QUESTION_TYPES: tuple[QuestionType, ...] = ("colour", "position", "size", "shape_at")
"""The question types that ask about one shape of the scene."""


def question_about(shape: Shape, question_type: QuestionType) -> tuple[str, str]:
    """The question (and answer) of one of SHAPE_QUESTION_TYPES about one given shape."""
    if question_type not in SHAPE_QUESTION_TYPES:
        raise ValueError(f"{question_type!r} is not one of {SHAPE_QUESTION_TYPES}")
    answers = {"colour": shape.colour, "position": shape.position, "size": shape.size,
               "shape_at": shape.kind}  # fmt: skip
    # A template names the shape by kind or by place; format() ignores the field it lacks.
    question = QUESTION_TEMPLATES[question_type].format(kind=shape.kind,
                                                        place=PLACES[shape.position])  # fmt: skip
    return question, answers[question_type]


def single_image_question(
    rng: np.random.Generator, scene: Scene, question_type: QuestionType, no_share: float = 0.5
) -> tuple[str, str]:
    """A (question, answer) pair of the given type about one scene.

    An "exists" question asks for an absent kind with probability `no_share` where one is
    absent (BALANCED_NO: half of all answers "no"; 0.5, the default, as the golden files' data).
    """
    template = QUESTION_TEMPLATES[question_type]
    shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
    if question_type == "count":
        return template, NUMBER_WORDS[len(scene.shapes)]
    if question_type == "exists":
        can_say_no = len(scene.shapes) < len(KINDS)
        return exists_question(
            rng, scene, "no" if can_say_no and rng.random() < no_share else "yes"
        )
    return question_about(shape, question_type)


def multi_image_question(rng: np.random.Generator, first: Scene, second: Scene) -> tuple[str, str]:
    """A question whose answer is 'first' or 'second'; ('', '') if none tells the two apart."""
    counts = (len(first.shapes), len(second.shapes))
    kinds = ({s.kind for s in first.shapes}, {s.kind for s in second.shapes})
    only_one = sorted(kinds[0] ^ kinds[1], key=KINDS.index)
    by_count = counts[0] != counts[1]
    if only_one and (not by_count or rng.random() < 0.5):
        kind = only_one[int(rng.integers(len(only_one)))]
        answer = IMAGE_ORDINALS[0] if kind in kinds[0] else IMAGE_ORDINALS[1]
        return QUESTION_TEMPLATES["which_has"].format(kind=kind), answer
    if by_count:
        answer = IMAGE_ORDINALS[0] if counts[0] > counts[1] else IMAGE_ORDINALS[1]
        return QUESTION_TEMPLATES["more_shapes"], answer
    return "", ""


def text_question(rng: np.random.Generator) -> tuple[str, str]:
    """A pure-text (question, answer): small sums or the next number, answers up to ten."""
    if rng.random() < 0.5:
        a = int(rng.integers(1, 10))
        b = int(rng.integers(1, 11 - a))
        question = QUESTION_TEMPLATES["add"].format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b])
        return question, NUMBER_WORDS[a + b]
    a = int(rng.integers(1, 10))
    return QUESTION_TEMPLATES["next"].format(a=NUMBER_WORDS[a]), NUMBER_WORDS[a + 1]


def _template_pattern(template: str) -> re.Pattern[str]:
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append("[a-z ]+?")
    return re.compile("".join(parts))


_PATTERNS: dict[QuestionType, re.Pattern[str]] = {
    kind: _template_pattern(template) for kind, template in QUESTION_TEMPLATES.items()
}


def question_type(question: str) -> QuestionType | None:
    """The type of a question (its last line, placeholders ignored); None if not ours."""
    lines = question.strip().splitlines()
    last = lines[-1] if lines else ""
    for kind, pattern in _PATTERNS.items():
        if pattern.fullmatch(last):
            return kind
    return None


def answer_vocabulary() -> tuple[str, ...]:
    """Every answer the QA and eval records can have, sorted."""
    words = COLOURS + KINDS + SIZES + POSITIONS + NUMBER_WORDS[1:] + YES_NO + IMAGE_ORDINALS
    return tuple(sorted(set(words)))


def _first_word(text: str) -> str:
    match = re.search(r"[a-z0-9]+", text.lower())
    return match.group(0) if match else ""


def score_answer(prediction: str, gold: str) -> bool:
    """True when the first words match, ignoring case, spacing and punctuation."""
    expected = _first_word(gold)
    return bool(expected) and _first_word(prediction) == expected


def last_question_and_answer(record: Mapping[str, Any]) -> tuple[str, str]:
    """The last human value and the last gpt value of an annotation record."""
    turns = record["conversations"]
    questions = [t["value"] for t in turns if t["from"] == "human"]
    answers = [t["value"] for t in turns if t["from"] == "gpt"]
    if not questions or not answers:
        raise ValueError(f"record {record.get('id')!r} needs a human and a gpt turn")
    return questions[-1], answers[-1]


def majority_by_type(eval_records: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """Per question type: (records whose answer is the type's most common one, records).

    The majority answers are taken from `eval_records` themselves, so this is the best any
    image-blind, type-aware constant guesser can score on them.
    """
    by_type: dict[str, Counter[str]] = {}
    for record in eval_records:
        question, answer = last_question_and_answer(record)
        kind = question_type(question) or "other"
        by_type.setdefault(kind, Counter())[_first_word(answer)] += 1
    return {
        kind: (counts.most_common(1)[0][1], sum(counts.values()))
        for kind, counts in sorted(by_type.items())
    }


def chance_accuracy(eval_records: Iterable[Mapping[str, Any]]) -> float:
    """Accuracy of always giving the most common answer of each question type (over all
    records; see majority_by_type)."""
    counts = majority_by_type(eval_records).values()
    total = sum(n for _, n in counts)
    if total == 0:
        raise ValueError("chance_accuracy needs at least one eval record")
    return sum(right for right, _ in counts) / total


def chat_text(pairs: Iterable[tuple[str, str]], system: str | None = None) -> str:
    """Render (question, answer) pairs in the chatml layout the internvl2_5 template uses."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    for question, answer in pairs:
        text += f"<|im_start|>user\n{question}<|im_end|>\n"
        text += f"<|im_start|>assistant\n{answer}<|im_end|>\n"
    return text


def all_question_texts() -> list[str]:
    """Every question the grammar can produce (each template with every filler)."""
    fillers = {
        "kind": KINDS,
        "place": tuple(PLACES.values()),
        "a": NUMBER_WORDS[1:],
        "b": NUMBER_WORDS[1:],
    }
    texts = []
    for template in QUESTION_TEMPLATES.values():
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        if not fields:
            texts.append(template)
        for value in fillers[fields[0]] if fields else ():
            texts.append(template.format(**{f: value for f in fields}))
    return texts


def text_pretraining_corpus(seed: int, n: int, system_prompt: str | None = None) -> list[str]:
    """`n` chat-formatted texts in the dataset's grammar, with no images, to warm up the LLM.

    A mix of captions ('Describe the image.' -> caption), questions answered from a caption
    given in the user turn ('Picture: <caption>' + question -> answer), and the pure-text
    questions. `system_prompt`, when given, is rendered as a system block in each text.
    """
    rng = np.random.default_rng([seed, _SALT_TEXT])
    texts = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.25:
            pairs = [text_question(rng)]
        else:
            scene = sample_scene(rng, _CORPUS_IMAGE_SIZE)
            if roll < 0.5:
                pairs = [(DESCRIBE, caption(scene))]
            else:
                kind = SINGLE_IMAGE_QUESTION_TYPES[
                    int(rng.integers(len(SINGLE_IMAGE_QUESTION_TYPES)))
                ]
                question, answer = single_image_question(rng, scene, kind)
                pairs = [(f"Picture: {caption(scene)}\n{question}", answer)]
        texts.append(chat_text(pairs, system_prompt))
    return texts


def caption_corpus(seed: int) -> list[str]:
    """Texts to train the tiny BPE tokenizer on, covering every word the dataset uses."""
    rng = np.random.default_rng([seed, _SALT_TEXT, 1])
    scenes = [sample_scene(rng, _CORPUS_IMAGE_SIZE) for _ in range(400)]
    multi = [human_turn(QUESTION_TEMPLATES["more_shapes"], 2), "Image-1: \nImage-2: \n"]
    return (
        [caption(scene) for scene in scenes]
        + all_question_texts()
        + list(answer_vocabulary())
        + [SYSTEM_PROMPT, DESCRIBE, *multi, *CHAT_MARKERS]
        + text_pretraining_corpus(seed, 1000, SYSTEM_PROMPT)
    )
