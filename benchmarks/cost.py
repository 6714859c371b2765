#!/usr/bin/env python3
"""The cost of a probe, measured in one run: the server's throughput against a bare stamped echo, the
client's CPU a probe, a fleet's share of a core, and the start-up's CPU.

    python3 benchmarks/cost.py           # about a minute and a half; writes nothing
    python3 benchmarks/cost.py --check   # exit 1 when a target is missed, or a figure is >10% worse
    python3 benchmarks/cost.py --save    # keep this run's figures in benchmarks/cost.json

1. Server: replies a second from `udp_timecheck.py server 0.0.0.0` (default verbosity, its log to
   a file), and from a bare recvmsg/sendmsg echo on 0.0.0.0 that asks for the same ancillary data
   (the kernel's receive stamp, packet info) and replies from the address asked; each driven by the
   same C load generator (benchmarks/udpload.c, built here with the system's cc) with 32 requests in
   flight, in turns.  Plain requests ([id, text, {seq, pad}]), and interleaved ones: a session
   whose every request asks for the kernel's transmit stamp of the latest reply's exchange.
2. Client: CPU seconds (user + system, the process's own) of `client -c 20000 -i 0 -q` against our
   server, less those of `client -c 1` (its start-up), a probe.
3. Fleet: one client with 100 targets at -i 0.1 for 10 s (a server on 0.0.0.0 answers each loopback
   address): its CPU seconds over the wall's, a share of one core.
4. Start-up: `client HOST PORT -c 1` with the file run as a script (compiled anew each time, as a
   copied file is), less `python3 -c pass`; and apart, compiling the file, and importing it from
   its cached bytecode.

Every process runs on 127.0.0.0/8, started and stopped here.
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # "from cached bytecode" needs a cache to be written
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import udp_timecheck as utc  # noqa: E402 - the module under test, from this checkout

MODULE = str(ROOT / "udp_timecheck.py")
SAVED = Path(__file__).resolve().parent / "cost.json"
WINDOW = 32
TARGETS = {  # name: (what, goal, higher is better)
    "server_plain": ("our server / the bare stamped echo, plain requests", 0.80, True),
    "server_interleaved": ("our server / the bare stamped echo, interleaved requests", 0.50, True),
    "client_us_per_probe": ("client CPU a probe at -i 0, microseconds", 40.0, False),
    "fleet_core_share": ("100 targets at -i 0.1: share of a core", 0.08, False),
    "startup_s": ("start-up CPU above python -c pass, seconds (client -c 1, as a script)", 0.08, False),
}
REGRESSION = 0.10  # worse than the saved figure by more than this: a regression
BARE_ECHO = r"""
import socket, sys
sys.path.insert(0, {root!r})
import udp_timecheck as utc
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
utc.enable_kernel_timestamps(sock)
utc.enable_packet_info(sock)
sock.bind(("0.0.0.0", 0))
print(sock.getsockname()[1], flush=True)
recvmsg, sendmsg = sock.recvmsg, sock.sendmsg
while True:
    data, ancillary, _, address = recvmsg(65535, 256)
    sendmsg((data,), ancillary[1:], 0, address)  # [0] is the stamp, [1] the packet info
"""


def cpu_model():
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_for_cpu(argv):
    """CPU seconds (user + system) that the process argv takes, from the kernel's own count."""
    before = os.times()
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                            timeout=600)
    after = os.times()
    if result.returncode != 0:
        raise SystemExit("{} failed: {}".format(" ".join(argv), result.stderr))
    return (after.children_user - before.children_user) + (after.children_system - before.children_system)


class Server:
    """A server in a process of its own, its first stdout line giving its port."""

    def __init__(self, argv, port_from):
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.port = port_from(self.process.stdout.readline().decode())
        self.drain = subprocess.Popen(["cat"], stdin=self.process.stdout, stdout=self.log)  # its log

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)
        self.drain.wait(timeout=10)


def ours_port(line):
    return int(re.search(r"Server listening at \S*:(\d+);", line).group(1))


def build_load(tmp):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("no C compiler (cc or gcc) to build benchmarks/udpload.c")
    binary = os.path.join(tmp, "udpload")
    subprocess.run([compiler, "-O2", "-o", binary, str(Path(__file__).resolve().parent / "udpload.c")],
                   check=True)
    return binary


def throughput(load, port, mode, payload, seconds=2.0, warmup=0.5):
    command = [load, str(port), str(warmup), str(seconds), str(WINDOW), mode, str(payload)]
    result = subprocess.run(pinned(command, 0),
                            stdout=subprocess.PIPE, check=True, universal_newlines=True, timeout=60)
    figures = json.loads(result.stdout)
    return figures["replies"] / figures["seconds"]


def pinned(argv, cpu):
    """argv on one CPU, where taskset is: the server and its load apart, every round alike."""
    return ["taskset", "-c", str(cpu)] + argv if shutil.which("taskset") and os.cpu_count() > 1 else argv


