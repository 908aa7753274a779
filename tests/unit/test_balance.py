"""FLOPs-balanced packing (data.balance): prices, the running budget, rows evened out, exact
resume of the packer and of the stream, and the config switch."""

from __future__ import annotations

import math
import pickle
from itertools import islice

import numpy as np
import pytest
import torch
from stream_fakes import COUNTER, FACTS, FakeSource, make_sample

from vlpretrain.data.balance import (
    RowBalance,
    build_row_balance,
    sample_flops,
    straggler_ratio,
)
from vlpretrain.data.loader import StreamConfig, build_dataloader
from vlpretrain.data.packing import BestFitPacker, PackingConfig, PackItem, PieceRef


def _config(**kwargs):
    kwargs.setdefault("max_packed_tokens", 128)
    kwargs.setdefault("num_images_expected", 12)
    kwargs.setdefault("max_buffer_size", 6)
    kwargs.setdefault("full_row_slack_tokens", 2)
    return PackingConfig(**kwargs)


def _packer(config):
    balance = build_row_balance(
        config.balance_flops,
        COUNTER.step_flops,
        config.max_packed_tokens,
        config.full_row_slack_tokens,
    )
    return BestFitPacker(config, FACTS, balance)


def _mixture(count, seed=0):
    """Tile-heavy captions, long text and short text, in a seeded order."""
    rng = np.random.default_rng(seed)
    samples = []
    for line in range(count):
        kind = rng.integers(3)
        if kind == 0:
            tiles = (int(rng.integers(1, 4)),)
            samples.append(make_sample(0, tiles, int(rng.integers(2, 8)), line=line + 1))
        elif kind == 1:
            samples.append(make_sample(0, (), int(rng.integers(30, 70)), line=line + 1))
        else:
            samples.append(make_sample(0, (), int(rng.integers(3, 12)), line=line + 1))
    return samples


def _pack(packer, samples, start=0):
    rows = []
    for index, sample in enumerate(samples[start:], start):
        rows += packer.add(PackItem(PieceRef.whole(sample, index, 0), sample))
    return rows


def _row_flops(row):
    tiles = row.num_tiles
    supervised = sum(item.sample.num_supervised for item in row.items)
    segments = [item.sample.num_tokens for item in row.items]
    return sum(COUNTER.step_flops(tiles, segments, supervised).values())


def test_sample_price_is_the_counter_on_one_segment():
    sample = make_sample(0, (2, 1), 7, num_prompt=3)
    expected = COUNTER.step_flops(3, [sample.num_tokens], 7)
    assert sample.num_supervised == 7
    assert sample_flops(COUNTER.step_flops, sample) == sum(expected.values())
    # Prices add up to a row's count because every part but attention is linear and
    # attention is counted per packed sample.
    other = make_sample(0, (), 20, line=2)
    both = COUNTER.step_flops(3, [sample.num_tokens, other.num_tokens], 27)
    assert sample_flops(COUNTER.step_flops, sample) + sample_flops(
        COUNTER.step_flops, other
    ) == pytest.approx(sum(both.values()))


def test_budget_is_a_token_full_row_at_the_running_mean_cost():
    balance = RowBalance(COUNTER.step_flops, max_tokens=100, slack_tokens=5)
    assert math.isinf(balance.budget)
    assert balance.free_fraction(40, 1e9) == pytest.approx(0.6)  # tokens only, before data
    balance.observe(10, 50.0)
    balance.observe(30, 70.0)
    assert balance.budget == pytest.approx(100 * 120.0 / 40)  # 300
    assert balance.free_fraction(40, 150.0) == pytest.approx(0.5)  # FLOPs bind: 150 of 300
    assert balance.free_fraction(80, 150.0) == pytest.approx(0.2)  # tokens bind: 80 of 100
    assert balance.is_full(96, 0.0) and balance.is_full(0, 290.0)
    assert not balance.is_full(94, 280.0)


def test_rows_stay_within_every_budget_and_hold_every_sample_once():
    config = _config(balance_flops=True)
    packer = _packer(config)
    samples = _mixture(300)
    rows = _pack(packer, samples) + packer.flush()
    assert sorted(item.ref.record_index for row in rows for item in row.items) == list(range(300))
    for row in rows:
        assert row.num_tokens <= config.max_packed_tokens
        assert row.num_tiles <= config.num_images_expected
        assert row.cost == pytest.approx(_row_flops(row))
    # Rows close at the FLOPs budget: none of the main-loop rows is far above it.
    budget = packer.balance.budget
    assert max(row.cost for row in rows) <= 1.02 * budget


