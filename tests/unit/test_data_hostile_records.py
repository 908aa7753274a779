"""No single annotation record stops a job: whatever one line holds, it becomes a sample or a
counted skip naming its file and line, in the main process and in loader workers alike; only
failures of the machine (memory, disk, file handles) or of the run stop it."""

import errno
import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from media_fixtures import write_video
from PIL import Image

from vlpretrain.data.build import DatasetSource, SampleConfig
from vlpretrain.data.loader import StreamConfig, build_dataloader
from vlpretrain.data.meta import DatasetSpec
from vlpretrain.data.packing import PackingConfig
from vlpretrain.data.records import SKIP_REASONS, Record, RecordError, parse_record
from vlpretrain.data.samples import SkippedSample, TokenizedSample
from vlpretrain.facts import RunFacts
from vlpretrain.packages import MissingPackageError

SMALL = dict(max_seq_length=512, min_num_frame=2, max_num_frame=3)
DEEP_OBJECT = '{"a":' * 2000 + "1" + "}" * 2000  # 4 KB of JSON, 2,000 levels deep
DEEP_LIST = '{"conversations": ' + "[" * 3000 + "]" * 3000 + "}"


def conv(question="Hi", answer="Yo"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def facts_of(tokenizer):
    return RunFacts.from_tokenizer(tokenizer, tile_size=28, num_image_token=4,
                                   template="internvl2_5")  # fmt: skip


def write_media(folder):
    Image.new("RGB", (40, 30), "red").save(folder / "ok.png")
    write_video(folder / "clip.mp4", num_frames=8, size=32)


def make_source(folder, tokenizer, lines, **config):
    ann = folder / "ann.jsonl"
    ann.write_text("".join(line + "\n" for line in lines))
    spec = DatasetSpec(name="toy", dataset_index=0, root=folder, annotation=ann,
                       repeat_time=1.0, data_augment=False)  # fmt: skip
    cfg = SampleConfig(**{**SMALL, "cache_dir": str(folder / "cache"), **config})
    return DatasetSource(spec, cfg, facts_of(tokenizer), tokenizer)


HOSTILE = {
    "nested_2000_deep": DEEP_OBJECT,
    "nested_list_in_a_field": DEEP_LIST,
    "lone_surrogate": json.dumps({"conversations": conv("\ud800")}),
    "surrogate_in_image_path": json.dumps({"image": "ok\udc80.png", "conversations": conv()}),
    "clip_start_1e308": json.dumps(
        {"video": "clip.mp4", "clip": [1e300, 1e308], "conversations": conv("<video>\nHi")}
    ),
    "clip_of_400_digits": '{"video": "clip.mp4", "clip": [0, 1' + "0" * 400 + "],"
    ' "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "y"}]}',
}
CLIP_TO_1E308 = json.dumps(
    {"video": "clip.mp4", "clip": [0, 1e308], "conversations": conv("<video>\nHi")}
)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_line_is_a_skip_naming_its_file_and_line(tmp_path, tokenizer, name):
    write_media(tmp_path)
    good = json.dumps({"conversations": conv()})
    source = make_source(tmp_path, tokenizer, [good, HOSTILE[name], good])
    results = [source.load(i, 0, 0) for i in range(3)]
    assert isinstance(results[0], TokenizedSample) and isinstance(results[2], TokenizedSample)
    skipped = results[1]
    assert isinstance(skipped, SkippedSample), skipped
    assert skipped.reason in SKIP_REASONS and skipped.reason != "unexpected_error", skipped
    assert str(skipped).startswith(f"{tmp_path / 'ann.jsonl'}:2 ")


def test_a_clip_to_1e308_seconds_is_the_rest_of_the_video(tmp_path, tokenizer):
    # as any clip that ends after the video: the frames from its start to the end
    write_media(tmp_path)
    sample = make_source(tmp_path, tokenizer, [CLIP_TO_1E308]).load(0, 0, 0)
    assert isinstance(sample, TokenizedSample)
    assert len(sample.num_tiles_per_image) in (2, 3)  # min_num_frame 2, max_num_frame 3


def test_a_clip_beyond_the_video_says_so(tmp_path, tokenizer):
    write_media(tmp_path)
    line = HOSTILE["clip_start_1e308"]
    skipped = make_source(tmp_path, tokenizer, [line]).load(0, 0, 0)
    # 8 frames at 8 fps; a clip starting 1e300 s in holds none of them
    assert skipped.reason == "video_error" and "no frames in clip" in skipped.detail


def test_nesting_and_surrogates_are_named_in_the_detail(tmp_path, tokenizer):
    source = make_source(tmp_path, tokenizer, [DEEP_OBJECT, HOSTILE["lone_surrogate"]])
    deep, surrogate = source.load(0, 0, 0), source.load(1, 0, 0)
    assert deep.reason == "malformed_json" and "nested" in deep.detail
    assert surrogate.reason == "malformed_json"
    assert "conversations[0].value" in surrogate.detail and "surrogate" in surrogate.detail


# -- errors nobody foresaw ----------------------------------------------------------------


def failing_build(error):
    def build(self, record, rng, source):
        raise error

    return build


def test_an_unforeseen_exception_is_a_counted_skip_with_its_type(tmp_path, tokenizer, monkeypatch):
    source = make_source(tmp_path, tokenizer, [json.dumps({"conversations": conv()})])
    monkeypatch.setattr(DatasetSource, "build", failing_build(ZeroDivisionError("boom")))
    skipped = source.load(0, 0, 0)
    assert isinstance(skipped, SkippedSample)
    assert skipped.reason == "unexpected_error"
    # the type, the message and where it was raised, for whoever fixes the builder
    assert skipped.detail.startswith("ZeroDivisionError: boom (at test_data_hostile_records.py:")
    assert skipped.source.line == 1


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        KeyboardInterrupt(),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EMFILE, "Too many open files"),
        MissingPackageError("decoding the video clip.mp4 needs the 'av' package"),
    ],
    ids=["memory", "interrupt", "disk_full", "file_handles", "missing_package"],
)
def test_failures_that_are_not_the_records_still_stop_the_run(
    tmp_path, tokenizer, monkeypatch, error
):
    source = make_source(tmp_path, tokenizer, [json.dumps({"conversations": conv()})])
    monkeypatch.setattr(DatasetSource, "build", failing_build(error))
    with pytest.raises(type(error)):
        source.load(0, 0, 0)


