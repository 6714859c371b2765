"""Kernel timestamps on both ends, their fallbacks, and replies from the address asked."""

import json
import socket
import subprocess
import sys

import pytest

import udp_timecheck as utc
from conftest import (MODULE, SECOND_NS, ipv6_loopback_available, needs_linux, request, require_programs,
                      wall_clock_shifted_ns)

KERNEL_STAMPS = needs_linux("kernel timestamps in ns (SO_TIMESTAMPNS, SO_TIMESTAMPING)")


@KERNEL_STAMPS
def test_kernel_stamps_on_both_ends_by_default(start_server):
    server = start_server()
    assert server.timestamps == utc.KERNEL
    summary = utc.summarize(utc.Prober(*server.address[:2], count=20).run())
    stamps = summary["timestamps"]
    assert stamps["client"] == stamps["server"] == utc.KERNEL and stamps["transmit"] is True
    assert stamps["described"] == "kernel (both ends)"
    # a preemption between two clock readings makes a probe fall back: rare, never the rule
    assert stamps["user_fallbacks"] <= 2 and stamps["transmit_fallbacks"] <= 2
    assert sum(sample["t1_from"] == sample["t4_from"] == utc.KERNEL for sample in summary["samples"]) >= 18
    assert summary["server_proc_ms"] is not None  # the server's wake-up is in T3 - T2 now


@KERNEL_STAMPS
@pytest.mark.parametrize("client_mode", [utc.KERNEL, utc.USER])
@pytest.mark.parametrize("server_mode", [utc.KERNEL, utc.USER])
def test_shifted_server_clock_gives_its_offset_on_every_path(start_server, client_mode, server_mode):
    """The kernel stamps on the real clock; the server's injected clock is 5 s ahead of it."""
    server = start_server(wall_clock=wall_clock_shifted_ns(5 * SECOND_NS), timestamps=server_mode)
    summary = utc.summarize(utc.Prober(*server.address[:2], count=20, timestamps=client_mode).run())
    assert summary["received"] == 20
    assert abs(summary["offset_ms"] - 5000) <= summary["offset_err_ms"] + 0.01
    assert summary["timestamps"]["client"] == client_mode and summary["timestamps"]["server"] == server_mode
    assert server.stats.user_stamps == 0


@KERNEL_STAMPS
def test_shifted_client_clock_gives_the_opposite_offset(start_server):
    server = start_server()
    behind = wall_clock_shifted_ns(-7 * SECOND_NS)
    summary = utc.summarize(utc.Prober(*server.address[:2], count=20, wall_clock=behind).run())
    assert abs(summary["offset_ms"] - 7000) <= summary["offset_err_ms"] + 0.01
    stamps = summary["timestamps"]
    assert stamps["user_fallbacks"] <= 2 and stamps["transmit_fallbacks"] <= 2  # see above


@KERNEL_STAMPS
def test_a_process_clock_that_disagrees_with_the_kernels_falls_back_and_is_counted(start_server, monkeypatch):
    """This process's reading of the wall clock is 30 s ahead of the kernel's, as under libfaketime:
    the gap is measured (a datagram to itself, which the kernel stamps), and no kernel stamp is
    used on either end, not even as a 30-second backlog; the server is 5 s ahead, and says so."""
    monkeypatch.setattr(utc, "wall_ns", wall_clock_shifted_ns(30 * SECOND_NS, utc.wall_ns))
    server = start_server(wall_clock=wall_clock_shifted_ns(5 * SECOND_NS))
    summary = utc.summarize(utc.Prober(*server.address[:2], count=10).run())
    assert summary["received"] == 10
    assert server.stats.user_stamps == 10
    stamps = summary["timestamps"]
    assert stamps["server"] == utc.USER and stamps["user_fallbacks"] == 10
    assert stamps["transmit_fallbacks"] == 10
    assert abs(summary["offset_ms"] - 5000) <= summary["offset_err_ms"]


@KERNEL_STAMPS
def test_kernel_stamps_leave_the_wake_ups_out_of_every_probe(start_server):
    """In each probe the kernel's T1 and T4 lie within the clock readings taken just before the
    send and just after the receive: every kernel RTT is at most that probe's user-space RTT, and
    the run's total is shorter by the wake-ups."""
    server = start_server()
    stamped = [sample for sample in utc.Prober(*server.address[:2], count=200).run().samples
               if sample.timing.kernel and sample.timing.trusted and sample.timing.proc_ns is not None]
    assert len(stamped) >= 190  # a preemption between clock readings may make a probe fall back
    for sample in stamped:
        assert sample.t1_user <= sample.t1 <= sample.t4 <= sample.t4_user
        user_rtt_ns = (sample.t4_user - sample.t1_user) - sample.timing.proc_ns
        assert 0 <= sample.timing.rtt_ns <= user_rtt_ns
    assert sum(sample.t4_user - sample.t4 for sample in stamped) > 0


