"""Hardened edges: the metrics port under attack, out of file descriptors, a malicious server,
the NTP path, --reference through an outage, full disks, and what a key protects."""

import csv
import json
import os
import re
import resource
import socket
import sys
import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import udp_timecheck as utc
from conftest import (FakeNtpServer, MODULE, ROOT, cli, needs_linux_machine, require_programs, run,
                      wait_for)


# --- the metrics endpoint: bounded, whatever connects --------------------------------------------

def metrics_port(process):
    return int(process.stderr.expect(r"metrics at http://127\.0\.0\.1:(\d+)/metrics").group(1))


def proc_status(pid, field):
    with open("/proc/{}/status".format(pid)) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def scrape(port, timeout=5.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk


def udp_answers(port, count=5):
    return utc.Prober("127.0.0.1", port, count=count, interval=0.01, timeout=2).run().totals.received


@needs_linux_machine("reads the server's threads and memory from /proc")
def test_slowloris_and_huge_headers_cost_a_bounded_amount(processes):
    server = processes(cli("server", "127.0.0.1", "0", "-q", "--metrics", "127.0.0.1:0"))
    udp_port = int(server.stdout.expect(r"Server listening at 127\.0\.0\.1:(\d+)").group(1))
    port = metrics_port(server)
    pid = server.proc.pid
    threads, rss_kb = proc_status(pid, "Threads"), proc_status(pid, "VmRSS")
    attackers = []
    try:
        for index in range(150):  # slowloris: headers that never end; or far too many of them
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            attackers.append(sock)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n" + (b"X-Pad: " + b"a" * 1000 + b"\r\n") * (index % 12))
        assert proc_status(pid, "Threads") <= threads  # one thread serves them all: no thread each
        assert proc_status(pid, "VmRSS") - rss_kb < 20 * 1024
        assert udp_answers(udp_port) == 5  # UDP is served all along
        assert scrape(port).startswith(b"HTTP/1.1 200 OK")  # and a real scrape gets in
    finally:
        for sock in attackers:
            sock.close()
    text = scrape(port).decode()
    count = {result: int(number) for result, number in re.findall(
        r'udp_timecheck_metrics_connections_total\{result="(\w+)"\} (\d+)', text)}
    assert count["accepted"] >= 150 and count["too_large"] >= 1  # each cut off, one way or another
    assert count["evicted"] + count["too_large"] + count["timed_out"] >= 150 - utc.METRICS_CONNECTIONS


def test_a_connection_that_never_finishes_is_cut_off_at_the_deadline(monkeypatch):
    monkeypatch.setattr(utc, "METRICS_DEADLINE", 0.5)
    exporter = utc.MetricsServer("127.0.0.1", 0, utc.render_endpoint_metrics).start()
    try:
        with socket.create_connection(exporter.address[:2], timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and nothing more
            started = time.monotonic()
            assert sock.recv(100) == b""  # closed by the endpoint
            assert time.monotonic() - started < 5
        assert exporter.stats.timed_out == 1
    finally:
        exporter.close()


def test_a_connection_opened_ahead_waits_for_its_request_past_the_deadline(monkeypatch):
    """Prometheus opens a connection, leaves it idle, and sends its scrape on it later: the
    deadline counts from the request's first byte, so that connection is still there."""
    monkeypatch.setattr(utc, "METRICS_DEADLINE", 0.2)
    exporter = utc.MetricsServer("127.0.0.1", 0, utc.render_endpoint_metrics).start()
    try:
        with socket.create_connection(exporter.address[:2], timeout=10) as sock:
            idle = threading.Event()
            assert not idle.wait(1.0)  # idle five times the deadline: the behaviour under test
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")
        assert exporter.stats.timed_out == 0
    finally:
        exporter.close()


@needs_linux_machine("reads CPU time from /proc and limits file descriptors with setrlimit")
def test_out_of_file_descriptors_the_endpoint_backs_off_instead_of_spinning(processes):
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))  # noqa: E731
    server = processes(cli("server", "127.0.0.1", "0", "--metrics", "127.0.0.1:0"), preexec_fn=limit)
    udp_port = int(server.stdout.expect(r"Server listening at 127\.0\.0\.1:(\d+)").group(1))
    port = metrics_port(server)
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]  # beyond its fds
    try:
        server.stdout.expect(r"cannot accept a metrics connection \(Too many open files\)", timeout=15)
        with open("/proc/{}/stat".format(server.proc.pid)) as stat:
            before = sum(int(field) for field in stat.read().split()[13:15])
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            threading.Event().wait(0.1)
        with open("/proc/{}/stat".format(server.proc.pid)) as stat:
            after = sum(int(field) for field in stat.read().split()[13:15])
        assert (after - before) / os.sysconf("SC_CLK_TCK") < 0.25  # of 1 s: a spin would take it all
        assert udp_answers(udp_port) == 5
    finally:
        for sock in held:
            sock.close()


