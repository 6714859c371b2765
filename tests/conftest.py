"""Shared test helpers: servers on port 0, a fault-injecting relay, subprocess peers.

Everything here talks only to 127.0.0.1 (or ::1), to servers the tests start,
and every loop is bounded in count and in time.
"""

import heapq
import os
import queue
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import simulate

simulate.apply()  # UDP_TIMECHECK_SIMULATE=windows or macos: before the module is imported

import udp_timecheck as utc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "udp_timecheck.py"
REFERENCE = Path(__file__).resolve().parent / "reference"
LIFETIME = 120  # seconds any helper thread or process may live
SECOND_NS = utc.NS_PER_S  # the units the module's clocks count in
MS_NS = 1_000_000
US_NS = 1_000


def pytest_configure(config):
    """Hand tests to xdist's workers one at a time (xdist 3.2 and later), so that the long ones,
    which come first, start side by side rather than all in the first worker's first batch."""
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(items):
    """Start the tests marked long first, longest first, so that no worker begins one near the end."""
    def seconds(item):
        long = item.get_closest_marker("long")
        return long.kwargs["seconds"] if long else 0
    items.sort(key=seconds, reverse=True)  # a stable sort: the rest keep their order


def require_programs(*names):
    """Skip the calling test when a program it starts is missing.

    Under UDP_TIMECHECK_NO_SKIPS, which .ci/run sets after installing them
    all, fail instead: a lost component must not pass there silently.
    """
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        message = "%s not installed (.ci/run installs %s)" % (" and ".join(missing),
                                                              "them" if len(missing) > 1 else "it")
        if os.environ.get("UDP_TIMECHECK_NO_SKIPS"):
            pytest.fail(message + "; UDP_TIMECHECK_NO_SKIPS is set", pytrace=False)
        pytest.skip(message)


class LineReader:
    """Collects a subprocess's output lines in a thread, so waits are bounded."""

    def __init__(self, stream):
        self.lines = []
        self._queue = queue.Queue()
        thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        thread.start()

    def _pump(self, stream):
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, pattern, timeout=15.0):
        """The first new line matching pattern (a regex); fails after timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no line matching {!r} in {}".format(pattern, self.lines))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError("output ended without {!r}: {}".format(pattern, self.lines))
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match


class Process:
    """A subprocess with line readers on stdout and stderr, killed at the end of the test."""

    def __init__(self, argv, **kwargs):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     universal_newlines=True, **kwargs)
        self.stdout = LineReader(self.proc.stdout)
        self.stderr = LineReader(self.proc.stderr)

    def signal(self, signum):
        self.proc.send_signal(signum)

    def wait(self, timeout=15.0):
        return self.proc.wait(timeout=timeout)

    def rest(self, reader, timeout=15.0):
        """All remaining lines of reader, once the stream has ended."""
        lines = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = reader._queue.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            if line is None:
                break
            reader.lines.append(line)
            lines.append(line)
        return lines

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=15)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def processes():
    started = []

    def start(argv, **kwargs):
        process = Process(argv, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def cli(*args):
    """argv running the program in a process of its own, through tests/simulate.py: on the
    simulated platform when there is one, and from the module's cached bytecode (Python
    compiles a script it is given anew every time: a quarter of a second of CPU here)."""
    return [sys.executable, str(Path(simulate.__file__)), str(MODULE)] + [str(arg) for arg in args]


def as_script(*args):
    """argv running udp_timecheck.py exactly as users run it: python udp_timecheck.py ARGS."""
    return [sys.executable, str(MODULE)] + [str(arg) for arg in args]


SIMULATED = simulate.SIMULATED


def needs_linux(reason):
    """Mark a test of what the module does on Linux only, as the module sees its platform: it is
    skipped on the simulated Windows or macOS too.  Say why."""
    return pytest.mark.skipif(not utc.LINUX, reason="needs Linux: " + reason)


def needs_linux_machine(reason):
    """Mark a test whose harness needs a real Linux machine (/proc, setrlimit), whatever platform
    the module is made to see.  Say why."""
    return pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux machine: " + reason)


def wall_clock_shifted_ns(shift_ns, base=None):
    """A wall clock shift_ns ahead of base (the module's own wall clock unless given)."""
    base = base or utc.wall_ns
    return lambda: base() + int(shift_ns)


def run(argv, timeout=60, **kwargs):
    """subprocess.run with stdout and stderr captured as text (Python 3.6 has no capture_output)."""
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=timeout, **kwargs)


