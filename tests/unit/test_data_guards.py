"""Data guards that run before the expensive work.

Byte cap per record before parsing, pixel cap from the image header before decoding, index
validity beyond size + mtime, <image>/<video> tag counts checked against the media, meta
validation of duplicate and empty datasets, and files created with the process umask.
"""

import json
import os
import stat
import struct
import time
import zlib

import pytest
from media_fixtures import write_growing_video, write_video
from PIL import Image

from vlpretrain.data.build import (
    DatasetSource,
    SampleConfig,
    build_sources,
    record_byte_limit,
)
from vlpretrain.data.index import AnnotationChangedError, AnnotationIndex, cache_file
from vlpretrain.data.media import image_size
from vlpretrain.data.meta import DatasetSpec, load_meta
from vlpretrain.data.records import RecordError, parse_record
from vlpretrain.data.samples import SkippedSample, TokenizedSample
from vlpretrain.facts import RunFacts
from vlpretrain.files import umask_mode, write_atomic

SMALL = dict(max_seq_length=512, min_num_frame=2, max_num_frame=3)


def conv(question="Hi", answer="Yo"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def make_source(tmp_path, tokenizer, records, **config):
    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    spec = DatasetSpec(name="toy", dataset_index=0, root=tmp_path, annotation=ann,
                       repeat_time=1.0, data_augment=False)  # fmt: skip
    cfg = SampleConfig(**{**SMALL, "cache_dir": str(tmp_path / "cache"), **config})
    return DatasetSource(spec, cfg, facts_of(tokenizer), tokenizer)


def facts_of(tokenizer):
    return RunFacts.from_tokenizer(tokenizer, tile_size=28, num_image_token=4,
                                   template="internvl2_5")  # fmt: skip


# -- byte cap ------------------------------------------------------------------------------


def test_default_byte_cap_is_32_bytes_per_token():
    assert record_byte_limit(SampleConfig(max_seq_length=8192)) == 262_144  # 32 * 8192
    assert record_byte_limit(SampleConfig(max_record_bytes=1000)) == 1000
    with pytest.raises(ValueError, match="max_record_bytes must be >= 1"):
        SampleConfig(max_record_bytes=0)


def test_long_line_is_refused_before_it_is_parsed(tmp_path, tokenizer, monkeypatch):
    huge = json.dumps({"conversations": conv("x" * 3_000_000, "y")})  # 3 MB, one line
    source = make_source(tmp_path, tokenizer, [huge, {"conversations": conv()}])
    parsed = []

    def counting_parse(line, root):
        parsed.append(len(line))
        return parse_record(line, root)

    monkeypatch.setattr("vlpretrain.data.build.parse_record", counting_parse)
    start = time.process_time()
    skipped, ok = source.load(0, 0, 0), source.load(1, 0, 0)
    seconds = time.process_time() - start
    assert isinstance(skipped, SkippedSample) and skipped.reason == "too_long"
    # default cap: 32 bytes x max_seq_length 512 = 16384 bytes
    assert "more than data.max_record_bytes = 16384 bytes" in skipped.detail
    assert skipped.source.line == 1
    assert isinstance(ok, TokenizedSample)
    assert len(parsed) == 1 and parsed[0] < 100  # only the good line reached the parser
    assert seconds < 1.0  # nothing of the 3 MB was tokenised (it takes seconds)


def test_line_of_exactly_the_cap_is_read(tmp_path, tokenizer):
    line = json.dumps({"conversations": conv("q", "a")})
    source = make_source(tmp_path, tokenizer, [line, line], max_record_bytes=len(line))
    assert isinstance(source.load(0, 0, 0), TokenizedSample)
    assert isinstance(source.load(1, 0, 0), TokenizedSample)  # not fooled by the newline
    short = make_source(tmp_path, tokenizer, [line], max_record_bytes=len(line) - 1)
    assert short.load(0, 0, 0).reason == "too_long"


# -- pixel cap -----------------------------------------------------------------------------


def png_with_header_size(path, width, height):
    """A tiny PNG whose IHDR claims width x height (the pixel data is far too short)."""
    Image.new("L", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_huge_png_is_refused_from_its_header(tmp_path, tokenizer):
    # a 12000x12000 PNG can weigh 140 KB; here with an even smaller body: the
    # header alone decides, so no pixel is decoded (decoding would report it corrupt)
    png_with_header_size(tmp_path / "huge.png", 12000, 12000)
    assert (tmp_path / "huge.png").stat().st_size < 200
    source = make_source(tmp_path, tokenizer, [{"image": "huge.png", "conversations": conv()}])
    result = source.load(0, 0, 0)
    assert result.reason == "image_too_large"
    assert "12000x12000 = 144000000 pixels exceeds data.max_image_pixels = 50000000" in (
        result.detail
    )


def test_pixel_cap_is_configurable(tmp_path, tokenizer):
    png_with_header_size(tmp_path / "huge.png", 12000, 12000)
    source = make_source(tmp_path, tokenizer, [{"image": "huge.png", "conversations": conv()}],
                         max_image_pixels=200_000_000)  # fmt: skip
    assert source.load(0, 0, 0).reason == "corrupt_image"  # allowed, then fails to decode


def test_video_frames_obey_the_pixel_cap(tmp_path, tokenizer):
    write_video(tmp_path / "clip.mp4", num_frames=4, size=64)
    (tmp_path / "frames").mkdir()
    for k in range(3):
        Image.new("RGB", (64, 64)).save(tmp_path / "frames" / f"f{k}.png")
    records = [{"video": "clip.mp4", "conversations": conv()},
               {"video": "frames", "conversations": conv()}]  # fmt: skip
    source = make_source(tmp_path, tokenizer, records, max_image_pixels=4000)
    results = [source.load(i, 0, 0) for i in range(2)]
    assert [r.reason for r in results] == ["image_too_large", "image_too_large"]
    assert "64x64 = 4096 pixels" in results[0].detail
    loose = make_source(tmp_path, tokenizer, records)
    assert all(isinstance(loose.load(i, 0, 0), TokenizedSample) for i in range(2))


def test_video_frames_larger_than_the_stream_header_are_refused(tmp_path, tokenizer):
    # the header says 64x48 (3072 pixels, under the cap of 6144); the last 4 of the 8 frames
    # are 256x256 = 65536 pixels. Every sampled set of 2-3 frames reaches the second half
    # (one frame per equal interval), so each one must be checked as it is decoded.
    write_growing_video(tmp_path / "grows.m4v", (64, 48), (256, 256))
    record = {"video": "grows.m4v", "conversations": conv("<video>\nHi")}
    source = make_source(tmp_path, tokenizer, [record], max_image_pixels=6144)
    skipped = source.load(0, 0, 0)
    assert isinstance(skipped, SkippedSample), skipped
    assert skipped.reason == "image_too_large"
    assert "data.max_image_pixels = 6144" in skipped.detail
    assert "grows.m4v" in skipped.detail
    loose = make_source(tmp_path, tokenizer, [record], max_image_pixels=65536)
    assert isinstance(loose.load(0, 0, 0), TokenizedSample)  # 256x256 is exactly the cap


def test_the_decoder_refuses_frames_far_above_the_cap(tmp_path, tokenizer):
    # 1000x700 = 700000 pixels: the decoder's own limit (2 x 6144 + 262144 = 274432) refuses
    # to allocate them, so a lying stream cannot cost gigabytes before our check
    write_growing_video(tmp_path / "grows.m4v", (64, 48), (1000, 700))
    record = {"video": "grows.m4v", "conversations": conv("<video>\nHi")}
    source = make_source(tmp_path, tokenizer, [record], max_image_pixels=6144)
    skipped = source.load(0, 0, 0)
    assert skipped.reason == "image_too_large", skipped
    assert "the decoder refused it" in skipped.detail
    loose = make_source(tmp_path, tokenizer, [record], max_image_pixels=700_000)
    assert isinstance(loose.load(0, 0, 0), TokenizedSample)


def test_pillow_bomb_limit_does_not_file_a_big_image_as_corrupt(tmp_path, tokenizer):
    # 20000x20000 = 400 MP is above twice Pillow's own 179 MP limit, where Image.open raises
    # DecompressionBombError; our cap (50 MP) decides, with its own reason
    png_with_header_size(tmp_path / "bomb.png", 20000, 20000)
    source = make_source(tmp_path, tokenizer, [{"image": "bomb.png", "conversations": conv()}])
    skipped = source.load(0, 0, 0)
    assert skipped.reason == "image_too_large"
    assert "20000x20000 = 400000000 pixels exceeds data.max_image_pixels = 50000000" in (
        skipped.detail
    )


def test_pillow_limit_below_ours_does_not_override_it(tmp_path, tokenizer, monkeypatch):
    # data.max_image_pixels is the one limit: with Pillow's limit at 1000 pixels, a 100x100
    # image (10000 > 2 x 1000: Pillow would raise) still loads under our default 50 MP cap
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (100, 100), "blue").save(tmp_path / "a.png")
    source = make_source(tmp_path, tokenizer, [{"image": "a.png", "conversations": conv()}])
    assert isinstance(source.load(0, 0, 0), TokenizedSample)
    assert Image.MAX_IMAGE_PIXELS == 1000  # left as it was for everyone else


def test_image_size_reads_a_header_above_pillows_limit(tmp_path):
    png_with_header_size(tmp_path / "bomb.png", 20000, 20000)
    assert image_size(tmp_path / "bomb.png") == (20000, 20000)


# -- index validity ------------------------------------------------------------------------


def rewrite_same_size_keep_mtime(path, text):
    """What `cp -p` / `rsync -t` do to an annotation file: new bytes, old size and mtime."""
    stat = path.stat()
    assert len(text.encode()) == stat.st_size
    path.write_text(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_same_size_rewrite_with_restored_mtime_is_reindexed(tmp_path):
    ann = tmp_path / "a.jsonl"
    old = "".join(json.dumps({"i": i, "pad": "x" * (i % 3)}) + "\n" for i in range(6))
    ann.write_text(old)
    first = AnnotationIndex(ann, tmp_path / "cache")
    assert [json.loads(first.read(i))["i"] for i in range(6)] == list(range(6))
    # same bytes, lines re-cut: 3 longer lines, same total size
    new = "".join(json.dumps({"j": j, "pad": "y" * n}) + "\n" for j, n in enumerate((6, 6, 5)))
    new += " " * (len(old) - len(new) - 1) + "\n"
    rewrite_same_size_keep_mtime(ann, new)
    second = AnnotationIndex(ann, tmp_path / "cache")
    assert len(second) == 3
    assert [json.loads(second.read(i))["j"] for i in range(3)] == [0, 1, 2]
    assert len(list((tmp_path / "cache").glob("*.index"))) == 1  # the stale cache is gone


def test_cache_key_covers_inode_ctime_and_content(tmp_path):
    ann = tmp_path / "a.jsonl"
    ann.write_text('{"a": 1}\n')
    key = cache_file(ann, tmp_path)
    replacement = tmp_path / "b.jsonl"
    replacement.write_text('{"a": 2}\n')
    os.utime(replacement, ns=(ann.stat().st_atime_ns, ann.stat().st_mtime_ns))
    os.replace(replacement, ann)  # rsync -t: a new inode with the old size and mtime
    assert cache_file(ann, tmp_path) != key


def test_file_changed_during_the_run_stops_with_a_clear_error(tmp_path):
    ann = tmp_path / "a.jsonl"
    ann.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(4)))
    index = AnnotationIndex(ann, tmp_path / "cache")
    ann.write_text('{"i": "longer line now"}\n' * 4)  # the index still holds old offsets
    with pytest.raises(AnnotationChangedError, match=r"a.jsonl: line 2 no longer starts at byte"):
        index.read(1)


