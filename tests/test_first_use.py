"""What a new user meets first: messages, help, names, outputs, and exact formatting."""

import csv
import io
import json
import re
import signal
import socket

import pytest

import udp_timecheck as utc
from conftest import (POSIX_ONLY, SECOND_NS, T0_NS, US_NS, answer_probe, cli, free_udp_port,
                      ipv6_loopback_available, new_recorder, send_probe, silent_port)


# --- exact output on fixed inputs, as timeit's tests do ----------------------------------

def answered(seq, rtt_us, offset_us):
    recorder = new_recorder()
    sample = send_probe(recorder, seq)
    answer_probe(recorder, sample, rtt_us * US_NS, offset_us * US_NS)
    return sample


def lost(seq, reason):
    sample = utc.Sample(seq, 1000 + seq)
    sample.status, sample.reason = utc.LOST, reason
    return sample


LOCAL_CLOCK = utc.ClockState(True, 1_200_000, 100_000, -12345, "kvm-clock")


def finished(recorder, interrupted=False):
    recorder.finish(interrupted, utc.INTERRUPTED if interrupted else utc.TIMED_OUT)
    recorder.duration_ns = 3 * SECOND_NS  # the run took a moment; say it took three seconds
    recorder.local_clock_state = LOCAL_CLOCK  # and this machine's kernel said this, whatever this one says
    return recorder


def test_format_sample_exactly():
    assert utc.format_sample(answered(0, 40, 0), "127.0.0.1:1060", 1.0) == (
        "105 bytes from 127.0.0.1:1060: seq=0 rtt=0.040 ms offset=+0.000 ms")
    assert utc.format_sample(answered(1, 40, -3), "h:1", 1.0) == (
        "105 bytes from h:1: seq=1 rtt=0.040 ms offset=-0.003 ms")
    assert utc.format_sample(lost(2, utc.TIMED_OUT), "h:1", 0.5) == "seq=2: lost, no reply within 0.5 s"
    assert utc.format_sample(lost(3, utc.REFUSED), "h:1", 1.0) == (
        "seq=3: refused: nothing listens on that port (ICMP port unreachable)")
    assert utc.format_sample(lost(4, utc.FORGED), "h:1", 1.0) == (
        "seq=4: lost: its only reply failed authentication (forged)")
    assert utc.format_sample(lost(5, utc.ECHOED), "h:1", 1.0) == (
        "seq=5: lost: the reply was its own request, echoed back")
    assert utc.format_sample(lost(6, utc.INTERRUPTED), "h:1", 1.0) == "seq=6: interrupted before its reply"
    assert utc.format_sample(lost(7, utc.DEADLINE), "h:1", 1.0) == "seq=7: cut off by the deadline"


def test_format_summary_exactly():
    recorder = new_recorder()
    first, second, third = (send_probe(recorder, seq) for seq in range(3))
    reply = answer_probe(recorder, first, 40 * US_NS, 0)
    answer_probe(recorder, second, 60 * US_NS, 1 * US_NS)
    recorder.receive(reply, utc.Arrival(None, T0_NS + 50_000, T0_NS + 50_000, 45_000))  # the network's copy
    lines = utc.format_summary(utc.summarize(finished(recorder, interrupted=True)))
    assert lines[:17] == [
        "",
        "--- 127.0.0.1:1060 udp-timecheck statistics ---",
        "3 probes sent, 2 received, 33.333% loss, 1 duplicate, 0 late, 0 reordered, 0 mismatched, 0 forged",
        "interrupted after 3 of 5 probes (3.0 s)",
        "rtt min/avg/max/mdev = 40.0/50.0/60.0/10.0 us",  # all under a millisecond: in us
        "rtt median/p90/p99 = 50.0/58.0/59.8 us",  # exact: numpy.percentile([40, 60], [50, 90, 99])
        "jitter 20.0 us",
        "ipdv out median/p99/max = 11.0/11.0/11.0 us, back 9.0/9.0/9.0 us",
        "queueing above each direction's least delay, median: out 5.5 us, back 4.5 us",  # 0 and 11, 9 and 0
        "one-way delays: not given (the server's clock state is unknown); the queueing above needs no "
        "synchronised clocks",
        "server processing median 5.0 us: from its kernel receiving a request to its reply, left out of "
        "each rtt",
        "server clock offset +0.0 us \u00b1 20.0 us (server level with this machine within "
        "\u00b1 20.0 us; from seq 0, the lowest-rtt probe)",  # the rtt's unit: one unit a summary
        "server clock: unknown (no kernel clock state: the server did not say)",
        "this machine's clock: synchronised, max error 1200.0 us, estimated error 100.0 us, frequency "
        "correction -12.345 ppm (kvm-clock)",
        "timestamps: user-space (both ends)",
        "rtt histogram:",
        # two RTTs: one row, from the fastest to the slowest, never beyond them
        "       40.0 -      60.0 us |######################################## 2",
    ]
    assert len(lines) == 17 and third.reason == utc.INTERRUPTED


