"""Meta file validation and the cached byte-offset annotation index."""

import json
import logging
import multiprocessing
import os
import pickle
import time
import tracemalloc

import pytest

from vlpretrain.data.index import AnnotationIndex, build_line_index, index_blocks
from vlpretrain.data.index_cache import temp_name
from vlpretrain.data.meta import load_meta


def write_meta(tmp_path, entries):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(entries))
    return path


def test_meta_valid_entry_resolves_relative_to_meta_dir(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "a.jsonl").write_text("{}\n")
    monkeypatch.chdir("/")
    meta = write_meta(
        tmp_path,
        {
            "first": {"root": "imgs", "annotation": "a.jsonl", "repeat_time": 0.5,
                      "data_augment": False, "length": 3, "max_dynamic_patch": 6},
            "second": {"root": "imgs", "annotation": "a.jsonl", "repeat_time": 2,
                       "data_augment": True},
        },
    )  # fmt: skip
    specs = load_meta(meta)
    assert [s.name for s in specs] == ["first", "second"]
    assert [s.dataset_index for s in specs] == [0, 1]
    assert str(specs[0].root) == str(tmp_path / "imgs")
    assert str(specs[0].annotation) == str(tmp_path / "a.jsonl")
    assert specs[0].max_dynamic_patch == 6 and specs[1].max_dynamic_patch is None
    assert specs[1].repeat_time == 2.0


def test_meta_lists_every_problem_at_once(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("")
    meta = write_meta(
        tmp_path,
        {
            "nokeys": {},
            "bad": {"root": str(tmp_path), "annotation": "a.txt", "repeat_time": 0,
                    "data_augment": "yes", "weird": 1},
            "gone": {"root": "nowhere", "annotation": "missing.jsonl", "repeat_time": -1,
                     "data_augment": True, "max_dynamic_patch": 0},
        },
    )  # fmt: skip
    with pytest.raises(ValueError) as info:
        load_meta(meta)
    message = str(info.value)
    for expected in [
        "'nokeys': missing required field 'root'",
        "'nokeys': missing required field 'data_augment'",
        "'bad': field 'annotation' 'a.txt' must be a .jsonl",
        "'bad': field 'repeat_time' must be a number > 0, got 0",
        "'bad': field 'data_augment' must be a bool",
        "'gone': field 'root': no directory",
        "'gone': field 'annotation': no file",
        "'gone': field 'repeat_time'",
        "'gone': field 'max_dynamic_patch'",
    ]:
        assert expected in message
    assert "9 problem(s)" in message or message.count("\n  - ") >= 9
    assert "unknown field 'weird'" in caplog.text


def test_index_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n\n   \n{"b": 2}\r\n{"c": 3}')  # no trailing newline
    offsets, numbers = build_line_index(path)
    assert numbers.tolist() == [1, 4, 5]
    index = AnnotationIndex(path, tmp_path / "cache")
    assert len(index) == 3
    assert [index.read(i) for i in range(3)] == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}']
    assert index.line_number(2) == 5


def test_index_small_chunks_give_same_result(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"i": i, "pad": "x" * (i % 7)}) for i in range(200)]
    path.write_text("\n".join(lines) + "\n\n")
    whole = build_line_index(path)
    monkeypatch.setattr("vlpretrain.data.index.CHUNK_BYTES", 13)
    assert (build_line_index(path) == whole).all()
    assert whole.shape == (2, 200)


def test_index_cache_is_invalidated_when_file_changes(tmp_path):
    path, cache = tmp_path / "a.jsonl", tmp_path / "cache"
    path.write_text('{"x": 1}\n{"x": 2}\n')
    assert len(AnnotationIndex(path, cache)) == 2
    assert len(list(cache.iterdir())) == 1
    path.write_text('{"x": 1}\n{"x": 2}\n{"x": 3}\n')
    os.utime(path, ns=(1, 10**18))  # make sure mtime_ns differs even on coarse clocks
    index = AnnotationIndex(path, cache)
    assert len(index) == 3 and index.read(2) == b'{"x": 3}'
    assert len(list(cache.iterdir())) == 1  # the stale entry was removed
    assert not list(tmp_path.glob("*_temp"))  # nothing written next to the data


