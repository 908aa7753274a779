import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from stream_fakes import FACTS, IMG_END, IMG_START, TILE_SIZE, FakeSource, make_sample

from vlpretrain.data.collate import collate_rows, len2weight
from vlpretrain.data.packing import (
    BestFitPacker,
    PackingConfig,
    PackItem,
    PackRow,
    PieceRef,
    fit_to_budget,
    slice_sample,
)
from vlpretrain.data.samples import IGNORE_INDEX


def _config(**kwargs):
    return PackingConfig(**kwargs)


def _item(sample, record=0):
    return PackItem(PieceRef.whole(sample, record, 0), sample)


def _text(num_tokens, num_supervised, record=0, dataset=0):
    """A text-only sample of `num_tokens` tokens whose last `num_supervised` are trained."""
    sample = make_sample(
        dataset, (), num_supervised, line=record + 1, num_prompt=num_tokens - num_supervised
    )
    return _item(sample, record)


def test_appendix_a_toy_pack_positions_cu_seqlens_and_square_weights():
    # Lengths 25/30/20 with 13/15/10 supervised tokens (first token never supervised).
    config = _config(max_packed_tokens=100, num_images_expected=4, loss_reduction="square")
    row = PackRow()
    for i, (n, s) in enumerate([(25, 13), (30, 15), (20, 10)]):
        row.append(_text(n, s, record=i))
    batch = collate_rows([row], config, FACTS, num_datasets=1)
    assert batch.cu_seqlens.tolist() == [0, 25, 55, 75]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.max_seqlen == 30
    assert batch.position_ids[0, [0, 24, 25, 54, 55, 74]].tolist() == [0, 24, 0, 29, 0, 19]
    weights = batch.loss_weight[0]
    for (start, end), s in zip([(0, 25), (25, 55), (55, 75)], [13, 15, 10], strict=True):
        supervised = batch.labels[0, start:end] != IGNORE_INDEX
        assert int(supervised.sum()) == s
        assert torch.allclose(weights[start:end][supervised], torch.tensor(1 / math.sqrt(s)))
        assert (weights[start:end][~supervised] == 0).all()
    assert batch.stats.num_samples == 3 and batch.stats.num_padding_tokens == 0
    # no real tile anywhere: exactly one dummy tile with flag 0
    assert batch.pixel_values.shape == (1, 3, TILE_SIZE, TILE_SIZE)
    assert batch.image_flags.tolist() == [0] and batch.stats.num_dummy_tiles == 1


def test_layout_names_the_dataset_of_every_supervised_position_and_sums_weights_per_dataset():
    # Row: dataset 1 (10 tokens, 4 trained), dataset 0 (8 tokens, 3 trained), dataset 1 (6
    # tokens, 1 trained), under sample reduction: each sample's weights sum to 1.
    config = _config(max_packed_tokens=64, num_images_expected=4, loss_reduction="sample")
    row = PackRow()
    for record, (n, s, dataset) in enumerate([(10, 4, 1), (8, 3, 0), (6, 1, 1)]):
        row.append(_text(n, s, record=record, dataset=dataset))
    batch = collate_rows([row], config, FACTS, num_datasets=3)
    layout = batch.layout
    assert layout.supervised_datasets.tolist() == [1] * 4 + [0] * 3 + [1] * 1
    assert layout.supervised_datasets.dtype == torch.int64
    # dataset 0: one sample -> 1.0; dataset 1: two samples -> 2.0; dataset 2: nothing packed
    assert layout.dataset_weight_sums == pytest.approx((1.0, 2.0, 0.0), abs=1e-6)
    assert sum(layout.dataset_weight_sums) == pytest.approx(layout.weight_sum, abs=1e-6)


def test_strict_mode_pads_tokens_as_own_segment_and_tiles_with_flag_zero():
    config = _config(max_packed_tokens=128, num_images_expected=4, strict_mode=True)
    rows = []
    for r in range(2):
        row = PackRow()
        row.append(_item(make_sample(0, (1,), 10, line=r + 1), r))  # 2 + 6 + 10 = 18 tokens
        rows.append(row)
    batch = collate_rows(rows, config, FACTS, num_datasets=1)
    assert batch.input_ids.shape == (2, 128)
    assert batch.cu_seqlens.tolist() == [0, 18, 128, 146, 256]
    assert batch.position_ids[0, 18:21].tolist() == [0, 1, 2]  # padding restarts at 0
    assert (batch.labels[0, 18:] == IGNORE_INDEX).all() and (batch.input_ids[0, 18:] == 0).all()
    assert batch.image_flags.tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
    assert batch.stats.num_padding_tokens == 2 * (128 - 18)
    assert batch.stats.num_dummy_tiles == 6 and batch.stats.num_tiles == 2


