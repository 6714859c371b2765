"""The prober and `client --measure-delay`: counts, offsets and outputs on loopback."""

import csv
import json

import pytest

import udp_timecheck as utc
from conftest import SECOND_NS, FakeClock, free_udp_port, ipv6_loopback_available, probe, silent_port


def drop(*indices):
    return lambda index, data: [] if index in indices else [(0.0, data)]


def statuses(measurement):
    return [sample.status for sample in measurement.samples]


def test_measurement_against_our_server(start_server):
    server = start_server()
    measurement = probe(server.address, count=20)
    assert statuses(measurement) == [utc.OK] * 20
    summary = utc.summarize(measurement)
    assert summary["sent"] == 20 and summary["received"] == 20 and summary["loss_pct"] == 0
    assert summary["duplicates"] == summary["late"] == summary["mismatched"] == summary["forged"] == 0
    rtt = summary["rtt_ms"]
    assert 0 < rtt["min"] <= rtt["median"] <= rtt["p90"] <= rtt["p99"] <= rtt["max"]
    assert summary["server_proc_ms"] is not None
    # same machine, same clock: the true offset is 0, within the reported error bound
    assert abs(summary["offset_ms"]) <= summary["offset_err_ms"] + 0.01
    for sample in measurement.samples:  # no reply is larger than its request
        assert 0 < sample.reply_size <= sample.request_size
    assert measurement.samples[0].request_size > measurement.request_size  # it asked for the clock


@pytest.mark.parametrize("shift_s", [5.0, -3600.0])
def test_shifted_server_clock_gives_that_offset(start_server, shift_s):
    shift_ns = int(shift_s * SECOND_NS)
    server = start_server(wall_clock=lambda: utc.wall_ns() + shift_ns)
    summary = utc.summarize(probe(server.address, count=20))
    assert summary["received"] == 20
    assert abs(summary["offset_ms"] - shift_s * 1000) <= summary["offset_err_ms"] + 0.01


