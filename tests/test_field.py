"""Figures that hold in the field: a stalled client or server, scrapes, peers that come and go,
strangers on the path.  Each event is made for real (SIGSTOP, a relay, scraping threads, forged
and replayed datagrams), and the figures are checked against the truth: the relay's own log, a
shifted clock, one clock on both ends."""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request


import pytest

import udp_timecheck as utc
from conftest import (KEY, MS_NS, POSIX_ONLY, cli, free_udp_port, free_udp_ports, needs_linux, request,
                      require_programs, run_cli, wait_for)

METRICS_AT = r"^metrics at http://(127\.0\.0\.1:\d+)/metrics$"


def json_of(process, timeout=60):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return json.loads(out.splitlines()[-1])


def delayed(seconds):
    """A relay policy: every reply delivered, seconds late."""
    return lambda index, data: [(seconds, data)]


# --- a stalled client: the kernel's stamps say when a reply came ---------------------------------

@POSIX_ONLY
@needs_linux("the kernel's receive stamps say when a reply came; without them, a stall counts")
def test_a_stalled_client_loses_no_reply_that_arrived_in_time(start_server, relay):
    """Stopped for 0.4 s on a 100 ms path with -W 0.3: every reply reached its socket in time,
    as the relay delivered it, so none is lost or late."""
    hop = relay(start_server(log=None).address, delayed(0.1))
    argv = cli("client", *hop.address[:2], "-c", "30", "-i", "0.05", "-W", "0.3", "--json")
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    wait_for(lambda: len(hop.replies) >= 10)
    client.send_signal(signal.SIGSTOP)
    time.sleep(0.4)  # the stall itself, which this test is about: replies queue meanwhile
    client.send_signal(signal.SIGCONT)
    summary = json_of(client)
    assert len(hop.requests) == len(hop.replies) == 30 and not hop.dropped_replies  # the truth
    assert (summary["received"], summary["lost"], summary["late"]) == (30, 0, 0)


@pytest.mark.long(seconds=3)
@POSIX_ONLY
def test_a_report_due_before_the_deadline_comes_after_a_stall_past_it(processes, start_server):
    """Stopped from its first report (1 s) until past its deadline (2.5 s): the report due at 2 s
    still comes, for the period up to the stall's end; then the summary."""
    server = start_server(log=None)
    client = processes(cli("client", *server.address[:2], "-c", "0", "-i", "0.05", "-w", "2.5",
                           "--report-every", "1", "--json"))
    client.stdout.expect(r'"period"')
    client.signal(signal.SIGSTOP)
    stopped = time.time()
    time.sleep(2.0)  # the stall itself, which this test is about: from about 1 s to about 3 s
    client.signal(signal.SIGCONT)
    assert client.wait() == 0
    client.rest(client.stdout)  # onto .lines, after the one expect() read
    *reports, summary = [json.loads(line) for line in client.stdout.lines]
    assert len(reports) == 2 and "period" not in summary and summary["stopped_because"] == "deadline"
    resumed = utc.iso_utc(int((stopped + 2.0) * 1e9))  # the second period ends as the stall did
    assert reports[0]["period"]["end"] < resumed < reports[1]["period"]["end"]


# --- scrapes run beside the loop, from snapshots -------------------------------------------------

def scraper(where, stop, served):
    while not stop.is_set():
        try:
            with urllib.request.urlopen("http://{}/metrics".format(where), timeout=10) as response:
                served.append(len(response.read()))
        except OSError:
            pass  # the endpoint closed the oldest connection to make room: scrape again


@pytest.mark.long(seconds=3)
@needs_linux("a wildcard server that answers 200 loopback addresses each from itself")
def test_scraping_as_hard_as_sixteen_connections_can_changes_no_probe(processes):
    """The server in a process of its own: the scraping threads here take this one's CPU."""
    server = processes(cli("server", "0.0.0.0", "0", "-q"))
    port = server.stdout.expect(r"Server listening at 0\.0\.0\.0:(\d+)").group(1)
    targets = ["127.0.1.{}:{}".format(host, port) for host in range(1, 201)]
    client = processes(cli("client", *targets, "-i", "0.1", "-c", "25", "-w", "60", "-q", "--json",
                             "--metrics", "0"))
    where = client.stderr.expect(METRICS_AT).group(1)
    stop, served = threading.Event(), []
    scrapers = [threading.Thread(target=scraper, args=(where, stop, served), daemon=True) for _ in range(16)]
    for thread in scrapers:
        thread.start()
    try:
        assert client.wait(timeout=90) == 0
    finally:
        stop.set()
    summary = json.loads(client.rest(client.stdout)[-1])
    assert len(served) >= 100  # it was scraped hard, all along
    for target in summary["targets"]:
        assert (target["lost"], target["late"], target["in_flight"] <= 1) == (0, 0, True), target["target"]
        # every probe sent, on its turn: none skipped, and the run ended by its count, not the deadline
        assert (target["sent"], target["stopped_because"]) == (25, None), target["target"]