# --- a malicious server, or anyone on the path to an unkeyed client --------------------------------

def has_float(value):
    if isinstance(value, dict):
        return any(has_float(item) for item in value.values())
    if isinstance(value, list):
        return any(has_float(item) for item in value)
    return isinstance(value, float)


def clock_state_in_range(value):
    """An oracle written apart from the module: what the protocol allows in a reply's "clock"
    (and nowhere a number with a fraction: no datagram may carry one)."""
    if has_float(value) or not isinstance(value, dict) or value.get("sync", None) not in (True, False, None):
        return False
    for name in ("maxerr_us", "esterr_us", "freq_ppb"):
        number = value.get(name)
        if number is not None and (type(number) is not int or abs(number) > 10 ** 12):
            return False
    return value.get("source") is None or isinstance(value.get("source"), str)


NUMBERS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10 ** 400, max_value=10 ** 400),
                    st.integers(min_value=-10 ** 13, max_value=10 ** 13), st.text(max_size=5), st.floats())
CLOCKS = st.one_of(NUMBERS, st.lists(NUMBERS, max_size=3), st.dictionaries(
    st.sampled_from(["sync", "maxerr_us", "esterr_us", "freq_ppb", "source", "other"]), NUMBERS, max_size=6))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clock=CLOCKS)
def test_any_clock_state_a_server_sends_is_range_checked_never_a_crash(clock):
    from conftest import new_recorder, send_probe
    recorder = new_recorder(count=1)
    sample = send_probe(recorder, 0)
    t2 = sample.t1 + 20_000
    text = json.dumps([sample.request_id, "The time is now",
                       {"seq": 0, "ts": "user", "clock": clock, "t2": t2, "t3": t2 + 5000}], allow_nan=True)
    recorder.receive(text.encode(), utc.Arrival(None, t2 + 30_000, t2 + 30_000, sample.send_mono_ns + 35_000))
    recorder.finish(False, utc.TIMED_OUT)
    valid = (type(clock) is int and clock == 1) or clock_state_in_range(clock)
    assert recorder.totals.malformed == (0 if valid else 1)  # the branch taken is the one expected
    assert recorder.totals.received == (1 if valid else 0)
    summary = utc.summarize(recorder)
    json.dumps(summary)  # the JSON, the text and the metrics come out whatever the server said
    utc.format_summary(summary)
    utc.snapshot(recorder)


def test_a_clock_state_of_400_digits_is_malformed_and_the_monitor_lives_on(udp_peer, capsys):
    def answer(data):
        request_id, _, ext = json.loads(data.decode())[:3]
        now = utc.wall_ns()
        clock = '{"sync": true, "maxerr_us": %s}' % ("9" * 400)
        return ('[%d, "The time is now", {"seq": %d, "ts": "kernel", "clock": %s, "t2": %d, "t3": %d}]' % (
            request_id, ext["seq"], clock, now, now)).encode()
    peer = udp_peer(answer)
    code = utc.main(["client", "127.0.0.1", str(peer.port), "-c", "0", "-i", "0.05", "-w", "0.5",
                     "--report-every", "0.2", "--json", "-W", "0.2"])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert code == 1 and len(lines) >= 3  # the reports, then the summary: nothing died on the way
    assert lines[-1]["malformed"] >= lines[-1]["sent"] - lines[-1]["in_flight"] > 0  # every reply refused
    assert lines[-1]["received"] == 0
    assert "Traceback" not in captured.err


def test_a_kiss_of_death_code_reaches_the_terminal_escaped(capsys):
    with FakeNtpServer(kiss="\x1b[2J") as server:
        assert utc.main(["sntp", "127.0.0.1", str(server.port), "-c", "2", "-i", "0.05"]) == 1
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err
    assert "kiss-o'-death \\x1b[2J" in captured.out and "kiss-o'-death \\x1b[2J" in captured.err


# --- --reference lives as long as the run ------------------------------------------------------------

