#!/usr/bin/env python3
"""Loopback benchmark: udp-timecheck against bare Python baselines, side by side.

    python3 benchmarks/loopback.py            # about a minute; --quick for a short run

1. Server throughput: replies a second from `udp_timecheck.py server` (default
   verbosity, its log going to a file) and from a bare recvfrom/sendto echo
   loop, each driven by the same load generator: a separate Python process
   that keeps WINDOW real requests (as our client sends them) in flight.
2. Client fidelity: the median RTT our client reports against our server,
   and a bare Python send/recv ping-pong's median against the echo loop.
3. The same with a shared key (HMAC-SHA256 on both ends), for information.

Every process runs on 127.0.0.1 and is started and stopped here.  Ratios are
what to compare across machines; absolute figures depend on the machine.
"""

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import udp_timecheck as utc  # noqa: E402 - the module under test, from this checkout

MODULE = str(ROOT / "udp_timecheck.py")
WINDOW = 32                 # requests the load generator keeps in flight
ROUNDS = 5                  # the RTT runs take turns this many times
KEY = b"benchmark key, 32 bytes long...."


# --- roles run in their own processes -------------------------------------------

def role_echo(args):
    """The baseline server: a bare recvfrom/sendto loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, address = recvfrom(65535)
        sendto(data, address)


def role_load(args):
    """Keep WINDOW requests in flight for warmup + seconds; print replies counted in the window."""
    request = bytes.fromhex(args.request)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", args.port))
    try:  # a blocking recv that gives up after 50 ms: one syscall, where settimeout() costs two
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 50000))
    except (OSError, struct.error):
        sock.settimeout(0.05)
    send, recv = sock.send, sock.recv
    start = time.perf_counter()
    measure_from, measure_to = start + args.warmup, start + args.warmup + args.seconds
    counted = 0
    for _ in range(WINDOW):
        send(request)
    while True:
        try:
            recv(65535)
        except (BlockingIOError, socket.timeout):  # replies were dropped somewhere: refill the window
            for _ in range(WINDOW):
                send(request)
            continue
        now = time.perf_counter()
        if now >= measure_to:
            break
        if now >= measure_from:
            counted += 1
        send(request)
    print(json.dumps({"replies": counted, "seconds": args.seconds}), flush=True)


def role_pingpong(args):
    """The baseline client: blocking send/recv, timed with perf_counter_ns around them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", args.port))
    request = bytes.fromhex(args.request)
    send, recv, perf = sock.send, sock.recv, time.perf_counter_ns
    rtts = []
    for _ in range(args.count):
        send_ns = perf()
        send(request)
        recv(65535)
        rtts.append(perf() - send_ns)
    print(json.dumps({"rtt_ms": [rtt / 1e6 for rtt in rtts[args.count // 10:]]}), flush=True)


# --- the conductor ------------------------------------------------------------------

def cpu_model():
    """ " (the CPU's model name)" from /proc/cpuinfo, or nothing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ({})".format(line.split(":", 1)[1].strip())
    except OSError:
        pass
    return ""


def cpu_seconds(pid):
    """User + system CPU seconds of a process, from /proc (None where there is no /proc)."""
    try:
        fields = Path("/proc/{}/stat".format(pid)).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """A server process on 127.0.0.1 port 0, its output in a file."""

    def __init__(self, argv, log_path):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True)
        first = self.proc.stdout.readline()
        if first.startswith("Server listening at"):
            self.port = int(first.rsplit(",", 1)[1].strip(" )\n"))
            # the rest of its output goes on into the log file, as a server's log would
            self.drain = subprocess.Popen(["cat"], stdin=self.proc.stdout, stdout=self.log)
        else:
            self.port, self.drain = int(first), None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        if self.drain is not None:
            self.drain.wait(timeout=10)
        self.log.close()


def run_role(role, *args, timeout=120):
    out = subprocess.run([sys.executable, __file__, role] + [str(arg) for arg in args],
                         capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(out.stdout)


def our_request(key=None):
    """A request exactly as our client builds it (padded so that the reply fits)."""
    size = utc.Prober("127.0.0.1", 1, count=utc.DEFAULT_COUNT, key=key).request_size
    return utc.encode_request(utc.secrets.randbits(utc.ID_BITS), "The time is {}".format(
        utc.datetime.datetime.now()), 0, pad_to=size, key=key)


def throughput(server, request, seconds, warmup):
    before = cpu_seconds(server.proc.pid)
    result = run_role("_load", "--port", server.port, "--request", request.hex(),
                      "--seconds", seconds, "--warmup", warmup)
    after = cpu_seconds(server.proc.pid)
    rate = result["replies"] / seconds
    busy = None if before is None else (after - before) / (seconds + warmup)
    return rate, busy


def rtts_ours(port, count, key_path):
    """(reported, raw) RTTs in ms from our client, the first tenth left out as warm-up."""
    argv = [sys.executable, MODULE, "client", "127.0.0.1", str(port), "-c", str(count), "--json"]
    if key_path:
        argv += ["--key-file", key_path]
    summary = json.loads(subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True).stdout)
    answered = [sample for sample in summary["samples"][count // 10:] if sample["status"] == "ok"]
    return [sample["rtt_ms"] for sample in answered], [sample["raw_rtt_ms"] for sample in answered]


def conduct(args):
    seconds, warmup, count = (1.5, 0.5, 2000) if args.quick else (4.0, 1.0, 10000)
    tmp = Path(tempfile.mkdtemp(prefix="udp-timecheck-bench-"))
    key_path = tmp / "key"
    key_path.write_bytes(KEY)
    key_path.chmod(0o600)
    print("udp-timecheck loopback benchmark: Python {} on {} {} {}, {} CPUs{}".format(
        platform.python_version(), platform.system(), platform.release().split("-")[0], platform.machine(),
        os.cpu_count(), cpu_model()))
    print("load generator: one Python process keeping {} requests in flight; measured {:g} s "
          "after {:g} s of warm-up".format(WINDOW, seconds, warmup))
    print("requests: {} bytes as our client sends them ({} bytes with a key)\n".format(
        len(our_request()), len(our_request(KEY))))

    echo = Server([sys.executable, __file__, "_echo"], tmp / "echo.log")
    ours = Server([sys.executable, MODULE, "server", "127.0.0.1", "0"], tmp / "server.log")
    keyed = Server([sys.executable, MODULE, "server", "127.0.0.1", "0", "--key-file", str(key_path)],
                   tmp / "keyed.log")
    try:
        rows = []
        for name, server, request in (("bare echo loop", echo, our_request()),
                                       ("udp-timecheck server", ours, our_request()),
                                       ("udp-timecheck server, key", keyed, our_request(KEY))):
            rate, busy = throughput(server, request, seconds, warmup)
            rows.append((name, rate))
            print("  {:<28} {:>9,.0f} replies/s   server CPU {}".format(
                name, rate, "n/a" if busy is None else "{:.0%}".format(busy)))
        print("  throughput ratio, ours / bare echo: {:.2f}x   (with a key: {:.2f}x; target >= 0.60x)\n"
              .format(rows[1][1] / rows[0][1], rows[2][1] / rows[0][1]))

        # Rounds taking turns, samples pooled: slow drifts of the machine hit all three alike.
        samples = {name: [] for name in ("bare", "net", "raw", "net_key", "raw_key")}
        for _ in range(ROUNDS):
            samples["bare"] += run_role("_pingpong", "--port", echo.port, "--request", our_request().hex(),
                                        "--count", count // ROUNDS)["rtt_ms"]
            net, raw = rtts_ours(ours.port, count // ROUNDS, None)
            net_key, raw_key = rtts_ours(keyed.port, count // ROUNDS, str(key_path))
            for name, values in (("net", net), ("raw", raw), ("net_key", net_key), ("raw_key", raw_key)):
                samples[name] += values
        bare, net, raw, net_key, raw_key = (statistics.median(samples[name]) for name in samples)
        print("  {:<44} {:.4f} ms".format("bare ping-pong median RTT", bare))
        print("  {:<44} {:.4f} ms  (raw {:.4f} ms)".format("our client's reported median RTT", net, raw))
        print("  {:<44} {:.4f} ms  (raw {:.4f} ms)".format("the same with a key", net_key, raw_key))
        print("  RTT ratio, ours / bare ping-pong: {:.2f}x reported, {:.2f}x raw   "
              "(with a key: {:.2f}x, {:.2f}x raw; target <= 1.20x)".format(
                  net / bare, raw / bare, net_key / bare, raw_key / bare))
        print("  (reported = raw minus the server's own T3 - T2, as irtt and NTP report it; {} round "
              "trips each, in {} rounds taking turns, the first tenth of each left out as warm-up)".format(
                  count, ROUNDS))
    finally:
        for server in (echo, ours, keyed):
            server.stop()
        log_lines = sum(1 for _ in open(tmp / "server.log"))
        shutil.rmtree(tmp)
    print("\nour server's log at default verbosity: {} lines for about {:,.0f} requests".format(
        log_lines, rows[1][1] * (seconds + warmup)))


ROLES = {"conduct": conduct, "_echo": role_echo, "_load": role_load, "_pingpong": role_pingpong}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", default="conduct", choices=list(ROLES))
    parser.add_argument("--quick", action="store_true", help="a short run (less stable figures)")
    parser.add_argument("--port", type=int)
    parser.add_argument("--request")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--warmup", type=float)
    parser.add_argument("--count", type=int)
    args = parser.parse_args()
    ROLES[args.role](args)


if __name__ == "__main__":
    main()