@KERNEL_STAMPS
def test_user_timestamps_are_said_and_still_bound_the_offset(start_server):
    server = start_server()
    user = utc.summarize(utc.Prober(*server.address[:2], count=50, timestamps=utc.USER).run())
    assert user["timestamps"]["client"] == utc.USER and user["timestamps"]["transmit"] is False
    assert abs(user["offset_ms"]) <= user["offset_err_ms"] + 0.001


def test_cli_timestamps_option_on_both_ends(start_server, capsys):
    server = start_server(timestamps=utc.USER)
    argv = ["client", *map(str, server.address[:2]), "-c", "3", "-i", "0", "--timestamps", "user"]
    assert utc.main(argv) == 0
    out = capsys.readouterr().out
    assert ", user timestamps" in out.splitlines()[0]
    assert "timestamps: user-space (both ends)" in out
    assert utc.main(argv[:-2] + ["--json"]) == 0
    stamps = json.loads(capsys.readouterr().out)["timestamps"]
    assert stamps["server"] == utc.USER
    assert stamps["client"] == (utc.KERNEL if utc.SO_TIMESTAMPNS else utc.USER)


def test_tutorial_server_sends_no_stamps_and_we_say_so():
    assert utc.describe_timestamps(utc.KERNEL, None) == "kernel here; the server sends none"
    assert utc.describe_timestamps(utc.KERNEL, utc.USER) == "kernel here, user-space at the server"
    assert utc.describe_timestamps(utc.USER, utc.KERNEL) == "user-space here, kernel at the server"


@KERNEL_STAMPS
def test_wildcard_server_replies_from_the_address_asked(start_server):
    server = start_server(host="0.0.0.0")
    assert server.packet_info
    port = server.address[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # unconnected: sees the source
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(10)
        sock.sendto(request(1, seq=0, pad_to=200), ("127.0.0.2", port))
        reply, source = sock.recvfrom(65535)
    assert source == ("127.0.0.2", port)  # not 127.0.0.1, the kernel's own choice of source
    measurement = utc.Prober("127.0.0.2", port, count=5).run()
    assert measurement.totals.received == 5


@KERNEL_STAMPS
@pytest.mark.skipif(not ipv6_loopback_available(), reason="this machine has no ::1")
def test_dual_stack_wildcard_answers_ipv4_from_the_address_asked(start_server):
    server = start_server(host="::")
    measurement = utc.Prober("127.0.0.2", server.address[1], count=5).run()
    assert measurement.totals.received == 5


NAMESPACE_SCRIPT = """
import socket, sys
sys.path.insert(0, {root!r})
import udp_timecheck as utc
with utc.TimeServer("::", 0) as server:
    server.start()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", 0))  # asks fd00::2 from ::1: the kernel's own choice would be ::1
        sock.settimeout(10)
        sock.sendto(utc.encode_request(1, "x", 0, pad_to=250), ("fd00::2", server.address[1]))
        reply, source = sock.recvfrom(65535)
    print(source[0], utc.Prober("fd00::2", server.address[1], count=3).run().totals.received)
"""


@KERNEL_STAMPS
def test_ipv6_wildcard_replies_from_the_address_asked_in_a_private_namespace():
    require_programs("unshare", "ip")
    setup = "ip link set lo up && ip -6 addr add fd00::2/128 dev lo nodad && exec \"$0\" -c \"$1\""
    result = subprocess.run(["unshare", "-rn", "sh", "-c", setup, sys.executable,
                             NAMESPACE_SCRIPT.format(root=str(MODULE.parent))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["fd00::2", "3"]


@KERNEL_STAMPS
def test_read_ancillary_takes_the_stamp_and_keeps_the_packet_info():
    stamp = (socket.SOL_SOCKET, utc.SO_TIMESTAMPNS, utc.TIMESPEC.pack(1_700_000_000, 123_456_789))
    info = (socket.IPPROTO_IP, 8, bytes(12))
    assert utc.read_ancillary([stamp, info]) == (1_700_000_000_123_456_789, [info])
    assert utc.read_ancillary([info, stamp]) == (1_700_000_000_123_456_789, [info])
    assert utc.read_ancillary([info]) == (None, [info])
    short = (socket.SOL_SOCKET, utc.SO_TIMESTAMPNS, b"\x01\x02")
    assert utc.read_ancillary([short, info]) == (None, [info])
