"""What the path does: loss by direction, the server's transmit stamp (interleaved), one-way
delays, TOS and TTL, the source address, source ports (ECMP) and outages; each figure checked
against what a relay, the kernel's firewall or the server itself logged."""

import json
import socket
import sys

import pytest

import udp_timecheck as utc
from conftest import SECOND_NS, ROOT, needs_linux, probe, require_programs, run


def seq_of(datagram):
    """A request's or a reply's probe number, as the relay sees it."""
    return json.loads(datagram)[2]["seq"]


def measure_json(capsys, *argv):
    assert utc.main(["client", *map(str, argv), "--json"]) in (0, 1)
    return json.loads(capsys.readouterr().out)


# --- loss by direction --------------------------------------------------------------------

def test_the_loss_split_is_exact_against_the_relays_drop_log(start_server, relay, capsys):
    server = start_server(log=None)
    requests_dropped, replies_dropped = {2, 3, 7, 20, 21, 22, 40}, {5, 7, 8, 30, 41, 42}  # 7: both ways
    duplicated = {10, 11}  # the network copies these requests: the server counts each once
    hop = relay(server.address, lambda index, data: [] if seq_of(data) in replies_dropped else [(0.0, data)],
                forward=lambda index, data, client: 0 if seq_of(data) in requests_dropped
                else 2 if seq_of(data) in duplicated else 1)
    summary = measure_json(capsys, *hop.address, "-c", 60, "-i", 0.005, "-W", 0.5)
    lost_up, lost_down = len(hop.dropped_requests), len(hop.dropped_replies)
    assert (lost_up, lost_down) == (7, 5)  # 7's reply never existed: its request was lost first
    assert summary["lost"] == lost_up + lost_down
    split = summary["lost_up"], summary["lost_down"], summary["lost_direction_unknown"]
    assert split == (lost_up, lost_down, 0)


def test_the_lost_after_the_last_reply_are_neither_up_nor_down(start_server, relay, capsys):
    server = start_server(log=None)
    hop = relay(server.address, lambda index, data: [] if seq_of(data) >= 17 else [(0.0, data)],
                forward=lambda index, data, client: seq_of(data) not in (3, 18))
    summary = measure_json(capsys, *hop.address, "-c", 20, "-i", 0.005, "-W", 0.3)
    assert summary["lost"] == 4  # 3 (out), then 17 to 19: 18 out, the others back; no reply tells
    assert (summary["lost_up"], summary["lost_down"], summary["lost_direction_unknown"]) == (1, 0, 3)


def test_a_server_without_a_count_gives_no_split(reference_server, capsys):
    _, port = reference_server()
    summary = measure_json(capsys, "127.0.0.1", port, "-c", 3, "-i", "0")
    assert summary["received"] == 3
    assert summary["lost_up"] is summary["lost_down"] is summary["lost_direction_unknown"] is None


def test_loss_directions_in_order_and_across_a_server_that_forgot():
    directions = utc.LossDirections()
    for lost, count in [(True, None), (False, 2),  # the lost one's request arrived: down
                        (True, None), (True, None), (False, 4),  # one of the two arrived: 1 up, 1 down
                        (True, None), (False, 1),  # the count went back (a restart): unknown
                        (True, None)]:  # after the last reply: unknown
        directions.add(lost, count)
    assert directions.figures() == {"lost_up": 1, "lost_down": 2, "lost_direction_unknown": 2}


def test_the_server_counts_a_duplicated_request_once():
    session = utc._Session()
    seqs = [0, 1, 1, 3, 2, 2, 3, 200, 5, 5, 190, 190, 200 + utc.SEQUENCE_WINDOW, 200, 201]
    new = [session.count(seq) for seq in seqs]  # 200: out of the window by then, as good as a repeat
    assert new == [True, True, False, True, True, False, False, True, True, False, True, False, True, False,
                   True]
    assert session.received == 9  # 0 1 3 2 200 5 190 1224 201


