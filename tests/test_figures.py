"""Honest figures: exact percentiles, a drift named only beyond its bound, offsets only from
timestamps that agree, NTP's own sanity checks, and words that follow the bounds."""

import json
import random
import tracemalloc

import pytest

import udp_timecheck as utc
from conftest import T0_NS, SteppingClock, answer_probe, new_recorder, send_probe
from conftest import FakeNtpServer

US, MS, SECOND = 1000, 1_000_000, utc.NS_PER_S
FRACTIONS = (0.0, 0.01, 0.1, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0)


# --- percentiles: numpy's, within max(1 us, 0.01%) --------------------------------------------

def within_tolerance(got, exact):
    return all(abs(value - truth) <= max(1 * US, 1e-4 * abs(truth)) for value, truth in zip(got, exact))


def percentiles(values, limit=None):
    quantiles = utc.Sketch(limit)
    for value in values:
        quantiles.add(value)
    return quantiles.quantiles(FRACTIONS), numpy_percentiles(values, [100 * part for part in FRACTIONS])


def numpy_percentiles(values, percents):
    """numpy.percentile, the independent truth (linear interpolation); numpy is imported here, so
    that only the workers that run these tests pay for it."""
    import numpy
    return numpy.percentile(numpy.array(values, dtype=float), percents)


def random_rtts(seed, count=20000):
    rng = random.Random(seed)
    return [int(rng.lognormvariate(11, 1.2)) for _ in range(count)]  # ~60 us, with a long tail


def wide_range(seed, count=20000):
    rng = random.Random(seed)
    return [int(10 ** rng.uniform(3, 10)) for _ in range(count)]  # 1 us to 10 s, evenly in log


@pytest.mark.parametrize("make, seed", [(random_rtts, 1), (random_rtts, 2), (wide_range, 3), (wide_range, 4)],
                         ids=["lognormal-1", "lognormal-2", "1us-10s-3", "1us-10s-4"])
def test_percentiles_are_numpys_exactly_within_the_budget(make, seed):
    got, exact = percentiles(make(seed))  # made here, not at collection: each worker collects
    assert got == pytest.approx(list(exact), rel=1e-12)  # the values themselves: exact


@pytest.mark.parametrize("make, seed", [(random_rtts, 5), (wide_range, 6)], ids=["lognormal", "1us-10s"])
def test_past_the_budget_the_sketch_keeps_them_within_a_hundredth_of_a_percent(make, seed):
    got, exact = percentiles(make(seed), limit=1000)
    assert within_tolerance(got, exact)
    assert got != pytest.approx(list(exact), rel=1e-12)  # really the sketch's figures, not the values


def test_many_chunks_and_values_beyond_four_bytes_are_still_exact():
    rng = random.Random(9)
    values = [rng.choice((rng.randrange(1, 3 * SECOND), rng.randrange(1, 50 * US)))
              for _ in range(3 * 32768 + 7)]
    got, exact = percentiles(values)
    assert len(values) > 3 * utc.EXACT_CHUNK and max(values) > 2 ** 31
    assert got == pytest.approx(list(exact), rel=1e-12)


def test_the_sketch_is_exact_below_ten_microseconds_and_relative_above():
    rng = random.Random(11)
    edges = [0, 1, -1, 9999, -9999, 10000, -10000]
    for value in edges + [rng.randrange(-10 ** 11, 10 ** 11) for _ in range(5000)]:
        shown = utc.sketch_value(utc.sketch_key(value))
        assert abs(shown - value) <= (0 if abs(value) < 10000 else 5e-5 * abs(value) * (1 + 1e-9)), value
    keys = [utc.sketch_key(value) for value in range(-30000, 30000, 7)]
    assert keys == sorted(keys)


def test_past_the_budget_memory_stays_flat():
    quantiles = utc.Sketch(limit=1000)
    rng = random.Random(2)
    for _ in range(20000):  # 50 to 52 us: some 400 buckets of 0.01%, all in use by now
        quantiles.add(rng.randrange(50 * US, 52 * US))
    quantiles.quantiles((0.5,))  # the exact values join the sketch now
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20000):
            quantiles.add(rng.randrange(50 * US, 52 * US))
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 8 * 1024  # twice the values, no more memory (a byte a value would show)
    assert quantiles.count == 40000


