"""`data check` / `data show` on a toy dataset (in-process, one worker)."""

import json

import pytest
from PIL import Image

from vlpretrain.data.check import main, text_histogram
from vlpretrain.demo.tokenizer import train_tiny_tokenizer


@pytest.fixture
def toy(tmp_path):
    train_tiny_tokenizer(tmp_path / "tok")
    Image.new("RGB", (56, 28), "red").save(tmp_path / "a.png")
    turns = [{"from": "human", "value": "what?"}, {"from": "gpt", "value": "red"}]
    lines = [json.dumps({"image": "a.png", "conversations": turns})] * 3 + ["{bad"]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    entry = {"root": str(tmp_path), "annotation": "a.jsonl", "repeat_time": 1}
    entry["data_augment"] = False
    (tmp_path / "meta.json").write_text(json.dumps({"toy": entry}))
    common = ["--tokenizer", str(tmp_path / "tok"), "--tile-size", "28", "--num-image-token",
              "4", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    return tmp_path, common


def test_check_reports_and_fails_over_threshold(toy, capsys):
    path, common = toy
    assert main(["data", "check", str(path / "meta.json"), *common]) == 1
    out = capsys.readouterr().out
    assert "== toy: 4 lines, effective length 4, 3 ok, 1 skipped" in out
    assert "malformed_json: 1 of 4" in out and "a.jsonl:4" in out
    assert "FAIL: skip fraction 25.00%" in out
    args = ["data", "check", str(path / "meta.json"), *common, "--max-skip-fraction", "0.3"]
    assert main(args) == 0


def test_show_renders_spans(toy, capsys):
    path, common = toy
    assert main(["data", "show", str(path / "meta.json"), *common, "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert "<img><IMG_CONTEXT>\u00d74\u00b73</img>" in out  # 4 tokens x 3 tiles
    assert "\u00abred<|im_end|>\u00bb" in out
    assert "grid 2x1 + thumbnail" in out
    assert main(["data", "show", str(path / "meta.json"), *common, "--index", "3"]) == 1


def test_check_rejects_bad_meta(tmp_path, capsys):
    train_tiny_tokenizer(tmp_path / "tok")
    (tmp_path / "meta.json").write_text(json.dumps({"x": {"root": "."}}))
    assert main(["data", "check", str(tmp_path / "meta.json"), "--tokenizer",
                 str(tmp_path / "tok")]) == 2  # fmt: skip
    assert "missing required field 'annotation'" in capsys.readouterr().err


def test_text_histogram_buckets():
    text = text_histogram([1, 2, 3, 100], "tokens")
    assert "min 1, mean 26.5, max 100" in text
    assert "      2-3" in text and "     64-127" in text