# --- the server's transmit stamp, interleaved -----------------------------------------------

@needs_linux("SO_TIMESTAMPING's transmit stamps")
def test_interleaved_t3_is_the_kernels_stamp_the_next_reply_carries(start_server, relay, capsys):
    server = start_server(log=None)
    hop = relay(server.address)
    summary = measure_json(capsys, *hop.address, "-c", 12, "-i", 0.01)
    assert summary["received"] == 12 and summary["timestamps"]["server_transmit"] == utc.KERNEL
    replies = {seq_of(reply): json.loads(reply)[2] for reply in hop.replies}
    # A request names the last exchange its client had heard of: on a loaded machine, not always
    # the one before it.  The stamp a later reply brought is that exchange's T3, all others the
    # server's own reading.
    brought = {reply["xs"]: reply["xt"] for reply in replies.values() if "xs" in reply}
    for sample in summary["samples"]:
        written = replies[sample["seq"]]["t3"]  # what the server read before its send
        if sample["seq"] in brought:
            assert sample["t3_from"] == utc.KERNEL and sample["t3_ns"] == brought[sample["seq"]]
            assert written <= sample["t3_ns"] < written + SECOND_NS  # the same send, stamped as it left
        else:
            assert sample["t3_from"] == utc.USER and sample["t3_ns"] == written
    assert summary["samples"][-1]["seq"] not in brought  # no later reply brought its stamp
    assert 1 <= len(brought) == 12 - summary["timestamps"]["server_transmit_fallbacks"]


@needs_linux("SO_TIMESTAMPING's transmit stamps")
def test_a_lost_reply_leaves_the_probe_before_it_the_servers_own_t3(start_server, relay, capsys):
    server = start_server(log=None)
    hop = relay(server.address, lambda index, data: [] if seq_of(data) == 4 else [(0.0, data)])
    summary = measure_json(capsys, *hop.address, "-c", 10, "-i", 0.01, "-W", 0.3)
    froms = {sample["seq"]: sample["t3_from"] for sample in summary["samples"]}
    assert froms[4] is None and froms[3] == utc.USER and froms[9] == utc.USER  # 4's reply carried 3's
    assert all(froms[seq] == utc.KERNEL for seq in (0, 1, 2, 5, 6, 7, 8))
    assert summary["timestamps"]["server_transmit"] == "mixed"


@pytest.mark.parametrize("server_stamps, flag", [(utc.KERNEL, "--no-interleaved"),
                                                 (utc.USER, "--interleaved")])
def test_without_interleaving_every_t3_is_the_servers_own(start_server, relay, capsys, server_stamps, flag):
    server = start_server(log=None, timestamps=server_stamps)  # user: no transmit stamps either
    hop = relay(server.address)
    summary = measure_json(capsys, *hop.address, "-c", 5, "-i", 0.01, flag)
    assert summary["received"] == 5 and summary["timestamps"]["server_transmit"] == utc.USER
    assert all(sample["t3_from"] == utc.USER for sample in summary["samples"])
    assert all("xt" not in json.loads(reply)[2] for reply in hop.replies)
    asked = [json.loads(request)[2].get("xl") for request in hop.requests]
    assert asked == ([1] * 5 if flag == "--interleaved" else [None] * 5)


def test_interleaved_against_the_tutorials_server(reference_server, capsys):
    _, port = reference_server()
    summary = measure_json(capsys, "127.0.0.1", port, "-c", 4, "-i", "0", "--interleaved")
    assert summary["received"] == 4 and summary["timestamps"]["server_transmit"] is None


# --- one-way delays -------------------------------------------------------------------------

def synced(maxerror_ms):
    return lambda: utc.ClockState(True, int(maxerror_ms * 1e6), int(maxerror_ms * 1e5), 0, "tsc")