def server_section(load, rounds):
    echo = Server(pinned([sys.executable, "-c", BARE_ECHO.format(root=str(ROOT))], 1), int)
    ours = Server(pinned([sys.executable, MODULE, "server", "0.0.0.0", "0"], 1), ours_port)
    plain = utc.encode_request(1234567890123456789, "The time is 2026-11-25 18:34:10.123456", 0,
                               pad_to=utc.min_request_size(utc.DEFAULT_COUNT)).hex()
    pad_to = utc.min_request_size(10 ** 12, options=utc.RequestOptions(777, True))
    rates = {"echo, plain": [], "ours, plain": [], "echo, interleaved": [], "ours, interleaved": []}
    try:
        for _ in range(rounds):
            rates["echo, plain"].append(throughput(load, echo.port, "plain", plain))
            rates["ours, plain"].append(throughput(load, ours.port, "plain", plain))
            rates["echo, interleaved"].append(throughput(load, echo.port, "interleaved", pad_to))
            rates["ours, interleaved"].append(throughput(load, ours.port, "interleaved", pad_to))
    finally:
        echo.stop()
        ours.stop()
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        rounds = ", ".join("{:.0f}".format(value) for value in values)
        print("  {:<22} {:>9.0f} replies/s  (rounds: {})".format(name, median[name], rounds))
    return {"server_plain": median["ours, plain"] / median["echo, plain"],
            "server_interleaved": median["ours, interleaved"] / median["echo, interleaved"],
            "server_us_per_request": 1e6 / median["ours, plain"]}


def client_section(port, count=20000):
    client = [sys.executable, MODULE, "client", "127.0.0.1", str(port)]
    probes = run_for_cpu(client + ["-c", str(count), "-i", "0", "-q"])
    once = statistics.median(run_for_cpu(client + ["-c", "1"]) for _ in range(5))
    per_probe = (probes - once) / count * 1e6
    print("  {} probes at -i 0: {:.2f} s of CPU, {:.2f} s of it start-up: {:.1f} us a probe".format(
        count, probes, once, per_probe))
    return {"client_us_per_probe": per_probe}


def fleet_section(seconds=10):
    server = Server([sys.executable, MODULE, "server", "0.0.0.0", "0", "-q"], ours_port)
    try:
        targets = ["127.0.1.{}:{}".format(host, server.port) for host in range(1, 101)]
        started = time.monotonic()
        cpu = run_for_cpu([sys.executable, MODULE, "client", *targets, "-i", "0.1", "-w", str(seconds), "-q"])
        wall = time.monotonic() - started
    finally:
        server.stop()
    print("  100 targets at -i 0.1 for {} s: {:.2f} s of CPU: {:.1%} of a core".format(
        seconds, cpu, cpu / wall))
    return {"fleet_core_share": cpu / wall}


def startup_section(port, runs=10):
    def median_cpu(argv):
        return statistics.median(run_for_cpu(argv) for _ in range(runs))

    bare = median_cpu([sys.executable, "-c", "pass"])
    script = median_cpu([sys.executable, MODULE, "client", "127.0.0.1", str(port), "-c", "1"])
    compiling = median_cpu([sys.executable, "-c", "compile(open({!r}).read(), 'f', 'exec')".format(MODULE)])
    importing = median_cpu([sys.executable, "-c", "import sys; sys.path.insert(0, {!r}); "
                            "import udp_timecheck".format(str(ROOT))])
    print("  python -c pass {:.3f} s; client -c 1 as a script {:.3f} s: {:.3f} s above it".format(
        bare, script, script - bare))
    print("  of which compiling the file {:.3f} s, importing it from cached bytecode {:.3f} s".format(
        compiling - bare, importing - bare))
    return {"startup_s": script - bare, "compile_s": compiling - bare, "import_s": importing - bare}


def report(figures, saved):
    print("\nfigures on {} (Python {}):".format(cpu_model(), platform.python_version()))
    missed = []
    for name, (what, goal, higher) in TARGETS.items():
        value = figures[name]
        met = value >= goal if higher else value <= goal
        was = saved.get(name)
        worse = was is not None and (
            value < was * (1 - REGRESSION) if higher else value > was * (1 + REGRESSION))
        print("  {:<70} {:>8.3f}  goal {} {:<6g} {}{}".format(
            what, value, ">=" if higher else "<=", goal, "met" if met else "MISSED",
            "" if was is None else "  (saved {:.3f}{})".format(was, ", REGRESSION" if worse else "")))
        if not met or worse:
            missed.append(name)
    return missed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a missed goal or a regression")
    parser.add_argument("--save", action="store_true", help="keep these figures in benchmarks/cost.json")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    figures = {"cpu": cpu_model(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory() as tmp:
        load = build_load(tmp)
        print("1. server throughput, {} requests in flight:".format(WINDOW))
        figures.update(server_section(load, args.rounds))
    server = Server([sys.executable, MODULE, "server", "127.0.0.1", "0", "-q"], ours_port)
    try:
        print("2. client:")
        figures.update(client_section(server.port))
        print("4. start-up:")
        figures.update(startup_section(server.port))
    finally:
        server.stop()
    print("3. fleet:")
    figures.update(fleet_section())
    saved = json.loads(SAVED.read_text()) if SAVED.exists() else {}
    missed = report(figures, saved)
    if args.save:
        SAVED.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    if args.check and missed:
        print("missed: " + ", ".join(missed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