# --- a stalled server: its kernel's stamp stays T2 -------------------------------------------------

@POSIX_ONLY
@needs_linux("the server's kernel receive stamps say when a request came; without them, a stall counts")
def test_a_stalled_server_is_the_servers_time_not_the_networks(cli_server):
    """The server stopped for 1.5 s: the requests that waited for it show as its processing
    time, each from its kernel's receive stamp; the round trips stay what loopback takes."""
    server, port = cli_server("-q")
    result = {}
    client = threading.Thread(target=lambda: result.update(run=run_cli(
        "client", "127.0.0.1", port, "-c", "40", "-i", "0.05", "-W", "5", "--json")))
    client.start()
    time.sleep(0.5)  # into the run, then the stall itself
    server.signal(signal.SIGSTOP)
    time.sleep(1.5)
    server.signal(signal.SIGCONT)
    client.join(timeout=60)
    assert result["run"].returncode == 0, result["run"].stderr
    summary = json.loads(result["run"].stdout)
    stalled = [sample for sample in summary["samples"] if sample["server_proc_ms"] and
               sample["server_proc_ms"] > 500]
    assert summary["received"] == 40 and summary["timestamps"]["server"] == "kernel"
    assert stalled and all(sample["trusted"] for sample in stalled)  # the stall is the server's
    assert summary["rtt_ms"]["max"] < 100  # and never the network's
    assert all(sample["rtt_ms"] < 100 for sample in summary["samples"])


@POSIX_ONLY
@needs_linux("kernel receive stamps, to tell from a clock that disagrees")
def test_a_server_clock_that_disagrees_with_its_kernel_is_not_read_as_a_backlog(processes):
    """Under libfaketime the server's clock is an hour ahead of its kernel's: its kernel stamps
    would look an hour old, and are not used; its offset is still measured within the bound."""
    require_programs("faketime")  # its library, preloaded here: only the wall clock moves, an hour on
    library = (glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + [None])[0]
    assert library is not None, "faketime's library is not where Debian puts it"
    server = processes(cli("server", "127.0.0.1", "0", "-q"), env=dict(
        os.environ, LD_PRELOAD=library, FAKETIME="+1h", FAKETIME_DONT_FAKE_MONOTONIC="1"))
    port = int(server.stdout.expect(r"Server listening at 127\.0\.0\.1:(\d+)").group(1))
    result = run_cli("client", "127.0.0.1", port, "-c", "20", "-i", "0.01", "--json")
    summary = json.loads(result.stdout)
    assert summary["received"] == 20 and summary["timestamps"]["server"] == "user"
    assert abs(summary["offset_ms"] - 3600 * 1000) <= summary["offset_err_ms"]
    assert summary["rtt_ms"]["max"] < 100 and summary["server_proc_ms"] < 100


# --- peers that come and go -----------------------------------------------------------------------

@pytest.mark.long(seconds=4)
def test_mesh_peers_that_end_apart_are_not_up_not_lost(tmp_path):
    """Three nodes, each for 2.5 s, started 0.5 s apart: each peer's end (a goodbye, or refusals) and
    start show as not up, never as loss, on a path that loses nothing."""
    ports = free_udp_ports(3)
    peers = tmp_path / "peers"
    peers.write_text("".join("n{} 127.0.0.1:{}\n".format(index, port) for index, port in enumerate(ports)))
    nodes = []
    for port in ports:
        nodes.append(subprocess.Popen(cli("mesh", "--peers", peers, "--listen", "127.0.0.1:{}".format(port),
                                          "-w", "2.5", "-i", "0.05", "--json"), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, universal_newlines=True))
        time.sleep(0.5)  # the stagger itself, which this test is about
    outputs = [json_of(node) for node in nodes]
    for output in outputs:
        for target in output["targets"]:  # each probe answered, sent while its peer was not up, or
            assert target["lost"] == 0 and target["received"] > 0, target  # still out at the deadline
            assert target["sent"] == target["received"] + target["not_up"] + target["in_flight"], target
    last = {target["name"]: target for target in outputs[2]["targets"]}
    assert last["n0"]["not_up"] > 0  # n0 ended 1 s before n2 did
    for index, output in enumerate(outputs):
        (tmp_path / "n{}.json".format(index)).write_text(json.dumps(output))
    matrix = run_cli("matrix", *(tmp_path / "n{}.json".format(index) for index in range(3)), "--json")
    cells = json.loads(matrix.stdout)["cells"]
    assert all(cell["loss_pct"] == 0 for cell in cells) and any(cell["not_up"] for cell in cells)