def test_balancing_evens_out_the_work_of_rows():
    samples = _mixture(600, seed=3)
    by_tokens = _pack(_packer(_config()), samples)[10:]
    balanced = _pack(_packer(_config(balance_flops=True)), samples)[10:]
    tokens_ratio = straggler_ratio([_row_flops(r) for r in by_tokens])
    balanced_ratio = straggler_ratio([_row_flops(r) for r in balanced])
    assert tokens_ratio > 1.25  # tile-heavy rows cost far more than text rows of equal length
    assert balanced_ratio < 1.1
    # Rows stay reasonably full of tokens.
    fill = sum(r.num_tokens for r in balanced) / (len(balanced) * 128)
    assert fill > 0.85


def test_a_sample_costlier_than_the_budget_gets_a_row_of_its_own():
    config = _config(balance_flops=True)
    packer = _packer(config)
    _pack(packer, [make_sample(0, (), 10, line=k + 1) for k in range(200)])  # settles the mean
    heavy = make_sample(0, (12,), 4, line=999)  # 12 tiles: many times a text row's cost
    assert packer.balance.price(heavy) > packer.balance.budget
    emitted = packer.add(PackItem(PieceRef.whole(heavy, 999, 0), heavy))
    # (the buffer was full, so the fullest open row went out first)
    assert [item.ref.record_index for item in emitted[-1].items] == [999]
    assert all(item.ref.record_index != 999 for row in packer.open_rows for item in row.items)


def _refs(rows):
    return [[item.ref.as_tuple() for item in row.items] for row in rows]


@pytest.mark.parametrize("cut", [1, 57, 200])
def test_packer_state_resumes_bit_for_bit(cut):
    config = _config(balance_flops=True)
    samples = _mixture(300, seed=1)
    straight = _packer(config)
    expected = _pack(straight, samples)
    first = _packer(config)
    head = _pack(first, samples[:cut])
    state = pickle.loads(pickle.dumps(first.state_dict()))
    resumed = _packer(config)
    resumed.load_state_dict(state, lambda ref: samples[ref.record_index])
    assert [row.cost for row in resumed.open_rows] == [row.cost for row in first.open_rows]
    tail = _pack(resumed, samples, start=cut)
    assert _refs(head + tail) == _refs(expected)
    assert [r.cost for r in head + tail] == [r.cost for r in expected]
    assert resumed.balance.state_dict() == straight.balance.state_dict()


def test_state_of_the_other_setting_is_refused():
    samples = _mixture(20)
    plain = _packer(_config())
    _pack(plain, samples)
    with pytest.raises(ValueError, match="balance_flops"):
        _packer(_config(balance_flops=True)).load_state_dict(
            plain.state_dict(), lambda ref: samples[ref.record_index]
        )


def test_switch_on_needs_the_flops_counter():
    with pytest.raises(ValueError, match="step_flops"):
        build_row_balance(True, None, 128, 2)
    assert build_row_balance(False, None, 128, 2) is None
    with pytest.raises(ValueError, match="RowBalance"):
        BestFitPacker(_config(balance_flops=True), FACTS)
    sources = [FakeSource(0, 10)]
    loader = build_dataloader(sources, _config(balance_flops=True), FACTS, StreamConfig(), 0, 1)
    with pytest.raises(ValueError, match="step_flops"):
        next(iter(loader))


def test_straggler_ratio():
    assert straggler_ratio([2.0, 2.0]) == 1.0
    assert straggler_ratio([1.0, 3.0]) == 1.5
    with pytest.raises(ValueError):
        straggler_ratio([])


def _same(a, b):
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert a.sample_ids == b.sample_ids


@pytest.mark.parametrize("num_workers", [0, 2])
def test_balanced_stream_resumes_bit_for_bit(num_workers):
    sources = [FakeSource(0, 41, max_tiles=4, max_text=60), FakeSource(1, 17, max_images=0)]
    packing = _config(balance_flops=True, rows_per_batch=2)
    config = StreamConfig(seed=3, num_workers=num_workers)

    def loader():
        return build_dataloader(
            sources, packing, FACTS, config, 0, 2, step_flops=COUNTER.step_flops
        )

    total, cut = 12, 5
    expected = list(islice(loader(), total))
    first = loader()
    head = list(islice(iter(first), cut))
    resumed = loader()
    resumed.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    tail = list(islice(iter(resumed), total - cut))
    for a, b in zip(head + tail, expected, strict=True):
        _same(a, b)
    # And balancing changed the packing (the switch is not a no-op on this stream).
    plain = _config(rows_per_batch=2)
    unbalanced = list(islice(build_dataloader(sources, plain, FACTS, config, 0, 2), total))
    assert [b.sample_ids for b in unbalanced] != [b.sample_ids for b in expected]