def test_one_way_delays_when_both_kernels_are_synchronised(start_server):
    shift_ns = 1_500_000  # the server's clock 1.5 ms ahead: within what both kernels claim (2 + 3 ms)
    server = start_server(log=None, wall_clock=lambda: utc.wall_ns() + shift_ns, clock_state=synced(2))
    summary = utc.summarize(probe(server.address, count=20, interval=0.005, clock_state=synced(3)))
    up, down = summary["owd_up_ms"], summary["owd_down_ms"]
    rtt_ms = summary["rtt_ms"]["max"]  # each true one-way delay lies from 0 to the round trip
    stamps = summary["timestamps"]
    stamp_error_ms = 0.01 if stamps["client"] == stamps["server"] == utc.KERNEL else 1.0
    for leg in (up, down):
        assert leg["err"] == pytest.approx(5 + stamp_error_ms)  # both max errors, and the stamps' own
        assert leg["median"] - leg["err"] <= rtt_ms and leg["median"] + leg["err"] >= 0  # the truth is in
    assert up["median"] == pytest.approx(1.5, abs=1.0) and down["median"] == pytest.approx(-1.5, abs=1.0)
    assert summary["owd_reason"] is None


@pytest.mark.parametrize("server_state, local_state, reason", [
    (synced(2), lambda: utc.ClockState(False, 16_000_000_000, 0, 0, "tsc"), "this machine's clock is not"),
    (lambda: utc.UNKNOWN_CLOCK, synced(2), "the server's clock state is unknown"),
])
def test_no_one_way_delay_without_both_kernels_synchronised(start_server, server_state, local_state, reason,
                                                            capsys):
    server = start_server(log=None, clock_state=server_state)
    prober = utc.Prober(*server.address[:2], count=5, interval=0.005, clock_state=local_state)
    summary = utc.summarize(prober.run())
    assert summary["owd_up_ms"] is summary["owd_down_ms"] is None and reason in summary["owd_reason"]
    assert summary["send_queueing_ms"] is not None  # each leg above its own minimum needs no sync
    assert any(line.startswith("one-way delays: not given ({}".format(reason))
               for line in utc.format_summary(summary))


# --- TOS and TTL ----------------------------------------------------------------------------

def test_a_dscp_mark_arrives_and_comes_back_on_loopback(start_server, capsys):
    server = start_server(log=None)
    summary = measure_json(capsys, *server.address, "-c", 5, "-i", 0.005, "--tos", "EF")
    assert summary["tos"]["sent"] == 0xb8
    if utc.LINUX:
        assert summary["tos"]["received_by_server"] == summary["tos"]["received_back"] == 0xb8
        assert summary["tos"]["changed_out"] == summary["tos"]["changed_back"] == 0
        assert summary["tos"]["checked"] == 4  # the first request turned the server's report on


