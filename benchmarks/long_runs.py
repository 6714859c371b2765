#!/usr/bin/env python3
"""Long runs and honest figures: flat memory, exact percentiles, and a drift only where there is one.

    python3 benchmarks/long_runs.py            # about two minutes
    python3 benchmarks/long_runs.py --check    # the same, exit 1 when a target is missed

1. Memory: the client's peak RSS for `-c 300000 -i 0 -q` against a local
   server, beside that for `-c 20000 -i 0 -q`; the target is within 8 MB.
2. Percentiles on loopback: a run of 20,000 probes writes every RTT with
   --csv; the exact percentiles of those rows (numpy.percentile's linear
   interpolation, worked out here) against the summary's printed ones.
3. Percentiles through a relay that adds 50 ms each way, +- 0.5 ms at
   random: 1,000 probes at -i 0.01, the same comparison.  The target for both
   is within max(1 us, 0.01%).
4. Drift: a server whose clock runs 500 ppm fast (a TimeServer with that
   clock, in its own process) and a 10-second run at -i 0.01; the target is
   +500 +- 25 ppm.
5. One clock: the README's `-c 1000 -i 0.001`, five times, and three
   10-second runs at -i 0.01, against a server on this machine (the truth is
   0 ppm); the target is that none says the clocks run at different rates.

Every process runs on 127.0.0.1 and is started and stopped here.
"""

import argparse
import csv
import heapq
import json
import random
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = str(ROOT / "udp_timecheck.py")

