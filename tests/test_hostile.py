"""A hostile network and a failing host: loops, costly datagrams, failing output, signals, keys."""

import json
import os
import signal
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import udp_timecheck as utc
from conftest import (POSIX_ONLY, SPOOFING, ask, cli, needs_linux_machine, request, run_cli, running_client,
                      spoof, wait_for)

TUTORIAL_TEXT = "The time is 2019-05-04 16:20:56.975068"


# --- 1. loops between servers (CVE-2024-2169) ------------------------------------------

CHECKS = 10


def settle(servers):
    """CHECKS round trips to each server, then stop them all: their counters are final.

    A loop still going would have kept answering all along, far beyond these.
    """
    for index in range(CHECKS):
        for server in servers:
            assert ask(server.address, request(1000 + 7 * index, seq=0, pad_to=200)) is not None
    for server in servers:
        server.shutdown()
    return sum(server.stats.served for server in servers) - CHECKS * len(servers)


def tutorial_datagram(request_id=491):
    return json.dumps([request_id, TUTORIAL_TEXT]).encode()


@SPOOFING
@pytest.mark.parametrize("faulty", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("form", ["tutorial", "ours"])
def test_a_spoofed_datagram_starts_no_loop_between_two_servers(start_server, form, faulty):
    first, second = start_server(faulty=faulty, log=None), start_server(faulty=faulty, log=None)
    data = tutorial_datagram() if form == "tutorial" else request(491, seq=0, pad_to=300)
    spoof(data, second.address, first.address)  # first answers second, which answers first...
    wait_for(lambda: first.stats.loops + second.stats.loops >= 1)
    assert settle([first, second]) <= 2  # first answered, second answered (tutorial form), no more
    assert first.stats.loops + second.stats.loops == 1


@SPOOFING
@pytest.mark.parametrize("form", ["tutorial", "ours"])
def test_a_server_never_answers_itself(start_server, form):
    server = start_server(log=None)
    data = tutorial_datagram() if form == "tutorial" else request(491, seq=0, pad_to=300)
    spoof(data, server.address, server.address)
    wait_for(lambda: server.stats.loops >= 1)
    assert settle([server]) == 0 and server.stats.loops == 1


@SPOOFING
@pytest.mark.parametrize("port", [7, 13, 19, 53, 123])
def test_privileged_source_ports_are_never_answered(start_server, port):
    server = start_server(log=None)
    spoof(tutorial_datagram(), ("127.0.0.1", port), server.address)  # echo, daytime, chargen, DNS, NTP
    wait_for(lambda: server.stats.loops >= 1)
    assert server.stats.served == 0


@SPOOFING
def test_no_loop_with_the_tutorials_own_server(start_server, reference_server):
    process, port = reference_server()
    server = start_server(log=None)
    spoof(tutorial_datagram(), ("127.0.0.1", port), server.address)
    wait_for(lambda: server.stats.loops >= 1)
    assert settle([server]) == 1  # the spoofed request; the tutorial server's answer to it is refused
    assert process.proc.poll() is None
    assert len(process.stdout.lines) + len(process.rest(process.stdout, timeout=1)) <= 2


def test_the_loop_guard_refuses_an_id_just_answered_or_one_more():
    guard = utc.LoopGuard(max_entries=2)
    source, other = ("192.0.2.1", 40000), ("192.0.2.1", 40001)
    assert not guard.looping(source, 500)
    guard.answered(source, 500)
    assert guard.looping(source, 500)  # back to where it came from: a loop
    guard.answered(source, 500)
    assert guard.looping(source, 501)  # a --faulty partner adds one
    guard.answered(source, 500)
    assert not guard.looping(other, 500)  # another port is another client
    guard.answered(source, 500)
    assert not guard.looping(source, 502) and not guard.looping(source, 499)
    for port in range(100):  # the table stays bounded
        guard.answered(("192.0.2.2", port), port)
    assert len(guard) == 2


REQUESTS = st.builds(
    lambda request_id, seq, pad, form: (utc.encode_request(request_id, TUTORIAL_TEXT, None) if form
                                        else utc.encode_request(request_id, TUTORIAL_TEXT, seq, pad_to=pad)),
    st.integers(0, 2 ** 63 - 1), st.integers(0, 10 ** 6), st.integers(150, 400), st.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(REQUESTS, st.floats(0, 1))
def test_no_reply_of_ours_is_answered_as_a_request(data, faulty):
    """Every request here is answered; fed back to the server it came from, every such reply is
    refused: no loop can start."""
    with utc.TimeServer("127.0.0.1", 0, faulty=faulty) as server:
        source = ("127.0.0.2", 45678)  # never the server's own address and port
        reply = server.respond(data, source)
        assert reply is not None
        assert server.respond(reply, source) is None
        assert server.stats.loops == 1


# --- 2. the server's output fails -------------------------------------------------------

def probe_until_answered(port, count=50):
    result = run_cli("client", "127.0.0.1", port, "-c", count, "-i", "0", "-q")
    assert result.returncode == 0, result.stderr
    assert "{} probes sent, {} received".format(count, count) in result.stdout


def port_from_proc(pid):
    """The UDP port a process listens on, from /proc: for a server whose stdout we cannot read.
    None while it has more than one: starting, it also binds a socket of its own for a moment
    (KernelClock's look at the kernel's stamps), which a probe would find closed."""
    inodes = set()
    for fd in os.listdir("/proc/{}/fd".format(pid)):
        try:
            target = os.readlink("/proc/{}/fd/{}".format(pid, fd))
        except OSError:  # closed meanwhile: the process is still starting
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    with open("/proc/net/udp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    ports = [int(fields[1].split(":")[1], 16) for fields in rows if fields[9] in inodes]
    return ports[0] if len(ports) == 1 else None


def wait_for_port(process):
    found = []
    wait_for(lambda: found.append(port_from_proc(process.pid)) or found[-1] is not None)
    return found[-1]


PROC_FS = needs_linux_machine("finds the port in /proc")


@PROC_FS
def test_stdout_on_a_full_disk_never_stops_serving():
    with open("/dev/full", "w") as full:
        process = subprocess.Popen(cli("server", "127.0.0.1", "0", "-v"), stdout=full, stderr=subprocess.PIPE,
                                   universal_newlines=True)
    try:
        probe_until_answered(wait_for_port(process), count=200)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0
    assert "Traceback" not in err
    (stopped,) = [line for line in err.splitlines() if line.startswith("Server stopped: served 200,")]
    dropped = int(stopped.rsplit("log lines dropped ", 1)[1])
    assert dropped >= 201  # the first line, every request's, and nothing written


@PROC_FS
@pytest.mark.parametrize("quiet", [[], ["-q"]])
def test_closed_stdout_never_stops_serving(quiet):
    process = subprocess.Popen(["sh", "-c", 'exec "$@" >&-', "sh"] + cli("server", "127.0.0.1", "0", *quiet),
                               stderr=subprocess.PIPE, universal_newlines=True)
    try:
        probe_until_answered(wait_for_port(process))
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in err
    assert "Server stopped: served 50," in err


@PROC_FS
def test_stdout_nobody_reads_never_stops_serving():
    process = subprocess.Popen(cli("server", "127.0.0.1", "0", "-v"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # a pipe that is never read: it fills at 64 KB
    try:
        port = wait_for_port(process)
        probe_until_answered(port, count=1000)  # some 105 KB of log: more than the pipe holds
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        stopping = time.monotonic() - started
        err = process.stderr.read().decode()
        written = process.stdout.read().count(b"\n")  # what the pipe held
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in err
    assert "Server stopped: served 1000," in err  # stdout is blocked: the counters come out on stderr
    dropped = int(err.rsplit("log lines dropped ", 1)[1].split()[0])
    assert dropped >= 100 and written + dropped == 1 + 1000  # every line written or counted, none lost
    assert stopping < 5


def test_log_lines_are_short_whatever_the_text(start_server):
    server = start_server()
    # escaping makes each of these up to 10 times longer; a request carries at most 128 escapes
    texts = ["\x00" * 120, "\U0001F600" * 60, "\u202e" * 120, "x" * 60000, "\\" * 60, "\u00e9" * 120]
    for index, text in enumerate(texts):
        assert ask(server.address, utc.encode_request(index * 10, text, index, pad_to=65000)) is not None
    server.shutdown()
    assert len(server.logs) == len(texts)
    for line in server.logs:
        assert len(line.encode()) <= 320 and line.isprintable()


@POSIX_ONLY
def test_a_blocked_line_writer_drops_and_counts():
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:  # fill the pipe: nobody reads it
            os.write(write_end, b"x" * 4096)
    except BlockingIOError:
        os.set_blocking(write_end, True)
    with os.fdopen(write_end, "w", closefd=False) as stream:
        writer = utc.LineWriter(stream, max_queued=10)
        for index in range(100):  # the first blocks the writer thread; ten wait; the rest drop
            writer.write("line {}".format(index))
        assert writer.queue_drops >= 100 - 1 - 10
        assert writer.close("the end", timeout=0.5) is False
        os.close(read_end)  # the blocked write fails (EPIPE), and the rest with it: counted
        writer.thread.join(timeout=10)
        assert not writer.thread.is_alive()
        assert writer.write_drops >= 1 and writer.dropped == writer.queue_drops + writer.write_drops
    os.close(write_end)


# --- 3. datagrams that cost far more than a request ------------------------------------

CPU_CLOCK = getattr(time, "thread_time", time.process_time)  # this thread's CPU: 3.7 and later


def cost_ratio(server, data, baseline, repeats=9, calls=40):
    """The CPU time for responding to data over that for baseline, each the least of several
    runs (caches and interrupts only add), taken in turn so that a slower spell of the machine
    weighs on both.  CPU time, never the clock's: other processes (a parallel suite) do not count."""
    best = {data: float("inf"), baseline: float("inf")}
    for _ in range(repeats):
        for datagram in (data, baseline):
            started = CPU_CLOCK()
            for _ in range(calls):
                server.respond(datagram, ("127.0.0.2", 40000))
            best[datagram] = min(best[datagram], CPU_CLOCK() - started)
    return best[data] / best[baseline]


def costly(size):
    def fill(prefix, unit, suffix):
        return prefix + unit * ((size - len(prefix) - len(suffix)) // len(unit)) + suffix
    return {
        "floats": fill(b"[1e-400", b", 1e-400", b"]"),
        "integers": fill(b"[1", b",1", b"]"),
        "keys": fill(b'[1, "x", {"a":1', b',"a":1', b"}]"),
        "nesting": b"[" * (size // 2) + b"]" * (size // 2),
        "escapes": fill(b'[1, "', b"\\u0041", b'"]'),
        "digits": fill(b"[", b"9", b', "x"]'),
        "list": fill(b'[1, "x", {"seq": 1, "z": [', b'"a",', b'"a"]}]'),
        "strings": fill(b'[1, "x", {"seq": 1}', b', "aaaaaa"', b"]"),
    }


@pytest.mark.parametrize("size", [300, 65507])
def test_no_datagram_costs_more_than_a_few_requests_of_its_size(size):
    """Compared as a ratio with a real request of the same size, never as a time."""
    with utc.TimeServer("127.0.0.1", 0) as server:
        legitimate = utc.encode_request(1234567890123456789, TUTORIAL_TEXT, 0, size=size, pad_to=size)
        assert server.respond(legitimate, ("127.0.0.2", 40000)) is not None
        for name, data in costly(size).items():  # some are requests at this size: answered or not,
            assert len(data) <= size                # none may cost much more than a real one
            assert cost_ratio(server, data, legitimate) <= 5, name
        for name in ("floats", "integers", "nesting", "digits"):
            assert server.respond(costly(size)[name], ("127.0.0.2", 40000)) is None, name


# --- 4. shutdown and signals --------------------------------------------------------------

@POSIX_ONLY
@pytest.mark.parametrize("first, then", [("TERM", "TERM"), ("INT", "INT"), ("TERM", "INT"), ("INT", "TERM")])
def test_any_number_of_signals_in_any_order_exit_0_with_the_counters(cli_server, first, then):
    server, port = cli_server("-q")
    assert ask(("127.0.0.1", port), request(5, seq=0, pad_to=200)) is not None
    server.signal(getattr(signal, "SIG" + first))
    for index in range(30):  # a storm during the shutdown
        if server.proc.poll() is not None:
            break
        server.signal(getattr(signal, "SIG" + (then if index % 2 else first)))
    assert server.wait(timeout=5) == 0
    out = server.rest(server.stdout)
    assert [line for line in out if line.startswith("Server stopped:")] == [out[-1]]
    assert out[-1].startswith("Server stopped: served 1,")
    errors = server.rest(server.stderr)
    assert errors == [], "\n".join(errors)


def stopped_cleanly(server):
    """A server that has exited: 0, its count of what it served the last line, nothing on stderr."""
    assert server.wait(timeout=10) == 0
    out, errors = server.rest(server.stdout), server.rest(server.stderr)
    assert out and out[-1].startswith("Server stopped: ") and errors == [], errors
    return out


@POSIX_ONLY
def test_sigterm_then_sigint_any_time_apart_exit_0(processes):
    """The race of the shutdown: the second signal 0 to 50 ms after the first, twenty servers at once."""
    servers = [processes(cli("server", "127.0.0.1", "0", "-q")) for _ in range(20)]
    for server in servers:
        server.stdout.expect("Server listening")
    for index, server in enumerate(servers):
        server.signal(signal.SIGTERM)
        threading.Event().wait(index * 0.0025)  # the gap between the two: the race this test is about
        server.signal(signal.SIGINT)
    for server in servers:
        stopped_cleanly(server)


@POSIX_ONLY
def test_a_storm_of_both_signals_until_the_server_exits(processes):
    for _ in range(5):
        server = processes(cli("server", "127.0.0.1", "0", "-q"))
        server.stdout.expect("Server listening")
        deadline, sent = time.monotonic() + 10, 0
        while server.proc.poll() is None and time.monotonic() < deadline:
            try:
                os.kill(server.proc.pid, signal.SIGINT if sent % 2 else signal.SIGTERM)
            except ProcessLookupError:
                break
            sent += 1
        stopped_cleanly(server)
        assert sent >= 2


@POSIX_ONLY
def test_signals_during_a_client_summary_change_nothing(processes, start_server):
    client = running_client(processes, start_server(log=None), "-i", "0.001", "-c", "1000000", "-q")
    for index in range(20):
        if client.proc.poll() is not None:
            break
        client.signal(signal.SIGINT if index % 2 else signal.SIGTERM)
    assert client.wait(timeout=10) == 0
    assert any(" received, " in line for line in client.rest(client.stdout))
    assert all("Traceback" not in line for line in client.rest(client.stderr))


# --- 5. keys ---------------------------------------------------------------------------------


@POSIX_ONLY
@pytest.mark.parametrize("keyed", [False, True])
def test_the_first_line_says_whether_a_key_is_required(cli_server, tmp_path, keyed):
    args = []
    if keyed:
        path = tmp_path / "key"
        path.write_bytes(b"k" * 32)
        path.chmod(0o600)
        args = ["--key-file", str(path)]
    server, _ = cli_server(*args)
    line = server.stdout.lines[-1]
    assert ("key required (HMAC-SHA256)" if keyed else "no key: answers anyone") in line


# --- 6. what the client believes -------------------------------------------------------------

@pytest.mark.parametrize("extra", [[], ["-c", "3", "-i", "0"]])
def test_an_echo_service_is_not_a_time_server(udp_peer, capsys, extra):
    echo_service = udp_peer(lambda data: data)
    assert utc.main(["client", *map(str, echo_service.address), "-W", "0.5", *extra]) == 1
    captured = capsys.readouterr()
    assert "The time is" not in captured.out  # our own request text is never shown as the server's
    assert "echoes requests back: it is an echo service, not a time server" in captured.err


def test_garbage_is_malformed_not_a_liar(start_server, relay, capsys):
    server = start_server()
    hop = relay(server.address, lambda index, data: [(0.0, b"\x00 not json")])
    assert utc.main(["client", *map(str, hop.address), "-c", "3", "-i", "0", "-W", "0.3", "--json"]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["malformed"] == 3 and summary["mismatched"] == 0 and summary["received"] == 0
    assert "3 replies that are not udp-timecheck replies" in captured.err and "liar" not in captured.err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_csv_on_a_full_disk_is_said_at_once_and_the_summary_still_comes_out(start_server, capsys):
    server = start_server()
    assert utc.main(["client", *map(str, server.address), "-c", "5", "-i", "0",
                     "-q", "--csv", "/dev/full"]) == 2
    captured = capsys.readouterr()
    assert "5 probes sent, 5 received" in captured.out
    assert captured.err.splitlines() == [  # once as it happens, once more at the end
        "udp-timecheck: cannot write to /dev/full: No space left on device; the measurement goes on "
        "without it",
        "udp-timecheck: cannot write to /dev/full: No space left on device"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_on_a_full_disk_is_one_line_for_the_client(start_server):
    server = start_server()
    with open("/dev/full", "w") as full:
        result = subprocess.run(cli("client", *server.address[:2], "-c", "5", "-i", "0"), stdout=full,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == "udp-timecheck: cannot write to standard output: No space left on device\n"


# --- 7. the tutorial's requests that were too short to answer ----------------------------------

SHORT_TEXT = "The time is 2019-05-04 16:20:56"  # str(datetime) at microsecond 0: no ".000000"


@pytest.mark.parametrize("request_id, faulty, text", [
    (491, 0.0, SHORT_TEXT), (9, 0.0, SHORT_TEXT), (9, 1.0, TUTORIAL_TEXT), (99, 1.0, TUTORIAL_TEXT),
    (999, 1.0, TUTORIAL_TEXT), (491, 1.0, SHORT_TEXT)])
def test_the_tutorials_shorter_requests_are_answered(request_id, faulty, text):
    """7 bytes shorter at microsecond 0, or an id one digit longer from --faulty: both answered."""
    with utc.TimeServer("127.0.0.1", 0, faulty=faulty) as server:
        data = json.dumps([request_id, text]).encode()
        reply = server.respond(data, ("127.0.0.2", 40000))
        assert reply is not None and len(reply) <= len(data)
        reply_id, reply_text = json.loads(reply)
        assert reply_id == request_id + (1 if faulty else 0)
        assert reply_text.startswith("The time is ") and not reply_text.endswith(".")


def test_both_at_once_is_the_one_request_too_short_to_answer():
    """Microsecond 0 and a 9 made 10: a reply would need 8 bytes more, and the seconds stay."""
    with utc.TimeServer("127.0.0.1", 0, faulty=1.0) as server:
        assert server.respond(json.dumps([9, SHORT_TEXT]).encode(), ("127.0.0.2", 40000)) is None
        assert server.stats.too_short == 1


def test_fit_tutorial_reply_cuts_only_the_fraction():
    reply = b'[10, "The time is 2019-05-04 16:20:56.975068"]'
    assert utc.fit_tutorial_reply(reply, len(reply)) == reply
    assert utc.fit_tutorial_reply(reply, len(reply) - 1) == b'[10, "The time is 2019-05-04 16:20:56.97506"]'
    assert utc.fit_tutorial_reply(reply, len(reply) - 6) == b'[10, "The time is 2019-05-04 16:20:56"]'
    assert utc.fit_tutorial_reply(reply, len(reply) - 7) == b'[10, "The time is 2019-05-04 16:20:56"]'
    assert utc.fit_tutorial_reply(reply, len(reply) - 8) is None
