"""`data check` / `data show` with the run's own config (in-process, one worker).

The tiny components of tests/train_fixtures.py: 28-px tiles, 1 token per tile (not the
448 px / 256 tokens defaults), so a check that used its own defaults would report other counts.
"""

import json

import pytest
from media_fixtures import write_video
from PIL import Image
from train_fixtures import stage_raw, train_assets, write_stage  # noqa: F401

from vlpretrain.cli import main
from vlpretrain.data.check import text_histogram


@pytest.fixture
def toy(tmp_path, train_assets):  # noqa: F811
    Image.new("RGB", (56, 28), "red").save(tmp_path / "a.png")
    write_video(tmp_path / "clip.mp4", num_frames=8, size=28)
    turns = [{"from": "human", "value": "what?"}, {"from": "gpt", "value": "red"}]
    lines = [json.dumps({"image": "a.png", "conversations": turns})] * 3 + ["{bad"]
    lines.append(json.dumps({"video": "clip.mp4", "conversations": turns}))
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    entry = {"root": str(tmp_path), "annotation": "a.jsonl", "repeat_time": 1}
    entry["data_augment"] = False
    (tmp_path / "meta.json").write_text(json.dumps({"toy": entry}))
    raw = stage_raw(
        train_assets, tmp_path / "run", train={"meta_path": str(tmp_path / "meta.json")}
    )
    return tmp_path, write_stage(tmp_path / "stage.toml", raw)


def test_check_uses_the_runs_config_and_fails_over_threshold(toy, capsys):
    path, stage = toy
    args = ["data", "check", str(stage), "--set", "data.min_num_frame=1",
            "--set", "data.max_num_frame=4"]  # fmt: skip
    assert main(args) == 0  # 1 of 5 skipped: not above the run's max_skip_fraction 0.2
    out = capsys.readouterr().out
    assert "== toy: 5 lines, effective length 5, 4 ok, 1 skipped" in out
    assert "toy: malformed_json: 1 of 5" in out and "a.jsonl:4" in out
    # 28-px tiles: 56x28 -> 2x1 + thumbnail = 3 tiles of 1 token (the run's facts)
    assert "tiles per sample: min 3" in out
    assert "OK: skip fraction 20.00% (max 20.00%)" in out
    assert main(["data", "check", str(stage)]) == 1  # 32 frames by default do not fit
    assert "FAIL: skip fraction 40.00% (max 20.00%)" in capsys.readouterr().out


def test_check_flags_videos_whose_most_frames_exceed_max_seq_length(toy, capsys):
    path, stage = toy
    # the video draws 1..8 frames: 189 tokens with 1 frame, 280 with 8 (the image records:
    # 182), so with max_seq_length 250 a random draw may pass but the worst case does not
    args = ["data", "check", str(stage), "--set", "data.max_seq_length=250",
            "--set", "data.min_num_frame=1", "--set", "data.max_num_frame=8",
            "--set", "data.max_skip_fraction=0.5", "--all"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "checked in the worst case: videos with max_num_frame = 8 frames" in out
    assert "toy: too_long: 1" in out
    assert "all 2 skipped records:" in out
    assert f"{path / 'a.jsonl'}:5 (dataset 'toy'): skipped (too_long)" in out


def test_check_takes_the_reference_flags(toy, capsys, train_assets):  # noqa: F811
    path, _ = toy
    components = train_assets.components
    args = ["data", "check", "--meta_path", str(path / "meta.json"),
            "--vision_path", str(components.vision_path), "--llm_path",
            str(components.llm_path), "--force_image_size", "28",
            "--set", "data.max_skip_fraction=0.3"]  # fmt: skip
    assert main(args) == 0
    assert "OK: skip fraction 20.00% (max 30.00%)" in capsys.readouterr().out


def test_check_applies_the_pack_budget(toy, capsys):
    _, stage = toy
    args = ["data", "check", str(stage), "--set", "packing.num_images_expected=2",
            "--set", "data.max_skip_fraction=1.0"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "toy: exceeds_pack_budget: 3" in out  # the 3-tile image records fit no 2-tile row


def test_show_renders_spans(toy, capsys):
    _, stage = toy
    assert main(["data", "show", str(stage), "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert "<img><IMG_CONTEXT>\u00d71\u00b73</img>" in out  # 1 token x 3 tiles
    assert "\u00abred<|im_end|>\u00bb" in out
    assert "grid 2x1 + thumbnail" in out
    assert main(["data", "show", str(stage), "--index", "3"]) == 1


def test_check_rejects_bad_meta(tmp_path, capsys, train_assets):  # noqa: F811
    (tmp_path / "meta.json").write_text(json.dumps({"x": {"root": "."}}))
    raw = stage_raw(
        train_assets, tmp_path / "run", train={"meta_path": str(tmp_path / "meta.json")}
    )
    assert main(["data", "check", str(write_stage(tmp_path / "s.toml", raw))]) == 2
    assert "missing required field 'annotation'" in capsys.readouterr().err


def test_text_histogram_buckets():
    text = text_histogram([1, 2, 3, 100], "tokens")
    assert "min 1, mean 26.5, max 100" in text
    assert "      2-3" in text and "     64-127" in text
