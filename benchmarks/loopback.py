#!/usr/bin/env python3
"""Loopback benchmark: udp-timecheck against bare baselines, side by side in one run.

    python3 benchmarks/loopback.py            # about two minutes; --quick for a short run
    python3 benchmarks/loopback.py --check    # the same, exit 1 when a target is missed

1. Server throughput: replies a second from `udp_timecheck.py server 0.0.0.0`
   at default verbosity (its log drained into a file by a thread), from a bare
   recvfrom/sendto echo loop, and from a bare recvmsg/sendmsg echo on 0.0.0.0
   that asks for the same ancillary data as our server (the kernel's receive
   timestamp and IP_PKTINFO) and replies from the address asked.  Each is
   driven by the same load generator, a separate Python process keeping WINDOW
   real requests (as our client sends them) in flight.  The rounds take turns,
   so that slow drifts of the machine hit all alike.
2. Fidelity: the median RTT our client reports against our server, beside
   `ping 127.0.0.1` (where ping is installed) and a bare Python ping-pong that
   takes its receive times from the kernel on both ends and subtracts the
   server's time, as NTP does; all at the same interval, in turns.  Also the
   clock offset our client reports on loopback, where the truth is zero.
3. The same with a shared key, and with --timestamps user, for information.
4. Offset bias: the offset our client reports on loopback, OFFSET_RUNS runs in
   interleaved mode (the server's transmit stamps from its kernel) and as many
   with --no-interleaved (its T3 read in user space before its send, half its
   send path early), in turns; their mean against the truth, 0.

Every process runs on 127.0.0.1 and is started and stopped here.  Ratios are
what to compare across machines; absolute figures depend on the machine.
"""

import argparse
import json
import os
import platform
import itertools
import re
import secrets
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import udp_timecheck as utc  # noqa: E402 - the module under test, from this checkout

MODULE = str(ROOT / "udp_timecheck.py")
WINDOW = 32                 # requests the load generator keeps in flight
LOAD_REQUESTS = 400_000     # distinct sealed requests a keyed load has: more than it can send
KEY = b"benchmark key, 32 bytes long...."
STAMPS = struct.Struct("@qq")  # the stamped echo's T2 and T3, appended to the request
SCRAPE_EVERY = 0.1          # seconds between scrapes of --metrics: ten times Prometheus' fastest
TARGETS = {  # name: (what, limit, higher is better)
    "throughput": ("our server on 0.0.0.0 / bare recvmsg+sendmsg echo", 0.70, True),
    "rtt_vs_ping": ("our reported median RTT / ping's", 1.5, False),
    "rtt_vs_bare": ("our reported median RTT / bare kernel-stamped ping-pong's", 2.5, False),
    "offset_err": ("offset error bound on loopback, microseconds", 5.0, False),
    "offset_bias": ("|mean offset of 5 runs| on loopback (truth 0), interleaved, microseconds", 0.3, False),
}
OFFSET_RUNS = 5


# --- roles run in their own processes -------------------------------------------

def role_echo(args):
    """The plain baseline: a bare recvfrom/sendto loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, address = recvfrom(65535)
        sendto(data, address)


def _wildcard_socket():
    """A socket on 0.0.0.0 asking for what our server asks: receive stamps and packet info."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    utc.enable_kernel_timestamps(sock)
    utc.enable_packet_info(sock)
    sock.bind(("0.0.0.0", 0))
    print(sock.getsockname()[1], flush=True)
    return sock


def role_echo_msg(args):
    """The kernel-features baseline: recvmsg/sendmsg, replying from the address asked."""
    sock = _wildcard_socket()
    recvmsg, sendmsg = sock.recvmsg, sock.sendmsg
    while True:
        data, ancillary, _, address = recvmsg(65535, 256)
        sendmsg((data,), ancillary[1:], 0, address)  # [0] is the stamp, [1] the packet info


