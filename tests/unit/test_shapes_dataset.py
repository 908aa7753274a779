"""The synthetic shapes dataset: determinism, formats, deliberate corruption, held-out split."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlpretrain.testing.shapes import (
    BALANCED_NO,
    KINDS,
    SINGLE_IMAGE_QUESTION_TYPES,
    SQUARE,
    Scene,
    Shape,
    caption,
    caption_scores,
    draw_scene,
    exists_question,
    is_held_out,
    parse_caption,
    question_type,
    sample_scene,
    single_image_question,
)
from vlpretrain.testing.synthetic import (
    CORRUPT_REASONS,
    ShapesDataset,
    answer_vocabulary,
    caption_corpus,
    chance_accuracy,
    make_shapes_dataset,
    question_pairs,
    render_scene,
    score_answer,
    text_pretraining_corpus,
)

# image_size 56 with the (w, h) half-unit aspects 2:2, 3:2, 2:3, 4:2, 2:4, 4:3.
ALLOWED_SIZES = {(56, 56), (84, 56), (56, 84), (112, 56), (56, 112), (112, 84)}


def _make(root: Path, seed: int = 7) -> ShapesDataset:
    return make_shapes_dataset(root, seed=seed, num_caption=40, num_qa=60, num_eval=30)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> ShapesDataset:
    return _make(tmp_path_factory.mktemp("shapes"))


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="ascii").splitlines()


def _records(path: Path) -> list[dict]:
    """Every line that parses as JSON."""
    out = []
    for line in _lines(path):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _images(record: dict) -> list[str]:
    image = record.get("image", [])
    return [image] if isinstance(image, str) else list(image)


def _pixel_hash(path: Path) -> str:
    with Image.open(path) as image:
        return hashlib.sha256(repr(image.size).encode() + image.tobytes()).hexdigest()


def test_same_seed_writes_identical_files(dataset: ShapesDataset, tmp_path: Path) -> None:
    again = _make(tmp_path / "again")
    for name in ("captions.jsonl", "qa.jsonl", "eval.jsonl", "eval_captions.jsonl"):
        assert _lines(dataset.root / name) == _lines(again.root / name), name
    for image in sorted((dataset.root / "images").iterdir()):
        assert image.read_bytes() == (again.root / "images" / image.name).read_bytes()
    assert again.corrupt == dataset.corrupt


def test_other_seed_writes_other_data(dataset: ShapesDataset, tmp_path: Path) -> None:
    other = _make(tmp_path / "other", seed=8)
    assert _lines(other.captions_path) != _lines(dataset.captions_path)


def test_counts_and_corrupt_lines(dataset: ShapesDataset) -> None:
    assert (dataset.num_caption_records, dataset.num_qa_records) == (40, 60)
    # Each training file holds its valid records plus one corrupt line per reason.
    assert len(_lines(dataset.captions_path)) == 40 + len(CORRUPT_REASONS)
    assert len(_lines(dataset.qa_path)) == 60 + len(CORRUPT_REASONS)
    assert len(_lines(dataset.eval_path)) == len(_lines(dataset.eval_captions_path)) == 30
    for name in ("captions.jsonl", "qa.jsonl"):
        reasons = [c.reason for c in dataset.corrupt if c.annotation == name]
        assert reasons == list(CORRUPT_REASONS)


def test_only_the_malformed_lines_fail_to_parse(dataset: ShapesDataset) -> None:
    for path in (dataset.captions_path, dataset.qa_path, dataset.eval_path):
        failing = []
        for number, line in enumerate(_lines(path), 1):
            try:
                json.loads(line)
            except json.JSONDecodeError:
                failing.append(number)
        expected = [
            c.line
            for c in dataset.corrupt
            if c.annotation == path.name and c.reason == "malformed_json"
        ]
        assert failing == expected


def test_corrupt_lines_are_broken_the_stated_way(dataset: ShapesDataset) -> None:
    for corrupt in dataset.corrupt:
        path = dataset.root / corrupt.annotation
        line = _lines(path)[corrupt.line - 1]
        if corrupt.reason == "malformed_json":
            continue
        record = json.loads(line)
        image = dataset.root / record["image"]
        if corrupt.reason == "missing_image":
            assert not image.exists()
        elif corrupt.reason == "corrupt_image":
            assert image.stat().st_size == 40
            with pytest.raises(OSError), Image.open(image) as broken:
                broken.load()
        else:
            roles = {turn["from"] for turn in record["conversations"]}
            assert roles - {"human", "gpt", "system"}
            Image.open(image).verify()


def test_corrupt_lines_lie_in_the_head_kept_by_repeat_time_half(dataset: ShapesDataset) -> None:
    # meta_finetune keeps the first int(N * 0.5) caption lines in the reference.
    num_kept = int(len(_lines(dataset.captions_path)) * 0.5)
    lines = [c.line for c in dataset.corrupt if c.annotation == "captions.jsonl"]
    # 44 lines: corrupt ones at 0-based k * 44 // 10 for k = 1..4, i.e. lines 5, 9, 14, 18.
    assert lines == [5, 9, 14, 18]
    assert max(lines) <= num_kept


def test_every_valid_image_exists_with_an_allowed_size(dataset: ShapesDataset) -> None:
    broken = {"images/cap_missing.png", "images/qa_missing.png"}
    broken |= {"images/cap_truncated.png", "images/qa_truncated.png"}
    referenced = set()
    for path in (dataset.captions_path, dataset.qa_path, dataset.eval_path):
        for record in _records(path):
            referenced |= set(_images(record)) - broken
    for rel in referenced:
        with Image.open(dataset.root / rel) as image:
            assert image.size in ALLOWED_SIZES, rel
            assert image.mode == "RGB"
    assert len(referenced) == dataset.num_images


def test_record_kinds_and_placeholders(dataset: ShapesDataset) -> None:
    # Valid records have numbered ids; the corrupt ones are named after their reason.
    records = [r for r in _records(dataset.qa_path) if r["id"].removeprefix("qa-").isdigit()]
    assert len(records) == 60
    multi = [r for r in records if isinstance(r.get("image"), list)]
    text = [r for r in records if "image" not in r]
    system = [r for r in records if r["conversations"][0]["from"] == "system"]
    # 60 records: 60 // 10 multi-image, 60 // 10 pure text, 2 with a system turn.
    assert (len(multi), len(text), len(system)) == (6, 6, 2)
    for record in multi:
        first = record["conversations"][0]["value"]
        assert first.count("<image>") == len(record["image"]) == 2
        assert record["conversations"][1]["value"] in {"first", "second"}
    for record in text:
        assert all("<image>" not in turn["value"] for turn in record["conversations"])


def test_every_answer_is_in_the_vocabulary(dataset: ShapesDataset) -> None:
    vocabulary = set(answer_vocabulary())
    for record in _records(dataset.qa_path) + _records(dataset.eval_path):
        for turn in record["conversations"]:
            if turn["from"] == "gpt" and not turn["value"].startswith("a "):
                assert turn["value"] in vocabulary, turn


def test_eval_layouts_never_appear_in_training(dataset: ShapesDataset) -> None:
    # A caption states the layout exactly, so no held-out caption may be a training caption.
    train_captions = {r["conversations"][1]["value"] for r in _records(dataset.captions_path)}
    held_out = [r["conversations"][1]["value"] for r in _records(dataset.eval_captions_path)]
    assert len(held_out) == 30 and not train_captions & set(held_out)
    questions = _records(dataset.eval_path)
    assert [r["image"] for r in questions] == [
        r["image"] for r in _records(dataset.eval_captions_path)
    ]


def test_eval_is_held_out_single_question_records(dataset: ShapesDataset) -> None:
    train = _records(dataset.captions_path) + _records(dataset.qa_path)
    train_images = {rel for r in train for rel in _images(r)}
    train_pixels = {
        _pixel_hash(dataset.root / rel)
        for rel in train_images
        if (dataset.root / rel).is_file()
        if (dataset.root / rel).stat().st_size > 40
    }
    held_out = _records(dataset.eval_path)
    types = set()
    for record in held_out:
        assert [t["from"] for t in record["conversations"]] == ["human", "gpt"]
        assert record["image"] not in train_images
        assert _pixel_hash(dataset.root / record["image"]) not in train_pixels
        types.add(question_type(record["conversations"][0]["value"]))
    assert types == {"colour", "count", "exists", "position", "size", "shape_at"}


def test_meta_files_follow_the_reference_format(dataset: ShapesDataset) -> None:
    pretrain = json.loads(dataset.meta_pretrain_path.read_text())
    finetune = json.loads(dataset.meta_finetune_path.read_text())
    evaluation = json.loads(dataset.meta_eval_path.read_text())
    assert list(pretrain) == ["shapes_captions"]
    assert list(finetune) == ["shapes_qa", "shapes_captions"]
    assert list(evaluation) == ["shapes_eval", "shapes_eval_captions"]
    assert finetune["shapes_captions"]["repeat_time"] == 0.5
    for entry in [*pretrain.values(), *finetune.values(), *evaluation.values()]:
        assert set(entry) == {
            "root",
            "annotation",
            "data_augment",
            "repeat_time",
            "max_dynamic_patch",
        }
        assert Path(entry["root"]) == dataset.root
        assert Path(entry["annotation"]).is_file()
        assert entry["data_augment"] is False


def test_render_and_caption_of_a_known_scene() -> None:
    scene = Scene(
        width=112,
        height=56,
        background=240,
        shapes=(
            Shape(kind="circle", colour="red", size="large", position="left"),
            Shape(kind="square", colour="blue", size="small", position="top"),
        ),
    )
    assert caption(scene) == "a large red circle on the left and a small blue square at the top."
    image = np.asarray(render_scene(scene))
    assert image.shape == (56, 112, 3)
    # Left centre is (0.17 * 112, 0.5 * 56) = (19, 28); top centre is (56, 9.5).
    red, blue = image[28, 19], image[10, 56]
    assert red[0] > 200 and red[2] < 60
    assert blue[2] > 200 and blue[0] < 60
    assert tuple(image[50, 100]) == (240, 240, 240)


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("red", "red", True),
        ("  Red.", "red", True),
        ("red circle", "red", True),
        ("yes, there is", "yes", True),
        ("blue", "red", False),
        ("", "red", False),
        ("reddish", "red", False),
        ("the red one", "red", False),
        ("anything", "", False),
    ],
)
def test_score_answer(prediction: str, gold: str, expected: bool) -> None:
    assert score_answer(prediction, gold) is expected


def test_chance_accuracy_is_majority_per_question_type() -> None:
    def record(question: str, answer: str) -> dict:
        turns = [
            {"from": "human", "value": "<image>\n" + question},
            {"from": "gpt", "value": answer},
        ]
        return {"id": "x", "image": "x.png", "conversations": turns}

    records = [
        record("Is there a circle?", "yes"),
        record("Is there a square?", "yes"),
        record("Is there a triangle?", "no"),
        record("How many shapes are there?", "one"),
        record("How many shapes are there?", "two"),
    ]
    # exists: majority "yes" gets 2 of 3; count: either word gets 1 of 2 -> (2 + 1) / 5.
    assert chance_accuracy(records) == pytest.approx(3 / 5)


def test_exists_is_answered_no_half_the_time(tmp_path: Path) -> None:
    # The eval split alternates yes and no exactly; training questions are balanced on average
    # although a scene holding every kind can only say yes.
    data = make_shapes_dataset(tmp_path, seed=2, num_caption=0, num_qa=0, num_eval=48)
    answers = [r["conversations"][1]["value"] for r in _records(data.eval_path)
               if question_type(r["conversations"][0]["value"]) == "exists"]  # fmt: skip
    assert sorted(answers) == ["no"] * 4 + ["yes"] * 4
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, 56) for _ in range(4000)]
    drawn = [single_image_question(rng, s, "exists", BALANCED_NO)[1] for s in scenes]
    assert 0.46 < drawn.count("no") / len(drawn) < 0.54
    places = ("left", "right", "top")
    shapes = tuple(Shape(k, "red", "small", p) for k, p in zip(KINDS, places, strict=True))
    full = Scene(56, 56, 240, shapes)
    with pytest.raises(ValueError, match="answered 'no'"):
        exists_question(rng, full, "no")


def test_balanced_place_questions_cannot_be_answered_by_naming_what_is_left() -> None:
    # Asked about every shape once, in turn, the last "shape at" answer of a scene is the one
    # kind not yet named, a shortcut the demo's LLM learnt instead of reading the place.
    rng = np.random.default_rng(0)
    repeats = last_is_what_is_left = conversations = 0
    while conversations < 400:
        scene = sample_scene(rng, 56)
        if len(scene.shapes) < 2:
            continue
        pairs = question_pairs(rng, scene, len(SINGLE_IMAGE_QUESTION_TYPES), balanced=True)
        answers = [a for q, a in pairs if question_type(q) == "shape_at"]
        assert len(answers) == len(scene.shapes)
        conversations += 1
        repeats += len(set(answers)) < len(answers)
        left = [s.kind for s in scene.shapes if s.kind not in answers[:-1]]
        last_is_what_is_left += left == [answers[-1]]
    assert 0.3 < repeats / conversations < 0.9
    assert last_is_what_is_left / conversations < 0.7


def test_chance_accuracy_of_generated_eval_is_well_below_one(dataset: ShapesDataset) -> None:
    assert 0.2 < chance_accuracy(_records(dataset.eval_path)) < 0.7


def test_text_corpora_are_deterministic_ascii_and_cover_the_answers() -> None:
    texts = text_pretraining_corpus(3, 50)
    assert texts == text_pretraining_corpus(3, 50)
    assert texts != text_pretraining_corpus(4, 50)
    assert all(t.startswith("<|im_start|>user\n") and t.endswith("<|im_end|>\n") for t in texts)
    assert all("<image>" not in t for t in texts)
    with_system = text_pretraining_corpus(3, 2, system_prompt="Be brief.")
    assert with_system[0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    corpus = caption_corpus(3)
    joined = " ".join(corpus)
    assert joined.isascii()
    assert all(word in joined for word in answer_vocabulary())
    assert "<|im_start|>assistant\n" in corpus


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_qa=-1"):
        make_shapes_dataset(tmp_path, seed=0, num_caption=1, num_qa=-1, num_eval=1)
    with pytest.raises(ValueError, match="image_size"):
        make_shapes_dataset(tmp_path, seed=0, num_caption=1, num_qa=1, num_eval=1, image_size=8)
    with pytest.raises(ValueError, match="held_out_fraction"):
        make_shapes_dataset(tmp_path, seed=0, num_caption=1, num_qa=1, num_eval=1,
                            held_out_fraction=0.0)  # fmt: skip


def test_square_dataset_with_one_tile_per_image(tmp_path: Path) -> None:
    data = make_shapes_dataset(tmp_path, seed=1, num_caption=5, num_qa=10, num_eval=3,
                               image_size=48, aspects=SQUARE, max_dynamic_patch=1)  # fmt: skip
    for rel in {i for r in _records(data.qa_path) + _records(data.eval_path) for i in _images(r)}:
        if (data.root / rel).is_file() and (data.root / rel).stat().st_size > 40:
            with Image.open(data.root / rel) as image:
                assert image.size == (48, 48)
    meta = json.loads(data.meta_finetune_path.read_text())
    assert {entry["max_dynamic_patch"] for entry in meta.values()} == {1}


def test_held_out_split_is_a_stable_share_of_layouts() -> None:
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, 48) for _ in range(4000)]
    share = np.mean([is_held_out(s, 0.1) for s in scenes])
    assert 0.07 < share < 0.13
    # The layout decides, not the rendering (jitter, background, aspect).
    moved = Scene(width=96, height=48, background=230, shapes=scenes[0].shapes)
    assert is_held_out(moved, 0.1) == is_held_out(scenes[0], 0.1)
    assert all(is_held_out(draw_scene(rng, 48, held_out_fraction=0.1, held_out=True), 0.1)
               for _ in range(20))  # fmt: skip
    assert not any(is_held_out(draw_scene(rng, 48, held_out_fraction=0.1), 0.1)
                   for _ in range(200))  # fmt: skip


def test_no_split_draws_exactly_as_sample_scene() -> None:
    first, second = np.random.default_rng(5), np.random.default_rng(5)
    assert [draw_scene(first, 28) for _ in range(50)] == [
        sample_scene(second, 28) for _ in range(50)
    ]
    with pytest.raises(ValueError, match="held_out_fraction"):
        draw_scene(first, 28, held_out=True)


def test_parse_caption_reads_every_shape() -> None:
    text = (
        "a large red circle on the left, a small blue square at the top"
        " and a small green triangle in the centre."
    )
    kinds = [(m.kind, m.colour, m.size, m.position) for m in parse_caption(text)]
    assert kinds == [
        ("circle", "red", "large", "left"),
        ("square", "blue", "small", "top"),
        ("triangle", "green", "small", "centre"),
    ]
    assert parse_caption("nothing to see.") == []
    assert parse_caption("a circle") == [parse_caption("a circle")[0]]
    assert parse_caption("a circle")[0].colour is None


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        # Exactly right.
        ("a large red circle on the left and a small blue square at the top.",
         {"colour": 1.0, "shape": 1.0, "count": 1.0, "position": 1.0}),
        # One shape missing: half the shapes, colours and places, wrong count.
        ("a large red circle on the left.",
         {"colour": 0.5, "shape": 0.5, "count": 0.0, "position": 0.5}),
        # An extra shape costs shape and count; a wrong colour and place cost those.
        ("a large red circle at the bottom, a small green square at the top"
         " and a large red triangle on the right.",
         {"colour": 0.5, "shape": 2 / 3, "count": 0.0, "position": 0.5}),
        ("", {"colour": 0.0, "shape": 0.0, "count": 0.0, "position": 0.0}),
    ],
)  # fmt: skip
def test_caption_scores(prediction: str, expected: dict[str, float]) -> None:
    truth = "a large red circle on the left and a small blue square at the top."
    assert caption_scores(prediction, truth) == pytest.approx(expected)


def test_caption_scores_needs_a_true_shape() -> None:
    with pytest.raises(ValueError, match="names no shape"):
        caption_scores("a red circle", "an empty picture.")