def drift_line(rtt_us, ppm):
    """The drift line of twelve probes a second apart, the server 2 ms ahead and ppm fast."""
    recorder = new_recorder()
    for seq in range(12):
        answer_probe(recorder, send_probe(recorder, seq), rtt_us * US_NS, (2000 + seq * ppm) * US_NS)
    lines = utc.format_summary(utc.summarize(finished(recorder)))
    return lines, [line for line in lines if line.startswith("clock drift ")]


def test_format_summary_in_milliseconds_with_a_drift():
    lines, drift = drift_line(1500, 1000)
    assert lines[3:6] == ["rtt min/avg/max/mdev = 1.500/1.500/1.500/0.000 ms",
                          "rtt median/p90/p99 = 1.500/1.500/1.500 ms", "jitter 0.000 ms"]
    # Each offset is known within 0.75 ms, half its RTT: over the 11 s between the first and the
    # last, that alone leaves 1.5 ms / 11 s = 136.364 ppm open.  The line at 3 s (2 ms, 1 ms/s for
    # 3 s) is the sum of the offsets at 0..11 s weighted 1/12 - 2.5 * (t - 5.5) / 143: the last
    # weight is -0.0128, the others' sum 1.0128, so the bound is 0.75 ms * 1.0256 = 0.769 ms.
    assert drift == ["clock drift +1000.000 ppm \u00b1 136.364 ppm (the server's clock runs faster than "
                     "this machine's); offset at the end +5.000 ms \u00b1 0.769 ms"]
    assert lines[-1].endswith(" ms |" + "#" * 40 + " 12")


def units_of(line):
    """The time units a line's figures are in."""
    return set(re.findall(r"\d (us|ms)\b", line))


@pytest.mark.parametrize("rtt_us", [40, 1500])
def test_every_time_in_a_summary_is_in_the_rtts_unit(rtt_us):
    """One unit a summary, chosen from the RTTs: the clock lines follow the rtt line's."""
    lines, _ = drift_line(rtt_us, 10)
    summary_lines = [line for line in lines if not re.match(r" +[\d.]+ - ", line)]  # the histogram's own
    (rtt_unit,) = units_of(next(line for line in lines if line.startswith("rtt min/")))
    assert rtt_unit == ("us" if rtt_us < 1000 else "ms")
    assert all(units_of(line) <= {rtt_unit} for line in summary_lines), summary_lines
    assert sum(bool(units_of(line)) for line in summary_lines) >= 6


def test_a_drift_within_what_the_bounds_leave_open_is_not_claimed():
    """100 ppm over 11 s is 1.1 ms, well inside 40 ms round trips: no faster, no slower.  The offset's
    bound: 20 ms, half the RTT, times 1.0256 (see the test above)."""
    _, drift = drift_line(40_000, 100)
    assert drift == ["clock drift +100.000 ppm \u00b1 3636.364 ppm (the server's clock runs no faster or "
                     "slower than this machine's); offset at the end +2.300 ms \u00b1 20.513 ms"]


def test_format_counts_in_the_singular_and_when_stopped():
    recorder = new_recorder()
    recorder.port_unreachable(send_probe(recorder, 0))
    assert utc.format_counts(utc.summarize(finished(recorder))) == [
        "1 probe sent, 0 received, 100% loss, 0 duplicates, 0 late, 0 reordered, 0 mismatched, 0 forged",
        "1 refused by the server's host, 0 could not be sent",
        "stopped after 1 of 5 probes: connection refused, nothing listens on that port"]


def interrupted(recorder, sample):
    finished(recorder, interrupted=True)


def refused(recorder, sample):
    recorder.port_unreachable(sample)


def echoed(recorder, sample):
    recorder.receive(sample.request, utc.Arrival(None, T0_NS, T0_NS, 0))
    recorder.receive(sample.request, utc.Arrival(None, T0_NS, T0_NS, 0))