def run_cli(*args, timeout=60, **kwargs):
    return run(cli(*args), timeout=timeout, **kwargs)


# ours (127.0.0.1:PORT) and the tutorial's (a Python tuple) first line
LISTENING = r"Server listening at \(?'?127\.0\.0\.1'?(?:, |:)(\d+)"


@pytest.fixture
def cli_server(processes):
    """Start `udp_timecheck.py server 127.0.0.1 0 ARGS...` as a process; returns (process, port)."""

    def start(*args):
        process = processes(cli("server", "127.0.0.1", "0", *args))
        return process, int(process.stdout.expect(LISTENING).group(1))

    return start


def probe(address, **kwargs):
    """A measurement against address (host, port, ...) with Prober's keyword arguments."""
    return utc.Prober(address[0], address[1], **kwargs).run()


@pytest.fixture
def quick_reference_burst(monkeypatch):
    """--reference's first queries 20 ms apart instead of 250: a test waits out the burst."""
    monkeypatch.setattr(utc, "REFERENCE_SPACING", 0.02)


@pytest.fixture
def start_server():
    """Start a TimeServer on 127.0.0.1 port 0 in a thread; .logs holds its log lines."""
    servers = []

    def start(host="127.0.0.1", **kwargs):
        logs = []
        kwargs.setdefault("log", logs.append)
        server = utc.TimeServer(host, 0, **kwargs)
        server.logs = logs
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.shutdown()
        server.close()


class FakeClock:
    """A wall clock the test moves by hand: every request sees the same time until it does."""

    def __init__(self, now_ns=1_764_000_000 * utc.NS_PER_S):
        self.now_ns = now_ns

    def __call__(self):
        return self.now_ns

    def advance(self, seconds):
        self.now_ns += int(seconds * utc.NS_PER_S)


def ask(address, data, timeout=10.0):
    """Send one datagram and return the first reply, or None after timeout seconds."""
    with socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address[:2])
        sock.send(data)
        try:
            return sock.recv(65535)
        except socket.timeout:
            return None


KEY = b"0123456789abcdef0123456789abcdef"  # a shared key, as a key file holds it


def write_key_file(tmp_path, mode=0o600, content=KEY + b"\n"):
    """A key file in tmp_path with this content and mode; returns its path."""
    path = tmp_path / "key"
    path.write_bytes(content)
    path.chmod(mode)
    return str(path)


def request(request_id=491, seq=None, **kwargs):
    return utc.encode_request(request_id, "The time is 2019-05-04 16:20:56.975068", seq, **kwargs)


# Datagrams no well-formed peer sends; decode_message must refuse every one.
HOSTILE = {
    "empty": b"",
    "not utf-8": b"\xff\xfe[1, \"x\"]",
    "utf-16": '[1, "x"]'.encode("utf-16"),
    "utf-8 bom": b"\xef\xbb\xbf[1, \"x\"]",
    "not json": b"hello",
    "truncated": b'[1, "The time is',
    "trailing garbage": b'[1, "x"] [2, "y"]',
    "object": b'{"id": 1, "text": "x"}',
    "one element": b"[1]",
    "string id": b'["1", "x"]',
    "bool id": b'[true, "x"]',
    "float id": b'[1.5, "x"]',
    "huge float id": b'[1e400, "x"]',
    "nan id": b'[NaN, "x"]',
    "id of 65 bits": b'[36893488147419103232, "x"]',
    "huge id": b"[" + b"9" * 5000 + b', "x"]',
    "huge negative id": b"[-" + b"9" * 60000 + b', "x"]',
    "number text": b"[1, 2]",
    "null text": b"[1, null]",
    "deep nesting": b"[" * 60000 + b"]" * 60000,
    "deep nesting in text": b"[1, " + b"[" * 30000 + b"]" * 30000 + b"]",
    "lone surrogate": b'[1, "The time is \\ud800"]',
    "bad seq": b'[1, "x", {"seq": "0"}]',
    "negative seq": b'[1, "x", {"seq": -1}]',
    "huge size": b'[1, "x", {"size": 18446744073709551616}]',
    "pad not a string": b'[1, "x", {"pad": 5}]',
    "bool t2": b'[1, "x", {"t2": true}]',
}


