"""Meta, annotation and media read from object storage, and a Location's reads of a file and
of the same bytes as an object: a real S3 API (moto's server) on 127.0.0.1, s3fs as the
client, a proxy that drops or stalls chosen replies (tests/s3_server.py).
"""

import io
import json
import multiprocessing
import os
import time

import numpy as np
import pytest
from media_fixtures import write_video
from PIL import Image
from s3_server import BUCKET, s3_server
from train_fixtures import stage_raw, train_assets, write_stage  # noqa: F401

from vlpretrain.cli import main
from vlpretrain.config import build_run_config, validate
from vlpretrain.data import media, remote
from vlpretrain.data.build import DatasetSource, SampleConfig, build_sources
from vlpretrain.data.index import AnnotationIndex
from vlpretrain.data.location import Location
from vlpretrain.data.meta import DatasetSpec, load_meta
from vlpretrain.data.records import RecordError
from vlpretrain.data.remote import RemoteSettings
from vlpretrain.data.samples import SkippedSample, TokenizedSample
from vlpretrain.data.skips import SkipTally, skip_entry
from vlpretrain.facts import RunFacts

FAST = RemoteSettings(timeout_seconds=3.0, retries=2, backoff_seconds=0.01)
SMALL = dict(max_seq_length=4096, min_num_frame=3, max_num_frame=3, remote_timeout_seconds=3.0)


@pytest.fixture(scope="module")
def s3():
    with pytest.MonkeyPatch.context() as patch, s3_server(patch) as server:
        remote._FILESYSTEMS.clear()  # clients made from here on see the server's variables
        yield server
    remote._FILESYSTEMS.clear()


@pytest.fixture(autouse=True)
def no_faults(s3):
    s3.proxy.clear()


def at(url, settings=FAST):
    """The location of `url`, read with `settings`."""
    return Location.parse(url, settings=settings)


def facts_of(tokenizer):
    return RunFacts.from_tokenizer(
        tokenizer, tile_size=28, num_image_token=4, template="internvl2_5"
    )