def malformed(recorder, sample):
    for _ in range(3):
        recorder.receive(b"\x00 not json", utc.Arrival(None, T0_NS, T0_NS, 0))


def lied(recorder, sample):  # and nothing else came before its timeout
    answer_probe(recorder, sample, 40 * US_NS, 0, request_id=sample.request_id + 1)
    recorder.expire(sample.send_mono_ns + 2 * SECOND_NS)


def forged(recorder, sample):
    for _ in range(2):
        recorder.receive(utc.seal(b"another key", b"", b'[%d, "x", {"seq": 0}, "%s"]' % (
            sample.request_id, b"0" * 64)), (None, T0_NS, T0_NS, 0))


@pytest.mark.parametrize("event, expected", [
    (None, "no reply from 127.0.0.1:1060 within 1 s (is the server running, and is its UDP port open "
           "to you? A server started with a key answers only clients with that key)"),
    (interrupted, "interrupted after 3.0 s, before any reply from 127.0.0.1:1060"),
    (refused, "connection refused by 127.0.0.1:1060: no server is listening on that port"),
    (echoed, "127.0.0.1:1060 echoes requests back: it is an echo service, not a time server"),
    (malformed, "127.0.0.1:1060 sent 3 replies that are not udp-timecheck replies"),
    (lied, "the server is a liar: 1 probe got only a reply that did not match its request id"),
    (forged, "2 replies failed authentication (tampered with, replayed, or another key)"),
])
def test_failure_reason_exactly(event, expected):
    recorder = new_recorder(key=b"our key" if event is forged else None)
    sample = send_probe(recorder, 0)
    if event is not None:
        event(recorder, sample)
    if recorder.waiting:
        finished(recorder)
    assert utc.failure_reason(recorder, 1.0) == expected


def test_no_failure_with_a_valid_reply():
    recorder = new_recorder()
    answer_probe(recorder, send_probe(recorder, 0), 40 * US_NS, 0)
    assert utc.failure_reason(finished(recorder), 1.0) is None


def test_signed_and_plural():
    assert [utc.signed(value) for value in (-0.0004, 0.0, -0.0, 0.0123, -1.5)] == [
        "+0.000", "+0.000", "+0.000", "+0.012", "-1.500"]
    assert [utc.plural(count, "probe") for count in (0, 1, 2)] == ["0 probes", "1 probe", "2 probes"]


# --- the MACs, known answers from fixed bytes --------------------------------------------------

# Computed with openssl, not with this module:
#   printf 'udp-timecheck/1 request\n<the request, MAC zeroed>' |
#   openssl dgst -sha256 -hmac "known-answer key"
KEY = b"known-answer key"
ZEROED_REQUEST = b'[1234567890, "The time is 2026-01-01 00:00:00.000000", {"seq": 7}, "' + b"0" * 64 + b'"]'
KNOWN_REQUEST_MAC = b"9c58d3a2d34fffac97c76c44e61d5ffdd96bb7662e081fbd29d3733d14b09582"
ZEROED_REPLY = (b'[1234567890, "The time is 2026-01-01 00:00:00.000100", {"seq": 7, "ts": "kernel", '
                b'"t2": 1767225600000100000, "t3": 1767225600000105000}, "' + b"0" * 64 + b'"]')
KNOWN_REPLY_MAC = b"da59aa906b10758daed04800e68e1555bf7c8e080007ba5e6083a9d608b5b987"


def test_the_macs_are_the_documented_hmacs_known_answers():
    request = utc.seal(KEY, utc.REQUEST_LABEL, ZEROED_REQUEST)
    assert utc.mac_of_datagram(request) == KNOWN_REQUEST_MAC
    assert utc.mac_matches(KEY, utc.REQUEST_LABEL, request)
    context = utc.reply_context(b"1234567890", KNOWN_REQUEST_MAC)
    assert context == b"udp-timecheck/1 reply\n1234567890\n" + KNOWN_REQUEST_MAC + b"\n"
    reply = utc.seal(KEY, context, ZEROED_REPLY)
    assert utc.mac_of_datagram(reply) == KNOWN_REPLY_MAC
    assert utc.mac_matches(KEY, context, reply)
    assert not utc.mac_matches(KEY, utc.reply_context(b"1234567891", KNOWN_REQUEST_MAC), reply)


# --- help, names and options -------------------------------------------------------------------


def test_back_to_back_is_still_zero(start_server, capsys):
    server = start_server()
    assert utc.main(["client", *map(str, server.address[:2]), "-i", "0", "-c", "3", "-q"]) == 0
    assert "interval 0 s" in capsys.readouterr().out


