"""DatasetSource: records -> TokenizedSample | SkippedSample, repeat_time, video, skips."""

import json
import pickle

import numpy as np
import pytest
from media_fixtures import write_video
from PIL import Image

from vlpretrain.data.build import (
    DatasetSource,
    SampleConfig,
    build_sources,
    repeat_length,
)
from vlpretrain.data.media import sample_frame_indices
from vlpretrain.data.meta import DatasetSpec
from vlpretrain.data.samples import SkippedSample, TokenizedSample
from vlpretrain.facts import RunFacts
from vlpretrain.tokens import IMG_CONTEXT

SMALL = dict(max_seq_length=4096, min_num_frame=3, max_num_frame=5)
SMALL_FACTS = dict(tile_size=28, num_image_token=4, template="internvl2_5")


def conv(question="<image>\nHi", answer="Yo"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def facts_of(tokenizer, **facts):
    return RunFacts.from_tokenizer(tokenizer, **{**SMALL_FACTS, **facts})


def make_source(tmp_path, tokenizer, records, repeat_time=1.0, augment=False, facts=None,
                **config):  # fmt: skip
    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    spec = DatasetSpec(
        name="toy", dataset_index=0, root=tmp_path, annotation=ann,
        repeat_time=repeat_time, data_augment=augment,
    )  # fmt: skip
    cfg = SampleConfig(**{**SMALL, "cache_dir": str(tmp_path / "cache"), **config})
    return DatasetSource(spec, cfg, facts or facts_of(tokenizer), tokenizer)


def test_single_image_sample(tmp_path, tokenizer):
    Image.new("RGB", (56, 28), "red").save(tmp_path / "a.png")  # 28-px tiles: 896x448 scaled
    source = make_source(tmp_path, tokenizer, [{"image": "a.png", "conversations": conv("Hi")}])
    sample = source.load(0, epoch=0, seed=0)
    assert isinstance(sample, TokenizedSample)
    assert sample.num_tiles_per_image == (3,)  # 2x1 grid + thumbnail
    assert sample.pixel_values.shape == (3, 3, 28, 28)
    ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    assert np.count_nonzero(sample.input_ids == ctx) == 3 * 4
    assert "<|im_start|>user\n<img>" in tokenizer.decode(sample.input_ids.tolist())
    assert sample.source.line == 1 and sample.source.dataset == "toy"


def test_multi_image_budget_tiles(tmp_path, tokenizer):
    # the reference's worked example (896x448 + 300x300 at 448 px) scaled to 28-px tiles; the
    # area tie-break scales with the tile size, so the images are scaled by 28/448 too
    Image.new("RGB", (56, 28)).save(tmp_path / "wide.png")
    Image.new("RGB", (19, 19)).save(tmp_path / "sq.png")
    record = {"image": ["wide.png", "sq.png"], "conversations": conv("<image><image>")}
    sample = make_source(tmp_path, tokenizer, [record]).load(0, 0, 0)
    # budget 12 // 2 = 6 per image: 896x448 -> 2x1 + thumbnail = 3; 300x300 -> 1
    assert sample.num_tiles_per_image == (3, 1)
    assert sample.num_tiles == 4


def test_multi_image_budget_at_full_tile_size(tmp_path, tokenizer):
    Image.new("RGB", (896, 448)).save(tmp_path / "wide.png")
    Image.new("RGB", (300, 300)).save(tmp_path / "sq.png")
    record = {"image": ["wide.png", "sq.png"], "conversations": conv("<image><image>")}
    facts = facts_of(tokenizer, tile_size=448, num_image_token=1)
    source = make_source(tmp_path, tokenizer, [record], facts=facts)
    assert source.load(0, 0, 0).num_tiles_per_image == (3, 1)  # as at 448 px: 2x1 + thumbnail, 1x1


def test_text_sample_has_no_tiles(tmp_path, tokenizer):
    sample = make_source(tmp_path, tokenizer, [{"conversations": conv("plain hi")}]).load(0, 0, 0)
    assert sample.num_tiles == 0 and sample.num_tiles_per_image == ()
    assert "plain hi" in tokenizer.decode(sample.input_ids.tolist())


def test_each_bad_input_gives_its_reason_with_file_line(tmp_path, tokenizer):
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    Image.new("RGB", (256, 256)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    lines = [
        "{not json",
        {"conversations": []},
        {"conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "text": "y"}]},
        {"image": ["ok.png", "ok.png"], "conversations": conv("<image> only one")},
        {"image": "nope.png", "conversations": conv()},
        {"image": "bad.png", "conversations": conv()},
        {"image": "trunc.jpg", "conversations": conv()},
        {"video": "nope.mp4", "conversations": conv("<video>")},
        {"conversations": conv("x " * 300, "y")},
        {"conversations": conv("literal <IMG_CONTEXT> here")},
        {"conversations": [{"from": "human", "value": "a"},
                           {"from": "system", "value": "late"}, {"from": "gpt", "value": "b"}]},
    ]  # fmt: skip
    source = make_source(tmp_path, tokenizer, lines, max_seq_length=200)
    results = [source.load(i, 0, 0) for i in range(len(source))]
    assert all(isinstance(r, SkippedSample) for r in results), results
    assert [r.reason for r in results] == [
        "malformed_json", "empty_conversation", "unknown_role", "missing_field",
        "placeholder_mismatch", "missing_image", "corrupt_image", "corrupt_image",
        "video_error", "too_long", "placeholder_mismatch", "unknown_role",
    ]  # fmt: skip
    assert [r.source.line for r in results] == list(range(1, 13))
    assert "'text' is not accepted" in results[3].detail
    assert "truncated" in results[7].detail
    # A skip's detail names the file, never a Python object (skipped.jsonl compares across runs)
    assert results[6].detail == f"{tmp_path / 'bad.png'}: not an image Pillow can read"
    assert str(results[0]).startswith(f"{tmp_path / 'ann.jsonl'}:1 ")


def test_decompression_bomb_guard(tmp_path, tokenizer):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    source = make_source(
        tmp_path, tokenizer, [{"image": "big.png", "conversations": conv()}], max_image_pixels=999
    )
    result = source.load(0, 0, 0)
    # 100x100 = 10000 pixels > 999, refused from the header, under its own reason
    assert result.reason == "image_too_large"
    assert "100x100 = 10000 pixels exceeds data.max_image_pixels = 999" in result.detail


def test_repeat_time_semantics(tmp_path, tokenizer):
    records = [{"conversations": conv(f"q{i}", "a")} for i in range(10)]
    assert repeat_length(10, 2.5) == 25 and repeat_length(10, 0.3) == 3
    source = make_source(tmp_path, tokenizer, records, repeat_time=2.5)
    assert len(source) == 25
    lines = [source.line_of(i, epoch=0, seed=1) for i in range(25)]
    assert lines[:20] == list(range(10)) * 2  # two full copies
    extra = lines[20:]
    assert len(set(extra)) == 5  # a subset without replacement ...
    assert extra != [0, 1, 2, 3, 4]  # ... that is random, not the head (seed fixed)
    assert [source.line_of(i, 0, 1) for i in range(20, 25)] == extra  # reproducible
    other_epochs = {tuple(source.line_of(i, e, 1) for i in range(20, 25)) for e in range(5)}
    assert len(other_epochs) > 1  # a fresh subset per epoch
    below_one = make_source(tmp_path, tokenizer, records, repeat_time=0.3)
    assert len(below_one) == 3
    with pytest.raises(IndexError):
        below_one.load(3, 0, 0)


def test_sample_is_pure_function_of_seed_epoch_index(tmp_path, tokenizer):
    Image.effect_noise((200, 100), 50).convert("RGB").save(tmp_path / "n.png")
    source = make_source(
        tmp_path, tokenizer, [{"image": "n.png", "conversations": conv()}] * 2, augment=True
    )
    a, b = source.load(1, 0, 7), pickle.loads(pickle.dumps(source)).load(1, 0, 7)
    assert np.array_equal(a.pixel_values, b.pixel_values)
    assert np.array_equal(a.input_ids, b.input_ids)
    c = source.load(1, 1, 7)  # another epoch -> other JPEG qualities
    assert not np.array_equal(a.pixel_values, c.pixel_values)


def test_frame_indices_rand_sampling():
    rng = np.random.default_rng(0)
    picks = sample_frame_indices(24, 4, rng)
    # intervals [0,6) [6,12) [12,18) [18,24): one pick in each
    assert [p // 6 for p in picks] == [0, 1, 2, 3]
    padded = sample_frame_indices(2, 4, np.random.default_rng(1))
    assert padded[:2] == [0, 1] and padded[2:] == [1, 1]


def test_video_sample(tmp_path, tokenizer):
    write_video(tmp_path / "clip.mp4")
    record = {"video": "clip.mp4", "conversations": conv("Describe.")}
    source = make_source(tmp_path, tokenizer, [record])
    sample = source.load(0, 0, 3)
    num = len(sample.num_tiles_per_image)
    assert 3 <= num <= 5 and sample.num_tiles_per_image == (1,) * num
    text = tokenizer.decode(sample.input_ids.tolist())
    assert text.count("Frame-") == num and f"Frame-{num}: <img>" in text
    again = source.load(0, 0, 3)
    assert np.array_equal(sample.pixel_values, again.pixel_values)
    # frames are increasing in time: brightness grows with the frame index
    brightness = sample.pixel_values.mean(axis=(1, 2, 3))
    assert np.all(np.diff(brightness) >= -0.5)
    clipped = make_source(tmp_path, tokenizer, [{**record, "clip": [1.0, 2.0]}]).load(0, 0, 3)
    # clip [1 s, 2 s] at 8 fps = frames 8..15, pixel values 80..150
    red = clipped.pixel_values[:, 0].mean(axis=(1, 2))  # uint8 RGB tiles
    assert np.all((red > 70) & (red < 160)), red


def test_frame_folder_video(tmp_path, tokenizer):
    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(1, 11):
        Image.new("RGB", (20, 10), (k * 20, 0, 0)).save(folder / f"img_{k}.jpg")
    record = {"video": "frames/", "conversations": conv("What?")}
    sample = make_source(tmp_path, tokenizer, [record], min_num_frame=4, max_num_frame=4).load(
        0, 0, 0
    )
    assert sample.num_tiles_per_image == (1,) * 4


def test_build_sources_from_meta(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text(json.dumps({"conversations": conv("q", "a")}) + "\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({
        "one": {"root": ".", "annotation": "a.jsonl", "repeat_time": 3, "data_augment": False},
        "two": {"root": ".", "annotation": "a.jsonl", "repeat_time": 1, "data_augment": True},
    }))  # fmt: skip
    cfg = SampleConfig(**SMALL, cache_dir=str(tmp_path / "cache"))
    sources = build_sources(meta, cfg, facts_of(tokenizer), tokenizer)
    assert [(s.name, s.dataset_index, len(s)) for s in sources] == [("one", 0, 3), ("two", 1, 1)]


def outside_root_layout(tmp_path):
    """A dataset root with an image inside, one beside it ('../') and a link out of it."""
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (28, 28), "red").save(root / "inside.png")
    Image.new("RGB", (28, 28), "red").save(tmp_path / "beside.png")
    (root / "link.png").symlink_to(tmp_path / "beside.png")
    return root


def confined_source(tmp_path, tokenizer, paths, **config):
    root = outside_root_layout(tmp_path)
    records = [{"image": path, "conversations": conv()} for path in paths]
    ann = root / "ann.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = DatasetSpec(name="toy", dataset_index=0, root=root, annotation=ann,
                       repeat_time=1.0, data_augment=False)  # fmt: skip
    cfg = SampleConfig(**{**SMALL, "cache_dir": str(tmp_path / "cache"), **config})
    return DatasetSource(spec, cfg, facts_of(tokenizer), tokenizer)


OUTSIDE_PATHS = ["inside.png", "../beside.png", "link.png", "ABSOLUTE"]


def test_media_paths_may_leave_the_root_by_default(tmp_path, tokenizer):
    paths = [p.replace("ABSOLUTE", str(tmp_path / "beside.png")) for p in OUTSIDE_PATHS]
    source = confined_source(tmp_path, tokenizer, paths)
    assert all(isinstance(source.load(i, 0, 0), TokenizedSample) for i in range(4))


def test_media_under_root_skips_paths_resolving_outside_it(tmp_path, tokenizer):
    paths = [p.replace("ABSOLUTE", str(tmp_path / "beside.png")) for p in OUTSIDE_PATHS]
    source = confined_source(tmp_path, tokenizer, paths, media_under_root=True)
    results = [source.load(i, 0, 0) for i in range(4)]
    assert isinstance(results[0], TokenizedSample)
    # '../', a symlink out of the root and an absolute path all leave it.
    for skipped in results[1:]:
        assert isinstance(skipped, SkippedSample)
        assert skipped.reason == "media_outside_root"
        assert str(tmp_path / "root") in skipped.detail
    assert [r.source.line for r in results[1:]] == [2, 3, 4]


def write_upside_down(path):
    """Red left half, blue right half, stored with EXIF orientation 3 (shown rotated 180)."""
    image = Image.new("RGB", (56, 28), "blue")
    image.paste(Image.new("RGB", (28, 28), "red"), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 3
    image.save(path, exif=exif)


def first_tile_is_red(sample):
    red, blue = sample.pixel_values[0, 0].mean(), sample.pixel_values[0, 2].mean()
    return red > blue


def test_exif_orientation_is_ignored_by_default(tmp_path, tokenizer):
    write_upside_down(tmp_path / "a.png")
    sample = make_source(tmp_path, tokenizer, [{"image": "a.png", "conversations": conv()}])
    sample = sample.load(0, 0, 0)
    # 56x28 at 28-px tiles: a 2x1 grid (left tile first) + thumbnail; stored pixels: red left.
    assert sample.num_tiles_per_image == (3,)
    assert first_tile_is_red(sample)


def test_exif_transpose_turns_images_upright_before_tiling(tmp_path, tokenizer):
    write_upside_down(tmp_path / "a.png")
    records = [{"image": "a.png", "conversations": conv()}]
    sample = make_source(tmp_path, tokenizer, records, exif_transpose=True).load(0, 0, 0)
    # Rotated 180 degrees: blue is now on the left, so the first tile is blue.
    assert sample.num_tiles_per_image == (3,)
    assert not first_tile_is_red(sample)


def test_sixteen_bit_greyscale_saturates_at_255(tmp_path):
    from vlpretrain.data.media import load_image

    levels = np.array([[0, 100, 255, 256, 1000, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    # Pillow clips I;16 values at 255 on the way to RGB (no scaling), as the reference does.
    rgb = np.asarray(load_image(tmp_path / "grey16.png"))
    assert rgb[0, :, 0].tolist() == [0, 100, 255, 255, 255, 255]


def test_legacy_template_drops_a_leading_answer_and_skips_a_system_turn(tmp_path, tokenizer):
    system = {"from": "system", "value": "S"}
    leading = {"from": "gpt", "value": "stray"}
    records = [{"conversations": [leading, *conv("Hi", "Yo")]},
               {"conversations": [system, *conv("Hi", "Yo")]}]  # fmt: skip
    facts = facts_of(tokenizer, template="internlm2-chat")
    source = make_source(tmp_path, tokenizer, records, facts=facts)
    dropped, skipped = source.load(0, 0, 0), source.load(1, 0, 0)
    assert isinstance(dropped, TokenizedSample)
    assert "stray" not in tokenizer.decode(dropped.input_ids.tolist())
    assert tokenizer.decode(dropped.labels[dropped.labels >= 0].tolist()) == "Yo<|im_end|>"
    assert isinstance(skipped, SkippedSample) and skipped.reason == "unknown_role"
    assert "'system' turn" in skipped.detail and skipped.source.line == 2