def test_a_reference_query_that_fails_is_counted_and_the_next_goes_on(monkeypatch, quick_reference_burst):
    with FakeNtpServer(root=(0, 1)) as ntp:
        reference = utc.Reference("127.0.0.1", ntp.port, every=0.5)
        failures = iter([True, True])

        def run(self, real=utc.SntpProber.run):
            if self.spec.count == 1 and next(failures, False):  # two queries after the burst: no descriptors
                raise OSError(24, "Too many open files")
            return real(self)
        monkeypatch.setattr(utc.SntpProber, "run", run)
        reference.start()
        # the burst's four answers, two failures, then an answer again: the run goes on after them
        wait_for(lambda: len(reference.answers) >= 5, timeout=20)
        result = reference.result({"offset_ms": None, "offset_err_ms": None})  # just after an answer
        reference.stop()
    assert result["problems"]["Too many open files"] == 2 and result["failed"] >= 2
    assert result["queries"] >= 4 and result["local_offset_ms"] is not None and not result["stale"]
    lines = utc.format_reference(result)
    assert lines[1].startswith("reference 127.0.0.1:{} (stratum 1): 2 queries without a usable answer, of "
                               .format(ntp.port))


NAMESPACE_OUTAGE = r"""
import subprocess, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import udp_timecheck as utc
from conftest import FakeNtpServer, wait_for
LOOPBACK_ROUTES = ("127.0.0.0/8", "127.0.0.1")
utc.REFERENCE_SPACING = 0.05                                   # a quick burst
with FakeNtpServer(root=(0, 1)) as ntp:
    reference = utc.Reference("127.0.0.1", ntp.port, every=0.1).start()
    wait_for(lambda: len(reference.answers) >= 5, timeout=20)  # the burst, then a query after it
    for route in LOOPBACK_ROUTES:                              # the outage: no route to 127.0.0.1
        subprocess.run(["ip", "route", "del", "local", route, "dev", "lo", "table", "local"], check=True)
    before = reference.failed
    wait_for(lambda: reference.failed >= before + 5, timeout=20)  # every query fails, counted
    for route in LOOPBACK_ROUTES:
        subprocess.run(["ip", "route", "add", "local", route, "dev", "lo", "table", "local"], check=True)
    during, restored = reference.failed, time.monotonic()
    wait_for(lambda: reference.answers[-1][0] > restored, timeout=20)  # and it goes on: an answer again
    result = reference.result({{"offset_ms": None, "offset_err_ms": None}})
    reference.stop()
print(during, result["failed"], result["queries"], result["local_offset_ms"] is not None,
      result["last_answer_age_s"])
print(result["problems"])
"""


@needs_linux_machine("a network namespace (unshare -rn) and ip")
def test_reference_across_an_outage_in_a_namespace_resumes_afterwards():
    require_programs("unshare", "ip")
    script = NAMESPACE_OUTAGE.format(root=str(ROOT), tests=str(ROOT / "tests"))
    result = run(["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1"', sys.executable,
                  script], timeout=60)
    assert result.returncode == 0, result.stderr
    numbers, problems = result.stdout.splitlines()
    during, failed, queries, offset, age = numbers.split()
    assert int(during) >= 5 and int(failed) <= int(during) + 1  # the queries in the outage failed, counted
    assert int(queries) >= int(failed) + 3 and offset == "True" and float(age) < 1.0  # and it went on
    assert "Network is unreachable" in problems


def test_a_stale_verdict_says_so():
    reference = {"host": "h:123", "stratum": 2, "problems": {"timeout": 3}, "queries": 5, "failed": 3,
                 "last_answer_age_s": 190.0, "stale": True, "local_offset_ms": 0.1,
                 "local_offset_err_ms": 0.5, "server_offset_ms": 0.2, "server_offset_err_ms": 0.7}
    assert utc.format_reference(reference)[-1] == (
        "stale verdict (its last answer is 190 s old): both clocks agree with the reference, within their "
        "error bounds")


# --- full disks, and two outputs in one file -------------------------------------------------------

FULL_DISK = """mount -t tmpfs -o size=16k tmpfs "$1" && "$0" "$2" client 127.0.0.1 "$3" -c 0 -i 0.002 \
-w 1 -q --csv "$1/run.csv" --jsonl "$1/run.jsonl"; status=$?; cp "$1/run.csv" "$1/run.jsonl" "$4"
exit $status"""