# --- names, addresses, outputs -----------------------------------------------------------------

@pytest.mark.skipif(not ipv6_loopback_available(), reason="this machine has no ::1")
def test_a_bracketed_ipv6_address_works(start_server, capsys):
    server = start_server(host="::1")
    assert utc.main(["client", "[::1]", str(server.address[1]), "-c", "2", "-i", "0", "-q"]) == 0
    assert "UDP-TIMECHECK [::1]:{} (::1)".format(server.address[1]) in capsys.readouterr().out


def test_a_name_with_a_dead_address_first_is_tried_at_the_next(start_server, monkeypatch, capsys):
    """As 'localhost' can give ::1 first while the server listens on 127.0.0.1 only."""
    server = start_server()
    dead = free_udp_port()
    real = socket.getaddrinfo

    def two_addresses(host, port, *args):
        if host != "dual.test":
            return real(host, port, *args)
        return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("127.0.0.2", dead)),
                (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("127.0.0.1", server.address[1]))]

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    notes = []

    class Notes(utc.Events):
        def note(self, text):
            notes.append(text)
    measurement = utc.Prober("dual.test", server.address[1], Notes(), count=3).run()
    assert measurement.totals.received == 3 and measurement.address == "127.0.0.1"
    assert notes == ["nobody listens at 127.0.0.2:{} (connection refused); trying 127.0.0.1".format(dead)]


def test_csv_to_standard_output_keeps_it_clean(start_server, capsys):
    server = start_server()
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "4", "-i", "0", "--csv", "-"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert [row["seq"] for row in rows] == ["0", "1", "2", "3"] and all(row["status"] == "ok" for row in rows)
    assert "4 probes sent, 4 received" in captured.err  # the text went to stderr


def test_an_existing_csv_gets_a_note(start_server, tmp_path, capsys):
    server = start_server()
    path = tmp_path / "run.csv"
    path.write_text("an earlier run\n")
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "2", "-i", "0",
                     "-q", "--csv", str(path)]) == 0
    assert "note: {} exists; writing it anew".format(path) in capsys.readouterr().err
    assert path.read_text().startswith("seq,sent_at,id,status,")


def test_the_json_records_the_run(start_server, capsys):
    server = start_server()
    argv = ["client", *map(str, server.address[:2]), "-c", "3", "-i", "0.01", "-W", "0.5", "--json"]
    assert utc.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary)[:10] == ["version", "started_at", "duration_s", "count", "interval", "timeout",
                                  "size", "interleaved", "request_bytes", "keyed"]
    assert summary["version"] == utc.__version__ and summary["started_at"].endswith("Z")
    settings = (summary["count"], summary["interval"], summary["timeout"], summary["size"])
    assert settings == (3, 0.01, 0.5, None)
    assert summary["keyed"] is False and summary["timestamps"]["client"] in (utc.KERNEL, utc.USER)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_shows_on_a_terminal_only():
    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        progress = utc.Progress(stream, 200)
        progress.update(17)
        progress.clear()
    assert terminal.getvalue().startswith("\r17/200 probes, about ")
    assert pipe.getvalue() == ""


def test_lost_probes_say_why(start_server, capsys):
    port = free_udp_port()
    assert utc.main(["client", "127.0.0.1", str(port), "-c", "3", "-i", "0"]) == 1
    assert "seq=0: refused: nothing listens on that port" in capsys.readouterr().out
    server = start_server()
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "1", "-W", "0.2"], ) == 0
    capsys.readouterr()
    with pytest.MonkeyPatch().context() as patch:
        patch.setenv(utc.KEY_ENV, "a key the server does not have")
        assert utc.main(["client", *map(str, server.address[:2]), "-c", "1", "-W", "0.2"]) == 1
    assert "seq=0: lost: its only reply failed authentication (forged)" in capsys.readouterr().out


@POSIX_ONLY
def test_ctrl_c_in_a_one_shot_client_says_it_was_interrupted(processes):
    with silent_port() as sock:
        client = processes(cli("client", *sock.getsockname(), "-W", "5"))
        sock.recv(65535)  # the request is out: the client waits
        client.signal(signal.SIGINT)
        assert client.wait(timeout=10) == 1
    err = client.rest(client.stderr)
    assert len(err) == 1 and "interrupted after " in err[0] and "before any reply" in err[0]
    assert "within 5 s" not in err[0]