@pytest.mark.long(seconds=3)
@POSIX_ONLY
def test_a_server_that_restarts_is_not_up_meanwhile_not_lost(processes, tmp_path):
    port, probes = free_udp_port(), tmp_path / "probes.jsonl"
    first = processes(cli("server", "127.0.0.1", port, "-q"))
    first.stdout.expect("Server listening")
    client = processes(cli("client", "127.0.0.1", port, "-i", "0.05", "-w", "2.5", "--json",
                           "--jsonl", str(probes)))
    wait_for(lambda: probes.exists() and probes.read_text().count('"ok"') >= 3, timeout=30)  # into the run
    first.signal(signal.SIGTERM)
    assert first.wait(timeout=10) == 0
    time.sleep(0.4)  # the server is down this long: the probes sent meanwhile are not up
    second = processes(cli("server", "127.0.0.1", port, "-q"))
    second.stdout.expect("Server listening")
    code = client.wait(timeout=30)
    summary = json.loads(client.rest(client.stdout)[-1])
    assert code == 0, (client.rest(client.stderr), summary, first.rest(first.stdout), port)
    assert summary["lost"] == 0 and summary["not_up"] >= 5 and summary["loss_pct"] == 0
    assert summary["received"] + summary["not_up"] + summary["in_flight"] == summary["sent"]


@POSIX_ONLY
def test_after_a_goodbye_the_probe_lines_say_not_up_never_lost(cli_server, processes):
    server, port = cli_server("-q")
    client = processes(cli("client", "127.0.0.1", port, "-i", "0.05", "-w", "1.5"))
    client.stdout.expect(r"seq=3 ")  # into the run: then the server stops, and says goodbye
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=10) == 0
    assert client.wait(timeout=30) == 0
    out = "\n".join(client.rest(client.stdout))
    assert "seq=" in out and "lost, no reply" not in out and ", 0% loss" in out
    assert re.search(r"\d+ probes sent while the target was not up \(refused before its first answer, or "
                     r"after it said it stopped\): not counted as lost", out)
    gone = utc.Sample(7, 0)
    gone.status, gone.reason = utc.NOT_UP, utc.GONE  # no reply, and none refused: a firewall's silence
    assert utc.format_sample(gone, "127.0.0.1:1060", 1.0) == (
        "seq=7: not up: the server said it stopped (not counted as lost)")


# --- strangers on the path --------------------------------------------------------------------------

class Stranger:
    """Re-sends each request it is shown, delay seconds later, from a port of its own."""

    def __init__(self, upstream, delay):
        self.upstream, self.delay, self.sent = upstream[:2], delay, 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))

    def forward(self, index, data, client):
        threading.Timer(self.delay, self._resend, (data,)).start()
        return True

    def _resend(self, data):
        self.sock.sendto(data, self.upstream)
        self.sent += 1


@needs_linux("the server's kernel transmit stamps (interleaved)")
def test_a_stranger_resending_requests_cannot_move_the_offset(start_server, relay):
    """Each request is re-sent 80 ms later from another port, on a 100 ms path: the server's
    transmit stamp of that other exchange never stands in for the client's own."""
    server = start_server(log=None)
    stranger = Stranger(server.address, 0.08)
    hop = relay(server.address, delayed(0.1), forward=stranger.forward)
    recorder = utc.Prober(*hop.address[:2], count=20, interval=0.05, timeout=2).run()
    summary = utc.summarize(recorder)
    stranger.sock.close()
    assert stranger.sent >= 15 and summary["received"] == 20
    assert summary["timestamps"]["server_transmit"] in (utc.KERNEL, "mixed")
    assert abs(summary["offset_ms"]) <= summary["offset_err_ms"]  # one clock: the truth is 0
    assert 100 <= summary["rtt_ms"]["min"] <= summary["rtt_ms"]["max"] < 150  # the relay's 100 ms


def spoofed_first(index, data):
    """A relay policy: before each genuine reply, a forged one with another id and the same seq."""
    reply = utc.decode_message(data)
    forged = data.replace(b"[%d," % reply.message_id, b"[%d," % (reply.message_id ^ 1), 1)
    return [(0.0, forged), (0.02, data)]


def test_a_spoofed_reply_cannot_discard_the_genuine_one(start_server, relay, capsys):
    hop = relay(start_server(log=None).address, spoofed_first)
    assert utc.main(["client", *map(str, hop.address[:2]), "-c", "20", "-i", "0.01", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["received"], summary["lost"], summary["duplicates"]) == (20, 0, 0)
    assert summary["mismatched"] == 20  # each counted, none of them taken


def test_a_liars_own_reply_still_makes_it_a_liar(start_server, capsys):
    server = start_server(log=None, faulty=1.0)
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "3", "-i", "0",
                     "-W", "0.2"]) == utc.EXIT_FAILED
    out = capsys.readouterr()
    assert out.out.count("Server is a liar!") == 3 and "the server is a liar: 3 probes" in out.err


