"""Statistics: streaming summaries and pure functions, checked on samples worked out by hand."""

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


def distribution(values, limit=None):
    result = utc.Sketch(limit)
    for value in values:
        result.add(value)
    return result


def test_percentiles_of_one_to_a_hundred():
    """Linear interpolation between closest ranks, worked out by hand: rank (n - 1) * p."""
    summary = distribution([v * 1e6 for v in reversed(range(1, 101))]).summary_ms(utc.RTT_FIGURES)
    assert summary["min"] == 1.0 and summary["max"] == 100.0 and summary["avg"] == 50.5  # in any order
    assert (summary["median"], summary["p90"], summary["p99"]) == (50.5, 90.1, 99.01)


def test_mdev_is_pings_population_deviation():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean = sum(values) / len(values)
    expected = math.sqrt(sum(v * v for v in values) / len(values) - mean * mean)  # ping's formula
    stats = utc.RunningStats()
    for value in values:
        stats.add(value)
    assert stats.mdev == pytest.approx(expected) and stats.mean == 3.0
    assert (stats.min, stats.max, stats.count) == (1.0, 5.0, 5)


def test_summary_of_nothing_has_every_key_as_none():
    summary = utc.Sketch().summary_ms(utc.RTT_FIGURES)
    assert set(summary) == {"min", "avg", "median", "p90", "p99", "max", "mdev"}
    assert all(value is None for value in summary.values())


@pytest.mark.parametrize("limit", [None, 3], ids=["exact", "past the budget"])
@pytest.mark.parametrize("count", [1, 5, 37, 10000])
def test_histogram_counts_everything_once_in_a_few_honest_rows(count, limit):
    values = [1000 + (index * 7919) % 5000 for index in range(count)]
    rows = distribution(values, limit).rows(max(1, min(10, round(math.sqrt(count)))))
    assert sum(row[2] for row in rows) == count
    assert len(rows) <= max(1, round(math.sqrt(count))) and len(rows) <= 10
    assert rows[0][0] == min(values) and rows[-1][1] == max(values)  # never beyond them
    assert all(earlier[1] == pytest.approx(later[0]) for earlier, later in zip(rows, rows[1:]))
    if limit is None and count > 1:  # exactly the values in each row: the first's from its low, (low, high]
        assert [row[2] for row in rows] == [sum(1 for value in values if (value >= low if index == 0 else
                                                                          value > low) and value <= high)
                                            for index, (low, high, _) in enumerate(rows)]
        assert all(high / low == pytest.approx(rows[0][1] / rows[0][0]) for low, high, _ in rows)


def test_histogram_of_equal_values_is_one_row():
    assert distribution([2000.0] * 3).rows(10) == [(2000.0, 2000.0, 3)]
    assert utc.Sketch().rows(10) == []


def test_negative_values_sort_first_exactly_and_past_the_budget():
    values = (4000, -1000, 0, 2000, -3000)
    assert distribution(values).quantiles((0.0, 0.25, 0.5, 1.0)) == [-3000, -1000, 0, 4000]
    sketched = distribution(values, limit=1).quantiles((0.0, 0.25, 0.5, 1.0))
    assert sketched == pytest.approx([-3000, -1000, 0, 4000], rel=1e-4)


def test_relative_values_keep_a_leg_with_an_hour_of_offset_exact():
    hour = 3600 * utc.NS_PER_S
    delays = distribution([hour + 5000, hour + 7000, hour + 6000], limit=1)
    relative = utc.Sketch(limit=1, relative=True)
    for value in (hour + 5000, hour + 7000, hour + 6000):
        relative.add(value)
    assert relative.quantiles((0.5,)) == [hour + 6000]  # within 10 us of the first: exact
    assert abs(delays.quantiles((0.5,))[0] - (hour + 6000)) > 1000  # an hour at 0.005%: 180 ms


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
