"""Long runs: until stopped, reports as it goes, every probe kept on disk, drift, steps, the plot."""

import csv
import json
import math
import random
import signal
import statistics
import tracemalloc
import xml.etree.ElementTree as ElementTree

import pytest

import udp_timecheck as utc
from conftest import SECOND_NS, POSIX_ONLY, cli, probe, running_client, wait_for

T0 = 1_764_000_000 * SECOND_NS


# --- the drift fit and the step detector, on synthetic points --------------------------------

def synthetic(ppm, seconds=10.0, count=200, rtt_us=50, noise_us=2.0, step_at=None, step_us=0.0, seed=7):
    rng = random.Random(seed)
    points = []
    for index in range(count):
        at = seconds * index / (count - 1)
        rtt = int((rtt_us + rng.expovariate(1 / 5.0)) * 1000)  # queueing: a tail above the floor
        offset = 1e6 + ppm * 1e3 * at + rng.gauss(0, noise_us * 1000) + (
            step_us * 1000 if step_at is not None and at >= step_at else 0)
        points.append(utc.OffsetPoint(at, T0 + int(at * SECOND_NS), offset, rtt))
    return points


def bounds_ppm(points):
    """What the offsets' own bounds leave open: the median half-RTT of the first and the last
    quarter of the points, over the time between the first and the last, in ppm."""
    quarter = len(points) // 4
    ends = [statistics.median(point.rtt_ns for point in part) / 2
            for part in (points[:quarter], points[-quarter:])]
    return sum(ends) / (points[-1].at_s - points[0].at_s) / 1000


@pytest.mark.parametrize("ppm", [500.0, -37.5, 0.0])
def test_drift_of_a_clock_that_runs_fast(ppm):
    points = synthetic(ppm)
    fit = utc.fit_drift(points, 10.0)
    assert abs(fit.drift_ppm - ppm) <= 3 * fit.drift_err_ppm + 0.01
    # ~27 us bounds at each end over 10 s leave ~5 ppm open; the fit's own scatter adds little
    assert bounds_ppm(points) <= fit.drift_err_ppm < bounds_ppm(points) + 0.5
    assert fit.offset_end_ns == pytest.approx(1e6 + ppm * 1e3 * 10, abs=5000)
    assert abs(fit.offset_end_ns - (1e6 + ppm * 1e3 * 10)) <= fit.offset_end_err_ns  # the truth, inside
    assert fit.offset_end_err_ns < statistics.median(p.rtt_ns for p in points)  # and not vacuous
    assert fit.steps == []


