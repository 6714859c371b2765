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


def test_probe_timing_derives_rtt_offset_and_error():
    # user-space stamps: the monotonic round trip less the server's T3 - T2
    timing = utc.probe_timing(10_000_000, 15_040_000, 15_060_000, 10_100_000, raw_ns=100_000,
                              span_ns=100_000, kernel=False)
    assert timing.proc_ns == 20_000
    assert timing.rtt_ns == 80_000
    # ((T2 - T1) + (T3 - T4)) / 2 = (5_040_000 + 4_960_000) / 2
    assert timing.offset_ns == 5_000_000
    assert timing.trusted and not timing.kernel


def test_kernel_timing_leaves_out_the_wake_up():
    # T4 from the kernel: 70 us after T1; the process woke 30 us later
    timing = utc.probe_timing(10_000_000, 15_030_000, 15_040_000, 10_070_000, raw_ns=100_000,
                              span_ns=100_000, kernel=True)
    assert timing.kernel and timing.trusted
    assert timing.rtt_ns == 60_000  # (T4 - T1) - (T3 - T2)
    assert timing.offset_ns == 5_000_000


def test_implausible_server_processing_is_not_subtracted():
    # a server clock step: T3 before T2
    timing = utc.probe_timing(0, 500, 400, 100, raw_ns=100, span_ns=100, kernel=False)
    assert timing.proc_ns is None
    assert timing.rtt_ns == 100


def test_no_server_timestamps_means_no_offset():
    timing = utc.probe_timing(0, None, None, 100, raw_ns=100, span_ns=100, kernel=True)
    assert timing.offset_ns is None and timing.rtt_ns == 100


@pytest.mark.parametrize("step_ns", [-40_000_000, 40_000_000, -80_000, 200_000])
def test_a_wall_clock_step_never_makes_an_rtt(step_ns):
    """The wall clock steps between T1 and T4: the RTT is the monotonic one, and untrusted."""
    timing = utc.probe_timing(1_000_000, 5_000_000, 5_010_000, 1_050_000 + step_ns, raw_ns=60_000,
                              span_ns=60_000 + step_ns, kernel=True)
    assert timing.rtt_ns == 50_000  # raw less T3 - T2
    assert not timing.trusted and not timing.kernel


def test_kernel_rtt_longer_than_the_monotonic_one_is_not_used():
    timing = utc.probe_timing(0, None, None, 90_000, raw_ns=80_000, span_ns=80_000, kernel=True)
    assert timing.rtt_ns == 80_000 and not timing.kernel and not timing.trusted


@pytest.mark.parametrize("kernel_ns, expected", [
    (999_990, 1_999_990),     # 10 ns old: carried over to the other clock
    (1_000_001, None),        # later than the reading: implausible
    (900_000 - 1, None),      # older than the datagram can have waited
    (None, None),
])
def test_arrival_from_the_kernel_stamp(kernel_ns, expected):
    assert utc.arrival_ns(kernel_ns, 2_000_000, 1_000_000, max_age_ns=100_000) == expected