# -- placeholder / image-count mismatches ---------------------------------------------------


@pytest.mark.parametrize(
    ("record", "detail"),
    [
        ({"image": "a.png", "conversations": conv("<image> and <image>")},
         "image record with 1 image(s) has 2 <image> tags, expected at most 1"),
        ({"conversations": conv("<image>\nwhat is this?")},
         "text record has 1 <image> tags, expected 0"),
        ({"image": ["a.png", "a.png"], "conversations": conv("<image><image><image>")},
         "multi_image record with 2 image(s) has 3 <image> tags, expected 2"),
        ({"image": ["a.png", "a.png"], "conversations": conv("<image>")},
         "multi_image record with 2 image(s) has 1 <image> tags, expected 2"),
        ({"image": "a.png", "conversations": conv("Q", "here: <image>")},
         "conversations[1] (gpt) contains <image>: tags belong in human turns"),
        ({"video": "v.mp4", "conversations": conv("<video> <image>")},
         "video record has 1 <image> tags, expected 0"),
        ({"video": "v.mp4", "conversations": conv("<video><video>")},
         "video record has 2 <video> tags, expected at most 1"),
        ({"image": "a.png", "conversations": conv("<video> hi")},
         "image record with 1 image(s) has 1 <video> tags, expected at most 0"),
    ],
)  # fmt: skip
def test_tag_count_mismatches_are_rejected_before_decoding(tmp_path, tokenizer, record, detail):
    # a.png / v.mp4 do not exist: the tag check must come before any media is opened
    result = make_source(tmp_path, tokenizer, [record]).load(0, 0, 0)
    assert isinstance(result, SkippedSample)
    assert (result.reason, result.detail) == ("placeholder_mismatch", detail)