def test_the_offset_at_the_end_is_within_the_points_own_bounds_whatever_their_signs():
    """One clock (the truth: 0), each offset within 0.9 of its own bound (half its RTT), the earlier
    half leaning one way and the later the other: the line's end lands beyond any one point's bound,
    and inside the fit's.  That bound is sum(|h| * RTT / 2), h the end's row of the fit's hat
    matrix, worked out here by numpy from the design matrix; errors with h's signs reach it."""
    import numpy
    count, rtt = 200, 4000
    times = [10.0 * index / (count - 1) for index in range(count)]
    leaning = [utc.OffsetPoint(at, T0, (-0.9 if index < count // 2 else 0.9) * rtt / 2, rtt)
               for index, at in enumerate(times)]
    fit = utc.fit_drift(leaning, 10.0)
    assert fit.steps == [] and abs(fit.offset_end_ns) > rtt / 2  # the old bound, half the RTT, missed it
    assert abs(fit.offset_end_ns) <= fit.offset_end_err_ns
    hat_row = numpy.array([1.0, 10.0]) @ numpy.linalg.pinv(numpy.column_stack([numpy.ones(count), times]))
    assert fit.offset_end_err_ns == pytest.approx(float(numpy.abs(hat_row).sum()) * rtt / 2, rel=1e-9)
    worst = [utc.OffsetPoint(at, T0, float(numpy.sign(h)) * rtt / 2, rtt) for at, h in zip(times, hat_row)]
    assert utc.fit_drift(worst, 10.0).offset_end_ns == pytest.approx(fit.offset_end_err_ns, rel=1e-9)


def test_a_clock_step_is_found_with_its_time_and_size():
    points = synthetic(20.0, step_at=6.0, step_us=-400.0)
    fit = utc.fit_drift(points, 10.0)
    ((at_ns, size_ns),) = fit.steps
    assert abs(at_ns - (T0 + 6 * SECOND_NS)) <= 0.1 * SECOND_NS  # within a point of where it happened
    assert size_ns == pytest.approx(-400_000, abs=5000)
    assert abs(fit.drift_ppm - 20.0) <= 3 * fit.drift_err_ppm + 0.01  # the step does not bend the slope
    assert len(fit.segments) == 2


def test_a_jump_in_rtt_too_is_a_new_path_not_a_step():
    points = synthetic(0.0, step_at=5.0, step_us=300.0)
    moved = [point._replace(rtt_ns=point.rtt_ns + 800_000) if point.at_s >= 5.0 else point
             for point in points]
    assert utc.fit_drift(moved, 10.0).steps == []


def test_heavier_delay_weighs_less_as_chrony_weighs_it():
    points = [utc.OffsetPoint(0, T0, 0, rtt) for rtt in (100, 100, 200, 300, 1000)]
    weights = utc.chrony_weights(points)
    assert weights[0] == weights[1] == 1.0 and 1.0 > weights[2] > weights[3] > weights[4] > 0


def test_too_few_points_give_no_drift():
    assert utc.fit_drift(synthetic(100.0, count=utc.DRIFT_MIN_POINTS - 1), 10.0) is None


# --- a real server whose clock runs fast -----------------------------------------------------

def fast_clock(ppm):
    """A wall clock ppm fast, since now (its start_ns)."""
    start = utc.wall_ns()
    clock = lambda: (lambda now: now + (now - start) * ppm // 1_000_000)(utc.wall_ns())  # noqa: E731
    clock.start_ns = start
    return clock


def test_a_server_clock_500_ppm_fast_shows_as_500_ppm(start_server):
    clock = fast_clock(500)
    server = start_server(wall_clock=clock, log=None)
    recorder = probe(server.address, count=400, interval=0.005)
    summary = utc.summarize(recorder)
    assert summary["received"] >= 390
    assert abs(summary["drift_ppm"] - 500) <= 3 * summary["drift_err_ppm"]
    if summary["timestamps"]["described"] == "kernel (both ends)":  # user-space stamps: a wider bound
        assert summary["drift_err_ppm"] < 25
    assert summary["clock_steps"] == []
    end_ns = recorder.started_ns + recorder.duration_ns  # the run's end, on this machine's clock
    truth_ms = (end_ns - clock.start_ns) * 500e-6 / 1e6  # the server's clock, 500 ppm fast since its start
    assert abs(summary["offset_end_ms"] - truth_ms) <= summary["offset_end_err_ms"] + 0.01


# --- reordering, until stopped, deadlines --------------------------------------------------


def test_a_run_until_stopped_ends_at_its_deadline(start_server, capsys):
    server = start_server(log=None)
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "0", "-i", "0.01", "-w", "0.5",
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 0 and summary["stopped_because"] == "deadline"
    assert 25 <= summary["sent"] <= 60 and summary["received"] >= summary["sent"] - 3
    assert summary["duration_s"] == pytest.approx(0.5, abs=0.3)


def test_a_deadline_cuts_a_counted_run_short(start_server, capsys):
    server = start_server(log=None)
    argv = ["client", *map(str, server.address[:2]), "-c", "100000", "-i", "0.01", "-w", "0.3"]
    assert utc.main(argv) == 0
    out = capsys.readouterr().out
    assert "UDP-TIMECHECK" in out and ", deadline 0.3 s," in out.splitlines()[0]
    assert "the deadline ended it after " in out and " of 100000 probes" in out


@POSIX_ONLY
def test_a_run_until_stopped_ends_at_ctrl_c(processes, start_server):
    client = running_client(processes, start_server(log=None), "-c", "0", "-i", "0.005", "-q",
                            header=r"probes of \d+ bytes until stopped", served=30)
    client.signal(signal.SIGINT)
    assert client.wait(timeout=10) == 0
    out = client.rest(client.stdout)
    assert any(line.startswith("interrupted after ") and " probes (" in line for line in out)


# --- reports, line times, rows on disk ---------------------------------------------------------

def test_reports_as_it_goes_in_text_with_times(start_server, capsys):
    server = start_server(log=None)
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "0", "-i", "0.005", "-w", "0.65",
                     "--report-every", "0.2", "-D"]) == 0
    lines = capsys.readouterr().out.splitlines()
    reports = [line for line in lines if "] report: " in line]
    assert len(reports) == 3
    for line in reports:
        stamp = float(line[1:line.index("]")])
        assert abs(stamp - utc.wall_ns() / SECOND_NS) < 60
        assert " sent, " in line and "% loss, rtt p50 " in line and " p99 " in line and ", jitter " in line
        assert ", offset " in line
    assert all(line.startswith("[") for line in lines if " bytes from " in line)  # -D on probe lines too


def test_reports_as_json_lines_then_the_summary(start_server, capsys):
    server = start_server(log=None)
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "0", "-i", "0.005", "-w", "0.65",
                     "--report-every", "0.2", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    *reports, summary = lines
    assert len(reports) == 3
    whole_run = {"version", "count", "interval", "timeout", "size", "interleaved", "request_bytes", "keyed",
                 "protocol",
                 "stopped_because", "interrupted", "reference", "samples", "samples_kept", "samples_cut",
                 # the whole run's: a period's loss split needs the server's count before it
                 "lost_up", "lost_down", "lost_direction_unknown", "tos", "ttl", "local_address", "ports"}
    for report in reports:
        assert set(report) - {"period"} == set(summary) - whole_run  # only what a period has
        assert report["period"]["start"] < report["period"]["end"] and "interval" not in report
        assert report["started_at"] == report["period"]["start"]  # the period's own start
        assert report["duration_s"] == pytest.approx(0.2, abs=0.1) and report["sent"] >= 20
        # read at the report, not left null (null only where the platform cannot tell: Windows)
        assert report["clock"]["local"]["synchronized"] == utc.read_clock_state().synchronized
    assert [report["started_at"] for report in reports] == sorted({r["started_at"] for r in reports})
    assert reports[0]["started_at"] == summary["started_at"]
    assert summary["interval"] == 0.005  # the summary's is the seconds between probes, as asked for
    assert summary["sent"] >= sum(report["sent"] for report in reports)


@POSIX_ONLY
def test_csv_and_jsonl_rows_survive_a_sigkill(processes, start_server, tmp_path):
    server = start_server(log=None)
    rows_csv, rows_jsonl = tmp_path / "run.csv", tmp_path / "run.jsonl"
    client = processes(cli("client", *server.address[:2], "-c", "0", "-i", "0.002", "-q",
                           "--csv", rows_csv, "--jsonl", rows_jsonl))
    wait_for(lambda: rows_jsonl.exists() and rows_jsonl.read_text().count("\n") >= 100)
    client.proc.kill()
    client.wait(timeout=10)
    with open(str(rows_csv), newline="") as handle:
        written = list(csv.DictReader(handle))
    objects = [json.loads(line) for line in rows_jsonl.read_text().splitlines()]
    for rows in (written, objects):
        assert len(rows) >= 100
        assert [int(row["seq"]) for row in rows] == list(range(len(rows)))  # every probe that ended
        assert all(row["status"] == "ok" for row in rows)
    assert all(row["sent_at"].endswith("Z") for row in objects)


def test_the_json_lists_the_first_probes_and_says_it_was_cut(start_server, capsys):
    server = start_server(log=None)
    prober = utc.Prober(*server.address[:2], count=50, keep_samples=20)
    summary = utc.summarize(prober.run())
    assert summary["sent"] == 50 and len(summary["samples"]) == 20
    assert summary["samples_kept"] == 20 and summary["samples_cut"] is True
    assert [sample["seq"] for sample in summary["samples"]] == list(range(20))


# --- the plot ------------------------------------------------------------------------------------

def test_the_plot_is_an_svg_with_its_three_panels(start_server, relay, tmp_path, capsys):
    server = start_server()
    hop = relay(server.address, lambda index, data: [] if index % 10 == 3 else [(0.0, data)])
    path = tmp_path / "run.svg"
    assert utc.main(["client", *map(str, hop.address[:2]), "-c", "60", "-i", "0.01", "-W", "0.3", "-q",
                     "--plot", str(path)]) == 0
    root = ElementTree.parse(str(path)).getroot()
    namespace = "{http://www.w3.org/2000/svg}"
    assert root.tag == namespace + "svg"
    panels = {group.get("id"): group for group in root.iter(namespace + "g")}
    assert set(panels) == {"rtt", "offset", "histogram"}
    assert len([line for line in panels["rtt"].iter(namespace + "line") if line.get("class") == "lost"]) >= 1
    assert len(list(panels["offset"].iter(namespace + "circle"))) >= 20
    assert [line for line in panels["offset"].iter(namespace + "line") if line.get("class") == "drift"]
    assert sum(1 for _ in panels["histogram"].iter(namespace + "rect")) >= 2


def test_a_long_run_is_plotted_from_a_bounded_timeline():
    timeline = utc.Timeline(max_bins=16, width_ns=SECOND_NS // 100)
    for index in range(10000):
        item = timeline.bin_at(index * SECOND_NS // 1000)  # ten seconds, a probe a millisecond
        item.sent += 1
    assert len(timeline.bins) <= 16 and sum(item.sent for item in timeline.bins) == 10000
    assert timeline.width_ns >= 10 * SECOND_NS // 16


# --- flat memory -----------------------------------------------------------------------------

def feed(recorder, first, count):
    for seq in range(first, first + count):
        sample = utc.Sample(seq, 10 ** 12 + seq)
        recorder.send(sample)
        sample.send_mono_ns = recorder.started_mono_ns + seq * 1_000_000
        sample.t1 = sample.t1_user = T0 + seq * 1_000_000
        t2 = sample.t1 + 20_000 + (seq % 7) * 1000
        reply = b'[%d, "The time is now", {"seq": %d, "ts": "kernel", "t2": %d, "t3": %d}]' % (
            sample.request_id, seq, t2, t2 + 5000)
        t4 = sample.t1 + 45_000 + (seq % 13) * 1000
        recorder.receive(reply, utc.Arrival(None, t4, t4, sample.send_mono_ns + 45_000 + (seq % 13) * 1000))


def test_memory_stays_flat_however_many_probes(monkeypatch):
    monkeypatch.setattr(utc, "RECENT_PROBES", 100)  # a smaller table of recent probes fills sooner
    monkeypatch.setattr(utc, "EXACT_VALUES", 200)  # and a smaller budget of exact values
    recorder = utc.Recorder("h:1", "h", utc.RunSpec(count=0, keep_samples=100))
    # The per-run timeline fills its bins, then merges them into half as many twice as wide:
    # memory measured just after a merge, at the same point of that saw-tooth each time.
    merge = utc.TIMELINE_BINS * utc.TIMELINE_FIRST_WIDTH_NS // 1_000_000  # in probes, a ms apart
    tracemalloc.start()
    try:
        feed(recorder, 0, merge + 40)  # the tables of recent probes are full: from here on, a steady state
        after_few = tracemalloc.get_traced_memory()[0]
        feed(recorder, merge + 40, merge + 40)  # to just after the next merge
        after_many = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert recorder.totals.received == 2 * (merge + 40) and len(recorder.samples) == 100
    assert after_many - after_few < 8 * 1024  # twice the probes, not 3 bytes a probe more
    summary = utc.summarize(recorder)
    assert summary["rtt_ms"]["median"] == pytest.approx(0.046, rel=0.05)
    assert math.isfinite(summary["drift_ppm"])
