"""Bytes on the wire, not bytes handed to collectives: the compression ratio a user reads must
not flatter all-gather families (top-k, quantization) on more than two workers."""

import pytest

from presso.compressors.gradient.accounting import CommStats, wire_bytes


def test_ring_collectives_per_worker():
    """Ring all-reduce sends 2(n-1)/n of the payload; all-gather sends the worker's part to the
    n-1 others; a pipelined broadcast forwards the payload once. One process sends nothing."""
    assert wire_bytes(1000, 0, 0, 2) == 1000
    assert wire_bytes(1000, 0, 0, 8) == pytest.approx(1750)
    assert wire_bytes(0, 100, 0, 8) == 700
    assert wire_bytes(0, 0, 64, 64) == 64
    assert wire_bytes(1000, 100, 64, 1) == 0


@pytest.mark.parametrize("workers", [2, 8, 64])
def test_ratio_of_an_all_gather_family_falls_with_workers_and_all_reduce_does_not(workers):
    """A top-k worker hands 1/10 of the dense payload to an all-gather: 10x at two workers,
    but every extra worker receives it too, while dense all-reduce wire bytes level off at 2x."""
    gather, reduce_ = CommStats(workers=workers), CommStats(workers=workers)
    gather.record(100, 1000, "all_gather")
    reduce_.record(100, 1000)
    ratio = gather.end_step()["comm/compression_ratio"]
    assert ratio == pytest.approx(2 * (workers - 1) / workers * 1000 / ((workers - 1) * 100))
    assert reduce_.end_step()["comm/compression_ratio"] == pytest.approx(10)
    assert (ratio == pytest.approx(10)) == (workers == 2)  # payload ratio only at two workers


def test_step_metrics_split_payload_by_collective_and_reset():
    stats = CommStats(workers=4)
    stats.record(0, 4000)
    stats.record(300, 0)
    stats.record(100, 0, "all_gather")
    stats.record(50, 0, "broadcast")
    m = stats.end_step()
    assert (m["comm/bytes_sent"], m["comm/bytes_all_gather"], m["comm/bytes_broadcast"]) == (450, 100, 50)  # fmt: skip
    assert m["comm/wire_bytes"] == pytest.approx(1.5 * 300 + 3 * 100 + 50)
    assert stats.end_step()["comm/bytes_sent"] == 0
    with pytest.raises(ValueError, match="unknown collective"):
        stats.record(1, 0, "scatter")