def test_the_summary_gives_numpys_percentiles_of_its_own_rtts():
    recorder = new_recorder(count=300)
    rtts = [rtt for rtt in random_rtts(7, 300)]
    for seq, rtt in enumerate(rtts):
        answer_probe(recorder, send_probe(recorder, seq), rtt_ns=rtt)
    summary = utc.summarize(recorder)
    reported = [summary["rtt_ms"][name] * MS for name in ("median", "p90", "p99")]
    exact = numpy_percentiles(rtts, [50, 90, 99])
    assert reported == pytest.approx(list(exact), abs=1)  # to the nanosecond the JSON shows
    rows = summary["histogram_ms"]
    assert rows[0][0] == summary["rtt_ms"]["min"] and rows[-1][1] == summary["rtt_ms"]["max"]
    assert sum(row[2] for row in rows) == 300


# --- drift: named only beyond three times an error that includes the offsets' bounds ----------

def one_clock_points(seconds=10.0, count=200, rtt_us=4.0):
    """One clock, so the truth is 0 ppm; the path's asymmetry moves the offset from +bound at
    the start to -bound at the end, as far as the bounds allow."""
    points = []
    for index in range(count):
        at = seconds * index / (count - 1)
        offset = rtt_us * 1000 / 2 * (1 - 2 * at / seconds) * 0.9
        points.append(utc.OffsetPoint(at, T0_NS + int(at * SECOND), offset, int(rtt_us * 1000)))
    return points


def test_a_one_clock_drift_within_the_bounds_is_not_claimed():
    fit = utc.fit_drift(one_clock_points(), 10.0)
    assert fit.drift_ppm < -0.3  # the fit sees a slope: the old error (its scatter, ~0) would claim it
    assert abs(fit.drift_ppm) <= utc.DRIFT_CLAIM_FACTOR * fit.drift_err_ppm
    summary = {"drift_ppm": round(fit.drift_ppm, 3), "drift_err_ppm": round(fit.drift_err_ppm, 3),
               "offset_end_ms": 0.0, "offset_end_err_ms": 0.002, "clock_steps": []}
    assert "runs no faster or slower than this machine's" in utc.format_drift(summary)[0]