def test_first_label_of_every_sample_is_ignored():
    config = _config()
    row = PackRow()
    a = make_sample(0, (), 5, num_prompt=0)  # every token supervised before packing
    row.append(_item(a))
    row.append(_item(make_sample(0, (), 5, num_prompt=0, line=2), 1))
    batch = collate_rows([row], config, FACTS, num_datasets=1)
    assert batch.labels[0, 0] == IGNORE_INDEX and batch.labels[0, 5] == IGNORE_INDEX
    assert batch.labels[0, 1:5].tolist() == a.labels[1:].tolist()


def test_len2weight():
    assert len2weight(0, "square") == 0.0
    assert len2weight(4, "token") == 1.0
    assert len2weight(4, "sample") == 0.25
    assert len2weight(4, "square") == 0.5


def test_dummy_tile_only_in_tileless_batches():
    config = _config()
    row = PackRow()
    row.append(_item(make_sample(0, (2,), 5)))
    batch = collate_rows([row], config, FACTS, num_datasets=1)
    assert batch.image_flags.tolist() == [1, 1] and batch.stats.num_dummy_tiles == 0
    assert batch.num_tiles_per_image == (2,)


def test_budgets_never_exceeded_and_every_sample_emitted_once():
    config = _config(max_packed_tokens=96, num_images_expected=5, max_buffer_size=4)
    source = FakeSource(0, 400, max_images=3, max_tiles=3, max_text=40)
    packer = BestFitPacker(config, FACTS)
    rows, dropped, added = [], 0, 0
    for r in range(len(source)):
        sample = source.load(r, 0, 1)
        pieces = fit_to_budget(_item(sample, r), config, FACTS)
        if pieces is None:
            dropped += 1
            assert sample.num_tokens > 96 or sample.num_tiles > 5
            continue
        for piece in pieces:
            added += 1
            rows.extend(packer.add(piece))
            assert len(packer.open_rows) <= config.max_buffer_size
    rows.extend(packer.flush())
    assert dropped > 0
    for row in rows:
        assert row.num_tokens <= 96 and row.num_tiles <= 5
    ids = [item.ref.record_index for row in rows for item in row.items]
    assert len(ids) == added == len(set(ids))
    assert packer.fill_ratio() > 0.7


def test_best_fit_picks_the_row_left_with_least_room():
    config = _config(max_packed_tokens=100, max_buffer_size=3, full_row_slack_tokens=0)
    packer = BestFitPacker(config, FACTS)
    for r, n in enumerate([60, 50, 45]):  # 60 and 50 cannot share; 45 goes with 50 (room 5)
        assert packer.add(_text(n, 5, record=r)) == []
    assert [row.num_tokens for row in packer.open_rows] == [60, 95]
    (full,) = packer.add(_text(40, 5, record=3))  # fits only the 60-token row, filling it
    assert [item.ref.record_index for item in full.items] == [0, 3]
    assert [row.num_tokens for row in packer.open_rows] == [95]


def test_full_row_is_emitted_at_once_and_overflow_emits_fullest():
    config = _config(max_packed_tokens=100, max_buffer_size=2, full_row_slack_tokens=2)
    packer = BestFitPacker(config, FACTS)
    assert packer.add(_text(60, 5, 0)) == []
    (full,) = packer.add(_text(39, 5, 1))  # 99 tokens: 1 free <= slack 2
    assert full.num_tokens == 99 and packer.open_rows == []
    packer.add(_text(70, 5, 2))
    packer.add(_text(80, 5, 3))
    (emitted,) = packer.add(_text(90, 5, 4))  # fits nowhere, buffer full: emit fullest (80)
    assert emitted.num_tokens == 80
    assert sorted(row.num_tokens for row in packer.open_rows) == [70, 90]


def test_tile_budget_decides_placement():
    config = _config(max_packed_tokens=1000, num_images_expected=3, max_buffer_size=4)
    packer = BestFitPacker(config, FACTS)
    packer.add(_item(make_sample(0, (2,), 5), 0))
    packer.add(_item(make_sample(0, (2,), 5, line=2), 1))  # 4 tiles > 3: new row
    assert [row.num_tiles for row in packer.open_rows] == [2, 2]


def test_too_big_sample_is_reported_not_packed():
    config = _config(max_packed_tokens=20, num_images_expected=2)
    assert fit_to_budget(_text(21, 5), config, FACTS) is None
    assert fit_to_budget(_item(make_sample(0, (3,), 1)), config, FACTS) is None
    with pytest.raises(ValueError, match="fit_to_budget"):
        BestFitPacker(config, FACTS).add(_text(21, 5))


def _split_config(**kwargs):
    return _config(split_at_image_boundary=True, **kwargs)