def test_index_uses_env_cache_dir_and_pickles_without_arrays(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPRETRAIN_CACHE", str(tmp_path / "envcache"))
    path = tmp_path / "a.jsonl"
    path.write_text('{"x": 1}\n')
    index = AnnotationIndex(path)
    assert list((tmp_path / "envcache" / "index").iterdir())
    index.read(0)  # opens the file handle
    clone = pickle.loads(pickle.dumps(index))
    assert clone.read(0) == b'{"x": 1}' and len(clone) == 1


# -- a damaged cache is rebuilt, never trusted ---------------------------------------------

THREE = '{"x": 1}\n{"x": 2}\n{"x": 3}\n'


def cache_of(tmp_path):
    """The one cache file of the cache directory (temp files start with a dot)."""
    (target,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    return target


def index_three(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(THREE)
    AnnotationIndex(path, tmp_path / "cache")
    return path, cache_of(tmp_path)


def zero_offsets(target):
    # the (2, 3) int64 array closes the file: 3 offsets, then 3 line numbers
    data = bytearray(target.read_bytes())
    data[-48:-24] = bytes(24)
    target.write_bytes(bytes(data))


def truncate_by_8(target):
    target.write_bytes(target.read_bytes()[:-8])


@pytest.mark.parametrize(
    "damage",
    [zero_offsets, lambda target: target.write_bytes(b""), truncate_by_8],
    ids=["zeroed_offsets", "empty", "truncated"],
)
def test_a_damaged_index_cache_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    path, target = index_three(tmp_path)
    damage(target)
    with caplog.at_level(logging.WARNING, logger="vlpretrain.data"):
        index = AnnotationIndex(path, tmp_path / "cache")
    assert [index.read(i) for i in range(3)] == [b'{"x": 1}', b'{"x": 2}', b'{"x": 3}']
    assert [index.line_number(i) for i in range(3)] == [1, 2, 3]
    assert str(target) in caplog.text and "rebuilding" in caplog.text
    again = AnnotationIndex(path, tmp_path / "cache")  # the rebuilt cache passes
    assert again.read(2) == b'{"x": 3}'


def test_a_cache_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("replace") or real_replace(a, b))
    index_three(tmp_path)
    assert "replace" in calls and "fsync" in calls[: calls.index("replace")]


def _killed_build(path, cache):
    """A build killed after writing its temp file, before the rename."""
    os.replace = lambda *args: os._exit(3)
    AnnotationIndex(path, cache)


def test_temp_files_of_a_killed_build_are_removed(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(THREE)
    child = multiprocessing.get_context("fork").Process(
        target=_killed_build, args=(path, tmp_path / "cache")
    )
    child.start()
    child.join()
    assert child.exitcode == 3
    (leftover,) = (tmp_path / "cache").iterdir()  # full-size, named after the dead process
    assert leftover.stat().st_size > 48
    AnnotationIndex(path, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == [cache_of(tmp_path)]


def test_temp_files_of_other_hosts_are_removed_only_when_old(tmp_path):
    path, target = index_three(tmp_path)
    other = "deadbeef"  # another host's key: its pids say nothing here
    fresh = target.parent / temp_name(target, os.getpid(), host_key=other)
    old = target.parent / temp_name(target, os.getpid(), host_key=other)
    for leftover in (fresh, old):
        leftover.write_bytes(b"x" * 100)
    week_ago = time.time() - 7 * 24 * 3600
    os.utime(old, (week_ago, week_ago))
    target.unlink()  # the next index builds again, and cleans up first
    AnnotationIndex(path, tmp_path / "cache")
    assert fresh.exists() and not old.exists()


# -- indexing is linear in the file size, whatever its lines ------------------------------


def traced_peak(function, argument):
    """The result of function(argument) and the peak of traced memory while it ran."""
    tracemalloc.start()
    try:
        return function(argument), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_indexing_one_long_line_holds_one_block_not_the_line(tmp_path, monkeypatch):
    # a line without newline used to be re-copied and re-searched with every block
    # (quadratic: 1 GB took 179 s); now each block is scanned once and dropped
    monkeypatch.setattr("vlpretrain.data.index.CHUNK_BYTES", 1 << 16)
    peaks = {}
    for megabytes in (2, 4):
        path = tmp_path / f"line{megabytes}.jsonl"
        path.write_bytes(b'{"x": "' + b"y" * (megabytes << 20) + b'"}')
        index, peaks[megabytes] = traced_peak(build_line_index, path)
        assert index.tolist() == [[0], [1]]
    # a few 64 KiB blocks at most, and the same for a line twice as long
    assert peaks[4] < 8 * (1 << 16), peaks
    assert peaks[4] < 1.5 * peaks[2] + (1 << 16), peaks


def test_blockwise_scan_matches_whole_file_on_every_split(tmp_path):
    data = b'{"a": 1}\n\n  \r\n{"b": 2}\r\n' + b"x" * 50 + b'\n \n{"c": 3}'
    whole = index_blocks([data])
    for size in (1, 2, 3, 7, 16, 64):
        blocks = [data[k : k + size] for k in range(0, len(data), size)]
        assert (index_blocks(blocks) == whole).all(), size
    # line 1 at 0 (9 bytes), blank 2 and 3 (1 + 4 bytes), 4 at 14 (10 bytes), 5 at 24
    # (51 bytes), blank 6 at 75 (2 bytes), 7 at 77 without a newline
    assert whole.tolist() == [[0, 14, 24, 77], [1, 4, 5, 7]]