def test_isochronous_probes_all_answered(start_server, capsys):
    server = start_server(log=None)
    assert utc.main(["client", *map(str, server.address), "-i", "0.01", "-c", "100", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sent"] == 100 and summary["received"] == 100 and summary["lost"] == 0
    assert [sample["seq"] for sample in summary["samples"]] == list(range(100))


def test_lost_count_equals_replies_dropped_isochronous(start_server, relay):
    server = start_server()
    dropped = {3, 10, 20, 21, 39}
    hop = relay(server.address, drop(*dropped))
    measurement = probe(hop.address, count=40, interval=0.01, timeout=0.5)
    assert measurement.ended_with(utc.LOST) == len(dropped)
    assert measurement.totals.received == 40 - len(dropped)
    assert {sample.seq for sample in measurement.samples if sample.status == utc.LOST} == dropped
    assert measurement.totals.late == measurement.totals.duplicates == measurement.totals.mismatched == 0


def test_lost_count_equals_replies_dropped_one_at_a_time(start_server, relay):
    server = start_server()
    hop = relay(server.address, drop(2))
    measurement = probe(hop.address, count=6, timeout=0.5)
    assert statuses(measurement) == [utc.OK, utc.OK, utc.LOST, utc.OK, utc.OK, utc.OK]


def test_duplicates_are_counted_not_received_twice(start_server, relay):
    server = start_server()
    hop = relay(server.address, lambda index, data: [(0.0, data)] * (2 if index in (1, 4) else 1))
    measurement = probe(hop.address, count=8, interval=0.01, timeout=2)
    assert measurement.totals.received == 8 and measurement.totals.duplicates == 2


def test_late_reply_is_counted_and_the_probe_stays_lost(start_server, relay):
    server = start_server()
    hop = relay(server.address, lambda index, data: [(0.8 if index == 2 else 0.0, data)])
    measurement = probe(hop.address, count=30, interval=0.05, timeout=0.3)
    assert measurement.samples[2].status == utc.LOST
    assert measurement.totals.late == 1 and measurement.ended_with(utc.LOST) == 1
    assert measurement.totals.received == 29


def test_lying_server_is_caught(start_server, capsys):
    server = start_server(faulty=1.0)
    measurement = probe(server.address, count=5, interval=0.01, timeout=0.2)
    assert statuses(measurement) == [utc.MISMATCHED] * 5 and measurement.totals.mismatched == 5
    assert utc.main(["client", *map(str, server.address), "-W", "0.2"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "Server is a liar!\n"
    assert "liar" in captured.err


def test_garbage_reply_is_not_an_answer(start_server, relay):
    server = start_server()
    hop = relay(server.address, lambda index, data: [(0.0, b"\x00garbage" if index == 1 else data)])
    measurement = probe(hop.address, count=3, interval=0.01, timeout=0.5)
    assert statuses(measurement) == [utc.OK, utc.LOST, utc.OK]
    assert measurement.totals.malformed == 1 and measurement.totals.mismatched == 0  # garbage, not a liar


def test_size_pads_both_directions(start_server, relay):
    server = start_server()
    hop = relay(server.address)
    measurement = probe(hop.address, count=3, size=1400)
    assert [len(data) for data in hop.requests] == [1400] * 3
    assert [sample.reply_size for sample in measurement.samples] == [1400] * 3


def test_the_largest_udp_datagram_both_ways(start_server, relay):
    server = start_server()
    hop = relay(server.address)
    measurement = probe(hop.address, count=2, size=65507)
    assert measurement.totals.received == 2
    assert [len(data) for data in hop.requests] == [65507] * 2
    assert [len(data) for data in hop.replies] == [65507] * 2


@pytest.mark.skipif(not ipv6_loopback_available(), reason="this machine has no ::1")
@pytest.mark.parametrize("bind", ["::1", "::"])
def test_measurement_over_ipv6(start_server, bind, capsys):
    server = start_server(host=bind)
    port = str(server.address[1])
    assert utc.main(["client", "::1", port, "-c", "5", "-i", "0", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("UDP-TIMECHECK [::1]:{} (::1): 5 probes".format(port))
    assert "5 probes sent, 5 received" in out


def test_json_has_every_key_and_null_for_absent_values(start_server, relay, capsys):
    server = start_server()
    hop = relay(server.address, drop(1))
    assert utc.main(["client", *map(str, hop.address), "--json", "-c", "3", "-i", "0", "-W", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("target", "sent", "received", "lost", "loss_pct", "duplicates", "late", "mismatched",
                "forged", "rtt_ms", "jitter_ms", "server_proc_ms", "offset_ms", "offset_err_ms", "samples"):
        assert key in summary
    assert set(summary["rtt_ms"]) == {"min", "avg", "median", "p90", "p99", "max", "mdev"}
    assert summary["lost"] == 1 and summary["loss_pct"] == pytest.approx(100 / 3, abs=0.001)
    lost = summary["samples"][1]
    assert lost["status"] == "lost" and lost["rtt_ms"] is None and lost["offset_ms"] is None
    for sample in summary["samples"]:
        assert {"seq", "id", "status", "rtt_ms", "offset_ms"} <= set(sample)


def test_json_with_no_reply_at_all(capsys):
    with silent_port() as sock:
        assert utc.main(["client", *map(str, sock.getsockname()), "--json", "-c", "2", "-i", "0",
                         "-W", "0.2"]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["received"] == 0 and summary["offset_ms"] is None and summary["jitter_ms"] is None
    assert all(value is None for value in summary["rtt_ms"].values())
    assert "no reply" in captured.err


def test_csv_has_a_header_and_a_row_per_probe(start_server, tmp_path, capsys):
    server = start_server()
    path = tmp_path / "run.csv"
    assert utc.main(["client", *map(str, server.address), "-q", "-c", "5", "-i", "0",
                     "--csv", str(path)]) == 0
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["seq"] for row in rows] == ["0", "1", "2", "3", "4"]
    assert all(row["status"] == "ok" and float(row["rtt_ms"]) > 0 for row in rows)
    assert "rtt min/avg/max/mdev" in capsys.readouterr().out


def test_human_output_lines_and_summary(start_server, capsys):
    server = start_server(wall_clock=FakeClock(utc.wall_ns() + 2 * SECOND_NS))
    assert utc.main(["client", *map(str, server.address), "--measure-delay", "-c", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("UDP-TIMECHECK 127.0.0.1:{} (127.0.0.1): 4 probes of ".format(server.address[1]))
    assert [line.split(": seq=")[1].split()[0] for line in out[1:5]] == ["0", "1", "2", "3"]
    assert "4 probes sent, 4 received, 0% loss, 0 duplicates, 0 late, 0 reordered, 0 mismatched, " \
           "0 forged" in out
    assert any(line.startswith("rtt median/p90/p99 = ") for line in out)
    assert any(line.startswith("server clock offset +") for line in out)
    assert "rtt histogram:" in out


def test_quiet_prints_only_the_summary(start_server, capsys):
    server = start_server()
    assert utc.main(["client", *map(str, server.address), "-q", "-c", "5", "-i", "0"]) == 0
    out = capsys.readouterr().out
    assert "seq=" not in out and "5 probes sent, 5 received" in out


def test_silent_server_ends_within_the_timeout_with_exit_1(capsys):
    with silent_port() as sock:
        assert utc.main(["client", *map(str, sock.getsockname()), "-W", "0.3"]) == 1
    err = capsys.readouterr().err
    assert "no reply from 127.0.0.1:" in err and "within 0.3 s" in err


def test_closed_port_is_reported_as_refused(capsys):
    port = free_udp_port()
    assert utc.main(["client", "127.0.0.1", str(port), "--measure-delay", "-c", "1000"]) == 1
    captured = capsys.readouterr()
    assert "connection refused" in captured.err
    assert "1 probe sent, 0 received" in captured.out  # it stopped at the first refusal, and says why
    assert "stopped after 1 of 1000 probes: connection refused" in captured.out
