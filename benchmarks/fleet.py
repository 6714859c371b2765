#!/usr/bin/env python3
"""Fleets: one client measuring many targets, one target behind a slow path, and a 20-node mesh.

    python3 benchmarks/fleet.py            # about three minutes
    python3 benchmarks/fleet.py --quick    # the scale table only, to 100 targets
    python3 benchmarks/fleet.py --check    # exit 1 when a target is missed

1. Scale: one server on 0.0.0.0, and one client measuring N targets (127.0.0.1 to
   127.0.0.N) at -i 0.1 for 10 s, for N from 1 to 200: the client's CPU while it
   runs (from /proc, between its 2nd and 9th second: start-up and the summary
   left out), its peak RSS, the share of each target's probes answered, and each
   target's p50 against a single target's at the same interval.  Targets at 100
   targets: every one at least 99% answered, each p50 within 2x of one target's,
   under 25% of one core and under 100 MB.
2. Isolation: 10 targets, one of them behind a relay that adds 20 ms (it holds
   each datagram 10 ms): that one reads what the relay's own log says it held,
   plus the others' RTT, within 0.5 ms; the others stay under 1 ms.
3. A mesh: 20 nodes on this machine, each serving and measuring the other 19,
   for a minute: every pair measured (the matrix has no missing pair).

Every process runs on 127.0.0.0/8 and is started and stopped here.
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_runs import DelayRelay, report_targets  # noqa: E402 - the relay that holds datagrams, shared

ROOT = Path(__file__).resolve().parent.parent
MODULE = str(ROOT / "udp_timecheck.py")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open("/proc/{}/stat".format(pid)) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime and stime


def peak_rss_mb(pid):
    with open("/proc/{}/status".format(pid)) as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(targets, port, seconds=10, interval="0.1"):
    """(summaries, CPU share of one core while running, peak RSS MB) of one client run."""
    argv = [sys.executable, MODULE, "client"] + targets + [str(port), "-c", "0", "-w", str(seconds),
                                                           "-i", interval, "-q", "--json"]
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    first = threading.Event()
    first.wait(2)
    before = cpu_seconds(client.pid)
    first.wait(seconds - 3)
    used, peak = cpu_seconds(client.pid) - before, peak_rss_mb(client.pid)
    out, err = client.communicate(timeout=120)
    measured = json.loads(out)
    return measured.get("targets", [measured]), used / (seconds - 3), peak


def scale(port, counts):
    print("Scale: one client, N targets at -i 0.1 for 10 s, one server on 0.0.0.0")
    print("  {:>4}  {:>9}  {:>8}  {:>13}  {:>15}".format("N", "CPU", "peak RSS", "least answered",
                                                         "p50 median/max"))
    rows, single_p50 = {}, None
    for count in counts:
        hosts = ["127.0.0.{}".format(index) for index in range(1, count + 1)]
        summaries, cpu, rss = measure(hosts, port)
        answered = min(summary["received"] / summary["sent"] for summary in summaries)
        p50 = [summary["rtt_ms"]["median"] for summary in summaries]
        single_p50 = single_p50 or statistics.median(p50)
        rows[count] = {"cpu": cpu, "rss": rss, "answered": answered, "p50_ratio": max(p50) / single_p50}
        print("  {:>4}  {:>8.1%}  {:>5.1f} MB  {:>13.2%}  {:.3f}/{:.3f} ms".format(
            count, cpu, rss, answered, statistics.median(p50), max(p50)))
    return rows


def isolation(port):
    print("\nIsolation: 10 targets, one behind a relay that adds 20 ms (10 ms each way)")
    relay = DelayRelay(port, delay_s=0.01, jitter_s=0.0)
    try:
        hosts = ["127.0.0.{}:{}".format(index, port) for index in range(1, 10)]
        delayed = "127.0.0.1:{}".format(relay.port)
        summaries, _, _ = measure(hosts + [delayed], port, seconds=10)
    finally:
        relay.stop()
    p50 = {summary["target"]: summary["rtt_ms"]["median"] for summary in summaries}
    held_ms = 2 * statistics.median(relay.held) * 1000  # the relay's log: how long it really held each
    slow = p50.pop(delayed) - held_ms - statistics.median(p50.values())
    print("  behind the relay: p50 {:.3f} ms; the relay's log: {:.3f} ms held, a request and its reply "
          "(asked 20 ms); the rest {:+.3f} ms, against the others' p50".format(
              slow + held_ms + statistics.median(p50.values()), held_ms, slow))
    print("  the other nine: p50 at most {:.3f} ms".format(max(p50.values())))
    return {"isolation_extra_ms": slow, "others_max_ms": max(p50.values())}


def free_ports(count):
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def mesh(nodes, seconds, tmp):
    print("\nA mesh: {} nodes on this machine, each measuring the others, for {} s".format(nodes, seconds))
    peers = Path(tmp) / "peers"
    ports = free_ports(nodes)
    peers.write_text("".join("node{} 127.0.0.1:{}\n".format(index, port) for index, port in enumerate(ports)))
    processes = [subprocess.Popen([sys.executable, MODULE, "mesh", "--peers", str(peers), "--listen",
                                   "127.0.0.1:{}".format(port), "-w", str(seconds), "--json"],
                                  stdout=open(str(Path(tmp) / "node{}.json".format(index)), "w"),
                                  stderr=subprocess.DEVNULL) for index, port in enumerate(ports)]
    for process in processes:
        process.wait(timeout=seconds + 60)
    files = [str(Path(tmp) / "node{}.json".format(index)) for index in range(nodes)]
    matrix = json.loads(subprocess.run([sys.executable, MODULE, "matrix", "--json"] + files,
                                       stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout)
    losses = [cell["loss_pct"] for cell in matrix["cells"] if cell["loss_pct"] is not None]
    print("  {} pairs measured of {}, {} missing; loss per pair at most {:.2f}%".format(
        len(matrix["cells"]), nodes * (nodes - 1), len(matrix["missing"]), max(losses)))
    return {"mesh_missing": len(matrix["missing"]), "mesh_pairs": len(matrix["cells"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--quick", action="store_true", help="the scale table only, to 100 targets")
    args = parser.parse_args()
    print("udp-timecheck fleets, Python {}, {} CPUs".format(sys.version.split()[0], os.cpu_count()))
    server = subprocess.Popen([sys.executable, MODULE, "server", "0.0.0.0", "0", "-q"],
                              stdout=subprocess.PIPE, universal_newlines=True)
    port = int(re.search(r"Server listening at \S*:(\d+);", server.stdout.readline()).group(1))
    try:
        rows = scale(port, (1, 10, 50, 100) if args.quick else (1, 10, 50, 100, 200))
        figures = {} if args.quick else isolation(port)
    finally:
        server.terminate()
        server.wait(timeout=10)
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            figures.update(mesh(20, 60, tmp))
    hundred = rows[100]
    checks = [("targets answered >= 99% each, at 100", hundred["answered"], hundred["answered"] >= 0.99,
               ">= 0.99"),
              ("p50 / one target's p50, at 100", hundred["p50_ratio"], hundred["p50_ratio"] <= 2, "<= 2"),
              ("client CPU, share of one core, at 100", hundred["cpu"], hundred["cpu"] < 0.25, "< 0.25"),
              ("client peak RSS MB, at 100", hundred["rss"], hundred["rss"] < 100, "< 100")]
    if not args.quick:
        checks += [("20 ms relay: p50 less its log and the others' p50, ms", figures["isolation_extra_ms"],
                    abs(figures["isolation_extra_ms"]) <= 0.5, "+- 0.5"),
                   ("the others' p50, ms", figures["others_max_ms"], figures["others_max_ms"] < 1, "< 1"),
                   ("mesh pairs missing", figures["mesh_missing"], figures["mesh_missing"] == 0, "0")]
    report_targets(checks, args.check, name_width=42)


if __name__ == "__main__":
    main()