# --- a relay that drops, delays, duplicates, reorders and rewrites replies -----------

def deliver(index, data):
    """The default policy: every reply passes at once."""
    return [(0.0, data)]


def forward(index, data, client):
    """The default request policy: every request goes on."""
    return True


class Relay:
    """client -> relay -> server, a small NAT: each client address gets its own upstream socket.

    Requests go on when forward(index, data, client) says so; replies come back
    through policy(index, data): a list of (delay in seconds, datagram) to
    deliver, an empty list drops the reply.  index counts from 0, each kind on
    its own.  What it drops is logged: dropped_requests and dropped_replies hold
    the datagrams, the truth a client's figures are checked against.  Its
    sockets send with the relay's own TOS and TTL (mark(): a router that
    rewrites them), as any relay does.
    """

    def __init__(self, upstream, policy=deliver, echo_requests=False, forward=forward):
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.upstream = upstream[:2]
        self.address = self.front.getsockname()
        self.policy, self.forward, self.echo_requests = policy, forward, echo_requests
        self.requests, self.replies, self.dropped_requests, self.dropped_replies = [], [], [], []
        self._backs = {}  # client address -> its upstream socket
        self._marks = {}  # (level, option) -> value, on every upstream socket (and the front)
        self._lock = threading.Lock()
        self._due = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def mark(self, level, option, value, front=False):
        """Send with this TOS, TTL...: upstream (requests), or with front, downstream (replies)."""
        with self._lock:
            if front:
                self.front.setsockopt(level, option, value)
                return
            self._marks[(level, option)] = value
            for back in self._backs.values():
                back.setsockopt(level, option, value)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(timeout=15)
        for sock in [self.front, *self._backs.values()]:
            sock.close()

    def _back_for(self, client):
        with self._lock:
            if client not in self._backs:
                back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                for (level, option), value in self._marks.items():
                    back.setsockopt(level, option, value)
                back.connect(self.upstream)
                self._backs[client] = back
            return self._backs[client]

    def _run(self):
        deadline = time.monotonic() + LIFETIME
        counter = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            while self._due and self._due[0][0] <= now:
                _, _, data, client = heapq.heappop(self._due)
                self.front.sendto(data, client)
            wait = min(0.05, self._due[0][0] - now) if self._due else 0.05
            clients = {back: client for client, back in list(self._backs.items())}
            for sock in select.select([self.front, *clients], [], [], max(0.0, wait))[0]:
                try:
                    if sock is self.front:
                        self._request(*self.front.recvfrom(65535))
                    else:
                        data = sock.recv(65535)
                        index = len(self.replies)
                        self.replies.append(data)
                        delivered = self.policy(index, data)
                        if not delivered:
                            self.dropped_replies.append(data)
                        for delay, out in delivered:
                            counter += 1
                            heapq.heappush(self._due, (time.monotonic() + delay, counter, out, clients[sock]))
                except OSError:
                    pass

    def _request(self, data, client):
        index = len(self.requests)
        self.requests.append(data)
        if not self.forward(index, data, client):
            self.dropped_requests.append(data)
            return
        self._back_for(client).send(data)
        if self.echo_requests:  # an on-path echo: the request itself, straight back
            self.front.sendto(data, client)


@pytest.fixture
def relay():
    relays = []

    def make(upstream, policy=deliver, echo_requests=False, forward=forward):
        made = Relay(upstream, policy, echo_requests, forward).__enter__()
        relays.append(made)
        return made

    yield make
    for made in relays:
        made.__exit__(None, None, None)


# --- the tutorial's own code as the reference peer ------------------------------

def _reference_code(body, faulty=False):
    lines = ["import sys", "sys.path.insert(0, {!r})".format(str(REFERENCE)), "import cs_example as o"]
    if faulty:  # the tutorial sets FAULTY_SERVER by editing the file; lie every time
        lines += ["o.FAULTY_SERVER = True", "o.randomVal = lambda upperbound=1000: upperbound"]
    return "\n".join(lines + [body])