# A client run in a process of its own, reporting its own peak RSS (ru_maxrss, in KiB on Linux).
MEASURED_CLIENT = """
import resource, runpy, sys
sys.argv = [{module!r}] + sys.argv[1:]
try:
    runpy.run_path({module!r}, run_name="__main__")
except SystemExit as exit:
    code = exit.code
print("peak-rss-kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""

FAST_SERVER = """
import sys
sys.path.insert(0, {root!r})
import udp_timecheck as utc
start = utc.wall_ns()
fast = lambda: (lambda now: now + (now - start) * {ppm} // 1000000)(utc.wall_ns())
with utc.TimeServer("127.0.0.1", 0, wall_clock=fast) as server:
    print(server.address[1], flush=True)
    server.serve_forever()
"""


class Server:
    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, universal_newlines=True)
        first = self.proc.stdout.readline()
        self.port = int(re.search(r"Server listening at \S*:(\d+);", first).group(1)) \
            if first.startswith("Server") else int(first)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def client(port, *args):
    """(summary JSON or None, peak RSS in MB) of one client run."""
    argv = [sys.executable, "-c", MEASURED_CLIENT.format(module=MODULE), "client", "127.0.0.1", str(port)]
    result = subprocess.run(argv + [str(arg) for arg in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=600)
    peak = [line for line in result.stderr.splitlines() if line.startswith("peak-rss-kib")]
    summary = json.loads(result.stdout.splitlines()[-1]) if "--json" in args else None
    return summary, int(peak[0].split()[1]) / 1024


def memory(port, counts):
    print("Memory: the client's peak RSS, -i 0 -q against a local server")
    peaks = {}
    for count in counts:
        _, peaks[count] = client(port, "-c", count, "-i", "0", "-q")
        print("  -c {:<8} {:7.1f} MB".format(count, peaks[count]))
    growth = peaks[counts[1]] - peaks[counts[0]]
    print("  growth: {:+.1f} MB for {:.0f} times the probes".format(growth, counts[1] / counts[0]))
    return {"memory_mb": growth}


def exact_percentile(ordered, fraction):
    """numpy.percentile's default (linear interpolation), written out here."""
    position = (len(ordered) - 1) * fraction
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def percentiles(port, tmp, name, *args):
    """The worst error of the printed p50, p90 and p99 against the exact ones of the run's CSV,
    in units of the tolerance max(1 us, 0.01%): at most 1 is within it."""
    rows_path = Path(tmp) / "rows.csv"
    summary, _ = client(port, "--json", "--csv", rows_path, *args)
    with open(str(rows_path), newline="") as handle:
        rtts = sorted(float(row["rtt_ms"]) for row in csv.DictReader(handle) if row["status"] == "ok")
    print("  {}: {} replies".format(name, len(rtts)))
    worst = 0.0
    for key, fraction in (("median", 0.5), ("p90", 0.9), ("p99", 0.99)):
        exact, reported = exact_percentile(rtts, fraction), summary["rtt_ms"][key]
        error = abs(reported - exact) / max(0.001, 1e-4 * exact)
        worst = max(worst, error)
        print("    {:<7} exact {:.6f} ms  reported {:.6f} ms  error {:.4f} of the tolerance".format(
            key, exact, reported, error))
    return worst


class DelayRelay:
    """client -> relay -> server and back, each datagram held delay_s +- jitter_s at random; its
    log (.held) has how long each was really held, the truth a measurement is checked against."""

    def __init__(self, upstream, delay_s=0.05, jitter_s=0.0005):
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.connect(("127.0.0.1", upstream))
        self.port, self.delay_s, self.jitter_s = self.front.getsockname()[1], delay_s, jitter_s
        self.client, self.due, self.stopping, self.held = None, [], False, []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        rng, counter = random.Random(1), 0
        while not self.stopping:
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                _, _, arrived, sock, data, target = heapq.heappop(self.due)
                sock.sendto(data, target) if target else sock.send(data)
                self.held.append(time.monotonic() - arrived)
            wait = min(0.01, self.due[0][0] - now) if self.due else 0.01
            for sock in select.select([self.front, self.back], [], [], max(0.0, wait))[0]:
                if sock is self.front:
                    data, self.client = self.front.recvfrom(65535)
                    out = (self.back, data, None)
                else:
                    out = (self.front, self.back.recv(65535), self.client)
                counter += 1
                arrived = time.monotonic()
                at = arrived + self.delay_s + rng.uniform(-self.jitter_s, self.jitter_s)
                heapq.heappush(self.due, (at, counter, arrived) + out)

    def stop(self):
        self.stopping = True
        self.thread.join(timeout=5)


def drift(seconds, ppm):
    print("\nDrift: a server clock {} ppm fast, {:g} s at -i 0.01".format(ppm, seconds))
    server = Server([sys.executable, "-c", FAST_SERVER.format(root=str(ROOT), ppm=ppm)])
    try:
        summary, _ = client(server.port, "-c", "0", "-w", seconds, "-i", "0.01", "--json")
    finally:
        server.stop()
    print("  drift {:+.3f} ppm +- {:.3f} ppm, offset at the end {:+.3f} ms, clock steps: {}".format(
        summary["drift_ppm"], summary["drift_err_ppm"], summary["offset_end_ms"], summary["clock_steps"]))
    return {"drift_ppm": summary["drift_ppm"]}


def one_clock(port):
    print("\nOne clock (the truth is 0 ppm): what the client says of the clocks' rates")
    claims = 0
    runs = [("-c", "1000", "-i", "0.001")] * 5 + [("-c", "0", "-w", "10", "-i", "0.01")] * 3
    for args in runs:
        summary, _ = client(port, "--json", *args)
        drift, error = summary["drift_ppm"], summary["drift_err_ppm"]
        claimed = drift is not None and abs(drift) > 3 * error
        claims += claimed
        print("  {:<24} drift {:+.3f} ppm +- {:.3f} ppm{}".format(
            " ".join(args), drift, error, "  CLAIMED" if claimed else ""))
    return {"one_clock_claims": claims}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    print("udp-timecheck long runs, Python {}".format(sys.version.split()[0]))
    server = Server([sys.executable, MODULE, "server", "127.0.0.1", "0", "-q"])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            figures = memory(server.port, (20000, 300000))
            print("\nPercentiles: the printed ones against the exact ones of every row (the run's CSV)")
            worst = percentiles(server.port, tmp, "loopback, -c 20000 -i 0", "-c", "20000", "-i", "0")
            relay = DelayRelay(server.port)
            try:
                worst = max(worst, percentiles(relay.port, tmp, "a relay adding 50 ms +- 0.5 ms each way, "
                                               "-c 1000 -i 0.01", "-c", "1000", "-i", "0.01"))
            finally:
                relay.stop()
            figures["percentile_error"] = worst
        figures.update(one_clock(server.port))
    finally:
        server.stop()
    figures.update(drift(10, 500))
    checks = [("client peak RSS growth, MB", figures["memory_mb"], figures["memory_mb"] <= 8, "<= 8"),
              ("worst percentile error, in tolerances", figures["percentile_error"],
               figures["percentile_error"] <= 1, "<= 1"),
              ("drift of a 500 ppm fast clock, ppm", figures["drift_ppm"],
               abs(figures["drift_ppm"] - 500) <= 25, "500 +- 25"),
              ("one-clock runs that claim a drift", figures["one_clock_claims"],
               figures["one_clock_claims"] == 0, "0")]
    report_targets(checks, args.check)


def report_targets(checks, check, name_width=40):
    """Print each (name, value, held, target); with check, exit 1 when one was missed."""
    print("\nTargets:")
    for name, value, held, target in checks:
        print("  {:<{}} {:10.4f}  target {:<10} {}".format(name, name_width, value, target,
                                                          "ok" if held else "MISSED"))
    if check and not all(held for _, _, held, _ in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
