"""Statistics: pure functions over samples, checked on samples worked out by hand."""

import math

import pytest

import udp_timecheck as utc


def test_percentile_interpolates_between_ranks():
    values = [1.0, 2.0, 3.0, 4.0]
    assert utc.percentile(values, 0.0) == 1.0
    assert utc.percentile(values, 0.5) == 2.5
    assert utc.percentile(values, 0.9) == pytest.approx(3.7)
    assert utc.percentile(values, 1.0) == 4.0
    assert utc.percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        utc.percentile([], 0.5)


def test_percentiles_of_one_to_a_hundred():
    values = [float(v) for v in range(1, 101)]
    summary = utc.rtt_summary(list(reversed(values)))  # order must not matter
    assert summary["min"] == 1.0 and summary["max"] == 100.0
    assert summary["median"] == 50.5
    assert summary["p90"] == pytest.approx(90.1)
    assert summary["p99"] == pytest.approx(99.01)
    assert summary["avg"] == 50.5


def test_mdev_is_pings_population_deviation():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean = sum(values) / len(values)
    expected = math.sqrt(sum(v * v for v in values) / len(values) - mean * mean)  # ping's formula
    assert utc.rtt_summary(values)["mdev"] == pytest.approx(expected)


def test_summary_of_nothing_has_every_key_as_none():
    summary = utc.rtt_summary([])
    assert set(summary) == {"min", "avg", "median", "p90", "p99", "max", "mdev"}
    assert all(value is None for value in summary.values())


def test_jitter_is_mean_absolute_consecutive_difference():
    assert utc.mean_abs_difference([1.0, 3.0, 2.0]) == 1.5
    assert utc.mean_abs_difference([5.0, 5.0, 5.0]) == 0.0
    assert utc.mean_abs_difference([5.0]) is None


def test_histogram_counts_everything_once():
    values = [0.1 * i for i in range(1, 201)] + [500.0]
    rows = utc.histogram(values, bins=10)
    assert sum(count for _, _, count in rows) == len(values)
    assert rows[0][0] == pytest.approx(0.1)
    # the outliers above p99 sit in their own last row, so the rest keeps its resolution
    assert rows[-1][1] == 500.0 and rows[-1][2] == 2
    assert len(rows) == 11
    widths = {round(high - low, 9) for low, high, _ in rows[:-1]}
    assert len(widths) == 1


def test_histogram_has_fewer_bins_for_fewer_values():
    rows = utc.histogram([1.0, 2.0, 3.0, 4.0, 5.0])
    assert len(rows) <= 3 and sum(count for _, _, count in rows) == 5
    assert len(utc.histogram([float(v) for v in range(10000)])) == 11


def test_histogram_of_equal_values_is_one_row():
    assert utc.histogram([2.0, 2.0, 2.0]) == [(2.0, 2.0, 3)]
    assert utc.histogram([]) == []


def test_sample_derives_rtt_offset_and_error():
    sample = utc.Sample(0, 1, send_ns=1_000, recv_ns=101_000, client_send_ns=10_000_000,
                        client_recv_ns=10_100_000, server_recv_ns=15_040_000, server_send_ns=15_060_000)
    assert sample.raw_rtt_ns == 100_000
    assert sample.server_proc_ns == 20_000
    assert sample.rtt_ns == 80_000
    # ((T2 - T1) + (T3 - T4)) / 2 = (5_040_000 + 4_960_000) / 2
    assert sample.offset_ns == 5_000_000
    assert sample.offset_err_ns == 40_000


def test_implausible_server_processing_is_not_subtracted():
    # a server clock step: T3 before T2
    sample = utc.Sample(0, 1, send_ns=0, recv_ns=100, client_send_ns=0, client_recv_ns=100,
                        server_recv_ns=500, server_send_ns=400)
    assert sample.server_proc_ns is None
    assert sample.rtt_ns == 100


def test_no_server_timestamps_means_no_offset():
    sample = utc.Sample(0, 1, send_ns=0, recv_ns=100, client_send_ns=0, client_recv_ns=100)
    assert sample.offset_ns is None and sample.offset_err_ns is None and sample.rtt_ns == 100
