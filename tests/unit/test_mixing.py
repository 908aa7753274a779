import logging
from collections import Counter

import numpy as np
import pytest

from vlpretrain.data.mixing import DatasetMixer


def _mixer(lengths, **kwargs):
    kwargs.setdefault("seed", 7)
    kwargs.setdefault("stream_id", 0)
    kwargs.setdefault("num_streams", 1)
    return DatasetMixer(lengths, list(range(len(lengths))), **kwargs)


def _take(mixer, n):
    return [mixer.next() for _ in range(n)]


def test_weights_follow_length_or_sqrt_length():
    assert np.allclose(_mixer([100, 300]).sampling_probabilities(), [0.25, 0.75])
    resampled = _mixer([100, 400], use_data_resampling=True)
    assert np.allclose(resampled.sampling_probabilities(), [1 / 3, 2 / 3])  # sqrt: 10 vs 20


def test_one_stream_epoch_reads_every_record_once_then_moves_to_the_next_epoch():
    mixer = _mixer([5, 3])
    refs = _take(mixer, 8)
    assert sorted((r.source_position, r.record_index) for r in refs) == [
        (0, i) for i in range(5)
    ] + [(1, i) for i in range(3)]
    assert {r.epoch for r in refs} == {0}
    nxt = mixer.next()
    assert nxt.epoch == 1 and mixer.passes == 1 and mixer.epochs == (1, 1)


def test_the_end_of_a_stream_epoch_is_logged_at_debug_level_only(caplog):
    mixer = _mixer([2, 1])
    with caplog.at_level(logging.INFO, logger="vlpretrain"):
        _take(mixer, 7)  # two stream epochs of 3 records end
    assert mixer.passes == 2
    assert not [r for r in caplog.records if "exhausted" in r.getMessage()]
    with caplog.at_level(logging.DEBUG, logger="vlpretrain"):
        _take(mixer, 3)
    assert "all datasets exhausted, stream epoch 3 done" in caplog.text


def test_num_epochs_ends_the_stream():
    mixer = _mixer([2, 1], num_epochs=1)
    assert len([r for r in _take(mixer, 3) if r is not None]) == 3
    assert mixer.next() is None and mixer.next() is None


def test_replacement_restarts_an_exhausted_dataset_with_its_next_epoch():
    mixer = _mixer([2, 1000], replacement=True)
    refs = _take(mixer, 400)
    small = [r for r in refs if r.source_position == 0]
    # every consecutive pair of reads of the small dataset is one epoch of it
    for e, pair in enumerate(zip(small[0::2], small[1::2], strict=False)):
        assert {r.epoch for r in pair} == {e}
        assert sorted(r.record_index for r in pair) == [0, 1]
    assert mixer.passes == 0


def test_streams_read_disjoint_shares():
    streams = [_mixer([10, 7], stream_id=s, num_streams=3, num_epochs=1) for s in range(3)]
    seen = Counter()
    for mixer in streams:
        while (ref := mixer.next()) is not None:
            seen[(ref.source_position, ref.record_index)] += 1
    assert len(seen) == 17 and set(seen.values()) == {1}


def test_state_round_trip_continues_identically():
    reference = _mixer([13, 29, 5], replacement=True)
    expected = _take(reference, 200)
    mixer = _mixer([13, 29, 5], replacement=True)
    head = _take(mixer, 77)
    restored = _mixer([13, 29, 5], replacement=True)
    restored.load_state_dict(mixer.state_dict())
    assert head + _take(restored, 123) == expected


def test_deterministic_given_seed_and_stream():
    assert _take(_mixer([50, 50]), 60) == _take(_mixer([50, 50]), 60)
    assert _take(_mixer([50, 50]), 60) != _take(_mixer([50, 50], seed=8), 60)


def test_changed_lengths_refuse_the_state():
    state = _mixer([5, 5]).state_dict()
    with pytest.raises(ValueError, match="lengths changed"):
        _mixer([5, 6]).load_state_dict(state)


def test_a_stream_without_any_record_is_an_error():
    with pytest.raises(ValueError, match="no record"):
        _mixer([1, 1], stream_id=2, num_streams=3)