def role_minimal_server(args):
    """The least a Python time server can do: check the request, answer with T2 and T3.

    The kernel's stamp and packet info, one regular expression, one formatted
    reply: no logging, counting or limits.  How far our server is from this is
    the cost of its own logic; how far this is from the echo, the cost of Python.
    """
    sock = _wildcard_socket()
    recvmsg, sendmsg, wall = sock.recvmsg, sock.sendmsg, utc.wall_ns
    request = re.compile(rb'\[(-?[0-9]+), "[ !#-\[\]-~]*", \{"seq": ([0-9]+)(?:, "pad": " *")?\}\]').fullmatch
    while True:
        data, ancillary, _, address = recvmsg(65535, 256)
        seconds, nanoseconds = STAMPS.unpack(ancillary[0][2])
        t2 = seconds * 1000000000 + nanoseconds
        match = request(data)
        if match is not None:
            reply = b'[%b, "The time is now", {"seq": %b, "t2": %d, "t3": %d}]' % (
                match.group(1), match.group(2), t2, wall())
            sendmsg((reply,), ancillary[1:], 0, address)


def role_stamped_echo(args):
    """The fidelity baseline's server: echoes with T2 (the kernel's) and T3 appended."""
    sock = _wildcard_socket()
    recvmsg, sendmsg, wall = sock.recvmsg, sock.sendmsg, utc.wall_ns
    while True:
        data, ancillary, _, address = recvmsg(65535, 256)
        t2 = utc.read_ancillary(ancillary)[0]
        sendmsg((data + STAMPS.pack(t2, wall()),), ancillary[1:], 0, address)


def keyed_requests(key, count):
    """count distinct requests sealed with key, as our client sends them: a keyed server answers
    each request once (a replay gets silence), so the load must never repeat one."""
    pad_to = utc.min_request_size(utc.DEFAULT_COUNT, keyed=True)
    return [utc.encode_request(secrets.randbits(utc.ID_BITS), "The time is 2026-11-25 18:34:10.123456", 0,
                               pad_to=pad_to, key=key) for _ in range(count)]


def role_load(args):
    """Keep WINDOW requests in flight for warmup + seconds; print replies counted in the window."""
    if args.key:
        sealed = keyed_requests(bytes.fromhex(args.key), LOAD_REQUESTS)
        next_request = iter(sealed).__next__
    else:
        next_request = itertools.repeat(bytes.fromhex(args.request)).__next__
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
        send(next_request())
    while True:
        try:
            recv(65535)
        except (BlockingIOError, socket.timeout):  # replies were dropped somewhere: refill the window
            if time.perf_counter() >= measure_to:
                break
            for _ in range(WINDOW):
                send(next_request())
            continue
        now = time.perf_counter()
        if now >= measure_to:
            break
        if now >= measure_from:
            counted += 1
        send(next_request())
    print(json.dumps({"replies": counted, "seconds": args.seconds}), flush=True)