def _spans_whole(sample):
    """Each piece holds complete <img> ... </img> spans matching its tiles."""
    ids = sample.input_ids.tolist()
    starts = [i for i, t in enumerate(ids) if t == IMG_START]
    ends = [i for i, t in enumerate(ids) if t == IMG_END]
    assert len(starts) == len(ends) == len(sample.num_tiles_per_image)
    assert all(s < e for s, e in zip(starts, ends, strict=True))
    assert sum(sample.num_tiles_per_image) == sample.num_tiles
    for (s, e), tiles in zip(
        zip(starts, ends, strict=True), sample.num_tiles_per_image, strict=True
    ):
        assert e - s - 1 == tiles * 4


def test_split_at_image_boundary_keeps_whole_multi_tile_images():
    # 2 + 4 * (image of 3 tiles: 14 tokens, then 6 text) = 82 tokens, 12 tiles.
    sample = make_sample(0, (3, 3, 3, 3), 6, num_prompt=2, interleaved=True)
    config = _split_config(max_packed_tokens=40, num_images_expected=5)
    pieces = fit_to_budget(_item(sample), config, FACTS)
    assert pieces is not None and len(pieces) >= 3
    for piece in pieces:
        assert piece.sample.num_tokens <= 40 and piece.sample.num_tiles <= 5
        _spans_whole(piece.sample)
        # the reference can re-create the piece from the whole sample
        again = slice_sample(sample, piece.ref)
        assert np.array_equal(again.input_ids, piece.sample.input_ids)
        assert np.array_equal(again.pixel_values, piece.sample.pixel_values)
    covered = [(p.ref.token_start, p.ref.token_end) for p in pieces]
    assert covered[0][0] == 0 and covered[-1][1] == sample.num_tokens
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))


def test_split_image_larger_than_budget_is_reported():
    sample = make_sample(0, (6,), 5)
    assert fit_to_budget(_item(sample), _split_config(num_images_expected=4), FACTS) is None


def test_allow_overflow_tops_up_the_fullest_row_with_a_head_piece():
    config = _split_config(
        max_packed_tokens=64,
        num_images_expected=8,
        max_buffer_size=1,
        allow_overflow=True,
        full_row_slack_tokens=0,
    )
    packer = BestFitPacker(config, FACTS)
    packer.add(_text(30, 5))
    big = make_sample(0, (2, 2), 20, line=2, num_prompt=2)  # 2 + 10 + 10 + 20 = 42 tokens
    (row,) = packer.add(_item(big, 1))
    # 30 + 42 > 64 and the buffer is full: the head takes the 34 free tokens (2 prompt,
    # both images = 20, 12 text; the cut is outside every image span), the 8-token tail
    # opens a new row.
    assert (row.num_tokens, row.num_tiles) == (64, 4)
    for item in row.items:
        _spans_whole(item.sample)
    (rest,) = packer.open_rows
    assert rest.num_tokens == 8 and rest.items[0].ref.token_start == 34


def test_config_validation():
    with pytest.raises(ValueError, match="allow_overflow"):
        PackingConfig(allow_overflow=True)
    # The image-span ids split_at_image_boundary needs are RunFacts, checked there.
    with pytest.raises(ValueError, match="img_start_token_id"):
        replace(FACTS, img_start_token_id=FACTS.img_end_token_id)
    with pytest.raises(ValueError, match="loss_reduction"):
        PackingConfig(loss_reduction="mean")


def test_packer_state_holds_references_and_restores_rows():
    config = _config(max_packed_tokens=200, max_buffer_size=5)
    source = FakeSource(0, 30)
    packer = BestFitPacker(config, FACTS)
    for r in range(8):
        packer.add(_item(source.load(r, 0, 3), r))
    state = packer.state_dict()
    assert state["version"] == 1 and all(
        isinstance(v, int) for row in state["rows"] for ref in row for v in ref
    )
    restored = BestFitPacker(config, FACTS)
    restored.load_state_dict(
        state, lambda ref: slice_sample(source.load(ref.record_index, ref.epoch, 3), ref)
    )
    assert [r.num_tokens for r in restored.open_rows] == [r.num_tokens for r in packer.open_rows]
    a = collate_rows(packer.flush(), config, FACTS, num_datasets=1)
    b = collate_rows(restored.flush(), config, FACTS, num_datasets=1)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)


def test_to_and_pin_memory_keep_fields():
    row = PackRow()
    row.append(_text(10, 3))
    batch = collate_rows([row], _config(), FACTS, num_datasets=1)
    moved = batch.to("cpu")
    assert moved.stats == batch.stats and torch.equal(moved.labels, batch.labels)
    assert moved.sample_ids == batch.sample_ids