def test_empty_image_string_is_rejected(tmp_path):
    for key in ("image", "video"):
        with pytest.raises(RecordError) as info:
            parse_record(json.dumps({key: "", "conversations": conv("<image> hi")}), tmp_path)
        assert info.value.reason == "missing_field"
        assert f"'{key}' is an empty string" in info.value.detail
    # no image at all (absent, null or an empty list) is a text record, as in the reference
    for value in (None, []):
        assert parse_record(json.dumps({"image": value, "conversations": conv()}), tmp_path).kind \
            == "text"  # fmt: skip


def test_matching_tags_still_build(tmp_path, tokenizer):
    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    records = [
        {"image": "a.png", "conversations": conv("no tag: one is inserted")},
        {"image": "a.png", "conversations": conv("<image> one tag")},
        {"image": ["a.png", "a.png"], "conversations": conv("<image> and <image>")},
    ]
    source = make_source(tmp_path, tokenizer, records)
    assert [source.load(i, 0, 0).num_tiles_per_image for i in range(3)] == [(1,), (1,), (1, 1)]


# -- meta validation -----------------------------------------------------------------------


def test_meta_rejects_duplicate_and_empty_datasets_at_once(tmp_path):
    (tmp_path / "ok.jsonl").write_text(json.dumps({"conversations": conv()}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    entry = '{"root": "%s", "annotation": "%s", "repeat_time": 1, "data_augment": false%s}'
    root = str(tmp_path)
    text = "{" + ", ".join([
        '"dup": ' + entry % (root, "ok.jsonl", ""),
        '"dup": ' + entry % (root, "ok.jsonl", ""),
        '"twice": ' + entry % (root, "ok.jsonl", ', "repeat_time": 2'),
        '"empty": ' + entry % (root, "empty.jsonl", ""),
        '"blank": ' + entry % (root, "blank.jsonl", ""),
    ]) + "}"  # fmt: skip
    meta = tmp_path / "meta.json"
    meta.write_text(text)
    with pytest.raises(ValueError) as info:
        load_meta(meta)
    message = str(info.value)
    assert f"meta file {meta} has 4 problem(s)" in message
    assert "dataset 'dup' is defined more than once" in message
    assert "dataset 'twice': field 'repeat_time' is given more than once" in message
    assert f"dataset 'empty': field 'annotation': {tmp_path / 'empty.jsonl'} has no records" in (
        message
    )
    assert "dataset 'blank': field 'annotation'" in message


def test_repeat_time_that_leaves_no_record_is_rejected(tmp_path, tokenizer):
    (tmp_path / "three.jsonl").write_text(json.dumps({"conversations": conv()}) * 0 + "".join(
        json.dumps({"conversations": conv(f"q{i}")}) + "\n" for i in range(3)))  # fmt: skip
    meta = tmp_path / "meta.json"
    entry = {"root": str(tmp_path), "annotation": "three.jsonl", "data_augment": False}
    meta.write_text(json.dumps({"tiny": {**entry, "repeat_time": 0.2},
                                "fine": {**entry, "repeat_time": 0.5}}))  # fmt: skip
    config = SampleConfig(**SMALL, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError) as info:
        build_sources(meta, config, facts_of(tokenizer), tokenizer)
    message = str(info.value)
    assert f"meta file {meta} has 1 problem(s)" in message
    assert "dataset 'tiny': field 'repeat_time' 0.2 x 3 lines" in message  # int(0.6) = 0
    assert "'fine'" not in message  # int(3 * 0.5) = 1 record


@pytest.mark.parametrize("repeat_time", [1e9, 1e18])
def test_repeat_time_beyond_the_record_limit_is_one_clear_error(tmp_path, tokenizer, repeat_time):
    # 1e9 passed data check, then every loader stream tried to shuffle 1e9 x lines records
    # (894 GiB); 1e18 gave a raw OverflowError from len()
    (tmp_path / "ten.jsonl").write_text(
        "".join(json.dumps({"conversations": conv(f"q{i}")}) + "\n" for i in range(10))
    )
    meta = tmp_path / "meta.json"
    entry = {"root": str(tmp_path), "annotation": "ten.jsonl", "data_augment": False}
    meta.write_text(json.dumps({"huge": {**entry, "repeat_time": repeat_time},
                                "fine": {**entry, "repeat_time": 2.0}}))  # fmt: skip
    config = SampleConfig(**SMALL, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError) as info:
        build_sources(meta, config, facts_of(tokenizer), tokenizer)
    message = str(info.value)
    assert f"meta file {meta} has 1 problem(s)" in message
    records = int(10 * repeat_time)
    assert f"dataset 'huge': field 'repeat_time' {repeat_time} x 10 lines" in message
    assert f"gives {records} records, above the limit of 268435456 per dataset" in message
    # 268435456 / 10 lines
    assert "use repeat_time <= 26843545.6" in message
    assert "'fine'" not in message


def test_deeply_nested_meta_file_is_one_clear_error(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text('{"a":\n {"root": ' + "[" * 5000 + "]" * 5000 + "}}")
    with pytest.raises(ValueError) as info:
        load_meta(meta)
    message = str(info.value)
    assert f"meta file {meta}: cannot read JSON" in message
    # depth 1 is the file's object, 2 the dataset's, 3 the first list (line 2, column 11);
    # the second list passes depth 3, at column 12
    assert "nested deeper than the JSON parser allows" in message
    assert "depth 3 passed at line 2, column 12" in message


# -- file modes ----------------------------------------------------------------------------


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_atomic_writes_follow_the_umask(tmp_path, umask_027):
    assert umask_mode() == umask_027
    write_atomic(tmp_path / "f.bin", lambda handle: handle.write(b"x"))
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left


def test_atomic_writes_sync_the_file_before_the_rename_and_the_directory_after(
    tmp_path, monkeypatch
):
    # a rename reaches the disk on its own schedule: without both syncs a power cut can leave
    # the new name pointing at an empty file, or the old file back in place
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        status = os.fstat(fd)
        kind = "directory" if stat.S_ISDIR(status.st_mode) else "file"
        events.append(("fsync", kind, status.st_ino, status.st_size if kind == "file" else None))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace",))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_atomic(tmp_path / "f.bin", lambda handle: handle.write(b"abc"))
    file_inode, directory_inode = (tmp_path / "f.bin").stat().st_ino, tmp_path.stat().st_ino
    assert events == [
        ("fsync", "file", file_inode, 3),  # the temp file, all 3 bytes written, before the rename
        ("replace",),
        ("fsync", "directory", directory_inode, None),  # the rename itself
    ]


def test_index_cache_follows_the_umask(tmp_path, umask_027):
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n')
    AnnotationIndex(tmp_path / "a.jsonl", tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("*.index")
    assert cache.stat().st_mode & 0o777 == 0o640  # mkstemp alone gives 0600


def test_safetensors_weights_follow_the_umask(tmp_path, umask_027):
    import torch

    from vlpretrain.model.hub import save_weights

    save_weights({"w": torch.zeros(2)}, tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o640