def role_pingpong(args):
    """The fidelity baseline's client: T1 read before send, T4 from the kernel, less T3 - T2."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    utc.enable_kernel_timestamps(sock)
    sock.connect(("127.0.0.1", args.port))
    request = bytes.fromhex(args.request)
    send, recvmsg, wall = sock.send, sock.recvmsg, utc.wall_ns
    rtts = []
    for _ in range(args.count):
        t1 = wall()
        send(request)
        reply, ancillary, _, _ = recvmsg(65535, 256)
        t4 = utc.read_ancillary(ancillary)[0]
        t2, t3 = STAMPS.unpack(reply[-STAMPS.size:])
        rtts.append((t4 - t1) - (t3 - t2))
        time.sleep(args.interval)
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


class Scraper:
    """Fetches http://WHERE/metrics every SCRAPE_EVERY seconds from a thread, as Prometheus would,
    ten times as often as its usual fastest; counts the scrapes."""

    def __init__(self, where):
        self.where, self.scrapes, self._stop = where, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(SCRAPE_EVERY):
            try:
                with urllib.request.urlopen("http://{}/metrics".format(self.where), timeout=5) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                pass

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=10)


class Server:
    """A server process, its first line giving its port, the rest drained into a file by a thread;
    with --metrics, scraped by a Scraper all along."""

    def __init__(self, argv, log_path):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     universal_newlines=True)
        first = self.proc.stdout.readline()
        match = re.search(r"Server listening at \S*:(\d+);", first)
        self.port = int(match.group(1)) if match else int(first)
        self.scraper = None
        if "--metrics" in argv:
            where = re.search(r"metrics at http://(\S+)/metrics", self.proc.stderr.readline()).group(1)
            self.scraper = Scraper(where)
        self.drain = threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True)
        self.drain.start()
        threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True).start()

    def _drain(self, stream):
        for line in stream:  # as a server's log would go on, into its file
            self.log.write(line)

    def stop(self):
        if self.scraper is not None:
            self.scraper.stop()
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.drain.join(timeout=10)
        self.log.close()


def run_role(role, *args, timeout=300):
    out = subprocess.run([sys.executable, __file__, role] + [str(arg) for arg in args],
                         stdout=subprocess.PIPE, universal_newlines=True, timeout=timeout, check=True)
    return json.loads(out.stdout)


def our_request(key=None):
    """A request exactly as our client builds it (padded so that the reply fits)."""
    return utc.encode_request(1234567890123456789, "The time is 2026-11-25 18:34:10.123456", 0,
                              pad_to=utc.min_request_size(utc.DEFAULT_COUNT, keyed=key is not None),
                              key=key)


def throughput(server, request, seconds, warmup):
    before = cpu_seconds(server.proc.pid)
    load = ["--key", KEY.hex()] if request is None else ["--request", request.hex()]
    result = run_role("_load", "--port", server.port, "--seconds", seconds, "--warmup", warmup, *load)
    after = cpu_seconds(server.proc.pid)
    busy = None if before is None else (after - before) / (seconds + warmup)
    return result["replies"] / seconds, busy


def client_summary(port, count, interval, *extra):
    """Our client's --json summary; with --metrics among extra, scraped all along its run."""
    argv = [sys.executable, MODULE, "client", "127.0.0.1", str(port), "-c", str(count),
            "-i", str(interval), "--json"] + list(extra)
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    scraper = None
    if "--metrics" in extra:
        scraper = Scraper(re.search(r"metrics at http://(\S+)/metrics", client.stderr.readline()).group(1))
    out, _ = client.communicate(timeout=300)
    if scraper is not None:
        scraper.stop()
    return json.loads(out)