@needs_linux("IP_RECVTOS")
@pytest.mark.parametrize("cleared", ["out", "back"])
def test_a_relay_that_clears_the_mark_is_seen_on_its_leg(start_server, relay, capsys, cleared):
    server = start_server(log=None)
    hop = relay(server.address)
    if cleared == "back":  # requests go on marked EF; replies leave the relay unmarked
        hop.mark(socket.IPPROTO_IP, socket.IP_TOS, 0xb8)
    assert utc.main(["client", *map(str, hop.address), "-c", "5", "-i", "0.005", "--tos", "AF41"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("TOS "))
    assert line.startswith("TOS 0x88 (AF41) sent, ")
    if cleared == "out":
        assert line.endswith(", 0x00 (BE) at the server, 0x00 (BE) back: changed on the way out (4 of 4 "
                             "replies)")
    else:
        assert line.endswith(", 0xb8 (EF) at the server, 0x00 (BE) back: changed on the way out (4 of 4 "
                             "replies); changed on the way back (4 of 4 replies)")


@needs_linux("IP_RECVTTL")
def test_the_ttl_at_the_server_gives_the_hops_and_a_change_of_path(start_server, relay, capsys):
    server = start_server(log=None)

    forwarded_before = []

    def reroute(index, data):  # after the tenth reply, requests leave the relay with 3 fewer hops left
        if index == 9:
            hop.mark(socket.IPPROTO_IP, socket.IP_TTL, 61)
            forwarded_before.append(len(hop.requests))  # one thread forwards them all, in order
        return [(0.0, data)]
    hop = relay(server.address, reroute)
    summary = measure_json(capsys, *hop.address, "-c", 20, "-i", 0.005, "--ttl", "64")
    ttl = summary["ttl"]
    assert ttl["sent"] == 64 and ttl["received_by_server"] == 61 and ttl["hops"] == 3
    changed = seq_of(hop.requests[forwarded_before[0]])  # the first to leave with the new TTL
    assert [(change["from"], change["to"], change["seq"]) for change in ttl["changes"]] == [(64, 61, changed)]


def test_tos_names_and_numbers():
    assert [utc.tos_value(text) for text in ("EF", "af41", "CS6", "0xb8", "184", "le")] == [
        184, 136, 192, 184, 184, 4]
    assert utc.dscp_name(0xb9) == "0xb9 (EF, ECN 1)" and utc.dscp_name(0x04) == "0x04 (LE)"
    for bad in ("AF51", "256", "-1", "fast"):
        with pytest.raises(Exception, match="neither a TOS byte"):
            utc.tos_value(bad)


# --- the source address and source ports ------------------------------------------------------

def test_the_source_address_is_what_the_server_sees(start_server, capsys):
    server = start_server()
    summary = measure_json(capsys, *server.address, "-c", 2, "-i", "0", "-I", "127.0.0.2")
    assert summary["received"] == 2 and summary["local_address"] == "127.0.0.2"
    assert server.logs and all(line.startswith("127.0.0.2:") for line in server.logs)


def test_several_source_ports_each_get_their_share_and_the_bad_one_shows(start_server, relay, capsys):
    server = start_server(log=None)
    bad = []

    def black_hole(index, data, client):  # one equal-cost path drops everything
        bad.append(client[1]) if not bad else None
        return client[1] != bad[0]
    hop = relay(server.address, forward=black_hole)
    assert utc.main(["client", *map(str, hop.address), "-c", "40", "-i", "0.002", "-W", "0.3",
                     "--ports", "4"]) == 1 - 1  # 30 answered: a valid measurement
    out = capsys.readouterr().out
    assert "40 probes sent, 30 received" in out
    per_port = [line for line in out.splitlines() if line.startswith("source port ")]
    assert len(per_port) == 4
    assert "source port {}: 10 sent, 0 received, 10 lost, rtt median/p99 = n/a".format(bad[0]) in per_port
    summary = measure_json(capsys, *server.address, "-c", 8, "-i", 0.002, "--ports", 4)
    ports = summary["ports"]
    assert len({port["port"] for port in ports}) == 4 and [port["sent"] for port in ports] == [2] * 4
    assert [sample["port"] for sample in summary["samples"]] == [0, 1, 2, 3] * 2


# --- outages --------------------------------------------------------------------------------

def test_outages_are_printed_as_they_end_and_summed(start_server, relay, capsys):
    server = start_server(log=None)
    hop = relay(server.address,
                forward=lambda index, data, client: not (5 <= seq_of(data) < 9 or seq_of(data) == 15))
    assert utc.main(["client", *map(str, hop.address), "-c", "20", "-i", "0.01", "-W", "0.2"]) == 0
    out = capsys.readouterr().out.splitlines()
    ended = [line for line in out if line.startswith("outage ")]
    assert [line.split(": ", 1)[1] for line in ended] == ["4 probes lost (seq=5-8)", "1 probe lost (seq=15)"]
    assert out.index(ended[0]) > out.index(next(line for line in out if "seq=9 " in line))  # as it ended
    summary_line = next(line for line in out if line.startswith("outages "))
    assert summary_line.startswith("outages 2, longest 0.0")


NFT_OUTAGE = """
import json, subprocess, sys, time
sys.path[:0] = [{root!r}, {tests!r}]
import udp_timecheck as utc
from conftest import wait_for

def nft(*words):
    return subprocess.run(["nft", *words], check=True, stdout=subprocess.PIPE, universal_newlines=True).stdout

with utc.TimeServer("127.0.0.1", 0) as server:
    server.start()
    port = server.address[1]
    prober = utc.Prober("127.0.0.1", port, count=0, interval=0.02, timeout=0.3, deadline=30)
    runner = __import__("threading").Thread(target=prober.run)
    runner.start()
    wait_for(lambda: prober.recorder is not None and prober.recorder.totals.received >= 10)
    nft("add", "table", "inet", "outage")
    nft("add", "chain", "inet", "outage", "input", "{{ type filter hook input priority 0 ; }}")
    nft("add", "rule", "inet", "outage", "input", "udp", "dport", str(port), "counter", "drop")
    sent = prober.recorder.probes_sent
    wait_for(lambda: prober.recorder.probes_sent >= sent + 25)  # half a second of probes dropped
    nft("insert", "rule", "inet", "outage", "input", "udp", "dport", str(port), "accept")  # the end
    dropped = int(nft("list", "table", "inet", "outage").split("packets ")[1].split()[0])
    received = prober.recorder.totals.received
    totals = prober.recorder.totals
    wait_for(lambda: totals.lost >= dropped and totals.received >= received + 10)
    prober.stop()
    runner.join(10)
summary = utc.summarize(prober.recorder)
stopped = sum(sample["lost_because"] == utc.INTERRUPTED for sample in summary["samples"])
print(json.dumps({{"dropped": dropped, "lost": summary["lost"] - stopped, "lost_up": summary["lost_up"],
                  "lost_down": summary["lost_down"], "outages": summary["outages"]}}))
"""


@needs_linux("a network namespace (unshare -rn) and nftables")
def test_an_outage_made_with_nftables_in_a_namespace(tmp_path):
    require_programs("unshare", "ip", "nft")
    script = NFT_OUTAGE.format(root=str(ROOT), tests=str(ROOT / "tests"))
    result = run(["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1"', sys.executable,
                  script], timeout=60)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    dropped = found["dropped"]  # the firewall's own count: the truth
    assert dropped >= 25 and found["lost"] == found["lost_up"] == dropped and found["lost_down"] == 0
    outages = found["outages"]
    assert outages["count"] == 1 and outages["longest_s"] == outages["total_s"]
    assert (dropped - 1) * 0.02 < outages["longest_s"] < dropped * 0.02 + 1.0  # the sends it spans, about


# --- as Prometheus series ----------------------------------------------------------------------

@needs_linux("IP_RECVTOS and IP_RECVTTL")
def test_the_path_as_prometheus_series_promtool_accepts(start_server, relay, tmp_path):
    server = start_server(log=None)
    hop = relay(server.address, lambda index, data: [] if seq_of(data) == 6 else [(0.0, data)],
                forward=lambda index, data, client: seq_of(data) not in (3, 4))
    prober = utc.Prober(*hop.address[:2], count=10, interval=0.005, timeout=0.3,
                        path=utc.PathOptions(tos=0xb8, ttl=64))
    summary = utc.summarize(prober.run())
    text = utc.render_client_metrics([prober.recorder])
    target = '{{target="{}"}}'.format(prober.target)
    expected = {"lost_up_total": 2, "lost_down_total": 1, "outages_total": 2, "tos_preserved": 0,
                "hops": 0, "path_changes_total": 0}  # the relay sends unmarked: the mark is lost
    for name, value in expected.items():
        assert "udp_timecheck_{}{} {}\n".format(name, target, value) in text, name
    assert (summary["lost_up"], summary["lost_down"]) == (2, 1)
    require_programs("promtool")
    check = run(["promtool", "check", "metrics"], input=text)
    assert check.returncode == 0, check.stdout + check.stderr