def png(size, color):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def conv(question="<image>\nHi", answer="Yo"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def upload_dataset(s3, tmp_path, prefix, records, files):
    """The same dataset twice: under tmp_path/prefix and under s3://BUCKET/prefix."""
    local = tmp_path / prefix
    local.mkdir()
    for name, data in {**files, "ann.jsonl": jsonl(records)}.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
        s3.put(f"{prefix}/{name}", data)
    meta = {"ds": {"root": ".", "annotation": "ann.jsonl", "repeat_time": 1, "data_augment": False}}
    s3.put(f"{prefix}/meta.json", json.dumps(meta).encode())  # "." is the meta file's prefix
    meta["ds"]["root"] = str(local)  # locally "." would be the current directory
    (local / "meta.json").write_text(json.dumps(meta))
    return local / "meta.json", f"s3://{BUCKET}/{prefix}/meta.json"


def test_samples_from_s3_equal_the_same_samples_from_disk(s3, tmp_path, tokenizer):
    video = tmp_path / "clip.mp4"
    write_video(video, num_frames=12)
    frames = {f"frames/img_{k}.jpg": png((20, 10), (k * 20, 0, 0)) for k in range(1, 7)}
    files = {"a.png": png((56, 28), "red"), "b.png": png((19, 30), "blue"),
             "clip.mp4": video.read_bytes(), **frames}  # fmt: skip
    records = [
        {"image": "a.png", "conversations": conv("Hi")},
        {"image": ["a.png", "b.png"], "conversations": conv("<image><image>")},
        {"conversations": conv("just text", "ok")},
        {"video": "clip.mp4", "conversations": conv("Describe.")},
        {"video": "frames/", "conversations": conv("What?")},
    ]
    local_meta, url_meta = upload_dataset(s3, tmp_path, "same", records, files)
    config = SampleConfig(**SMALL, cache_dir=str(tmp_path / "cache"))
    local = build_sources(local_meta, config, facts_of(tokenizer), tokenizer)[0]
    remote_source = build_sources(url_meta, config, facts_of(tokenizer), tokenizer)[0]
    assert str(remote_source.spec.annotation) == f"s3://{BUCKET}/same/ann.jsonl"  # meta-relative
    assert len(remote_source) == len(local) == len(records)
    for i in range(len(records)):
        want, got = local.load(i, 0, 7), remote_source.load(i, 0, 7)
        assert isinstance(want, TokenizedSample), want
        assert isinstance(got, TokenizedSample), got
        assert np.array_equal(want.input_ids, got.input_ids)
        assert np.array_equal(want.pixel_values, got.pixel_values)
        assert got.num_tiles_per_image == want.num_tiles_per_image
        assert got.source.path == str(remote_source.spec.annotation) and got.source.line == i + 1


def test_remote_index_is_cached_by_etag_and_read_by_ranges(s3, tmp_path):
    lines = b'{"a": 1}\r\n\n   \n{"b": 22}\n' + b'{"long": "' + b"x" * 200 + b'"}\n{"c": 3}'
    url = s3.put("idx/ann.jsonl", lines)
    cache = tmp_path / "cache"
    index = AnnotationIndex(url, cache, FAST)
    assert len(index) == 4 and [index.line_number(i) for i in range(4)] == [1, 4, 5, 6]
    assert [index.read(i) for i in (0, 1, 3)] == [b'{"a": 1}', b'{"b": 22}', b'{"c": 3}']
    with pytest.raises(RecordError, match="too_long"):
        index.read(2, max_bytes=100)
    assert s3.proxy.seen("idx/ann.jsonl")[-1].range  # a record is one ranged read
    gets = len(s3.proxy.seen("idx/ann.jsonl"))
    again = AnnotationIndex(url, cache, FAST)  # cached: metadata only, no byte read
    assert len(again) == 4 and len(s3.proxy.seen("idx/ann.jsonl")) == gets
    assert len(list(cache.glob("*.index"))) == 1
    s3.put("idx/ann.jsonl", b'{"new": 1}\n{"new": 2}\n')  # new ETag: indexed again
    changed = AnnotationIndex(url, cache, FAST)
    assert len(changed) == 2 and changed.read(1) == b'{"new": 2}'
    assert len(list(cache.glob("*.index"))) == 1  # the stale cache file is gone


def test_a_connection_dropped_mid_read_is_retried(s3):
    data = png((40, 30), "green")
    url = at(s3.put("flaky/img.png", data))
    s3.proxy.plan("flaky/img.png", "drop", "ok")
    image = media.load_image(url)
    assert image.size == (40, 30) and image.getpixel((0, 0)) == (0, 128, 0)
    assert len(s3.proxy.seen("flaky/img.png")) == 2  # the dropped read and its retry


def test_a_read_that_keeps_failing_is_a_counted_skip_naming_the_url(s3, tmp_path, tokenizer):
    records = [{"image": "good.png", "conversations": conv()},
               {"image": "broken.png", "conversations": conv()}]  # fmt: skip
    files = {"good.png": png((28, 28), "red"), "broken.png": png((28, 28), "red")}
    _, meta = upload_dataset(s3, tmp_path, "skips", records, files)
    config = SampleConfig(**SMALL, cache_dir=str(tmp_path / "cache"), remote_retries=1)
    source = build_sources(meta, config, facts_of(tokenizer), tokenizer)[0]
    s3.proxy.plan("skips/broken.png", "drop")
    tally = SkipTally([source.name])
    samples = [source.load(i, 0, 0) for i in range(2)]
    for sample in samples:
        tally.record(sample)
    assert isinstance(samples[0], TokenizedSample)
    skipped = samples[1]
    assert isinstance(skipped, SkippedSample) and skipped.reason == "read_error"
    assert f"s3://{BUCKET}/skips/broken.png" in skipped.detail
    assert "failed 2 time(s)" in skipped.detail  # 1 + data.remote_retries attempts, no more
    assert len(s3.proxy.seen("skips/broken.png")) == 2
    assert tally.num_skipped == 1 and tally.by_reason() == {"read_error": 1}
    entry = skip_entry(skipped, step=3, rank=0)
    assert entry["file"] == f"s3://{BUCKET}/skips/ann.jsonl" and entry["line"] == 2
    s3.proxy.plan("skips/ann.jsonl", "drop")  # the annotation line itself cannot be read
    line_skip = source.load(0, 0, 0)
    assert line_skip.reason == "read_error" and "skips/ann.jsonl" in line_skip.detail


def test_a_stalled_server_times_out_instead_of_hanging(s3):
    settings = RemoteSettings(timeout_seconds=0.5, retries=1, backoff_seconds=0.01)
    url = at(s3.put("stall/img.png", png((8, 8), "red")), settings)
    s3.proxy.plan("stall/img.png", "stall")
    start = time.monotonic()
    with pytest.raises(RecordError) as caught:
        media.load_image(url)
    assert time.monotonic() - start < 5.0  # 2 attempts of 0.5 s, not the 20 s stall
    assert caught.value.reason == "read_error" and str(url) in caught.value.detail
    assert "0.5 s timeout" in caught.value.detail
    head = at(s3.put("stall/head.png", png((8, 8), "red")), settings)
    s3.proxy.plan("stall/head.png", "stall", method="HEAD")  # the metadata request stalls
    start = time.monotonic()
    with pytest.raises(RecordError, match=f"read_error: {head}: info failed 2 time"):
        media.load_image(head)
    assert time.monotonic() - start < 5.0


def test_missing_objects_are_named(s3, tmp_path):
    missing = at(f"s3://{BUCKET}/nowhere/img.png")
    with pytest.raises(RecordError, match="missing_image: no image object s3://") as caught:
        media.load_image(missing)
    assert str(missing) in caught.value.detail
    rng = np.random.default_rng(0)
    with pytest.raises(RecordError, match=f"video_error: .*{BUCKET}/nowhere/clip.mp4"):
        media.load_video_frames(at(f"s3://{BUCKET}/nowhere/clip.mp4"), 2, 2, rng)
    meta = {
        "gone": {"root": ".", "annotation": "gone.jsonl", "repeat_time": 1, "data_augment": False},
        "blank": {"root": ".", "annotation": "blank.jsonl", "repeat_time": 1,
                  "data_augment": False},
        "proto": {"root": "nosuchproto://x/", "annotation": f"s3://{BUCKET}/nowhere/b.jsonl",
                  "repeat_time": 1, "data_augment": False},
    }  # fmt: skip
    s3.put("missing/blank.jsonl", b"\n   \n")
    url = s3.put("missing/meta.json", json.dumps(meta).encode())
    with pytest.raises(ValueError) as caught:
        load_meta(url, FAST)
    text = str(caught.value)
    assert f"meta file {url} has 4 problem(s)" in text
    blank = f"s3://{BUCKET}/missing/blank.jsonl has no records (empty or blank lines only)"
    assert f"dataset 'blank': field 'annotation': {blank}" in text
    assert f"dataset 'gone': field 'annotation': no object s3://{BUCKET}/missing/gone.jsonl" in text
    assert (
        "dataset 'proto': field 'root' 'nosuchproto://x/': unknown protocol 'nosuchproto'" in text
    )
    assert f"dataset 'proto': field 'annotation': no object s3://{BUCKET}/nowhere/b.jsonl" in text
    with pytest.raises(ValueError, match=f"meta file s3://{BUCKET}/missing/none.json: cannot"):
        load_meta(f"s3://{BUCKET}/missing/none.json", FAST)


def test_pixel_cap_is_checked_from_a_ranged_header_read(s3):
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    assert len(buffer.getvalue()) > 4 * media.HEADER_BYTES
    url = at(s3.put("big/noise.png", buffer.getvalue()))
    with pytest.raises(RecordError, match="image_too_large: .*300x300 = 90000 pixels"):
        media.load_image(url, max_pixels=10_000)
    (read,) = s3.proxy.seen("big/noise.png")  # only the header was fetched
    assert read.range == f"bytes=0-{media.HEADER_BYTES - 1}"
    assert media.image_size(url) == (300, 300)


def test_plain_http_urls_work_too(s3, tmp_path):
    """Any fsspec protocol: the same objects over plain HTTP (Range requests, ETag header)."""
    s3.put("http/ann.jsonl", jsonl([{"k": k} for k in range(3)]), public=True)
    s3.put("http/a.png", png((30, 20), "red"), public=True)
    index = AnnotationIndex(s3.http_url("http/ann.jsonl"), tmp_path / "cache", FAST)
    assert len(index) == 3 and index.read(2) == b'{"k": 2}'
    assert media.load_image(at(s3.http_url("http/a.png"))).size == (30, 20)
    with pytest.raises(RecordError, match="missing_image: no image object http://"):
        media.load_image(at(s3.http_url("http/none.png")))


def _read_in_child(index, i):
    return index.read(i), len(remote._FILESYSTEMS)


def test_a_forked_worker_makes_its_own_filesystem(s3, tmp_path):
    url = s3.put("fork/ann.jsonl", jsonl([{"k": k} for k in range(5)]))
    index = AnnotationIndex(url, tmp_path / "cache", FAST)
    assert index.read(4) == b'{"k": 4}'  # the parent holds a filesystem now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        line, num_filesystems = pool.apply(_read_in_child, (index, 2))
    assert line == b'{"k": 2}' and num_filesystems == 1  # the parent's was dropped


def test_local_paths_never_go_through_fsspec(tmp_path, tokenizer, monkeypatch):
    def refuse(*args):
        raise AssertionError("a local path reached fsspec")

    monkeypatch.setattr(remote, "filesystem", refuse)
    Image.new("RGB", (28, 28), "red").save(tmp_path / "a.png")
    (tmp_path / "ann.jsonl").write_bytes(jsonl([{"image": "a.png", "conversations": conv()}]))
    ann = tmp_path / "ann.jsonl"
    spec = DatasetSpec(name="toy", dataset_index=0, root=tmp_path, annotation=ann,
                       repeat_time=1.0, data_augment=False)  # fmt: skip
    config = SampleConfig(**SMALL, cache_dir=str(tmp_path / "cache"))
    sample = DatasetSource(spec, config, facts_of(tokenizer), tokenizer).load(0, 0, 0)
    assert isinstance(sample, TokenizedSample)


def test_data_check_of_an_s3_meta_names_every_failed_url(s3, tmp_path, train_assets, capsys):  # noqa: F811
    good = {"image": "a.png", "conversations": conv("what?", "red")}
    records = [good, good, good, {**good, "image": "gone.png"}, {**good, "image": "broken.png"}]
    files = {"a.png": png((56, 28), "red"), "broken.png": png((56, 28), "red")}
    _, meta = upload_dataset(s3, tmp_path, "check", records, files)
    s3.proxy.plan("check/broken.png", "drop")
    raw = stage_raw(train_assets, tmp_path / "run", train={"meta_path": meta})
    stage = write_stage(tmp_path / "stage.toml", raw)
    sets = ["data.remote_retries=0", f"data.cache_dir={tmp_path / 'cache'}"]
    code = main(["data", "check", str(stage), *(a for s in sets for a in ("--set", s))])
    out = capsys.readouterr().out
    # 2 of 5 skipped is above the run's 20 %, but an epoch of 5 records is below the 100 the
    # skip policy needs before it judges (training would not stop either)
    assert code == 0
    assert "OK: skip fraction 40.00% of an epoch of 5 records (max 20.00%), not judged" in out
    assert "== ds: 5 lines, effective length 5, 3 ok, 2 skipped" in out
    assert "ds: read_error: 1 of 5" in out and "ds: missing_image: 1 of 5" in out
    assert f"s3://{BUCKET}/check/ann.jsonl:5" in out  # where the record is
    assert f"s3://{BUCKET}/check/broken.png: cat_file failed 1 time(s)" in out  # what failed
    assert f"no image object s3://{BUCKET}/check/gone.png" in out


def test_remote_settings_come_from_the_data_config(tmp_path):
    config = build_run_config(
        {"model": {"model_name_or_path": str(tmp_path)},
         "train": {"meta_path": f"s3://{BUCKET}/any/meta.json"},
         "data": {"remote_timeout_seconds": 2.5, "remote_retries": 0}}
    )  # fmt: skip
    assert config.data.remote_settings() == RemoteSettings(timeout_seconds=2.5, retries=0)
    validate(config, world_size=1)  # a URL meta is checked when it is read, not here
    with pytest.raises(ValueError, match="remote_timeout_seconds must be > 0"):
        SampleConfig(remote_timeout_seconds=0)
    with pytest.raises(ValueError, match="remote_retries must be >= 0"):
        SampleConfig(remote_retries=-1)


RANGES = [(0, 5), (7, 100), (250, 10), (259, 5), (3, 0)]
"""(offset, length) pairs of a 260-byte file: inside, across the end (fewer bytes), empty."""


def test_ranged_reads_of_a_file_and_of_its_object_agree(s3, tmp_path):
    data = bytes(range(256)) + b"tail"  # 260 bytes
    (tmp_path / "blob.bin").write_bytes(data)
    local = Location.parse(tmp_path / "blob.bin")
    url = Location.parse(s3.put("location/blob.bin", data), settings=FAST)
    for offset, length in RANGES:
        want = data[offset : offset + length]
        assert local.read_range(offset, length) == url.read_range(offset, length) == want
    for location in (local, url):
        with location.open() as stream:
            assert stream.size == 260 and stream.read(4) == data[:4]
            stream.seek(-4, os.SEEK_END)
            assert stream.read() == b"tail" and stream.read(1) == b""
        assert location.read_all() == data and location.info().size == 260


def test_a_missing_object_and_a_prefix_fail_as_missing_files_and_folders_do(s3, tmp_path):
    s3.put("location/folder/one.png", b"x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "one.png").write_bytes(b"x")
    prefix = Location.parse(f"s3://{BUCKET}/location/folder", settings=FAST)
    for where in (prefix, Location.parse(tmp_path / "folder")):
        assert where.is_dir() and not where.is_file()
        assert [p.name for p in where.list_files()] == ["one.png"]
        missing = where.join("none.bin")
        assert not missing.exists()
        with pytest.raises(FileNotFoundError):
            missing.info()
        with pytest.raises(FileNotFoundError):
            missing.read_range(0, 1)
    with pytest.raises(IsADirectoryError, match="is a prefix"):
        prefix.fingerprint()


def test_an_index_reads_a_file_and_its_object_alike(s3, tmp_path):
    lines = b'{"a": 1}\r\n\n   \n{"b": 22}\n{"c": 3}'
    (tmp_path / "ann.jsonl").write_bytes(lines)
    url = s3.put("location/ann.jsonl", lines)
    local = AnnotationIndex(tmp_path / "ann.jsonl", tmp_path / "cache")
    remote_index = AnnotationIndex(url, tmp_path / "cache", FAST)
    records = [b'{"a": 1}', b'{"b": 22}', b'{"c": 3}']
    assert [local.read(i) for i in range(3)] == [remote_index.read(i) for i in range(3)] == records
    assert [local.line_number(i) for i in range(3)] == [1, 4, 5]
