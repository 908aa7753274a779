"""`data check` / `data show` with the run's own config (in-process, one worker).

The tiny components of tests/train_fixtures.py: 28-px tiles, 1 token per tile (not the
448 px / 256 tokens defaults), so a check that used its own defaults would report other counts.
"""

import json

import numpy as np
import pytest
from media_fixtures import write_video
from PIL import Image
from train_fixtures import one_thread, stage_raw, train_assets, write_stage  # noqa: F401

from vlpretrain.cli import main
from vlpretrain.data.build import SampleConfig
from vlpretrain.data.check import text_histogram
from vlpretrain.train.loop import FINAL_MARKER

TURNS = [{"from": "human", "value": "what?"}, {"from": "gpt", "value": "red"}]
IMAGE_LINE = json.dumps({"image": "a.png", "conversations": TURNS})


def write_toy(root, train_assets, lines, repeat_time=1.0, **sections):  # noqa: F811
    """Meta, annotation and stage TOML of one dataset 'toy' of `lines` under `root`."""
    Image.new("RGB", (56, 28), "red").save(root / "a.png")
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    entry = {"root": str(root), "annotation": "a.jsonl", "repeat_time": repeat_time}
    entry["data_augment"] = False
    (root / "meta.json").write_text(json.dumps({"toy": entry}))
    train = {"meta_path": str(root / "meta.json"), **sections.pop("train", {})}
    raw = stage_raw(train_assets, root / "run", train=train, **sections)
    return write_stage(root / "stage.toml", raw)


@pytest.fixture
def toy(tmp_path, train_assets):  # noqa: F811
    write_video(tmp_path / "clip.mp4", num_frames=8, size=28)
    lines = [IMAGE_LINE] * 3 + ["{bad"]
    lines.append(json.dumps({"video": "clip.mp4", "conversations": TURNS}))
    return tmp_path, write_toy(tmp_path, train_assets, lines)


def test_check_uses_the_runs_config_and_fails_over_threshold(tmp_path, train_assets, capsys):  # noqa: F811
    write_video(tmp_path / "clip.mp4", num_frames=8, size=28)
    lines = [IMAGE_LINE] * 3 + ["{bad", json.dumps({"video": "clip.mp4", "conversations": TURNS})]
    # repeat_time 20: an epoch of 5 x 20 = 100 records, enough for the skip policy to judge
    stage = write_toy(tmp_path, train_assets, lines, repeat_time=20)
    args = ["data", "check", str(stage), "--set", "data.min_num_frame=1",
            "--set", "data.max_num_frame=4"]  # fmt: skip
    assert main(args) == 0  # 1 of 5 lines skipped: 20 of 100 records, not above 0.2
    out = capsys.readouterr().out
    assert "== toy: 5 lines, effective length 100, 4 ok, 1 skipped" in out
    assert "toy: malformed_json: 1 of 5" in out and "a.jsonl:4" in out
    # 28-px tiles: 56x28 -> 2x1 + thumbnail = 3 tiles of 1 token (the run's facts)
    assert "tiles per sample: min 3" in out
    assert "epoch: 100 records after repeat_time, 20 of them skipped" in out
    assert "OK: skip fraction 20.00% of an epoch of 100 records (max 20.00%)" in out
    assert main(["data", "check", str(stage)]) == 1  # 32 frames by default do not fit
    out = capsys.readouterr().out
    # 2 of 5 lines, each read 20 times: 40 of 100 records
    assert "FAIL: skip fraction 40.00% of an epoch of 100 records (max 20.00%)" in out