def keyed(seq, session, request_id=None):
    return request(request_id or 1000 + seq, seq=seq, key=KEY, pad_to=400,
                   options=utc.RequestOptions(session))


def test_replays_are_refused_however_old(start_server, monkeypatch):
    """A session's requests, captured and sent again after the server has forgotten their MACs
    (thousands of requests later, or an hour): refused by the session's window, and never
    counted in the loss split."""
    monkeypatch.setattr(utc, "REPLAY_ENTRIES", 8)  # a guard of MACs that forgets soon
    server = start_server(key=KEY)
    captured = [keyed(seq, 7) for seq in range(5)]
    assert all(server.respond(data) is not None for data in captured)
    for seq in range(20):  # another session's requests: the MACs of the first are forgotten
        assert server.respond(keyed(seq, 8, 5000 + seq)) is not None
    assert [server.respond(data) for data in captured] == [None] * 5
    assert server.stats.replayed == 5
    reply = utc.decode_message(server.respond(keyed(5, 7)))
    assert reply.ext["rx"] == 6  # the five and this one: no replay counted


def test_a_replay_bends_no_loss_split(start_server, relay):
    """A keyed run that loses replies 3 and 11, through a relay that replays earlier requests
    all along: the split is the relay's own log, exactly."""
    server = start_server(key=KEY, log=None)
    requests, resent = [], []

    def forward(index, data, client):
        requests.append(data)
        if index >= 5:  # now and then, an old request again
            resent.append(requests[index - 5])
            hop.front.sendto(requests[index - 5], hop.address)
        return True

    hop = relay(server.address, lambda index, data: [] if index in (3, 11) else [(0.0, data)],
                forward=forward)
    summary = utc.summarize(utc.Prober(*hop.address[:2], count=20, interval=0.02, key=KEY).run())
    assert server.stats.replayed >= 15
    assert (summary["lost"], summary["lost_up"], summary["lost_down"]) == (2, 0, 2)


# --- what the replies' order and the server's stamps say -------------------------------------------

def interleaved_without_stamps(data):
    """A server that offers its kernel's transmit stamps (xl) and never sends one."""
    request_ = utc.decode_message(data)
    now = utc.wall_ns()
    return b'[%d, "The time is now", {"seq": %d, "ts": "kernel", "rx": %d, "xl": 1, "t2": %d, "t3": %d}]' % (
        request_.message_id, request_.seq, request_.seq + 1, now, now + 1000)


def test_stamps_that_never_come_leave_the_probes_in_order(udp_peer, tmp_path, capsys):
    peer = udp_peer(interleaved_without_stamps)
    rows = tmp_path / "rows.csv"
    assert utc.main(["client", "127.0.0.1", str(peer.port), "-c", "100", "-i", "0.005", "--json",
                     "--csv", str(rows)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["received"] == 100 and summary["reordered"] == 0
    assert [int(line.split(",")[0]) for line in rows.read_text().splitlines()[1:]] == list(range(100))
    assert [sample["seq"] for sample in summary["samples"]] == list(range(100))


def stamps_that_disagree(shift_ns):
    """A server whose kernel stamps of its replies leaving lie shift_ns from the reply's T2: before its
    own T3 (-5 ms), or later than the client waited for that reply (+50 ms)."""
    def answer(data):
        request_ = utc.decode_message(data)
        now = utc.wall_ns()
        exchange = request_.ext.get("xr")
        earlier = b', "xs": %d, "xt": %d' % (request_.seq - 1, exchange + shift_ns) if exchange else b""
        return b'[%d, "x", {"seq": %d, "ts": "kernel", "rx": %d, "xl": 1%b, "t2": %d, "t3": %d}]' % (
            request_.message_id, request_.seq, request_.seq + 1, earlier, now, now + 1000)
    return answer


@pytest.mark.parametrize("shift_ns", [-5 * MS_NS, 50 * MS_NS], ids=["before its T3", "beyond the round trip"])
def test_kernel_stamps_that_disagree_are_said_rejected_not_missing(udp_peer, capsys, shift_ns):
    peer = udp_peer(stamps_that_disagree(shift_ns))
    assert utc.main(["client", "127.0.0.1", str(peer.port), "-c", "10", "-i", "0",
                     "--json"]) == 0  # one at a time
    summary = json.loads(capsys.readouterr().out)
    stamps = summary["timestamps"]
    assert stamps["server_transmit_rejected"] == 9 and stamps["server_transmit"] == "user"
    assert all(sample["t3_from"] == "user" for sample in summary["samples"])
    assert "9 kernel stamps rejected: they disagree with the server's own clock" in "\n".join(
        utc.format_summary(summary))
    assert "cannot stamp" not in "\n".join(utc.format_summary(summary))
