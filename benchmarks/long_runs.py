#!/usr/bin/env python3
"""Long runs: flat memory, percentiles within 1% of exact ones, and drift, on loopback.

    python3 benchmarks/long_runs.py            # about a minute
    python3 benchmarks/long_runs.py --check    # the same, exit 1 when a target is missed

1. Memory: the client's peak RSS for `-c 300000 -i 0 -q` against a local
   server, beside that for `-c 20000 -i 0 -q`; the target is within 8 MB.
2. Percentiles: a run of 20,000 probes writes every RTT with --jsonl; the
   exact percentiles of those rows (nearest rank) against the summary's, which
   come from the streaming histogram; the target is within 1%.
3. Drift: a server whose clock runs 500 ppm fast (a TimeServer with that
   clock, in its own process) and a 10-second run at -i 0.01; the target is
   +500 +- 25 ppm.

Every process runs on 127.0.0.1 and is started and stopped here.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
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
with utc.TimeServer("127.0.0.1", 0, clock=fast) as server:
    print(server.address[1], flush=True)
    server.serve_forever()
"""


class Server:
    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, universal_newlines=True)
        first = self.proc.stdout.readline()
        self.port = int(first.split("', ")[1].split(")")[0]) if first.startswith("Server") else int(first)

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


def percentiles(port, count, tmp):
    print("\nPercentiles: the summary's (a streaming histogram) against exact ones from every row")
    rows_path = Path(tmp) / "rows.jsonl"
    summary, _ = client(port, "-c", count, "-i", "0", "--json", "--jsonl", rows_path)
    rtts = sorted(json.loads(line)["rtt_ms"] for line in rows_path.read_text().splitlines()
                  if json.loads(line)["status"] == "ok")
    worst = 0.0
    for name, fraction in (("median", 0.5), ("p90", 0.9), ("p99", 0.99)):
        exact = rtts[max(1, math.ceil(fraction * len(rtts))) - 1]  # nearest rank, as the summary's
        reported = summary["rtt_ms"][name]
        error = abs(reported - exact) / exact
        worst = max(worst, error)
        print("  {:<7} exact {:.6f} ms  reported {:.6f} ms  error {:.3%}".format(
            name, exact, reported, error))
    return {"percentile_error": worst}


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    print("udp-timecheck long runs, Python {}".format(sys.version.split()[0]))
    server = Server([sys.executable, MODULE, "server", "127.0.0.1", "0", "-q"])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            figures = memory(server.port, (20000, 300000))
            figures.update(percentiles(server.port, 20000, tmp))
    finally:
        server.stop()
    figures.update(drift(10, 500))
    checks = [("client peak RSS growth, MB", figures["memory_mb"], figures["memory_mb"] <= 8, "<= 8"),
              ("worst percentile error", figures["percentile_error"], figures["percentile_error"] <= 0.01,
               "<= 1%"),
              ("drift of a 500 ppm fast clock, ppm", figures["drift_ppm"],
               abs(figures["drift_ppm"] - 500) <= 25, "500 +- 25")]
    print("\nTargets:")
    for name, value, held, target in checks:
        print("  {:<40} {:10.4f}  target {:<10} {}".format(name, value, target, "ok" if held else "MISSED"))
    if args.check and not all(held for _, _, held, _ in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
