"""Generate the synthetic coloured-shapes dataset that the demo trains and evaluates on.

It writes PNG images and annotation JSONL files in the reference's formats,
plus meta JSON files pointing at them. Everything depends only on the seed. It does not
tokenize, tile or load anything back. Scenes and their grammar live in testing.shapes.

    seed --> Scene (size, background, 1-3 shapes) --> PNG under images/
       |            +--> captions.jsonl (stage 1 / 1.5)
       |            +--> qa.jsonl (stage 2: QA, multi-image, pure text, system turn)
       |            +--> eval.jsonl, eval_captions.jsonl (held-out layouts: a question and
       |                 a caption request per image, never shown in training)
       +--> a few deliberately corrupt lines in each training file (CorruptRecord)
    --> meta_pretrain.json, meta_finetune.json, meta_eval.json
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from vlpretrain.testing.shapes import (
    ASPECTS,
    BALANCED_NO,
    DESCRIBE,
    KINDS,
    SINGLE_IMAGE_QUESTION_TYPES,
    SYSTEM_PROMPT,
    YES_NO,
    Aspects,
    Scene,
    answer_vocabulary,
    caption,
    caption_corpus,
    chance_accuracy,
    draw_scene,
    exists_question,
    human_turn,
    multi_image_question,
    question_about,
    sample_scene,
    score_answer,
    single_image_question,
    text_pretraining_corpus,
    text_question,
)

__all__ = [
    "CORRUPT_REASONS",
    "CorruptRecord",
    "ShapesDataset",
    "answer_vocabulary",
    "caption_corpus",
    "cell_index",
    "chance_accuracy",
    "make_shapes_dataset",
    "render_scene",
    "sample_scene",
    "score_answer",
    "text_pretraining_corpus",
]

CorruptReason = Literal["malformed_json", "missing_image", "corrupt_image", "unknown_role"]

CORRUPT_REASONS: tuple[CorruptReason, ...] = (
    "malformed_json",
    "missing_image",
    "corrupt_image",
    "unknown_role",
)
"""One deliberately broken line of each kind goes into every training annotation file."""

MAX_DYNAMIC_PATCH = 6
"""Per-dataset tile cap written into the meta files (default)."""
HELD_OUT_FRACTION = 0.1
"""Share of scene layouts kept out of training for evaluation (default)."""

_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (30, 150, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 190, 20),
}
_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.17, 0.5),
    "right": (0.83, 0.5),
    "top": (0.5, 0.17),
    "bottom": (0.5, 0.83),
    "centre": (0.5, 0.5),
}
# Radius as a fraction of the shorter side. Neighbouring centres are 0.33 apart and two large
# shapes need 0.28, so shapes never touch even after the +-1 px jitter.
_RADIUS: dict[str, float] = {"small": 0.09, "large": 0.14}
# Salts keep the splits independent: changing num_qa leaves the captions untouched.
_SALT_CAPTIONS, _SALT_QA, _SALT_EVAL, _SALT_CORRUPT = 1, 2, 3, 4


@dataclass(frozen=True)
class CorruptRecord:
    """A line written broken on purpose, so the skip report has something to show."""

    annotation: str
    """File name of the annotation file, e.g. 'captions.jsonl'."""
    line: int
    """1-based line number."""
    reason: CorruptReason
    """Which kind of breakage."""


@dataclass(frozen=True)
class ShapesDataset:
    """Paths and counts of one generated dataset."""

    root: Path
    captions_path: Path
    qa_path: Path
    eval_path: Path
    """Held-out questions, one per held-out image."""
    eval_captions_path: Path
    """Caption requests on the same held-out images, in the same order."""
    meta_pretrain_path: Path
    meta_finetune_path: Path
    meta_eval_path: Path
    num_caption_records: int
    """Valid records in captions.jsonl (corrupt lines not included)."""
    num_qa_records: int
    """Valid records in qa.jsonl (corrupt lines not included)."""
    num_eval_records: int
    num_images: int
    """Readable PNG files written (the truncated ones not included)."""
    corrupt: tuple[CorruptRecord, ...]
    """The deliberately broken lines, in file then line order."""


@dataclass
class _Writer:
    """Draws the scenes of one split and writes their images as they are made."""

    root: Path
    prefix: str
    image_size: int
    aspects: Aspects
    held_out_fraction: float
    held_out: bool = False
    """Draw held-out layouts (the eval split) instead of training ones."""
    max_turns: int = 3
    """Question types per single-image QA record: 1 to max_turns (see question_pairs)."""
    balanced: bool = False
    """Training questions drawn by question_pairs(balanced=True)."""
    num_images: int = 0

    def scene(self, rng: np.random.Generator) -> Scene:
        return draw_scene(
            rng,
            self.image_size,
            aspects=self.aspects,
            held_out_fraction=self.held_out_fraction,
            held_out=self.held_out,
        )

    def image(self, scene: Scene) -> str:
        rel = f"images/{self.prefix}_{self.num_images:06d}.png"
        render_scene(scene).save(self.root / rel, format="PNG")
        self.num_images += 1
        return rel


def cell_index(position: str, grid: int) -> int:
    """Row-major index of the cell of a `grid` x `grid` split of the image holding the centre
    of a shape at `position` (for grid 3: top 1, left 3, centre 4, right 5, bottom 7)."""
    fx, fy = _CENTRES[position]
    return min(int(fy * grid), grid - 1) * grid + min(int(fx * grid), grid - 1)


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene on a plain grey background."""
    image = Image.new("RGB", (scene.width, scene.height), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    short = min(scene.width, scene.height)
    for shape in scene.shapes:
        fx, fy = _CENTRES[shape.position]
        cx = fx * scene.width + shape.jitter[0]
        cy = fy * scene.height + shape.jitter[1]
        r = _RADIUS[shape.size] * short
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = _RGB[shape.colour]
        if shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def _conversation(pairs: list[tuple[str, str]], system: str | None = None) -> list[dict[str, str]]:
    turns = [{"from": "system", "value": system}] if system is not None else []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def _caption_record(rng: np.random.Generator, writer: _Writer, index: int) -> dict[str, Any]:
    scene = writer.scene(rng)
    pairs = [(human_turn(DESCRIBE, 1), caption(scene))]
    return {
        "id": f"cap-{index:06d}",
        "image": writer.image(scene),
        "conversations": _conversation(pairs),
    }


def question_pairs(
    rng: np.random.Generator, scene: Scene, num_types: int, balanced: bool = False
) -> list[tuple[str, str]]:
    """(question, answer) pairs about one scene, of `num_types` different types.

    balanced (the demo): "exists" is answered no half the time, and "shape at" and "position"
    are asked as many times as the scene has shapes: "shape at" is the only type that picks its
    shape by place, and one question per scene left that skill the least trained of all
    (held-out "shape at" answers stuck near 60%). Each of those questions picks its shape
    afresh (with replacement): asked about every shape once, in turn, an LLM learns to name a
    kind not yet named instead of looking the place up (seed 0's LLM pretrained that way
    answered the second "shape at" question of a 2-shape scene 100% right after a right
    first answer but 13% after a first answer naming the second shape's kind:
    bench/demo_llm_probe.py --two-turn). Without balanced, one question per type, drawn as the
    golden files' data was.
    """
    picks = rng.permutation(len(SINGLE_IMAGE_QUESTION_TYPES))[:num_types]
    pairs = []
    no_share = BALANCED_NO if balanced else 0.5
    for kind in (SINGLE_IMAGE_QUESTION_TYPES[i] for i in picks):
        if balanced and kind in ("shape_at", "position"):
            shapes = rng.integers(len(scene.shapes), size=len(scene.shapes))
            pairs += [question_about(scene.shapes[k], kind) for k in shapes]
        else:
            pairs.append(single_image_question(rng, scene, kind, no_share))
    return pairs


def _qa_pairs(
    rng: np.random.Generator, scene: Scene, num_turns: int, balanced: bool
) -> list[tuple[str, str]]:
    pairs = question_pairs(rng, scene, num_turns, balanced)
    return [(human_turn(q, 1) if i == 0 else q, a) for i, (q, a) in enumerate(pairs)]


def _single_qa_record(
    rng: np.random.Generator, writer: _Writer, index: int, system: str | None = None
) -> dict[str, Any]:
    scene = writer.scene(rng)
    pairs = _qa_pairs(rng, scene, int(rng.integers(1, writer.max_turns + 1)), writer.balanced)
    record_id = f"qa-{index:06d}"
    return {
        "id": record_id,
        "image": writer.image(scene),
        "conversations": _conversation(pairs, system),
    }


def _system_qa_record(rng: np.random.Generator, writer: _Writer, index: int) -> dict[str, Any]:
    return _single_qa_record(rng, writer, index, system=SYSTEM_PROMPT)


def _multi_image_record(rng: np.random.Generator, writer: _Writer, index: int) -> dict[str, Any]:
    first = writer.scene(rng)
    second = writer.scene(rng)
    question, answer = multi_image_question(rng, first, second)
    while not answer:  # no question separates these two scenes; draw another second one
        second = writer.scene(rng)
        question, answer = multi_image_question(rng, first, second)
    images = [writer.image(first), writer.image(second)]
    pairs = [(human_turn(question, 2), answer)]
    return {"id": f"qa-{index:06d}", "image": images, "conversations": _conversation(pairs)}


def _text_record(rng: np.random.Generator, writer: _Writer, index: int) -> dict[str, Any]:
    del writer  # pure text: no image
    return {"id": f"qa-{index:06d}", "conversations": _conversation([text_question(rng)])}


_RecordMaker = Callable[[np.random.Generator, _Writer, int], dict[str, Any]]


def _qa_makers(rng: np.random.Generator, num_qa: int) -> list[_RecordMaker]:
    """Which kind each QA record is: about 10% multi-image, 10% pure text, 2 with a system turn."""
    num_system = min(2, num_qa)
    num_multi = num_qa // 10
    num_text = num_qa // 10
    num_single = num_qa - num_system - num_multi - num_text
    makers: list[_RecordMaker] = (
        [_single_qa_record] * num_single
        + [_system_qa_record] * num_system
        + [_multi_image_record] * num_multi
        + [_text_record] * num_text
    )
    return [makers[i] for i in rng.permutation(num_qa)]


def _corrupt_lines(
    rng: np.random.Generator, writer: _Writer, name: str
) -> dict[CorruptReason, str]:
    """One broken JSONL line per reason; writes the truncated PNG and the unknown-role image."""
    scene = writer.scene(rng)
    pairs = _conversation([(human_turn(DESCRIBE, 1), caption(scene))])
    truncated = f"images/{writer.prefix}_truncated.png"
    buffer = io.BytesIO()
    render_scene(scene).save(buffer, format="PNG")
    (writer.root / truncated).write_bytes(buffer.getvalue()[:40])
    good = writer.image(scene)
    bad_role = [pairs[0], {"from": "bot", "value": pairs[1]["value"]}]
    records: dict[CorruptReason, Any] = {
        "malformed_json": {"image": good, "conversations": pairs},
        "missing_image": {"image": f"images/{writer.prefix}_missing.png", "conversations": pairs},
        "corrupt_image": {"image": truncated, "conversations": pairs},
        "unknown_role": {"image": good, "conversations": bad_role},
    }
    lines = {
        reason: json.dumps({"id": f"{name}-{reason}", **rec}) for reason, rec in records.items()
    }
    lines["malformed_json"] = lines["malformed_json"][:-9]  # cut mid-object: not valid JSON
    return lines


def _corrupt_positions(num_valid: int) -> list[int]:
    """0-based line indices for the corrupt lines: spread over the first half of the file.

    The first half, because a repeat_time below 1 keeps the head of the file in the reference,
    and the corrupt lines should survive it.
    """
    total = num_valid + len(CORRUPT_REASONS)
    positions: list[int] = []
    for k, _ in enumerate(CORRUPT_REASONS, start=1):
        previous = positions[-1] if positions else -1
        positions.append(max(k * total // 10, previous + 1))
    return positions


def _write_split(
    path: Path, records: list[dict[str, Any]], corrupt: dict[CorruptReason, str] | None
) -> tuple[CorruptRecord, ...]:
    lines = [json.dumps(record) for record in records]
    found: list[CorruptRecord] = []
    if corrupt is not None:
        for position, reason in zip(_corrupt_positions(len(records)), CORRUPT_REASONS, strict=True):
            lines.insert(position, corrupt[reason])
            found.append(CorruptRecord(annotation=path.name, line=position + 1, reason=reason))
    path.write_text("".join(line + "\n" for line in lines), encoding="ascii")
    return tuple(found)


def _eval_records(
    rng: np.random.Generator, writer: _Writer, num_eval: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One question (types in rotation) and one caption request per held-out image.

    The "exists" questions alternate yes and no (a "no" redraws scenes holding every kind), so
    that answer is exactly balanced and the majority guess scores half of them.
    """
    questions: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    num_types = len(SINGLE_IMAGE_QUESTION_TYPES)
    for index in range(num_eval):
        kind = SINGLE_IMAGE_QUESTION_TYPES[index % num_types]
        scene = writer.scene(rng)
        if kind == "exists":
            wanted = YES_NO[index // num_types % 2]
            while wanted == "no" and len(scene.shapes) == len(KINDS):
                scene = writer.scene(rng)
            question, answer = exists_question(rng, scene, wanted)
        else:
            question, answer = single_image_question(rng, scene, kind)
        image = writer.image(scene)
        for records, pair, prefix in (
            (questions, (question, answer), "eval"),
            (captions, (DESCRIBE, caption(scene)), "eval-cap"),
        ):
            turns = _conversation([(human_turn(pair[0], 1), pair[1])])
            records.append({"id": f"{prefix}-{index:06d}", "image": image, "conversations": turns})
    return questions, captions


def _meta_entry(
    root: Path, annotation: Path, repeat_time: float, max_dynamic_patch: int
) -> dict[str, Any]:
    return {
        "root": str(root),
        "annotation": str(annotation),
        "data_augment": False,
        "repeat_time": repeat_time,
        "max_dynamic_patch": max_dynamic_patch,
    }


def _write_json(path: Path, obj: dict[str, Any]) -> Path:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="ascii")
    return path


def make_shapes_dataset(
    output_dir: str | Path,
    seed: int,
    num_caption: int,
    num_qa: int,
    num_eval: int,
    image_size: int = 56,
    *,
    aspects: Aspects = ASPECTS,
    held_out_fraction: float = HELD_OUT_FRACTION,
    max_dynamic_patch: int = MAX_DYNAMIC_PATCH,
    max_turns: int = 3,
    balanced_questions: bool = False,
) -> ShapesDataset:
    """Write the whole dataset under `output_dir` (files of the same names are overwritten).

    Args:
        output_dir: created if missing; meta files hold absolute paths into it.
        seed: everything written is a pure function of it (and of the counts).
        num_caption: valid caption records; 4 corrupt lines are added on top.
        num_qa: valid QA records (about 10% multi-image, 10% pure text, 2 with a system
            turn); 4 corrupt lines are added on top.
        num_eval: held-out images, each with one question (types in rotation) in eval.jsonl
            and one caption request in eval_captions.jsonl.
        image_size: shorter image side in pixels; longer sides are 1, 1.5 or 2 times it.
        aspects: the image shapes drawn (SQUARE: one tile per image).
        held_out_fraction: share of scene layouts (shapes with their colours, sizes and
            positions) that only the eval split shows; 0 splits nothing (then num_eval must
            be 0) and draws exactly as sample_scene.
        max_dynamic_patch: tile cap of every dataset in the meta files.
        max_turns: single-image QA records ask 1 to max_turns question types (question_pairs).
        balanced_questions: QA records drawn by question_pairs(balanced=True) (the demo).
    """
    if min(num_caption, num_qa, num_eval) < 0:
        raise ValueError(f"counts must be >= 0, got {num_caption=}, {num_qa=}, {num_eval=}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 px to draw shapes, got {image_size}")
    if not 1 <= max_turns <= len(SINGLE_IMAGE_QUESTION_TYPES):
        raise ValueError(
            f"max_turns must be in 1..{len(SINGLE_IMAGE_QUESTION_TYPES)}, got {max_turns}"
        )
    if num_eval and held_out_fraction <= 0:
        raise ValueError(f"{num_eval=} held-out images need held_out_fraction > 0")
    root = Path(output_dir).resolve()
    (root / "images").mkdir(parents=True, exist_ok=True)
    writers = {
        name: _Writer(
            root,
            name,
            image_size,
            aspects,
            held_out_fraction,
            name == "eval",
            max_turns,
            balanced_questions,
        )  # fmt: skip
        for name in ("cap", "qa", "eval")
    }

    rng = np.random.default_rng([seed, _SALT_CAPTIONS])
    captions = [_caption_record(rng, writers["cap"], i) for i in range(num_caption)]
    rng = np.random.default_rng([seed, _SALT_QA])
    qa = [make(rng, writers["qa"], i) for i, make in enumerate(_qa_makers(rng, num_qa))]
    broken = {
        name: _corrupt_lines(np.random.default_rng([seed, _SALT_CORRUPT, k]), writers[name], name)
        for k, name in enumerate(("cap", "qa"))
    }
    rng = np.random.default_rng([seed, _SALT_EVAL])
    held_out, held_out_captions = _eval_records(rng, writers["eval"], num_eval)

    names = ("captions", "qa", "eval", "eval_captions")
    paths = {name: root / f"{name}.jsonl" for name in names}
    corrupt = _write_split(paths["captions"], captions, broken["cap"])
    corrupt += _write_split(paths["qa"], qa, broken["qa"])
    _write_split(paths["eval"], held_out, None)
    _write_split(paths["eval_captions"], held_out_captions, None)

    def entry(name: str, repeat_time: float) -> dict[str, Any]:
        return _meta_entry(root, paths[name], repeat_time, max_dynamic_patch)

    meta_pretrain = {"shapes_captions": entry("captions", 1)}
    meta_finetune = {"shapes_qa": entry("qa", 1), "shapes_captions": entry("captions", 0.5)}
    meta_eval = {"shapes_eval": entry("eval", 1), "shapes_eval_captions": entry("eval_captions", 1)}
    return ShapesDataset(
        root=root,
        captions_path=paths["captions"],
        qa_path=paths["qa"],
        eval_path=paths["eval"],
        eval_captions_path=paths["eval_captions"],
        meta_pretrain_path=_write_json(root / "meta_pretrain.json", meta_pretrain),
        meta_finetune_path=_write_json(root / "meta_finetune.json", meta_finetune),
        meta_eval_path=_write_json(root / "meta_eval.json", meta_eval),
        num_caption_records=len(captions),
        num_qa_records=len(qa),
        num_eval_records=len(held_out),
        num_images=sum(w.num_images for w in writers.values()),
        corrupt=corrupt,
    )