def test_a_machine_failure_behind_a_record_error_still_stops_the_run(
    tmp_path, tokenizer, monkeypatch
):
    # media.load_image files an OSError under corrupt_image; out of file handles is not that
    source = make_source(tmp_path, tokenizer, [json.dumps({"conversations": conv()})])
    cause = OSError(errno.EMFILE, "Too many open files")

    def build(self, record, rng, source):
        raise RecordError("corrupt_image", "x.png: Too many open files") from cause

    monkeypatch.setattr(DatasetSource, "build", build)
    with pytest.raises(OSError, match="Too many open files"):
        source.load(0, 0, 0)


# -- generated records ----------------------------------------------------------------------

SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", "a\ud83d", "\udc80"])
TEXT = st.one_of(st.text(max_size=20), SURROGATES, st.sampled_from(["", "<image>", "<video>"]))
NUMBERS = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, 10**400, -(10**400), 2**63, -(2**63) - 1]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
TURN = st.one_of(
    st.fixed_dictionaries(
        {
            "from": st.one_of(st.sampled_from(["human", "gpt", "system"]), ANY_JSON),
            "value": st.one_of(TEXT, ANY_JSON),
        }  # fmt: skip
    ),
    ANY_JSON,
)
CONVERSATIONS = st.one_of(
    st.lists(TURN, max_size=4),
    st.just(conv("<image>\nHi")),
    st.just(conv("<video>\nHi")),
    ANY_JSON,
)
MEDIA = st.one_of(st.sampled_from(["ok.png", "clip.mp4", "missing.png", "."]), ANY_JSON)
CLIP = st.one_of(st.lists(NUMBERS, min_size=0, max_size=3), ANY_JSON)
RECORD = st.fixed_dictionaries(
    {},
    optional={
        "conversations": CONVERSATIONS,
        "image": st.one_of(MEDIA, st.lists(MEDIA, max_size=3)),
        "video": MEDIA,
        "clip": CLIP,
    },
)


BASES = [
    {"image": "ok.png", "conversations": conv("<image>\nHi")},
    {"image": ["ok.png", "ok.png"], "conversations": conv("<image><image>Hi")},
    {"video": "clip.mp4", "clip": [0, 1], "conversations": conv("<video>\nHi")},
    {"conversations": conv()},
]
"""Records that build; ONE_FIELD_WRONG breaks one field of one, so generated values reach
the media decoders and the tokenizer, not only the parser."""
ONE_FIELD_WRONG = st.one_of(
    st.builds(
        lambda base, key, value: {**base, key: value},
        st.sampled_from(BASES),
        st.sampled_from(["image", "video", "clip", "conversations"]),
        st.one_of(MEDIA, CLIP, CONVERSATIONS),
    ),
    st.builds(lambda clip: {**BASES[2], "clip": clip}, st.lists(NUMBERS, min_size=2, max_size=2)),
    st.builds(lambda question, answer: {"conversations": conv(question, answer)}, TEXT, TEXT),
)