@needs_linux_machine("a small tmpfs in a mount namespace (unshare -rm)")
def test_a_full_disk_is_said_at_once_and_every_row_is_whole(processes, start_server, tmp_path):
    require_programs("unshare")
    server = start_server(log=None)
    (tmp_path / "disk").mkdir()
    (tmp_path / "out").mkdir()
    client = processes(["unshare", "-rm", "sh", "-c", FULL_DISK, sys.executable, str(tmp_path / "disk"),
                        str(MODULE), str(server.address[1]), str(tmp_path / "out")])
    for name in ("run.csv", "run.jsonl"):
        said = ": No space left on device; the measurement goes on without it"
        client.stderr.expect(re.escape(name + said))
    assert client.proc.poll() is None  # said while it was still measuring
    assert client.wait(timeout=30) == 2
    final = client.rest(client.stderr)[-1]
    assert "run.csv: No space left on device" in final and "run.jsonl: No space left on device" in final
    with open(str(tmp_path / "out" / "run.csv"), newline="") as handle:
        text = handle.read()
    rows = list(csv.DictReader(text.splitlines()))
    assert text.endswith("\n") and len(rows) >= 10
    assert all(None not in row.values() and row["status"] == "ok" for row in rows)  # no row cut short
    lines = (tmp_path / "out" / "run.jsonl").read_text().splitlines()
    assert len(lines) >= 10 and all(json.loads(line)["seq"] == index for index, line in enumerate(lines))


# --- what a key protects ------------------------------------------------------------------------

def junk_from(host, port, stop):
    """Unauthenticated requests, 50 a second, from host (a port of its own) to port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        junk = utc.encode_request(1, "junk", 0, key=b"not the key", pad_to=300)
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            sock.sendto(junk, ("127.0.0.1", port))
            stop.wait(0.02)


def test_junk_from_a_keyed_clients_address_costs_it_nothing(start_server):
    key = b"the shared key"
    server = start_server(log=None, key=key, max_rate=10)
    stop = threading.Event()
    sender = threading.Thread(target=junk_from, args=("127.0.0.1", server.address[1], stop), daemon=True)
    sender.start()
    try:
        recorder = utc.Prober(*server.address[:2], count=20, interval=0.1, key=key, timeout=2).run()
    finally:
        stop.set()
        sender.join(timeout=10)
    assert recorder.totals.received == 20 and server.stats.rate_limited == 0
    assert server.stats.unauthenticated >= 50  # the junk: counted, dropped, and free


def test_over_the_rate_the_client_says_rate_limited(start_server, capsys):
    server = start_server(log=None, max_rate=10)
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "150", "-i", "0.01", "-W", "0.5",
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)  # a burst of 10, then one in ten answered
    assert summary["rate_limited"] is True and 100 <= summary["lost"] <= 130
    assert "rate-limited? " in "\n".join(utc.format_counts(summary))


def test_random_loss_is_not_called_a_rate_limit(start_server, relay, capsys):
    import random
    rng = random.Random(5)
    server = start_server(log=None)
    hop = relay(server.address, lambda index, data: [] if rng.random() < 0.3 else [(0.0, data)])
    assert utc.main(["client", *map(str, hop.address[:2]), "-c", "100", "-i", "0.005", "-W", "0.3",
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["lost"] >= 10 and summary["rate_limited"] is False


def test_an_echo_on_the_path_to_a_keyed_client_is_forged_not_an_echo_service(start_server, relay):
    key = b"the shared key"
    server = start_server(log=None, key=key)
    hop = relay(server.address, echo_requests=True)  # every request comes back too, before the reply
    recorder = utc.Prober(*hop.address[:2], count=5, interval=0.05, key=key).run()
    assert recorder.totals.received == 5 and recorder.totals.echoes == 0 and recorder.totals.forged == 5
    assert utc.failure_reason(recorder, 1.0) == ("5 replies failed authentication (tampered with, replayed, "
                                                 "or another key)")


def test_a_replayed_keyed_request_is_answered_once(start_server):
    key = b"the shared key"
    server = start_server(log=None, key=key)
    request = utc.encode_request(12345, "The time is now", 0, key=key,
                                 pad_to=utc.min_request_size(1, keyed=True))
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(10)]  # ten sources
    replies = 0
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(0.05)
        for sent in range(10, 101, 10):  # a round at a time: nothing lost to a full buffer
            for sock in sockets:
                sock.sendto(request, server.address[:2])
            wait_for(lambda sent=sent: server.stats.replayed + server.stats.served == sent)
        for sock in sockets:
            while True:
                try:
                    sock.recv(65535)
                    replies += 1
                except socket.timeout:
                    break
    finally:
        for sock in sockets:
            sock.close()
    assert replies == 1 and server.stats.served == 1 and server.stats.replayed == 99