@pytest.fixture
def reference_server(processes):
    """Start the tutorial's server() on 127.0.0.1 port 0; returns (process, port)."""

    def start(faulty=False):
        process = processes([sys.executable, "-u", "-c",
                             _reference_code("o.server('127.0.0.1', 0)", faulty)])
        return process, int(process.stdout.expect(LISTENING).group(1))

    return start


def run_reference_client(port, log=False, timeout=20):
    """The tutorial's client() against 127.0.0.1:port; it would wait forever, so bounded here."""
    code = _reference_code("o.client('127.0.0.1', {}, log={})".format(port, log))
    return run([sys.executable, "-c", code], timeout=timeout)


def ipv6_loopback_available():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def silent_port():
    """A bound UDP socket that never answers (the caller closes it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


# Ports a test names ahead come from below the kernel's ephemeral range (32768 and up on Linux),
# where no socket bound to port 0 (every client's, in every test running beside) can take one
# between the choice and the bind; each xdist worker has a slice of its own, used in a random order.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % 8
_PORTS = iter(random.Random().sample(range(20000 + 1500 * _WORKER, 21500 + 1500 * _WORKER), 1500))


def _unused_ports(count, kind):
    chosen = []
    for port in _PORTS:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use: the next
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise RuntimeError("this worker has used all its ports")


def free_udp_ports(count):
    """count distinct UDP ports on 127.0.0.1 with nothing bound to them now, that nothing else will
    take: a datagram to one is answered by the kernel's port unreachable, and a test may bind one
    for a server."""
    return _unused_ports(count, socket.SOCK_DGRAM)


def free_udp_port():
    return free_udp_ports(1)[0]


def free_tcp_port():
    """A TCP port on 127.0.0.1 with nothing bound to it now, that nothing else will take."""
    return _unused_ports(1, socket.SOCK_STREAM)[0]


SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM}
POSIX_ONLY = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


# --- spoofed sources: a raw socket writes the IPv4 and UDP headers itself --------

def can_spoof():
    """True where this process may open a raw socket (root, or CAP_NET_RAW)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
        return True
    except OSError:
        return False


SPOOFING = pytest.mark.skipif(not can_spoof(), reason="a spoofed source needs a raw socket (root)")


def spoof(data, source, target):
    """Send data to target (host, port) as if from source (host, port), all on 127.0.0.0/8."""
    udp = struct.pack("!HHHH", source[1], target[1], 8 + len(data), 0) + data  # checksum 0: none
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(source[0]), socket.inet_aton(target[0]))  # the kernel sums it
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(header + udp, (target[0], 0))


def wait_for(condition, timeout=10.0):
    """Poll condition() until it is true; fails after timeout seconds.  Bounded, never a sleep."""
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within {} s".format(timeout))
        event.wait(0.01)


def running_client(processes, server, *args, header=r"^UDP-TIMECHECK ", served=20):
    """`udp_timecheck.py client` against an in-process server, once it is well into its loop."""
    client = processes(cli("client", *server.address[:2], *args))
    client.stdout.expect(header)
    wait_for(lambda: server.stats.served >= served)
    return client


# --- a hand-made UDP peer: answers each datagram as a test tells it to -----------------------