def ping_rtts(count, interval):
    """ping 127.0.0.1's RTTs in ms, or None where ping is not installed or not allowed."""
    if shutil.which("ping") is None:
        return None
    out = subprocess.run(["ping", "-n", "-c", str(count), "-i", str(interval), "127.0.0.1"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                         timeout=300)
    rtts = [float(value) for value in re.findall(r"time=([0-9.]+) ms", out.stdout)]
    return rtts[count // 10:] or None


def spread(values, unit="", scale=1.0, digits=0):
    """ "median (min .. max)" of values."""
    shown = ["{:,.{}f}{}".format(value * scale, digits, unit) for value in
             (statistics.median(values), min(values), max(values))]
    return "{} ({} .. {})".format(*shown)


def throughput_section(servers, rounds, seconds, warmup):
    rates = {name: [] for name in servers}
    for _ in range(rounds):
        for name, (server, request) in servers.items():
            rate, busy = throughput(server, request, seconds, warmup)
            rates[name].append(rate)
    for name, values in rates.items():
        print("  {:<40} {} replies/s".format(name, spread(values)))
    median = {name: statistics.median(values) for name, values in rates.items()}
    plain, msg = median["bare recvfrom/sendto echo"], median["bare recvmsg/sendmsg echo, 0.0.0.0"]
    ours, minimal = median["udp-timecheck server on 0.0.0.0"], median["minimal Python time server, 0.0.0.0"]
    print("  recvmsg echo / recvfrom echo: {:.2f}x (the kernel features' cost)".format(msg / plain))
    print("  minimal Python server / recvmsg echo: {:.2f}x (the cost of any Python time server)".format(
        minimal / msg))
    print("  ours / minimal Python server: {:.2f}x (the cost of our own logic)".format(ours / minimal))
    print("  ours / recvmsg echo: {:.2f}x    ours / recvfrom echo: {:.2f}x    with a key / recvmsg echo: "
          "{:.2f}x".format(ours / msg, ours / plain, median["udp-timecheck server, key"] / msg))
    scraped = rates["udp-timecheck server, --metrics scraped"]
    print("  scraped every {:g} s / not: {:.2f}x (the rounds of ours without: {})".format(
        SCRAPE_EVERY, statistics.median(scraped) / ours, spread(rates["udp-timecheck server on 0.0.0.0"])))
    return {"throughput": ours / msg}


def fidelity_section(ours, keyed, stamped, key_path, rounds, count, interval):
    samples = {name: [] for name in ("ping", "bare", "ours", "user", "keyed", "scraped")}
    offsets = []
    ping_missing = False
    for _ in range(rounds):
        ping = ping_rtts(count, interval)
        ping_missing = ping is None
        samples["ping"] += ping or []
        samples["bare"] += run_role("_pingpong", "--port", stamped.port, "--request", our_request().hex(),
                                    "--count", count, "--interval", interval)["rtt_ms"]
        for name, port, extra in (("ours", ours.port, ()), ("user", ours.port, ("--timestamps", "user")),
                                  ("keyed", keyed.port, ("--key-file", key_path)),
                                  ("scraped", ours.port, ("--metrics", "0"))):
            summary = client_summary(port, count, interval, *extra)
            samples[name] += [sample["rtt_ms"] for sample in summary["samples"][count // 10:]
                              if sample["status"] == "ok"]
            if name == "ours":
                offsets.append((summary["offset_ms"], summary["offset_err_ms"]))
    median = {name: statistics.median(values) for name, values in samples.items() if values}
    if ping_missing:
        print("  ping: not installed here (or not allowed), so that comparison is skipped")
    else:
        print("  {:<52} {:.4f} ms  (ping prints whole microseconds)".format("ping 127.0.0.1 median RTT",
                                                                             median["ping"]))
    print("  {:<52} {:.4f} ms".format("bare kernel-stamped Python ping-pong median RTT", median["bare"]))
    print("  {:<52} {:.4f} ms".format("our client's reported median RTT", median["ours"]))
    print("  {:<52} {:.4f} ms".format("  with --timestamps user (wake-ups included)", median["user"]))
    print("  {:<52} {:.4f} ms".format("  with a key", median["keyed"]))
    print("  {:<52} {:.4f} ms".format("  with --metrics, scraped every {:g} s".format(SCRAPE_EVERY),
                                      median["scraped"]))
    worst_offset, worst_err = max(offsets, key=lambda pair: pair[1])
    print("  our offset on loopback (the truth is 0), per round: {}".format(
        ", ".join("{:+.4f} ms \u00b1 {:.4f} ms".format(*pair) for pair in offsets)))
    figures = {"rtt_vs_bare": median["ours"] / median["bare"], "offset_err": worst_err * 1000,
               "offset_within": all(abs(offset) <= err for offset, err in offsets)}
    if not ping_missing:
        figures["rtt_vs_ping"] = median["ours"] / median["ping"]
    print("  ours / ping: {}    ours / bare ping-pong: {:.2f}x    ({} probes each at -i {:g}, {} rounds "
          "taking turns, the first tenth of each left out as warm-up)".format(
              "n/a" if ping_missing else "{:.2f}x".format(figures["rtt_vs_ping"]),
              figures["rtt_vs_bare"], count, interval, rounds))
    return figures


def offset_section(ours, runs, count, interval):
    """The mean of the offsets our client reports on loopback, interleaved or not, in turns."""
    offsets = {"interleaved": [], "--no-interleaved": []}
    for _ in range(runs):
        for name in offsets:
            summary = client_summary(ours.port, count, interval, *([name] if name.startswith("--") else []))
            assert summary["timestamps"]["server_transmit"] == (
                utc.KERNEL if name == "interleaved" else utc.USER), summary["timestamps"]
            offsets[name].append(summary["offset_ms"] * 1000)
    for name, values in offsets.items():
        print("  {:<18} mean {:+.3f} us, each run: {}".format(name, statistics.mean(values), ", ".join(
            "{:+.3f}".format(value) for value in values)))
    return {"offset_bias": abs(statistics.mean(offsets["interleaved"]))}


def report_targets(figures):
    """Print each target and whether it holds; returns the names of those missed."""
    missed = []
    for name, (what, limit, higher_better) in TARGETS.items():
        if name not in figures:
            print("  {:<64} skipped".format(what))
            continue
        value = figures[name]
        held = value >= limit if higher_better else value <= limit
        missed += [] if held else [name]
        print("  {:<64} {:8.2f}  target {} {:g}  {}".format(what, value, ">=" if higher_better else "<=",
                                                            limit, "ok" if held else "MISSED"))
    if not figures.get("offset_within", True):
        missed.append("offset_within")
        print("  the offset on loopback fell outside its own error bound: MISSED")
    return missed


def start_servers(tmp, key_path):
    return {
        "bare recvfrom/sendto echo": Server([sys.executable, __file__, "_echo"], tmp / "echo.log"),
        "bare recvmsg/sendmsg echo, 0.0.0.0": Server([sys.executable, __file__, "_echo_msg"],
                                                     tmp / "echo_msg.log"),
        "minimal Python time server, 0.0.0.0": Server([sys.executable, __file__, "_minimal_server"],
                                                      tmp / "minimal.log"),
        "udp-timecheck server on 0.0.0.0": Server([sys.executable, MODULE, "server", "0.0.0.0", "0"],
                                                  tmp / "server.log"),
        "udp-timecheck server, --metrics scraped": Server(
            [sys.executable, MODULE, "server", "0.0.0.0", "0", "--metrics", "0"], tmp / "scraped.log"),
        "udp-timecheck server, key": Server([sys.executable, MODULE, "server", "0.0.0.0", "0",
                                             "--key-file", str(key_path)], tmp / "keyed.log"),
        "stamped echo": Server([sys.executable, __file__, "_stamped_echo"], tmp / "stamped.log"),
    }


def conduct(args):
    rounds, seconds, warmup, count = (2, 1.0, 0.3, 500) if args.quick else (3, 3.0, 0.5, 1500)
    interval = 0.002
    tmp = Path(tempfile.mkdtemp(prefix="udp-timecheck-bench-"))
    key_path = tmp / "key"
    key_path.write_bytes(KEY)
    key_path.chmod(0o600)
    print("udp-timecheck loopback benchmark: Python {} on {} {} {}, {} CPUs{}".format(
        platform.python_version(), platform.system(), platform.release().split("-")[0], platform.machine(),
        os.cpu_count(), cpu_model()))
    print("load generator: one Python process keeping {} requests in flight; measured {:g} s after "
          "{:g} s of warm-up, {} rounds taking turns".format(WINDOW, seconds, warmup, rounds))
    print("requests: {} bytes as our client sends them ({} bytes with a key)\n".format(
        len(our_request()), len(our_request(KEY))))
    servers = start_servers(tmp, key_path)
    try:
        print("Server throughput, median (min .. max) of the rounds:")
        figures = throughput_section(
            {name: (server, None if "key" in name else our_request())  # None: fresh sealed requests
             for name, server in servers.items() if name != "stamped echo"}, rounds, seconds, warmup)
        print("\nFidelity, median RTT on loopback:")
        figures.update(fidelity_section(servers["udp-timecheck server on 0.0.0.0"],
                                        servers["udp-timecheck server, key"], servers["stamped echo"],
                                        str(key_path), rounds, count, interval))
        print("\nOffset on loopback (the truth is 0), microseconds, {} runs of {} probes at -i {:g}:".format(
            OFFSET_RUNS, count, interval))
        figures.update(offset_section(servers["udp-timecheck server on 0.0.0.0"], OFFSET_RUNS, count,
                                      interval))
    finally:
        for server in servers.values():
            server.stop()
        log_lines = sum(1 for _ in open(str(tmp / "server.log")))
        shutil.rmtree(str(tmp))
    print("\nour server's log at default verbosity: {} lines in the whole run".format(log_lines))
    print("\nTargets:")
    missed = report_targets(figures)
    if args.check and missed:
        print("benchmark: {} target(s) missed".format(len(missed)), file=sys.stderr)
        sys.exit(1)


ROLES = {"conduct": conduct, "_echo": role_echo, "_echo_msg": role_echo_msg,
         "_minimal_server": role_minimal_server, "_stamped_echo": role_stamped_echo, "_load": role_load,
         "_pingpong": role_pingpong}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", default="conduct", choices=list(ROLES))
    parser.add_argument("--quick", action="store_true", help="a short run (less stable figures)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--port", type=int)
    parser.add_argument("--request")
    parser.add_argument("--key")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--warmup", type=float)
    parser.add_argument("--count", type=int)
    parser.add_argument("--interval", type=float, default=0.0)
    args = parser.parse_args()
    ROLES[args.role](args)


if __name__ == "__main__":
    main()