def nested(depth):
    return "[" * depth + "]" * depth


LINES = st.one_of(
    ONE_FIELD_WRONG.map(json.dumps),
    RECORD.map(json.dumps),  # json.dumps writes NaN/Infinity, which json.loads reads back
    ANY_JSON.map(json.dumps),
    st.integers(500, 5000).map(nested),
    st.integers(500, 5000).map(
        lambda d: json.dumps({"conversations": conv()})[:-1] + ', "x": ' + nested(d) + "}"
    ),  # fmt: skip
    st.binary(max_size=64).filter(lambda b: b"\n" not in b and b"\r" not in b),
)


class OneLineIndex:
    """An annotation index holding one settable line (no file: hypothesis runs many examples)."""

    path = "generated.jsonl"
    line = b""

    def __len__(self):
        return 1

    def line_number(self, i):
        return 1

    def read(self, i, max_bytes=None):
        return self.line


@pytest.fixture(scope="module")
def generated_source(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("hostile")
    write_media(folder)
    spec = DatasetSpec(name="gen", dataset_index=0, root=folder, annotation=folder / "g.jsonl",
                       repeat_time=1.0, data_augment=False)  # fmt: skip
    return DatasetSource(spec, SampleConfig(**SMALL), facts_of(tokenizer), tokenizer,
                         index=OneLineIndex())  # fmt: skip


HYPOTHESIS = settings(
    max_examples=200,
    derandomize=True,  # the same examples on every run: CI never flakes on a new one
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@HYPOTHESIS
@given(line=LINES)
def test_parse_record_raises_nothing_but_record_error(line):
    data = line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")
    try:
        assert isinstance(parse_record(data, Path(".")), Record)
    except RecordError as err:
        assert err.reason in SKIP_REASONS


@HYPOTHESIS
@given(line=LINES)
def test_no_generated_record_escapes_as_an_exception(generated_source, line):
    generated_source.index.line = (
        line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")
    )
    result = generated_source.load_line(0, np.random.default_rng(0))
    assert isinstance(result, TokenizedSample | SkippedSample)
    event(getattr(result, "reason", "sample"))  # --hypothesis-show-statistics lists them
    if isinstance(result, SkippedSample):
        # every generated record gets a reason of its own, not the catch-all
        assert result.reason != "unexpected_error", result


# -- a stream resumes across hostile records ----------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_resumes_across_hostile_records(tmp_path, tokenizer, num_workers):
    write_media(tmp_path)
    good = [json.dumps({"conversations": conv(f"question {k}", f"answer {k}")}) for k in range(9)]
    lines = good[:3] + [DEEP_OBJECT] + good[3:6] + [HOSTILE["lone_surrogate"]] + good[6:]
    lines.append(HOSTILE["clip_start_1e308"])
    sources = [make_source(tmp_path, tokenizer, lines)]
    packing = PackingConfig(max_packed_tokens=256, num_images_expected=2, max_buffer_size=2,
                            rows_per_batch=1)  # fmt: skip
    config = StreamConfig(seed=3, num_workers=num_workers, num_epochs=1)
    facts = sources[0].facts
    expected = list(build_dataloader(sources, packing, facts, config, 0, 1))
    skipped = [s for b in expected for s in b.stats.skipped]
    # 12 lines: 9 good ones, the nesting, the surrogate and the clip are skipped
    assert sorted(s.source.line for s in skipped) == [4, 8, 12]
    assert sum(b.stats.num_loaded for b in expected) == 12
    resume_at = 2
    first = build_dataloader(sources, packing, facts, config, 0, 1)
    head = list(islice(iter(first), resume_at))
    resumed = build_dataloader(sources, packing, facts, config, 0, 1)
    resumed.load_state_dict(first.state_dict())
    tail = list(resumed)
    assert len(head) + len(tail) == len(expected)
    for a, b in zip(head + tail, expected, strict=True):
        assert a.sample_ids == b.sample_ids
        assert a.input_ids.equal(b.input_ids)
