"""Clock trust: SNTP against a real chronyd and a fake NTP server, --reference, kernel clock state."""

import json
import socket
import struct
import subprocess

import pytest

import udp_timecheck as utc
from conftest import (MS_NS, SECOND_NS, FakeNtpServer, free_udp_port, ns_to_ntp, require_programs, wait_for,
                      wall_clock_shifted_ns)


# --- a real NTP server: chronyd on loopback, never touching the clock (-x) --------------------

def answers(port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.sendto(utc.encode_ntp_request(12345), ("127.0.0.1", port))
        try:
            return len(sock.recv(512)) >= 48
        except socket.timeout:
            return False


@pytest.fixture(scope="module")
def chronyd(tmp_path_factory):
    """chronyd as an NTP server on 127.0.0.1, stratum 8 from its own clock; its port."""
    require_programs("chronyd")
    tmp = tmp_path_factory.mktemp("chrony")
    port = free_udp_port()
    config = tmp / "chrony.conf"
    config.write_text("port {port}\nbindaddress 127.0.0.1\nallow 127.0.0.1\nlocal stratum 8\ncmdport 0\n"
                      "pidfile {tmp}/chronyd.pid\ndriftfile {tmp}/drift\n".format(port=port, tmp=tmp))
    process = subprocess.Popen(["chronyd", "-d", "-x", "-f", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, universal_newlines=True)
    try:
        wait_for(lambda: process.poll() is not None or answers(port), timeout=20)
        assert process.poll() is None, process.stdout.read()
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_sntp_against_chronyd_gives_stratum_8_and_no_offset(chronyd, capsys):
    assert utc.main(["sntp", "127.0.0.1", str(chronyd), "-c", "4", "-i", "0.05", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["received"] == 4 and summary["stratum"] == 8 and summary["leap"] == 0
    assert summary["refid"] == "127.127.1.1"  # chronyd's local reference
    assert abs(summary["offset_ms"]) <= summary["offset_err_ms"] + 0.001  # one clock: the truth is 0
    assert summary["delay_ms"] > 0 and summary["root_dispersion_ms"] >= 0
    for key in ("offset_ms", "offset_err_ms", "delay_ms", "stratum", "refid", "leap", "root_delay_ms",
                "root_dispersion_ms", "samples"):
        assert key in summary


def test_sntp_text_against_chronyd(chronyd, capsys):
    assert utc.main(["sntp", "127.0.0.1", str(chronyd), "-c", "2", "-i", "0.05"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("SNTP 127.0.0.1:{} (127.0.0.1): 2 queries".format(chronyd))
    assert " stratum 8 refid 127.127.1.1 leap 0 " in out[1]
    assert any(line.startswith("server: stratum 8, reference 127.127.1.1, leap 0") for line in out)


def test_client_reference_against_chronyd(chronyd, start_server, capsys):
    server = start_server(log=None)
    argv = ["client", *map(str, server.address[:2]), "-c", "20", "-i", "0",
            "--reference", "127.0.0.1:{}".format(chronyd)]
    assert utc.main(argv + ["--json"]) == 0
    reference = json.loads(capsys.readouterr().out)["reference"]
    assert reference["host"] == "127.0.0.1:{}".format(chronyd) and reference["stratum"] == 8
    assert abs(reference["local_offset_ms"]) <= reference["local_offset_err_ms"] + 0.001
    assert abs(reference["server_offset_ms"]) <= reference["server_offset_err_ms"] + 0.001
    assert utc.main(argv + ["-q"]) == 0
    out = capsys.readouterr().out
    assert "verdict: both clocks agree with the reference, within their error bounds" in out


@pytest.mark.parametrize("shift_ms", [2500.0, -0.75, -3600 * 1000.0])
def test_sntp_against_a_shifted_server_gives_its_offset(shift_ms, capsys):
    with FakeNtpServer(shift_ns=int(shift_ms * MS_NS)) as server:
        assert utc.main(["sntp", "127.0.0.1", str(server.port), "-c", "3", "-i", "0.05", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert abs(summary["offset_ms"] - shift_ms) <= summary["offset_err_ms"] + 0.01
    assert summary["stratum"] == 1 and summary["refid"] == "GPS"
    assert summary["root_delay_ms"] == pytest.approx(250.0)  # 1/4 s, 16.16 fixed point
    assert summary["root_dispersion_ms"] == pytest.approx(62.5)


@pytest.mark.parametrize("code, meaning", [("RATE", "RATE: ask less often"), ("DENY", "DENY: access refused"),
                                           ("RSTR", "RSTR: access refused"),
                                           ("XYZZ", "a code RFC 5905 does not name")])
def test_a_kiss_of_death_stops_the_run_and_says_what_its_code_means(code, meaning, capsys):
    with FakeNtpServer(kiss=code) as server:
        assert utc.main(["sntp", "127.0.0.1", str(server.port), "-c", "5", "-i", "0.05"]) == 1
        queries = len(server.received)
    captured = capsys.readouterr()
    assert queries == 1  # it stopped at the first kiss
    assert "seq=0: kiss-o'-death {}".format(code) in captured.out
    assert "sent a kiss-o'-death {}: it asks this client to stop ({})".format(code, meaning) in captured.err
    assert code == "RATE" or "less often" not in captured.err


def test_a_wrong_origin_is_not_an_answer(capsys):
    with FakeNtpServer(wrong_origin=True) as server:
        assert utc.main(["sntp", "127.0.0.1", str(server.port), "-c", "2", "-i", "0.05", "-W", "0.3",
                         "--json"]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["received"] == 0 and summary["mismatched"] == 2 and summary["offset_ms"] is None
    assert "echo no query's origin timestamp: stale, or forged" in captured.err


@pytest.mark.parametrize("changes, why", [
    ({"leap": 3}, "the server is not synchronised (leap 3, stratum 1)"),
    ({"stratum": 16}, "the server is not synchronised (leap 0, stratum 16)"),
    ({"version": 2}, "NTP version 2"),
    ({"zero_transmit": True}, "no transmit time"),
    ({"zero_receive": True}, "no receive time"),  # and what RFC 5905 refuses besides
    ({"root": (0, 0xFFFFFFFF)}, "the server is not synchronised (root distance 65536.000 s, above 1.5 s)"),
    ({"root": (1 << 16, 70000)}, "the server is not synchronised (root distance 1.568 s, above 1.5 s)"),
])
def test_an_unusable_reply_is_reported_and_not_used(changes, why, capsys):
    with FakeNtpServer(**changes) as server:
        assert utc.main(["sntp", "127.0.0.1", str(server.port), "-c", "2", "-i", "0.05", "--json"]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["received"] == 0 and summary["offset_ms"] is None and summary["problems"] == {why: 2}
    assert "no usable answer from 127.0.0.1:{}: {}".format(server.port, why) in captured.err


# --- three clocks, each shifted by a known amount -----------------------------------------------

@pytest.mark.parametrize("local_ms, server_ms, reference_ms", [
    (0, 40, 0),     # the server is off
    (-30, 0, 0),    # this machine is off
    (25, 25, 0),    # both are off, alike: between the two, no offset at all
    (0, 0, 15),     # the reference is ahead of both: both are off, behind it
    (5, 5, 5),      # all three agree
])
def test_which_clock_is_off_and_by_how_much(start_server, quick_reference_burst, local_ms, server_ms,
                                            reference_ms):
    server = start_server(wall_clock=wall_clock_shifted_ns(server_ms * MS_NS), log=None)
    # A reference that says it is within 15 us of UTC: its root distance is part of every bound.
    with FakeNtpServer(shift_ns=int(reference_ms * MS_NS), root=(0, 1)) as ntp:
        local_clock = wall_clock_shifted_ns(local_ms * MS_NS)
        reference = utc.Reference("127.0.0.1", ntp.port, wall_clock=local_clock).start()
        summary = utc.summarize(utc.Prober(*server.address[:2], count=20, wall_clock=local_clock).run())
        reference.stop(finish_burst=True)
    result = reference.result(summary)
    for whose, expected in (("local", local_ms - reference_ms), ("server", server_ms - reference_ms)):
        error = abs(result[whose + "_offset_ms"] - expected)
        assert error <= result[whose + "_offset_err_ms"] + 0.01
    verdict = utc.format_reference(result)[-1]
    assert verdict.startswith("verdict: ")
    for whose, off_ms in (("this machine's", local_ms - reference_ms),
                          ("the server's", server_ms - reference_ms)):
        said = "{} clock is off by {}".format(whose, "+" if off_ms > 0 else "-")
        assert (said in verdict) == (off_ms != 0), verdict
    if local_ms == server_ms == reference_ms:
        assert verdict == "verdict: both clocks agree with the reference, within their error bounds"


def test_compare_clocks_adds_the_bounds():
    expected = {"local_offset_ms": 3.0, "local_offset_err_ms": 0.25,  # this machine 3 ms ahead of it
                "server_offset_ms": 15.0, "server_offset_err_ms": 0.75}  # the server 12 ms ahead of us
    assert utc.compare_clocks(12.0, 0.5, -3.0, 0.25) == expected


def test_a_reference_with_no_answer_says_so(quick_reference_burst):
    with FakeNtpServer(leap=3) as ntp:
        reference = utc.Reference("127.0.0.1", ntp.port).start()
        reference.stop(finish_burst=True)
    result = reference.result({"offset_ms": 1.0, "offset_err_ms": 0.1})
    assert result["local_offset_ms"] is None and result["server_offset_ms"] is None
    assert utc.format_reference(result) == ["reference 127.0.0.1:{}: no usable answer (4 x the server is "
                                            "not synchronised (leap 3, stratum 1))".format(ntp.port)]


# --- the kernels' own view of their clocks ------------------------------------------------------

def test_this_kernels_clock_state():
    state = utc.read_clock_state()
    if utc.LINUX or utc.BSD:  # adjtimex, or ntp_adjtime on macOS and the BSDs
        assert state.synchronized in (True, False)
        assert state.maxerror_ns >= 0 and state.esterror_ns >= 0 and isinstance(state.freq_ppb, int)
        assert state.source or not utc.LINUX  # tsc, kvm-clock, ...: Linux names it
    else:  # Windows
        assert state == utc.UNKNOWN_CLOCK


def test_both_kernels_states_in_the_json_and_the_text(start_server, capsys):
    server = start_server(log=None)
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "3", "-i", "0", "--json"]) == 0
    clock = json.loads(capsys.readouterr().out)["clock"]
    local = utc.read_clock_state()
    assert clock["local"]["synchronized"] == local.synchronized == clock["server"]["synchronized"]
    for end in ("local", "server"):
        assert set(clock[end]) == {"synchronized", "maxerror_ms", "esterror_ms", "freq_ppm", "source"}
    assert clock["consistent"] in (True, None)  # one machine, one clock: what the kernel claims holds
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "3", "-i", "0", "-q"]) == 0
    out = capsys.readouterr().out
    if local.synchronized is None:  # Windows: neither end can tell
        assert "server clock: unknown (no kernel clock state: the server did not say)" in out
        assert "this machine's clock: unknown (no kernel clock state here)" in out
    else:
        words = "synchronised" if local.synchronized else "NOT synchronised (the kernel says so)"
        assert "server clock: " + words in out and "this machine's clock: " + words in out


def test_the_server_sends_its_clock_only_when_asked_and_only_if_it_fits(start_server):
    with utc.TimeServer("127.0.0.1", 0) as server:
        asked = utc.encode_request(7, "x", 0, ask_clock_state=True,
                                   pad_to=utc.min_request_size(1, clock_state=True))
        reply = utc.decode_message(server.respond(asked))
        assert "clock" in reply.ext and utc.decode_clock_state(reply.ext["clock"]) is not None
        not_asked = utc.decode_message(server.respond(utc.encode_request(8, "x", 0, pad_to=300)))
        assert "clock" not in not_asked.ext
        too_small = utc.encode_request(9, "x", 0, ask_clock_state=True, pad_to=utc.min_request_size(1))
        reply = server.respond(too_small)
        assert reply is not None and len(reply) <= len(too_small)
        assert "clock" not in utc.decode_message(reply).ext  # answered, without it


def test_a_clock_state_round_trips_and_fits_its_room():
    for state in (utc.ClockState(True, 1_200_000, 100_000, -12345, "kvm-clock"),
                  utc.ClockState(False, 16 * SECOND_NS, 16 * SECOND_NS, 500 * 1000, "tsc"),
                  utc.ClockState(None, None, None, None, None),
                  utc.ClockState(False, 10 ** 30, -10 ** 30, 10 ** 30, "a\x1b[2Jvery long source name " * 3)):
        encoded = utc.encode_clock_state(state)
        assert len(encoded) <= utc.CLOCK_STATE_MAX
        decoded = utc.decode_clock_state(json.loads(b"{" + encoded + b"}")["clock"])
        assert decoded.synchronized == state.synchronized
        assert "\x1b" not in (decoded.source or "")
    assert utc.decode_clock_state({"sync": "yes"}) is None
    assert utc.decode_clock_state({"sync": True, "maxerr_us": 1.5}) is None


def test_consistency_is_the_offset_within_its_bound_and_both_max_errors():
    local, server = utc.ClockState(True, 2 * MS_NS, 0, 0, "tsc"), utc.ClockState(True, 3 * MS_NS, 0, 0, "tsc")
    assert utc.clocks_consistent(5.9, 1.0, local, server) is True   # 5.9 <= 1 + 2 + 3
    assert utc.clocks_consistent(-6.1, 1.0, local, server) is False
    assert utc.clocks_consistent(1.0, 1.0, local, None) is None


# --- NTP on the wire -----------------------------------------------------------------------------

@pytest.mark.parametrize("unix_s", [0, 1_764_000_000, 2_085_978_495, 2_085_978_497, 2_200_000_000])
def test_ntp_times_across_the_2036_wrap(unix_s):
    ns = unix_s * SECOND_NS + 123_456_789
    assert abs(utc.ntp_to_ns(ns_to_ntp(ns), ns + 5 * SECOND_NS) - ns) <= 1


def test_short_or_strange_packets_are_refused():
    with pytest.raises(utc.WireError):
        utc.decode_ntp(b"\x24" * 47, utc.wall_ns())
    client_mode = struct.pack("!BBbbII4sQQQQ", 4 << 3 | 3, 2, 0, 0, 0, 0, b"GPS\0", 0, 1, 2, 3)
    reply = utc.decode_ntp(client_mode, utc.wall_ns())
    assert utc.ntp_problem(reply) == "mode 3, not a server's reply"
    assert utc.describe_refid(2, bytes([192, 0, 2, 1])) == "192.0.2.1"
    assert utc.describe_refid(1, b"PPS\0") == "PPS"