class UdpPeer:
    """A UDP peer on 127.0.0.1 port 0, in a thread: answer(data) gives the reply (bytes), or None
    to stay silent.  .received holds every datagram it got."""

    def __init__(self, answer, host="127.0.0.1"):
        self.answer, self.received = answer, []
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind((host, 0))
        self.socket.settimeout(0.05)
        self.address = self.socket.getsockname()[:2]
        self.port = self.address[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        deadline = time.monotonic() + LIFETIME
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                data, source = self.socket.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            self.received.append(data)
            reply = self.answer(data)
            if reply is not None:
                self.socket.sendto(reply, source)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(timeout=10)
        self.socket.close()


@pytest.fixture
def udp_peer():
    """udp_peer(answer) starts a UdpPeer, stopped at the end of the test."""
    peers = []

    def start(answer, host="127.0.0.1"):
        peer = UdpPeer(answer, host).__enter__()
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.__exit__(None, None, None)


# --- a fake NTP server, for what chronyd would not do ------------------------------------------

NTP_EPOCH = 2208988800  # 1900 to 1970, in seconds


def ns_to_ntp(ns):
    """Unix ns as a 64-bit NTP timestamp, written here apart from the module under test."""
    seconds, nanoseconds = divmod(ns, SECOND_NS)
    return ((seconds + NTP_EPOCH) % 2 ** 32) << 32 | (nanoseconds << 32) // SECOND_NS


class FakeNtpServer(UdpPeer):
    """A UdpPeer answering NTP queries as told: shifted by shift_ns, lying, or kissing.  root is
    its root delay and dispersion, 16.16 seconds (by default 1/4 s and 1/16 s)."""

    def __init__(self, shift_ns=0, leap=0, stratum=1, kiss=None, wrong_origin=False, version=4,
                 zero_transmit=False, zero_receive=False, root=(1 << 14, 1 << 12)):
        self.shift_ns, self.leap, self.stratum, self.kiss = shift_ns, leap, stratum, kiss
        self.wrong_origin, self.version, self.zero_transmit = wrong_origin, version, zero_transmit
        self.zero_receive, self.root = zero_receive, root
        super().__init__(self._answer)

    def _answer(self, data):
        received = utc.wall_ns() + self.shift_ns
        origin = struct.unpack("!Q", data[40:48])[0] + (1 if self.wrong_origin else 0)
        refid = self.kiss.encode() if self.kiss else b"GPS\0"
        transmit = 0 if self.zero_transmit else ns_to_ntp(utc.wall_ns() + self.shift_ns)
        header = (self.leap << 6 | self.version << 3 | 4, 0 if self.kiss else self.stratum, 4, -20,
                  self.root[0], self.root[1], refid)
        times = (ns_to_ntp(received - SECOND_NS), origin, 0 if self.zero_receive else ns_to_ntp(received),
                 transmit)
        return struct.pack("!BBbbII4sQQQQ", *(header + times))


# --- a Recorder fed by hand: probes sent a second apart, replies made up to order ---------------

T0_NS = 1_764_000_000 * utc.NS_PER_S  # the wall clock at the first probe


class SteppingClock:
    """This machine's wall clock in the frame send_probe() and answer_probe() use: T0_NS at the
    recorder's start (set origin to its started_mono_ns), running with the monotonic clock, and
    stepped by hand (shift_ns)."""

    def __init__(self):
        self.origin, self.shift_ns = utc.monotonic_ns(), 0

    def __call__(self):
        return T0_NS + utc.monotonic_ns() - self.origin + self.shift_ns


def new_recorder(count=5, key=None, wall_clock=None, local=utc.NO_LOCAL_END):
    return utc.Recorder("127.0.0.1:1060", "127.0.0.1",
                        utc.RunSpec(count=count, key=key, timeout=1.0, wall_clock=wall_clock), local)


def send_probe(recorder, seq, wall_shift_ns=0):
    """A probe through the recorder's first step, sent seq seconds into the run (the wall clock
    stepped by wall_shift_ns since the start)."""
    sample = utc.Sample(seq, 1000 + seq)
    sample.request = utc.encode_request(sample.request_id, "The time is now", seq)
    recorder.send(sample)
    sample.send_mono_ns = recorder.started_mono_ns + seq * utc.NS_PER_S
    sample.t1 = sample.t1_user = T0_NS + seq * utc.NS_PER_S + wall_shift_ns
    return sample


def answer_probe(recorder, sample, rtt_ns, offset_ns=0, proc_ns=5000, request_id=None, wall_step_ns=0,
                 late_reading_ns=0, kernel_t4=False):
    """The reply to sample, back rtt_ns (and proc_ns at the server) after it left, the server's
    clock offset_ns ahead, and this machine's wall clock stepped by wall_step_ns on the way; the
    monotonic reading after it late_reading_ns late (preempted); stamped by the kernel, with
    kernel_t4; returns the reply."""
    t2 = sample.t1 + rtt_ns // 2 + offset_ns
    t3 = t2 + proc_ns
    reply = b'[%d, "The time is now", {"seq": %d, "ts": "user", "t2": %d, "t3": %d}]' % (
        request_id or sample.request_id, sample.seq, t2, t3)
    t4 = sample.t1 + rtt_ns + proc_ns + wall_step_ns
    recorder.receive(reply, utc.Arrival(t4 if kernel_t4 else None, t4, t4,
                                        sample.send_mono_ns + rtt_ns + proc_ns + late_reading_ns))
    return reply
