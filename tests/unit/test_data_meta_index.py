"""Meta file validation and the cached byte-offset annotation index."""

import json
import os
import pickle

import pytest

from vlpretrain.data.index import AnnotationIndex, build_line_index
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
    assert specs[0].root == tmp_path / "imgs" and specs[0].annotation == tmp_path / "a.jsonl"
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
