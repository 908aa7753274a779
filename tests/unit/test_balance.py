"""FLOPs-balanced packing (data.balance): prices, the running budget, rows evened out, exact
resume of the packer and of the stream, and the config switch."""

from __future__ import annotations

import json
import math
import pickle
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from stream_fakes import COUNTER, FACTS, FakeSource, make_sample

from vlpretrain.data.balance import (
    RowBalance,
    SyncedRelease,
    build_row_balance,
    job_straggler_ratio,
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


def test_best_fit_distance_counts_both_budgets():
    balance = RowBalance(COUNTER.step_flops, max_tokens=100, slack_tokens=5)
    assert balance.distance_to_full(40, 1e9) == pytest.approx(0.36)  # tokens only, before data
    balance.observe(40, 120.0)  # budget 300
    assert balance.distance_to_full(40, 150.0) == pytest.approx(0.6**2 + 0.5**2)
    # A row full of tokens but at half the FLOPs is farther from full than one near both.
    assert balance.distance_to_full(100, 150.0) > balance.distance_to_full(80, 240.0)
    assert math.isinf(balance.distance_to_full(101, 0.0))
    assert math.isinf(balance.distance_to_full(10, 301.0))


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


class _Costed:
    def __init__(self, cost, name):
        self.cost, self.name = cost, name


def _names(rows):
    return [row.name for row in rows]


def test_release_in_packing_order_without_a_hold():
    order = SyncedRelease(0)
    order.push([_Costed(3.0, "a"), _Costed(1.0, "b")])
    assert not order.wants_more()
    assert _names([order.release(), order.release()]) == ["a", "b"]
    assert order.wants_more() and order.next_row(lambda: None) is None


def test_release_takes_the_same_cost_rank_on_every_stream():
    """At release t every stream lets go of its (t mod (Q + 1))-th cheapest candidate."""
    hold = 3
    rng = np.random.default_rng(0)
    streams = [iter(rng.random((200, 1)).tolist()) for _ in range(4)]
    orders = [SyncedRelease(hold) for _ in streams]
    for t in range(150):
        for stream, order in zip(streams, orders, strict=True):
            while order.wants_more():
                order.push([_Costed(next(stream)[0], t)])
            candidates = sorted(row.cost for row in order.rows)
            assert len(candidates) == hold + 1
            released = order.release()
            assert candidates.index(released.cost) == t % (hold + 1)


def test_every_row_leaves_once_and_within_the_wait_bound():
    hold = 4
    order = SyncedRelease(hold)
    rng = np.random.default_rng(1)
    costs = iter(rng.choice([1.0, 2.0, 2.5, 9.0], 500).tolist())
    arrived, left = {}, {}
    count = iter(range(500))

    def produce():
        index = next(count, None)
        if index is None:
            return None
        arrived[index] = order.num_released
        return [_Costed(next(costs), index)]

    while (row := order.next_row(produce)) is not None:
        left[row.name] = order.num_released - 1
    assert sorted(left) == list(range(500))
    assert max(left[k] - arrived[k] for k in left) <= order.max_wait


def test_release_state_round_trips_and_older_states_restore():
    order = SyncedRelease(2)
    order.push([_Costed(float(k), k) for k in (5, 1, 4)])
    order.release()
    order.push([_Costed(2.0, 2)])
    restored = SyncedRelease(2)
    restored.restore(list(order.rows), json.loads(json.dumps(order.state_dict())))
    assert restored.state_dict() == order.state_dict()
    assert _names([restored.release() for _ in range(3)]) == _names(
        [order.release() for _ in range(3)]
    )
    older = SyncedRelease(2)
    older.restore([_Costed(1.0, "a")], None)  # a stream state from before the release order
    assert older.state_dict() == {"version": 1, "num_released": 0, "arrived_at": [0]}
    with pytest.raises(ValueError, match="2 arrival times for 1 ready rows"):
        older.restore([_Costed(1.0, "a")], dict(order.state_dict(), arrived_at=[0, 0]))


def test_a_row_the_order_never_picks_is_released_at_the_wait_bound():
    """An adversary keeps row 'x' off the released cost rank; the bound still lets it out."""
    order = SyncedRelease(2)
    order.push([_Costed(50.0, "x")])
    released, cheap, costly = [], 0.0, 1000.0
    while "x" not in released:
        position = order.num_released % 3
        other = [row.cost for row in order.rows if row.name != "x"]
        # rank 0: bring a cheaper row; rank 2: a costlier one; rank 1: match the other's side
        low = position == 0 or (position == 1 and other and other[0] < 50.0)
        cheap, costly = cheap + 1e-3, costly + 1.0
        order.push([_Costed(cheap if low else costly, "other")])
        released.append(order.release().name)
    assert len(released) == order.max_wait + 1


def _released_costs(seed, count, holds):
    """Row FLOPs of one rank: the balanced packer's rows through SyncedRelease(hold), for
    each hold (one packing run; the release order only reorders its rows)."""
    packer = _packer(_config(balance_flops=True))
    samples = _mixture(6 * (count + max(holds)), seed=seed)
    finished = [packer.add(PackItem(PieceRef.whole(s, k, 0), s)) for k, s in enumerate(samples)]
    assert sum(map(len, finished)) > count + max(holds)
    costs = []
    for hold in holds:
        order, pending = SyncedRelease(hold), iter(finished)
        produce = pending.__next__
        costs.append([_row_flops(order.next_row(produce)) for _ in range(count)])
    return costs


def test_synced_release_lowers_the_straggler_ratio_of_many_ranks():
    ranks, warmup, count, holds = 64, 18, 54, (0, 8)
    per_rank = [_released_costs(seed, count, holds) for seed in range(ranks)]
    ratios = []
    for k in range(len(holds)):
        steps = zip(*(costs[k][warmup:] for costs in per_rank), strict=True)
        ratios.append(job_straggler_ratio([list(step) for step in steps]))
    print(ratios)
    assert ratios[1] < 1 + 0.75 * (ratios[0] - 1)


def _held_loaders(hold, world_size, **kwargs):
    sources = [FakeSource(0, 41, max_tiles=4, max_text=60), FakeSource(1, 17, max_images=0)]
    packing = _config(balance_flops=True, balance_queue_rows=hold)
    config = StreamConfig(seed=3, **kwargs)
    flops = {"step_flops": COUNTER.step_flops}
    loaders = [
        build_dataloader(sources, packing, FACTS, config, rank, world_size, **flops)
        for rank in range(world_size)
    ]
    return sources, loaders


def test_held_rows_and_release_counter_resume_bit_for_bit():
    _, (straight,) = _held_loaders(4, 1)
    expected = list(islice(straight, 14))
    _, (first,) = _held_loaders(4, 1)
    head = list(islice(iter(first), 6))
    state = json.loads(json.dumps(first.state_dict()))
    stream = state["dataset_state"]
    assert len(stream["ready_rows"]) == 4  # the held rows are in the state...
    assert stream["release"]["num_released"] == 6  # ...and where the release order stands
    _, (resumed,) = _held_loaders(4, 1)
    resumed.load_state_dict(state)
    tail = list(islice(iter(resumed), 8))
    for a, b in zip(head + tail, expected, strict=True):
        _same(a, b)
    # Holding rows reorders them (the release order is not a no-op on this stream).
    _, (unheld,) = _held_loaders(0, 1)
    assert [b.sample_ids for b in islice(unheld, 14)] != [b.sample_ids for b in expected]


def test_held_rows_go_back_to_the_pool_on_a_resize():
    sources, saved = _held_loaders(4, 2, num_epochs=1)
    trained = [b for loader, n in zip(saved, (3, 5), strict=True) for b in islice(iter(loader), n)]
    states = [json.loads(json.dumps(loader.state_dict())) for loader in saved]
    held = [row for state in states for row in state["dataset_state"]["ready_rows"]]
    assert len(held) >= 2 * 4  # each stream holds at least its 4 rows
    _, resumed = _held_loaders(4, 3, num_epochs=1)
    for loader in resumed:
        loader.load_resharded_state_dict(states)
    after = [list(loader) for loader in resumed]
    assert all(loader.stream._worker_stream()._ready.num_released == len(batches) for
               loader, batches in zip(resumed, after, strict=True))  # fmt: skip
    counts = Counter((r.dataset_index, r.record_index) for b in trained for r in b.sample_ids)
    counts.update(
        (r.dataset_index, r.record_index) for bs in after for b in bs for r in b.sample_ids
    )
    assert max(counts.values()) == 1
    assert set(counts) == {(s.dataset_index, k) for s in sources for k in range(len(s))}
