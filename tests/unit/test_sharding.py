import numpy as np
import pytest

from vlpretrain.data import sharding


@pytest.mark.parametrize("num_records", [0, 1, 5, 17, 100])
@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 0), (3, 2), (4, 3)])
def test_shares_are_disjoint_cover_everything_and_differ_by_at_most_one(
    num_records, world_size, num_workers
):
    num_streams = sharding.stream_count(world_size, num_workers)
    shares = [
        sharding.stream_share(num_records, 42, 0, 3, sid, num_streams) for sid in range(num_streams)
    ]
    merged = np.concatenate(shares)
    assert sorted(merged.tolist()) == list(range(num_records))  # nothing dropped, no duplicate
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == [
        sharding.share_length(num_records, sid, num_streams) for sid in range(num_streams)
    ]


def test_stream_index_is_rank_major():
    # 2 workers per rank: (rank 1, worker 0) is the third stream.
    assert sharding.stream_index(1, 3, 0, 2) == 2
    assert sharding.stream_index(2, 3, 1, 2) == 5
    assert sharding.stream_index(1, 2, 0, 0) == 1  # 0 workers counts as one
    with pytest.raises(ValueError, match="worker 2"):
        sharding.stream_index(0, 1, 2, 2)


def test_every_epoch_has_a_new_permutation_identical_on_all_ranks():
    first = sharding.epoch_permutation(1000, 42, 0, 0)
    again = sharding.epoch_permutation(1000, 42, 0, 0)
    second = sharding.epoch_permutation(1000, 42, 1, 0)
    other_dataset = sharding.epoch_permutation(1000, 42, 0, 1)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, other_dataset)
    assert sorted(second.tolist()) == list(range(1000))


def test_a_stream_share_owns_its_memory_not_the_whole_permutation():
    from vlpretrain.data.sharding import stream_share

    share = stream_share(1000, seed=0, epoch=0, dataset_index=0, stream_id=1, num_streams=4)
    assert share.base is None and share.nbytes == 250 * 8