def test_the_readme_command_on_one_machine_claims_no_drift(start_server, capsys):
    server = start_server(log=None)
    argv = ["client", *map(str, server.address[:2]), "--measure-delay", "-c", "1000", "-i", "0.001"]
    assert utc.main(argv + ["-q"]) == 0
    text = capsys.readouterr().out
    assert "runs faster" not in text and "runs slower" not in text
    assert utc.main(argv + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert abs(summary["drift_ppm"]) <= utc.DRIFT_CLAIM_FACTOR * summary["drift_err_ppm"]
    assert summary["drift_err_ppm"] >= summary["offset_err_ms"] * 1000 / summary["duration_s"]


# --- timestamps that contradict each other or the round trip give no offset -----------------

def fake_server(times):
    """A time server that answers every request of ours at once, its T2 and T3 from
    times(now_ns) (None: leave them out)."""
    def answer(data):
        request_id, _, ext = json.loads(data.decode())[:3]
        stamps = times(utc.wall_ns())
        fields = {"seq": ext["seq"], "ts": "kernel"}
        if stamps is not None:
            fields.update(t2=stamps[0], t3=stamps[1])
        return json.dumps([request_id, "The time is now", fields]).encode()
    return answer


CONTRADICTIONS = {
    utc.ZERO_STAMP: lambda now: (0, now),
    utc.REVERSED_STAMPS: lambda now: (now + 3600 * SECOND, now),  # T2 an hour after T3
    utc.HELD_TOO_LONG: lambda now: (now, now + 27 * MS),  # 27 ms held, answered at once
    utc.NO_SERVER_STAMPS: lambda now: None,
}


@pytest.mark.parametrize("reason", sorted(CONTRADICTIONS))
def test_contradictory_timestamps_give_no_offset_in_text_json_or_metrics(reason, udp_peer, capsys):
    peer = udp_peer(fake_server(CONTRADICTIONS[reason]))
    argv = ["client", "127.0.0.1", str(peer.port), "-c", "8", "-i", "0.01"]
    assert utc.main(argv + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["received"] == 8 and summary["timestamps"]["untrusted_because"] == {reason: 8}
    for key in ("offset_ms", "offset_err_ms", "server_proc_ms", "drift_ppm", "offset_end_ms"):
        assert summary[key] is None, key
    assert all(sample["offset_ms"] is None and sample["untrusted_because"] == reason
               for sample in summary["samples"])
    assert utc.main(argv) == 0
    text = capsys.readouterr().out
    assert "server clock offset: unavailable (" in text and " ms \u00b1 " not in text
    assert ("the server sends no timestamps" if reason == utc.NO_SERVER_STAMPS
            else "{} (8 probes)".format(reason)) in text
    recorder = utc.Prober("127.0.0.1", peer.port, count=8, interval=0.01).run()
    assert "udp_timecheck_clock_offset_seconds" not in utc.render_client_metrics(recorder)


def test_an_offset_comes_only_from_the_probes_that_agree(udp_peer, capsys):
    """A server 30 ms ahead that sometimes holds a request 27 ms in its stamps but not in fact:
    those probes would say 16.5 ms; the others say 30."""
    count = iter(range(10 ** 6))
    held_ns = lambda: 27 * MS if next(count) % 2 else 0  # noqa: E731
    peer = udp_peer(fake_server(lambda now: (now + 30 * MS, now + 30 * MS + held_ns())))
    assert utc.main(["client", "127.0.0.1", str(peer.port), "-c", "20", "-i", "0.01", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["timestamps"]["untrusted_because"] == {utc.HELD_TOO_LONG: 10}
    assert abs(summary["offset_ms"] - 30) <= summary["offset_err_ms"]


def test_a_summary_with_no_trusted_offset_says_why_and_does_not_crash():
    clock = SteppingClock()
    recorder = new_recorder(count=3, wall_clock=clock)
    clock.origin = recorder.started_mono_ns
    for seq in range(3):  # this machine's clock steps 40 ms during every probe, and stays stepped
        sample = send_probe(recorder, seq, wall_shift_ns=clock.shift_ns)
        clock.shift_ns += 40 * MS
        answer_probe(recorder, sample, rtt_ns=50 * US, wall_step_ns=40 * MS)
    summary = utc.summarize(recorder)
    lines = utc.format_summary(summary)
    assert summary["offset_ms"] is None and summary["server_proc_ms"] is not None
    assert ("server clock offset: unavailable (no probe's timestamps can be trusted: "
            "this machine's clock stepped during the probe (3 probes))") in lines


def test_a_late_clock_reading_is_not_a_clock_step():
    """A reading after the reply came 3 ms late (the process preempted between the wall and the
    monotonic one), and the clock never stepped: with user-space stamps the probe is untrusted, and
    says why; with the kernel's at both ends it stands.  A real step is still one."""
    clock = SteppingClock()
    recorder = new_recorder(count=4, wall_clock=clock, local=utc.LocalEnd(timestamps=utc.KERNEL))
    clock.origin = recorder.started_mono_ns
    user = send_probe(recorder, 0)
    answer_probe(recorder, user, rtt_ns=50 * US, late_reading_ns=3 * MS)
    stamped = send_probe(recorder, 1)
    stamped.t1_kernel = True
    answer_probe(recorder, stamped, rtt_ns=50 * US, late_reading_ns=3 * MS, kernel_t4=True)
    stepped = send_probe(recorder, 2)
    clock.shift_ns = 40 * MS
    answer_probe(recorder, stepped, rtt_ns=50 * US, wall_step_ns=40 * MS, kernel_t4=True)
    after = send_probe(recorder, 3, wall_shift_ns=40 * MS)
    answer_probe(recorder, after, rtt_ns=50 * US)
    assert user.timing.untrusted_because == utc.PREEMPTED and not user.timing.kernel
    assert stamped.timing.trusted and stamped.timing.kernel and stamped.timing.rtt_ns == 50 * US
    assert stepped.timing.untrusted_because == utc.WALL_STEP
    assert after.timing.trusted  # the stepped clock is the run's clock from then on


def test_the_root_distance_is_part_of_an_ntp_offsets_bound(capsys):
    shift_ms = 100.0  # within the bound of a server 1.4 s from UTC by its own account
    with FakeNtpServer(shift_ns=int(shift_ms * MS), root=(1 << 16, 26214)) as server:  # 1 s, 0.4 s
        assert utc.main(["sntp", "127.0.0.1", str(server.port), "-c", "2", "-i", "0.05", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    root_distance_ms = 1000 / 2 + 26214 / 65536 * 1000  # root delay / 2 + root dispersion
    assert summary["offset_err_ms"] == pytest.approx(summary["delay_ms"] / 2 + root_distance_ms, abs=0.001)
    assert abs(summary["offset_ms"] - shift_ms) <= summary["offset_err_ms"]


# --- words follow the bound ------------------------------------------------------------------------

@pytest.mark.parametrize("offset_ms, error_ms, words", [
    (-0.001, 0.001, "server level with this machine within \u00b1 0.001 ms"),
    (2.996, 5.008, "server level with this machine within \u00b1 5.008 ms"),
    (6.0, 5.008, "server ahead of this machine"),
    (-6.0, 5.008, "server behind this machine"),
])
def test_a_direction_is_named_only_outside_the_bound(offset_ms, error_ms, words):
    summary = {"server_proc_ms": 0.01, "offset_ms": offset_ms, "offset_err_ms": error_ms, "offset_seq": 3,
               "timestamps": {"untrusted_because": {}}}
    (line,) = utc.format_clock(summary)
    assert "({}; from seq 3".format(words) in line


def test_the_sntp_summary_follows_the_bound_too():
    summary = {"target": "h:123", "sent": 1, "received": 1, "loss_pct": 0, "late": 0, "duplicates": 0,
               "mismatched": 0, "problems": {}, "offset_ms": -0.004, "offset_err_ms": 0.007, "offset_seq": 0,
               "delay_ms": 0.014, "stratum": 2, "refid": "192.0.2.1", "leap": 0, "root_delay_ms": 0.0,
               "root_dispersion_ms": 0.0, "clock": {"local": utc.UNKNOWN_CLOCK.as_dict()}}
    lines = utc.format_sntp_summary(summary)
    assert any("(the server's clock is level with this machine's within \u00b1 0.007 ms;" in line
               for line in lines)
    summary["offset_ms"] = -0.009
    lines = utc.format_sntp_summary(summary)
    assert any("(the server's clock is behind this machine's;" in line for line in lines)


# --- behaviours that only a mutant would miss ---------------------------------------------------

def test_queueing_is_measured_above_each_legs_least_delay_wherever_it_comes():
    """Out-leg delays of 7, 5, 6, 8, 9 ms and back-leg ones of 3, 5, 4, 2, 1 ms (the server 2, 0,
    1, 3 and 4 ms ahead, a 10 ms round trip): the least of each is not its first probe's."""
    recorder = new_recorder(count=5)
    for seq, offset_ms in enumerate((2, 0, 1, 3, 4)):
        answer_probe(recorder, send_probe(recorder, seq), rtt_ns=10 * MS, offset_ns=offset_ms * MS)
    summary = utc.summarize(recorder)
    assert summary["send_queueing_ms"] == 2.0 and summary["receive_queueing_ms"] == 2.0  # 7 - 5, 3 - 1


def test_a_drift_through_a_path_whose_delay_varies_is_chronys_weighted_fit():
    """Every other probe crosses a queue that grows, and its offset leans with it: chrony's weights,
    1 / (1 + (delay - least) / spread) ** 2 with the delays' interquartile spread, keep the fit near
    the truth (100 ppm); the weighted least squares is numpy's, the weights chrony's, as documented."""
    import numpy
    points = []
    for index in range(40):
        at_s = index * 2.5
        queue_ns = 40 * MS if index % 2 else 0
        lean_ns = 20 * MS * at_s / 100 if index % 2 else 0  # the slow probes' offsets lean, more and more
        points.append(utc.OffsetPoint(at_s, T0_NS, 100 * 1000 * at_s + lean_ns, 1 * MS + queue_ns))
    fit = utc.fit_drift(points, 100.0)
    delays = numpy.array([point.rtt_ns for point in points], dtype=float)
    spread = numpy.percentile(delays, 75) - numpy.percentile(delays, 25)
    weights = 1 / (1 + (delays - delays.min()) / spread) ** 2
    slope, _ = numpy.polyfit([point.at_s for point in points], [point.offset_ns for point in points], 1,
                             w=numpy.sqrt(weights))  # polyfit weighs residuals, not their squares
    assert fit.drift_ppm == pytest.approx(slope / 1000, rel=1e-9)
    assert 100 < fit.drift_ppm < 150  # unweighted, the leaning half would pull it to 200


def test_a_clocks_offset_is_read_in_the_tightest_of_three_brackets():
    reference = iter([0, 1000, 2000, 2010, 3000, 3020])  # the first bracket a thousand wide
    clock = iter([900, 2105, 3110])  # read 400 late in the first, the truth (100) in the others
    assert utc.clock_offset_ns(lambda: next(clock), lambda: next(reference)) == 100


def test_the_exact_budgets_edge_is_its_last_exact_value():
    values = [10 ** 5 + 7919 * index for index in range(100)]  # all above 10 us: a bucket is not exact
    exact = utc.Sketch(limit=100)
    for value in values:
        exact.add(value)
    got, truth = exact.quantiles(FRACTIONS), numpy_percentiles(values, [100 * part for part in FRACTIONS])
    assert got == pytest.approx(list(truth), rel=1e-12)  # the hundredth value still kept as it is
    exact.add(values[0])  # the 101st: every value into the buckets, each within 0.005%
    truth = numpy_percentiles(values + values[:1], [100 * part for part in FRACTIONS])
    assert exact.quantiles(FRACTIONS) == pytest.approx(list(truth), rel=1e-4)
    assert exact.quantiles(FRACTIONS) != pytest.approx(list(truth), rel=1e-12)