def test_check_prints_each_datasets_tile_budget_and_where_it_comes_from(toy, capsys):
    path, stage = toy
    args = ["data", "check", str(stage), "--set", "data.max_skip_fraction=1.0"]
    assert main(args) == 0
    # data.max_dynamic_patch 6 (the stage) + 1 thumbnail = 7 tiles of 1 token each
    expected = (
        "dataset 'toy': up to 7 tiles per image = 6 patches (data.max_dynamic_patch) "
        "+ 1 thumbnail; 7 image tokens"
    )
    assert expected in capsys.readouterr().out
    meta = json.loads((path / "meta.json").read_text())
    meta["toy"]["max_dynamic_patch"] = 12  # the meta file's value wins over the run's 6
    (path / "meta.json").write_text(json.dumps(meta))
    assert main(args) == 0
    expected = (
        "dataset 'toy': up to 13 tiles per image = 12 patches (the meta file's "
        "max_dynamic_patch, which overrides data.max_dynamic_patch 6) + 1 thumbnail; "
        "13 image tokens"
    )
    assert expected in capsys.readouterr().out
    assert main([*args, "--set", "data.use_thumbnail=false"]) == 0
    assert "up to 12 tiles per image = 12 patches (the meta" in capsys.readouterr().out


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
    out = capsys.readouterr().out
    assert "OK: skip fraction 20.00% of an epoch of 5 records (max 30.00%), not judged" in out


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


def test_check_refuses_the_config_train_refuses_with_the_same_message(toy, capsys):
    _, stage = toy
    sets = ["--set", "data.max_seq_length=16384", "--set", "packing.max_packed_tokens=4096"]
    assert main(["train", str(stage), *sets]) == 2
    refused_by_train = capsys.readouterr().err
    assert main(["data", "check", str(stage), *sets]) == 2
    refused_by_check = capsys.readouterr().err
    problem = (
        "data.max_seq_length 16384 exceeds packing.max_packed_tokens 4096: such samples could "
        "never be packed"
    )
    assert problem in refused_by_train
    assert refused_by_check == refused_by_train


def test_check_and_train_agree_on_a_half_bad_file_below_the_policys_minimum(
    tmp_path,
    train_assets,  # noqa: F811
    capsys,
    one_thread,  # noqa: F811
):
    # 2 good and 2 malformed lines: 50 % skipped, above max_skip_fraction 0.2, but an epoch of
    # 4 records and a 2-step run see fewer than the 100 records the policy needs to judge
    stage = write_toy(tmp_path, train_assets, [IMAGE_LINE, "{bad"] * 2, train={"max_steps": 2})
    assert main(["data", "check", str(stage)]) == 0
    out = capsys.readouterr().out
    assert (
        "OK: skip fraction 50.00% of an epoch of 4 records (max 20.00%), not judged: the skip "
        "policy judges from 100 records seen on (a run that sees 100 or more of these records "
        "stops)"
    ) in out
    assert main(["train", str(stage)]) == 0
    assert (tmp_path / "run" / FINAL_MARKER).is_file()


def test_check_refuses_data_that_leaves_a_loader_stream_empty(toy, capsys):
    _, stage = toy
    # 1 rank x 8 workers = 8 streams; the epoch's 5 records leave streams 5, 6 and 7 empty
    assert main(["data", "check", str(stage), "--set", "stream.num_workers=8"]) == 2
    assert "stream 7 of 8 gets no record from any dataset (lengths [5])" in capsys.readouterr().err


def test_epoch_multiplicity_counts_full_copies_and_the_fractional_subset(tmp_path, train_assets):  # noqa: F811
    from vlpretrain.data.build import build_sources
    from vlpretrain.data.check import epoch_multiplicity, image_facts, load_tokenizer

    stage = write_toy(tmp_path, train_assets, [IMAGE_LINE] * 4, repeat_time=2.5)
    tokenizer = load_tokenizer(str(train_assets.components.llm_path))
    facts = image_facts(tokenizer, tile_size=28, num_image_token=1)
    [source] = build_sources(tmp_path / "meta.json", SampleConfig(), facts, tokenizer)
    counts = epoch_multiplicity(source, seed=3)
    # int(4 * 2.5) = 10 records: 2 full copies of 4 lines, then 2 lines of the subset
    assert counts.sum() == 10 and sorted(counts.tolist()) == [2, 2, 3, 3]
    lines = [source.line_of(i, epoch=0, seed=3) for i in range(10)]
    assert counts.tolist() == np.bincount(lines, minlength=4).tolist()
    assert stage.is_file()
