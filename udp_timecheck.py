#!/usr/bin/env python3
"""udp-timecheck: UDP round-trip time, loss and clock offset, in one file.

Copy this file to both machines (standard library only, Python 3.6+) and run::

    python3 udp_timecheck.py server 0.0.0.0 1060
    python3 udp_timecheck.py client SERVER-ADDRESS 1060 --measure-delay

It speaks the protocol of the tutorial "udp server & client in python": the
client sends ``[request_id, "The time is <client time>"]`` as JSON and the
server answers ``[request_id, "The time is <server time>"]``.  It works with the
tutorial's own client and server in both directions: what it adds (server
timestamps, padding, authentication, clock state) travels in extra array
elements, which the tutorial's code ignores.  README.md documents the datagrams.

The module is in eight sections, each using only those before it; the banner
of each carries its number.

1. Foundations: the shared constants, the clocks (wall_ns, monotonic_ns), the
   one exception family (TimecheckError; WireError for datagrams), and small
   text helpers (printable, clip, iso_utc).
2. Wire format: pure encode_*/decode_* functions, ours (requests, replies,
   their MACs, the clock state), NTP's and STAMP's (encode_stamp, decode_stamp,
   the error estimate); one decoder of ours (decode_message), and the server's
   own fast way to a Request (parse_request); no I/O.
3. Platform: socket options and ancillary data (kernel timestamps, packet
   info, TOS and TTL), the error queue (ErrorQueue: transmit stamps, refusals),
   the kernel's clock carried over to ours (KernelClock), addresses and key
   files, the kernel's clock state.
4. Statistics: the per-probe record (Sample, Arrival) and NTP's timing
   arithmetic (probe_timing), every distribution in one Sketch (exact, then
   buckets: flat memory) with one percentile method (percentile), the drift
   fit and its clock steps, and what a run found (Totals).
5. Server: TimeServer (start it on port 0, stop it from another thread, use it
   as a context manager, give it a wall clock: ServerSpec; a STAMP reflector
   with ServerSpec.stamp), its guards against loops, floods and replays, and
   MetricsServer for Prometheus (and a mesh node's page).
6. Client: what a run measures (RunSpec, built once), what it tells as it
   goes (Events, one sink), the probe book of each target (Recorder; for NTP
   SntpRecorder, for STAMP StampRecorder), the one loop for one target or many (Measurement; Prober is
   a run of one), Reference for --reference, and targets and peers files.
7. Reports: what a run found as dicts (summarize, period_figures, plot_data,
   snapshot), as text (format_*), as Prometheus' text (render_*_metrics), as
   SVG (render_svg, one target or many), and a fleet's matrix as a page
   (render_matrix_html).
8. Command line: the outputs (Sink, the one way lines are written), the
   signals, the other nodes' rows a mesh node's page shows (PeerRows),
   build_parser(), a cmd_<name>(args) per subcommand, and
   main(argv=None) -> int.  Only here are argparse, stdout and stderr.

Where to start reading: main() and cmd_client() for what a run does, end to
end; Measurement._step() and Recorder.receive() for one probe; TimeServer.
_reply_for() for one request; summarize() for what the JSON holds; RunSpec,
PERCENTILES and sample_record() to add a setting, a percentile or an output
field.

The names in __all__ are the API, as README.md lists them; everything else is
an implementation detail and may change.
"""

import argparse
import array
import bisect
import collections
import contextlib
import ctypes
import datetime
import errno
import functools
import heapq
import io
import itertools
import json
import json.scanner
import math
import operator
import os
import queue
import random
import re
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
from typing import (Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, NoReturn,
                    Optional, Sequence, TextIO, Tuple, Union)


def _needs_python_3(*, why: str = "udp_timecheck.py needs Python 3.6 or newer: run it with python3") -> str:
    """Python 2 cannot parse this line, the first it meets that only Python 3 can, and shows it."""
    return why


__version__ = "1.2.0"
__all__ = [
    # 1. foundations
    "TimecheckError", "UnresolvedHost", "WireError", "NotARequest", "wall_ns", "monotonic_ns",
    "clock_offset_ns", "KERNEL", "USER", "OK", "LOST", "MISMATCHED", "IN_FLIGHT", "NOT_UP", "EXIT_OK",
    "EXIT_FAILED", "EXIT_USAGE", "DEFAULT_PORT",
    # 2. the wire format
    "Message", "encode_request", "decode_message", "Request", "RequestOptions", "parse_request",
    "reply_parts", "ReplyExtra", "encode_reply_extra", "fit_tutorial_reply", "min_request_size", "seal",
    "mac_matches", "mac_of_datagram", "reply_context", "ClockState",
    "encode_clock_state", "decode_clock_state", "NtpReply", "encode_ntp_request", "decode_ntp", "ntp_problem",
    "StampPacket", "encode_stamp", "decode_stamp", "encode_error_estimate", "decode_error_estimate",
    # 3. the platform
    "resolve", "split_target", "load_key", "read_clock_state", "enable_kernel_timestamps",
    "enable_packet_info", "read_ancillary", "ErrorQueue", "KernelClock", "source_address",
    # 4. statistics
    "Sample", "Arrival", "Timing", "probe_timing", "arrival_ns", "percentile", "PERCENTILES", "Sketch",
    "sketch_key", "sketch_value", "RunningStats", "Runs", "LossDirections", "OffsetPoint", "DriftFit",
    "fit_drift", "fit_line", "find_steps", "chrony_weights", "Timeline", "Totals",
    # 5. the server
    "TimeServer", "ServerSpec", "ServerStats", "RateLimiter", "ReplayGuard", "LoopGuard", "MetricsServer",
    # 6. the client
    "RunSpec", "PathOptions", "Outputs", "Events", "Recorder", "Period", "Measurement", "Prober",
    "SntpRecorder", "SntpProber", "StampRecorder", "Reference", "Peer", "read_peers", "find_self",
    # 7. reports
    "summarize", "period_figures", "plot_data", "snapshot", "sample_record", "format_summary",
    "render_svg", "render_client_metrics", "render_snapshots", "client_snapshots",
    "render_server_metrics", "fleet_summary",
    "load_measurement", "build_matrix", "format_matrix", "render_matrix_html",
    # 8. the command line
    "build_parser", "main",
]


# ----------------------------------------------------------------------------------------------
# 1. Foundations: shared constants, clocks, the exception family, text helpers
# ----------------------------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1060                 # the tutorial's declared default
MAX_DATAGRAM = 65535                # receive buffer, the tutorial's MAX_BYTES
MAX_UDP_PAYLOAD = {socket.AF_INET: 65507, socket.AF_INET6: 65527}  # type: Dict[int, int]
FAMILY_NAMES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}  # type: Dict[int, str]
FAULTY_PROBABILITY = 0.5            # how often the tutorial's FAULTY_SERVER lies
DEFAULT_COUNT = 1000                # --measure-delay: the tutorial's measuring loop
DEFAULT_TIMEOUT = 1.0
MIN_INTERVAL = 0.001                # seconds between probes, unless back to back (0)
DEFAULT_INTERVAL = 1.0              # seconds between probes, unless -i or --measure-delay: ping's
MIN_SIZE = 340                      # --size: the largest request any run needs (keyed, --tos, 10^12 probes)
DEMO_ARGS = ("--measure-delay", "-c", "50", "-i", "0.02")
LOG_LINES_PER_SECOND = 10
LOG_TEXT_BYTES = 180                # of client text per log line, after escaping: lines stay < 320
LOG_QUEUE_LINES = 1000              # lines waiting for a slow or blocked stdout before they drop
PROGRESS_EVERY = 0.25               # seconds between progress updates on a terminal (-q)
SINK_STALL_S = 10.0                 # seconds an output waits for a reader that does not read (a FIFO's)
SVG_WIDTH, SVG_LEFT, SVG_PLOT_WIDTH = 960, 80, 850  # --plot: pixels
SVG_TOP, SVG_PANEL, SVG_GAP = 60, 220, 80
SOURCE_TABLE_SIZE = 4096            # source addresses --max-rate and the loop guard keep; sessions
MAX_SOURCE_PORTS = 64               # --ports: sockets of one run
REPLAY_WINDOW_S = 300               # seconds a keyed server remembers the requests it answered ...
REPLAY_ENTRIES = 65536              # ... up to this many (some 8 MB): a replay within them gets no answer
PRIVILEGED_PORTS = 1024             # echo, daytime, DNS, NTP...: never answered (loop DoS)
ID_BITS = 63                        # request ids: 63 random bits from os.urandom, as secrets draws them
ID_LIMIT = 2 ** 64                  # larger ids and timestamps are malformed
TIMESTAMP_DIGITS = 20               # room for any time_ns() value until 5138 AD
SAMPLE_TEXT = "The time is 2000-01-01 00:00:00.000000"
KEY_ENV = "UDP_TIMECHECK_KEY"
CLOCK_VALUE_LIMIT = 10 ** 12        # clock state figures are clamped to this, to bound a reply's size
CLOCK_SOURCE_CHARS = 24             # of the clock source's name
CLOCK_EVERY = 1000                  # probes: the first, and one in this many, ask for the server's clock
REFERENCE_BURST, REFERENCE_SPACING = 4, 0.25  # --reference: NTP queries at first, seconds apart
REFERENCE_EVERY = 64                # seconds between --reference queries after the burst
REFERENCE_KEPT = 8                  # the last usable answers the verdict chooses from, as NTP's clock filter
NTP_EPOCH_OFFSET = 2208988800       # seconds from 1900, NTP's epoch, to 1970
NTP_PACKET = struct.Struct("!BBbbII4sQQQQ")  # RFC 5905's header, without extensions
NTP_PORT = 123
MAX_ROOT_DISTANCE_NS = 1_500_000_000  # RFC 5905's MAXDIST: a server further from UTC is not synchronised
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text exposition format
METRICS_CONNECTIONS = 16            # to the metrics endpoint at once: a new one closes the oldest
METRICS_DEADLINE = 5.0              # seconds for an exchange, from its request's first byte
METRICS_IDLE = 600.0                # seconds a connection may wait before its request: Prometheus
                                    # opens one ahead and uses it a scrape later (it closes its own at 5 min)
METRICS_REQUEST_BYTES = 8192        # a request line and its headers, at most
PEER_ROWS_EVERY, PEER_ROWS_TIMEOUT = 5.0, 2.0  # seconds between fetches of the other nodes' rows; for each
MAX_PEER_ROW, MAX_PEER_CELLS = 1 << 20, 1000  # bytes of a node's row, and cells, that a page takes
PEER_ROWS_QUICK = 10                # rounds a second apart at first, while a peer has not answered yet
ACCEPT_BACKOFF = (0.05, 1.0)        # seconds not listening after accept() fails (EMFILE), doubling
LOG_EVERY = 10.0                    # seconds between error lines of the metrics endpoint
RTT_BUCKETS_S = tuple(10 ** (exponent / 4) for exponent in range(-20, 5))  # 10 us to 10 s, 4 a decade
RTT_BUCKETS_NS = tuple(le * 1e9 for le in RTT_BUCKETS_S)
TIME_ERROR, STA_UNSYNC = 5, 0x0040  # adjtimex(2): the clock is not synchronised
CLOCK_SOURCE_FILE = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
MAX_KEY_FILE = 4096                 # bytes: a key, not a file to read until memory runs out
MAX_PEERS_FILE = 1 << 20            # bytes: a --targets or --peers file
MAX_MEASUREMENT_FILE = 64 << 20     # bytes of a --json output that matrix reads
ZERO_MAC = b"0" * 64                # placeholder for the hex HMAC-SHA256 while it is computed
MAC_TRAILER = len(ZERO_MAC) + 2     # the MAC, its closing quote and the closing bracket
REQUEST_LABEL = b"udp-timecheck/1 request\n"
REPLY_LABEL = b"udp-timecheck/1 reply\n"
BYE_LABEL = b"udp-timecheck/1 bye\n"     # what a server's goodbye's MAC covers besides itself
PAD_OVERHEAD = len(b', "pad": ""')
TIME_FRACTION = len(".123456")      # what str(datetime) leaves out at microsecond 0
JSON_WHITESPACE = " \t\n\r"
MAX_SEPARATORS = 64                 # commas and colons after the text of a datagram to decode
MAX_ESCAPES = 128                   # backslashes in it: \uXXXX costs ten times its six bytes
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128 + 2          # what a shell reports for a command ended by SIGINT
OK, LOST, MISMATCHED, PENDING = "ok", "lost", "mismatched", "pending"
IN_FLIGHT, NOT_UP = "in flight", "not up"  # at a deadline; refused before a retried target first answered
# Why a probe was lost; a reply that failed authentication or echoed the request
# leaves its probe waiting for a real one until the timeout.
TIMED_OUT, REFUSED, FORGED, ECHOED, NOT_SENT, INTERRUPTED, DEADLINE, GONE = (
    "timeout", "refused", "forged", "echo", "not sent", "interrupted", "deadline", "gone")
NS_PER_S = 1_000_000_000

# Timestamps.  The kernel stamps each datagram as it arrives (on CLOCK_REALTIME):
# with it, a round trip no longer includes the time our own two processes take to
# wake up.  The socket module exports none of these constants.
KERNEL, USER = "kernel", "user"

WALL_STEP_TOLERANCE_NS = 50_000     # wall vs monotonic over one round trip, beyond read gaps

# Long runs in flat memory
SAMPLES_KEPT = 1000                 # probes the JSON lists in full; --csv and --jsonl have every one
RECENT_PROBES = 16384               # answered or lost probes remembered for late and duplicate replies
HELD_PROBES = 64                    # answered probes waiting for their T3 from the kernel (interleaved)
MAX_DRAINED = 1024                  # datagrams read off a socket at one go, at most
TTL_CHANGES_KEPT = 100              # path changes the JSON lists; the count has them all
SEQUENCE_WINDOW = 1024              # a session's latest seqs the server tells repeats among (WireGuard's)
EXCHANGES_KEPT = 32                 # a session's latest interleaved replies whose stamps the server keeps
PENDING_STAMPS_READ = 32            # replies whose transmit stamps the server reads at one go
BYE_WINDOW_S = 60                   # a session heard from within this many seconds hears the goodbye
STAMP_ERROR_NS = {"kernel": 10_000, "user": 1_000_000}  # where a timestamp can sit from its event
TIMELINE_BINS = 256                 # per-interval aggregates for the drift fit and the plot
TIMELINE_FIRST_WIDTH_NS = 10_000_000  # each bin's span at first; doubled whenever bins run out
DRIFT_MIN_POINTS = 6                # bins with a trusted offset before a drift is fitted
DRIFT_CLAIM_FACTOR = 3.0            # a drift is named (faster, slower) beyond this many times its error
RATE_LIMIT_RUNS = 5                 # runs of each kind before a rate limit is suspected ...
RATE_LIMIT_SPREAD = 0.25            # ... when their lengths vary by no more than this share of their mean
RATE_LIMIT_SHARE = 0.05             # ... and at least this share of the probes is lost
EXACT_VALUES = 1_000_000            # RTTs kept exactly (4 or 8 bytes each), then sketched
EXACT_SHARE = 16                    # each other quantity keeps EXACT_VALUES / EXACT_SHARE exactly
EXACT_CHUNK = 32768                 # they are kept sorted in chunks of this many
SKETCH_EXACT_NS = 10_000            # FineSketch: a bucket per nanosecond below 10 us ...
SKETCH_RELATIVE_ERROR = 5e-5        # ... and within 0.005% above: percentiles within 0.01%
BIN_RELATIVE_ERROR = 0.02           # a Timeline bin's RTTs, in buckets this fine: a plot's pixels
STEP_MIN_POINTS = 3                 # on each side of a clock step
STEP_FACTOR = 6.0                   # a step is this many times the offsets' scatter, at least


def _nanoseconds(seconds_clock: Callable[[], float]) -> Callable[[], int]:
    return lambda: int(seconds_clock() * NS_PER_S)


# Nanosecond clocks: Python 3.6 has only the float ones (0.25 us steps at today's epoch).
wall_ns = getattr(time, "time_ns", None) or _nanoseconds(time.time)  # type: Callable[[], int]
monotonic_ns = getattr(time, "perf_counter_ns", None) or _nanoseconds(time.perf_counter)  # type: Callable[[], int]


def clock_offset_ns(clock: Callable[[], int], reference: Optional[Callable[[], int]] = None) -> int:
    """How far clock is ahead of reference (by default wall_ns, CLOCK_REALTIME as this process
    reads it).

    Read between two readings of the reference, three times, keeping the
    tightest: the time a reading takes (longest the first time round) must not
    count as offset.
    """
    reference = reference or wall_ns
    best = None  # type: Optional[Tuple[int, int]]
    for _ in range(3):
        before = reference()
        reading = clock()
        after = reference()
        if best is None or after - before < best[0]:
            best = (after - before, reading - (before + after) // 2)
    return best[1]  # type: ignore[index]  # three readings: never None


class TimecheckError(Exception):
    """An error for the user: main() prints it as one line and exits with exit_code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code






def _thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread, started, that never takes a stop signal: only the main thread does, so that
    one arriving while the program ends cannot find a default handler in another thread."""
    def run() -> None:
        block = getattr(signal, "pthread_sigmask", None)  # not on Windows
        if block is not None:
            block(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM))
        target()
    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


class UnresolvedHost(TimecheckError):
    """A host name the resolver does not know (a usage error, as any TimecheckError by default)."""


class WireError(ValueError):
    """A datagram that is not a well-formed udp-timecheck message."""


class NotARequest(WireError):
    """A well-formed reply where a request was expected: answering it could start a loop."""


def is_number(text: str) -> bool:
    """Whether text is ASCII digits alone (str.isdigit() takes '²' too, which int() refuses)."""
    return _ASCII_DIGITS.fullmatch(text) is not None


_ASCII_DIGITS = re.compile(r"[0-9]+")


def printable(text: str) -> str:
    """Network text made safe for a terminal: control and format characters escaped."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def clip(text: str, limit: int) -> str:
    """Network text made safe to print (see printable) and cut to about limit bytes of UTF-8."""
    shown = printable(text[:limit])
    encoded = shown.encode("utf-8")
    if len(encoded) > limit:
        shown = encoded[:limit].decode("utf-8", "ignore")
    elif len(text) <= limit:
        return shown
    return "{}... ({} characters in all)".format(shown, len(text))


def _why(exc: Exception) -> str:
    """An exception in a few words: an OSError's strerror, else its text."""
    return getattr(exc, "strerror", None) or str(exc)


def _ms(ns: Optional[float]) -> Optional[float]:
    return None if ns is None else round(ns / 1e6, 6)


def iso_utc(ns: int) -> str:
    """A wall-clock time in ns as ISO 8601 in UTC, to the microsecond: 2026-11-25T16:51:39.914437Z."""
    seconds, nanoseconds = divmod(ns, NS_PER_S)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).replace(
        microsecond=nanoseconds // 1000, tzinfo=None)
    return moment.isoformat(timespec="microseconds") + "Z"


def format_address(host: str, port: int) -> str:
    return "[{}]:{}".format(host, port) if ":" in host else "{}:{}".format(host, port)


def address_text(sockaddr: tuple) -> str:
    """A socket address's host as people write it: an IPv6 one with its scope (fe80::1%eth0), which
    Python's own text leaves out from 3.7 on."""
    host = sockaddr[0]
    if len(sockaddr) < 4 or not sockaddr[3] or "%" in host:
        return host
    try:
        return "{}%{}".format(host, socket.if_indextoname(sockaddr[3]))
    except (OSError, AttributeError):  # no such interface now, or no if_indextoname (Windows)
        return "{}%{}".format(host, sockaddr[3])


# ----------------------------------------------------------------------------------------------
# 2. Wire format: pure encode_*/decode_* functions, ours and NTP's; no I/O
# ----------------------------------------------------------------------------------------------

class Message(NamedTuple):
    """A decoded request or reply: ``[id, text, ext?, mac?]``."""
    message_id: int
    text: str
    ext: Optional[Dict[str, Any]]      # our extension object (JSON's values); None in the tutorial's form
    mac: Optional[str]                 # hex HMAC-SHA256, present when a key is in use

    @property
    def seq(self) -> Optional[int]:
        """The probe's number, or None: a message in the tutorial's form."""
        return self.ext.get("seq") if self.ext is not None else None


def _bounded_int(digits: str) -> int:
    # Interpreters before 3.8.14 parse huge integers in quadratic time.
    if len(digits) > 40:
        raise ValueError("integer too long")
    return int(digits)


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError("{} is not a number JSON allows".format(name))


def _refuse_number(text: str) -> NoReturn:
    # No float is ever valid here: refusing the first costs nothing, decoding thousands does.
    raise ValueError("not an integer: {!r}".format(text[:20]))


# json.loads' decoder, told to refuse what no message holds; cost limits come first (_check_shape).
_JSON = json.JSONDecoder(parse_float=_refuse_number, parse_constant=_refuse_number,
                         parse_int=None if hasattr(sys, "get_int_max_str_digits") else _bounded_int)
# The same for a file that holds figures (matrix): floats, but no NaN or Infinity, and no huge integer.
_STRICT_JSON = json.JSONDecoder(parse_constant=_refuse_constant, parse_int=_bounded_int)
_EXT_LIMITS = {"seq": ID_LIMIT, "t2": ID_LIMIT, "t3": ID_LIMIT, "size": MAX_DATAGRAM + 1,  # from 0, below
               "sid": ID_LIMIT, "rx": ID_LIMIT, "xs": ID_LIMIT, "xt": ID_LIMIT, "xr": ID_LIMIT, "xl": 2,
               "pi": 2, "tos": 256, "ttl": 256, "bye": ID_LIMIT}
_CLOCK_INTS = ("maxerr_us", "esterr_us", "freq_ppb")  # a clock state's numbers, |n| <= CLOCK_VALUE_LIMIT
_REPLY_ONLY = frozenset(("t2", "t3", "ts", "bye"))


# An array that starts with an integer and a string: where the separators after the
# string are counted.  The string's pattern is the unrolled loop, linear in its length.
_REQUEST_START = re.compile(r'\[[ \t\n\r]*-?[0-9]{1,20}[ \t\n\r]*,[ \t\n\r]*"[^"\\]*(?:\\.[^"\\]*)*"')


def _check_shape(text: str) -> None:
    """Refuse, before decoding, what would cost far more to decode than a request.

    Decoding costs little per byte of a string and much per value or escape:
    thousands of numbers, keys or escapes in one datagram cost a thousand times
    a request.
    """
    if text.count("\\") > MAX_ESCAPES:
        raise WireError("more than {} escapes".format(MAX_ESCAPES))
    if text.count(",") + text.count(":") <= MAX_SEPARATORS:
        return  # too few to count after the text, and too few to cost much
    start = _REQUEST_START.match(text)
    if start is None:
        raise WireError("not an [id, text, ...] array")
    if text.count(",", start.end()) + text.count(":", start.end()) > MAX_SEPARATORS:
        raise WireError("more than {} commas and colons after the text".format(MAX_SEPARATORS))


# Our server's replies, in the layout reply_parts() gives them, without a clock state: read by
# one regex on the client's hot path.  Any other datagram is decoded as JSON, to the same Message.
_BYTE = rb'([0-9]{1,2}|1[0-9]{2}|2[0-4][0-9]|25[0-5])'
_CANONICAL_REPLY = re.compile(
    rb'\[(0|-?[1-9][0-9]{0,18}), "([ !#-\[\]-~]*)", \{"seq": ([0-9]{1,19}), "ts": "(kernel|user)", '
    rb'(?:"rx": ([0-9]{1,19}), )?(?:"xl": (1), (?:"xs": ([0-9]{1,19}), "xt": ([0-9]{1,19}), )?)?'
    rb'(?:"tos": ' + _BYTE + rb', )?(?:"ttl": ' + _BYTE + rb', )?'
    rb'"t2": ([0-9]{1,19}), "t3": ([0-9]{1,19})(?:, "pad": " *")?\}(?:, "([0-9a-f]{64})")?\]')


def decode_message(data: bytes) -> Message:
    """Decode a request or a reply, or raise WireError; nothing else escapes, whatever the bytes.

    Every number in it is range-checked here, as the encoder's limits are: a
    value out of range makes the datagram malformed.
    """
    match = _CANONICAL_REPLY.fullmatch(data)
    if match is not None:
        return _canonical_reply(match)
    try:
        text = data.decode("utf-8").strip(JSON_WHITESPACE)
        _check_shape(text)
        items = _JSON.decode(text)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, too deep or too long
        raise WireError("not a JSON datagram: {}".format(exc if isinstance(exc, WireError)
                                                         else type(exc).__name__)) from None
    if type(items) is not list or len(items) < 2:
        raise WireError("not an [id, text, ...] array")
    message_id, message_text = _check_id_and_text(items[0], items[1])
    ext = items[2] if len(items) > 2 and type(items[2]) is dict else None
    if ext:
        _check_extension(ext)
    mac = items[3] if len(items) > 3 and type(items[3]) is str else None
    return Message(message_id, message_text, ext, mac)


def _canonical_reply(match: Any) -> Message:
    """The Message of a reply _CANONICAL_REPLY matched: every number within its limit by the
    pattern's digits, the text printable ASCII."""
    message_id, text, seq, stamp, rx, xl, xs, xt, tos, ttl, t2, t3, mac = match.groups()
    ext = {"seq": int(seq), "ts": KERNEL if stamp == b"kernel" else USER, "t2": int(t2),
           "t3": int(t3)}  # type: Dict[str, Any]
    if rx is not None:
        ext["rx"] = int(rx)
    if xl is not None:
        ext["xl"] = 1
        if xs is not None:
            ext["xs"], ext["xt"] = int(xs), int(xt)
    for name, digits in (("tos", tos), ("ttl", ttl)) if tos is not None or ttl is not None else ():
        if digits is not None:
            ext[name] = int(digits)
    return Message(int(message_id), text.decode(), ext, None if mac is None else mac.decode())


def _check_id_and_text(message_id: object, message_text: object) -> Tuple[int, str]:
    """A message's first two elements: an id of at most 64 bits, and a text that is text."""
    if type(message_id) is not int or not -ID_LIMIT < message_id < ID_LIMIT or type(message_text) is not str:
        raise WireError("not an id of at most 64 bits and a text")
    try:  # a JSON escape can smuggle in an unpaired surrogate: not text
        message_text.encode("utf-8")
    except UnicodeEncodeError:
        raise WireError("the text holds an unpaired surrogate") from None
    return message_id, message_text  # checked just above


def _check_extension(ext: Dict[str, Any]) -> None:
    """The extension object's known members, each of its type and in its range; unknown names
    pass, as room for later extensions."""
    for name, value in ext.items():
        limit = _EXT_LIMITS.get(name)
        if limit is not None and (type(value) is not int or not 0 <= value < limit):
            raise WireError("{!r} is not a whole number from 0 to {}".format(name, limit - 1))
        if name == "pad" and type(value) is not str:
            raise WireError("'pad' is not a string")
        if name == "clock" and not _clock_member_valid(value):
            raise WireError("'clock' is neither 1 (a request's) nor a clock state in range (a reply's)")


def _clock_member_valid(value: object) -> bool:
    """A "clock" member: 1 in a request, a clock state in range in a reply."""
    return (type(value) is int and value == 1) or _clock_state_valid(value)


def _clock_state_valid(value: object) -> bool:
    """A reply's "clock" member as the encoder makes it: sync true, false or null, and whole
    numbers within CLOCK_VALUE_LIMIT."""
    if type(value) is not dict or value.get("sync") not in (True, False, None):
        return False
    for name in _CLOCK_INTS:
        number = value.get(name)
        if number is not None and (type(number) is not int or abs(number) > CLOCK_VALUE_LIMIT):
            return False
    return type(value.get("source")) in (str, type(None))


def _mac(key: bytes, context: bytes, unsigned: bytes) -> bytes:
    import hashlib  # here, as hmac below: only a key needs them (start-up is paid on every run)
    import hmac
    return hmac.new(key, context + unsigned, hashlib.sha256).hexdigest().encode("ascii")


def seal(key: bytes, context: bytes, unsigned: bytes) -> bytes:
    """Fill in the MAC of a datagram that ends with ``"<64 zeros>"]``."""
    return unsigned[:-MAC_TRAILER] + _mac(key, context, unsigned) + b'"]'


def mac_of_datagram(data: bytes) -> bytes:
    """The 64 hex digits of a keyed datagram's MAC: it ends with ``"<MAC>"]``."""
    return data[-MAC_TRAILER:-2]


def mac_matches(key: bytes, context: bytes, data: bytes) -> bool:
    """True if the datagram ends with the right MAC of itself (MAC zeroed) under context."""
    if len(data) <= MAC_TRAILER or not data.endswith(b'"]'):
        return False
    import hmac
    expected = _mac(key, context, data[:-MAC_TRAILER] + ZERO_MAC + b'"]')
    return hmac.compare_digest(expected, mac_of_datagram(data))


def reply_context(request_id: bytes, request_mac: bytes) -> bytes:
    """What a reply's MAC covers besides the reply: the request it answers (id as decimal digits)."""
    return REPLY_LABEL + b"%b\n%b\n" % (request_id, request_mac)


class RequestOptions(NamedTuple):
    """What a request asks of the server beyond a reply: its count of the session's requests
    (the loss in each direction), the kernel's transmit stamp of an earlier reply (interleaved,
    as chrony's xleave): the one whose T2 is exchange, and the marks the path left on it."""
    session: Optional[int] = None
    interleaved: bool = False
    path: bool = False
    exchange: Optional[int] = None


NO_OPTIONS = RequestOptions()


def encode_request(request_id: int, text: str, seq: Optional[int] = None, *, size: int = 0,
                   pad_to: int = 0, key: Optional[bytes] = None, ask_clock_state: bool = False,
                   options: RequestOptions = NO_OPTIONS) -> bytes:
    """A request datagram; without seq it is the tutorial's two-element form.

    With seq it carries our extension object, padded with a "pad" string to at
    least pad_to bytes (exactly, when pad_to leaves room for the pad field);
    size asks the server to pad its reply to that many bytes, ask_clock_state
    for its kernel's clock state, options for a session's count (sid), the kernel's
    transmit stamp of an earlier reply (xl, xr: interleaved) and the path's marks (pi).
    With a key the MAC is appended as the last element.
    """
    if seq is None:
        return json.dumps([request_id, text]).encode()
    ext = b'"seq": %d%b%b%b' % (seq, _options_members(options), b', "clock": 1' if ask_clock_state else b"",
                                b', "size": %d' % size if size else b"")
    quoted = b'"%b"' % text.encode() if _PRINTABLE_ASCII.fullmatch(text) else json.dumps(text).encode()
    data = b'[%d, %b, {%b}%b]' % (request_id, quoted, ext,  # json.dumps' own layout
                                   b', "' + ZERO_MAC + b'"' if key is not None else b"")
    if pad_to > len(data):  # "pad" last in the object, as json.dumps would put it, without a second dumps
        end = data.rindex(b"}")
        pad = b" " * max(0, pad_to - len(data) - PAD_OVERHEAD)
        data = b'%b, "pad": "%b"%b' % (data[:end], pad, data[end:])
    return data if key is None else seal(key, REQUEST_LABEL, data)


_PRINTABLE_ASCII = re.compile(r'[ !#-\[\]-~]*')  # what json.dumps leaves as it is, between the quotes


def _options_members(options: RequestOptions) -> bytes:
    """A request's options as members of its extension object (after seq), or nothing."""
    if options.session is None:
        return b""
    exchange = b', "xr": %d' % options.exchange if options.interleaved and options.exchange is not None \
        else b""
    return b', "sid": %d%b%b%b' % (options.session, b', "xl": 1' if options.interleaved else b"", exchange,
                                   b', "pi": 1' if options.path else b"")


class Request(NamedTuple):
    """What a reply needs of a request: its id and seq as decimal digits (seq None: the tutorial's
    form), the size asked for, whether it asks for the server's clock state, and its options."""
    request_id: bytes
    seq: Optional[bytes]
    size: int
    wants_clock_state: bool
    options: RequestOptions = NO_OPTIONS


# The layout our client's requests and the tutorial's have (json.dumps'): one regex finds what a
# reply needs, without decoding any JSON, on the server's hot path.  Anything else (other spacing,
# escapes, other keys) goes through decode_message to the same fields.
_NUMBER = rb'(0|[1-9][0-9]{0,18})'
_CANONICAL_REQUEST = re.compile(
    rb'\[(0|-?[1-9][0-9]{0,18}), "[ !#-\[\]-~]*"(?:, \{"seq": ' + _NUMBER + rb'(?:, "sid": ' + _NUMBER
    + rb'(, "xl": 1(?:, "xr": ' + _NUMBER + rb')?)?(, "pi": 1)?)?(, "clock": 1)?'
    rb'(?:, "size": ([1-9][0-9]{0,4}))?'
    rb'(?:, "pad": " *")?\}(?:, "[0-9a-f]{64}")?)?\]')


def parse_request(data: bytes, match: Optional[Any] = None) -> Request:
    """The Request in data, or WireError (NotARequest: a reply, which could start a loop); match
    is _CANONICAL_REQUEST's, when the caller has it."""
    match = match or _CANONICAL_REQUEST.fullmatch(data)
    if match is not None:
        request_id, seq, session, interleaved, exchange, path, clock, size = match.groups()
        if not size or int(size) <= MAX_DATAGRAM:  # else: out of range, as decode_message says
            options = NO_OPTIONS if session is None else RequestOptions(
                int(session), bool(interleaved), bool(path), int(exchange) if exchange else None)
            return Request(request_id, seq, int(size) if size else 0, bool(clock), options)
    request = decode_message(data)
    ext = request.ext
    if ext is not None and not _REPLY_ONLY.isdisjoint(ext):
        raise NotARequest("a reply, not a request: it carries server timestamps")
    seq = request.seq
    if seq is None:  # no extension object, or one without a seq: the tutorial's form
        return Request(b"%d" % request.message_id, None, 0, False)
    ext = ext or {}  # a seq: there is one
    options = NO_OPTIONS if ext.get("sid") is None else RequestOptions(
        ext["sid"], ext.get("xl") == 1, ext.get("pi") == 1, ext.get("xr"))
    return Request(b"%d" % request.message_id, b"%d" % seq, ext.get("size") or 0, ext.get("clock") == 1,
                   options)


def reply_parts(reply_id: bytes, time_text: bytes, seq: Optional[bytes], server_recv_ns: int, *,
                stamp: bytes = b"kernel", pad_to: int = 0, keyed: bool = False,
                members: bytes = b"") -> Tuple[bytes, Optional[bytes]]:
    """The reply, split where the send timestamp T3 goes; ids and seq as decimal digits.

    A request in the tutorial's form (seq None) gets the tutorial's reply, whole
    (tail None).  Otherwise the reply is head + str(T3) + tail, built before T3
    is read so that reading it is the last thing before the send, padded to
    pad_to bytes where there is room.  stamp says where T2 came from: b"kernel"
    or b"user"; members are what the request asked for beyond that: the
    clock state (encode_clock_state()), its options' (encode_reply_extra()).
    """
    if seq is None:
        return b'[%b, "%b"]' % (reply_id, time_text), None
    head = b'[%b, "%b", {"seq": %b, "ts": "%b", %b"t2": %d, "t3": ' % (
        reply_id, time_text, seq, stamp, members + b", " if members else b"", server_recv_ns)
    tail = b'}, "' + ZERO_MAC + b'"]' if keyed else b"}]"
    if pad_to:
        room = pad_to - len(head) - len(b"%d" % server_recv_ns) - len(tail) - PAD_OVERHEAD
        if room >= 0:
            tail = b', "pad": "' + b" " * room + b'"' + tail
    return head, tail


class ReplyExtra(NamedTuple):
    """What a reply carries for a request's options: the session's count, and the kernel's
    transmit stamp (xt) of the previous reply to the session (seq xs); the marks the request
    arrived with."""
    received: Optional[int] = None
    interleaved: bool = False
    previous_seq: Optional[int] = None
    previous_t3: Optional[int] = None
    tos: Optional[int] = None
    ttl: Optional[int] = None


def encode_reply_extra(extra: ReplyExtra) -> bytes:
    """ReplyExtra as members of a reply's extension object, in the order our client's regex reads."""
    received, interleaved, previous_seq, previous_t3, tos, ttl = extra
    members = b'"rx": %d' % received if received is not None else b""
    if interleaved:
        members += b'"xl": 1' if not members else b', "xl": 1'
        if previous_t3 is not None and previous_seq is not None:
            members += b', "xs": %d, "xt": %d' % (previous_seq, previous_t3)
    if tos is not None or ttl is not None:
        members = b", ".join(filter(None, [members] + [b'"%b": %d' % (name, value) for name, value in (
            (b"tos", tos), (b"ttl", ttl)) if value is not None]))
    return members


def _worst_extra(options: RequestOptions, highest_seq: int) -> bytes:
    """The longest ReplyExtra a request with options can get."""
    largest = 10 ** TIMESTAMP_DIGITS - 1
    marks = 255 if options.path else None
    return encode_reply_extra(ReplyExtra(ID_LIMIT - 1, options.interleaved, highest_seq, largest, marks,
                                         marks))


def fit_tutorial_reply(reply: bytes, limit: int) -> Optional[bytes]:
    """A reply in the tutorial's form cut to at most limit bytes, or None.

    Its text ends with the time's ".ffffff"; the tutorial's client leaves that
    out when the microsecond is 0, as str(datetime) does, so its request can be
    7 bytes shorter than the reply, and a --faulty id one digit longer.
    Fewer digits of the fraction, or none, keep the reply within the request.
    """
    excess = len(reply) - limit
    if excess <= 0:
        return reply
    if excess > TIME_FRACTION:
        return None
    cut = TIME_FRACTION if excess >= TIME_FRACTION - 1 else excess  # never a bare "."
    return reply[:-2 - cut] + reply[-2:]


def min_request_size(highest_seq: int, *, size: int = 0, keyed: bool = False, clock_state: bool = False,
                     options: RequestOptions = NO_OPTIONS) -> int:
    """The smallest request our server can answer whole, for any id and time.

    A reply is never larger than its request, so requests are padded to the
    longest reply they can get: the largest id, T2 and T3 of TIMESTAMP_DIGITS
    digits, the longer stamp, with clock_state the longest clock state, and with
    options the longest of what they ask for.
    """
    worst_id = ID_LIMIT - 1
    extra = _worst_extra(options, highest_seq) if options.session is not None else b""
    head, tail = reply_parts(b"%d" % worst_id, SAMPLE_TEXT.encode(), b"%d" % highest_seq,
                             10 ** (TIMESTAMP_DIGITS - 1), keyed=keyed, members=b", ".join(filter(None, (
                                 b"x" * CLOCK_STATE_MAX if clock_state else b"", extra))))
    worst_options = NO_OPTIONS if options.session is None else options._replace(
        session=ID_LIMIT - 1, exchange=ID_LIMIT - 1 if options.interleaved else None)
    request = encode_request(worst_id, SAMPLE_TEXT, highest_seq, size=size,
                             key=b"k" if keyed else None, ask_clock_state=clock_state, options=worst_options)
    return max(len(head) + TIMESTAMP_DIGITS + len(tail or b""), len(request) + PAD_OVERHEAD)


class ClockState(NamedTuple):
    """What a kernel says of its clock (adjtimex): whether it is synchronised, and how well."""
    synchronized: Optional[bool]  # None: unknown (not Linux)
    maxerror_ns: Optional[int]    # the kernel's bound on the clock's error
    esterror_ns: Optional[int]    # its estimate of the error
    freq_ppb: Optional[int]       # the frequency correction being applied, parts per billion
    source: Optional[str]         # the clock source: tsc, kvm-clock, ...

    def as_dict(self) -> Dict[str, Any]:
        return {"synchronized": self.synchronized, "maxerror_ms": _ms(self.maxerror_ns),
                "esterror_ms": _ms(self.esterror_ns),
                "freq_ppm": None if self.freq_ppb is None else self.freq_ppb / 1000, "source": self.source}


UNKNOWN_CLOCK = ClockState(None, None, None, None, None)


def encode_clock_state(state: ClockState) -> bytes:
    """The "clock" member of a reply's extension object: whole numbers only, as the protocol has."""
    fields = {"sync": state.synchronized}  # type: Dict[str, Any]
    for name, value in zip(_CLOCK_INTS, (state.maxerror_ns, state.esterror_ns, state.freq_ppb)):
        if value is not None:
            value = value if name == "freq_ppb" else value // 1000  # the errors in us
            fields[name] = max(-CLOCK_VALUE_LIMIT, min(CLOCK_VALUE_LIMIT, value))
    if state.source:
        fields["source"] = re.sub(r"[^A-Za-z0-9_.-]", "", state.source)[:CLOCK_SOURCE_CHARS]
    return b'"clock": ' + json.dumps(fields).encode()


def decode_clock_state(value: Any) -> Optional[ClockState]:
    """A reply's "clock" member, or None when it is not one (decode_message has range-checked it)."""
    if not _clock_state_valid(value):
        return None
    maxerror, esterror, freq = (value.get(name) for name in _CLOCK_INTS)
    source = value.get("source")
    return ClockState(value.get("sync"), None if maxerror is None else maxerror * 1000,
                      None if esterror is None else esterror * 1000, freq,
                      printable(source[:CLOCK_SOURCE_CHARS])[:CLOCK_SOURCE_CHARS] if source else None)


_WORST = -CLOCK_VALUE_LIMIT * 1000
CLOCK_STATE_MAX = len(encode_clock_state(  # the longest: every figure at its limit
    ClockState(False, _WORST, _WORST, -CLOCK_VALUE_LIMIT, "x" * CLOCK_SOURCE_CHARS)))


class NtpReply(NamedTuple):
    """The fields of an NTP packet that SNTP uses (RFC 4330, RFC 5905)."""
    leap: int
    version: int
    mode: int
    stratum: int
    refid: bytes
    root_delay_ns: int
    root_dispersion_ns: int
    origin: int       # as sent: the client's transmit timestamp, echoed
    receive_ns: int   # T2
    transmit_ns: int  # T3
    transmit: int     # as sent: 0 means no time at all
    receive: int      # as sent: 0 too


def encode_ntp_request(nonce: int) -> bytes:
    """An SNTPv4 client request (mode 3).  Its transmit timestamp is a random nonce that the
    reply must echo as its origin, as chrony's client sends, rather than our clock."""
    return NTP_PACKET.pack((4 << 3) | 3, 0, 0, 0, 0, 0, b"\0" * 4, 0, 0, 0, nonce)


def ntp_to_ns(value: int, near_ns: int) -> int:
    """A 64-bit NTP timestamp as ns since 1970, in the era nearest near_ns (they wrap in 2036)."""
    seconds = (value >> 32) - NTP_EPOCH_OFFSET
    era = 1 << 32
    seconds += round((near_ns // NS_PER_S - seconds) / era) * era
    return seconds * NS_PER_S + ((value & 0xFFFFFFFF) * NS_PER_S >> 32)


def decode_ntp(data: bytes, near_ns: int) -> NtpReply:
    """An NTP packet, its times in ns since 1970, or WireError."""
    if len(data) < NTP_PACKET.size:
        raise WireError("{} bytes: not an NTP packet".format(len(data)))
    (first, stratum, _, _, root_delay, root_dispersion, refid, _, origin, receive,
     transmit) = NTP_PACKET.unpack_from(data)
    return NtpReply(first >> 6, first >> 3 & 7, first & 7, stratum, refid, root_delay * NS_PER_S >> 16,
                    root_dispersion * NS_PER_S >> 16, origin, ntp_to_ns(receive, near_ns),
                    ntp_to_ns(transmit, near_ns), transmit, receive)


def root_distance_ns(reply: NtpReply) -> int:
    """How far the server's clock may be from UTC by its own account: RFC 5905's root
    distance, without the dispersion of this one exchange (root delay / 2 + root dispersion)."""
    return reply.root_delay_ns // 2 + reply.root_dispersion_ns


def is_kiss(reply: NtpReply) -> bool:
    """A kiss-o'-death: a server's reply at stratum 0, its reference id a code (RATE, DENY...)."""
    return reply.mode == 4 and reply.version in (3, 4) and reply.stratum == 0


def ntp_problem(reply: NtpReply) -> Optional[str]:
    """Why an NTP reply cannot be used, or None: RFC 4330's checks, the origin aside."""
    if reply.mode != 4:
        return "mode {}, not a server's reply".format(reply.mode)
    if reply.version not in (3, 4):
        return "NTP version {}".format(reply.version)
    if is_kiss(reply):
        code = printable(reply.refid.rstrip(b"\0").decode("ascii", "replace"))  # from the network: escaped
        return "kiss-o'-death {}".format(code or "?")
    if reply.transmit == 0:
        return "no transmit time"
    if reply.receive == 0:
        return "no receive time"
    if reply.leap == 3 or reply.stratum >= 16:
        return "the server is not synchronised (leap {}, stratum {})".format(reply.leap, reply.stratum)
    if root_distance_ns(reply) > MAX_ROOT_DISTANCE_NS:
        return "the server is not synchronised (root distance {:.3f} s, above {:g} s)".format(
            root_distance_ns(reply) / NS_PER_S, MAX_ROOT_DISTANCE_NS / NS_PER_S)
    return None


# RFC 5905's kiss codes, as a user reads them (section 7.4)
KISS_CODES = {"RATE": "RATE: ask less often", "DENY": "DENY: access refused", "RSTR": "RSTR: access refused",
              "AUTH": "AUTH: authentication failed", "CRYP": "CRYP: cryptographic authentication failed",
              "NKEY": "NKEY: no key found for this client",
              "INIT": "INIT: the server has not synchronised yet",
              "STEP": "STEP: the server's clock stepped", "DROP": "DROP: lost peer in the symmetric mode"}


def describe_refid(stratum: int, refid: bytes) -> str:
    """A reference id as people read it: a code (GPS, PPS) at stratum 1, else an IPv4 address."""
    if stratum <= 1:
        return printable(refid.rstrip(b"\0").decode("ascii", "replace"))
    return socket.inet_ntoa(refid)


# STAMP (RFC 8762) and its TLVs (RFC 8972): the Session-Sender's test packet and the
# Session-Reflector's, unauthenticated (44 bytes) and authenticated (112, HMAC-SHA-256
# truncated to 16 bytes over what precedes it), then TLVs.  Timestamps are NTP's 64 bits.
STAMP_PORT = 862
STAMP_SENDER = struct.Struct("!IQHH28x")
STAMP_REFLECTOR = struct.Struct("!IQHHQIQH2xB3x")
STAMP_SENDER_KEYED = struct.Struct("!I12xQHH68x")
STAMP_REFLECTOR_KEYED = struct.Struct("!I12xQHH4xQ8xI12xQH6xB15x")
STAMP_HMAC_BYTES = 16
STAMP_TLV = struct.Struct("!BBH")
TLV_PADDING, TLV_CLASS_OF_SERVICE, TLV_FOLLOW_UP = 1, 4, 7   # IANA's STAMP TLV types
TLV_UNRECOGNIZED = 0x80             # the U flag: the reflector did not know the TLV
FOLLOW_UP = struct.Struct("!IQB3x")
STAMP_TLVS_MOST = 16                # TLVs read of a packet; what follows them is padding
NTP_TIME = struct.Struct("!Q")
STAMP_ROUNDING = 1 << 12             # 2**-20 s, about 1 us: a reflected timestamp may be rounded by this much
STAMP_ESTIMATE = "a STAMP error estimate"  # where a reflector's clock state came from
TIMESTAMP_SW_LOCAL = 2              # RFC 8972's timestamping methods: 1 hardware, 2 software, 3 control plane


class StampPacket(NamedTuple):
    """A STAMP test packet, its fields as on the wire.  The reflector's alone: receive (T2), and
    the sender's seq, timestamp, error estimate and TTL it reflects.  tlvs are (flags, type, value)."""
    seq: int
    timestamp: int
    error: int
    ssid: int
    receive: int = 0
    sender_seq: int = 0
    sender_timestamp: int = 0
    sender_error: int = 0
    sender_ttl: int = 0
    tlvs: Tuple[Tuple[int, int, bytes], ...] = ()


def stamp_base(reflector: bool, keyed: bool) -> struct.Struct:
    """The fixed part of a STAMP packet (the HMAC not counted)."""
    return (STAMP_REFLECTOR_KEYED if keyed else STAMP_REFLECTOR) if reflector else \
        (STAMP_SENDER_KEYED if keyed else STAMP_SENDER)


def stamp_hmac(key: bytes, signed: bytes) -> bytes:
    """RFC 8762's HMAC: HMAC-SHA-256 of what precedes it, its first 16 bytes."""
    import hashlib
    import hmac
    return hmac.new(key, signed, hashlib.sha256).digest()[:STAMP_HMAC_BYTES]


def encode_stamp(packet: StampPacket, reflector: bool, key: Optional[bytes] = None, size: int = 0) -> bytes:
    """A STAMP packet, its TLVs after the fixed part (and the HMAC, with a key), zero-padded to size."""
    return sign_stamp(key, reflector, stamp_unsigned(packet, reflector, key is not None, size))


def stamp_unsigned(packet: StampPacket, reflector: bool, keyed: bool, size: int = 0) -> bytes:
    """encode_stamp()'s packet with its HMAC (keyed) still zeros: a field can change before sign_stamp()."""
    data = stamp_base(reflector, keyed).pack(*packet[:4] + (packet[4:9] if reflector else ()))
    data += bytes(STAMP_HMAC_BYTES if keyed else 0) + b"".join(
        STAMP_TLV.pack(flags, kind, len(value)) + value for flags, kind, value in packet.tlvs)
    return data + bytes(max(0, size - len(data)))


def sign_stamp(key: Optional[bytes], reflector: bool, data: bytes) -> bytes:
    """data with its HMAC filled in (none without a key)."""
    if key is None:
        return data
    end = stamp_base(reflector, True).size
    return data[:end] + stamp_hmac(key, data[:end]) + data[end + STAMP_HMAC_BYTES:]


def decode_stamp(data: bytes, reflector: bool, key: Optional[bytes] = None) -> StampPacket:
    """A STAMP packet, or WireError: too short, or (with a key) its HMAC wrong.  What follows the
    fixed part is read as TLVs as long as they parse; zeros, or anything else, are padding."""
    base = stamp_base(reflector, key is not None)
    end = base.size + (STAMP_HMAC_BYTES if key is not None else 0)
    if len(data) < end:
        raise WireError("{} bytes: not a STAMP packet ({} at least)".format(len(data), end))
    if key is not None:
        import hmac
        if not hmac.compare_digest(stamp_hmac(key, data[:base.size]), data[base.size:end]):
            raise WireError("its HMAC is not right")
    return StampPacket(*base.unpack_from(data), tlvs=decode_stamp_tlvs(data, end))  # type: ignore[misc]


def decode_stamp_tlvs(data: bytes, offset: int) -> Tuple[Tuple[int, int, bytes], ...]:
    """The TLVs from offset on, as (flags, type, value), until what follows does not parse as one;
    STAMP_TLVS_MOST at most (a 64 KB packet of empty TLVs must not cost 16,000 of them)."""
    tlvs = []  # type: List[Tuple[int, int, bytes]]
    while offset + STAMP_TLV.size <= len(data) and len(tlvs) < STAMP_TLVS_MOST:
        flags, kind, length = STAMP_TLV.unpack_from(data, offset)
        if kind == 0 or offset + STAMP_TLV.size + length > len(data):
            break  # type 0 is reserved: padding, as a TWAMP-light reflector's zeros
        offset += STAMP_TLV.size
        tlvs.append((flags, kind, data[offset:offset + length]))
        offset += length
    return tuple(tlvs)


def encode_error_estimate(synchronized: Optional[bool], error_ns: Optional[int]) -> int:
    """RFC 4656's error estimate: S only when synchronised, Z 0 (NTP format), and the scale and
    multiplier of the smallest error it can say that is not below error_ns (unknown: the largest)."""
    units = -(-max(error_ns, 1) * (1 << 32) // NS_PER_S) if error_ns is not None else 255 << 63
    scale = max(0, units.bit_length() - 8)
    multiplier = -(-units >> scale)
    if multiplier > 255:
        scale, multiplier = scale + 1, -(-units >> (scale + 1))
    if scale > 63:
        scale, multiplier = 63, 255
    return (0x8000 if synchronized else 0) | scale << 8 | multiplier


def decode_error_estimate(value: int) -> Tuple[bool, int]:
    """(synchronised, the error in ns, rounded up) of an error estimate."""
    scale, multiplier = value >> 8 & 0x3F, value & 0xFF
    return bool(value & 0x8000), -(-multiplier * (1 << scale) * NS_PER_S // (1 << 32))


def ns_to_ntp(ns: int) -> int:
    """ns since 1970 as a 64-bit NTP timestamp (its era's)."""
    seconds, rest = divmod(ns, NS_PER_S)
    return ((seconds + NTP_EPOCH_OFFSET) & 0xFFFFFFFF) << 32 | (rest << 32) // NS_PER_S


# ----------------------------------------------------------------------------------------------
# 3. Platform: socket options, ancillary data, addresses, key files, the kernel's clock state
# ----------------------------------------------------------------------------------------------

# The platform, decided once, here: what its sockets and kernel offer.  Linux has it
# all; macOS and the BSDs stamp receives in microseconds (SO_TIMESTAMP) and give a
# datagram's destination with IP_RECVDSTADDR; Windows has neither recvmsg nor sendmsg,
# so only user-space stamps; only Linux and the BSDs tell their clock's state.
LINUX = sys.platform.startswith("linux")
WINDOWS = sys.platform.startswith(("win32", "cygwin"))
BSD = sys.platform == "darwin" or "bsd" in sys.platform  # macOS too

TIMESPEC = struct.Struct("@ll")     # struct timespec: seconds and nanoseconds
TIMEVAL = struct.Struct("@ll")      # struct timeval: seconds and microseconds (as long as time_t)


class StampOption(NamedTuple):
    """A socket option that stamps datagrams, and how its payload reads."""
    option: int
    layout: struct.Struct
    unit_ns: int                    # what one unit of its second field is worth


# (SO_TIMESTAMPNS, SO_TIMESTAMPING) by architecture; most share asm-generic's values.
SO_TIMESTAMPNS, SO_TIMESTAMPING = (
    {"sparc": (0x21, 0x23), "sparc64": (0x21, 0x23), "parisc": (0x4013, 0x4014),
     "parisc64": (0x4013, 0x4014)}.get(os.uname().machine, (35, 37)) if LINUX else (None, None))
RECEIVE_STAMPS = (StampOption(SO_TIMESTAMPNS, TIMESPEC, 1) if SO_TIMESTAMPNS is not None else
                  StampOption(0x0400, TIMEVAL, 1000) if BSD else None)  # SO_TIMESTAMP, everywhere 0x400
# SO_TIMESTAMPING: software transmit stamps (TX_SOFTWARE asks for them, SOFTWARE reports them),
# numbered by the kernel (OPT_ID), without the datagram's bytes (OPT_TSONLY); on the error queue,
# with the ICMP errors that IP_RECVERR puts there, each a struct sock_extended_err.  OPT_RX_FILTER
# (Linux 6.12 on) keeps SOFTWARE from adding a second receive stamp to every datagram read.
SOF_TX_SOFTWARE, SOF_SOFTWARE, SOF_OPT_ID, SOF_OPT_TSONLY = 1 << 1, 1 << 4, 1 << 7, 1 << 11
SOF_OPT_RX_FILTER = 1 << 17
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
IP_RECVERR = getattr(socket, "IP_RECVERR", 11 if LINUX else None)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if LINUX else None)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25 if LINUX else None)
EXTENDED_ERROR = struct.Struct("@IBBBBII")  # ee_errno, ee_origin, ee_type, ee_code, ee_pad, ee_info, ee_data
SO_EE_ORIGIN_ICMPS, SO_EE_ORIGIN_TIMESTAMPING = (2, 3), 4
# The destination of each datagram, so that a wildcard server replies from it: IP_PKTINFO
# (in_pktinfo, sent back as it came) on Linux; IP_RECVDSTADDR (an in_addr, sent back as
# IP_SENDSRCADDR) on the BSDs; IPV6_RECVPKTINFO everywhere that has IPv6 and sendmsg.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8 if LINUX else None)
IP_RECVDSTADDR = getattr(socket, "IP_RECVDSTADDR", None)
IP_SENDSRCADDR = getattr(socket, "IP_SENDSRCADDR", IP_RECVDSTADDR)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", None)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", None)
# The marks a datagram came with, its TOS (DSCP and ECN) and TTL (hop limit): asked for with the
# RECV options, reported in control messages of the plain option's number.
IP_TOS, IP_TTL = getattr(socket, "IP_TOS", 1), getattr(socket, "IP_TTL", 2)
IP_RECVTOS = getattr(socket, "IP_RECVTOS", 13 if LINUX else None)
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12 if LINUX else None)
IPV6_TCLASS = getattr(socket, "IPV6_TCLASS", None)
IPV6_RECVTCLASS = getattr(socket, "IPV6_RECVTCLASS", None)
IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", None)
IPV6_RECVHOPLIMIT = getattr(socket, "IPV6_RECVHOPLIMIT", None)
IPV6_UNICAST_HOPS = getattr(socket, "IPV6_UNICAST_HOPS", None)
INT = struct.Struct("@i")
ANCILLARY_SPACE = 256               # room for a timestamp and a packet-info message
PENDING_STAMPS = 4096               # datagrams sent whose transmit stamps are still awaited, at most
ERROR_QUEUE_READS = 256             # messages read off an error queue at one go, at most
KERNEL_GAP_NOISE_NS = 1_000_000     # a wall clock nearer the kernel's than this is the kernel's
RECEIVE_BUFFER_PER_TARGET = 65536   # bytes of waiting replies a shared socket has room for, a target ...
RECEIVE_BUFFER_MAX = 8 << 20        # ... up to this (the server's too), as far as the system allows


def resolve(host: str, port: int, passive: bool = False, wanted: int = 0) -> List[Tuple[int, Any]]:
    """Every (family, sockaddr) for host and port, IPv4 or IPv6 (or only the wanted family: -4, -6), in
    the resolver's order.

    "[::1]" is taken for "::1", as the tool itself prints such addresses; no
    address at all is a usage error.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM, 0,
                                   socket.AI_PASSIVE if passive else 0)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvedHost("cannot resolve host {!r}: {}".format(
            host, getattr(exc, "strerror", None) or exc)) from None
    found = [(int(family), address) for family, _, _, _, address in infos
             if family in MAX_UDP_PAYLOAD and family in (wanted or family,)]  # type: List[Tuple[int, Any]]
    if not found:
        raise TimecheckError("host {!r} has no {} address".format(
            host, FAMILY_NAMES.get(wanted, "IPv4 or IPv6")))
    return found


def has_message_calls(sock: socket.socket) -> bool:
    """Whether sock has recvmsg and sendmsg (Windows has neither): ancillary data, or none."""
    return hasattr(sock, "recvmsg") and hasattr(sock, "sendmsg")


def enable_kernel_timestamps(sock: socket.socket) -> bool:
    """Ask the kernel to stamp each datagram as it arrives; False where it cannot."""
    return kernel_stamps_refused(sock) is None


def kernel_stamps_refused(sock: socket.socket) -> Optional[str]:
    """Ask the kernel to stamp each datagram as it arrives; why it cannot, in words, or None."""
    if not has_message_calls(sock):
        return "no recvmsg on this platform"
    if RECEIVE_STAMPS is None:
        return "this platform has no receive timestamps"
    try:
        sock.setsockopt(socket.SOL_SOCKET, RECEIVE_STAMPS.option, 1)
    except OSError as exc:
        return "the kernel refused them ({})".format(exc.strerror or exc)
    return None


def _mark_options(sock: socket.socket) -> List[Tuple[int, Optional[int]]]:
    """(level, option) pairs that report the TOS and the TTL of each datagram on sock."""
    options = [(socket.IPPROTO_IP, IP_RECVTOS), (socket.IPPROTO_IP, IP_RECVTTL)]  # IPv4, mapped too
    if sock.family == socket.AF_INET6:
        options += [(socket.IPPROTO_IPV6, IPV6_RECVTCLASS), (socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT)]
    return options


def enable_path_marks(sock: socket.socket) -> bool:
    """Ask for each datagram's TOS and TTL (hop limit); whether any of it will come."""
    enabled = False
    for level, option in _mark_options(sock) if has_message_calls(sock) else ():
        if option is not None:
            try:
                sock.setsockopt(level, option, 1)
                enabled = True
            except OSError:
                pass  # that family's, on a socket of the other
    return enabled


def read_marks(ancillary: Sequence[Tuple[int, int, bytes]]) -> Tuple[Optional[int], Optional[int]]:
    """(TOS, TTL) of a datagram, from its control messages; None for what did not come."""
    tos = ttl = None
    for level, kind, payload in ancillary:
        value = payload[0] if len(payload) == 1 else (INT.unpack(payload)[0] if len(payload) == INT.size
                                                      else None)
        if (level, kind) in ((socket.IPPROTO_IP, IP_TOS), (socket.IPPROTO_IPV6, IPV6_TCLASS)):
            tos = value
        elif (level, kind) in ((socket.IPPROTO_IP, IP_TTL), (socket.IPPROTO_IPV6, IPV6_HOPLIMIT)):
            ttl = value
    return tos, ttl


def tos_mark(family: int, tos: int) -> Tuple[Tuple[int, int, bytes], ...]:
    """The control message that marks one datagram with tos."""
    if family == socket.AF_INET6 and IPV6_TCLASS is not None:
        return ((socket.IPPROTO_IPV6, IPV6_TCLASS, INT.pack(tos)),)
    return ((socket.IPPROTO_IP, IP_TOS, INT.pack(tos)),)


def set_marks(sock: socket.socket, tos: Optional[int], ttl: Optional[int]) -> None:
    """Mark every datagram sock sends with tos, and send it with ttl hops, where given."""
    v6 = sock.family == socket.AF_INET6
    for value, option in ((tos, IPV6_TCLASS if v6 else IP_TOS), (ttl, IPV6_UNICAST_HOPS if v6 else IP_TTL)):
        if value is not None and option is not None:
            sock.setsockopt(socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP, option, value)


def enlarge_receive_buffer(sock: socket.socket, size: int) -> None:
    """Room for size bytes of datagrams waiting on sock (a stalled process loses none that fits):
    as far as the system allows (net.core.rmem_max), and beyond with the privilege to (root)."""
    for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
        try:
            if option is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < size:
                sock.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            pass  # not allowed: the system's own size stays


def source_address(family: int, address: tuple, source: Optional[str] = None) -> str:
    """The address datagrams to address go from (from source, where given), as the kernel's
    routes choose it: a socket connected, which sends nothing.  A usage error when none can."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            if source is not None:
                probe.bind((source, 0))
            probe.connect(address)
            return probe.getsockname()[0]
    except OSError as exc:
        raise TimecheckError("cannot reach {}{}: {}".format(format_address(*address[:2]), " from " + source
                                                            if source else "", exc.strerror or exc)) from None


def default_ttl(sock: socket.socket) -> Optional[int]:
    """The TTL (hop limit) sock's datagrams leave with, or None where the platform will not say."""
    v6 = sock.family == socket.AF_INET6
    option = IPV6_UNICAST_HOPS if v6 else IP_TTL
    if option is None:  # no such option here
        return None
    try:
        ttl = sock.getsockopt(socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP, option)
    except OSError:
        return None
    return ttl if 0 < ttl < 256 else None


def _packet_info_option(sock: socket.socket) -> Tuple[int, Optional[int]]:
    """(level, option) that reports each datagram's destination address on sock."""
    if sock.family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, IPV6_RECVPKTINFO
    return socket.IPPROTO_IP, IP_PKTINFO if IP_PKTINFO is not None else IP_RECVDSTADDR


def _set_option(sock: socket.socket, level: int, option: Optional[int]) -> bool:
    """A boolean socket option turned on; False where the platform or the kernel has none."""
    if option is None:
        return False
    try:
        sock.setsockopt(level, option, 1)
    except OSError:
        return False
    return True


def enable_packet_info(sock: socket.socket) -> bool:
    """Ask for each datagram's destination address, so that the reply can come from it."""
    level, option = _packet_info_option(sock)
    return has_message_calls(sock) and _set_option(sock, level, option)


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """glibc's struct timex, for adjtimex(2).  The BSDs' and macOS's, for ntp_adjtime(2), has the
    same first fields at the same places, and is shorter: this one holds either."""
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time", _Timeval), ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long),
                ("jitter", ctypes.c_long), ("shift", ctypes.c_int), ("stabil", ctypes.c_long),
                ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long),
                ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int), ("reserved", ctypes.c_int * 11)]


def read_clock_state() -> ClockState:
    """This kernel's own view of its clock (adjtimex on Linux, ntp_adjtime on the BSDs and macOS,
    with no modes: a read, no privileges needed).

    Synchronised means what the kernel means: its STA_UNSYNC flag is clear and
    the call does not answer TIME_ERROR, which chronyd or ntpd arrange while
    they discipline the clock.  Unknown (None) elsewhere, as on Windows.
    """
    if not (LINUX or BSD):
        return UNKNOWN_CLOCK
    timex = _Timex()
    try:
        state = getattr(ctypes.CDLL(None, use_errno=True), "adjtimex" if LINUX else "ntp_adjtime")(
            ctypes.byref(timex))
    except (OSError, AttributeError, TypeError):
        return UNKNOWN_CLOCK
    if state < 0:
        return UNKNOWN_CLOCK
    try:
        with open(CLOCK_SOURCE_FILE) as source_file:
            source = source_file.read().strip()  # type: Optional[str]
    except OSError:
        source = None
    synchronized = state != TIME_ERROR and not timex.status & STA_UNSYNC
    # maxerror and esterror in us; freq in ppm with 16 fractional bits, as both kernels keep it
    return ClockState(synchronized, timex.maxerror * 1000, timex.esterror * 1000, timex.freq * 1000 >> 16,
                      source)


_PACKET_INFO_LEVELS = frozenset((socket.IPPROTO_IP, socket.IPPROTO_IPV6))
_PACKET_INFO_KINDS = frozenset(kind for kind in (IP_PKTINFO, IPV6_PKTINFO) if kind is not None)


def _stamp_ns(payload: bytes, stamps: StampOption) -> Optional[int]:
    """A receive stamp's payload in ns since the epoch, or None when it is not one."""
    if len(payload) != stamps.layout.size:
        return None
    seconds, fraction = stamps.layout.unpack(payload)
    return seconds * NS_PER_S + fraction * stamps.unit_ns


def read_ancillary(ancillary: Sequence[Tuple[int, int, bytes]]) -> Tuple[Optional[int], Sequence[tuple]]:
    """(the kernel's receive time in ns or None, the packet info to send the reply with)."""
    level, kind, payload = ancillary[0]
    rest = ancillary[1:]
    if kind == SO_TIMESTAMPNS and level == socket.SOL_SOCKET and len(payload) == TIMESPEC.size \
            and (not rest or len(rest) == 1 and rest[0][1] in _PACKET_INFO_KINDS):
        seconds, nanoseconds = TIMESPEC.unpack(payload)  # Linux: the kernel's order, the usual case
        return seconds * NS_PER_S + nanoseconds, rest
    kernel_ns, control = None, []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and RECEIVE_STAMPS is not None and kind == RECEIVE_STAMPS.option:
            kernel_ns = _stamp_ns(payload, RECEIVE_STAMPS)
        elif level == socket.IPPROTO_IP and kind == IP_RECVDSTADDR and IP_PKTINFO is None:
            control.append((level, IP_SENDSRCADDR, payload))  # the BSDs: sent back as the source
        elif level in _PACKET_INFO_LEVELS and kind in (IP_PKTINFO, IPV6_PKTINFO):
            control.append((level, kind, payload))  # in_pktinfo or in6_pktinfo: sent back as it came
    return kernel_ns, control


def message_calls(sock: socket.socket) -> Tuple[Callable, Callable]:
    """sock's recvmsg and sendmsg, or stand-ins with no ancillary data where the platform has
    neither (Windows)."""
    if has_message_calls(sock):
        return sock.recvmsg, sock.sendmsg

    def recvmsg(size: int, _ancillary_size: int, _flags: int = 0) -> Tuple[bytes, list, int, tuple]:
        data, source = sock.recvfrom(size)
        return data, [], 0, source

    def sendmsg(buffers: Sequence[bytes], _control: object = (), _flags: int = 0,
                target: Optional[tuple] = None) -> int:
        return sock.sendto(b"".join(buffers), target) if target else sock.send(b"".join(buffers))
    return recvmsg, sendmsg


def _set_timestamping(sock: socket.socket, flags: int) -> bool:
    """SO_TIMESTAMPING's flags on sock, where the platform and the kernel take them (with
    OPT_RX_FILTER where the kernel knows it)."""
    if SO_TIMESTAMPING is None or not has_message_calls(sock):
        return False
    for tried in (flags | SOF_OPT_RX_FILTER, flags):
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, tried)
        except OSError:
            continue
        return True
    return False


# The control message that asks the kernel to stamp one datagram as it leaves (none elsewhere).
TRANSMIT_STAMP_REQUEST = ((socket.SOL_SOCKET, SO_TIMESTAMPING, struct.pack("@I", SOF_TX_SOFTWARE)),) \
    if SO_TIMESTAMPING is not None else ()


def _error_report(ancillary: Sequence[Tuple[int, int, bytes]]) -> Tuple[Optional[int], Optional[tuple]]:
    """(the stamp in ns, sock_extended_err's fields) of a message off the error queue."""
    stamp_ns = report = None
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPING and len(payload) >= TIMESPEC.size:
            seconds, nanoseconds = TIMESPEC.unpack_from(payload)  # the first of three: software
            stamp_ns = seconds * NS_PER_S + nanoseconds
        elif kind in (IP_RECVERR, IPV6_RECVERR) and len(payload) >= EXTENDED_ERROR.size:
            report = EXTENDED_ERROR.unpack_from(payload)
    return stamp_ns, report


class ErrorQueue:
    """A socket's error queue (Linux): the kernel's stamps of its datagrams leaving, each matched
    to its datagram by the kernel's own count of them (SOF_TIMESTAMPING_OPT_ID), and, with
    refusals, the destinations an ICMP error says nobody listens at (IP_RECVERR).

    every stamps every datagram the socket sends (a client's); else only those sent with
    TRANSMIT_STAMP_REQUEST (a server's interleaved replies).  A stamp earlier than the
    kernel's clock before its datagram's send is not taken: never a stamp for the wrong one.
    """

    def __init__(self, sock: socket.socket, every: bool, refusals: bool = False) -> None:
        self.sock, self._flags = sock, SOF_SOFTWARE | SOF_OPT_ID | SOF_OPT_TSONLY | (SOF_TX_SOFTWARE * every)
        self.stamps = LINUX and _set_timestamping(sock, self._flags)
        self.refusals = refusals and self.stamps and _set_option(
            sock, *((socket.IPPROTO_IPV6, IPV6_RECVERR) if sock.family == socket.AF_INET6
                    else (socket.IPPROTO_IP, IP_RECVERR)))
        self._pending = collections.OrderedDict()  # type: collections.OrderedDict[int, Tuple[object, int]]
        self._next_key = 0

    def waiting(self) -> int:
        """How many datagrams sent still await their stamps."""
        return len(self._pending)

    def sent(self, token: object, not_before_ns: int) -> None:
        """A datagram the kernel stamps went, no earlier than not_before_ns: token is its stamp's."""
        self._pending[self._next_key] = (token, not_before_ns)
        self._next_key += 1
        if len(self._pending) > PENDING_STAMPS:  # never stamped (a full error queue): forgotten
            self._pending.popitem(last=False)

    def recount(self) -> None:
        """After a failed send, which the kernel may have counted: both count again from 0 (the
        option set anew resets the kernel's), and the datagrams still waiting get no stamp."""
        _set_timestamping(self.sock, self._flags & ~SOF_OPT_ID)
        _set_timestamping(self.sock, self._flags)
        self._pending.clear()
        self._next_key = 0

    def read(self, most: int = ERROR_QUEUE_READS) -> Tuple[List[Tuple[object, int]], List[tuple]]:
        """At most most messages, without blocking: (token, stamp in ns) of the stamps that came,
        and the destinations refused."""
        stamps, refused = [], []  # type: List[Tuple[object, int]], List[tuple]
        for _ in range(most):
            try:
                _, ancillary, _, address = self.sock.recvmsg(1, ANCILLARY_SPACE, MSG_ERRQUEUE)
            except OSError:  # BlockingIOError: nothing (more) queued
                break
            stamp_ns, report = _error_report(ancillary)
            if report is None:
                continue
            if report[1] == SO_EE_ORIGIN_TIMESTAMPING:
                token, not_before_ns = self._pending.pop(report[6], (None, 0))  # ee_data: the kernel's count
                if token is not None and stamp_ns is not None and stamp_ns >= not_before_ns:
                    stamps.append((token, stamp_ns))
            elif report[1] in SO_EE_ORIGIN_ICMPS and report[0] == errno.ECONNREFUSED:
                refused.append(address)
        return stamps, refused


def arrival_ns(kernel_ns: Optional[int], clock_ns: int, real_ns: int, max_age_ns: int) -> Optional[int]:
    """When a datagram arrived, on the clock that read clock_ns, from the kernel's stamp.

    The kernel stamps on CLOCK_REALTIME; real_ns is that clock, read with
    clock_ns (the same reading when they are one clock), so the stamp's age
    carries over to any clock.  A stamp later than that reading, or older than
    max_age_ns (the longest the datagram can have waited), is implausible: None.
    """
    if kernel_ns is None:
        return None
    age = real_ns - kernel_ns
    return clock_ns - age if 0 <= age <= max_age_ns else None


def _wall_ahead_of_kernel_ns() -> int:
    """How far this process's wall clock is ahead of the kernel's (CLOCK_REALTIME, which stamps
    datagrams): none, unless something like libfaketime shifts the process's view.  Read around
    a datagram to itself on loopback, which the kernel stamps during the send, three times, the
    tightest kept; 0 where there are no such stamps, or within the readings' own noise."""
    best = None  # type: Optional[Tuple[int, int]]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            if kernel_stamps_refused(sock) is not None or RECEIVE_STAMPS is None:
                return 0
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(1.0)
            for _ in range(3):
                before = wall_ns()
                sock.sendto(b"", sock.getsockname())
                after = wall_ns()
                stamp_ns = read_ancillary(sock.recvmsg(1, ANCILLARY_SPACE)[1] or [(0, 0, b"")])[0]
                if stamp_ns is not None and (best is None or after - before < best[0]):
                    best = (after - before, (before + after) // 2 - stamp_ns)
    except OSError:
        return 0
    return 0 if best is None or abs(best[1]) < KERNEL_GAP_NOISE_NS else best[1]


class KernelClock:
    """The kernel's stamps (on CLOCK_REALTIME) carried over to the clock a run or a server reads,
    wall_clock (a test's, injected: offset_ns is how far it is ahead, read at each use).

    A process whose own reading of the wall clock disagrees with the kernel's (libfaketime's,
    say: a constant gap) cannot place the kernel's stamps on its clock to the microsecond, so
    it uses none (usable is False) and reads the clock itself, counted.  The gap is measured at
    the start, and again, at most once a second, when a stamp's age looks impossible.  So it is
    told apart from a datagram that simply waited long (a stalled process): that one's stamp is
    kept, however old."""

    def __init__(self, wall_clock: Optional[Callable[[], int]] = None) -> None:
        self.wall_clock = wall_clock or wall_ns
        self._injected = wall_clock is not None and wall_clock is not wall_ns
        self.gap_ns, self._measured_ns = _wall_ahead_of_kernel_ns(), monotonic_ns()

    @property
    def usable(self) -> bool:
        return not self.gap_ns

    @property
    def offset_ns(self) -> int:
        return clock_offset_ns(self.wall_clock) if self._injected else 0

    def arrival(self, kernel_ns: Optional[int], user_ns: int, max_age_ns: int) -> Optional[int]:
        """A datagram's kernel stamp on this clock, read at user_ns; None when it is later than
        that or older than max_age_ns (after measuring the gap again), or the clocks disagree."""
        found = arrival_ns(kernel_ns, user_ns, user_ns - self.offset_ns, max_age_ns) if self.usable else None
        if found is None and kernel_ns is not None and monotonic_ns() - self._measured_ns >= NS_PER_S:
            self.gap_ns, self._measured_ns = _wall_ahead_of_kernel_ns(), monotonic_ns()
            if self.usable:
                found = arrival_ns(kernel_ns, user_ns, user_ns - self.offset_ns, max_age_ns)
        return found


NOTHING_YET = (BlockingIOError, socket.timeout)  # a receive that timed out, either way


def _set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    """A blocking receive that gives up after seconds (EAGAIN), at no cost per call; where the
    platform refuses the option, Python's own timeout (socket.timeout), at a poll() per call."""
    if WINDOWS:  # a DWORD of milliseconds
        value = struct.pack("@I", max(1, int(seconds * 1000)))
    else:
        value = TIMEVAL.pack(int(seconds), int(seconds % 1 * 1e6))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    except (OSError, struct.error, AttributeError):
        sock.settimeout(seconds)


def load_key(path: Optional[str],
             environ: Mapping[str, str] = os.environ) -> Tuple[Optional[bytes], List[str]]:
    """The shared key from a key file, else $UDP_TIMECHECK_KEY (None: no key), and warnings.

    The key is the file's bytes, or the variable's UTF-8, without surrounding
    ASCII white space: the same key gives the same bytes both ways.  A variable
    that is set but empty is an error, not "no key".
    """
    warnings = []  # type: List[str]
    if path is not None:
        key, mode = read_input(path, MAX_KEY_FILE, "key file")
        if os.name == "posix" and mode & 0o077:  # as ssh warns about private keys
            warnings.append("warning: key file {} is accessible by group or others (mode {:03o}); "
                            "run: chmod 600 {}".format(path, mode & 0o777, path))
        source = "key file " + path
    elif KEY_ENV in environ:
        key, source = environ[KEY_ENV].encode("utf-8", "surrogateescape"), KEY_ENV
    else:
        return None, warnings
    key = key.strip()
    if not key:
        raise TimecheckError("{} is empty{}".format(source, "; unset it to run without a key"
                                                    if source == KEY_ENV else ""))
    return key, warnings


def read_input(path: str, limit: int, what: str, stdin: bool = False) -> Tuple[bytes, int]:
    """An input file's bytes, at most limit of them, and its mode: a regular file, opened without
    waiting (a FIFO would wait for a writer, and Ctrl-C with it), or with stdin, - for standard
    input.  A usage error names the file, what it was to be, and what is wrong."""
    if stdin and path == "-":
        data = sys.stdin.buffer.read(limit + 1)
        mode = stat.S_IFREG | 0o600
    else:
        try:
            descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            with open(descriptor, "rb") as handle:
                mode = os.fstat(descriptor).st_mode
                if not stat.S_ISREG(mode):
                    raise TimecheckError("{} {} is not a regular file{}".format(
                        what, path, " (- reads standard input)" if stdin else ""))
                data = handle.read(limit + 1)
        except OSError as exc:
            raise TimecheckError("cannot read {} {}: {}".format(what, path, exc.strerror or exc)) from None
    if len(data) > limit:
        raise TimecheckError("{} {} is larger than {} bytes: not a {}".format(what, path, limit, what))
    return data, mode


def split_target(text: str, lowest_port: int = 0) -> Tuple[str, Optional[int]]:
    """HOST, HOST:PORT, [IPV6] or [IPV6]:PORT, or a bare IPv6 address (which names no port):
    (host, port or None).  Anything else is a usage error."""
    host, port = _bracketed(text) if text.startswith("[") else text.split(":") if text.count(":") == 1 \
        else (text, None)
    if host.isdigit():  # getaddrinfo would take "8080" for the address 0.0.31.144, IDNA "８０８０" too
        raise TimecheckError("{!r} is not a host; give the host before the port, in ASCII digits, "
                             "as in: 127.0.0.1 {}".format(host, int(host) if host.isdecimal()  # not
                                                          and len(host) <= 5 else 1060))  # 5,000 digits
    if not host:
        raise TimecheckError("{!r} names no host".format(text))
    return host, None if port is None else port_number(port, text, lowest_port)


def _bracketed(text: str) -> Tuple[str, Optional[str]]:
    """[IPV6] or [IPV6]:PORT as (host, port text or None)."""
    host, closed, rest = text[1:].partition("]")
    if not closed or rest and (rest[0] != ":" or not rest[1:]):
        raise TimecheckError("{!r}: expected [IPV6] or [IPV6]:PORT".format(text))
    return host, rest[1:] or None


def port_number(digits: str, where: str, lowest: int = 0) -> int:
    """A port from lowest to 65535, or a usage error that says where it came from."""
    if not is_number(digits) or len(digits.lstrip("0")) > 5 or not lowest <= int(digits) <= 65535:
        raise TimecheckError("{!r}: expected a port number from {} to 65535".format(where, lowest))
    return int(digits)


def endpoint(host: Optional[str], port: Optional[str], default_port: int,
             lowest_port: int = 0) -> Tuple[str, int]:
    """[HOST] [PORT] as given, HOST perhaps HOST:PORT or [IPV6]:PORT: one (host, port)."""
    if host is None:
        return DEFAULT_HOST, default_port if port is None else port_number(port, port, lowest_port)
    name, named_port = split_target(host, lowest_port)
    if port is not None and named_port is not None:
        raise TimecheckError("{!r} names its port already; give the port once".format(host))
    return name, named_port if named_port is not None else (
        default_port if port is None else port_number(port, port, lowest_port))


DSCP_NAMES = dict([("BE", 0), ("DF", 0), ("LE", 1), ("EF", 46), ("VA", 44)]
                  + [("CS%d" % n, 8 * n) for n in range(8)]
                  + [("AF%d%d" % (x, y), 8 * x + 2 * y) for x in range(1, 5) for y in range(1, 4)])


def tos_value(text: str) -> int:
    """A TOS byte: a number from 0 to 255 (0x.. too), or a DSCP name (EF, AF41, CS6: RFC 4594's)."""
    name = text.strip().upper()
    if name in DSCP_NAMES:
        return DSCP_NAMES[name] << 2  # DSCP is the byte's upper six bits; ECN the lower two
    try:
        value = int(name, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError("{!r} is neither a TOS byte from 0 to 255 nor a DSCP name "
                                         "(EF, AF11 to AF43, CS0 to CS7, LE, BE)".format(text))
    return value


# ----------------------------------------------------------------------------------------------
# 4. Statistics: per-probe records, streaming summaries, the timing arithmetic, per-run aggregates
# ----------------------------------------------------------------------------------------------

def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The one percentile method: linear interpolation between closest ranks (numpy.percentile's
    default, Excel's PERCENTILE.INC)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    position = (len(sorted_values) - 1) * fraction
    lower = int(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


PERCENTILES = (("median", 0.5), ("p90", 0.9), ("p99", 0.99))  # the summary's, by name: add one here
@functools.lru_cache(maxsize=4)
def _buckets(error: float) -> Tuple[int, float]:
    """(below what magnitude a bucket holds one whole number, the log of a bucket's ratio) for
    buckets within error of their values: 10 us and log(1.0001) for SKETCH_RELATIVE_ERROR."""
    return round(1 / (2 * error)), math.log((1 + error) / (1 - error))


def sketch_key(value: float, error: float = SKETCH_RELATIVE_ERROR) -> int:
    """The bucket of a value once a Sketch is past its budget, as DDSketch's: one per whole number
    below 1 / (2 * error) in magnitude (10 us), within error above; keys sort as values do."""
    exact, log_gamma = _buckets(error)
    if -exact < value < exact:
        return round(value)
    steps = math.ceil(math.log(abs(value) / exact) / log_gamma)
    return exact + steps if value > 0 else -exact - 1 - steps


def sketch_value(key: int, error: float = SKETCH_RELATIVE_ERROR) -> float:
    """A bucket's representative: within error of every value in it."""
    exact, log_gamma = _buckets(error)
    if -exact < key < exact:
        return float(key)
    steps = key - exact if key > 0 else -exact - 1 - key
    magnitude = 2 * exact * math.exp(log_gamma * steps) / (1 + math.exp(log_gamma))
    return magnitude if key > 0 else -magnitude


class RunningStats:
    """Count, mean, ping's mdev (population deviation), minimum and maximum in O(1): Welford."""
    __slots__ = ("count", "mean", "_squares", "min", "max")

    def __init__(self) -> None:
        self.count, self.mean, self._squares = 0, 0.0, 0.0
        self.min = self.max = 0.0  # once count says there are values

    def add(self, value: float) -> None:
        count = self.count = self.count + 1
        delta = value - self.mean
        mean = self.mean = self.mean + delta / count
        self._squares += delta * (value - mean)
        if count == 1:
            self.min = self.max = value
        elif value < self.min:
            self.min = value
        elif value > self.max:
            self.max = value

    @property
    def mdev(self) -> Optional[float]:
        return math.sqrt(self._squares / self.count) if self.count else None

    def merge(self, other: "RunningStats") -> None:
        """other's values added to these (Chan's parallel form of Welford's)."""
        if not other.count:
            return
        count = self.count + other.count
        delta = other.mean - self.mean
        self._squares += other._squares + delta * delta * self.count * other.count / count
        self.mean += delta * other.count / count
        self.min, self.max = (other.min, other.max) if not self.count else (
            min(self.min, other.min), max(self.max, other.max))
        self.count = count


class Sketch:
    """The distribution of one quantity, in whole ns of either sign: its running figures (stats),
    its percentiles by percentile()'s method, and its histogram's rows.

    While there are at most limit values, each is kept exactly, 4 or 8 bytes, in sorted chunks;
    past that they are counted by sketch_key(), in one array over the keys in use, so that
    memory grows with the logarithm of the values' range and never with their count.  relative
    keeps the values against the first (one leg's delays carry the clocks' offset: hours, maybe);
    error is the buckets' (a plot's need not be as fine).
    """
    __slots__ = ("limit", "stats", "origin", "error", "_relative", "_chunks", "_pending", "_low", "_counts")

    def __init__(self, limit: Optional[int] = None, relative: bool = False,
                 error: float = SKETCH_RELATIVE_ERROR) -> None:
        self.limit, self.stats = EXACT_VALUES if limit is None else limit, RunningStats()
        self.origin, self._relative, self.error = 0, relative, error
        self._chunks = []  # type: List[array.array]  # each sorted
        self._pending = array.array("i")  # 4 bytes a value, until one does not fit
        self._low, self._counts = 0, None  # type: int, Optional[array.array]  # the buckets, past the limit

    @property
    def count(self) -> int:
        return self.stats.count

    def add(self, value: int) -> None:
        """value in whole nanoseconds (a float is rounded to one)."""
        stats = self.stats
        if self._relative and not stats.count:
            self.origin = value
        stats.add(value)
        value -= self.origin
        if stats.count > self.limit:  # past the budget: the exact values join the buckets at a query
            self._add_key(sketch_key(value, self.error))
            return
        pending = self._pending
        try:
            pending.append(value)
        except (TypeError, OverflowError):  # a float, or beyond 4 bytes: the slow way
            self._append(value)
            pending = self._pending
        if len(pending) >= EXACT_CHUNK:
            self._chunks.append(array.array(pending.typecode, sorted(pending)))
            self._pending = array.array(pending.typecode)

    def merge(self, other: "Sketch") -> None:
        """other's values added to these (a Timeline's neighbouring bins: the same error)."""
        if other._counts is None:
            for chunk in other._chunks + [other._pending]:
                for value in chunk:
                    self.add(value + other.origin)
            return
        other._fold()
        self.stats.merge(other.stats)
        for index, count in enumerate(other._counts):
            if count:
                self._add_key(other._low + index, count)

    def quantiles(self, fractions: Sequence[float]) -> List[Optional[float]]:
        """Each fraction's percentile (0.5: the median), by percentile()'s method; None for none."""
        count = self.stats.count
        if not count:
            return [None] * len(fractions)
        ranks = sorted({rank for fraction in fractions for position in [(count - 1) * fraction]
                        for rank in (int(position), min(int(position) + 1, count - 1))})
        values = dict(zip(ranks, self._order_statistics(ranks)))
        return [percentile([values[int(position)], values[min(int(position) + 1, count - 1)]],
                           position - int(position)) + self.origin
                for position in [(count - 1) * fraction for fraction in fractions]]

    def summary_ms(self, names: Sequence[str]) -> Dict[str, Optional[float]]:
        """min, avg, median, p90, p99, max and mdev (as asked for), in ms; null for no values."""
        stats = self.stats
        known = stats.count > 0
        figures = {"min": stats.min if known else None, "avg": stats.mean if known else None,
                   "max": stats.max if known else None, "mdev": stats.mdev}  # type: Dict[str, Optional[float]]
        asked = [(name, fraction) for name, fraction in PERCENTILES if name in names]
        figures.update(zip([name for name, _ in asked], self.quantiles([fraction for _, fraction in asked])))
        return {name: _ms(figures[name]) for name in names}

    def rows(self, most: int) -> List[Tuple[float, float, int]]:
        """(low, high, count) rows of equal logarithmic width (linear where a value is not above 0)
        from the least value to the greatest, most of them (one when all are equal)."""
        stats = self.stats
        if not stats.count:
            return []
        low, high = stats.min, stats.max
        if low == high:
            return [(low, high, stats.count)]
        if low > 0:
            edges = [low * (high / low) ** (row / most) for row in range(most)] + [high]
        else:
            edges = [low + (high - low) * row / most for row in range(most)] + [high]
        below = [self._at_most(edge) for edge in edges[1:]]
        return [(edges[row], edges[row + 1], below[row] - (below[row - 1] if row else 0))
                for row in range(most)]

    def _append(self, value: int) -> None:
        try:
            self._pending.append(value)
        except TypeError:
            self._append(round(value))
        except OverflowError:  # beyond 2.1 s: 8 bytes a value from here on
            self._pending = array.array("q", self._pending)
            self._pending.append(value)

    def _add_key(self, key: int, count: int = 1) -> None:
        counts = self._counts
        if counts is None:
            counts, self._low = self._counts, self._low = array.array("q", [0]), key
        index = key - self._low
        if not 0 <= index < len(counts):
            index = self._make_room(index)
            counts = self._counts
        counts[index] += count  # type: ignore[index]

    def _make_room(self, index: int) -> int:
        """Grow the buckets to hold index, by half again at least; returns index from the new low."""
        counts = self._counts  # type: array.array  # type: ignore[assignment]
        more = max(len(counts) // 2, index - len(counts) + 1 if index >= 0 else -index)
        if index >= 0:
            counts.extend(array.array("q", bytes(8 * more)))
            return index
        self._counts = array.array("q", bytes(8 * more)) + counts
        self._low -= more
        return index + more

    def _fold(self) -> None:
        """The exact values into the buckets, once and for all: at a query, not in the probe loop."""
        for chunk in self._chunks + [self._pending]:
            for value in chunk:
                self._add_key(sketch_key(value, self.error))
        self._chunks, self._pending = [], array.array("i")

    def _sorted_chunks(self) -> List[Sequence[int]]:
        return [chunk for chunk in self._chunks + [sorted(self._pending)] if len(chunk)]

    def _order_statistics(self, ranks: Sequence[int]) -> List[float]:
        """The values at each 0-based rank, ranks ascending."""
        if self._counts is not None:
            self._fold()
            found, seen, wanted = [], 0, iter(ranks)
            rank = next(wanted, None)
            for index, count in enumerate(self._counts):
                seen += count
                while rank is not None and rank < seen:
                    found.append(sketch_value(self._low + index, self.error))
                    rank = next(wanted, None)
            return found
        chunks = self._sorted_chunks()
        if len(chunks) == 1:
            return [float(chunks[0][rank]) for rank in ranks]
        return [float(_kth_smallest(chunks, rank)) for rank in ranks]

    def _at_most(self, edge: float) -> int:
        """How many values are at most edge (to the bucket, past the budget)."""
        edge -= self.origin
        if self._counts is None:
            return sum(bisect.bisect_right(chunk, edge) for chunk in self._sorted_chunks())
        self._fold()
        last = sketch_key(edge, self.error) - self._low
        return sum(self._counts[:max(0, last + 1)])


def _kth_smallest(chunks: Sequence[Sequence[int]], rank: int) -> int:
    """The value at 0-based rank among sorted sequences of whole numbers: a binary search
    on the value, counting with bisect, so that nothing is merged or copied."""
    low, high = min(chunk[0] for chunk in chunks), max(chunk[-1] for chunk in chunks)
    while low < high:
        middle = (low + high) // 2
        if sum(bisect.bisect_right(chunk, middle) for chunk in chunks) > rank:
            high = middle
        else:
            low = middle + 1
    return low


class Runs:
    """Runs of consecutive answered and lost probes, as the probes end: their lengths (a rate
    limit loses probes as regularly as it answers them, a lossy path does not) and the lost
    runs' spans in time, from the first lost probe's send to the next answered one's: the
    outages, as fping -o counts them.  O(1) memory."""
    __slots__ = ("answered", "lost", "outages", "longest_outage_ns", "outage_ns", "last_send_ns", "_lost_now",
                 "_length", "_since_ns", "_runs")

    def __init__(self) -> None:
        self.answered, self.lost = RunningStats(), RunningStats()  # run lengths, in probes, but the first
        self.outages = self.longest_outage_ns = self.outage_ns = self.last_send_ns = 0
        self._lost_now, self._length, self._since_ns, self._runs = False, 0, 0, 0

    def add(self, lost: bool, send_mono_ns: int) -> Optional[Tuple[int, int]]:
        """One more probe, in the order they were sent; when it ends an outage, the outage's
        (probes, ns), else None."""
        self.last_send_ns = send_mono_ns
        if lost == self._lost_now:
            self._length += 1
            return None
        ended = self._end_run(send_mono_ns)
        self._lost_now, self._length, self._since_ns = lost, 1, send_mono_ns
        return ended

    def close(self, end_ns: int) -> Optional[Tuple[int, int]]:
        """The run's end at end_ns: an outage still going counts, up to then."""
        ended = self._end_run(max(end_ns, self.last_send_ns)) if self._lost_now else None
        self._length = 0
        return ended

    def _end_run(self, next_send_ns: int) -> Optional[Tuple[int, int]]:
        if not self._length:
            return None
        self._runs += 1
        if self._runs > 2:  # the first run of each kind is the start's (a rate limit's burst), not its pace
            (self.lost if self._lost_now else self.answered).add(self._length)
        if not self._lost_now:
            return None
        span = next_send_ns - self._since_ns
        self.outages += 1
        self.outage_ns += span
        self.longest_outage_ns = max(self.longest_outage_ns, span)
        return self._length, span

    def regular(self) -> bool:
        """Whether both kinds of run come at nearly one length each, as a token bucket makes them."""
        return all(runs.count >= RATE_LIMIT_RUNS and (runs.mdev or 0.0) <= RATE_LIMIT_SPREAD * runs.mean
                   for runs in (self.answered, self.lost))

    def outage_figures(self) -> Dict[str, Any]:
        return {"count": self.outages, "longest_s": round(self.longest_outage_ns / NS_PER_S, 6),
                "total_s": round(self.outage_ns / NS_PER_S, 6)}


class Outage(NamedTuple):
    """A run of consecutive lost probes: from the first's send to the next answered one's (or,
    at the run's end, to when it would have gone)."""
    first_seq: int
    probes: int
    span_ns: int
    at_end: bool = False


class LossDirections:
    """Lost probes split by the leg that lost them, from the server's count of the session's
    requests, as irtt's server counts them: between two answered probes, the count grew by one
    more than the requests of lost probes that arrived, whose replies were lost; the others'
    requests were.  Probes come in the order they were sent.  The lost after the last answer,
    or across a count that went back (a server that forgot the session), stay unknown."""
    __slots__ = ("up", "down", "unknown", "counted", "proven", "_gap", "_previous")

    def __init__(self) -> None:
        self.up = self.down = self.unknown = 0
        self.counted = False  # whether any reply carried the server's count
        self.proven = True  # whether the counts are the server's own (a stateless STAMP reflector's are not)
        self._gap, self._previous = 0, 0  # lost since the last answer; the count it carried

    def add(self, lost: bool, server_count: Optional[int] = None) -> None:
        """The next probe: lost, or answered with the server's count if its reply had one."""
        if lost:
            self._gap += 1
            return
        arrived = -1 if server_count is None else server_count - self._previous - 1
        if arrived < 0:
            self.unknown += self._gap
        else:
            self.down += min(arrived, self._gap)
            self.up += self._gap - min(arrived, self._gap)
        self._gap = 0
        if server_count is not None:
            self.counted, self._previous = True, server_count

    def figures(self) -> Dict[str, Optional[int]]:
        """lost_up, lost_down and lost_direction_unknown, which sum to the lost; None without a count."""
        if not (self.counted and self.proven):
            return {"lost_up": None, "lost_down": None, "lost_direction_unknown": None}
        return {"lost_up": self.up, "lost_down": self.down,
                "lost_direction_unknown": self.unknown + self._gap}


class PathMarks:
    """What the path did to the probes' marks: the TOS the server received and the one its
    reply (marked the same) came back with, against the one sent; the TTL the server received,
    the hops it shows, and each change of it on a source port (a path change)."""

    def __init__(self, tos_sent: Optional[int], ttl_sent: Optional[int]) -> None:
        self.tos_sent, self.ttl_sent = tos_sent, ttl_sent
        self.tos_at_server = self.tos_back = self.ttl_at_server = None  # type: Optional[int]
        # replies whose TOS at the server is known, those whose TOS back is too, and how many differed
        self.tos_checked = self.tos_checked_back = self.tos_changed_out = self.tos_changed_back = 0
        self.changes = []  # type: List[Tuple[int, int, int, int]]  # (wall ns, seq, from, to), the first kept
        self.change_count = 0
        self._ttl_by_port = {}  # type: Dict[int, int]

    def add(self, seq: int, sent_ns: int, port: int, server: Tuple[Optional[int], Optional[int]],
            back: Tuple[Optional[int], Optional[int]]) -> None:
        """An answered probe's marks: (TOS, TTL) at the server, and as its reply arrived."""
        (server_tos, server_ttl), back_tos = server, back[0]
        if server_tos is not None:  # what arrived, as the server says: whether or not this end can read
            self.tos_checked += 1  # what came back (Windows cannot)
            self.tos_changed_out += self.tos_sent is not None and server_tos != self.tos_sent
            self.tos_at_server = server_tos
            if back_tos is not None:
                self.tos_checked_back += 1
                self.tos_changed_back += back_tos != server_tos
                self.tos_back = back_tos
        if server_ttl is None:
            return
        before = self._ttl_by_port.get(port)
        if before is not None and before != server_ttl:
            self.change_count += 1
            if len(self.changes) < TTL_CHANGES_KEPT:
                self.changes.append((sent_ns, seq, before, server_ttl))
        self._ttl_by_port[port] = self.ttl_at_server = server_ttl

    @property
    def hops(self) -> Optional[int]:
        """The TTL sent less the TTL the server received: routers on the way out."""
        sent, received = self.ttl_sent, self.ttl_at_server
        return None if sent is None or received is None else sent - received

    def figures(self) -> Dict[str, Any]:
        hops = self.hops
        changes = [{"at": iso_utc(at_ns), "seq": seq, "from": before, "to": after}
                   for at_ns, seq, before, after in self.changes]
        return {"tos": {"sent": self.tos_sent, "received_by_server": self.tos_at_server,
                        "received_back": self.tos_back, "checked": self.tos_checked,
                        "checked_back": self.tos_checked_back,
                        "changed_out": self.tos_changed_out, "changed_back": self.tos_changed_back},
                "ttl": {"sent": self.ttl_sent, "received_by_server": self.ttl_at_server, "hops": hops,
                        "changes": changes, "change_count": self.change_count}}


class PortFigures:
    """One source port's probes (ECMP: each port can take its own path): sent, answered, lost,
    and the RTTs, exactly."""
    __slots__ = ("port", "sent", "received", "lost", "rtt")

    def __init__(self, port: int) -> None:
        self.port, self.sent, self.received, self.lost = port, 0, 0, 0
        self.rtt = Sketch(EXACT_VALUES // EXACT_SHARE)

    def add(self, status: str, rtt_ns: Optional[int]) -> None:
        self.sent += 1
        self.lost += status == LOST
        if status == OK and rtt_ns is not None:
            self.received += 1
            self.rtt.add(rtt_ns)

    def as_dict(self) -> Dict[str, Any]:
        return {"port": self.port, "sent": self.sent, "received": self.received, "lost": self.lost,
                "rtt_ms": self.rtt.summary_ms(("median", "p99"))}



class OffsetPoint(NamedTuple):
    """One trusted offset sample, for the drift fit: when, what, and how good."""
    at_s: float        # seconds since the run started (monotonic)
    wall_ns: int       # this machine's wall clock then
    offset_ns: float
    rtt_ns: int        # the error bound is half of it


class DriftFit(NamedTuple):
    drift_ppm: float       # the server's clock rate against this machine's, in parts per million
    drift_err_ppm: float   # the fit's standard error, plus what the offsets' own bounds leave open
    offset_end_ns: float   # the fitted offset at the end of the run
    offset_end_err_ns: float  # its error bound
    steps: List[Tuple[int, float]]  # (wall-clock ns, size in ns) of each clock step found
    segments: List[Tuple[float, float, float]]  # (first s, last s, offset at 0 s) between steps


def chrony_weights(points: Sequence[OffsetPoint]) -> List[float]:
    """Weights by delay, as chrony's regress.c: 1 / (1 + (d - d_min) / s)**2, s the delays' spread."""
    delays = sorted(point.rtt_ns for point in points)
    spread = percentile(delays, 0.75) - percentile(delays, 0.25) or 1.0
    return [1.0 / (1.0 + (point.rtt_ns - delays[0]) / spread) ** 2 for point in points]


def fit_line(points: Sequence[OffsetPoint], weights: Sequence[float], segments: Sequence[int] = (),
             at_s: float = 0.0) -> Tuple[float, float, List[float], float]:
    """Weighted least squares of offset on time: one slope, an intercept per segment.

    segments are the indices where a new segment (after a clock step) starts.
    Returns (slope in ns per s, its standard error, each segment's intercept, the bound of
    the offset the line gives at at_s in the last segment).  That offset is linear in the
    points' offsets, sum(h * offset); each offset is within half its RTT of the truth, so it
    is within sum(|h| * RTT / 2) of the truth, whatever the signs of the points' errors.
    """
    bounds = [0] + list(segments) + [len(points)]
    slope_num = slope_den = 0.0
    means = []
    for first, last in zip(bounds, bounds[1:]):
        part, part_weights = points[first:last], weights[first:last]
        total = sum(part_weights)
        mean_t = sum(w * p.at_s for p, w in zip(part, part_weights)) / total
        mean_y = sum(w * p.offset_ns for p, w in zip(part, part_weights)) / total
        slope_num += sum(w * (p.at_s - mean_t) * (p.offset_ns - mean_y) for p, w in zip(part, part_weights))
        slope_den += sum(w * (p.at_s - mean_t) ** 2 for p, w in zip(part, part_weights))
        means.append((mean_t, mean_y, total))
    slope = slope_num / slope_den if slope_den else 0.0
    intercepts = [mean_y - slope * mean_t for mean_t, mean_y, _ in means]
    segment_of = [index for index, (first, last) in enumerate(zip(bounds, bounds[1:]))
                  for _ in range(first, last)]
    residual = sum(w * (p.offset_ns - intercepts[s] - slope * p.at_s) ** 2
                   for p, w, s in zip(points, weights, segment_of))
    freedom = len(points) - len(means) - 1
    error = math.sqrt(residual / freedom / slope_den) if freedom > 0 and slope_den else float("inf")
    last_t, _, last_total = means[-1]
    tilt = (at_s - last_t) / slope_den if slope_den else 0.0  # how far at_s leans on the slope
    bound = sum(abs(w * ((s == len(means) - 1) / last_total + tilt * (p.at_s - means[s][0]))) * p.rtt_ns / 2
                for p, w, s in zip(points, weights, segment_of))
    return slope, error, intercepts, bound


def find_steps(points: Sequence[OffsetPoint], limit: int = 3) -> List[int]:
    """Where the offset jumps while the RTT does not: the indices that start a new segment.

    Each candidate split is fitted with one slope and an offset on either side
    (and on every segment found before).  It is a step when the two offsets
    differ by more than the error bounds there, by more than STEP_FACTOR times
    the fit's scatter, and by more than twice any jump in the RTT (that would be
    a new path, not a new time); of those, the split that fits best wins.  At
    most limit steps.
    """
    steps = []  # type: List[int]
    for _ in range(limit):
        best = _best_split(points, steps)
        if best is None:
            break
        steps = sorted(steps + [best])
    return steps


class _Segment(NamedTuple):
    """Least-squares sums over a run of points: their count and sums, and the sums of squares
    and products about their means (Stt, Sty, Syy)."""
    n: int
    t: float
    y: float
    stt: float
    sty: float
    syy: float
    rtt: float


class _PrefixSums:
    """Running sums over the points, so that any run of them is summed in O(1)."""

    def __init__(self, points: Sequence[OffsetPoint]) -> None:
        self.t, self.y, self.tt, self.ty, self.yy, self.rtt = ([0.0] for _ in range(6))
        for point in points:
            t, y = point.at_s, point.offset_ns
            for sums, value in ((self.t, t), (self.y, y), (self.tt, t * t), (self.ty, t * y),
                                (self.yy, y * y), (self.rtt, point.rtt_ns)):
                sums.append(sums[-1] + value)

    def segment(self, first: int, last: int) -> _Segment:
        n = last - first
        t, y = self.t[last] - self.t[first], self.y[last] - self.y[first]
        return _Segment(n, t, y, self.tt[last] - self.tt[first] - t * t / n,
                        self.ty[last] - self.ty[first] - t * y / n,
                        self.yy[last] - self.yy[first] - y * y / n, self.rtt[last] - self.rtt[first])


def _best_split(points: Sequence[OffsetPoint], steps: Sequence[int]) -> Optional[int]:
    """The split that fits best among those that pass find_steps' tests, or None."""
    sums = _PrefixSums(points)
    bounds = [0] + list(steps) + [len(points)]
    segments = [sums.segment(first, last) for first, last in zip(bounds, bounds[1:])]
    best, best_residual = None, float("inf")
    for index, (first, last) in enumerate(zip(bounds, bounds[1:])):
        others = [segment for number, segment in enumerate(segments) if number != index]
        other_tt, other_ty = sum(part.stt for part in others), sum(part.sty for part in others)
        other_yy = sum(part.syy for part in others)
        freedom = max(1, len(points) - len(others) - 3)
        for split in range(first + STEP_MIN_POINTS, last - STEP_MIN_POINTS + 1):
            before, after = sums.segment(first, split), sums.segment(split, last)
            stt, sty = other_tt + before.stt + after.stt, other_ty + before.sty + after.sty
            slope = sty / stt if stt else 0.0
            residual = other_yy + before.syy + after.syy - slope * sty
            jump = (after.y - slope * after.t) / after.n - (before.y - slope * before.t) / before.n
            scatter = math.sqrt(max(0.0, residual) / freedom)
            rtt_jump = after.rtt / after.n - before.rtt / before.n
            bound = max(points[split - 1].rtt_ns, points[split].rtt_ns) / 2
            passes = abs(jump) > max(2 * bound, STEP_FACTOR * scatter, 2 * abs(rtt_jump))
            if passes and residual < best_residual:
                best, best_residual = split, residual
    return best


def fit_drift(points: Sequence[OffsetPoint], end_s: float) -> Optional[DriftFit]:
    """The clocks' relative rate and the offset at end_s, after any clock steps; None below
    DRIFT_MIN_POINTS points or without a spread in time.

    The rate's error is the fit's standard error plus (err_start + err_end) / duration:
    each offset is known only within its bound (half its RTT), and a path that is
    a little less symmetric at the end than at the start looks just like a drift.  The
    offset's bound is fit_line's: the points' own bounds, as the fit weighs them.
    """
    if len(points) < DRIFT_MIN_POINTS or points[-1].at_s - points[0].at_s <= 0:
        return None
    steps = find_steps(points)
    slope, error, intercepts, end_offset_err = fit_line(points, chrony_weights(points), steps, end_s)
    start_err, end_err = _end_bounds_ns(points)
    error += (start_err + end_err) / (points[-1].at_s - points[0].at_s)
    bounds = [0] + steps + [len(points)]
    sizes = [(points[start].wall_ns, intercepts[index + 1] - intercepts[index])
             for index, start in enumerate(steps)]
    segments = [(points[first].at_s, points[last - 1].at_s, intercept)
                for first, last, intercept in zip(bounds, bounds[1:], intercepts)]
    return DriftFit(slope / 1e3, error / 1e3, intercepts[-1] + slope * end_s, end_offset_err, sizes, segments)


def _end_bounds_ns(points: Sequence[OffsetPoint]) -> Tuple[float, float]:
    """The offsets' error bounds at the start and at the end: the median half-RTT of the
    first and of the last quarter of the points."""
    quarter = max(1, len(points) // 4)
    first, last = (percentile(sorted(point.rtt_ns for point in part), 0.5) / 2
                   for part in (points[:quarter], points[-quarter:]))
    return first, last


def clocks_consistent(offset_ms: Optional[float], error_ms: Optional[float], local: ClockState,
                      server: Optional[ClockState]) -> Optional[bool]:
    """Whether a measured offset fits what the two kernels claim of their clocks:
    |offset| <= its error bound + both kernels' maximum errors; None when a figure is missing."""
    if offset_ms is None or error_ms is None or server is None or local.maxerror_ns is None \
            or server.maxerror_ns is None:
        return None
    return abs(offset_ms) <= error_ms + (local.maxerror_ns + server.maxerror_ns) / 1e6


def compare_clocks(server_ms: float, server_err_ms: float, reference_ms: float,
                   reference_err_ms: float) -> Dict[str, float]:
    """This machine's and the server's clocks, each minus the reference's, with error bounds.

    server_ms is the server's clock minus this machine's (our probes);
    reference_ms the reference's minus this machine's (SNTP).  The server's
    bound against the reference is the two bounds added.
    """
    return {"local_offset_ms": round(-reference_ms, 6), "local_offset_err_ms": round(reference_err_ms, 6),
            "server_offset_ms": round(server_ms - reference_ms, 6),
            "server_offset_err_ms": round(server_err_ms + reference_err_ms, 6)}


class Timing(NamedTuple):
    """What one answered probe measured; see probe_timing()."""
    rtt_ns: int                 # the round trip, without the server's processing time
    proc_ns: Optional[int]      # the server's T3 - T2, when plausible
    offset_ns: Optional[float]  # NTP's offset, positive when the server's clock is ahead; None untrusted
    trusted: bool               # every timestamp is consistent: the offset can be used
    kernel: bool                # rtt_ns came from kernel timestamps, not from wake-ups
    untrusted_because: Optional[str] = None  # why the offset cannot be used: a reason just below


# Why a probe's timestamps give no offset
NO_SERVER_STAMPS = "no server timestamps"
ZERO_STAMP = "a server timestamp of zero"
REVERSED_STAMPS = "T3 before T2"
HELD_TOO_LONG = "T3 - T2 longer than the round trip"
WALL_STEP = "this machine's clock stepped during the probe"
PREEMPTED = "a clock reading around the probe came late (this process was preempted)"
KERNEL_STAMP = "a kernel timestamp outside the round trip"


def _server_stamps_problem(t2: Optional[int], t3: Optional[int], raw_ns: int) -> Optional[str]:
    """Why T2 and T3 contradict themselves or the round trip, or None."""
    if t2 is None or t3 is None:
        return NO_SERVER_STAMPS
    if t2 <= 0 or t3 <= 0:
        return ZERO_STAMP
    if t3 < t2:
        return REVERSED_STAMPS
    if t3 - t2 > raw_ns:
        return HELD_TOO_LONG
    return None


def probe_timing(t1: int, t2: Optional[int], t3: Optional[int], t4: int, *, raw_ns: int, span_ns: int,
                 kernel: bool, delayed: bool = False) -> Timing:
    """RTT, server processing time and clock offset of one probe, NTP's way.

    raw_ns is the monotonic time from before the send to after the receive, and
    span_ns the wall clock over the same interval, read next to it: when the two
    disagree, the wall clock stepped, and neither (T4 - T1) nor the offset can be
    trusted; unless delayed: a reading was late (the process preempted), and the
    clock did not step, so kernel stamps stand, and user-space ones cannot be
    trusted.  With kernel stamps (t4 from the kernel), the RTT is
    (T4 - T1) - (T3 - T2) when that is positive and no longer than raw_ns; else,
    and with user-space stamps, it is raw_ns - (T3 - T2), wake-ups included.
    Server timestamps that are missing, zero, reversed or longer apart than
    the round trip give no offset and are not subtracted: untrusted_because says why.
    """
    problem = _server_stamps_problem(t2, t3, raw_ns)
    proc = t3 - t2 if problem is None and t2 is not None and t3 is not None else None
    steady = abs(span_ns - raw_ns) <= WALL_STEP_TOLERANCE_NS + raw_ns // 1000 or (delayed and kernel)
    rtt = raw_ns - (proc or 0)
    if not steady:
        problem = problem or (PREEMPTED if delayed else WALL_STEP)
    elif proc is not None and proc > t4 - t1:
        problem, proc, rtt = HELD_TOO_LONG, None, raw_ns
    if kernel:
        kernel_rtt = t4 - t1 - (proc or 0)
        kernel = steady and 0 < kernel_rtt <= raw_ns
        if kernel:
            rtt = kernel_rtt
        else:
            problem = problem or KERNEL_STAMP
    offset = ((t2 - t1) + (t3 - t4)) / 2 if problem is None and t2 is not None and t3 is not None else None
    return Timing(rtt, proc, offset, problem is None, kernel, problem)


class RecentTable:
    """A dict of at most max_entries keys; the least recently stored goes first.

    The server's tables of source addresses, so that memory stays flat under
    traffic from any number of sources.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries = collections.OrderedDict()  # type: collections.OrderedDict[Any, Any]  # O(1) off the front

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: object) -> Any:
        """The value stored under key, removed (store it again to keep it)."""
        return self._entries.pop(key, None)

    def get(self, key: object) -> Any:
        """The value stored under key, left where it is."""
        return self._entries.get(key)

    def items(self) -> List[Tuple[Any, Any]]:
        """Every (key, value), least recently stored first."""
        return list(self._entries.items())

    def store(self, key: object, value: object) -> None:
        entries = self._entries
        if len(entries) >= self.max_entries and key not in entries:
            entries.popitem(last=False)
        entries[key] = value


class Sample:
    """One probe: its request, its timestamps and, once answered, what it measured.

    t1 and t4 are this machine's wall clock at send and receive, t2 and t3 the
    server's at receive and send (NTP's names).  send_mono_ns and recv_mono_ns
    are the monotonic clock around the same send and receive.
    """
    __slots__ = ("seq", "request_id", "request_mac", "request", "status", "reason", "send_mono_ns",
                 "recv_mono_ns", "t1", "t1_user", "t1_kernel", "t2", "t3", "t3_kernel", "t4", "t4_kernel",
                 "t4_user", "server_stamp", "request_size", "reply_id", "reply_text", "reply_size", "timing",
                 "server_clock_state", "ntp", "target", "port", "interleaved", "server_count", "server_marks",
                 "marks_back", "lied", "asks", "t3_rejected", "delayed")

    def __init__(self, seq: int, request_id: int, request_mac: bytes = b"", target: str = "") -> None:
        self.seq, self.request_id, self.request_mac, self.target = seq, request_id, request_mac, target
        self.request = b""  # the datagram sent, kept while it waits: an echo is byte for byte it
        self.status = PENDING
        self.reason = None  # type: Optional[str]  # why a lost probe was lost: see LOST_REASONS
        self.send_mono_ns = self.t1 = self.t1_user = self.port = 0  # port: which source port (its index)
        self.recv_mono_ns = self.t2 = self.t3 = self.t4 = self.t4_user = None  # type: Optional[int]
        self.t1_kernel = self.t3_kernel = self.t4_kernel = self.t3_rejected = self.lied = self.delayed = False
        self.interleaved = False  # the server stamps its reply leaving, and sends the stamp next time
        self.asks = None  # type: Optional[int]  # the earlier probe whose kernel T3 this one's request asked for
        self.server_count = None  # type: Optional[int]  # the session's requests the server has had
        self.server_marks = self.marks_back = (None, None)  # type: Tuple[Optional[int], Optional[int]]
        self.server_stamp = self.reply_id = self.reply_text = None  # type: Optional[object]
        self.request_size = self.reply_size = 0
        self.timing = None  # type: Optional[Timing]
        self.server_clock_state = None  # type: Optional[ClockState]  # when it asked, and the server said
        self.ntp = None  # type: Optional[NtpReply]  # an NTP server's reply (SntpProber)

    @property
    def raw_rtt_ns(self) -> Optional[int]:
        return None if self.recv_mono_ns is None else self.recv_mono_ns - self.send_mono_ns

    @property
    def rtt_ns(self) -> Optional[int]:
        return self.timing and self.timing.rtt_ns

    @property
    def server_proc_ns(self) -> Optional[int]:
        return self.timing and self.timing.proc_ns

    @property
    def offset_ns(self) -> Optional[float]:
        return self.timing and self.timing.offset_ns

    @property
    def offset_err_ns(self) -> Optional[float]:
        """Half the RTT; for an NTP server, plus its root distance (RFC 5905): its own error."""
        timing = self.timing
        if timing is None or timing.offset_ns is None:
            return None
        return timing.rtt_ns / 2 + (root_distance_ns(self.ntp) if self.ntp is not None else 0)

    def settle(self, *, kernel_mode: bool) -> None:
        """Work out what the probe measured, once its reply is recorded (again, with a better T3);
        a probe whose readings were delayed keeps its kernel stamps only if it has both."""
        t4, received_ns, t4_user = self.t4, self.recv_mono_ns, self.t4_user
        if t4 is None or received_ns is None or t4_user is None:
            return  # no reply recorded: nothing measured
        kernel = kernel_mode and self.t4_kernel and (self.t1_kernel or not self.delayed)
        self.timing = probe_timing(self.t1, self.t2, self.t3, t4, raw_ns=received_ns - self.send_mono_ns,
                                   span_ns=t4_user - self.t1_user, kernel=kernel, delayed=self.delayed)


class Arrival(NamedTuple):
    """A reply's arrival: the kernel's stamp (None: none came), the wall clock read just after
    (the clock the run uses, and the real one: they differ when a test shifts it), the monotonic
    clock, and the TOS and TTL it came with (None: not asked for)."""
    kernel_t4: Optional[int]
    user_t4: int
    real_t4: int
    recv_mono_ns: int
    tos: Optional[int] = None
    ttl: Optional[int] = None


class Bin:
    """One interval of a Timeline: its probes, their RTTs, and its best offset sample."""
    __slots__ = ("sent", "lost", "rtt", "best")

    def __init__(self) -> None:
        self.sent = self.lost = 0
        self.rtt = Sketch(0, error=BIN_RELATIVE_ERROR)
        self.best = None  # type: Optional[OffsetPoint]  # the trusted sample with the lowest RTT

    def merge(self, other: "Bin") -> None:
        self.sent += other.sent
        self.lost += other.lost
        self.rtt.merge(other.rtt)
        if other.best is not None and (self.best is None or other.best.rtt_ns < self.best.rtt_ns):
            self.best = other.best


EMPTY_BIN = Bin()  # every bin nothing fell into: shared, and never written to


class Timeline:
    """A run of any length as at most max_bins intervals: when they run out, neighbours merge
    and every bin spans twice as long.  Feeds the drift fit (the best offset of each bin, as
    NTP's clock filter keeps the lowest-delay sample) and the plot."""

    def __init__(self, max_bins: int = TIMELINE_BINS, width_ns: int = TIMELINE_FIRST_WIDTH_NS) -> None:
        self.max_bins, self.width_ns = max_bins, width_ns
        self.bins = []  # type: List[Bin]  # bins[i] spans [i * width_ns, (i + 1) * width_ns) of the run

    def bin_at(self, elapsed_ns: int) -> Bin:
        """The bin of that moment, made when first needed: the empty ones between cost nothing."""
        while elapsed_ns // self.width_ns >= self.max_bins:
            self.bins = [self._merged(self.bins[index:index + 2]) for index in range(0, len(self.bins), 2)]
            self.width_ns *= 2
        index = max(0, elapsed_ns) // self.width_ns
        if len(self.bins) <= index:
            self.bins.extend([EMPTY_BIN] * (index + 1 - len(self.bins)))
        item = self.bins[index]
        if item is EMPTY_BIN:
            item = self.bins[index] = Bin()
        return item

    @staticmethod
    def _merged(pair: Sequence[Bin]) -> Bin:
        used = [item for item in pair if item is not EMPTY_BIN]
        for other in used[1:]:
            used[0].merge(other)
        return used[0] if used else EMPTY_BIN

    def points(self) -> List[OffsetPoint]:
        return [item.best for item in self.bins if item.best is not None]


RTT_FIGURES = ("min", "avg", "median", "p90", "p99", "max", "mdev")
IPDV_FIGURES = ("median", "p99", "max")


class Legs(NamedTuple):
    """An answered probe's RTT and, when every timestamp is consistent, its legs: what the IPDVs
    of probes numbered one after the other compare."""
    rtt_ns: int
    out_ns: Optional[int]   # T2 - T1
    back_ns: Optional[int]  # T4 - T3


def legs_of(sample: Sample, timing: Timing) -> Legs:
    t2, t3, t4 = sample.t2, sample.t3, sample.t4
    if not timing.trusted or t2 is None or t3 is None or t4 is None:
        return Legs(timing.rtt_ns, None, None)
    return Legs(timing.rtt_ns, t2 - sample.t1, t4 - t3)


class Ended(NamedTuple):
    """A probe that has ended, remembered for the replies that come after it (late, duplicate,
    or a lie that names it by its seq), and to check their MACs."""
    seq: int
    status: str
    request_mac: bytes
    request_id: int


class Totals:
    """What a run, or one period of it (--report-every), found, in O(1) memory."""
    COUNTS = ("sent", "received", "lost", "in_flight", "not_up", "mismatched", "duplicates", "late",
              "reordered", "forged", "unsigned", "malformed", "echoes", "refused", "errors", "user_fallbacks",
              "transmit_fallbacks", "untrusted")

    def __init__(self, started_wall_ns: int, started_mono_ns: int) -> None:
        self.started_wall_ns, self.started_mono_ns = started_wall_ns, started_mono_ns
        self.sent = self.received = self.lost = self.in_flight = self.not_up = self.mismatched = 0  # COUNTS
        self.duplicates = self.late = self.reordered = self.forged = self.unsigned = self.malformed = 0
        self.echoes = self.refused = self.errors = self.user_fallbacks = self.transmit_fallbacks = 0
        self.untrusted = 0
        share = EXACT_VALUES // EXACT_SHARE  # the RTT has the most of the budget
        self.rtt, self.proc, self.jitter = Sketch(), Sketch(share), RunningStats()
        self.rtt_buckets = [0] * (len(RTT_BUCKETS_NS) + 1)  # Prometheus' buckets, counted exactly
        self.send_ipdv, self.receive_ipdv = Sketch(share), Sketch(share)
        self.send_delays, self.receive_delays = Sketch(share, relative=True), Sketch(share, relative=True)
        self.best = None  # type: Optional[Sample]  # NTP's clock filter: the trusted sample of least error
        self.untrusted_because = collections.Counter()  # type: collections.Counter
        self.server_stamps = set()  # type: set
        self.server_transmit_kernel = self.server_transmit_fallbacks = 0  # interleaved T3: kernel's, or not
        self.server_transmit_rejected = 0  # the kernel's, refused: they disagree with the server's clock
        self.timeline = Timeline()
        self.runs = Runs()
        self._estimate = None  # type: Optional[tuple]  # (when, offset, error, drift): clock_estimate()'s

    def tally(self, sample: Sample, neighbours: Sequence[Legs], *, kernel_mode: bool,
              transmit_stamps: bool) -> None:
        """A probe that ended, whatever its end; with neighbours, the answered probes numbered
        next to an answered one.  kernel_mode and transmit_stamps: what the run asked of the
        kernel, so that each fallback is counted."""
        self.sent += 1
        elapsed_ns = sample.send_mono_ns - self.started_mono_ns
        point_bin = self.timeline.bin_at(elapsed_ns)
        point_bin.sent += 1
        if sample.status == LOST:
            self.lost += 1
            point_bin.lost += 1
            return
        self.in_flight += sample.status == IN_FLIGHT
        self.not_up += sample.status == NOT_UP
        timing = sample.timing
        if sample.status != OK or timing is None:
            return
        self.received += 1
        self.user_fallbacks += kernel_mode and not timing.kernel
        self.transmit_fallbacks += transmit_stamps and not sample.t1_kernel
        self.server_transmit_kernel += sample.t3_kernel
        self.server_transmit_fallbacks += sample.interleaved and not sample.t3_kernel
        self.server_transmit_rejected += sample.t3_rejected
        self.untrusted += not timing.trusted
        self.add_answer(sample, timing, neighbours)
        point_bin.rtt.add(timing.rtt_ns)
        if timing.offset_ns is not None and timing.trusted:
            point = OffsetPoint(elapsed_ns / NS_PER_S, sample.t1, timing.offset_ns, timing.rtt_ns)
            if point_bin.best is None or point.rtt_ns < point_bin.best.rtt_ns:
                point_bin.best = point

    def clock_estimate(self, now_mono_ns: int) -> Tuple[Optional[float], Optional[float], Optional[float]]:
        """(offset now, its error bound, drift in ppm): the drift fit's current estimate, else
        the best sample's offset.  Worked out at most once a second (for --metrics)."""
        if self._estimate is None or now_mono_ns - self._estimate[0] >= NS_PER_S:
            fit = fit_drift(self.timeline.points(), (now_mono_ns - self.started_mono_ns) / NS_PER_S)
            best = self.best
            if fit is not None:
                self._estimate = (now_mono_ns, fit.offset_end_ns, fit.offset_end_err_ns, fit.drift_ppm)
            else:
                self._estimate = (now_mono_ns, best and best.offset_ns, best and best.offset_err_ns, None)
        return self._estimate[1:]

    def add_answer(self, sample: Sample, timing: Timing, neighbours: Sequence[Legs]) -> None:
        """An answered probe's figures, and its differences with the probes numbered next to it."""
        self.rtt.add(timing.rtt_ns)
        self.rtt_buckets[bisect.bisect_left(RTT_BUCKETS_NS, timing.rtt_ns)] += 1
        if timing.proc_ns is not None:
            self.proc.add(timing.proc_ns)
        if sample.server_stamp is not None:
            self.server_stamps.add(sample.server_stamp)
        out, back = legs_of(sample, timing)[1:]
        if out is not None and back is not None:
            self.send_delays.add(out)
            self.receive_delays.add(back)
        for legs in neighbours:  # IPDV: consecutive probes by number, as irtt pairs them
            self.jitter.add(abs(timing.rtt_ns - legs.rtt_ns))
            if out is not None and back is not None and legs.out_ns is not None and legs.back_ns is not None:
                self.send_ipdv.add(abs(out - legs.out_ns))
                self.receive_ipdv.add(abs(back - legs.back_ns))
        error = sample.offset_err_ns
        if not timing.trusted:
            self.untrusted_because[timing.untrusted_because] += 1
        elif error is not None and (self.best is None or error < (self.best.offset_err_ns or math.inf)):
            self.best = sample




# ----------------------------------------------------------------------------------------------
# 5. Server: TimeServer, its guards, and MetricsServer
# ----------------------------------------------------------------------------------------------

MAX_QUEUE_WAIT_NS = NS_PER_S        # an older kernel timestamp means the clocks disagree
RECEIVE_TIMEOUT = 0.25              # the server looks at its stop flag at least this often


def _time_prefix(second: int) -> bytes:
    """b"The time is <local date and time>"; the server appends the microseconds, as
    the tutorial's datetime.now() prints them."""
    return datetime.datetime.fromtimestamp(second).strftime("The time is %Y-%m-%d %H:%M:%S").encode("ascii")


_LAST_PREFIX = [-1, ""]  # type: List[Any]  # the second, and its "The time is ...": once for the process


def _local_time_prefix(second: int) -> str:
    if second != _LAST_PREFIX[0]:
        _LAST_PREFIX[:] = second, _time_prefix(second).decode("ascii")
    return _LAST_PREFIX[1]


def _bind_error(host: str, port: int, exc: OSError) -> TimecheckError:
    if exc.errno == errno.EADDRNOTAVAIL:
        reason = ("{} is not an address of this machine (on a cloud VM the public IP "
                  "usually is not); bind 0.0.0.0 to listen on all IPv4 interfaces, "
                  "or :: for IPv6".format(host))
    elif exc.errno == errno.EADDRINUSE:
        reason = "port {} is already in use".format(port)
    elif exc.errno == errno.EACCES:
        reason = "permission denied (ports below 1024 need root)"
    else:
        reason = exc.strerror or str(exc)
    return TimecheckError("cannot bind {}: {}".format(format_address(host, port), reason))


class RateLimiter:
    """Token buckets per source address: rate replies a second, bursts of rate."""

    def __init__(self, rate: float, max_entries: int = SOURCE_TABLE_SIZE) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self._buckets = RecentTable(max_entries)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: str, now_ns: int) -> bool:
        bucket = self._buckets.take(source)
        if bucket is None:
            tokens = self.burst
        else:
            # max(0, ...): a clock stepped backwards refills nothing and drains nothing
            tokens = min(self.burst, bucket[0] + max(0, now_ns - bucket[1]) * self.rate / NS_PER_S)
        allowed = tokens >= 1.0
        self._buckets.store(source, (tokens - 1.0 if allowed else tokens, now_ns))
        return allowed


class ReplayGuard:
    """The MACs of the keyed requests answered within the last REPLAY_WINDOW_S seconds, at most
    REPLAY_ENTRIES of them (the oldest go first), as NTS and WireGuard keep theirs: a request
    captured on the path and sent again, from any source, is answered once."""

    def __init__(self, max_entries: Optional[int] = None, window_s: Optional[float] = None) -> None:
        self.max_entries = REPLAY_ENTRIES if max_entries is None else max_entries
        self._window_ns = int((REPLAY_WINDOW_S if window_s is None else window_s) * NS_PER_S)
        self._seen = collections.OrderedDict()  # type: collections.OrderedDict[int, int]  # MAC's 64 bits -> when

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, mac: bytes) -> bool:
        """Whether mac came within the window; remembers it if not."""
        now, seen = monotonic_ns(), self._seen
        while seen and now - next(iter(seen.values())) > self._window_ns:
            seen.popitem(last=False)
        key = int(mac[:16], 16)  # 64 bits of an HMAC: no one without the key picks a collision
        if key in seen:
            return True
        if len(seen) >= self.max_entries:
            seen.popitem(last=False)
        seen[key] = now
        return False


class LoopGuard:
    """Tells a loop between servers from a client, for requests in the tutorial's form.

    There a reply looks just like a request, so a spoofed source can set two
    servers (or one, with itself) answering each other for ever.  A loop sends
    back to a source the id just answered to it (or that id plus one, from a
    --faulty server), where the tutorial's client draws a fresh id from 0..1000,
    from a fresh port, every time.  So the last id answered to each source
    address and port is kept, in a bounded table, and a request carrying it, or
    it plus one, from that source is refused.
    """

    def __init__(self, max_entries: int = SOURCE_TABLE_SIZE) -> None:
        self._answered = RecentTable(max_entries)

    def __len__(self) -> int:
        return len(self._answered)

    def looping(self, source: tuple, request_id: int) -> bool:
        last = self._answered.take(source)
        return last is not None and 0 <= request_id - last <= 1

    def answered(self, source: tuple, reply_id: int) -> None:
        self._answered.store(source, reply_id)


class _Session:
    """A client session at the server: its requests counted (one the network duplicated, once),
    a bit for each of the latest SEQUENCE_WINDOW seqs seen (WireGuard's replay counter), where
    it was last heard from and the highest seq answered (for its goodbye), and its latest
    interleaved exchanges: the T2 of each reply -> [its seq, the kernel's stamp of it leaving]."""
    __slots__ = ("received", "highest", "seen", "exchanges", "source", "answered", "heard_ns")

    def __init__(self) -> None:
        self.received, self.highest, self.seen, self.answered, self.heard_ns = 0, -1, 0, -1, 0
        self.exchanges = collections.OrderedDict()  # type: collections.OrderedDict[int, List[Optional[int]]]
        self.source = None  # type: Optional[tuple]

    def count(self, seq: int) -> bool:
        """One more request: whether it is new, neither among the latest seen nor older than they;
        only a new one is counted, so that the client's loss split stays exact."""
        if seq > self.highest:
            self.seen = ((self.seen << min(seq - self.highest, SEQUENCE_WINDOW)) | 1) & _WINDOW_MASK
            self.highest = seq
        elif self.highest - seq >= SEQUENCE_WINDOW or self.seen >> (self.highest - seq) & 1:
            return False
        else:
            self.seen |= 1 << (self.highest - seq)
        self.received += 1
        return True

    def exchanged(self, t2: int, seq: int) -> List[Optional[int]]:
        """An interleaved reply about to go, known by its T2: where its stamp will be kept."""
        entry = self.exchanges[t2] = [seq, None]
        if len(self.exchanges) > EXCHANGES_KEPT:
            self.exchanges.popitem(last=False)
        return entry


_WINDOW_MASK = (1 << SEQUENCE_WINDOW) - 1


class ServerStats:
    """What the server did with the datagrams it received."""
    __slots__ = ("served", "malformed", "unauthenticated", "replayed", "rate_limited", "too_short", "loops",
                 "errors", "not_logged", "user_stamps", "transmit_user_stamps")

    def __init__(self) -> None:
        self.served = self.malformed = self.unauthenticated = self.replayed = self.rate_limited = 0
        self.too_short = self.loops = self.errors = self.not_logged = self.user_stamps = 0
        self.transmit_user_stamps = 0

    def as_dict(self) -> Dict[str, int]:
        """A copy, taken in one C-level step: another thread only adds to the counters."""
        return dict(zip(self.__slots__, operator.attrgetter(*self.__slots__)(self)))

    def __str__(self) -> str:
        return ("served {0.served}, malformed {0.malformed}, unauthenticated {0.unauthenticated}, "
                "rate-limited {0.rate_limited}, too short to answer {0.too_short}, replays refused "
                "{0.replayed}, loops refused {0.loops}, send/receive errors {0.errors}".format(self))


def _bound_socket(host: str, port: int) -> socket.socket:
    """A UDP socket bound to host and port; on "::", IPv4 too, whatever the system's default."""
    family, address = resolve(host, port, passive=True)[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and address[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise _bind_error(address[0], port, exc) from None
    return sock


class ServerSpec(NamedTuple):
    """What a server does beyond answering: the tutorial's faulty replies (a probability, rng's), a
    shared key, --max-rate, at most log_limit log lines a second (None: all), its wall clock (tests
    inject a shifted one), whose timestamps (KERNEL where the platform has them, else USER), and
    its kernel's clock state."""
    faulty: float = 0.0
    key: Optional[bytes] = None
    max_rate: Optional[float] = None
    log_limit: Optional[int] = LOG_LINES_PER_SECOND
    wall_clock: Optional[Callable[[], int]] = None
    timestamps: str = KERNEL
    rng: Callable[[], float] = random.random
    clock_state: Callable[[], ClockState] = read_clock_state
    stamp: Optional[str] = None  # a STAMP reflector: STATEFUL or STATELESS; None: our protocol


STATEFUL, STATELESS = "stateful", "stateless"  # a STAMP reflector's seqs: its own, or the sender's


class TimeServer:
    """The time server: bind on construction (port 0 for any), then serve.

    serve_forever() answers in the calling thread, start() in a background
    thread; shutdown() stops either from another thread; as a context manager
    it shuts down and closes on exit.  log receives one line per request, at
    most ServerSpec's log_limit a second; the other keywords are ServerSpec's.
    goodbye() tells the sessions it served lately that it stops.
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 log: Optional[Callable[[str], None]] = None, **options: Any) -> None:
        self.spec = ServerSpec(**options)
        faulty, key, max_rate, log_limit, wall_clock, timestamps, rng, clock_state, stamp = self.spec
        self.socket = _bound_socket(host, port)
        self.address = self.socket.getsockname()
        _set_receive_timeout(self.socket, RECEIVE_TIMEOUT)
        enlarge_receive_buffer(self.socket, RECEIVE_BUFFER_MAX)  # a stall, or a fleet's burst: none dropped
        refused = kernel_stamps_refused(self.socket) if timestamps == KERNEL else None
        self.timestamps = USER if timestamps != KERNEL or refused else KERNEL
        self.no_kernel_stamps = refused  # why, in words, when kernel stamps were asked for but refused
        self._wildcard = self.address[0] in ("0.0.0.0", "::")
        # A wildcard server answers from the address each request was sent to: the kernel's own
        # choice can differ on a host with several, and clients drop that.
        self.packet_info = self._wildcard and enable_packet_info(self.socket)
        self.stats, self._sendmsg = ServerStats(), message_calls(self.socket)[1]
        self.keyed, self._key, self._faulty, self._rng = key is not None, key, faulty, rng
        self._plain = key is None and not faulty  # a request with no options needs nothing more
        self._clock = KernelClock(wall_clock)
        self._wall_clock, self._started_ns = self._clock.wall_clock, self._clock.wall_clock()
        self._read_clock_state = clock_state
        self._limiter = RateLimiter(max_rate) if max_rate else None
        self._loops, self._replays = LoopGuard(), ReplayGuard()
        self._sessions = RecentTable(SOURCE_TABLE_SIZE)  # a session (with its source, unkeyed) -> _Session
        # The kernel stamps only the replies that ask (a control message each): others pay nothing.
        self._errors = ErrorQueue(self.socket, every=False) if self.timestamps == KERNEL else None
        self.transmit_stamps = self._errors is not None and self._errors.stamps
        self._path_reported = False
        self._stamped = None  # type: Optional[List[Optional[int]]]  # the exchange of the reply going out
        self._send_extra = ()  # type: Tuple[tuple, ...]  # its control messages beyond packet info
        self._log, self._log_limit = log, log_limit
        self._log_second = self._log_lines = self._log_hidden = 0
        self._text_second, self._text_prefix = -1, b""
        self._clock_second, self._clock_fragment = -1, b""
        self._stopping = False
        self._idle = threading.Event()
        self._idle.set()
        self.thread = None  # type: Optional[threading.Thread]  # start()'s
        if stamp is not None:  # a STAMP reflector answers STAMP alone
            self._reply_for, self._log_request = self._reflect, self._log_reflection  # type: ignore[method-assign]
            self._error_second, self._error_estimate = -1, 0
            enable_path_marks(self.socket)  # every reflection carries the TTL: asked for at once
            self._path_reported = True

    def __enter__(self) -> "TimeServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.close()

    def serve_forever(self) -> None:
        """Answer requests until shutdown(); a bad datagram is counted, never fatal.  The usual
        datagram, the kernel's stamp then its destination, is read here, in the loop."""
        recvmsg = message_calls(self.socket)[0]
        wall_clock, arrival, reply_for, stats = self._wall_clock, self._arrival, self._reply_for, self.stats
        log = self._log_request if self._log is not None else None
        usual = self.timestamps == KERNEL and self._clock.usable and not self._clock.offset_ns
        unpack, stamp_kind, info_kinds = TIMESPEC.unpack, SO_TIMESTAMPNS, _PACKET_INFO_KINDS
        none = (0, 0, b"")
        self._idle.clear()
        try:
            while not self._stopping:
                try:
                    data, ancillary, _, source = recvmsg(MAX_DATAGRAM, ANCILLARY_SPACE)
                except NOTHING_YET:  # the receive timeout: a look at _stopping when all is quiet
                    self._collect_stamps()  # and at the error queue, so that it never fills
                    continue
                except OSError:  # Windows reports an earlier reply's ICMP error here
                    if self.socket.fileno() < 0:
                        break
                    stats.errors += 1
                    continue
                user_ns = wall_clock()
                if self._stopping:
                    break
                # The usual datagram (the kernel's stamp, then its destination, if any) read here;
                # any other, and an old stamp, by _arrival() and the clock's checks.
                first, rest = (ancillary[0], ancillary[1:]) if usual and ancillary else (none, ())
                kernel_ns = -NS_PER_S
                if first[1] == stamp_kind and (not rest or len(rest) == 1 and rest[0][1] in info_kinds):
                    seconds, nanoseconds = unpack(first[2])
                    kernel_ns = seconds * NS_PER_S + nanoseconds
                if 0 <= user_ns - kernel_ns <= NS_PER_S:
                    server_recv_ns, stamp, control = kernel_ns, b"kernel", rest
                else:
                    server_recv_ns, stamp, control = arrival(ancillary, user_ns) if ancillary \
                        else (user_ns, b"user", ())
                reply = reply_for(data, source, server_recv_ns, stamp, ancillary)
                if reply is not None and self._send(reply, control, source, server_recv_ns) \
                        and log is not None:
                    log(data, source, server_recv_ns)
        finally:
            self._flush_log()
            self._idle.set()

    def _send(self, reply: bytes, control: Sequence[tuple], source: tuple, server_recv_ns: int) -> bool:
        """Send reply to source with its control messages; whether it went (counted either way).
        An interleaved session's reply is stamped by the kernel as it leaves: its stamp is kept,
        once it comes, under the reply's own T2."""
        try:
            self._sendmsg((reply,), (*control, *self._send_extra) if self._send_extra else control, 0, source)
        except OSError:  # e.g. a spoofed source port 0, or no route back
            if self._stamped is not None:
                self._errors.recount()  # type: ignore[union-attr]
            elif control and self._send_plainly(reply, source):
                self.stats.served += 1
                return True
            self.stats.errors += 1
            return False
        if self._stamped is not None:
            errors = self._errors  # type: ErrorQueue  # type: ignore[assignment]
            errors.sent(self._stamped, server_recv_ns - self._clock.offset_ns)
            if errors.waiting() > PENDING_STAMPS_READ:
                self._collect_stamps()
        self.stats.served += 1
        return True

    def _collect_stamps(self) -> None:
        """The kernel's stamps of interleaved replies leaving, read off the error queue at one go,
        each kept with its exchange, on this server's clock."""
        if self._errors is None or not self._errors.waiting():
            return
        offset, usable = self._clock.offset_ns, self._clock.usable
        for entry, stamp_ns in self._errors.read()[0] if usable else ():
            entry[1] = stamp_ns + offset  # type: ignore[index]

    def _send_plainly(self, reply: bytes, source: tuple) -> bool:
        """The reply without its source address, where the kernel refused that (a BSD that
        lacks IP_SENDSRCADDR): the kernel picks the source.  Whether it went."""
        try:
            self.socket.sendto(reply, source)
        except OSError:
            return False
        return True

    def _arrival(self, ancillary: list, user_ns: int) -> Tuple[int, bytes, Sequence[tuple]]:
        """T2, where it came from (b"kernel" or b"user"), and the packet info to reply with.  The
        kernel's stamp stays T2 however long the request waited for this process (a stall)."""
        kernel_ns, control = read_ancillary(ancillary)
        server_recv_ns = self._clock.arrival(kernel_ns, user_ns, max(NS_PER_S, user_ns - self._started_ns))
        if server_recv_ns is not None:
            return server_recv_ns, b"kernel", control
        if self.timestamps == KERNEL:
            self.stats.user_stamps += 1
        return user_ns, b"user", control

    def respond(self, data: bytes, source: Optional[tuple] = None) -> Optional[bytes]:
        """The reply serve_forever() would send to data from source, or None; no I/O.  By default
        from a client at 192.0.2.1 (TEST-NET-1) on a port that is not the server's own."""
        if source is None:
            source = ("192.0.2.1", 49153 if self.address[1] == 49152 else 49152)
        return self._reply_for(data, source, self._wall_clock(), b"user")

    def _reply_for(self, data: bytes, source: tuple, server_recv_ns: int, stamp: bytes,
                   ancillary: Sequence[tuple] = ()) -> Optional[bytes]:
        """The reply to data from source, or None (each refusal counted): refused before parsing,
        not a request, not admitted, or too short for its reply."""
        self._stamped, self._send_extra = None, ()
        if self._turned_away(source, server_recv_ns):
            return None
        match = _CANONICAL_REQUEST.fullmatch(data)
        if match is not None and match.lastindex == 2 and self._plain:  # an id and a seq, no more
            request_id, seq = match.groups()[:2]
            reply = self._build_reply(data, Request(request_id, seq, 0, False), request_id, server_recv_ns,
                                      stamp)
            self.stats.too_short += reply is None
            return reply
        request = self._parsed(data, match)
        if request is None:
            return None
        request_id, seq, size, wants_clock_state, options = request
        session = None if options.session is None else self._session(options.session, source)
        if not self._admitted(data, request, session, source, server_recv_ns):
            return None
        reply_id = request_id
        if self._faulty and self._rng() < self._faulty:
            reply_id = b"%d" % (int(request_id) + 1)  # the tutorial's FAULTY_SERVER: a wrong id
        clock_state = self._clock_state_fragment(server_recv_ns) if wants_clock_state else b""
        extra = b"" if session is None else self._session_extra(session, request, source, ancillary,
                                                                 server_recv_ns)
        reply = self._build_reply(data, request, reply_id, server_recv_ns, stamp, (clock_state, extra))
        if reply is None:
            self.stats.too_short += 1
        elif seq is None:
            self._loops.answered(source, int(reply_id))
        return reply

    def _reflect(self, data: bytes, source: tuple, server_recv_ns: int, stamp: bytes,
                 ancillary: Sequence[tuple] = ()) -> Optional[bytes]:
        """STAMP (RFC 8762 section 4.3): the reflection of a Session-Sender's packet, as large as
        it, or None (counted).  A session is a source and its SSID; stateful, its own count of
        the packets that came is the reply's seq (the sender's loss split), stateless the sender's."""
        self._stamped, self._send_extra = None, ()
        if self._turned_away(source, server_recv_ns):
            return None
        try:
            packet = decode_stamp(data, False, self._key)
        except WireError:
            self.stats.malformed += self._key is None
            self.stats.unauthenticated += self._key is not None
            return None
        if self._key is None and data[16:24] != bytes(8):  # MBZ, where a reflection has its T2: never
            self.stats.malformed += 1  # reflected (a loop between reflectors), nor anything but STAMP
            return None
        session = self._known_session((source[0], source[1], packet.ssid))  # SSIDs are 16 bits: with the port
        fresh = session.count(packet.seq)
        if not fresh and self._key is not None:
            self.stats.replayed += 1
            return None
        if self._key is not None and self._limiter is not None and not self._limiter.allow(
                source[0], server_recv_ns):
            self.stats.rate_limited += 1
            return None
        tos, ttl = self._marks(ancillary)
        reflected = StampPacket(
            packet.seq if self.spec.stamp == STATELESS else session.received - 1, 0,
            self._stamp_error(server_recv_ns), packet.ssid, ns_to_ntp(server_recv_ns), packet.seq,
            packet.timestamp, packet.error, ttl or 0, self._reflect_tlvs(packet.tlvs, session, tos))
        if self.transmit_stamps and fresh:  # a duplicate is answered, never named by a Follow-Up: its
            self._stamped = session.exchanged(server_recv_ns, reflected.seq)  # seq is an earlier one's
            self._send_extra += TRANSMIT_STAMP_REQUEST
        return self._stamped_reflection(reflected, len(data))

    def _stamped_reflection(self, reflected: StampPacket, size: int) -> bytes:
        """The reflection, its T3 read last, then signed (with a key)."""
        data = stamp_unsigned(reflected, True, self._key is not None, size)
        at = 16 if self._key is not None else 4
        return sign_stamp(self._key, True, data[:at] + NTP_TIME.pack(ns_to_ntp(self._wall_clock())) +
                          data[at + NTP_TIME.size:])

    def _reflect_tlvs(self, tlvs: Sequence[Tuple[int, int, bytes]], session: "_Session",
                      tos: Optional[int]) -> Tuple[Tuple[int, int, bytes], ...]:
        """RFC 8972's TLVs, answered: Class of Service (the DSCP and ECN received; the reply
        marked with the DSCP asked), Follow-Up Telemetry (the kernel's transmit stamp of the
        session's previous reflection), padding copied; any other marked unrecognised."""
        answered = []
        for flags, kind, value in tlvs:
            if kind == TLV_CLASS_OF_SERVICE and len(value) >= 4 and tos is not None:
                word = int.from_bytes(value[:2], "big")  # DSCP1 (asked), DSCP2, ECN (received), RP
                value = (word & 0xFC03 | tos >> 2 << 4 | (tos & 3) << 2).to_bytes(2, "big") + value[2:]
                self._send_extra += tos_mark(self.socket.family, word >> 10 << 2)
            elif kind == TLV_FOLLOW_UP and len(value) >= FOLLOW_UP.size:
                value = self._follow_up(session) + value[FOLLOW_UP.size:]
            elif kind != TLV_PADDING:
                flags |= TLV_UNRECOGNIZED
            answered.append((flags, kind, value))
        return tuple(answered)

    def _follow_up(self, session: "_Session") -> bytes:
        """Follow-Up Telemetry: the seq and the kernel's transmit stamp of the session's previous
        reflection (our interleaved T3), zeros where there is none."""
        previous = next(reversed(session.exchanges.values()), None) if session.exchanges else None
        if previous is not None and previous[1] is None:
            self._collect_stamps()
        if previous is None or previous[1] is None:
            return bytes(FOLLOW_UP.size)
        return FOLLOW_UP.pack(previous[0], ns_to_ntp(previous[1]), TIMESTAMP_SW_LOCAL)

    def _stamp_error(self, now_ns: int) -> int:
        """This server's error estimate, from its kernel's clock state: read at most once a second."""
        second = now_ns // NS_PER_S
        if second != self._error_second:
            state = self._read_clock_state()
            self._error_second, self._error_estimate = second, encode_error_estimate(
                state.synchronized, state.maxerror_ns)
        return self._error_estimate

    def _log_reflection(self, data: bytes, source: tuple, server_recv_ns: int) -> None:
        """A line for a packet reflected, at most log_limit a second."""
        if self._log_allowed(server_recv_ns):
            seq, _, _, ssid = STAMP_SENDER.unpack_from(data)
            self._say("{} STAMP seq {} SSID {}: reflected".format(format_address(*source[:2]), seq, ssid))

    def _turned_away(self, source: tuple, server_recv_ns: int) -> bool:
        """Refused before any parsing, the cheapest refusals: a source that makes loops, and
        (without a key; with one, after authentication) a sender over --max-rate."""
        if self._refused_source(source):
            self.stats.loops += 1
            return True
        limiter = self._limiter if self._key is None else None
        if limiter is not None and not limiter.allow(source[0], server_recv_ns):
            self.stats.rate_limited += 1
            return True
        return False

    def _parsed(self, data: bytes, match: Optional[Any]) -> Optional[Request]:
        """parse_request(data), or None for a reply (a loop in the making) or garbage, counted."""
        try:
            return parse_request(data, match)
        except NotARequest:
            self.stats.loops += 1
        except WireError:
            self.stats.malformed += 1
        return None

    def _session(self, session_id: int, source: tuple) -> _Session:
        """A session's state, known by its id: with a key, which authenticates it, from any
        source; without, only from the address it came from (another cannot touch it)."""
        return self._known_session(session_id if self._key is not None else (source[0], session_id))

    def _known_session(self, key: object) -> _Session:
        session = self._sessions.take(key) or _Session()
        self._sessions.store(key, session)
        return session

    def _admitted(self, data: bytes, request: Request, session: Optional[_Session], source: tuple,
                  server_recv_ns: int) -> bool:
        """Counted in its session; with a key, first authenticated, then not a replay, however
        old (outside its session's window, or a MAC answered lately), then within its sender's
        --max-rate: only authenticated requests spend an allowance.  In the tutorial's form,
        not the echo of our own reply."""
        stats, seq = self.stats, request.seq
        if self._key is not None and (seq is None or not mac_matches(self._key, REQUEST_LABEL, data)):
            stats.unauthenticated += 1  # silence: a keyed server cannot be used to probe or reflect
            return False
        fresh = True if session is None else session.count(int(seq))  # type: ignore[arg-type]
        if self._key is not None:
            if not fresh or (session is None and self._replays.seen(mac_of_datagram(data))):
                stats.replayed += 1  # a captured request sent again, from anywhere: answered once
                return False
            if self._limiter is not None and not self._limiter.allow(source[0], server_recv_ns):
                stats.rate_limited += 1
                return False
        if seq is None and self._loops.looping(source, int(request.request_id)):
            stats.loops += 1
            return False
        return True

    def _session_extra(self, session: _Session, request: Request, source: tuple, ancillary: Sequence[tuple],
                       server_recv_ns: int) -> bytes:
        """What a request's options ask for: the count of its session's requests; interleaved, the
        kernel's transmit stamp of the reply whose T2 it names (RFC 9769's way: never another
        exchange's), and this reply stamped as it leaves; with path, the TOS and TTL it came
        with, the reply marked with the same TOS."""
        options, seq = request.options, int(request.seq)  # type: ignore[arg-type]
        session.source, session.heard_ns = source, server_recv_ns
        session.answered = max(session.answered, seq)
        previous = None  # type: Optional[List[Optional[int]]]
        if options.interleaved and self.transmit_stamps:
            previous = session.exchanges.get(options.exchange) if options.exchange is not None else None
            if previous is not None and previous[1] is None:
                self._collect_stamps()  # it may be on the error queue by now
            self._stamped = session.exchanged(server_recv_ns, seq)
            self._send_extra = TRANSMIT_STAMP_REQUEST
        tos = ttl = None
        if options.path:
            tos, ttl = self._marks(ancillary)
            if tos is not None:
                self._send_extra += tos_mark(self.socket.family, tos)
        known = previous if previous is not None and previous[1] is not None else [None, None]
        return encode_reply_extra(ReplyExtra(session.received, options.interleaved and self.transmit_stamps,
                                             known[0], known[1], tos, ttl))

    def goodbye(self) -> int:
        """Tell each session heard from within BYE_WINDOW_S that this server stops, and the last
        seq it answered there, so that its client counts what follows as not up, not lost.  As
        small as a request, to addresses that sent one lately; how many were told."""
        told, now = 0, self._wall_clock()
        for key, session in self._sessions.items():
            if session.source is None or now - session.heard_ns > BYE_WINDOW_S * NS_PER_S:
                continue
            session_id = key if self._key is not None else key[1]
            data = b'[%d, "bye", {"bye": %d}%b]' % (session_id, session.answered,
                                                      b', "' + ZERO_MAC + b'"' if self._key else b"")
            try:
                self.socket.sendto(data if self._key is None else seal(self._key, BYE_LABEL, data),
                                   session.source)
                told += 1
            except OSError:
                pass  # no route back: that client will count its probes as lost
        return told

    def _marks(self, ancillary: Sequence[tuple]) -> Tuple[Optional[int], Optional[int]]:
        """The TOS and TTL a datagram came with; the first request that asks turns their report
        on, so that they cost nothing until a client wants them."""
        if not self._path_reported:
            self._path_reported = True
            enable_path_marks(self.socket)
        return read_marks(ancillary)

    def _clock_state_fragment(self, now_ns: int) -> bytes:
        """This kernel's clock state, for the replies that ask: read at most once a second."""
        second = now_ns // NS_PER_S
        if second != self._clock_second:
            self._clock_second, self._clock_fragment = second, encode_clock_state(self._read_clock_state())
        return self._clock_fragment

    def _refused_source(self, source: tuple) -> bool:
        """Privileged ports (echo, daytime, DNS, NTP...) and our own port: a loop in the making."""
        port = source[1]
        return port < PRIVILEGED_PORTS or (port == self.address[1] and (self._wildcard or
                                                                         source[0] == self.address[0]))

    def _build_reply(self, data: bytes, request: Request, reply_id: bytes, server_recv_ns: int, stamp: bytes,
                     members: Tuple[bytes, bytes] = (b"", b"")) -> Optional[bytes]:
        """The reply, T3 read last; None if it would be larger than the request.  members are the
        clock state and what the options asked for: the clock state goes in only if it fits (the
        client pads for it)."""
        second, fraction = divmod(server_recv_ns, NS_PER_S)
        if second != self._text_second:  # formatting the date once a second is enough
            self._text_second, self._text_prefix = second, _time_prefix(second)
        key, (clock_state, extra) = self._key, members
        head, tail = reply_parts(reply_id, b"%b.%06d" % (self._text_prefix, fraction // 1000), request.seq,
                                 server_recv_ns, stamp=stamp, keyed=key is not None,
                                 pad_to=min(request.size, len(data)) if request.size else 0,
                                 members=clock_state + b", " + extra if clock_state and extra
                                 else clock_state or extra)
        if clock_state and len(head) + TIMESTAMP_DIGITS + len(tail or b"") > len(data):
            return self._build_reply(data, request, reply_id, server_recv_ns, stamp, (b"", extra))
        if tail is None:
            return fit_tutorial_reply(head, len(data))
        if key is None:
            reply = b"%b%d%b" % (head, self._wall_clock(), tail)  # T3: as late as the reply allows
        else:
            context = reply_context(request.request_id, mac_of_datagram(data))
            reply = seal(key, context, b"%b%d%b" % (head, self._wall_clock(), tail))
        return reply if len(reply) <= len(data) else None  # no reply is ever larger than its request

    def _log_allowed(self, server_recv_ns: int) -> bool:
        """Whether a line may be shown: at most log_limit a second; the others are counted."""
        second = server_recv_ns // NS_PER_S
        if second != self._log_second:
            self._flush_log()
            self._log_second, self._log_lines = second, 0
        if self._log_limit is not None and self._log_lines >= self._log_limit:
            self._log_hidden += 1
            return False
        self._log_lines += 1
        return True

    def _log_request(self, data: bytes, source: tuple, server_recv_ns: int) -> None:
        """The tutorial's line for an answered request, at most log_limit a second."""
        if not self._log_allowed(server_recv_ns):
            return
        request = decode_message(data)  # only for the lines shown: the hot path never decodes
        self._say("{} Request ID: {}. Client request, {}".format(
            format_address(*source[:2]), request.message_id, clip(request.text, LOG_TEXT_BYTES)))

    def _say(self, line: str) -> None:
        if self._log is not None:
            self._log(line)

    def _flush_log(self) -> None:
        if self._log_hidden:
            self._say("... {} more {} not shown".format(self._log_hidden,
                                                        "request" if self._log_hidden == 1 else "requests"))
            self.stats.not_logged += self._log_hidden
            self._log_hidden = 0

    def start(self) -> "TimeServer":
        """Serve in a daemon thread; returns self."""
        self._idle.clear()
        self.thread = _thread(self.serve_forever, "udp-timecheck-server")
        return self

    def request_stop(self) -> None:
        """Make serve_forever() return soon; safe in a signal handler, and to call again."""
        self._stopping = True
        host, port = self.address[:2]
        wake_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        try:  # the loop sees _stopping after its next datagram; this one need not arrive
            with socket.socket(self.socket.family, socket.SOCK_DGRAM) as waker:
                waker.setblocking(False)
                waker.sendto(b"", (wake_host, port))
        except OSError:
            pass  # a full buffer or no socket left: the receive timeout wakes the loop instead

    def shutdown(self) -> None:
        """Stop serving and wait for the loop to end (call from another thread)."""
        for _ in range(30):  # the receive timeout bounds each wait; the wake-up is quicker
            if self._idle.is_set() or self.socket.fileno() < 0:
                break
            self.request_stop()
            self._idle.wait(0.1)
        self._stopping = True
        if self.thread is not None:
            self.thread.join(timeout=5)

    def close(self) -> None:
        self.socket.close()


class _Connection:
    """One connection to the metrics endpoint: what it sent so far, what is left to send back,
    and when it is cut off, whatever it does."""
    __slots__ = ("sock", "request", "reply", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.request, self.reply, self.deadline = sock, bytearray(), b"", deadline


def _http_reply(status: int, reason: str, body: bytes = b"", kind: Optional[str] = None) -> bytes:
    """A whole HTTP/1.1 response, after which the connection closes."""
    head = "HTTP/1.1 {} {}\r\n{}Content-Length: {}\r\nConnection: close\r\n\r\n".format(
        status, reason, "Content-Type: {}\r\n".format(kind) if kind else "", len(body))
    return head.encode("ascii") + body


class MetricsStats:
    """What the metrics endpoint did with its connections."""
    __slots__ = ("accepted", "served", "not_found", "evicted", "timed_out", "too_large", "accept_errors",
                 "errors")

    def __init__(self) -> None:
        self.accepted = self.served = self.not_found = self.evicted = self.timed_out = self.too_large = 0
        self.accept_errors = self.errors = 0

    def as_dict(self) -> Dict[str, int]:
        """A copy, taken in one C-level step: another thread only adds to the counters."""
        return dict(zip(self.__slots__, operator.attrgetter(*self.__slots__)(self)))


class MetricsServer:
    """Serves GET /metrics, as render(stats) gives it, from one daemon thread: Prometheus scrapes
    it; stats is the endpoint's own MetricsStats, for render to show what became of connections.

    Whatever connects costs a bounded amount: at most METRICS_CONNECTIONS at once
    (a new one closes the oldest), each with METRICS_DEADLINE seconds for its whole
    exchange and METRICS_REQUEST_BYTES for its request line and headers; when
    accept() fails (no file descriptors left), it backs off instead of spinning.
    Its errors go to log (non-blocking), at most one line every LOG_EVERY seconds.
    render runs in that thread and reads counters that the probe or serve loop only
    increments, without a lock: a scrape never makes that loop wait.
    """

    def __init__(self, host: str, port: int, render: Callable[[MetricsStats], str],
                 log: Optional[Callable[[str], None]] = None,
                 pages: Optional[Mapping[bytes, Tuple[Callable[[], str], str]]] = None) -> None:
        family, address = resolve(host, port, passive=True)[0]
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address[:2] if family == socket.AF_INET else address)
            self.socket.listen(128)  # a deep backlog: connections wait there, not in SYN retries
        except OSError as exc:
            self.socket.close()
            raise _bind_error(address[0], port, exc) from None
        self.socket.setblocking(False)
        self.address = self.socket.getsockname()
        import ipaddress  # here, as in _source_address: only these two need it
        self.loopback = ipaddress.ip_address(self.address[0].split("%")[0]).is_loopback
        self.stats, self._render, self._log, self._pages = MetricsStats(), render, log, pages or {}
        self._connections = collections.OrderedDict()  # type: collections.OrderedDict[int, _Connection]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.socket, selectors.EVENT_READ)
        self._waker = socket.socketpair()
        self._selector.register(self._waker[0], selectors.EVENT_READ)
        self._stopping, self._backoff, self._listening_again = False, 0.0, 0.0
        self._logged_at, self._unlogged = -LOG_EVERY, 0
        self.thread = None  # type: Optional[threading.Thread]

    def start(self) -> "MetricsServer":
        self.thread = _thread(self._serve, "udp-timecheck-metrics")
        return self

    def close(self) -> None:
        self._stopping = True
        try:
            self._waker[1].send(b"\0")
        except OSError:
            pass
        if self.thread is not None:
            self.thread.join(timeout=5)
        for connection in list(self._connections.values()):
            self._drop(connection)
        for sock in (self.socket,) + tuple(self._waker):
            sock.close()
        self._selector.close()

    def _serve(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            deadlines = [connection.deadline for connection in self._connections.values()]
            if self._listening_again:
                deadlines.append(self._listening_again)
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            for key, events in self._selector.select(timeout):
                if key.fileobj is self.socket:
                    self._accept(now)
                elif key.fileobj is self._waker[0]:
                    self._waker[0].recv(64)
                else:
                    self._step(key.data, events)
            self._expire(time.monotonic())

    def _accept(self, now: float) -> None:
        try:
            sock, _ = self.socket.accept()
        except BlockingIOError:
            return
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: stop listening for a while, not spin
            self.stats.accept_errors += 1
            self._backoff = min(ACCEPT_BACKOFF[1], max(ACCEPT_BACKOFF[0], self._backoff * 2))
            self._selector.unregister(self.socket)
            self._listening_again = now + self._backoff
            self._note("cannot accept a metrics connection ({}); listening again in {:g} s".format(
                exc.strerror or exc, self._backoff))
            return
        self._backoff = 0.0
        self.stats.accepted += 1
        if len(self._connections) >= METRICS_CONNECTIONS:
            self.stats.evicted += 1
            self._drop(next(iter(self._connections.values())))  # the oldest makes room
        sock.setblocking(False)
        connection = _Connection(sock, now + METRICS_IDLE)  # METRICS_DEADLINE from its first byte
        self._connections[sock.fileno()] = connection
        self._selector.register(sock, selectors.EVENT_READ, connection)

    def _step(self, connection: _Connection, events: int) -> None:
        """Read what the connection sent, or write what is left of its reply."""
        try:
            if events & selectors.EVENT_WRITE:
                sent = connection.sock.send(connection.reply)
                connection.reply = connection.reply[sent:]
                if not connection.reply:
                    self._drop(connection)
                return
            data = connection.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self.stats.errors += 1
            self._drop(connection)
            return
        if not data:
            self._drop(connection)
            return
        if not connection.request:
            connection.deadline = time.monotonic() + METRICS_DEADLINE
        connection.request += data
        self._answer(connection)

    def _answer(self, connection: _Connection) -> None:
        """Once the request line and headers are in, the reply; too long a request is cut off."""
        request = connection.request
        if b"\r\n\r\n" not in request and b"\n\n" not in request:
            if len(request) > METRICS_REQUEST_BYTES:
                self.stats.too_large += 1
                connection.reply = _http_reply(431, "Request Header Fields Too Large")
                self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
            return
        words = bytes(request[:request.find(b"\n")]).split()
        path = words[1].split(b"?")[0] if len(words) >= 2 and words[0] == b"GET" else b""
        if path == b"/metrics":
            connection.reply = self._metrics_reply()
        elif path in self._pages:
            connection.reply = self._metrics_reply(*self._pages[path])
        else:
            self.stats.not_found += 1
            connection.reply = _http_reply(404, "Not Found")
        connection.request = bytearray()
        self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)

    def _metrics_reply(self, render: Optional[Callable[[], str]] = None, kind: str = METRICS_TYPE) -> bytes:
        """The metrics (or, given render, the page) as a whole HTTP reply."""
        try:
            body = (render() if render is not None else self._render(self.stats)).encode("utf-8")
        except Exception as exc:  # a bug in rendering must not take the endpoint, nor the program, down
            self.stats.errors += 1
            self._note("the metrics could not be rendered: {!r}".format(exc))
            return _http_reply(500, "Internal Server Error")
        self.stats.served += 1
        return _http_reply(200, "OK", body, kind)

    def _expire(self, now: float) -> None:
        for connection in list(self._connections.values()):
            if connection.deadline <= now:
                self.stats.timed_out += 1
                self._drop(connection)
        if self._listening_again and now >= self._listening_again:
            self._listening_again = 0.0
            self._selector.register(self.socket, selectors.EVENT_READ)

    def _drop(self, connection: _Connection) -> None:
        self._connections.pop(connection.sock.fileno(), None)
        try:
            self._selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass  # never registered, or already gone
        connection.sock.close()

    def _note(self, line: str) -> None:
        """An error line, at most one every LOG_EVERY seconds; the others are counted in it."""
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY:
            self._unlogged += 1
            return
        more = " ({} more since the last)".format(self._unlogged) if self._unlogged else ""
        self._logged_at, self._unlogged = now, 0
        if self._log is not None:
            self._log("udp-timecheck: " + line + more)


# ----------------------------------------------------------------------------------------------
# 6. Client: what a run measures (RunSpec), its events, the probe book (Recorder), the one loop
#    (Measurement), SNTP, the reference, and the targets and peers files
# ----------------------------------------------------------------------------------------------

class Peer(NamedTuple):
    """A target, or a mesh's peer, as a file or the command line names it."""
    name: Optional[str]
    host: str
    port: Optional[int]


def read_peers(path: str, what: str = "targets file") -> List[Peer]:
    """A targets or peers file (- for standard input): one per line, NAME HOST:PORT, HOST:PORT,
    HOST PORT or HOST; '#' starts a comment.  A usage error names the line that is wrong; a file
    that names none is one too."""
    data = read_input(path, MAX_PEERS_FILE, what, stdin=True)[0]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TimecheckError("cannot read {} {}: {}".format(what, path, exc)) from None
    peers = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            peer = _peer_of(line)
        except TimecheckError as exc:
            raise TimecheckError("{}, line {}: {}".format(path, number, exc)) from None
        if peer is not None:
            peers.append(peer)
    if not peers:
        raise TimecheckError("{} {} names no target (only blank lines and comments)".format(what, path))
    return peers


def _peer_of(line: str) -> Optional[Peer]:
    """A peers file's line as a Peer; None for a blank line or a comment."""
    words = line.split("#", 1)[0].split()
    if len(words) == 2 and is_number(words[1]):  # HOST PORT
        words = ["{}:{}".format(*words) if ":" not in words[0] else "[{}]:{}".format(*words)]
    if len(words) > 2:
        raise TimecheckError("expected [NAME] HOST:PORT, got {!r}".format(line))
    if not words:
        return None
    host, port = split_target(words[-1])
    return Peer(printable(words[0]) if len(words) == 2 else None, host, port)  # a name, safe on a terminal


def client_targets(tokens: Sequence[str], targets_file: Optional[str] = None,
                   port: int = DEFAULT_PORT) -> List[Peer]:
    """TARGET [TARGET ...] [PORT] as the command line gives them, then those of --targets FILE:
    HOST, HOST:PORT or [IPV6]:PORT each; a final bare number is the port of every target that
    names none (else port)."""
    tokens = list(tokens)
    if tokens and is_number(tokens[-1]) and (len(tokens) >= 2 or targets_file):
        port = port_number(tokens[-1], tokens.pop())
    peers = [Peer(None, *split_target(token)) for token in tokens]
    peers += read_peers(targets_file) if targets_file else []
    if not peers:
        peers = [Peer(None, DEFAULT_HOST, None)]
    return [peer._replace(port=port if peer.port is None else peer.port) for peer in peers]


def find_self(peers: Sequence[Peer], name: Optional[str], host: str, port: int, where: str) -> Peer:
    """The peer that is this node: the one named name; else the one at --listen's address, or at
    its port on an address of this machine."""
    mine = [peer for peer in peers if peer.name == name] if name is not None \
        else _at_this_node(peers, host, port)
    if len(mine) == 1:
        return mine[0]
    if not mine:
        raise TimecheckError("none of the peers in {} is this node (--listen {}{})".format(
            where, format_address(host, port), ", --name " + name if name else ""))
    raise TimecheckError("{} peers in {} could be this node: give its name with --name".format(
        len(mine), where))


def _at_this_node(peers: Sequence[Peer], host: str, port: int) -> List[Peer]:
    """The peers at host and port; else those at port on an address of this machine."""
    at_port = [peer for peer in peers if peer.port == port]
    return [peer for peer in at_port if peer.host == host] or [
        peer for peer in at_port if _is_local(peer.host)]


def _is_local(host: str) -> bool:
    """Whether host names an address of this machine: one a socket can bind."""
    try:
        family, address = resolve(host, 0)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind(address)
    except (TimecheckError, OSError):
        return False
    return True


class PathOptions(NamedTuple):
    """What a run asks of the path beyond round trips: the server's transmit stamps in the kernel
    (interleaved: where the server can), the probes' TOS and TTL (and the server's report of
    the marks they came with), a source address to send from, and how many source ports to
    spread the probes over (ECMP)."""
    interleaved: bool = True
    tos: Optional[int] = None
    ttl: Optional[int] = None
    source: Optional[str] = None
    ports: int = 1
    family: int = 0  # -4, -6: AF_INET or AF_INET6; 0, either


DEFAULT_PATH = PathOptions()
OURS, NTP, STAMP = "udp-timecheck", "ntp", "stamp"  # the protocols a run can speak
PROTOCOL_PORTS = {OURS: DEFAULT_PORT, NTP: NTP_PORT, STAMP: STAMP_PORT}  # each one's port, unless given


class Outputs(NamedTuple):
    """What the command line writes of a run besides its lines: the results as JSON, the probes'
    rows, the plot, the metrics endpoint, -D's times (None, False: not asked for)."""
    json: bool = False
    quiet: bool = False
    csv: Optional[str] = None
    jsonl: Optional[str] = None
    plot: Optional[str] = None
    metrics: Optional[Tuple[str, int]] = None
    print_time: bool = False


class RunSpec(NamedTuple):
    """What a run measures, and how: built once, by the command line or by an API caller, and
    read by the loop, each Recorder and the reports.

    count 0 runs until stop() or the deadline (seconds); interval 0 is the tutorial's loop (the
    next probe once the last has ended), more sends on a fixed schedule, like ping and irtt.
    wall_clock is this machine's clock in ns (tests inject a shifted one), clock_state its
    kernel's; source names a mesh node; reference is an NTP server to compare clocks with.
    """
    targets: Tuple[Peer, ...] = ()
    count: int = 1  # type: ignore[assignment]  # a field, as -c names it: tuple's count() is not used
    interval: float = 0.0
    timeout: float = DEFAULT_TIMEOUT
    size: int = 0
    key: Optional[bytes] = None
    deadline: Optional[float] = None
    report_every: Optional[float] = None
    keep_samples: int = SAMPLES_KEPT
    timestamps: str = KERNEL
    path: PathOptions = DEFAULT_PATH
    protocol: str = OURS
    measuring: bool = True
    source: Optional[str] = None
    reference: Optional[Tuple[str, int]] = None
    outputs: Outputs = Outputs()
    wall_clock: Optional[Callable[[], int]] = None
    clock_state: Callable[[], ClockState] = read_clock_state

    @property
    def fleet(self) -> bool:
        """Several targets, or a mesh node's: a target that refuses is retried, not given up."""
        return len(self.targets) > 1 or self.source is not None


class LocalEnd(NamedTuple):
    """This end of a run, as its sockets have it: the marks its probes go with (TOS; TTL, the
    system's default if not set), its source address and ports, and its timestamps (KERNEL or
    USER; why not the kernel's; whether the kernel stamps the probes leaving)."""
    tos: Optional[int] = None
    ttl: Optional[int] = None
    address: Optional[str] = None
    ports: Tuple[int, ...] = (0,)
    timestamps: str = USER
    no_kernel_stamps: Optional[str] = None
    transmit_stamps: bool = False


NO_LOCAL_END = LocalEnd()


class Period(NamedTuple):
    """A stretch of a run that has ended (--report-every): its Totals, and when it ended."""
    recorder: "Recorder"
    totals: Totals
    end_wall_ns: int
    end_mono_ns: int


class Events:
    """What a run tells as it goes, to one sink: the command line's outputs and its metrics
    subclass it.  Here each is told to nobody."""

    def started(self, recorder: "Recorder") -> None:
        """A target's run begins at an address (again at the next, when nobody listened)."""

    def sample(self, sample: Sample) -> None:
        """A probe has ended: each once, in the order a target's were sent (seq)."""

    def period(self, period: Period) -> None:
        """A period of --report-every has ended."""

    def outage(self, recorder: "Recorder", outage: Outage) -> None:
        """A run of lost probes has ended (or the run did, during one)."""

    def note(self, text: str) -> None:
        """A line about the run: another address tried, a target given twice, a peer that left."""

    def tick(self, recorders: Sequence["Recorder"]) -> None:
        """Once a second, in the loop's thread: where --metrics takes its snapshots."""


NO_EVENTS = Events()


class _UnguessableIds:
    """Random ids of ID_BITS bits from the operating system's CSPRNG, as secrets draws them, a
    thousand at a time: one system call for a thousand probes.  Safe from any thread."""

    def __init__(self) -> None:
        self._pool, self._lock = collections.deque(), threading.Lock()  # type: collections.deque, Any

    def __next__(self) -> int:
        with self._lock:
            if not self._pool:
                drawn = os.urandom(8 * 1024)  # what secrets.token_bytes() reads
                self._pool.extend(int.from_bytes(drawn[start:start + 8], "big") >> (64 - ID_BITS)
                                  for start in range(0, len(drawn), 8))
            return self._pool.popleft()


_REQUEST_IDS = _UnguessableIds()  # nothing is drawn until the first probe


def _time_text() -> str:
    """'The time is <this machine's local time>', as the tutorial's client says it; the date and
    time are worked out once a second (localtime can cost a stat() of /etc/localtime)."""
    seconds, fraction = divmod(wall_ns() // 1000, 1_000_000)
    return "{}.{:06d}".format(_local_time_prefix(seconds), fraction)


def request_sizes(spec: RunSpec, family: int) -> Tuple[int, int]:
    """The size of spec's requests, and of those that ask for the server's clock state: padded
    so that any reply fits (our server never answers with more bytes), or --size, checked."""
    if spec.protocol == NTP:
        return NTP_PACKET.size, NTP_PACKET.size
    if spec.protocol == STAMP:
        least, largest = len(encode_stamp(StampPacket(0, 0, 0, 0, tlvs=stamp_tlvs(spec)), False, spec.key)), \
            MAX_UDP_PAYLOAD[family]
        if spec.size and not least <= spec.size <= largest:
            raise TimecheckError("--size must be from {} to {} bytes for STAMP (IPv{})".format(
                least, largest, 4 if family == socket.AF_INET else 6))
        return spec.size or least, spec.size or least
    keyed, options = spec.key is not None, RequestOptions(
        1, spec.path.interleaved, spec.path.tos is not None or spec.path.ttl is not None)
    largest = MAX_UDP_PAYLOAD[family]
    if spec.size and not MIN_SIZE <= spec.size <= largest:
        raise TimecheckError("--size must be from {} to {} bytes (IPv{})".format(
            MIN_SIZE, largest, 4 if family == socket.AF_INET else 6))
    return spec.size or min_request_size(spec.count or 10 ** 12, keyed=keyed, options=options), \
        spec.size or min_request_size(spec.count or 10 ** 12, keyed=keyed, clock_state=True, options=options)


def stamp_tlvs(spec: RunSpec) -> Tuple[Tuple[int, int, bytes], ...]:
    """The TLVs a STAMP probe carries: Follow-Up Telemetry, interleaved (the reflector's transmit
    stamp of its previous reply); Class of Service with --tos (the DSCP to reflect with)."""
    tlvs = [(0, TLV_FOLLOW_UP, bytes(FOLLOW_UP.size))] if spec.path.interleaved else []
    if spec.path.tos is not None:
        tlvs.append((0, TLV_CLASS_OF_SERVICE, (spec.path.tos >> 2 << 10).to_bytes(2, "big") + bytes(2)))
    return tuple(tlvs)


class Recorder:
    """The probe book of one target's run, in our protocol, as irtt's Recorder: the probes waiting
    for a reply, the ones that ended (for late, duplicate and forged replies), and where each
    probe goes as it ends.

    request() makes a probe, send() registers it, receive() matches a datagram to one,
    port_unreachable() and expire() end probes without one, next_period() closes a period,
    finish() the run.  What the probes found goes into Totals: of the whole run, and with
    reports of the current period; summarize() (reports) makes the --json object of it.  Memory
    stays flat whatever the run's length.  Each probe goes to events as it ends, in seq order.

    A reply is matched by its id, and is in time when its kernel stamp says so, however late this
    process read it.  A datagram that cannot prove it belongs (a wrong id, a bad MAC) is counted
    and changes no probe: a probe whose only reply lied ends a liar at its timeout, unless a key
    proves the lie is the server's own.  SntpRecorder overrides request(), receive() and sizes.
    """

    def __init__(self, target: str, address: str, spec: RunSpec, local: LocalEnd = NO_LOCAL_END,
                 events: Events = NO_EVENTS, name: Optional[str] = None) -> None:
        self.target, self.address, self.spec, self.local, self.events = target, address, spec, local, events
        self.name = name  # a peer's, when a targets or peers file gives one
        self.key, self.keyed, self.keep_samples = spec.key, spec.key is not None, spec.keep_samples
        self.timestamps, self.transmit_stamps = local.timestamps, local.transmit_stamps
        self.clock_state, self.timeout_ns = spec.clock_state, int(spec.timeout * NS_PER_S)
        self.request_size, self._clock_request_size = request_sizes(
            spec, socket.AF_INET6 if ":" in address else socket.AF_INET)
        self.session = next(_REQUEST_IDS)  # the server counts a session's requests: the loss split
        self.options = RequestOptions(self.session, spec.path.interleaved,
                                      spec.path.tos is not None or spec.path.ttl is not None)
        self.started_ns, self.started_mono_ns, self.duration_ns = wall_ns(), monotonic_ns(), 0
        self._wall_base = None  # type: Optional[int]  # the wall clock less the monotonic one, as the run has it
        self.totals = Totals(self.started_ns, self.started_mono_ns)
        self.period = Totals(self.started_ns, self.started_mono_ns)  # since the last next_period()
        self._active = (self.totals, self.period) if spec.report_every else (self.totals,)
        self.directions, self.marks = LossDirections(), PathMarks(local.tos, local.ttl)
        self.ports = [PortFigures(port) for port in local.ports]
        self.samples, self.probes_sent = [], 0  # type: List[Sample], int  # the first keep_samples
        self.waiting = collections.OrderedDict()  # type: collections.OrderedDict[int, Sample]  # by id, oldest first
        self._waiting_seq, self._in_order, self._next_seq = {}, {}, 0  # type: Dict[int, Sample], Dict[int, Sample], int
        self._held = collections.OrderedDict()  # type: collections.OrderedDict[int, Sample]  # by seq: awaiting T3
        self._unasked = collections.deque()  # type: collections.deque  # held seqs no request asked for yet
        recent = max(1024, RECENT_PROBES // max(1, len(spec.targets)))
        self._ended, self._ended_seq, self._legs = (RecentTable(recent) for _ in range(3))
        self.highest_seq, self.gone = -1, False  # the highest seq answered; whether the target said it left
        self.server_clock_state = None  # type: Optional[ClockState]  # the latest the server told
        self.local_clock_state = UNKNOWN_CLOCK  # this kernel's, read at the end of the run
        self.server_transmit_at_end, self.interrupted = 0, False  # answered probes no later reply could stamp
        self.stop_reason = self.last_error = None  # type: Optional[str]

    # --- what the loop calls ----------------------------------------------------------------

    def request(self, seq: int) -> Tuple[Sample, bytes]:
        """Probe number seq and its datagram; interleaved, it asks for the kernel's transmit stamp
        of the reply to an earlier probe, named by the T2 that reply carried (RFC 9769's way)."""
        request_id = next(_REQUEST_IDS)  # unguessable, unlike the tutorial's 0..1000
        ask_clock_state = seq % CLOCK_EVERY == 0
        asked = self._to_ask()
        options = self.options if asked is None else self.options._replace(exchange=asked.t2)
        data = encode_request(request_id, _time_text(), seq, size=self.spec.size, key=self.key,
                              pad_to=self._clock_request_size if ask_clock_state else self.request_size,
                              ask_clock_state=ask_clock_state, options=options)
        sample = Sample(seq, request_id, mac_of_datagram(data) if self.keyed else b"", self.target)
        sample.request, sample.request_size = data, len(data)
        sample.asks = None if asked is None else asked.seq
        return sample, data

    def send(self, sample: Sample) -> None:
        """A probe about to go: from here on it counts, whatever happens to the send."""
        self.probes_sent += 1
        self.waiting[sample.request_id] = self._waiting_seq[sample.seq] = sample
        if len(self.samples) < self.keep_samples:
            self.samples.append(sample)

    def not_sent(self, sample: Sample, error: str) -> None:
        self.count_event("errors")
        self.last_error = error
        self.end_probe(sample, LOST, NOT_SENT)

    def not_received(self) -> None:
        """A receive that failed for another reason than an ICMP refusal."""
        self.count_event("errors")

    def port_unreachable(self, sample: Optional[Sample] = None) -> None:
        """ICMP port unreachable for that probe (default: the oldest waiting): nobody listens.  A
        single run that never had an answer stops, lost; else the target is not up, not lossy
        (a mesh's late starter, a server that restarts)."""
        self.count_event("refused")
        sample = sample or next(iter(self.waiting.values()), None)
        stops = not self.spec.fleet and not self.totals.received
        if sample is not None:
            self.end_probe(sample, LOST if stops else NOT_UP, REFUSED)
        if stops:  # nobody listens: waiting tells no more
            self.stop_reason = REFUSED

    def expire(self, now_mono_ns: int) -> None:
        """End the probes whose time is up, oldest first: lost; not up, after the target said it
        left; a liar, when a lie was all that came."""
        waiting = self.waiting
        while waiting:
            sample = next(iter(waiting.values()))
            if now_mono_ns - sample.send_mono_ns < self.timeout_ns:
                break
            self.end_probe(sample, *(MISMATCHED, None) if sample.lied else (NOT_UP, GONE) if self.gone
                           else (LOST, TIMED_OUT))

    def receive(self, data: bytes, arrival: Arrival) -> None:
        """A datagram from the target: matched to its probe by id; a lie names one by its seq."""
        try:
            reply = decode_message(data)
        except WireError:
            self.count_event("malformed")  # garbage is not a liar: only a well-formed reply can lie
            return
        if reply.ext is not None and "bye" in reply.ext:
            self._goodbye(reply, data)
            return
        sample = self.waiting.get(reply.message_id)
        if self.key is None and sample is not None and data == sample.request:  # with a key: forged
            self.count_event("echoes")
            sample.reason = ECHOED  # if no real reply comes before the timeout, this is why
            return
        ended = None if sample is not None else self._ended.get(reply.message_id)
        claim = sample or ended or self._claim(reply)
        if self.key is not None and not self._authentic(reply, data, claim):
            if isinstance(claim, Sample):
                claim.reason = FORGED
            return
        if sample is not None:
            self._answered(sample, reply, data, arrival)
        elif ended is not None:
            self.count_event("late" if ended.status == LOST else "duplicates")
        else:
            self._lie(reply, data, arrival, claim)

    def next_period(self) -> Period:
        """End the current period (--report-every) and start the next; the one that ended."""
        now, now_mono = wall_ns(), monotonic_ns()
        ended = Period(self, self.period, now, now_mono)
        self.period = Totals(now, now_mono)
        self._active = (self.totals, self.period)
        return ended

    def finish(self, interrupted: bool, reason: str = INTERRUPTED) -> None:
        """The end of the run: every probe still waiting is lost, for reason (at a deadline, as
        ping -w: in flight); an answered one awaiting its kernel T3 keeps the server's own; an
        outage still going ends."""
        self.interrupted, self.local_clock_state = interrupted, self.clock_state()
        if reason == DEADLINE:
            self.stop_reason = DEADLINE
        end_mono_ns = monotonic_ns()
        self.duration_ns = end_mono_ns - self.started_mono_ns
        for sample in list(self.waiting.values()):
            self.end_probe(sample, IN_FLIGHT if reason == DEADLINE else LOST, reason)
        self.server_transmit_at_end = len(self._held)
        while self._held:
            self._close(self._held.popitem(last=False)[1])
        step_ns = int((self.spec.interval or self.spec.timeout) * NS_PER_S)
        ended = None if self.stop_reason == REFUSED else self.totals.runs.close(  # nobody listens: no outage
            min(end_mono_ns, self.totals.runs.last_send_ns + step_ns))
        if ended is not None:  # as it would have ended: a probe later
            self.events.outage(self, Outage(self._next_seq - ended[0], ended[0], ended[1], True))

    def ended_with(self, status: str) -> int:
        """How many probes ended with status: OK, LOST, IN_FLIGHT (at a deadline), NOT_UP or
        MISMATCHED (a liar's)."""
        totals = self.totals
        ended = {OK: totals.received, LOST: totals.lost, IN_FLIGHT: totals.in_flight, NOT_UP: totals.not_up}
        return ended[status] if status in ended else totals.sent - sum(ended.values())

    # --- the hooks a subclass uses ----------------------------------------------------------

    def ended_probe(self, request_id: int) -> Optional[Ended]:
        """The probe with this id, if it has ended (and is still remembered)."""
        return self._ended.get(request_id)

    def count_event(self, *names: str) -> None:
        """Count what happened (one of Totals.COUNTS each) in the run and its period."""
        for totals in self._active:
            for name in names:
                setattr(totals, name, getattr(totals, name) + 1)

    def record_arrival(self, sample: Sample, arrival: Arrival) -> None:
        """When the reply came: the kernel's T4 if plausible, else ours; then what the probe measured."""
        kernel_mode = self.timestamps == KERNEL
        user_t4 = arrival.user_t4
        t4 = arrival_ns(arrival.kernel_t4, user_t4, arrival.real_t4, user_t4 - sample.t1) \
            if kernel_mode else None
        sample.t4, sample.t4_kernel = (user_t4, False) if t4 is None else (t4, True)
        sample.t4_user, sample.recv_mono_ns = user_t4, arrival.recv_mono_ns
        sample.delayed = self._delayed(sample)
        sample.settle(kernel_mode=kernel_mode)

    def _delayed(self, sample: Sample) -> bool:
        """Whether the wall and monotonic readings around sample disagree because one came late
        (the process preempted between them), not because the clock stepped: a step still shows
        in a reading taken now, after the probe, where the one before it agreed with the run's."""
        before = sample.t1_user - sample.send_mono_ns
        after = sample.t4_user - sample.recv_mono_ns  # type: ignore[operator]
        if self._wall_base is None:  # the first probe's first reading is the run's
            self._wall_base = before
        tolerance = WALL_STEP_TOLERANCE_NS + (sample.recv_mono_ns - sample.send_mono_ns) // 1000  # type: ignore
        if abs(after - before) <= tolerance:
            self._wall_base = after
            return False
        now = clock_offset_ns(self.spec.wall_clock or wall_ns, monotonic_ns)
        stepped = abs(now - after) <= tolerance and abs(before - self._wall_base) <= tolerance
        self._wall_base = now
        return not stepped

    def in_time(self, sample: Sample, arrival: Arrival) -> bool:
        """Whether a reply arrived within its probe's timeout: by the kernel's stamp, where there
        is one, however late this process read it."""
        age = arrival.real_t4 - arrival.kernel_t4 if arrival.kernel_t4 is not None else 0
        age = age if 0 <= age <= arrival.recv_mono_ns - sample.send_mono_ns else 0
        return arrival.recv_mono_ns - age - sample.send_mono_ns < self.timeout_ns

    def end_probe(self, sample: Sample, status: str, reason: Optional[str] = None) -> None:
        """A probe's end: no longer waiting; then, unless it waits for the kernel's T3 of its
        reply (which a later reply brings, interleaved), closed."""
        if self.waiting.pop(sample.request_id, None) is None:
            return  # ended already
        del self._waiting_seq[sample.seq]
        sample.status, sample.request = status, b""
        if status not in (LOST, NOT_UP):
            sample.reason = None
        elif reason != TIMED_OUT or sample.reason is None:  # a forged reply or an echo says more
            sample.reason = reason
        self._ended.store(sample.request_id, Ended(sample.seq, status, sample.request_mac, sample.request_id))
        self._ended_seq.store(sample.seq, sample.request_id)
        if status != OK:
            self._stamp_of(sample, None)  # what it asked for will not come
        if status == OK and sample.interleaved and self.options.interleaved:
            self._held[sample.seq] = sample
            self._unasked.append(sample.seq)
            if len(self._held) > HELD_PROBES:
                self._close(self._held.popitem(last=False)[1])
        else:
            self._close(sample)

    # --- what happens to a reply and a probe ------------------------------------------------

    def _answered(self, sample: Sample, reply: Message, data: bytes, arrival: Arrival) -> None:
        """The probe's own reply: in time by its kernel stamp, or late (the probe lost)."""
        self._record(sample, reply, data, arrival)
        if not self.in_time(sample, arrival):
            self.count_event("late")
            self.end_probe(sample, LOST, TIMED_OUT)
            return
        if sample.seq < self.highest_seq:  # in the order the replies came, as irtt counts them
            self.count_event("reordered")
        self.highest_seq, self.gone = max(self.highest_seq, sample.seq), False
        self._stamp_of(sample, reply.ext)
        self.end_probe(sample, OK)

    def _lie(self, reply: Message, data: bytes, arrival: Arrival, claim: Union[Sample, Ended, None]) -> None:
        """A well-formed reply that names no probe: counted.  The probe it claims keeps waiting for
        its own, unless a key proves this lie is the server's (the tutorial's liar)."""
        self.count_event("mismatched")
        if isinstance(claim, Sample):
            claim.lied, claim.reply_id = True, reply.message_id
            if self.key is not None:
                self._record(claim, reply, data, arrival)
                self.end_probe(claim, MISMATCHED)

    def _goodbye(self, reply: Message, data: bytes) -> None:
        """The target's server says it stops: the probes after the last it answered are not lost
        but not up, as are those after, until it answers again.  Only from this session's server."""
        if reply.message_id != self.session or (self.key is not None and not mac_matches(
                self.key, BYE_LABEL, data)):
            self.count_event("forged" if self.key is not None else "mismatched")
            return
        last = reply.ext["bye"]  # type: ignore[index]
        self.gone = True
        self.events.note("{} says it has stopped (its last answer to this run: seq={}); probes from here "
                         "on are not up, not lost, until it answers again".format(self.target, last))
        for sample in [sample for sample in self.waiting.values() if sample.seq > last]:
            self.end_probe(sample, NOT_UP, GONE)

    def _claim(self, reply: Message) -> Union[Sample, Ended, None]:
        """The probe a lie answers, when its id is no probe's: by its echoed seq (a waiting Sample,
        or an Ended one), or the only one waiting; or None."""
        seq = reply.seq
        if seq is None:
            return next(iter(self.waiting.values())) if len(self.waiting) == 1 else None
        if seq in self._waiting_seq:
            return self._waiting_seq[seq]
        request_id = self._ended_seq.get(seq)
        return None if request_id is None else self._ended.get(request_id)

    def _authentic(self, reply: Message, data: bytes, claim: Union[Sample, Ended, None]) -> bool:
        """Whether the reply's MAC is right for the request it claims to answer; counts it if not."""
        if reply.mac is None:
            self.count_event("forged", "unsigned")
            return False
        if claim is None or not mac_matches(self.key, reply_context(  # type: ignore[arg-type]
                b"%d" % claim.request_id, claim.request_mac), data):
            self.count_event("forged")  # tampered with, re-addressed, or replayed
            return False
        return True

    def _record(self, sample: Sample, reply: Message, data: bytes, arrival: Arrival) -> None:
        """Keep what the reply says, and when it came."""
        sample.reply_id, sample.reply_text, sample.reply_size = reply.message_id, reply.text, len(data)
        ext = reply.ext
        if ext is not None:
            sample.t2, sample.t3 = ext.get("t2"), ext.get("t3")
            stamp = ext.get("ts")
            sample.server_stamp = stamp if stamp in (KERNEL, USER) else None
            if "clock" in ext:
                sample.server_clock_state = decode_clock_state(ext["clock"])
                self.server_clock_state = sample.server_clock_state or self.server_clock_state
            sample.server_count, sample.interleaved = ext.get("rx"), ext.get("xl") == 1
            sample.server_marks = (ext.get("tos"), ext.get("ttl"))
        sample.marks_back = (arrival.tos, arrival.ttl)
        self.record_arrival(sample, arrival)

    def _to_ask(self) -> Optional[Sample]:
        """The oldest answered probe still awaiting its kernel T3 that no request has asked for."""
        while self._unasked:
            sample = self._held.get(self._unasked.popleft())
            if sample is not None:
                return sample
        return None

    def _stamp_of(self, sample: Sample, ext: Optional[Dict[str, Any]]) -> None:
        """What sample's request asked for: the kernel's transmit stamp of an earlier probe's reply
        (interleaved).  It is taken only for that exact exchange (xs, its seq, as asked) and within
        the round trip that probe waited; either way that probe is then closed."""
        asked = self._held.pop(sample.asks, None) if sample.asks is not None else None
        if asked is None:
            return
        stamp = ext.get("xt") if ext is not None and ext.get("xs") == asked.seq else None
        if stamp is not None and asked.t3 <= stamp and stamp - asked.t2 <= asked.raw_rtt_ns:
            asked.t3, asked.t3_kernel = stamp, True
            asked.settle(kernel_mode=self.timestamps == KERNEL)
        elif stamp is not None:
            asked.t3_rejected = True  # it disagrees with the server's own clock: not taken
        self._close(asked)

    def _close(self, sample: Sample) -> None:
        """A probe's figures, final: into the totals, the first samples, the writers; then, in the
        order the probes went, to events, the loss by direction and the outages."""
        neighbours = self._neighbours(sample) if sample.status == OK else ()
        for totals in self._active:
            totals.tally(sample, neighbours, kernel_mode=self.timestamps == KERNEL,
                         transmit_stamps=self.transmit_stamps)
        if sample.status in (OK, LOST):
            self.ports[sample.port].add(sample.status, sample.rtt_ns)
        if sample.status == OK:
            self.marks.add(sample.seq, sample.t1, sample.port, sample.server_marks, sample.marks_back)
        self._in_order[sample.seq] = sample
        while self._next_seq in self._in_order:
            self._in_turn(self._in_order.pop(self._next_seq))
            self._next_seq += 1

    def _in_turn(self, sample: Sample) -> None:
        """A probe, in the order they went: to events; its runs of lost probes (outages), and the
        leg that lost it."""
        self.events.sample(sample)
        status = sample.status
        if status not in (OK, LOST, MISMATCHED):
            return
        self.directions.add(status == LOST, sample.server_count)
        if status == MISMATCHED or sample.reason == INTERRUPTED:  # a stop is no outage
            return
        for totals in self._active:
            ended = totals.runs.add(status == LOST, sample.send_mono_ns)
            if ended is not None and totals is self.totals:
                self.events.outage(self, Outage(sample.seq - ended[0], ended[0], ended[1]))

    def _neighbours(self, sample: Sample) -> List[Legs]:
        """The probes numbered next to an answered one that were answered before it."""
        found = [legs for legs in (self._legs.get(sample.seq - 1), self._legs.get(sample.seq + 1))
                 if legs is not None]
        self._legs.store(sample.seq, legs_of(sample, sample.timing))  # type: ignore[arg-type]  # answered
        return found


class SntpRecorder(Recorder):
    """A Recorder for an NTP server's replies: matched by their origin timestamp (our nonce),
    checked as RFC 4330 says, and refused (lost, with the reason) when unusable."""

    def __init__(self, target: str, address: str, spec: RunSpec, local: LocalEnd = NO_LOCAL_END,
                 events: Events = NO_EVENTS, name: Optional[str] = None) -> None:
        super().__init__(target, address, spec, local, events, name)
        self.problems = collections.Counter()  # type: collections.Counter  # unusable replies, by why
        self.kissed = False  # a kiss-o'-death ended the run

    def request(self, seq: int) -> Tuple[Sample, bytes]:
        nonce = next(_REQUEST_IDS) or 1  # unguessable: an off-path forger cannot echo it
        data = encode_ntp_request(nonce)
        sample = Sample(seq, nonce, target=self.target)
        sample.request, sample.request_size = data, len(data)
        return sample, data

    def receive(self, data: bytes, arrival: Arrival) -> None:
        try:
            reply = decode_ntp(data, arrival.user_t4)
        except WireError:
            self.count_event("malformed")
            return
        sample = self.waiting.get(reply.origin)
        if sample is None:  # a wrong origin: stale, or spoofed; or late, or a duplicate
            ended = self.ended_probe(reply.origin)
            self.count_event("mismatched" if ended is None else
                             "late" if ended.status == LOST else "duplicates")
            return
        sample.ntp, sample.reply_size = reply, len(data)
        problem = ntp_problem(reply)
        if problem is not None:  # reported, and the sample not used
            self.problems[problem] += 1
            if is_kiss(reply):  # RFC 4330: stop, or at least slow down
                self.kissed, self.stop_reason = True, problem  # we stop
            self.end_probe(sample, LOST, problem)
            return
        sample.t2, sample.t3 = reply.receive_ns, reply.transmit_ns
        self.record_arrival(sample, arrival)
        if not self.in_time(sample, arrival):
            self.count_event("late")
            self.end_probe(sample, LOST, TIMED_OUT)
            return
        self.end_probe(sample, OK)


class StampRecorder(Recorder):
    """A Recorder for a STAMP Session-Reflector (RFC 8762): a probe is a Session-Sender test
    packet, its reflection matched by the seq and the timestamp it carried (an off-path forger
    knows neither), and, with a key, its HMAC.  T2 and T3 come from the reflection, a later
    one's Follow-Up Telemetry brings the kernel's T3.  The loss split needs a stateful reflector,
    and one proves it is only when its seq differs from ours (a stateless one copies ours)."""

    def __init__(self, target: str, address: str, spec: RunSpec, local: LocalEnd = NO_LOCAL_END,
                 events: Events = NO_EVENTS, name: Optional[str] = None) -> None:
        super().__init__(target, address, spec, local, events, name)
        self.ssid = self.session & 0xFFFF or 1  # RFC 8972's session id: 0 is not one
        self.tlvs, self._error = stamp_tlvs(spec), 0
        self.directions.proven = False
        self._reflected = RecentTable(HELD_PROBES * 4)  # the reflector's seq -> ours (Follow-Up Telemetry)

    def request(self, seq: int) -> Tuple[Sample, bytes]:
        if seq % CLOCK_EVERY == 0:  # this machine's error estimate, from its kernel's clock state
            state = self.clock_state()
            self._error = encode_error_estimate(state.synchronized, state.maxerror_ns)
        timestamp = ns_to_ntp((self.spec.wall_clock or wall_ns)())
        wire_seq = seq & 0xFFFFFFFF
        data = encode_stamp(StampPacket(wire_seq, timestamp, self._error, self.ssid, tlvs=self.tlvs), False,
                            self.key, self.request_size)
        sample = Sample(seq, wire_seq << 64 | timestamp, target=self.target)  # what its reflection echoes
        sample.request, sample.request_size = data, len(data)
        return sample, data

    def receive(self, data: bytes, arrival: Arrival) -> None:
        try:
            reply = decode_stamp(data, True, self.key)
        except WireError:
            self.count_event("forged" if self.key is not None else "malformed")
            return
        request_id = reply.sender_seq << 64 | reply.sender_timestamp
        sample = self.waiting.get(request_id) or self._rounded(reply)
        if sample is None:  # stale, spoofed, late or a duplicate: the probe waits on for its own
            ended = self.ended_probe(request_id)
            self.count_event("mismatched" if ended is None else
                             "late" if ended.status == LOST else "duplicates")
            return
        follow_up = self._record_reflection(sample, reply, len(data), arrival)
        if not self.in_time(sample, arrival):
            self.count_event("late")
            self.end_probe(sample, LOST, TIMED_OUT)
            return
        if sample.seq < self.highest_seq:
            self.count_event("reordered")
        self.highest_seq = max(self.highest_seq, sample.seq)
        self._stamp_of(sample, follow_up)
        self.end_probe(sample, OK)
        self._unasked.clear()  # a reflector stamps its previous reply: nothing to ask for

    def _rounded(self, reply: StampPacket) -> Optional[Sample]:
        """The waiting probe of the reflection's seq, when the timestamp it reflects is within
        STAMP_ROUNDING of the one sent: a reflector that converts timestamps may round them."""
        sample = self._waiting_seq.get(reply.sender_seq)  # seqs below 2**32; above, only an exact match
        sent = sample.request_id & (1 << 64) - 1 if sample is not None else None
        return sample if sent is not None and abs(sent - reply.sender_timestamp) <= STAMP_ROUNDING else None

    def _record_reflection(self, sample: Sample, reply: StampPacket, size: int,
                           arrival: Arrival) -> Optional[Dict[str, Any]]:
        """What the reflection says; the Follow-Up Telemetry of an earlier probe's, as our
        interleaved replies carry it (xs, xt), or None."""
        near = arrival.user_t4
        sample.reply_id, sample.reply_size = sample.request_id, size
        sample.t2, sample.t3 = ntp_to_ns(reply.receive, near), ntp_to_ns(reply.timestamp, near)
        synchronized, error_ns = decode_error_estimate(reply.error)
        self.server_clock_state = ClockState(synchronized, error_ns, None, None, STAMP_ESTIMATE)
        sample.server_clock_state = self.server_clock_state
        if reply.seq != reply.sender_seq:
            self.directions.proven = True
        sample.server_count = reply.seq + 1  # a stateful reflector's count of the session's packets
        tlvs = {kind: value for flags, kind, value in reply.tlvs if not flags & TLV_UNRECOGNIZED}
        cos = tlvs.get(TLV_CLASS_OF_SERVICE, b"")
        word = int.from_bytes(cos[:2], "big") if len(cos) >= 4 else None
        sample.server_marks = (None if word is None else (word >> 4 & 0x3F) << 2 | word >> 2 & 3,
                               reply.sender_ttl or None)
        sample.marks_back = (arrival.tos, arrival.ttl)
        self.record_arrival(sample, arrival)
        follow_up = tlvs.get(TLV_FOLLOW_UP, b"")
        sample.interleaved = len(follow_up) >= FOLLOW_UP.size
        self._reflected.store(reply.seq, sample.seq)
        if not sample.interleaved:
            return None
        seq, stamp, _ = FOLLOW_UP.unpack_from(follow_up)
        earlier = self._reflected.get(seq) if stamp else None
        sample.asks = earlier
        return None if earlier is None else {"xs": earlier, "xt": ntp_to_ns(stamp, near)}


class Channel:
    """A socket of a run.  Where the kernel names the destination an ICMP error is about (Linux:
    IP_RECVERR), one socket a family and source port serves every target, as fping's does, and
    replies are told apart by their source; elsewhere each target has its own, connected."""

    def __init__(self, family: int, spec: RunSpec, stack: contextlib.ExitStack,
                 target: Optional["Target"] = None) -> None:
        self.sock = sock = stack.enter_context(socket.socket(family, socket.SOCK_DGRAM))
        self.target = target  # the one target of a connected socket; None: shared
        path = spec.path
        try:
            if path.source is not None or target is None:  # shared: its port now, not at the first send
                sock.bind((path.source or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))
            set_marks(sock, path.tos, path.ttl)
            if path.tos is not None or path.ttl is not None:
                enable_path_marks(sock)  # the marks the replies come back with
            if target is not None:
                sock.connect(target.address)  # replies from anyone else are dropped by the kernel
        except OSError as exc:
            raise TimecheckError("cannot reach {}{}: {}".format(
                target.label if target is not None else "the targets",
                " from " + path.source if path.source else "", exc.strerror or exc)) from None
        sock.setblocking(False)
        if target is None:  # one socket's room for the replies of every target: a stall loses none
            enlarge_receive_buffer(sock, min(RECEIVE_BUFFER_MAX,
                                             RECEIVE_BUFFER_PER_TARGET * len(spec.targets)))
        self.recvmsg = message_calls(sock)[0]
        self.no_kernel_stamps = kernel_stamps_refused(sock) if spec.timestamps == KERNEL else None
        self.kernel = spec.timestamps == KERNEL and self.no_kernel_stamps is None
        self.errors = ErrorQueue(sock, every=self.kernel, refusals=target is None)

    def send(self, data: bytes, address: tuple) -> None:
        if self.target is None:
            self.sock.sendto(data, address)
        else:
            self.sock.send(data)  # a BSD refuses sendto on a connected socket (EISCONN)


SHARED_CHANNELS = LINUX and IP_RECVERR is not None  # one socket for every target, as fping's


class Target:
    """One target of a run: where it is (its addresses, tried in turn while nobody listens at
    one), the Recorder of the run at its current address, and when its next probe is due."""

    def __init__(self, peer: Peer, spec: RunSpec) -> None:
        self.peer, self.name = peer, peer.name
        port = peer.port or PROTOCOL_PORTS[spec.protocol]
        self.addresses = resolve(peer.host, port, wanted=spec.path.family)
        self.label = format_address(peer.host.strip("[]"), port)
        self.index, self.next_ns, self.stopped = 0, 0, False
        self.recorder = None  # type: Optional[Recorder]
        request_sizes(spec, self.family)  # --size against this family's largest datagram: a usage error now

    @property
    def run(self) -> Recorder:
        """The Recorder of its run, once that has begun."""
        if self.recorder is None:
            raise RuntimeError("{}: no run has begun".format(self.label))
        return self.recorder

    @property
    def family(self) -> int:
        return self.addresses[self.index][0]

    @property
    def address(self) -> tuple:
        return self.addresses[self.index][1]

    def key(self) -> Tuple[str, int]:
        """The (host, port) its replies come from, as recvmsg says it."""
        return self.address[0], self.address[1]


class Measurement:
    """The one loop of a run: every target of spec probed on its own schedule (its first probe
    spread across the interval), from one thread; run() returns each target's Recorder, and
    events hears what happens as it does.  One target is a run of one.

    A probe's figures come from the kernel's stamps where it gives them, never from when this
    loop happened to run: every reply already queued is read before any probe's time is up.
    """

    def __init__(self, spec: RunSpec, events: Events = NO_EVENTS) -> None:
        self.spec, self.events = spec, events
        self.targets = self._distinct([Target(peer, spec) for peer in spec.targets])
        self.clock = KernelClock(spec.wall_clock)
        self._stopping = False
        self._waker = []  # type: List[socket.socket]  # a socket pair: stop() wakes the loop
        self._channels = {}  # type: Dict[object, Channel]  # (family, port) or (target, port) -> its socket
        self._owners = {}  # type: Dict[Tuple[str, int], Target]  # where replies come from -> its target
        self._due = []  # type: List[Tuple[int, int, Target]]  # a heap of (when, order, target)
        self._wakes = {}  # type: Dict[Target, int]  # when each target not done is due
        self._order = itertools.count()
        self._touched = set()  # type: set  # targets a datagram or a refusal changed: stepped at once
        self._selector = None  # type: Optional[selectors.BaseSelector]
        self._stack = None  # type: Optional[contextlib.ExitStack]

    def stop(self) -> None:
        """End the run soon, with what it has; safe in a signal handler, and to call again."""
        self._stopping = True
        try:
            self._waker[1].send(b"\0")
        except (OSError, IndexError):
            pass  # no run yet, or its end is already on the way

    def run(self) -> List[Recorder]:
        with contextlib.ExitStack() as stack, selectors.DefaultSelector() as selector:
            self._stack, self._selector = stack, selector
            self._waker = [stack.enter_context(end) for end in socket.socketpair()]
            for end in self._waker:
                end.setblocking(False)
            selector.register(self._waker[0], selectors.EVENT_READ)
            started = monotonic_ns()
            _make_room_for(len(self.targets) * self.spec.path.ports * (not SHARED_CHANNELS) + 8)
            spread_ns = int(self.spec.interval * NS_PER_S)
            for index, target in enumerate(self.targets):
                self._begin(target, started + spread_ns * index // len(self.targets))
            try:
                reason = self._loop(started)
            except (KeyboardInterrupt, BrokenPipeError):  # SIGINT's default; stdout's reader gone
                self._stopping, reason = True, INTERRUPTED
            for target in self.targets:
                target.run.finish(self._stopping, reason)
            self._waker = []
        return [target.run for target in self.targets]

    # --- the loop ---------------------------------------------------------------------------

    def _loop(self, started: int) -> str:
        """Step each target when it is due, read every reply as it comes, until all are done;
        returns why the probes still waiting end.  When each target is due is kept in a heap."""
        spec, now = self.spec, started
        deadline = started + int(spec.deadline * NS_PER_S) if spec.deadline else None
        report_ns = int(spec.report_every * NS_PER_S) if spec.report_every else None
        next_report, next_tick = started + (report_ns or 0), started + NS_PER_S
        while self._wakes and not self._stopping:
            # A report due before the deadline comes, however late a stall makes it, and once
            # for a stall however long (that period ends when the stall does).
            if report_ns is not None and now >= next_report and (deadline is None or next_report < deadline):
                next_report += report_ns * ((now - next_report) // report_ns + 1)
                for target in self.targets:
                    self.events.period(target.run.next_period())
            if deadline is not None and now >= deadline:
                return DEADLINE
            if now >= next_tick:
                next_tick = now + NS_PER_S
                self.events.tick([target.run for target in self.targets])
            wake = self._step_due(now)
            if wake is None:
                break
            now = self._wait(min(at for at in (deadline, next_report if report_ns else None, next_tick, wake)
                                 if at is not None))
        return INTERRUPTED

    def _step_due(self, now: int) -> Optional[int]:
        """Step the targets due by now, then read the transmit stamps of what they sent; when the
        next is due, or None when all are done."""
        due, used = self._due, {}  # type: List[Tuple[int, int, Target]], Dict[Channel, int]
        while due and due[0][0] <= now:
            wake, _, target = heapq.heappop(due)
            if self._wakes.get(target) == wake:  # else stale: its wake moved since
                for channel in self._step(target, now):
                    used[channel] = used.get(channel, 0) + 1
        for channel, sent in used.items():  # as many stamps as datagrams: no read that finds none
            self._read_errors(channel, most=sent)
        while due and self._wakes.get(due[0][2]) != due[0][0]:
            heapq.heappop(due)
        return due[0][0] if due else None

    def _step(self, target: Target, now: int) -> List[Channel]:
        """Expire what timed out, send what is due, and note when to look again; a channel a probe sent."""
        recorder, spec, used = target.run, self.spec, []  # type: Recorder, RunSpec, List[Channel]
        recorder.expire(now)
        interval_ns = int(spec.interval * NS_PER_S)
        while self._may_send(target) and now >= target.next_ns and recorder.stop_reason is None:
            used.append(self._send(target, recorder))
            behind = now - target.next_ns > max(NS_PER_S, recorder.timeout_ns)  # asleep: no burst after
            target.next_ns = now if behind or not interval_ns else target.next_ns + interval_ns
            if not interval_ns:
                break
        self._switch_if_refused(target)
        recorder = target.run
        sending = self._may_send(target)
        if recorder.stop_reason is not None or not (sending or recorder.waiting):
            self._wakes.pop(target, None)
            return used
        wake = target.next_ns if sending else now + recorder.timeout_ns
        if recorder.waiting:
            wake = min(wake, next(iter(recorder.waiting.values())).send_mono_ns + recorder.timeout_ns)
        self._wakes[target] = wake
        heapq.heappush(self._due, (wake, next(self._order), target))
        return used

    def _may_send(self, target: Target) -> bool:
        recorder, count = target.run, self.spec.count
        return not target.stopped and (not count or recorder.probes_sent < count) and bool(
            self.spec.interval or not recorder.waiting)

    def _send(self, target: Target, recorder: Recorder) -> Channel:
        """One probe: its request, registered, then sent, T1 read right before the send."""
        sample, data = recorder.request(recorder.probes_sent)
        sample.port = sample.seq % self.spec.path.ports  # round robin over the source ports (ECMP)
        channel = self._channel(target, sample.port)
        recorder.send(sample)  # registered before it goes: a stop from here on still counts it
        wall_clock, address = self.clock.wall_clock, target.address
        sample.send_mono_ns = monotonic_ns()  # the monotonic reading first, T1 right before the send
        sample.t1 = sample.t1_user = wall_clock()
        try:
            channel.send(data, address)
        except (ConnectionRefusedError, ConnectionResetError):  # an earlier datagram's ICMP error
            self._refused_earlier(channel, target, sample, data)
        except OSError as exc:  # no route, a firewall...: like ping, sent and lost
            recorder.not_sent(sample, exc.strerror or str(exc))
            channel.errors.recount()
        else:
            if channel.kernel:
                channel.errors.sent(sample, sample.t1 - self.clock.offset_ns)
        return channel

    def _refused_earlier(self, channel: Channel, target: Target, sample: Sample, data: bytes) -> None:
        """A send that failed for an earlier datagram's refusal: a connected socket's was this
        target's; a shared one names it on its error queue, and this probe goes again."""
        if channel.target is not None:
            target.run.port_unreachable(sample)
            return
        self._read_errors(channel)
        try:
            channel.send(data, target.address)
        except OSError as exc:
            target.run.not_sent(sample, exc.strerror or str(exc))
            channel.errors.recount()
        else:
            if channel.kernel:
                channel.errors.sent(sample, sample.t1 - self.clock.offset_ns)

    def _wait(self, until_ns: int) -> int:
        """Wait until until_ns for datagrams, read every one that came, and step the targets they
        matter to; returns the time all that was queued by came in (a probe's end is judged by it)."""
        selector = self._selector
        ready = selector.select(max(0, until_ns - monotonic_ns()) / NS_PER_S)  # type: ignore[union-attr]
        now = monotonic_ns()
        if self._due and self._due[0][0] <= now:  # an end is due: what came before now, read first
            ready += selector.select(0)  # type: ignore[union-attr]
        for key in {key: None for key, _ in ready}:  # each once: the second look may see it again
            if key.data is None:  # the waker: stop() was called
                self._waker[0].recv(64)
            else:
                self._drain(key.data)
        touched, self._touched = self._touched, set()
        for target in touched:  # what a reply or a refusal changes: the tutorial's loop, an end
            if target in self._wakes:
                self._wakes[target] = now
                heapq.heappush(self._due, (now, next(self._order), target))
        return now

    def _drain(self, channel: Channel) -> None:
        """Every datagram queued on channel, each to its target (touched: to be stepped now)."""
        clock, got = self.clock, False
        for _ in range(MAX_DRAINED):
            try:
                data, ancillary, _, source = channel.recvmsg(MAX_DATAGRAM, ANCILLARY_SPACE)
                user_t4 = clock.wall_clock()  # the wall clock, then the monotonic one: T4 - T1 spans within
                recv_mono_ns = monotonic_ns()
            except BlockingIOError:
                break
            except (ConnectionRefusedError, ConnectionResetError):  # port unreachable (Windows: reset)
                self._refusal(channel)
                continue
            except OSError:
                if channel.target is not None and channel.target.recorder is not None:
                    channel.target.recorder.not_received()
                break
            target = channel.target or self._owners.get((source[0], source[1]))
            if target is None or target.recorder is None:
                continue  # from nobody this run sends to: a shared socket is not connected
            kernel_t4, tos, ttl = None, None, None
            if ancillary:
                kernel_t4 = read_ancillary(ancillary)[0]
                tos, ttl = read_marks(ancillary) if target.recorder.options.path else (None, None)
            target.recorder.receive(data, Arrival(kernel_t4, user_t4, user_t4 - clock.offset_ns, recv_mono_ns,
                                                  tos, ttl))
            self._touched.add(target)
            got = True
            if not target.recorder.waiting and len(self.targets) == 1:
                break  # nothing more is due: no read that finds nothing (a straggler wakes the poll)
        if not got or channel.errors.waiting():  # woken for the error queue, or stamps still due
            self._read_errors(channel)

    def _refusal(self, channel: Channel) -> None:
        """ICMP port unreachable: on a connected socket, its target's; else the error queue names it."""
        if channel.target is not None:
            if channel.target.recorder is not None:
                channel.target.recorder.port_unreachable()
                self._touched.add(channel.target)
        else:
            self._read_errors(channel)

    def _read_errors(self, channel: Channel, most: int = ERROR_QUEUE_READS) -> None:
        """The transmit stamps that came (T1 from the kernel, on our clock) and the refusals."""
        if not (channel.errors.stamps or channel.errors.refusals):
            return
        stamps, refused = channel.errors.read(most)
        for sample, stamp_ns in stamps if self.clock.usable else ():
            if sample.recv_mono_ns is None:  # type: ignore[attr-defined]  # not settled without it
                sample.t1, sample.t1_kernel = stamp_ns + self.clock.offset_ns, True  # type: ignore[attr-defined]
        for address in refused:
            target = self._owners.get((address[0], address[1]))
            if target is not None and target.recorder is not None:
                target.recorder.port_unreachable()
                self._touched.add(target)

    # --- targets, their channels and their addresses ------------------------------------------

    def _begin(self, target: Target, first_ns: int) -> None:
        """A target's run at its current address: its channels and its Recorder; due at first_ns."""
        spec = self.spec
        channels = [self._channel(target, port) for port in range(spec.path.ports)]
        local = LocalEnd(spec.path.tos, spec.path.ttl if spec.path.ttl is not None else default_ttl(
            channels[0].sock), source_address(target.family, target.address, spec.path.source),
            tuple(channel.sock.getsockname()[1] for channel in channels),
            KERNEL if all(channel.kernel for channel in channels) else USER,
            next(filter(None, (channel.no_kernel_stamps for channel in channels)), None),
            all(channel.kernel and channel.errors.stamps for channel in channels))
        recorder_class = {NTP: SntpRecorder, STAMP: StampRecorder}.get(spec.protocol, Recorder)
        target.recorder = recorder_class(target.label, address_text(target.address), spec, local, self.events,
                                         target.name)
        self._owners[target.key()] = target
        target.next_ns = first_ns
        self._wakes[target] = first_ns
        heapq.heappush(self._due, (first_ns, next(self._order), target))
        self.events.started(target.recorder)
        if self._stopping:
            self.stop()

    def _channel(self, target: Target, port: int) -> Channel:
        """The socket target's probes from source port number port go through, opened when first needed."""
        key = (target.family, port) if SHARED_CHANNELS else (target, target.index, port)  # type: object
        channel = self._channels.get(key)
        if channel is None:
            channel = Channel(target.family, self.spec, self._stack,  # type: ignore[arg-type]
                              None if SHARED_CHANNELS else target)
            self._channels[key] = channel
            self._selector.register(channel.sock, selectors.EVENT_READ, channel)  # type: ignore[union-attr]
        return channel

    def _switch_if_refused(self, target: Target) -> None:
        """A name with several addresses (localhost: ::1, then 127.0.0.1) is tried at the next when
        nobody listens at this one, before any answer; the run there starts anew."""
        recorder = target.run
        if recorder.stop_reason != REFUSED or recorder.totals.received \
                or target.index + 1 >= len(target.addresses):
            return
        self.events.note("nobody listens at {} (connection refused); trying {}".format(
            format_address(*target.address[:2]), target.addresses[target.index + 1][1][0]))
        self._owners.pop(target.key(), None)
        target.index += 1
        self._begin(target, monotonic_ns())

    def _distinct(self, targets: List[Target]) -> List[Target]:
        """The targets, each (host, port) once, after resolution: a second is merged into the first,
        with a note; their replies could not be told apart, nor their metrics."""
        first = {}  # type: Dict[Tuple[str, int], Target]
        for target in targets:
            if target.key() in first:
                self.events.note("{} is given twice{}: measured once".format(
                    target.label, "" if target.name is None else " (as {})".format(printable(target.name))))
            else:
                first[target.key()] = target
        return list(first.values())


def _make_room_for(sockets: int) -> None:
    """Room for that many more sockets under RLIMIT_NOFILE: the soft limit raised toward the hard
    one where needed; a usage error when even that is not enough, said before any probe goes."""
    try:
        import resource
    except ImportError:  # Windows: no such limit; its select() takes 512 sockets
        if sockets > 500:
            raise TimecheckError("{} sockets are needed (a target and source port each), and this "
                                 "platform can wait on 500: fewer targets or --ports".format(
                                     sockets)) from None
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = sockets + len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else sockets + 64
    if needed <= soft:
        return
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise TimecheckError("{} file descriptors are needed (a target and source port each), and the "
                             "limit is {} (ulimit -Hn): fewer targets or --ports".format(needed, hard))
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard))


class Prober:
    """One target measured as a run of one: Prober(host, port, count=..., ...) takes RunSpec's
    fields; run() returns its Recorder, stop() ends it early (from a signal handler too)."""

    protocol = OURS

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, events: Events = NO_EVENTS,
                 **spec: Any) -> None:
        self.spec = RunSpec(targets=(Peer(None, host, port),), protocol=self.protocol, **spec)
        self.measurement = Measurement(self.spec, events)

    @property
    def target(self) -> str:
        return self.measurement.targets[0].label

    @property
    def recorder(self) -> Optional[Recorder]:
        """The run's Recorder, once it has begun (read from another thread, as it goes)."""
        return self.measurement.targets[0].recorder

    def run(self) -> Recorder:
        return self.measurement.run()[0]

    def stop(self) -> None:
        self.measurement.stop()


class SntpProber(Prober):
    """Queries an NTP server (SNTPv4, RFC 4330) with the run's loop, kernel timestamps and
    statistics: this machine's clock against the server's, per query and at best."""

    protocol = NTP

    def __init__(self, host: str, port: int = NTP_PORT, events: Events = NO_EVENTS, **spec: Any) -> None:
        super().__init__(host, port, events, **spec)


class Reference:
    """This machine's clock against an NTP server, alongside a measurement, from a thread: a
    burst of REFERENCE_BURST queries, then one every `every` seconds until stop().

    It lives as long as the run: a query that fails (unreachable, no file descriptor
    left, a name that no longer resolves) is counted, with why, and the next comes at
    the next interval.  The verdict comes from the best of the last REFERENCE_KEPT
    usable answers, as NTP's clock filter keeps its samples, and is stale when the
    last usable answer is older than the interval.
    """

    def __init__(self, host: str, port: int, *, wall_clock: Optional[Callable[[], int]] = None,
                 timestamps: str = KERNEL, every: float = REFERENCE_EVERY) -> None:
        self._options = {"wall_clock": wall_clock, "timestamps": timestamps,
                         "timeout": DEFAULT_TIMEOUT}  # type: Dict[str, Any]
        # Resolved now: a bad name is a usage error.  None later, when it no longer resolves.
        self.prober = SntpProber(host, port, NO_EVENTS, count=REFERENCE_BURST, interval=REFERENCE_SPACING,
                                 **self._options)  # type: Optional[SntpProber]
        self.host, self.port, self.every = host, port, every
        self.answers = collections.deque(maxlen=REFERENCE_KEPT)  # type: collections.deque  # (when, Sample)
        self.problems = collections.Counter()  # type: collections.Counter  # unusable answers, errors
        self.queries = self.failed = 0
        self._stopping, self._burst_done = threading.Event(), threading.Event()
        self._thread = None  # type: Optional[threading.Thread]

    @property
    def best(self) -> Optional[Sample]:
        """The usable answer of least error among the last REFERENCE_KEPT."""
        return min((sample for _, sample in self.answers), key=operator.attrgetter("offset_err_ns"),
                   default=None)

    def start(self) -> "Reference":
        self._thread = _thread(self._run, "udp-timecheck-reference")
        return self

    def stop(self, finish_burst: bool = False) -> None:
        """Stop querying; with finish_burst, after the first burst, so that a short run still has
        REFERENCE_BURST queries to choose from."""
        if finish_burst:
            self._burst_done.wait(REFERENCE_BURST * REFERENCE_SPACING + DEFAULT_TIMEOUT + 1)
        self._stopping.set()
        prober = self.prober
        if prober is not None:
            prober.stop()
        if self._thread is not None:
            self._thread.join(timeout=DEFAULT_TIMEOUT + 5)

    def result(self, summary: Mapping) -> Dict[str, Any]:
        """The JSON's "reference": this machine and the server against the reference, from the
        best answer and the best probe (the offsets are null when either has none), and how the
        queries went."""
        best = self.best
        reply = best and best.ntp
        age = time.monotonic() - self.answers[-1][0] if self.answers else None
        result = {"host": format_address(self.host.strip("[]"), self.port),
                  "stratum": reply and reply.stratum,
                  "refid": reply and describe_refid(reply.stratum, reply.refid),
                  "problems": dict(self.problems), "queries": self.queries, "failed": self.failed,
                  "last_answer_age_s": None if age is None else round(age, 3),
                  "stale": age is not None and age > self.every,
                  "local_offset_ms": None, "local_offset_err_ms": None,
                  "server_offset_ms": None, "server_offset_err_ms": None}
        offset, error = (best.offset_ns, best.offset_err_ns) if best is not None else (None, None)
        if offset is not None and error is not None:
            result.update(local_offset_ms=_ms(-offset), local_offset_err_ms=_ms(error))
            if summary["offset_ms"] is not None:
                result.update(compare_clocks(summary["offset_ms"], summary["offset_err_ms"], offset / 1e6,
                                             error / 1e6))
        return result

    def _run(self) -> None:
        while not self._stopping.is_set():
            recorder = self._query()
            self._burst_done.set()
            if isinstance(recorder, SntpRecorder) and recorder.kissed:  # RFC 4330: stop, or slow down
                return
            if self._stopping.wait(self.every):
                return
            self.prober = self._new_prober()

    def _query(self) -> Optional[Recorder]:
        """Run the current prober; what it found is kept, and a failure counted with why."""
        prober, self.queries = self.prober, self.queries + 1
        if prober is None:  # the name did not resolve this time
            self.failed += 1
            return None
        try:
            recorder = prober.run()
        except (TimecheckError, OSError) as exc:  # no route, EMFILE...: the next interval tries again
            self.failed += 1
            self.problems[_why(exc)] += 1
            return None
        self._keep(recorder)
        self.failed += not recorder.totals.received
        return recorder

    def _keep(self, recorder: Recorder) -> None:
        """A query's usable answers, for the verdict; why each other one failed, counted."""
        for sample in recorder.samples:
            if sample.status == LOST and sample.reason != INTERRUPTED:
                why = {NOT_SENT: recorder.last_error,  # no route...: say which
                       TIMED_OUT: "no reply within {:g} s".format(DEFAULT_TIMEOUT)}.get(sample.reason or "")
                self.problems[why or sample.reason] += 1
            elif sample.status == OK and sample.timing is not None and sample.timing.trusted:
                self.answers.append((time.monotonic(), sample))

    def _new_prober(self) -> Optional["SntpProber"]:
        """A prober for one query, resolving the name again; None (counted) when it does not."""
        try:
            return SntpProber(self.host, self.port, NO_EVENTS, count=1, **self._options)
        except TimecheckError as exc:
            self.problems[str(exc)] += 1
            return None


# ----------------------------------------------------------------------------------------------
# 7. Reports: summary dicts, text, Prometheus, SVG
# ----------------------------------------------------------------------------------------------

def sample_record(sample: Sample) -> Dict[str, Any]:
    """One probe as the JSON's samples, --csv and --jsonl have it (SAMPLE_FIELDS, in order)."""
    timing = sample.timing
    return {"seq": sample.seq, "sent_at": iso_utc(sample.t1), "id": sample.request_id,
            "status": sample.status,
            "rtt_ms": _ms(sample.rtt_ns), "raw_rtt_ms": _ms(sample.raw_rtt_ns),
            "server_proc_ms": _ms(sample.server_proc_ns), "offset_ms": _ms(sample.offset_ns),
            "offset_err_ms": _ms(sample.offset_err_ns), "reply_id": sample.reply_id,
            "lost_because": sample.reason,
            "t1_ns": sample.t1, "t2_ns": sample.t2, "t3_ns": sample.t3, "t4_ns": sample.t4,
            "t1_from": KERNEL if sample.t1_kernel else USER, "t4_from": KERNEL if sample.t4_kernel else USER,
            "t3_from": None if sample.t3 is None else (KERNEL if sample.t3_kernel else USER),
            "port": sample.port,
            "timestamps": None if timing is None else (KERNEL if timing.kernel else USER),
            "server_timestamps": sample.server_stamp,
            "trusted": None if timing is None else timing.trusted,
            "untrusted_because": None if timing is None else timing.untrusted_because,
            "target": sample.target}


SAMPLE_FIELDS = tuple(sample_record(Sample(0, 0)))  # the CSV's columns: a field added there is one here


def run_record(recorder: Recorder) -> Dict[str, Any]:
    """The run's settings, first in the JSON: what was asked for, when, and how."""
    record = {"version": __version__, "started_at": iso_utc(recorder.started_ns),
              "duration_s": round(recorder.duration_ns / NS_PER_S, 6)}
    spec = recorder.spec
    record.update(count=spec.count, interval=spec.interval, timeout=spec.timeout, size=spec.size or None,
                  interleaved=spec.path.interleaved, request_bytes=recorder.request_size,
                  keyed=recorder.keyed, protocol=spec.protocol)
    return record


def summarize(recorder: Recorder) -> Dict[str, Any]:
    """Everything a run found, as the --json object: every key always there."""
    totals, samples = recorder.totals, recorder.samples
    summary = run_record(recorder)
    summary.update(target=recorder.target, address=recorder.address, stopped_because=recorder.stop_reason,
                   interrupted=recorder.interrupted)
    summary.update(_figures(recorder, totals, recorder.started_mono_ns + recorder.duration_ns))
    summary.update(recorder.directions.figures())
    summary.update(_one_way(recorder, totals, recorder.local_clock_state, summary["timestamps"]))
    local = recorder.local
    summary.update(recorder.marks.figures() if local.tos is not None or local.ttl is not None
                   else {"tos": None, "ttl": None})
    summary.update(local_address=local.address, ports=[port.as_dict() for port in recorder.ports])
    summary["reference"] = None  # client --reference fills it in
    summary["clock"] = _clock_figures(recorder, summary, recorder.local_clock_state)
    summary.update(samples=[sample_record(sample) for sample in samples], samples_kept=len(samples),
                   samples_cut=totals.sent > len(samples))
    if isinstance(recorder, SntpRecorder):
        summary.update(_sntp_figures(recorder))
    return summary


def _sntp_figures(recorder: SntpRecorder) -> Dict[str, Any]:
    """An NTP server's own figures, from the lowest-delay query."""
    best = recorder.totals.best
    reply = best.ntp if best is not None else None
    return {"problems": dict(recorder.problems), "delay_ms": _ms(best.rtt_ns if best is not None else None),
            "stratum": reply and reply.stratum,
            "refid": reply and describe_refid(reply.stratum, reply.refid), "leap": reply and reply.leap,
            "root_delay_ms": _ms(reply and reply.root_delay_ns),
            "root_dispersion_ms": _ms(reply and reply.root_dispersion_ns)}


def period_figures(period: Period) -> Dict[str, Any]:
    """The figures of a period (--report-every), with its own span: only what a period has, no
    settings, no probes listed, no verdict on the run."""
    recorder, totals = period.recorder, period.totals
    figures = {"started_at": iso_utc(totals.started_wall_ns),
               "duration_s": round((period.end_mono_ns - totals.started_mono_ns) / NS_PER_S, 6),
               "period": {"start": iso_utc(totals.started_wall_ns), "end": iso_utc(period.end_wall_ns)},
               "target": recorder.target, "address": recorder.address}  # type: Dict[str, Any]
    figures.update(_figures(recorder, totals, period.end_mono_ns))
    local = recorder.clock_state()
    figures.update(_one_way(recorder, totals, local, figures["timestamps"]))
    figures["clock"] = _clock_figures(recorder, figures, local)
    return figures


def _clock_figures(recorder: Recorder, figures: Mapping, local: ClockState) -> Dict[str, Any]:
    server = recorder.server_clock_state
    consistent = clocks_consistent(figures["offset_ms"], figures["offset_err_ms"], local, server)
    return {"local": local.as_dict(), "server": (server or UNKNOWN_CLOCK).as_dict(), "consistent": consistent}


def _figures(recorder: Recorder, totals: Totals, end_mono_ns: int) -> Dict[str, Any]:
    """The figures of a run or a period: the keys of the summary and of each report."""
    figures = {name: getattr(totals, name) for name in Totals.COUNTS if name != "unsigned"}
    ended = totals.sent - totals.in_flight - totals.not_up
    figures["loss_pct"] = _loss_pct(totals)
    figures["rate_limited"] = totals.lost >= RATE_LIMIT_SHARE * ended > 0 and totals.runs.regular()
    figures["timestamps"] = _timestamp_summary(recorder, totals)
    figures["rtt_ms"] = totals.rtt.summary_ms(RTT_FIGURES)
    figures["jitter_ms"] = _ms(totals.jitter.mean) if totals.jitter.count else None
    figures["server_proc_ms"] = totals.proc.summary_ms(("median",))["median"]
    best = totals.best
    figures.update(offset_ms=_ms(None if best is None else best.offset_ns),
                   offset_err_ms=_ms(None if best is None else best.offset_err_ns),
                   offset_seq=None if best is None else best.seq)
    figures.update(send_ipdv_ms=totals.send_ipdv.summary_ms(IPDV_FIGURES),
                   receive_ipdv_ms=totals.receive_ipdv.summary_ms(IPDV_FIGURES),
                   send_queueing_ms=_ms(_queueing_ns(totals.send_delays)),
                   receive_queueing_ms=_ms(_queueing_ns(totals.receive_delays)))
    figures.update(_drift_figures(fit_drift(totals.timeline.points(),
                                            (end_mono_ns - totals.started_mono_ns) / NS_PER_S)))
    figures["histogram_ms"] = _histogram_rows(totals)
    figures["outages"] = totals.runs.outage_figures()
    return figures


def _loss_pct(totals: Totals) -> Optional[float]:
    """The share lost of the probes that ended: not those in flight at a deadline, nor those sent
    while the target was not up (refused, or gone)."""
    ended = totals.sent - totals.in_flight - totals.not_up
    return round(100.0 * totals.lost / ended, 3) if ended else None


def _queueing_ns(delays: Sketch) -> Optional[float]:
    """How far one leg's median delay lies above its least: the queueing on that leg."""
    (median,) = delays.quantiles((0.5,))
    return None if median is None else max(0.0, median - delays.stats.min)


def _one_way(recorder: Recorder, totals: Totals, local: ClockState, stamps: Mapping) -> Dict[str, Any]:
    """Each leg's delay (T2 - T1 out, T4 - T3 back), when both kernels say their clocks are
    synchronised: their medians, each within both kernels' maximum errors and the stamps' own."""
    server = recorder.server_clock_state or UNKNOWN_CLOCK
    reason = _unsynchronized(local, "this machine's") or _unsynchronized(server, "the server's")
    if local.maxerror_ns is None or server.maxerror_ns is None:  # said by _unsynchronized: unknown
        return {"owd_up_ms": None, "owd_down_ms": None, "owd_reason": reason}
    if reason is None and not totals.send_delays.count:
        reason = "no probe with consistent timestamps at both ends"
    if reason is not None:
        return {"owd_up_ms": None, "owd_down_ms": None, "owd_reason": reason}
    kernel = stamps["client"] == KERNEL and stamps["server"] == KERNEL
    error_ns = local.maxerror_ns + server.maxerror_ns + STAMP_ERROR_NS[KERNEL if kernel else USER]
    return {"owd_up_ms": {"median": _ms(totals.send_delays.quantiles((0.5,))[0]), "err": _ms(error_ns)},
            "owd_down_ms": {"median": _ms(totals.receive_delays.quantiles((0.5,))[0]), "err": _ms(error_ns)},
            "owd_reason": None}


def _timestamp_summary(recorder: Recorder, totals: Totals) -> Dict[str, Any]:
    stamps = totals.server_stamps
    server = next(iter(stamps)) if len(stamps) == 1 else ("mixed" if stamps else None)
    if recorder.spec.protocol == STAMP and totals.received:
        server = UNSTATED  # a STAMP reflector does not say how it takes its stamps
    at_end = recorder.server_transmit_at_end if totals is recorder.totals else 0  # no later reply could
    late = totals.server_transmit_fallbacks - at_end
    transmit = None if server is None else ((KERNEL if not late else "mixed") if totals.server_transmit_kernel
                                            else USER)
    return {"client": recorder.timestamps, "server": server, "transmit": recorder.transmit_stamps,
            "server_transmit": transmit, "server_transmit_fallbacks": totals.server_transmit_fallbacks,
            "server_transmit_rejected": totals.server_transmit_rejected,
            "user_fallbacks": totals.user_fallbacks, "transmit_fallbacks": totals.transmit_fallbacks,
            "untrusted": totals.untrusted, "untrusted_because": dict(totals.untrusted_because),
            "described": describe_timestamps(recorder.timestamps, server)}


def plot_data(recorders: Union[Recorder, Sequence[Recorder]]) -> Dict[str, Any]:
    """What --plot draws, of one target or many: each one's per-interval aggregates (the least,
    median and 99th percentile RTT, the probes lost, the best offset and its bound), its drift
    line, its histogram and its loss."""
    recorders = [recorders] if isinstance(recorders, Recorder) else recorders
    targets = [_target_plot(recorder) for recorder in recorders]
    start = iso_utc(recorders[0].started_ns)
    return {"title": "udp-timecheck {}, {}".format(recorders[0].target, start) if len(recorders) == 1
            else "udp-timecheck, {} targets, {}".format(len(recorders), start),
            "duration_s": max(target.pop("duration_s") for target in targets), "targets": targets,
            "largest_rtt_ms": max((_ms(recorder.totals.rtt.stats.max) or 0.0) for recorder in recorders)}


def _target_plot(recorder: Recorder) -> Dict[str, Any]:
    """One target's part of plot_data()."""
    timeline, duration_s = recorder.totals.timeline, recorder.duration_ns / NS_PER_S
    width_s, bins = timeline.width_ns / NS_PER_S, []
    for index, item in enumerate(timeline.bins):
        if not item.sent:
            continue
        quantiles = [(value or 0) / 1e6 for value in item.rtt.quantiles((0, 0.5, 0.99))] if item.rtt.count \
            else None
        best = item.best
        bins.append({"start_s": index * width_s, "end_s": (index + 1) * width_s, "sent": item.sent,
                     "lost": item.lost, "rtt_ms": quantiles, "offset_ms": best and best.offset_ns / 1e6,
                     "offset_err_ms": best and best.rtt_ns / 2e6})
    return {"target": recorder.target, "loss_pct": _loss_pct(recorder.totals), "bins": bins,
            "duration_s": max(duration_s, width_s), "drift": fit_drift(timeline.points(), duration_s),
            "histogram_ms": _histogram_rows(recorder.totals)}


def snapshot(recorder: Recorder) -> Dict[str, Any]:
    """A run's figures for a scrape (--metrics), taken from another thread without a lock: each
    copy below is one C-level step, and the probe loop only ever adds to what is copied."""
    totals = recorder.totals
    counts = dict(zip(Totals.COUNTS, operator.attrgetter(*Totals.COUNTS)(totals)))
    counts["probes_sent"] = recorder.probes_sent
    stats = totals.rtt.stats
    offset_ns, error_ns, drift_ppm = totals.clock_estimate(monotonic_ns())
    paged = recorder.spec.source is not None  # a mesh node's page shows them; no scrape needs them
    p50_ns, p99_ns = totals.rtt.quantiles((0.5, 0.99)) if stats.count and paged else (None, None)
    return {"counts": counts, "rtt_buckets": list(totals.rtt_buckets), "rtt_count": stats.count,
            "rtt_sum_ns": stats.mean * stats.count, "offset_ns": offset_ns, "offset_err_ns": error_ns,
            "drift_ppm": drift_ppm, "server_clock_state": recorder.server_clock_state,
            "path": _path_snapshot(recorder), "rtt_p50_ns": p50_ns, "rtt_p99_ns": p99_ns,
            "loss_pct": _loss_pct(totals), "started_at": iso_utc(recorder.started_ns), "name": recorder.name,
            "duration_s": (monotonic_ns() - recorder.started_mono_ns) / NS_PER_S}


def _path_snapshot(recorder: Recorder) -> Dict[str, Optional[float]]:
    """What the path did, as numbers over time: None where the run has no such figure."""
    directions, marks, runs = recorder.directions, recorder.marks, recorder.totals.runs
    tos_known = marks.tos_sent is not None and marks.tos_checked_back
    hops = marks.hops
    return {"lost_up": directions.up if directions.counted else None,
            "lost_down": directions.down if directions.counted else None,
            "tos_preserved": int(marks.tos_at_server == marks.tos_sent == marks.tos_back) if tos_known
            else None,
            "hops": hops, "path_changes": marks.change_count if marks.ttl_at_server is not None else None,
            "outages": runs.outages, "outage_seconds": runs.outage_ns / NS_PER_S}


UNSTATED = "unstated"


def describe_timestamps(client: str, server: Optional[str]) -> str:
    """Which timestamps each end used, in words: "kernel (both ends)", ..."""
    here = "user-space" if client == USER else client
    if server is None:
        return "{} here; the server sends none".format(here)
    if server == UNSTATED:
        return "{} here; the reflector's, taken as it takes them (STAMP does not say how)".format(here)
    there = {USER: "user-space", "mixed": "kernel and user-space"}.get(server, server)
    return "{} (both ends)".format(here) if here == there else "{} here, {} at the server".format(here, there)


def _unsynchronized(state: ClockState, whose: str) -> Optional[str]:
    """Why a kernel's clock cannot bound a one-way delay, in words, or None when it can."""
    if state.synchronized is None or state.maxerror_ns is None:
        return "{} clock state is unknown".format(whose)
    if not state.synchronized:
        return "{} clock is not synchronised".format(whose)
    return None


def _histogram_rows(totals: Totals) -> List[List[float]]:
    """About sqrt(n) rows, at most 10, from the fastest RTT to the slowest: never beyond them."""
    rows = totals.rtt.rows(max(1, min(10, round(math.sqrt(totals.received)))))
    return [[round(low / 1e6, 6), round(high / 1e6, 6), count] for low, high, count in rows]


def _drift_figures(fit: Optional[DriftFit]) -> Dict[str, Any]:
    if fit is None:
        return {"drift_ppm": None, "drift_err_ppm": None, "offset_end_ms": None, "offset_end_err_ms": None,
                "clock_steps": []}
    return {"drift_ppm": round(fit.drift_ppm, 3), "drift_err_ppm": round(fit.drift_err_ppm, 3),
            "offset_end_ms": _ms(fit.offset_end_ns), "offset_end_err_ms": _ms(fit.offset_end_err_ns),
            "clock_steps": [{"at": iso_utc(at_ns), "size_ms": _ms(size_ns)} for at_ns, size_ns in fit.steps]}


def plural(count: int, noun: str, nouns: Optional[str] = None) -> str:
    """'1 probe', '2 probes', '0 probes'; '1 query', '2 queries' when told."""
    return "{} {}".format(count, noun if count == 1 else nouns or noun + "s")


def signed(value: float, digits: int = 3) -> str:
    """'+0.012' or '-0.012', and never '-0.000': a value that rounds to zero is +0."""
    return "{:+.{}f}".format(0.0 if round(value, digits) == 0 else value, digits)


class TimeUnit(NamedTuple):
    """The one unit of a summary's times (and of a table's, a plot's): its name, its scale from
    ms, and the decimals it is shown with."""
    name: str
    scale: float
    digits: int

    def show(self, *values_ms: float) -> str:
        """'1.2/3.4 us': values in this unit, then its name."""
        shown = ("{:.{}f}".format(value * self.scale, self.digits) for value in values_ms)
        return "/".join(shown) + " " + self.name

    def bound(self, value_ms: float, error_ms: float) -> str:
        """'+1.2 us \u00b1 0.4 us': a signed value and its error bound."""
        value = signed(value_ms * self.scale, self.digits)
        return "{} {} \u00b1 {}".format(value, self.name, self.show(error_ms))


MILLISECONDS = TimeUnit("ms", 1.0, 3)


def time_unit(largest_ms: float) -> TimeUnit:
    """Microseconds when everything is under a millisecond, as on a LAN or loopback, where 0.003
    ms would say little; else milliseconds."""
    return TimeUnit("us", 1000.0, 1) if largest_ms < 1.0 else MILLISECONDS


LOST_LINES = {
    TIMED_OUT: "lost, no reply within {timeout:g} s",
    REFUSED: "refused: nothing listens on that port (ICMP port unreachable)",
    FORGED: "lost: its only reply failed authentication (forged)",
    ECHOED: "lost: the reply was its own request, echoed back",
    NOT_SENT: "not sent: the kernel refused it",
    INTERRUPTED: "interrupted before its reply",
    DEADLINE: "cut off by the deadline",
    GONE: "not up: the server said it stopped (not counted as lost)",
}


def format_sample(sample: Sample, target: str, timeout: float, named: bool = False) -> str:
    """A ping-like line for one probe; named, the lines without a reply name their target too."""
    if sample.status != OK and named:
        return "{} {}".format(target, format_sample(sample, target, timeout))
    if sample.status == OK:
        line = "{} bytes from {}: seq={} rtt={:.3f} ms".format(
            sample.reply_size, target, sample.seq, (sample.rtt_ns or 0) / 1e6)
        if sample.offset_ns is not None:
            line += " offset={} ms".format(signed(sample.offset_ns / 1e6))
        return line
    if sample.status == MISMATCHED:
        return "seq={}: Server is a liar! (reply id {} for request id {})".format(
            sample.seq, sample.reply_id, sample.request_id)
    if sample.status == IN_FLIGHT:
        return "seq={}: still in flight at the deadline".format(sample.seq)
    line = LOST_LINES.get(sample.reason or TIMED_OUT, LOST_LINES[TIMED_OUT])
    return "seq={}: {}".format(sample.seq, line.format(timeout=timeout))


def format_loss(figures: Mapping) -> str:
    """'0.5% loss', or 'no loss figure' while no probe has ended (sent none, or all in flight)."""
    return "no loss figure" if figures["loss_pct"] is None else "{:g}% loss".format(figures["loss_pct"])


def format_counts(summary: Mapping) -> List[str]:
    """The summary's first lines: what became of the probes, and why the run ended early."""
    counts = "{} sent, {} received, {}, {}, {} late, {} reordered, {} mismatched, {} forged".format(
        plural(summary["sent"], "probe"), summary["received"], format_loss(summary),
        plural(summary["duplicates"], "duplicate"), summary["late"], summary["reordered"],
        summary["mismatched"], summary["forged"])
    counts += "".join(", {} {}".format(summary[key], name) for key, name in (
        ("malformed", "malformed"), ("echoes", "echoed")) if summary[key])
    notes = [(summary["rate_limited"], "rate-limited? the losses come as regularly as a server's --max-rate "
              "per address makes them: answered and lost probes in runs of nearly one length each"),
             (summary["in_flight"], "{} still in flight at the deadline: not counted as lost".format(
                 plural(summary["in_flight"], "probe"))),
             (summary["not_up"], "{} sent while the target was not up (refused before its first answer, or "
              "after it said it stopped): not counted as lost".format(plural(summary["not_up"], "probe"))),
             (summary["refused"] or summary["errors"], "{} refused by the server's host, {} could not be "
              "sent".format(summary["refused"], summary["errors"]))]
    return [counts] + [line for shown, line in notes if shown] + _format_end(summary)


def _format_end(summary: Mapping) -> List[str]:
    """Why the run ended before its count, if it did."""
    done = "{} of {}".format(summary["sent"], plural(summary["count"], "probe")) if summary["count"] \
        else plural(summary["sent"], "probe")
    if summary["interrupted"]:
        return ["interrupted after {} ({:.1f} s)".format(done, summary["duration_s"])]
    if summary["stopped_because"] == REFUSED:
        return ["stopped after {}: connection refused, nothing listens on that port".format(done)]
    if summary["stopped_because"] == DEADLINE:
        return ["the deadline ended it after {} ({:.1f} s)".format(done, summary["duration_s"])]
    return []


def format_outage(outage: Outage, target: str, named: bool = False) -> str:
    """An outage's line, as it ends: which probes, and for how long."""
    last = outage.first_seq + outage.probes - 1
    probes = "seq={}".format(outage.first_seq) if outage.probes == 1 else "seq={}-{}".format(
        outage.first_seq, last)
    return "{}outage {:.3f} s: {} lost ({}){}".format(
        target + ": " if named else "", outage.span_ns / NS_PER_S, plural(outage.probes, "probe"), probes,
        ", still going at the end" if outage.at_end else "")


def format_path(summary: Mapping, unit: TimeUnit = MILLISECONDS) -> List[str]:
    """What the path did: which leg lost what, the outages, the probes' marks and hops, each
    source port, and the one-way delays."""
    lines = []
    if summary["lost"] and summary.get("lost_up") is not None:
        unknown = summary["lost_direction_unknown"]
        lines.append("lost on the way out (the server never had the request) {}, on the way back (the "
                     "reply lost) {}{}".format(summary["lost_up"], summary["lost_down"], ", after the last "
                                               "reply (either way) {}".format(unknown) if unknown else ""))
    outages = summary["outages"]
    if outages["count"]:
        lines.append("outages {}, longest {:.3f} s, total {:.3f} s".format(
            outages["count"], outages["longest_s"], outages["total_s"]))
    lines += format_marks(summary.get("tos"), summary.get("ttl"))
    ports = summary.get("ports") or []
    if len(ports) > 1:
        lines += ["source port {}: {} sent, {} received, {} lost, rtt median/p99 = {}".format(
            port["port"], port["sent"], port["received"], port["lost"], "n/a" if port["rtt_ms"]["median"] is
            None else unit.show(port["rtt_ms"]["median"], port["rtt_ms"]["p99"])) for port in ports]
    return lines


def format_one_way(summary: Mapping, unit: TimeUnit = MILLISECONDS) -> str:
    up, down = summary["owd_up_ms"], summary["owd_down_ms"]
    if up is None:
        return "one-way delays: not given ({}); the queueing above needs no synchronised " \
               "clocks".format(summary["owd_reason"])
    return "one-way delay median: out {} \u00b1 {}, back {} \u00b1 {} (both kernels synchronised: their " \
           "max errors, and the timestamps')".format(unit.show(up["median"]), unit.show(up["err"]),
                                                 unit.show(down["median"]), unit.show(down["err"]))


def format_marks(tos: Optional[Mapping], ttl: Optional[Mapping]) -> List[str]:
    """The TOS sent, what reached the server and what came back; the hops, and their changes."""
    lines = []
    if tos is not None and tos["sent"] is not None:
        if not tos["checked"]:
            lines.append("TOS {} sent: the server did not say what arrived".format(dscp_name(tos["sent"])))
        else:
            back = "unknown back (this platform cannot read it)" if tos["received_back"] is None else \
                dscp_name(tos["received_back"]) + " back"
            lines.append("TOS {} sent, {} at the server, {}: {}".format(
                dscp_name(tos["sent"]), dscp_name(tos["received_by_server"]), back, _tos_verdict(tos)))
    if ttl is not None and ttl["received_by_server"] is not None:
        lines.append("TTL {} sent, {} at the server: {}".format(
            ttl["sent"] if ttl["sent"] is not None else "(unknown)", ttl["received_by_server"],
            "n/a hops" if ttl["hops"] is None else plural(ttl["hops"], "hop")))
        lines += ["path change: the TTL at the server went from {} to {} at {} (seq={})".format(
            change["from"], change["to"], change["at"], change["seq"]) for change in ttl["changes"]]
        if ttl["change_count"] > len(ttl["changes"]):
            lines.append("... and {} more path changes".format(ttl["change_count"] - len(ttl["changes"])))
    return lines


def _tos_verdict(tos: Mapping) -> str:
    """Whether the marking survived, and on which leg it changed."""
    legs = [("on the way out", tos["changed_out"], tos["checked"]),
            ("on the way back", tos["changed_back"], tos["checked_back"])]
    changed = ["changed {} ({} of {})".format(leg, count, plural(checked, "reply", "replies"))
               for leg, count, checked in legs if count]
    if changed:
        return "; ".join(changed)
    return "kept both ways" if tos["checked_back"] else "kept on the way out"


def offset_words(offset_ms: float, error_ms: float, ahead: str, behind: str, level: str,
                 unit: TimeUnit = MILLISECONDS) -> str:
    """A direction only when the offset lies outside its bound: else level, within the bound."""
    if abs(offset_ms) <= error_ms:
        return "{} within \u00b1 {}".format(level, unit.show(error_ms))
    return ahead if offset_ms > 0 else behind


def format_clock(summary: Mapping, unit: TimeUnit = MILLISECONDS) -> List[str]:
    """The server's processing time when it is missing, and its clock offset, in words."""
    reasons = summary["timestamps"]["untrusted_because"]
    no_stamps = summary["server_proc_ms"] is None and set(reasons) == {NO_SERVER_STAMPS}
    lines = []
    if summary["server_proc_ms"] is None:
        lines.append("server processing time: {}, so it is part of each rtt".format(
            "not reported" if no_stamps else "not used (its timestamps contradict the round trip)"))
    if summary["offset_ms"] is None:
        why = ("the server sends no timestamps: the tutorial's server?" if no_stamps else
               "no probe's timestamps can be trusted: " + ", ".join(
                   "{} ({})".format(reason, plural(count, "probe")) for reason, count in reasons.items()))
        return lines + ["server clock offset: unavailable ({})".format(why)]
    offset, error = summary["offset_ms"], summary["offset_err_ms"]
    words = offset_words(offset, error, "server ahead of this machine", "server behind this machine",
                         "server level with this machine", unit)
    return lines + ["server clock offset {} ({}; from seq {}, the lowest-rtt probe)".format(
        unit.bound(offset, error), words, summary["offset_seq"])]


def format_stamps(stamps: Mapping, interleaved: bool = False) -> str:
    """Where the timestamps came from, at each end, with the fallbacks; what became of the server's
    transmit stamps, in the words its evidence allows."""
    fallbacks = ", {} timed from user-space readings".format(plural(stamps["user_fallbacks"], "probe")) \
        if stamps["user_fallbacks"] else ""
    return "timestamps: {}{}{}".format(stamps["described"], fallbacks, _transmit_words(stamps, interleaved))


def _transmit_words(stamps: Mapping, interleaved: bool) -> str:
    """The server's send times: its kernel's (interleaved), or its own reading, and why."""
    transmit, rejected = stamps.get("server_transmit"), stamps.get("server_transmit_rejected", 0)
    why = "{} rejected: they disagree with the server's own clock".format(plural(rejected, "kernel stamp"))
    if transmit == KERNEL:
        return "; the server's send times from its kernel (interleaved)"
    if transmit == "mixed":
        return "; the server's send times from its kernel (interleaved), but for {}{}".format(
            plural(stamps["server_transmit_fallbacks"], "probe"), " ({})".format(why) if rejected else "")
    if transmit != USER or not interleaved:
        return ""
    if rejected:
        return "; the server's send times as it read them: its {}".format(why)
    if stamps["server_transmit_fallbacks"]:
        return "; the server's send times as it read them: its kernel's were offered, none came in time"
    return "; the server's send times as it read them (it offers none from its kernel: not interleaved)" \
        if stamps["server"] == KERNEL else ""


def format_summary(summary: Mapping) -> List[str]:
    """The human summary of summarize(recorder), like ping's."""
    rtt = summary["rtt_ms"]
    unit = MILLISECONDS if rtt["min"] is None else time_unit(rtt["max"])  # every time of it, in one unit
    show = unit.show
    lines = ["", "--- {} {} statistics ---".format(summary["target"], "STAMP" if summary.get(
        "protocol") == STAMP else "udp-timecheck")] + format_counts(summary)
    lines += format_path(summary, unit)
    if rtt["min"] is None:
        return lines
    lines.append("rtt min/avg/max/mdev = " + show(rtt["min"], rtt["avg"], rtt["max"], rtt["mdev"]))
    lines.append("rtt median/p90/p99 = " + show(rtt["median"], rtt["p90"], rtt["p99"]))
    jitter = summary["jitter_ms"]
    lines.append("jitter " + ("n/a (one reply)" if jitter is None else show(jitter)))
    out, back = summary["send_ipdv_ms"], summary["receive_ipdv_ms"]
    if out["median"] is not None:  # each direction on its own: no clock sync needed
        lines.append("ipdv out median/p99/max = {}, back {}".format(
            show(out["median"], out["p99"], out["max"]), show(back["median"], back["p99"], back["max"])))
        lines.append("queueing above each direction's least delay, median: out {}, back {}".format(
            show(summary["send_queueing_ms"]), show(summary["receive_queueing_ms"])))
        lines.append(format_one_way(summary, unit))
    if summary["server_proc_ms"] is not None:
        lines.append("server processing median {}: from its kernel receiving a request to its reply, "
                     "left out of each rtt".format(show(summary["server_proc_ms"])))
    lines += format_clock(summary, unit) + format_drift(summary, unit) + format_clocks(summary, unit)
    if summary["reference"] is not None:
        lines += format_reference(summary["reference"], unit)
    lines.append(format_stamps(summary["timestamps"], bool(summary.get("interleaved"))))
    return lines + format_histogram(summary["histogram_ms"])


def format_drift(summary: Mapping, unit: TimeUnit = MILLISECONDS) -> List[str]:
    """The clocks' relative rate, the offset at the end, and any clock steps."""
    if summary["drift_ppm"] is None:
        return []
    drift, error = summary["drift_ppm"], summary["drift_err_ppm"]
    claim = DRIFT_CLAIM_FACTOR * error
    pace = "faster than" if drift > claim else "slower than" if drift < -claim else "no faster or slower than"
    end = unit.bound(summary["offset_end_ms"], summary["offset_end_err_ms"])
    lines = ["clock drift {} ppm \u00b1 {:.3f} ppm (the server's clock runs {} this machine's); offset at "
             "the end {}".format(signed(drift), error, pace, end)]
    lines += ["clock step of {} {} at {}".format(signed(step["size_ms"] * unit.scale, unit.digits), unit.name,
                                                step["at"])
              for step in summary["clock_steps"]]
    return lines


def format_clock_state(whose: str, state: Mapping, remote: bool = False,
                       unit: TimeUnit = MILLISECONDS) -> str:
    """What a kernel says of its clock, in words: 'server clock: synchronised, max error ...';
    each figure only when that kernel (remote: the server's) gave it."""
    if state["synchronized"] is None:
        return "{}: unknown (no kernel clock state{})".format(whose, ": the server did not say" if remote
                                                             else " here")
    words = ["synchronised" if state["synchronized"] else "NOT synchronised ({} says so)".format(
        "its S bit" if state["source"] == STAMP_ESTIMATE else "the kernel")]
    words += ["{} {}".format(name, unit.show(state[key])) for name, key in (
        ("max error", "maxerror_ms"), ("estimated error", "esterror_ms")) if state[key] is not None]
    if state["freq_ppm"] is not None:
        words.append("frequency correction {} ppm".format(signed(state["freq_ppm"])))
    source = " ({})".format(state["source"]) if state["source"] else ""
    return "{}: {}{}".format(whose, ", ".join(words), source)


def format_clocks(summary: Mapping, unit: TimeUnit = MILLISECONDS) -> List[str]:
    """Both kernels' views of their clocks, and whether the measured offset fits them."""
    clock = summary["clock"]
    lines = [format_clock_state("server clock", clock["server"], True, unit),
             format_clock_state("this machine's clock", clock["local"], False, unit)]
    if clock["consistent"] is not None:
        lines.append("the offset is {}consistent with what both kernels claim (|offset| within its bound and "
                     "both max errors)".format("" if clock["consistent"] else "NOT "))
    return lines


def format_reference(reference: Mapping, unit: TimeUnit = MILLISECONDS) -> List[str]:
    """The three clocks against the reference, and in words which is off, and by how much."""
    name = "reference {}{}".format(reference["host"], " (stratum {})".format(reference["stratum"])
                                   if reference["stratum"] is not None else "")
    problems = "; ".join("{} x {}".format(count, problem) for problem, count in reference["problems"].items())
    if reference["local_offset_ms"] is None:
        return ["{}: no usable answer{}".format(name, " ({})".format(problems) if problems else "")]
    lines = ["{}: this machine {} (this clock minus the reference's)".format(
        name, unit.bound(reference["local_offset_ms"], reference["local_offset_err_ms"]))]
    if reference.get("failed"):
        lines.append("{}: {} without a usable answer, of {}{}".format(
            name, plural(reference["failed"], "query", "queries"), reference["queries"],
            "; " + problems if problems else ""))
    if reference["server_offset_ms"] is None:
        return lines
    lines.append("{}: the server {}".format(
        name, unit.bound(reference["server_offset_ms"], reference["server_offset_err_ms"])))
    return lines + [_reference_verdict(reference, unit)]


def _reference_verdict(reference: Mapping, unit: TimeUnit) -> str:
    """Which clock the reference says is off, and by how much; none, within their bounds."""
    off = [(whose, reference[key + "_ms"], reference[key + "_err_ms"])
           for whose, key in (("this machine's", "local_offset"), ("the server's", "server_offset"))
           if abs(reference[key + "_ms"]) > reference[key + "_err_ms"]]
    verdict = "stale verdict (its last answer is {:.0f} s old)".format(reference["last_answer_age_s"]) \
        if reference.get("stale") else "verdict"
    if not off:
        return verdict + ": both clocks agree with the reference, within their error bounds"
    return verdict + ": " + "; ".join("{} clock is off by {}".format(
        whose, unit.bound(value, error)) for whose, value, error in off) + (
        "; the other agrees with the reference" if len(off) == 1 else "")


def format_histogram(rows: Sequence[Sequence[float]]) -> List[str]:
    """The RTT histogram's rows as bars, in us when every RTT is under a millisecond."""
    if not rows:
        return []
    unit, scale, digits = time_unit(rows[-1][1])
    widest = max(count for _, _, count in rows)
    lines = ["rtt histogram:"]
    for low, high, count in rows:
        bar = "#" * max(1 if count else 0, round(40 * count / widest))
        lines.append("  {:9.{d}f} - {:9.{d}f} {} |{:<40} {}".format(
            low * scale, high * scale, unit, bar, count, d=digits))
    return lines


def failure_reason(measurement: Recorder, timeout: float) -> Optional[str]:
    """Why a run failed, in one line, with what to check; None if it did not.

    It fails without a valid reply, and with any forged reply, echo or liar: a probe whose only
    reply named another (a datagram that names none while the real reply comes is counted, no more).
    """
    totals = measurement.totals
    if totals.received and not (totals.echoes or totals.forged or measurement.ended_with(MISMATCHED)):
        return None
    return _untrusted_replies(measurement) or _no_valid_reply(measurement, timeout)


def _untrusted_replies(measurement: Recorder) -> Optional[str]:
    """What the replies that came were, when they cannot be trusted: an echo, forged, or lies."""
    target, totals = measurement.target, measurement.totals
    if totals.echoes:
        return "{} echoes requests back: it is an echo service, not a time server".format(target)
    if totals.unsigned and not totals.received:
        return "replies are not authenticated: is the server running with the same key?"
    if totals.forged:
        return "{} failed authentication (tampered with, replayed, or another key)".format(
            plural(totals.forged, "reply", "replies"))
    liars = measurement.ended_with(MISMATCHED)
    if liars:
        return "the server is a liar: {} got only a reply that did not match its request id".format(
            plural(liars, "probe"))
    return None


def _no_valid_reply(measurement: Recorder, timeout: float) -> str:
    """Why no reply came, as best the run can tell: interrupted, refused, garbage, unsendable, silence."""
    target, totals = measurement.target, measurement.totals
    if measurement.interrupted:
        return "interrupted after {:.1f} s, before any reply from {}".format(
            measurement.duration_ns / NS_PER_S, target)
    if measurement.stop_reason == REFUSED or totals.not_up:  # refused all along
        return "connection refused by {}: no server is listening on that port".format(target)
    if totals.malformed:
        return "{} sent {} that {} not udp-timecheck replies".format(
            target, plural(totals.malformed, "reply", "replies"), "is" if totals.malformed == 1 else "are")
    if totals.errors:
        return "cannot send to {}: {}".format(target, measurement.last_error)
    waited = "within {:g} s".format(timeout) if totals.lost else "before the deadline ({:.1f} s)".format(
        measurement.duration_ns / NS_PER_S)
    if measurement.spec.protocol == STAMP:
        return ("no reply from {} {} (is a STAMP or TWAMP-light reflector running there{}, on that port: {} "
                "unless given? Is its UDP port open to you?)".format(
                    target, waited, " in authenticated mode, with the same key" if measurement.keyed else "",
                    STAMP_PORT))
    return ("no reply from {} {} (is the server running{}, and is its UDP port open to you?{})".format(
        target, waited, " with the same key" if measurement.keyed else "",
        "" if measurement.keyed else " A server started with a key answers only clients with that key"))


def format_sntp_sample(sample: Sample, target: str, timeout: float) -> str:
    """A line for one NTP query: the offset and delay, and what the server says of itself."""
    reply = sample.ntp
    if sample.status != OK or reply is None:
        reason = LOST_LINES.get(sample.reason or TIMED_OUT, sample.reason or LOST_LINES[TIMED_OUT])
        return "seq={}: {}".format(sample.seq, reason.format(timeout=timeout))
    return ("{}: seq={} offset={} ms delay={:.3f} ms stratum {} refid {} leap {} root delay {:.3f} ms "
            "root dispersion {:.3f} ms").format(
        target, sample.seq, signed((sample.offset_ns or 0) / 1e6), (sample.rtt_ns or 0) / 1e6, reply.stratum,
        describe_refid(reply.stratum, reply.refid), reply.leap, reply.root_delay_ns / 1e6,
        reply.root_dispersion_ns / 1e6)


def format_sntp_summary(summary: Mapping) -> List[str]:
    """The summary of an sntp run: what came back, the best offset, and the server's own figures."""
    lines = ["", "--- {} sntp statistics ---".format(summary["target"]),
             "{} sent, {} answered, {}, {} late, {}, {} with a wrong origin".format(
                 plural(summary["sent"], "query", "queries"), summary["received"], format_loss(summary),
                 summary["late"], plural(summary["duplicates"], "duplicate"), summary["mismatched"])]
    lines += ["{} unusable: {}".format(count, problem) for problem, count in summary["problems"].items()]
    if summary["offset_ms"] is not None:
        offset, error = summary["offset_ms"], summary["offset_err_ms"]
        words = offset_words(offset, error, "ahead of this machine's", "behind this machine's",
                             "level with this machine's")
        lines.append("offset {} ms \u00b1 {:.3f} ms (the server's clock is {}; from seq {}, the query of "
                     "least error), delay {:.3f} ms".format(signed(offset), error, words,
                                                            summary["offset_seq"], summary["delay_ms"]))
        lines.append("server: stratum {}, reference {}, leap {}, root delay {:.3f} ms, root dispersion "
                     "{:.3f} ms".format(summary["stratum"], summary["refid"], summary["leap"],
                                        summary["root_delay_ms"], summary["root_dispersion_ms"]))
    lines.append(format_clock_state("this machine's clock", summary["clock"]["local"]))
    return lines


def sntp_failure(recorder: SntpRecorder, timeout: float) -> Optional[str]:
    """Why an sntp run failed, in one line; None if it did not."""
    totals = recorder.totals
    if totals.received and not totals.mismatched:
        return None
    target = recorder.target
    if recorder.kissed:
        code = (recorder.stop_reason or "?").rsplit(" ", 1)[-1]
        return "{} sent a {}: it asks this client to stop ({})".format(
            target, recorder.stop_reason, KISS_CODES.get(code, "a code RFC 5905 does not name"))
    if totals.mismatched:
        count = totals.mismatched
        return "{} from {} {} no query's origin timestamp: stale, or forged".format(
            plural(count, "reply", "replies"), target, "echoes" if count == 1 else "echo")
    if recorder.problems:
        return "no usable answer from {}: {}".format(target, recorder.problems.most_common(1)[0][0])
    return failure_reason(recorder, timeout)


CLIENT_COUNTERS = (
    ("probes_sent_total", "probes_sent", "Probes sent to the server."),
    ("replies_total", "received", "Probes answered in time by a valid reply."),
    ("lost_total", "lost", "Probes with no valid reply in time."),
    ("duplicates_total", "duplicates", "Second replies to probes already answered."),
    ("late_total", "late", "Replies after their probe had timed out."),
    ("reordered_total", "reordered", "Replies to a probe numbered below one already answered."),
    ("mismatched_total", "mismatched", "Well-formed replies whose id matches no probe: lies."),
    ("forged_total", "forged", "Replies that failed authentication."),
    ("malformed_total", "malformed", "Replies that are not udp-timecheck messages."),
)
SERVER_RESULTS = (("served", "served"), ("malformed", "malformed"), ("unauthenticated", "unauthenticated"),
                  ("replayed", "replayed"), ("rate_limited", "rate_limited"), ("too_short", "too_short"),
                  ("loop", "loops"))


def _labels(labels: Mapping[str, str]) -> str:
    escaped = ('{}="{}"'.format(name, str(value).replace("\\", "\\\\").replace('"', '\\"')
                                .replace("\n", "\\n")) for name, value in labels.items())
    return "{" + ",".join(escaped) + "}" if labels else ""


def _metric(name: str, kind: str, about: str, samples: Sequence[Tuple[Mapping[str, str], float]],
            header_alone: bool = False) -> List[str]:
    """One metric family in the text exposition format: HELP, TYPE, and a line per sample; nothing
    at all without samples, unless header_alone (a histogram's lines follow)."""
    if not samples and not header_alone:
        return []
    lines = ["# HELP udp_timecheck_{} {}".format(name, about),
             "# TYPE udp_timecheck_{} {}".format(name, kind)]
    lines += ["udp_timecheck_{}{} {}".format(name, _labels(labels), _sample_value(value))
              for labels, value in samples]
    return lines


def _sample_value(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _build_info() -> List[str]:
    return _metric("build_info", "gauge", "The version of udp-timecheck and of Python, as labels.",
                   [({"version": __version__, "python": "{}.{}.{}".format(*sys.version_info)}, 1)])


def render_server_metrics(server: TimeServer, log_dropped: int, source: Optional[str] = None,
                          build_info: bool = True) -> str:
    """The server's /metrics: its requests by what became of them, and its log's drops; a mesh
    node's labelled with its name (source), after its client's series."""
    names = ServerStats.__slots__
    counts = dict(zip(names, operator.attrgetter(*names)(server.stats)))  # one step: a consistent copy
    node = {"source": source} if source else {}
    lines = _build_info() if build_info else []
    lines += _metric("server_requests_total", "counter", "Requests received, by what became of them.",
                     [(dict(node, result=result), counts[key]) for result, key in SERVER_RESULTS])
    lines += _metric("server_errors_total", "counter", "Sends and receives the kernel refused.",
                     [(node, counts["errors"])])
    lines += _metric("server_log_dropped_total", "counter",
                     "Log lines dropped: stdout full, blocked or closed.", [(node, log_dropped)])
    return "\n".join(lines) + "\n"


def client_snapshots(recorders: Sequence[Recorder],
                     source: Optional[str] = None) -> List[Tuple[Dict[str, str], Dict[str, Any]]]:
    """Each target's snapshot() with its labels: target, source (a mesh node's name), and
    protocol="stamp" for a STAMP reflector's."""
    return [(dict({"source": source} if source else {}, target=recorder.target,
                  **({"protocol": STAMP} if recorder.spec.protocol == STAMP else {})), snapshot(recorder))
            for recorder in recorders]


def render_client_metrics(recorders: Union[Recorder, Sequence[Recorder]],
                          source: Optional[str] = None) -> str:
    """The client's /metrics, from its recorders: see render_snapshots()."""
    recorders = [recorders] if isinstance(recorders, Recorder) else recorders
    local = recorders[0].clock_state() if recorders else UNKNOWN_CLOCK
    return render_snapshots(client_snapshots(recorders, source), local)


def snapshot_matrix(labelled: Sequence[Tuple[Dict[str, str], Mapping]], source: str,
                    local: ClockState) -> Dict[str, Any]:
    """A node's own row of the matrix, live: build_matrix()'s form, from the latest snapshots."""
    cells = []
    for labels, taken in labelled:
        counts, path = taken["counts"], taken["path"]
        cells.append({"source": source, "target": taken["name"] or labels["target"],
                      "rtt_p50_ms": _ms(taken["rtt_p50_ns"]),
                      "rtt_p99_ms": _ms(taken["rtt_p99_ns"]), "loss_pct": taken["loss_pct"],
                      "offset_ms": _ms(taken["offset_ns"]), "offset_err_ms": _ms(taken["offset_err_ns"]),
                      "not_up": counts["not_up"], "lost_up": path["lost_up"], "lost_down": path["lost_down"],
                      "sent": counts["probes_sent"], "duration_s": round(taken["duration_s"], 3),
                      "started_at": taken["started_at"], "clock_synchronized": local.synchronized,
                      "clock_maxerror_ms": _ms(local.maxerror_ns)})
    nodes = [source] + [cell["target"] for cell in cells]
    return {"nodes": nodes, "cells": cells, "missing": []}


def render_snapshots(labelled: Sequence[Tuple[Dict[str, str], Mapping]], local: ClockState) -> str:
    """The client's /metrics: each target's counters, RTT histogram and clock gauges, every series
    labelled (client_snapshots()); local is this machine's clock state."""
    lines = _build_info() + _probe_counts(labelled)
    for name, about, value in CLOCK_GAUGES:
        lines += _metric(name, "gauge", about, _known(labelled, value))
    lines += _metric("clock_synchronized", "gauge", "1 when that end's kernel says its clock is "
                     "synchronised, else 0.", _synchronized(labelled, local))
    for name, kind, key, about in PATH_SERIES:
        lines += _metric(name, kind, about, _known(labelled, functools.partial(_path_value, key)))
    return "\n".join(lines) + "\n"


def _path_value(key: str, snap: Mapping) -> Optional[float]:
    return snap["path"][key]


def _probe_counts(labelled: Sequence[Tuple[Dict[str, str], Mapping]]) -> List[str]:
    """Each target's counters, and its RTTs in Prometheus' buckets."""
    lines = []
    for name, key, about in CLIENT_COUNTERS:
        lines += _metric(name, "counter", about, [(labels, snap["counts"][key]) for labels, snap in labelled])
    lines += _metric("rtt_seconds", "histogram", "Round-trip times, less the server's processing.", [],
                     header_alone=bool(labelled))
    for labels, snap in labelled:
        lines += _rtt_histogram(snap, labels)
    return lines


def _known(labelled: Sequence[Tuple[Dict[str, str], Mapping]],
           value: Callable[[Mapping], Optional[float]]) -> List[Tuple[Dict[str, str], float]]:
    """Each target's value, where it has one: a series is absent, never NaN, while unknown."""
    samples = [(labels, value(snap)) for labels, snap in labelled]
    return [(labels, got) for labels, got in samples if got is not None]


def _synchronized(labelled: Sequence[Tuple[Dict[str, str], Mapping]],
                  local: ClockState) -> List[Tuple[Dict[str, str], int]]:
    """Whether each end's kernel says its clock is synchronised, for each target; absent when unknown."""
    ends = [(dict(labels, end=end), state) for labels, snap in labelled
            for end, state in (("local", local), ("server", snap["server_clock_state"] or UNKNOWN_CLOCK))]
    return [(labels, int(state.synchronized)) for labels, state in ends if state.synchronized is not None]


PATH_SERIES = (
    ("lost_up_total", "counter", "lost_up", "Lost probes whose request the server never had, by its count."),
    ("lost_down_total", "counter", "lost_down",
     "Lost probes whose request the server had: their reply was lost."),
    ("outages_total", "counter", "outages", "Runs of consecutive lost probes that have ended."),
    ("outage_seconds_total", "counter", "outage_seconds",
     "The ended outages' time, from the first lost probe's send to the next answered one's."),
    ("tos_preserved", "gauge", "tos_preserved",
     "1 when the latest reply says the TOS sent reached the server, and came back, unchanged; else 0."),
    ("hops", "gauge", "hops", "The TTL sent less the TTL the server received: routers on the way out."),
    ("path_changes_total", "counter", "path_changes", "Changes of the TTL the server received (per port)."),
)


CLOCK_GAUGES = (
    ("clock_offset_seconds", "The server's clock minus this machine's, now: the drift fit's estimate.",
     lambda snap: snap["offset_ns"] and snap["offset_ns"] / NS_PER_S),
    ("clock_offset_error_seconds", "The offset's error bound.",
     lambda snap: snap["offset_err_ns"] and snap["offset_err_ns"] / NS_PER_S),
    ("clock_drift_ratio", "How much faster the server's clock runs than this machine's (ppm times 1e-6).",
     lambda snap: snap["drift_ppm"] and snap["drift_ppm"] * 1e-6))


def render_endpoint_metrics(stats: MetricsStats) -> str:
    """The metrics endpoint's own counters: what became of the connections to it."""
    counts = stats.as_dict()
    return "\n".join(_metric("metrics_connections_total", "counter", "Connections to this metrics "
                             "endpoint, by what became of them.",
                             [({"result": name}, count) for name, count in counts.items()])) + "\n"


def _rtt_histogram(snapshot: Mapping, labels: Mapping[str, str]) -> List[str]:
    """One target's RTTs, counted into Prometheus' log-spaced buckets as they came, cumulative."""
    samples, total = [], 0
    for le, count in zip(["{:.6g}".format(le) for le in RTT_BUCKETS_S] + ["+Inf"], snapshot["rtt_buckets"]):
        total += count
        samples.append((dict(labels, le=le), total))
    lines = ["udp_timecheck_rtt_seconds_bucket{} {}".format(_labels(bucket), count)
             for bucket, count in samples]
    rtt_sum = _sample_value(snapshot["rtt_sum_ns"] / NS_PER_S)
    lines.append("udp_timecheck_rtt_seconds_sum{} {}".format(_labels(labels), rtt_sum))
    lines.append("udp_timecheck_rtt_seconds_count{} {}".format(_labels(labels), total))
    return lines


def describe_server(server: TimeServer) -> str:
    """The server's first line: where it listens, who it answers, its timestamps, and what this
    platform cannot do."""
    access = "key required (HMAC-SHA256)" if server.keyed else "no key: answers anyone"
    stamps = describe_stamps(server.timestamps, server.no_kernel_stamps)
    if server.spec.stamp:
        access = "STAMP reflector, {}; {}".format(server.spec.stamp, "authenticated mode (HMAC-SHA-256)"
                                                  if server.keyed else "unauthenticated mode: answers anyone")
    words = "Server listening at {}; {}; {}".format(format_address(*server.address[:2]), access, stamps)
    if server.address[0] in ("0.0.0.0", "::") and not server.packet_info:
        words += ("; replies from the kernel's choice of source address (this platform cannot say which "
                  "address a request came to: on a host with several, bind one)")
    return words


def describe_stamps(timestamps: str, refused: Optional[str]) -> str:
    """'kernel timestamps', or 'user timestamps' and why, when kernel ones were refused."""
    why = " (no kernel timestamps: {})".format(refused) if refused else ""
    return "{} timestamps{}".format(timestamps, why)


def format_header(recorder: Recorder, source: Optional[str] = None) -> str:
    """The first line of a measurement, like ping's; from a mesh node, it names the node."""
    spec = recorder.spec
    probes = "{} of {} bytes".format(plural(spec.count, "probe"), recorder.request_size) if spec.count \
        else "probes of {} bytes until stopped".format(recorder.request_size)
    return "{} {}{} ({}): {}, interval {:g} s, timeout {:g} s{}, {}{}".format(
        "STAMP" if spec.protocol == STAMP else "UDP-TIMECHECK",
        "from {} to ".format(source) if source else "",
        recorder.target, recorder.address, probes, spec.interval, spec.timeout,
        ", deadline {:g} s".format(spec.deadline) if spec.deadline else "",
        describe_stamps(recorder.timestamps, recorder.local.no_kernel_stamps),
        ("" if not spec.key else ", HMAC-SHA-256 (authenticated mode)" if spec.protocol == STAMP
         else ", HMAC-SHA256"))


def format_report(figures: Mapping, named: bool = False) -> str:
    """One --report-every line: the period's sent, received, loss, p50, p99, jitter and offset;
    named, it names its target."""
    rtt, line = figures["rtt_ms"], "report{}: {} sent, {} received, {}".format(
        " " + figures["target"] if named else "", figures["sent"], figures["received"], format_loss(figures))
    if rtt["median"] is not None:
        line += ", rtt p50 {:.3f} ms p99 {:.3f} ms".format(rtt["median"], rtt["p99"])
    if figures["jitter_ms"] is not None:
        line += ", jitter {:.3f} ms".format(figures["jitter_ms"])
    if figures["offset_ms"] is not None:
        line += ", offset {} ms \u00b1 {:.3f} ms".format(signed(figures["offset_ms"]),
                                                         figures["offset_err_ms"])
    return line


def fleet_summary(recorders: Sequence[Recorder], summaries: Sequence[Dict[str, Any]],
                  source: Optional[str] = None) -> Dict[str, Any]:
    """The --json of several targets: the run's record, then one element per target with the keys
    of a single target's summary; a mesh node's adds its name as source."""
    record = run_record(recorders[0])
    record["started_at"] = min(summary["started_at"] for summary in summaries)
    record["duration_s"] = max(summary["duration_s"] for summary in summaries)
    if source is not None:
        record["source"] = source
    record["targets"] = list(summaries)
    return record


FLEET_COLUMNS = ("target", "sent", "received", "loss", "min", "p50", "p99", "jitter", "offset \u00b1 error")


def format_round_trip(recorder: Recorder) -> Optional[str]:
    """What the tutorial's client prints of its one round trip: the server's text, or its verdict
    on a liar; None when no reply came (main says why, on stderr)."""
    sample = recorder.samples[0] if recorder.samples else None
    if sample is not None and sample.status == OK:
        return printable(str(sample.reply_text))
    if sample is not None and sample.status == MISMATCHED:
        return "Server is a liar!"
    return None


def format_fleet_table(summaries: Sequence[Mapping], source: Optional[str] = None) -> List[str]:
    """One row per target: sent, received, loss, min, p50, p99, jitter, offset +- error, in one unit."""
    largest = max([summary["rtt_ms"]["max"] or 0 for summary in summaries] + [0])
    unit, scale, digits = time_unit(largest)
    show = lambda value: "-" if value is None else "{:.{}f}".format(value * scale, digits)  # noqa: E731
    rows = [FLEET_COLUMNS]
    for summary in summaries:
        rtt, offset = summary["rtt_ms"], summary["offset_ms"]
        rows.append((summary.get("name") or summary["target"], str(summary["sent"]), str(summary["received"]),
                     "-" if summary["loss_pct"] is None else "{:g}%".format(summary["loss_pct"]),
                     show(rtt["min"]), show(rtt["median"]), show(rtt["p99"]), show(summary["jitter_ms"]),
                     "-" if offset is None else "{} \u00b1 {}".format(
                         signed(offset * scale, digits), show(summary["offset_err_ms"]))))
    title = "--- {}{}, rtt and offset in {} ---".format(
        plural(len(summaries), "target"), " from " + source if source else "", unit)
    return ["", title] + _aligned(rows, first_left=True)


def _aligned(rows: Sequence[Sequence[str]], first_left: bool = False) -> List[str]:
    """Rows of cells as lines, each column as wide as its widest cell, numbers to the right."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) if first_left and column == 0 else cell.rjust(width)
                      for column, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows]


def format_matrix(matrix: Mapping) -> List[str]:
    """The N x N tables: rows are sources, columns targets, by number, with the numbers' legend."""
    nodes, cells = matrix["nodes"], {(cell["source"], cell["target"]): cell for cell in matrix["cells"]}
    sources = [node for node in nodes if any(source == node for source, _ in cells)]
    lines = ["nodes:"] + ["{:>4}  {}".format(index, node) for index, node in enumerate(nodes, 1)]
    lines.append("(rows: from; columns: to, by number; -- the node itself; ? not measured)")
    for title, show in _matrix_tables(cells):
        rows = [["from \\ to"] + [str(index) for index in range(1, len(nodes) + 1)]]
        rows += [[str(nodes.index(source) + 1)] + [_matrix_text(cells, source, target, show)
                                                   for target in nodes] for source in sources]
        lines += ["", title] + _aligned(rows)
    return lines


def _matrix_text(cells: Mapping, source: str, target: str, show: Callable[[Mapping], Optional[str]]) -> str:
    """A cell of the matrix: -- on the diagonal, ? where not measured, - where there is no figure."""
    if source == target:
        return "--"
    if (source, target) not in cells:
        return "?"
    return show(cells[source, target]) or "-"


def _matrix_tables(cells: Mapping) -> List[Tuple[str, Callable[[Mapping], Optional[str]]]]:
    """The matrix's tables: (title, a cell's text or None), every time in one unit."""
    unit, scale, digits = time_unit(max([cell["rtt_p50_ms"] or 0 for cell in cells.values()] + [0]))

    def number(value: float) -> str:
        return "{:.{}f}".format(value * scale, digits)

    def offset(cell: Mapping) -> str:
        return "{}\u00b1{}".format(signed(cell["offset_ms"] * scale, digits), number(cell["offset_err_ms"]))
    tables = [("p50 rtt ({})".format(unit), lambda cell: _unless_none(cell["rtt_p50_ms"], number)),
              ("loss (%)", lambda cell: _unless_none(cell["loss_pct"], "{:g}".format)),
              ("offset \u00b1 error ({}), the target's clock minus the source's".format(unit),
               lambda cell: None if cell["offset_ms"] is None else offset(cell))]  # type: List[Tuple[str, Any]]
    if any(cell.get("not_up") for cell in cells.values()):
        tables.append(("not up (probes sent while the target was not up: refused, or after it said it "
                       "stopped; not lost)", lambda cell: str(cell.get("not_up") or 0)))
    return tables


def _unless_none(value: Optional[float], show: Callable[[float], str]) -> Optional[str]:
    return None if value is None else show(value)


def _xml_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


HEATMAPS = (  # title, the figure a cell is coloured by, its unit, the scale in words
    ("RTT p50", "rtt_p50_ms", "ms", "green (the pair with the least) to red (the most), on a log scale"),
    ("Loss", "loss_pct", "%", "green at 0%, then yellow to red as loss grows to 10% and more"),
    ("Clock offset against its bound", "offset_ms", "ms",
     "green: |offset| within its error bound (the clocks agree); red: beyond it, darker the further"))


def render_matrix_html(matrix: Mapping) -> str:
    """matrix (build_matrix's) as one self-contained page: three N x N heatmaps (RTT p50, loss,
    offset against its bound), each cell's exact figures in its tooltip and data attributes,
    the measurement's time span and each node's clock.  Rows and columns in order of name."""
    nodes = sorted(matrix["nodes"])
    cells = {(cell["source"], cell["target"]): cell for cell in matrix["cells"]}
    starts = sorted(cell["started_at"] for cell in matrix["cells"] if cell.get("started_at"))
    seconds = [cell["duration_s"] for cell in matrix["cells"] if cell.get("duration_s") is not None]
    span = "from {} (UTC), for up to {:.0f} s".format(starts[0], max(seconds)) if starts and seconds \
        else "at a time the files do not say"
    small = len(nodes) > 30  # cells shrink, every label kept in the tooltips, one in step shown
    step = max(1, len(nodes) // 25)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>udp-timecheck: {} nodes</title>".format(len(nodes)), "<style>", MATRIX_CSS,
             "td{{{}}}</style></head><body>".format("width:9px;height:9px;font-size:0" if small else ""),
             "<h1>udp-timecheck matrix: {} nodes</h1>".format(len(nodes)),
             "<p>Measured {}. A row is the node that measured, a column the node it measured; both in "
             "order of name. Hover over a cell for its figures.</p>".format(_xml_text(span))]
    if matrix.get("note"):
        parts.append("<p>{}</p>".format(_xml_text(matrix["note"])))
    for title, figure, unit, scale in HEATMAPS:
        parts += _heatmap(title, figure, unit, scale, nodes, cells, step)
    parts += _clock_table(nodes, matrix["cells"]) + ["</body></html>"]
    return "\n".join(parts) + "\n"


MATRIX_CSS = ("body{font:14px sans-serif;margin:1em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
              "td{border:1px solid #fff;text-align:center;min-width:3.5em;padding:2px}"
              "th{font-weight:normal;padding:2px 4px}th.col{writing-mode:vertical-rl}"
              "td.self{background:#555}td.none{background:#eee;color:#888}.key span{display:inline-block;"
              "padding:2px 8px;margin-right:2px}")


def _heatmap(title: str, figure: str, unit: str, scale: str, nodes: Sequence[str],
             cells: Mapping[Tuple[str, str], Mapping], step: int) -> List[str]:
    """One heatmap: a legend naming its scale, then the table."""
    values = [cell[figure] for cell in cells.values() if cell.get(figure) is not None]
    colour = _colour_scale(figure, values)
    lines = ["<h2>{}</h2>".format(title), '<p class="key">Colour: {}. {}</p>'.format(
        scale, "".join('<span style="background:{}">{}</span>'.format(colour(value, bound), label)
                       for value, bound, label in _heat_legend(figure, values)))]
    head = "".join('<th class="col">{}</th>'.format(_xml_text(name) if index % step == 0 else "")
                   for index, name in enumerate(nodes))
    lines.append('<table data-figure="{}"><tr><th></th>{}</tr>'.format(figure, head))
    for row, source in enumerate(nodes):
        tds = "".join(_heatmap_cell(source, target, cells.get((source, target)), figure, unit, colour)
                      for target in nodes)
        lines.append("<tr><th>{}</th>{}</tr>".format(_xml_text(source) if row % step == 0 else "", tds))
    return lines + ["</table>"]


def _heatmap_cell(source: str, target: str, cell: Optional[Mapping], figure: str, unit: str,
                  colour: Callable[[float, Optional[float]], str]) -> str:
    pair = _xml_text("{} to {}".format(source, target)).replace('"', "&quot;")
    if source == target:
        return '<td class="self" title="{}: itself">&#8212;</td>'.format(pair)
    if cell is None or cell.get(figure) is None:
        return '<td class="none" title="{}: not measured">&#183;</td>'.format(pair)
    data = " ".join('data-{}="{}"'.format(key.replace("_", "-"), "" if cell.get(key) is None else cell[key])
                    for key in ("rtt_p50_ms", "rtt_p99_ms", "loss_pct", "lost_up", "lost_down", "offset_ms",
                                "offset_err_ms", "sent"))
    shown = "{:.3g}".format(cell[figure])
    return '<td style="background:{}" title="{}: {}" data-source="{}" data-target="{}" {}>{}</td>'.format(
        colour(cell[figure], cell.get("offset_err_ms")), pair, _xml_text(_cell_words(cell)),
        _xml_text(source).replace('"', "&quot;"), _xml_text(target).replace('"', "&quot;"), data, shown)


def _cell_words(cell: Mapping) -> str:
    """A pair's exact figures, as its tooltip says them."""
    def ms(value: Optional[float]) -> str:
        return "?" if value is None else "{:g} ms".format(value)
    split = "" if cell.get("lost_up") is None else " (out {}, back {})".format(cell["lost_up"],
                                                                                cell["lost_down"])
    offset = "?" if cell.get("offset_ms") is None else "{:+g} ms ± {}".format(cell["offset_ms"],
                                                                                  ms(cell["offset_err_ms"]))
    return "RTT p50 {}, p99 {}; loss {}%{}; offset {}; {} probes".format(
        ms(cell["rtt_p50_ms"]), ms(cell.get("rtt_p99_ms")), "?" if cell["loss_pct"] is None
        else "{:g}".format(cell["loss_pct"]), split, offset,
        "?" if cell.get("sent") is None else cell["sent"])


def _colour_scale(figure: str, values: Sequence[float]) -> Callable[[float, Optional[float]], str]:
    """How a figure's value becomes a cell's colour (an HSL hue from green, 120, to red, 0)."""
    if figure == "rtt_p50_ms":
        low = math.log(max(min(values, default=1.0), 1e-6))
        high = math.log(max(max(values, default=1.0), 1e-6))
        return lambda value, bound: "hsl({:.0f},70%,55%)".format(120 * (1 - (
            math.log(max(value, 1e-6)) - low) / (high - low) if high > low else 1))
    if figure == "loss_pct":
        return lambda value, bound: "hsl(120,60%,55%)" if value == 0 else "hsl({:.0f},80%,55%)".format(
            60 * (1 - min(value, 10.0) / 10.0))
    return lambda value, bound: "hsl(120,60%,55%)" if bound is not None and abs(value) <= bound else \
        "hsl(0,80%,{:.0f}%)".format(max(30, 65 - 5 * math.log2(1 + abs(value) / max(bound or 0, 1e-6))))


def _heat_legend(figure: str, values: Sequence[float]) -> List[Tuple[float, Optional[float], str]]:
    """A heatmap's legend: (value, bound, label) for each colour it shows."""
    if figure == "rtt_p50_ms":
        low, high = min(values, default=0.0), max(values, default=0.0)
        return [(low, None, "{:g} ms".format(low)), (high, None, "{:g} ms".format(high))]
    if figure == "loss_pct":
        return [(0, None, "0%"), (1, None, "1%"), (5, None, "5%"), (10, None, "10%+")]
    return [(0.0, 1.0, "within its bound"), (2.0, 1.0, "2x its bound"), (100.0, 1.0, "100x")]


def _clock_table(nodes: Sequence[str], cells: Sequence[Mapping]) -> List[str]:
    """Each node's clock, as its kernel said it at the end of its run."""
    state = {cell["source"]: cell for cell in cells}
    lines = ["<h2>Each node's clock</h2>",
             "<table><tr><th>node</th><th>synchronised</th><th>max error</th></tr>"]
    for node in nodes:
        cell = state.get(node, {})
        synced = {True: "yes", False: "NO", None: "unknown"}[cell.get("clock_synchronized")]
        error = "?" if cell.get("clock_maxerror_ms") is None else "{:g} ms".format(cell["clock_maxerror_ms"])
        lines.append("<tr><th>{}</th><td>{}</td><td>{}</td></tr>".format(_xml_text(node), synced, error))
    return lines + ["</table>"]


def round_ticks(low: float, high: float, most: int = 6, whole: bool = False) -> List[float]:
    """Ticks at round values (1, 2 or 5 times a power of ten; whole numbers when whole) that
    cover low to high, at most most + 1 of them: the first at or below low, the last at or above high."""
    if not high > low:
        low, high = (low - abs(low) / 2, high + abs(high) / 2) if low else (0.0, 1.0)
    raw = max((high - low) / most, 1 if whole else 0)
    power = 10 ** math.floor(math.log10(raw))
    step = next(factor * power for factor in (1, 2, 5, 10) if factor * power >= raw)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(index * step, 12) for index in range(first, last + 1)]


def tick_label(value: float) -> str:
    """A round tick's value as people write it: 0.5, 20, 1e+03 only when it must."""
    return "{:g}".format(value)


class Panel:
    """One chart of the SVG: its frame, axes and round ticks, and the mapping from data to pixels."""

    def __init__(self, name: str, top: float, x_range: Tuple[float, float], y_range: Tuple[float, float],
                 labels: Tuple[str, str, str], counts: bool = False) -> None:
        self.name, self.top, self.labels = name, top, labels
        self.x_ticks, self.y_ticks = round_ticks(*x_range), round_ticks(*y_range, whole=counts)
        (self.x_low, self.x_high), (self.y_low, self.y_high) = (
            (ticks[0], ticks[-1]) for ticks in (self.x_ticks, self.y_ticks))

    def x(self, value: float) -> float:
        return round(SVG_LEFT + (value - self.x_low) / (self.x_high - self.x_low) * SVG_PLOT_WIDTH, 1)

    def y(self, value: float) -> float:
        """The pixel row; an outlier beyond the range sits on the frame's edge."""
        share = min(1.0, max(0.0, (value - self.y_low) / (self.y_high - self.y_low)))
        return round(self.top + SVG_PANEL - share * SVG_PANEL, 1)

    def frame(self, x_ticks: bool = True) -> List[str]:
        title, x_label, y_label = (_xml_text(label) for label in self.labels)
        bottom, right = self.top + SVG_PANEL, SVG_LEFT + SVG_PLOT_WIDTH
        parts = ['<g id="{}">'.format(self.name),
                 '<text x="{}" y="{}" font-size="14">{}</text>'.format(SVG_LEFT, self.top - 8, title),
                 '<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#888"/>'.format(
                     SVG_LEFT, self.top, SVG_PLOT_WIDTH, SVG_PANEL),
                 '<text x="{}" y="{}" text-anchor="middle">{}</text>'.format(
                     SVG_LEFT + SVG_PLOT_WIDTH / 2, bottom + 32, x_label),
                 '<text x="14" y="{0}" transform="rotate(-90 14 {0})" text-anchor="middle">{1}</text>'.format(
                     self.top + SVG_PANEL / 2, y_label)]
        for value in self.x_ticks if x_ticks else ():
            parts.append('<text class="tick" x="{}" y="{}" text-anchor="middle">{}</text>'.format(
                self.x(value), bottom + 16, tick_label(value)))
        for value in self.y_ticks:
            parts.append('<text class="tick" x="{}" y="{}" text-anchor="end">{}</text>'.format(
                SVG_LEFT - 6, self.y(value) + 4, tick_label(value)))
            parts.append('<line x1="{0}" x2="{1}" y1="{2}" y2="{2}" stroke="#eee"/>'.format(
                SVG_LEFT, right, self.y(value)))
        return parts


def render_svg(plot: Mapping) -> str:
    """A run as a standalone SVG that any browser opens, in one time unit (us when every RTT is
    under a millisecond, else ms) on round ticks.  One target: RTT over time with the lost probes
    marked, the clock offset with its error bars and drift line, and the RTT histogram.  Several:
    a legend, each one's median RTT and offset over time as a line of its own, and its loss."""
    if len(plot["targets"]) > 1:
        return _render_fleet_svg(plot)
    plot = dict(plot, **plot["targets"][0])
    height = SVG_TOP + 3 * (SVG_PANEL + SVG_GAP)
    unit = time_unit(plot["largest_rtt_ms"])[:2]
    parts = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<svg xmlns="http://www.w3.org/2000/svg" width="{0}" height="{1}" viewBox="0 0 {0} {1}" '
             'font-family="sans-serif" font-size="11">'.format(SVG_WIDTH, height),
             '<rect width="100%" height="100%" fill="white"/>',
             '<text x="{}" y="24" font-size="16">{}</text>'.format(SVG_LEFT, _xml_text(plot["title"]))]
    for index, panel in enumerate((_rtt_panel, _offset_panel, _histogram_panel)):
        parts += panel(plot, SVG_TOP + index * (SVG_PANEL + SVG_GAP), unit) + ["</g>"]
    return "\n".join(parts + ["</svg>", ""])


def _rtt_panel(plot: Mapping, top: float, unit: Tuple[str, float]) -> List[str]:
    """Per interval: a bar from the fastest RTT to the 99th percentile, a dot at the median;
    a red tick above each interval that lost probes."""
    name, scale = unit
    answered = [item for item in plot["bins"] if item["rtt_ms"]]
    highest = _robust_range([item["rtt_ms"][2] * scale for item in answered])[1]
    panel = Panel("rtt", top, (0, plot["duration_s"]), (0, highest * 1.1), (
        "Round-trip time, per interval: fastest to 99th percentile, and median", "seconds into the run",
        "rtt ({})".format(name)))
    parts = panel.frame()
    for item in answered:
        x = panel.x((item["start_s"] + item["end_s"]) / 2)
        low, middle, high = (value * scale for value in item["rtt_ms"])
        parts.append('<line x1="{0}" x2="{0}" y1="{1}" y2="{2}" stroke="#9ecae1" stroke-width="2"/>'.format(
            x, panel.y(low), panel.y(high)))
        parts.append('<circle cx="{}" cy="{}" r="1.8" fill="#08519c"/>'.format(x, panel.y(middle)))
    for item in plot["bins"]:
        if item["lost"]:
            x = panel.x((item["start_s"] + item["end_s"]) / 2)
            parts.append('<line class="lost" x1="{0}" x2="{0}" y1="{1}" y2="{2}" stroke="#d62728" '
                         'stroke-width="2"><title>{3} lost</title></line>'.format(
                             x, top, top + 10, item["lost"]))
    return parts


def _offset_panel(plot: Mapping, top: float, unit: Tuple[str, float]) -> List[str]:
    """Each interval's best offset with its error bar, and the fitted drift line between steps."""
    name, scale = unit
    points = [(item, item["offset_ms"] * scale, item["offset_err_ms"] * scale) for item in plot["bins"]
              if item["offset_ms"] is not None]
    lines = _drift_segments(plot["drift"], scale)
    panel = Panel("offset", top, (0, plot["duration_s"]), _offset_range(points, lines), (
        "Server clock offset, per interval: the lowest-rtt probe, \u00b1 half its rtt; the drift fit",
        "seconds into the run", "offset ({})".format(name)))
    parts = panel.frame() + _error_bars(panel, points) + _drift_lines(panel, lines, top)
    if not points:
        parts.append('<text x="{}" y="{}">no offset: no probe\'s timestamps could be trusted</text>'.format(
            SVG_LEFT + 10, top + 20))
    return parts


def _offset_range(points: Sequence[Tuple[Mapping, float, float]],
                  lines: Sequence[Tuple[float, float, float, float]]) -> Tuple[float, float]:
    """The offsets' and the drift lines' span, a typical error bar wider on each side."""
    values = [offset for _, offset, _ in points]
    values += [start + slope * at for first, last, start, slope in lines for at in (first, last)]
    margin = percentile(sorted(error for _, _, error in points) or [0.5], 0.5)
    return min(values or [0]) - margin, max(values or [1]) + margin


def _drift_segments(fit: Optional[DriftFit], scale: float) -> List[Tuple[float, float, float, float]]:
    """The drift fit's segments as (first s, last s, offset at 0, slope), in the plot's unit."""
    if fit is None:
        return []
    slope = fit.drift_ppm / 1e3 * scale  # ppm: 1e-3 ms a second
    return [(first, last, intercept / 1e6 * scale, slope) for first, last, intercept in fit.segments]


def _error_bars(panel: "Panel", points: Sequence[Tuple[Mapping, float, float]]) -> List[str]:
    """Each interval's best offset, a dot, with its error bar."""
    parts = []
    for item, offset, error in points:
        x = panel.x((item["start_s"] + item["end_s"]) / 2)
        parts.append('<line x1="{0}" x2="{0}" y1="{1}" y2="{2}" stroke="#bbb"/>'.format(
            x, panel.y(offset - error), panel.y(offset + error)))
        parts.append('<circle cx="{}" cy="{}" r="1.8" fill="#31a354"/>'.format(x, panel.y(offset)))
    return parts


def _drift_lines(panel: "Panel", lines: Sequence[Tuple[float, float, float, float]], top: float) -> List[str]:
    """The drift fit, a line for each segment between clock steps, and a dashed mark at each step."""
    parts = []
    for index, (first, last, start, slope) in enumerate(lines):
        parts.append('<line class="drift" x1="{}" y1="{}" x2="{}" y2="{}" stroke="#e6550d" '
                     'stroke-width="1.5"/>'.format(panel.x(first), panel.y(start + slope * first),
                                                   panel.x(last), panel.y(start + slope * last)))
        if index:
            parts.append('<line class="step" x1="{0}" x2="{0}" y1="{1}" y2="{2}" stroke="#e6550d" '
                         'stroke-dasharray="4 3"/>'.format(panel.x(first), top, top + SVG_PANEL))
    return parts


def _robust_range(values: Sequence[float]) -> Tuple[float, float]:
    """From the 2nd to the 98th percentile, so that one cold first probe does not flatten the rest."""
    if not values:
        return 0.0, 1.0
    ordered = sorted(values)
    return percentile(ordered, 0.02), percentile(ordered, 0.98)


def _histogram_panel(plot: Mapping, top: float, unit: Tuple[str, float]) -> List[str]:
    name, scale = unit
    rows = plot["histogram_ms"]
    panel = Panel("histogram", top, (0, max(1, len(rows))), (0, max([row[2] for row in rows] or [1])), (
        "Round-trip time histogram (rows of equal logarithmic width)", "rtt ({}), from - to".format(name),
        "probes"), counts=True)
    parts = panel.frame(x_ticks=False)  # each bar is labelled with its range instead
    for index, (low, high, count) in enumerate(rows):
        parts.append('<rect x="{}" y="{}" width="{}" height="{}" fill="#6baed6"><title>{:.3g} - {:.3g} {}: {}'
                     '</title></rect>'.format(panel.x(index) + 2, panel.y(count),
                                              round(panel.x(1) - panel.x(0) - 4, 1),
                                              round(panel.y(0) - panel.y(count), 1),
                                              low * scale, high * scale, name, count))
        parts.append('<text x="{}" y="{}" text-anchor="middle">{:.3g} - {:.3g}</text>'.format(
            panel.x(index + 0.5), top + SVG_PANEL + 16, low * scale, high * scale))
    return parts


# 20 colours told apart at a glance (Sasha Trubetskoy's list, its palest two darkened); past 20,
# the lines repeat them, dashed.
TARGET_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
                  "#800000", "#469990", "#000075", "#808000", "#e6a800", "#a9a9a9", "#000000", "#bfef45",
                  "#fabed4", "#dcbeff", "#aaffc3", "#ffd8b1")
DASHES = ("", ' stroke-dasharray="6 3"', ' stroke-dasharray="2 2"')


def _render_fleet_svg(plot: Mapping) -> str:
    """Several targets: readable for 20 and more, each line told apart by its colour and dashes."""
    targets = plot["targets"]
    legend_rows = math.ceil(len(targets) / 4)
    top = SVG_TOP + 16 * legend_rows + 20
    height = top + 3 * (SVG_PANEL + SVG_GAP)
    parts = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<svg xmlns="http://www.w3.org/2000/svg" width="{0}" height="{1}" viewBox="0 0 {0} {1}" '
             'font-family="sans-serif" font-size="11">'.format(SVG_WIDTH, height),
             '<rect width="100%" height="100%" fill="white"/>',
             '<text x="{}" y="24" font-size="16">{}</text>'.format(SVG_LEFT, _xml_text(plot["title"]))]
    parts += _legend(targets, SVG_TOP - 10)
    unit = time_unit(plot["largest_rtt_ms"])[:2]
    for index, panel in enumerate((_fleet_rtt_panel, _fleet_offset_panel, _fleet_loss_panel)):
        parts += panel(plot, top + index * (SVG_PANEL + SVG_GAP), unit) + ["</g>"]
    return "\n".join(parts + ["</svg>", ""])


def _style(index: int) -> Tuple[str, str]:
    """A target's colour, and its dashes once the colours run out."""
    return TARGET_COLOURS[index % len(TARGET_COLOURS)], DASHES[index // len(TARGET_COLOURS) % len(DASHES)]


def _legend(targets: Sequence[Mapping], top: float) -> List[str]:
    parts = ['<g id="legend">']
    for index, target in enumerate(targets):
        colour, dashes = _style(index)
        x, y = SVG_LEFT + (index % 4) * SVG_PLOT_WIDTH / 4, top + 16 * (index // 4)
        parts.append('<line x1="{0}" x2="{1}" y1="{2}" y2="{2}" stroke="{3}" stroke-width="3"{4}/>'.format(
            x, x + 24, y - 4, colour, dashes))
        parts.append('<text x="{}" y="{}">{}</text>'.format(x + 30, y, _xml_text(target["target"])))
    return parts + ["</g>"]


def _fleet_rtt_panel(plot: Mapping, top: float, unit: Tuple[str, float]) -> List[str]:
    name, scale = unit
    lines = [_points(target, lambda item: item["rtt_ms"] and item["rtt_ms"][1], scale)
             for target in plot["targets"]]
    panel = Panel("rtt", top, (0, plot["duration_s"]), (0, _robust_range(
        [rtt for line in lines for _, rtt in line])[1] * 1.1), (
        "Round-trip time per target: the median of each interval", "seconds into the run",
        "rtt ({})".format(name)))
    return panel.frame() + [_polyline(panel, index, line) for index, line in enumerate(lines) if line]


def _fleet_offset_panel(plot: Mapping, top: float, unit: Tuple[str, float]) -> List[str]:
    name, scale = unit
    lines = [_points(target, lambda item: item["offset_ms"], scale) for target in plot["targets"]]
    low, high = _robust_range([offset for line in lines for _, offset in line])
    panel = Panel("offset", top, (0, plot["duration_s"]), (min(low, 0), max(high, 0)), (
        "Each server's clock offset: the lowest-rtt probe of each interval", "seconds into the run",
        "offset ({})".format(name)))
    return panel.frame() + [_polyline(panel, index, line) for index, line in enumerate(lines) if line]


def _points(target: Mapping, value: Callable[[Mapping], Optional[float]],
            scale: float) -> List[Tuple[float, float]]:
    """A target's line: (the middle of each interval, its value there, scaled), where it has one."""
    return [((item["start_s"] + item["end_s"]) / 2, value(item) * scale) for item in target["bins"]  # type: ignore
            if value(item) is not None]


def _fleet_loss_panel(plot: Mapping, top: float, unit: Tuple[str, float]) -> List[str]:
    targets = plot["targets"]
    highest = max([target["loss_pct"] or 0 for target in targets] + [1])
    panel = Panel("loss", top, (0, max(1, len(targets))), (0, highest), (
        "Loss per target", "targets, in the legend's order", "lost (%)"))
    parts = panel.frame(x_ticks=False)
    for index, target in enumerate(targets):
        loss = target["loss_pct"] or 0
        parts.append('<rect class="loss" x="{}" y="{}" width="{}" height="{}" fill="{}"><title>{}: {:g}% lost'
                     '</title></rect>'.format(panel.x(index) + 1, panel.y(loss),
                                              max(1, panel.x(1) - panel.x(0) - 2),
                                              round(panel.y(0) - panel.y(loss), 1), _style(index)[0],
                                              _xml_text(target["target"]), loss))
    return parts


def _polyline(panel: Panel, index: int, points: Sequence[Tuple[float, float]]) -> str:
    colour, dashes = _style(index)
    return '<polyline class="target" fill="none" stroke="{}" stroke-width="1.5"{} points="{}"/>'.format(
        colour, dashes, " ".join("{},{}".format(panel.x(at), panel.y(value)) for at, value in points))


def load_measurement(path: str) -> Tuple[str, List[Dict[str, Any]]]:
    """(source, a cell a target) from a --json output, a mesh node's or a client's (with
    --report-every, its last line); the source is the node's name, else the file's.  Read up to
    MAX_MEASUREMENT_FILE bytes before any parsing, and every figure checked: a usage error names
    the file and the key; a name is made safe for a terminal."""
    data = read_input(path, MAX_MEASUREMENT_FILE, "matrix input", stdin=True)[0]
    try:
        lines = [line for line in data.decode("utf-8").splitlines() if line.strip()]
        measurement = _STRICT_JSON.decode(lines[-1]) if lines else None
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, NaN, too deep or long a number
        raise TimecheckError("matrix input {} is not JSON ({}): matrix reads what 'mesh --json' or 'client "
                             "--json' printed, a file a node".format(path, _json_error(exc))) from None
    if not isinstance(measurement, dict):
        raise TimecheckError("matrix input {} is not the --json output of a udp-timecheck client or mesh "
                             "node".format(path))
    summaries = measurement.get("targets", [measurement])
    if not isinstance(summaries, list):
        raise TimecheckError("{}: 'targets' is not a list".format(path))
    source = measurement.get("source") or os.path.splitext(os.path.basename(path))[0]
    return printable(str(source)), [_matrix_cell(path, index, item) for index, item in enumerate(summaries)]


def _json_error(exc: Exception) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0]


# name: (where in a summary, the least, the most, may be null); every time in ms, loss in %
MATRIX_FIGURES = {"rtt_p50_ms": (("rtt_ms", "median"), 0.0, 1e12, True),
                  "loss_pct": (("loss_pct",), 0.0, 100.0, True),
                  "offset_ms": (("offset_ms",), -1e12, 1e12, True),
                  "offset_err_ms": (("offset_err_ms",), 0.0, 1e12, True),
                  "not_up": (("not_up",), 0, 1e15, False),
                  # for the page's tooltips: absent from older files, so null when absent
                  "rtt_p99_ms": (("rtt_ms", "p99"), 0.0, 1e12, True),
                  "lost_up": (("lost_up",), 0, 1e15, True),
                  "lost_down": (("lost_down",), 0, 1e15, True), "sent": (("sent",), 0, 1e15, True),
                  "duration_s": (("duration_s",), 0.0, 1e12, True),
                  "clock_maxerror_ms": (("clock", "local", "maxerror_ms"), 0.0, 1e15, True)
                  }  # type: Dict[str, Tuple[Tuple[str, ...], float, float, bool]]
MATRIX_OPTIONAL = ("rtt_p99_ms", "lost_up", "lost_down", "sent", "duration_s", "clock_maxerror_ms")
_ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")


def _matrix_cell(path: str, index: int, summary: object) -> Dict[str, Any]:
    """A target's figures, each where a matrix cell has it, every one a finite number in range."""
    where = "{}: targets[{}]".format(path, index)
    if not isinstance(summary, dict) or not isinstance(summary.get("target"), str):
        raise TimecheckError("{} is not a target's summary (no 'target')".format(where))
    name = summary.get("name") or summary["target"]
    cell = {"target": printable(name if isinstance(name, str) else summary["target"])}  # type: Dict[str, Any]
    clock = summary.get("clock")
    local = clock.get("local") if isinstance(clock, dict) else None
    cell.update(_cell_marks(summary.get("started_at"), local.get("synchronized") if isinstance(local, dict)
                            else None))
    for figure, (keys, least, most, nullable) in MATRIX_FIGURES.items():
        missing = None if figure in MATRIX_OPTIONAL else "nothing"
        value = summary.get(keys[0], 0 if figure == "not_up" else missing)  # type: Any
        for key in keys[1:]:
            value = value.get(key, missing) if isinstance(value, dict) else missing
        if value is None and nullable:
            cell[figure] = None
        elif not _in_range(figure, value):
            raise TimecheckError("{}.{}: expected {} from {:g} to {:g}, got {}".format(
                where, ".".join(keys), "null or a number" if nullable else "a number", least, most,
                clip(value if value == "nothing" else json.dumps(value), 40)))
        else:
            cell[figure] = value
    return cell


def _in_range(figure: str, value: Any) -> bool:
    """Whether value is a number (NaN is not) within a matrix figure's range."""
    least, most = MATRIX_FIGURES[figure][1:3]
    return type(value) in (int, float) and least <= value <= most


def _cell_marks(started: Any, synchronized: Any) -> Dict[str, Any]:
    """A cell's start time (ISO 8601, UTC) and its node's clock state, each None unless well formed."""
    return {"started_at": started if isinstance(started, str) and _ISO_UTC.fullmatch(started) else None,
            "clock_synchronized": synchronized if isinstance(synchronized, bool) else None}


def build_matrix(measurements: Sequence[Tuple[str, Sequence[Mapping]]],
                 files: Sequence[str] = ()) -> Dict[str, Any]:
    """Every (source, target) pair's p50 RTT, loss, offset and probes not up; nodes in order of
    appearance.  Two files of one source node are a usage error that names them (files)."""
    seen = {}  # type: Dict[str, str]
    for (source, _), path in zip(measurements, list(files) or [""] * len(measurements)):
        if source in seen:
            raise TimecheckError("{} and {} are both {}'s measurements: give one".format(seen[source], path,
                                                                                       source))
        seen[source] = path
    cells = [dict(cell, source=source) for source, cells_of in measurements for cell in cells_of]
    nodes = list(dict.fromkeys([source for source, _ in measurements] + [cell["target"] for cell in cells]))
    present = {(cell["source"], cell["target"]) for cell in cells}
    missing = [[source, target] for source, _ in measurements for target in nodes
               if source != target and (source, target) not in present]
    return {"nodes": nodes, "cells": cells, "missing": missing}


def dscp_name(tos: int) -> str:
    """A TOS byte in words: its DSCP's name where it has one, and any ECN bits."""
    names = {value << 2: name for name, value in reversed(list(DSCP_NAMES.items()))}
    dscp = names.get(tos & ~3, "DSCP %d" % (tos >> 2))
    return "0x{:02x} ({}{})".format(tos, dscp, ", ECN %d" % (tos & 3) if tos & 3 else "")


# ----------------------------------------------------------------------------------------------
# 8. Command line: outputs, signals, build_parser(), cmd_<name>(args), main()
# ----------------------------------------------------------------------------------------------

STOP_REQUESTED = threading.Event()  # a stop signal came: an output that waits for its reader gives up


class Sink:
    """Lines to a file or to a text stream, the one way every output is written: each line whole,
    to a file straight to the kernel (os.write: no buffer), to a stream written and flushed, so
    that threads never split one.

    The first failure (a full disk, a closed stream, a FIFO's reader gone or stalled) is kept in
    .error and told once to on_error; the lines after it are dropped, and a regular file is cut
    back to its last whole line.  A broken pipe on a stream (stdout piped into head) ends the
    program instead, as it should: from the main thread at once, from another at the main
    thread's next line, never with a traceback in a thread.
    """

    def __init__(self, stream: Optional[TextIO] = None, name: str = "standard output",
                 on_error: Optional[Callable[[str, str], None]] = None, fd: Optional[int] = None) -> None:
        self.name, self.broken_pipe, self._on_error = name, False, on_error
        self.error = None if stream is not None or fd is not None else "it is closed"  # type: Optional[str]
        self._stream, self._fd, self._whole = stream, fd, 0  # bytes of whole lines in a regular file
        self._regular = fd is not None and stat.S_ISREG(os.fstat(fd).st_mode)
        self._encoding = getattr(stream, "encoding", None) or "utf-8"

    @classmethod
    def open(cls, path: str, on_error: Optional[Callable[[str, str], None]] = None) -> "Sink":
        """A file written anew, opened now (a bad path is a usage error, not a lost run) and never
        waiting to: a FIFO without a reader is said to have none."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NONBLOCK", 0), 0o666)
        except OSError as exc:
            why = "it is a FIFO with no reader; start its reader first" if exc.errno == errno.ENXIO \
                else exc.strerror or str(exc)
            raise TimecheckError("cannot write {}: {}".format(path, why)) from None
        return cls(None, path, on_error, fd)

    def line(self, text: str = "") -> None:
        self.write(text + "\n")

    def write(self, text: str) -> None:
        in_main = threading.current_thread() is threading.main_thread()
        if self.broken_pipe and in_main:
            raise BrokenPipeError(errno.EPIPE, "the output's reader has gone")
        if self.error is not None:
            return
        try:
            if self._fd is not None:
                self._write_whole(text.encode(self._encoding, "backslashreplace"))
            else:
                self._stream.write(fit_encoding(text, self._encoding))  # type: ignore[union-attr]
                self._stream.flush()  # type: ignore[union-attr]
        except BrokenPipeError:
            self._failed("the output's reader has gone")
            if self._fd is None:
                self.broken_pipe = True
                if in_main:
                    raise
        except (OSError, ValueError) as exc:
            self._failed(getattr(exc, "strerror", None) or str(exc))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write_whole(self, data: bytes) -> None:
        """All of data, waiting for a slow reader (a FIFO's) while no stop was asked for."""
        waited = 0.0
        while data:
            try:
                data = data[os.write(self._fd, data):]  # type: ignore[arg-type]
            except BlockingIOError:
                if STOP_REQUESTED.is_set() or waited >= SINK_STALL_S:
                    raise OSError(errno.EAGAIN, "its reader has not read for {:g} s".format(waited)) from None
                select.select([], [self._fd or 0], [], 0.1)
                waited += 0.1
        if self._regular:
            self._whole = os.lseek(self._fd, 0, os.SEEK_CUR)  # type: ignore[arg-type]

    def _failed(self, error: str) -> None:
        """Cut a file back to its last whole line, and say so, once."""
        self.error = error
        if self._regular:
            try:
                os.ftruncate(self._fd, self._whole)  # type: ignore[arg-type]
            except OSError:
                pass  # what it could not write is said already
        elif self._fd is None:
            _discard_output(self._stream)
        if self._on_error is not None:
            self._on_error(self.name, error)


def write_whole_file(path: str, text: str) -> Optional[str]:
    """text as the whole of path: written to a file beside it, then renamed into place, so that the
    file is whole or not there (a FIFO, or /dev/stdout, is written in place); why not, or None."""
    try:
        if os.path.exists(path) and not os.path.isfile(path):
            sink = Sink.open(path)
            sink.write(text)
            sink.close()
            return sink.error
        import tempfile  # here: a run without --plot never needs it
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".part")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
            os.chmod(temporary, 0o666 & ~_umask())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except (OSError, TimecheckError) as exc:
        return getattr(exc, "strerror", None) or str(exc)
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_ASCII_STAND_INS = str.maketrans({"\u00b1": "+/-", "\u00b5": "u", "\u2212": "-", "\u2013": "-",
                                  "\u2014": "--", "\u00d7": "x", "\u2026": "..."})


def fit_encoding(text: str, encoding: str) -> str:
    """text as a stream in encoding can take it: ASCII stand-ins for our own symbols (+/- for the
    plus-minus sign), escapes for anything else.  An ASCII or Latin-1 locale never fails."""
    try:
        text.encode(encoding)
        return text
    except UnicodeEncodeError:
        return text.translate(_ASCII_STAND_INS).encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:  # an encoding Python does not know: say it in ASCII
        return text.translate(_ASCII_STAND_INS).encode("ascii", "backslashreplace").decode("ascii")


def _discard_output(stream: Optional[TextIO]) -> None:
    """Point a failed stream at the null device, so that flushing it at exit cannot fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())  # type: ignore[union-attr]
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass


def _err(line: str) -> None:
    """A diagnostic line on stderr; if even stderr fails, there is nowhere left to say so."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


class LineWriter:
    """Lines to a stream from a daemon thread, through a Sink: write() never blocks.

    The server's output, and the client's notes on stderr: a line that finds the
    queue full (the stream is slower than the lines come, or blocked: a pipe nobody
    reads) or that cannot be written (a full disk, a closed or broken stream) is
    dropped and counted.  Serving and probing never wait for it.
    """

    def __init__(self, stream: Optional[TextIO], max_queued: int = LOG_QUEUE_LINES) -> None:
        self.queue_drops = self.write_drops = 0
        self._writing = False  # a line is in os.write (which a blocked pipe holds for ever)
        fd = _file_descriptor(stream)  # a stream without one (a test's capture) is written as a stream
        self._sink = Sink(None if fd is not None else stream, fd=fd)
        if fd is not None:
            self._sink._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._queue = queue.Queue(max_queued)  # type: queue.Queue  # (line or None, Event to set, last)
        self.thread = _thread(self._run, "udp-timecheck-output")

    @property
    def dropped(self) -> int:
        return self.queue_drops + self.write_drops

    def write(self, line: str) -> None:
        try:
            self._queue.put_nowait((line, None, False))
        except queue.Full:
            self.queue_drops += 1

    def sync(self, timeout: float = 0.5) -> bool:
        """Wait at most timeout seconds for the lines written so far; False if they did not all go."""
        return self._wait_for(None, False, timeout)

    def close(self, final_line: str, timeout: float = 0.5) -> bool:
        """Write final_line after the others, waiting at most timeout seconds; False if not written."""
        return self._wait_for(final_line, True, timeout)

    def abandon(self) -> int:
        """Give up on the lines still waiting for a stream that did not take them in time (a
        pipe nobody reads): they are dropped, and counted; returns how many."""
        with self._queue.mutex:
            waiting = sum(1 for line, written, _ in self._queue.queue if line is not None and written is None)
        abandoned = waiting + self._writing
        self.write_drops += abandoned
        return abandoned

    def _wait_for(self, line: Optional[str], last: bool, timeout: float) -> bool:
        deadline, written = time.monotonic() + timeout, threading.Event()
        try:
            self._queue.put((line, written, last), timeout=timeout)
        except queue.Full:
            return False
        return written.wait(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while True:
            line, written, last = self._queue.get()
            self._writing = line is not None
            if line is not None:
                self._sink.line(line)
            went = line is None or self._sink.error is None
            self._writing = False
            self.write_drops += not went
            if written is not None and went:
                written.set()
            if last:
                return


def _file_descriptor(stream: Optional[TextIO]) -> Optional[int]:
    try:
        return stream.fileno()  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return None  # closed (python ... >&-), or not a file at all


@contextlib.contextmanager
def _stop_signals(on_signal: Callable[[], None], restore: bool = True) -> Iterator[None]:
    """Call on_signal() once, at the first Ctrl-C or SIGTERM while inside, even if SIGINT came
    ignored; the handler does nothing more after that, so that no storm of them can nest it.

    restore=False (the program itself, about to exit): from the first signal on, both are held
    back (blocked) and stay so, a no-op handler left in place, so that none during the exit, nor
    after the interpreter resets its handlers to the default, changes anything.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums, fired = (signal.SIGINT, signal.SIGTERM), []  # type: Tuple[int, int], List[bool]
    block = getattr(signal, "pthread_sigmask", None)  # not on Windows

    def handler(signum: int, frame: object) -> None:
        if fired:
            return
        fired.append(True)
        STOP_REQUESTED.set()
        if not restore and block is not None:
            block(signal.SIG_BLOCK, signums)
        on_signal()

    previous = {signum: signal.getsignal(signum) for signum in signums}
    for signum in signums:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        if restore:
            for signum, old in previous.items():
                signal.signal(signum, signal.SIG_DFL if old is None else old)
            STOP_REQUESTED.clear()
        elif block is not None:
            block(signal.SIG_BLOCK, signums)  # held back for good: the handler stays, and never runs
        else:
            for signum in signums:
                signal.signal(signum, signal.SIG_IGN)


def format_row(sample: Sample, kind: str) -> str:
    """One probe as a CSV row (SAMPLE_FIELDS, in order) or a JSON Lines object, with its newline."""
    record = sample_record(sample)
    if kind == "jsonl":
        return json.dumps(record) + "\n"
    import csv  # here: only --csv needs it (start-up is paid on every run)
    buffer = io.StringIO()
    csv.writer(buffer).writerow(["" if record[name] is None else record[name] for name in SAMPLE_FIELDS])
    return buffer.getvalue()


class Rows:
    """--csv or --jsonl: a row per probe, through a Sink, as the probes end (seq order); CSV with a
    header row.  A file is opened before anything is sent."""

    def __init__(self, sink: Sink, kind: str) -> None:
        self.sink, self.kind = sink, kind
        if kind == "csv":
            sink.write(",".join(SAMPLE_FIELDS) + "\r\n")

    @property
    def name(self) -> str:
        return self.sink.name

    @property
    def error(self) -> Optional[str]:
        return self.sink.error

    def add(self, sample: Sample) -> None:
        if self.sink.error is None:
            self.sink.write(format_row(sample, self.kind))


class Progress:
    """Probes done and the time left, a few times a second, on a terminal: with -q, a long run
    is not silent.  Nothing at all when the stream is not a terminal."""

    def __init__(self, stream: Optional[TextIO], total: int) -> None:
        self._sink = Sink(stream, "the terminal") if stream is not None and stream.isatty() else None
        self._total, self._started, self._next = total, time.monotonic(), 0.0
        self._shown = False

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self._sink is None or now < self._next:
            return
        self._next = now + PROGRESS_EVERY
        if not self._total:  # until stopped
            self._show("\r{}, {:.0f} s ".format(plural(done, "probe"), now - self._started))
            return
        left = (now - self._started) / done * (self._total - done) if done else 0
        self._show("\r{}/{}, about {:.0f} s left ".format(done, plural(self._total, "probe"), left))

    def clear(self) -> None:
        if self._shown:
            self._show("\r" + " " * 60 + "\r")

    def _show(self, text: str) -> None:
        self._sink.write(text)  # type: ignore[union-attr]
        self._shown = True

def _ranged(convert: Callable[[str], float], low: float, high: float, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:  # NaN fails too
            raise argparse.ArgumentTypeError("expected {}, got {!r}".format(what, text))
        return value
    return parse


def _truthy(text: str) -> bool:
    if text.lower() in ("1", "true", "t", "yes", "y"):
        return True
    if text.lower() in ("0", "false", "f", "no", "n"):
        return False
    raise argparse.ArgumentTypeError("expected 1/true/yes or 0/false/no, got {!r}".format(text))


def _host_and_port(text: str) -> Tuple[str, int]:
    """NTPHOST[:PORT], with [IPv6]:PORT for an IPv6 address and a port."""
    try:
        host, port = split_target(text)
    except TimecheckError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return host, NTP_PORT if port is None else port


def _listen_address(text: str) -> Tuple[str, int]:
    """--metrics [HOST:]PORT: on 127.0.0.1 unless a host is given ([::1]:PORT for IPv6)."""
    try:
        if is_number(text):
            return "127.0.0.1", port_number(text, text, 0)
        host, port = split_target(text, 0)
    except TimecheckError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if port is None:
        raise argparse.ArgumentTypeError("expected [HOST:]PORT, got {!r}".format(text))
    return host, port


def _source_address(text: str) -> str:
    """-I: an address this machine can send from: not multicast, broadcast or unspecified."""
    import ipaddress
    try:
        address = ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return text  # a name: the kernel says whether it is this machine's
    kind = "multicast" if address.is_multicast else "unspecified" if address.is_unspecified else \
        "broadcast" if address == ipaddress.IPv4Address("255.255.255.255") else None
    if kind is not None:
        raise argparse.ArgumentTypeError("{!r} is a {} address: it cannot be a source".format(text, kind))
    return text


def _interval(text: str) -> float:
    """0 (back to back) or from MIN_INTERVAL: below that, the "loss" would be our own doing."""
    what = "0 (back to back) or seconds from {:g} to 3600".format(MIN_INTERVAL)
    value = _ranged(float, 0, 3600, what)(text)
    if 0 < value < MIN_INTERVAL:
        raise argparse.ArgumentTypeError("expected {}, got {!r}".format(what, text))
    return value


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line through main(), exit code 2
        raise TimecheckError("{} (see: {} --help)".format(message, self.prog))


class _Options:
    """Where a command's options go: its own list, or a titled group that only --help-all
    shows (so that --help fits a screen); an option works the same wherever it is listed."""

    def __init__(self, parser: Any, title: Optional[str] = None, shown: bool = True) -> None:
        self.group = parser if title is None else parser.add_argument_group(title)
        self.shown = shown

    def add(self, *names: str, **settings: Any) -> argparse.Action:
        if not self.shown:
            settings["help"] = argparse.SUPPRESS
        return self.group.add_argument(*names, **settings)

    def exclusive(self) -> "_Options":
        """Options of which at most one may be given (-4 or -6)."""
        options = _Options(self.group)
        options.group, options.shown = self.group.add_mutually_exclusive_group(), self.shown
        return options


class _HelpAll(argparse.Action):
    """--help-all: the command's help with every option, in its groups; then exit."""

    def __init__(self, option_strings: Sequence[str], dest: str, command: str = "", top: str = "",
                 **settings: Any) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, **settings)
        self.command, self.top = command, top

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        build_parser(self.top, full_help=True).parse_args([self.command, "--help"])


SERVER_EPILOG = """examples:
  %(prog)s 0.0.0.0 1060     all IPv4 interfaces: a cloud VM's
  %(prog)s :: 1060 -q       all IPv6 interfaces, IPv4 too; quiet

exit codes: 0 stopped by Ctrl-C or SIGTERM; 2 a usage or set-up error"""
# What makes the client measure: an option that only makes sense for a measurement.  -W,
# --key-file, -4 and -6 do not (one round trip has a timeout, may need a key, and a family).
MEASURING_OPTIONS = (("measure_delay", "--measure-delay"), ("count", "-c"), ("interval", "-i"),
                     ("deadline", "-w"), ("quiet", "-q"), ("json", "--json"), ("csv", "--csv"),
                     ("jsonl", "--jsonl"), ("plot", "--plot"), ("reference", "--reference"),
                     ("report_every", "--report-every"), ("print_time", "-D"), ("size", "--size"),
                     ("timestamps", "--timestamps"), ("metrics", "--metrics"), ("tos", "--tos"),
                     ("ttl", "--ttl"), ("ports", "--ports"))
MEASURING_RULE = """Without options the client asks once, as the tutorial's does.  Any of
--measure-delay, -c, -i, -w, -q, --json, --csv, --jsonl, --plot, --reference,
--report-every, -D, --size, --timestamps, --metrics, --tos, --ttl, --ports
makes it measure, as ping does: a probe a second until Ctrl-C, -c or -w.
--measure-delay is the tutorial's loop: 1000 probes, each sent when the last
is answered or timed out (-i 0).  -W, --key-file, -4, -6, -I and --interleaved
do not make it measure."""  # its options are MEASURING_OPTIONS (a test holds them equal)
CLIENT_EPILOG = MEASURING_RULE + """

examples:
  %(prog)s 203.0.113.7 1060            the server's time, once
  %(prog)s 203.0.113.7 1060 -c 20      20 probes, a second apart
  %(prog)s 203.0.113.7:1060 --measure-delay --json

exit codes: 0 a valid reply, and no liar, forged reply or echo; 1 no valid
reply, a liar, a forged reply or an echo service; 2 a usage or set-up error"""
TOP_EPILOG = """examples:
  %(prog)s demo                           a server and a client, here
  %(prog)s server 0.0.0.0 1060            serve on every IPv4 interface
  %(prog)s client 203.0.113.7 1060        the server's time, once
  %(prog)s client 203.0.113.7 1060 -c 20  RTT, loss and the clock offset
  %(prog)s sntp 169.254.169.123           this machine against NTP

'%(prog)s COMMAND --help' says more about each."""
SNTP_EPILOG = """examples:
  %(prog)s 169.254.169.123     the Amazon Time Sync Service, on EC2
  %(prog)s pool.ntp.org -c 8 -i 2 --json

exit codes: 0 at least one usable answer; 1 none (silence, kiss-o'-death, an
unsynchronised server), or a reply with a wrong origin; 2 a usage error"""
MESH_EPILOG = """Every node runs the same command with the same peers file: it serves on --listen
and measures every other peer, a probe a second until Ctrl-C, -c or -w.  Its
--metrics series carry source (this node) and target labels, so one Prometheus
scraping every node holds the whole matrix; 'matrix' makes N x N tables of the
nodes' --json outputs.

examples:
  %(prog)s --peers fleet.txt --listen 0.0.0.0:1060 --metrics 9102
  %(prog)s --peers fleet.txt --listen 10.0.0.5:1060 --json >n5.json"""
MATRIX_EPILOG = """It reads what 'mesh --json' (or 'client --json') printed, one file a node.

examples:
  %(prog)s node1.json node2.json node3.json
  %(prog)s *.json --json"""
DEMO_DESCRIPTION = """Start a server on 127.0.0.1, on a free port, and run two clients against
it in this same process: the tutorial's single round trip, then a
measurement of 50 probes.  Both sides' output is shown; the server's lines
are marked "server |".  Nothing leaves this machine."""
MORE_OPTIONS = "\n\n--help-all shows every option: {}."


def build_parser(prog: Optional[str] = None, full_help: bool = False) -> argparse.ArgumentParser:
    """The command line; prog is the name in messages (default: the name it was run as), and
    full_help lists every option in --help, as --help-all does."""
    parser = _ArgumentParser(prog=prog, allow_abbrev=False, description=(
        "UDP latency and clock check: a time server, and a client that measures round-trip\n"
        "time, loss and the server's clock offset: to one server, a fleet, or a mesh."),
        epilog=TOP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    commands.required = True
    for name, (func, add_arguments, about, epilog, usage) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=about, epilog=epilog, usage=usage, allow_abbrev=False,
                                  description=DEMO_DESCRIPTION if name == "demo" else None,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        hidden = add_arguments(sub, full_help)
        if hidden:
            sub.add_argument("--help-all", action=_HelpAll, command=name, top=parser.prog,
                             help="list every option")
            if not full_help:
                sub.epilog = (sub.epilog or "") + MORE_OPTIONS.format(hidden)
        sub.set_defaults(func=func, help_prog=sub.prog, program=parser.prog)
    return parser


def _add_server_arguments(server: argparse.ArgumentParser, full_help: bool) -> str:
    server.add_argument("host", nargs="?", metavar="HOST", help=(
        "address to listen on, or HOST:PORT: 0.0.0.0 for all IPv4 interfaces, :: for IPv6 and IPv4 "
        "(default {})".format(DEFAULT_HOST)))
    server.add_argument("port", nargs="?", metavar="PORT", help=(
        "UDP port (default {}; 0: any free one)".format(DEFAULT_PORT)))
    verbosity = server.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="no line per request")
    verbosity.add_argument("-v", "--verbose", action="store_true",
                           help="a line for every request (default: at most {} a second)".format(
                               LOG_LINES_PER_SECOND))
    _add_key_option(_Options(server))
    _add_max_rate_option(_Options(server))
    _add_metrics_option(_Options(server))
    server.add_argument("--faulty", nargs="?", const=FAULTY_PROBABILITY, default=0.0, metavar="P",
                        type=_ranged(float, 0, 1, "a probability from 0 to 1"),
                        help="answer with a wrong id with probability P (default %(const)s), "
                             "as the tutorial's FAULTY_SERVER")
    _add_timestamps_option(_Options(server))
    stamp = server.add_mutually_exclusive_group()
    stamp.add_argument("--stamp", action="store_const", const=STATEFUL, help=(
        "be a STAMP Session-Reflector (RFC 8762, RFC 8972), stateful, on port {} unless PORT: it "
        "answers STAMP only, not our protocol".format(STAMP_PORT)))
    stamp.add_argument("--stamp-stateless", dest="stamp", action="store_const", const=STATELESS,
                       help="the same, stateless: its replies copy the sender's seq")
    server.add_argument("--measure_delay", "-measure_delay", type=_truthy, default=False, metavar="BOOL",
                        help="the tutorial's; accepted and ignored")
    return ""


def _add_client_arguments(client: argparse.ArgumentParser, full_help: bool) -> str:
    client.add_argument("targets", nargs="*", metavar="TARGET", help=(
        "a server: HOST, HOST:PORT or [IPV6]:PORT (default {}:{}); several are measured at once; "
        "a final PORT is that of every target without one".format(DEFAULT_HOST, DEFAULT_PORT)))
    main = _Options(client)
    _add_measuring_options(main, mesh=False)
    main.add("--measure-delay", action="store_true", help="measure as the tutorial's loop: {} probes, "
             "back to back".format(DEFAULT_COUNT))
    _add_key_option(main)
    main.add("--targets", dest="targets_file", metavar="FILE",
             help="more targets, one a line ([NAME] HOST:PORT; # starts a comment)")
    main.add("--stamp", action="store_true", help=(
        "measure STAMP or TWAMP-light reflectors (RFC 8762), on port {} unless given".format(STAMP_PORT)))
    return _add_advanced_options(client, full_help, mesh=False)


def _add_mesh_arguments(mesh: argparse.ArgumentParser, full_help: bool) -> str:
    main = _Options(mesh)
    main.add("--peers", required=True, metavar="FILE", help=(
        "the fleet, one peer a line: NAME HOST:PORT or HOST:PORT (# starts a comment); the same file on "
        "every node"))
    main.add("--listen", required=True, metavar="HOST:PORT", help=(
        "where this node's server listens; the peer at that address (or --name) is this node"))
    main.add("--name", metavar="NAME", help="this node's name in --peers, when its address does not tell")
    _add_measuring_options(main, mesh=True)
    _add_key_option(main)
    _add_metrics_option(main)
    _add_max_rate_option(main)
    main.add("--stamp", action="store_true", help="speak STAMP (RFC 8762): each node reflects it, "
             "stateful, and measures its peers with it")
    main.add("--peer-metrics", action="append", metavar="HOST:PORT", help=(
        "another node's --metrics address, as often as there are: its row of the matrix joins this "
        "node's page at / of --metrics"))
    return _add_advanced_options(mesh, full_help, mesh=True)


def _add_matrix_arguments(matrix: argparse.ArgumentParser, full_help: bool) -> str:
    matrix.add_argument("files", nargs="+", metavar="FILE",
                        help="the --json output of a mesh node or a client")
    matrix.add_argument("--json", action="store_true", help="the matrix as one JSON object")
    matrix.add_argument("--html", metavar="OUT.html", help="also write the matrix as a page: three heatmaps")
    return ""


def _add_sntp_arguments(sntp: argparse.ArgumentParser, full_help: bool) -> str:
    sntp.add_argument("host", metavar="HOST", help="the NTP server: a name, an IPv4 or an IPv6 address, "
                                                   "or HOST:PORT ([IPV6]:PORT)")
    sntp.add_argument("port", nargs="?", metavar="PORT", help="UDP port (default {})".format(NTP_PORT))
    sntp.add_argument("-c", "--count", type=_ranged(int, 1, 10 ** 6, "a whole number from 1"), default=4,
                      help="queries to send (default %(default)s)")
    sntp.add_argument("-i", "--interval", type=_ranged(float, 0.01, 3600, "seconds from 0.01 to 3600"),
                      default=1.0, help="seconds between queries (default %(default)s; public servers may "
                                        "answer a faster client with a kiss-o'-death)")
    _add_timeout_option(_Options(sntp))
    _add_family_options(_Options(sntp))
    sntp.add_argument("-q", "--quiet", action="store_true", help="the summary only")
    sntp.add_argument("--json", action="store_true", help="one JSON object instead of text")
    _add_timestamps_option(_Options(sntp))
    return ""


def _add_measuring_options(options: _Options, mesh: bool) -> None:
    """ping's first options, in ping's order: count, interval, deadline, timeout, family."""
    each = " to each peer" if mesh else ""
    options.add("-c", "--count", type=_ranged(int, 0, 10 ** 9, "a whole number from 0"), metavar="N",
                help="probes to send{} (default: until Ctrl-C or -w{}); 0: until Ctrl-C or -w".format(
                    each, "" if mesh else "; {} with --measure-delay".format(DEFAULT_COUNT)))
    options.add("-i", "--interval", type=_interval, metavar="SECONDS", help=(
        "seconds between probes{}, from {:g} (default {:g}, as ping{})".format(
            each, MIN_INTERVAL, DEFAULT_INTERVAL, "" if mesh else "; 0 with --measure-delay: each probe "
            "when the last is answered or timed out")))
    options.add("-w", "--deadline", type=_ranged(float, 0.001, 10 ** 9, "seconds above 0"),
                metavar="SECONDS", help="stop after SECONDS, unless -c is reached first, as ping -w")
    _add_timeout_option(options)
    _add_family_options(options)
    options.add("-q", "--quiet", action="store_true", help="the summary only (and progress on stderr, "
                                                            "when it is a terminal)")
    options.add("--json", action="store_true", help="one JSON object instead of text")


def _add_timeout_option(options: _Options) -> None:
    options.add("-W", "--timeout", type=_ranged(float, 0.001, 3600, "seconds from 0.001 to 3600"),
                metavar="SECONDS", default=DEFAULT_TIMEOUT,
                help="seconds to wait for each reply (default {:g})".format(DEFAULT_TIMEOUT))


def _add_family_options(options: _Options) -> None:
    family = options.exclusive()
    family.add("-4", dest="family", action="store_const", const=socket.AF_INET, default=0,
               help="IPv4 only")
    family.add("-6", dest="family", action="store_const", const=socket.AF_INET6, help="IPv6 only")


def _add_key_option(options: _Options) -> None:
    options.add("--key-file", metavar="PATH", help="shared secret for HMAC-SHA256 authentication; or set "
                                                   "{} (never a key on the command line)".format(KEY_ENV))


def _add_max_rate_option(options: _Options) -> None:
    options.add("--max-rate", type=_ranged(float, 0.01, 1e9, "replies a second, above 0"), metavar="N",
                help="answer at most N requests a second per source address")


def _add_metrics_option(options: _Options) -> None:
    options.add("--metrics", metavar="[HOST:]PORT", type=_listen_address,
                help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST: 127.0.0.1 unless given)")


def _add_timestamps_option(options: _Options) -> None:
    options.add("--timestamps", choices=(KERNEL, USER),
                help="take times from the kernel (default, where it works) or read the clock after "
                     "each wake-up")


def _add_advanced_options(command: argparse.ArgumentParser, shown: bool, mesh: bool) -> str:
    """The groups that --help lists by title only; their titles, for its last line."""
    outputs = _Options(command, "outputs", shown)
    outputs.add("--csv", metavar="FILE", help="also write a row per probe to FILE as it ends (- for stdout)")
    outputs.add("--jsonl", metavar="FILE", help="the same as one JSON object a line (JSON Lines)")
    outputs.add("--report-every", type=_ranged(float, 0.01, 10 ** 9, "seconds from 0.01"), metavar="SECONDS",
                help="print that period's figures every SECONDS (with --json, a JSON line each)")
    outputs.add("-D", dest="print_time", action="store_true",
                help="the wall-clock time (Unix seconds) before every line, as ping -D")
    outputs.add("--plot", metavar="FILE.svg", help="draw the run as a standalone SVG")
    if not mesh:
        _add_metrics_option(outputs)
    clocks = _Options(command, "clocks", shown)
    clocks.add("--reference", metavar="NTPHOST[:PORT]", type=_host_and_port,
               help="also measure this machine against an NTP server, and say which clock is off")
    _add_timestamps_option(clocks)
    stamps = clocks.exclusive()
    stamps.add("--interleaved", action="store_true", default=None,
               help="the server's send times from its kernel, with its next reply, as chrony's xleave "
                    "(default, where the server can)")
    stamps.add("--no-interleaved", dest="interleaved", action="store_false",
               help="the server's send times as it reads them before sending")
    _add_path_options(_Options(command, "the path", shown))
    if mesh:
        return "outputs, clocks, the path"
    tutorial = _Options(command, "the tutorial's", shown)
    tutorial.add("--measure_delay", "-measure_delay", type=_truthy, default=False, metavar="BOOL",
                 help="its spelling of --measure-delay (1/true/yes or 0/false/no)")
    return "outputs, clocks, the path, the tutorial's"


def _add_path_options(path: _Options) -> None:
    path.add("-s", "--size", type=_ranged(int, STAMP_SENDER.size, 65527, "bytes from {} to 65527".format(
        STAMP_SENDER.size)), help="pad requests and replies to SIZE bytes, from {} (STAMP: from its packet's "
        "size; MTU and fragmentation tests)".format(MIN_SIZE))
    path.add("-t", "--ttl", type=_ranged(int, 1, 255, "hops from 1 to 255"), metavar="TTL",
             help="send with this TTL (hop limit); the server says what arrived: the hops, and their changes")
    path.add("-Q", "--tos", type=tos_value, metavar="TOS",
             help="mark the probes with this TOS byte (0x.. too) or DSCP name (EF, AF41, CS6, ...); the "
                  "server says what arrived, and marks its reply the same")
    path.add("-I", "--source", metavar="ADDR", type=_source_address, help="send from this local address")
    path.add("--ports", type=_ranged(int, 1, MAX_SOURCE_PORTS, "from 1 to {}".format(MAX_SOURCE_PORTS)),
             metavar="N", help="spread the probes over N source ports, with loss and RTT for each (ECMP)")


def _key_for(args: argparse.Namespace) -> Optional[bytes]:
    key, warnings = load_key(args.key_file)
    for warning in warnings:
        _err(warning)
    return key


class PeerRows:
    """The other mesh nodes' rows of the matrix, for this node's page: fetched from each one's
    /matrix.json every PEER_ROWS_EVERY seconds in a thread of their own (so that the page never
    waits for a peer), each read bounded in time and size, and every cell checked; a peer that
    does not answer keeps its last row."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.urls = ["http://{}/matrix.json".format(address) for address in addresses]
        self.rows = {}  # type: Dict[str, List[Dict[str, Any]]]
        self.failures = 0  # fetches that failed or brought no matrix row: counted, the last row kept
        self._stop = threading.Event()

    def __enter__(self) -> "PeerRows":
        self._thread = _thread(self._run, "udp-timecheck-peer-rows")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=PEER_ROWS_TIMEOUT * 2)

    def cells(self) -> List[Dict[str, Any]]:
        return [cell for row in list(self.rows.values()) for cell in row]

    def _run(self) -> None:
        import urllib.request  # here: only a page with peers fetches anything
        for round_number in itertools.count():
            for url in self.urls:
                try:
                    with urllib.request.urlopen(url, timeout=PEER_ROWS_TIMEOUT) as response:
                        data = response.read(MAX_PEER_ROW + 1)
                    row = _STRICT_JSON.decode(data[:MAX_PEER_ROW].decode("utf-8"))
                    self.rows[url] = [cell for cell in map(_row_cell, row if isinstance(row, list) else [])
                                      if cell is not None][:MAX_PEER_CELLS]
                except (OSError, ValueError, RecursionError):  # down, slow, or not a row: counted
                    self.failures += 1
                if self._stop.is_set():
                    return
            starting = round_number < PEER_ROWS_QUICK and len(self.rows) < len(self.urls)  # still starting
            if self._stop.wait(1.0 if starting else PEER_ROWS_EVERY):
                return


def _row_cell(cell: object) -> Optional[Dict[str, Any]]:
    """A cell another node served, as this node's own are, or None if any of it is not."""
    if not isinstance(cell, dict) or not all(isinstance(cell.get(end), str) for end in ("source", "target")):
        return None
    checked = dict(_cell_marks(cell.get("started_at"), cell.get("clock_synchronized")),
                   source=printable(cell["source"][:100]), target=printable(cell["target"][:100]))
    for figure in MATRIX_FIGURES:
        value = cell.get(figure)
        if value is not None and not _in_range(figure, value):
            return None
        checked[figure] = value
    return checked


@contextlib.contextmanager
def _metrics(listen: Optional[Tuple[str, int]], render: Callable[[], str], log: Callable[[str], None],
             pages: Optional[Mapping[bytes, Tuple[Callable[[], str], str]]] = None) -> Iterator[None]:
    """--metrics: an exporter for the while, with a warning when others can reach it; its error
    lines go to log, which never blocks.  pages: what else it serves, by path (a mesh node's page)."""
    if listen is None:
        yield
        return
    exporter = MetricsServer(listen[0], listen[1], lambda stats: render() + render_endpoint_metrics(stats),
                             log, pages).start()
    where = format_address(*exporter.address[:2])
    _err("metrics at http://{}/metrics".format(where))  # the port, when 0 chose it
    if not exporter.loopback:
        _err("warning: metrics at {} can be read by anyone who can reach this port, and every connection "
             "costs this process some memory and time (bounded): firewall the port, or listen on 127.0.0.1 "
             "and scrape through an SSH tunnel".format(where))
    try:
        yield
    finally:
        exporter.close()


def cmd_server(args: argparse.Namespace) -> int:
    host, port = endpoint(args.host, args.port, PROTOCOL_PORTS[STAMP if args.stamp else OURS], lowest_port=0)
    if args.stamp and args.faulty:
        raise TimecheckError("--faulty is the tutorial's protocol's: a STAMP reflector has no request ids")
    output = LineWriter(sys.stdout)  # serving never waits for, or fails with, its output
    server = TimeServer(host, port, faulty=args.faulty, key=_key_for(args),
                        max_rate=args.max_rate, log=None if args.quiet else output.write,
                        log_limit=None if args.verbose else LOG_LINES_PER_SECOND,
                        timestamps=args.timestamps or KERNEL, stamp=args.stamp)
    with server, _stop_signals(server.request_stop, restore=args.restore_signals), \
            _metrics(args.metrics, lambda: render_server_metrics(server, output.dropped), output.write):
        output.write(describe_server(server))
        server.serve_forever()
        server.goodbye()  # its clients count what follows as not up, not lost

    def stopped() -> str:
        return "Server stopped: {}, log lines dropped {}".format(server.stats, output.dropped)
    if not output.close(stopped()):
        output.abandon()  # what stdout never took is lost: counted, and
        _err(stopped())  # stdout is closed, full or blocked: the counters still go somewhere
    return EXIT_OK


def cmd_client(args: argparse.Namespace) -> int:
    targets = client_targets(args.targets, args.targets_file, PROTOCOL_PORTS[STAMP if args.stamp else OURS])
    measuring = is_measurement(args) or len(targets) > 1  # several targets: always a measurement
    try:
        return measure(args, client_spec(args, targets, measuring))
    except UnresolvedHost as exc:  # HOST PORT where PORT is not a number reads as two hosts
        tokens = args.targets
        if len(tokens) == 2 and str(exc).startswith("cannot resolve host {!r}".format(tokens[1])):
            raise TimecheckError("{} (if {!r} is meant as the port: a port number from 0 to 65535)".format(
                exc, tokens[1])) from None
        raise


def client_spec(args: argparse.Namespace, targets: Sequence[Peer], measuring: bool,
                source: Optional[str] = None) -> RunSpec:
    """The run the client's (or a mesh node's) options ask for, built once: with -w and no -c, no
    count limit; with no count limit and no -i, a probe a second, as ping sends them.  With many
    targets each keeps fewer probes for the JSON, so that the whole stays small."""
    count, interval = _count_and_interval(args, measuring)
    return RunSpec(
        targets=tuple(targets), count=count, interval=interval, timeout=args.timeout, size=args.size or 0,
        key=_key_for(args), deadline=args.deadline, report_every=args.report_every,
        keep_samples=max(10, SAMPLES_KEPT // len(targets)), timestamps=args.timestamps or KERNEL,
        path=PathOptions(args.interleaved is not False, args.tos, args.ttl, args.source, args.ports or 1,
                         args.family),
        measuring=measuring, source=source, reference=args.reference,
        protocol=STAMP if getattr(args, "stamp", False) else OURS,
        outputs=Outputs(args.json, args.quiet, args.csv, args.jsonl, args.plot, args.metrics,
                        args.print_time))


class Screen(Events):
    """Where a run's events go on the command line: each probe's line and rows and the progress,
    the header at each address tried, the period lines, the outages, the notes, and the
    snapshots that --metrics serves (taken in the loop's thread, rendered in the endpoint's)."""

    def __init__(self, spec: RunSpec, text: Sink, rows: Sequence[Rows]) -> None:
        outputs = spec.outputs
        self.spec, self.text, self.rows, self.many = spec, text, rows, len(spec.targets) > 1
        self.lines = text if spec.measuring and not (outputs.quiet or _stdout_writers(outputs)) else None
        self.progress = Progress(sys.stderr if outputs.quiet else None, spec.count * len(spec.targets))
        self.snapshots = []  # type: List[Tuple[Dict[str, str], Dict[str, Any]]]  # the latest
        self._rendered = (None, "")  # type: Tuple[object, str]  # the snapshots last rendered, and how
        self.peer_rows = None  # type: Optional[PeerRows]  # the other nodes' rows, for the page
        self._ended = 0

    def started(self, recorder: Recorder) -> None:
        if self.spec.measuring and not self.spec.outputs.json:  # the header names the address in use
            self.text.line(format_header(recorder, self.spec.source))

    def sample(self, sample: Sample) -> None:
        if self.lines is not None and not self.lines.broken_pipe:  # its reader gone: the run ends
            self.lines.line(self._time() + format_sample(sample, sample.target, self.spec.timeout, self.many))
        for sink in self.rows:
            sink.add(sample)
        self._ended += 1
        self.progress.update(self._ended)

    def period(self, period: Period) -> None:
        figures = period_figures(period)
        self.text.line(json.dumps(figures) if self.spec.outputs.json
                       else self._time() + format_report(figures, self.many))

    def outage(self, recorder: Recorder, outage: Outage) -> None:
        if self.lines is not None and not self.lines.broken_pipe:  # among the probe lines, as its probes were
            self.lines.line(self._time() + format_outage(outage, recorder.target, self.many))

    def note(self, text: str) -> None:
        _err(text)

    def tick(self, recorders: Sequence[Recorder]) -> None:
        if self.spec.outputs.metrics is not None:
            self.snapshots = client_snapshots(recorders, self.spec.source)

    def metrics(self) -> str:
        """The latest snapshots as Prometheus' text, rendered once each however often scraped."""
        snapshots = self.snapshots
        if self._rendered[0] is not snapshots:
            self._rendered = (snapshots, render_snapshots(snapshots, self.spec.clock_state()))
        return self._rendered[1]

    def row(self) -> Dict[str, Any]:
        """A mesh node's own row of the matrix, from the latest snapshots."""
        return snapshot_matrix(self.snapshots, self.spec.source or "", self.spec.clock_state())

    def row_json(self) -> str:
        """/matrix.json: this node's row, for the other nodes' pages."""
        return json.dumps(self.row()["cells"])

    def page(self) -> str:
        """A mesh node's / : its row of the matrix as a page, and the rows fetched from the other
        nodes given with --peer-metrics."""
        peers = self.peer_rows
        cells = self.row()["cells"] + (peers.cells() if peers is not None else [])
        nodes = list(dict.fromkeys([self.spec.source or ""] + [name for cell in cells
                                                             for name in (cell["source"], cell["target"])]))
        note = None if peers is None else "Rows fetched from {} of {} other nodes; {} fetches failed.".format(
            len(peers.rows), len(peers.urls), peers.failures)
        return render_matrix_html({"nodes": nodes, "cells": cells, "missing": [], "note": note})

    def _time(self) -> str:
        """-D: the wall-clock time before a line, as ping -D prints it."""
        return "[{:.6f}] ".format(wall_ns() / NS_PER_S) if self.spec.outputs.print_time else ""


def measure(args: argparse.Namespace, spec: RunSpec, extra_metrics: Callable[[], str] = lambda: "") -> int:
    """Run spec with the outputs it asks for, print what it found, and return the exit code (or
    raise TimecheckError); extra_metrics: a mesh node's server's series."""
    outputs = spec.outputs
    on_stdout = _stdout_writers(outputs)
    text = Sink(sys.stderr if on_stdout and not outputs.json else sys.stdout)  # stdout carries the rows
    _check_distinct_outputs(outputs)
    notes = LineWriter(sys.stderr)  # what goes wrong on the way, said at once, never blocking the probes
    with contextlib.ExitStack() as stack:
        rows = _open_rows(outputs, stack, notes)
        _check_plot(outputs.plot)
        screen = Screen(spec, text, rows)
        measurement = Measurement(spec, screen)
        stack.enter_context(_stop_signals(measurement.stop, restore=args.restore_signals))
        reference = _start_services(spec, screen, stack, notes, extra_metrics,
                                    getattr(args, "peer_metrics", None) or ())
        recorders = measurement.run()  # a signal ends it; after it, nothing
        summaries = [summarize(recorder) for recorder in recorders]
        if spec.fleet:
            for summary, recorder in zip(summaries, recorders):
                summary["name"] = recorder.name  # a peer's name, when its file gives one
        if reference is not None:
            _add_reference(reference, recorders, summaries)
        problems = [(sink.name, sink.error) for sink in rows] + [(outputs.plot, _write_plot(outputs.plot,
                                                                                            recorders))]
        _print_results(text, spec, recorders, summaries)  # last: stdout's reader may have gone
    notes.sync()  # what was said at once comes before what is said at the end
    failed = ["{}: {}".format(name, error) for name, error in problems + [("standard output", text.error)]
              if error is not None]
    if failed:  # each output that failed, named once more
        raise TimecheckError("cannot write to " + "; ".join(failed))
    return _verdict(recorders, spec.timeout)


def _open_rows(outputs: Outputs, stack: contextlib.ExitStack, notes: LineWriter) -> List[Rows]:
    """--csv and --jsonl, opened before anything is sent: a bad path is a usage error, not a lost run.
    A failure on the way is said at once, and the measurement goes on without that output."""
    def on_error(name: str, error: str) -> None:
        notes.write("udp-timecheck: cannot write to {}: {}; the measurement goes on without it".format(
            name, error))
    rows = []
    for path, kind in ((outputs.csv, "csv"), (outputs.jsonl, "jsonl")):
        if path == "-":
            rows.append(Rows(Sink(sys.stdout, on_error=on_error), kind))
        elif path is not None:
            if os.path.isfile(path) and os.path.getsize(path):
                _err("note: {} exists; writing it anew".format(path))
            sink = Sink.open(path, on_error)
            stack.callback(sink.close)
            rows.append(Rows(sink, kind))
    return rows


def _start_services(spec: RunSpec, screen: Screen, stack: contextlib.ExitStack, notes: LineWriter,
                    extra_metrics: Callable[[], str],
                    peer_metrics: Sequence[str] = ()) -> Optional[Reference]:
    """What runs beside the probes for as long as they do: --metrics (a mesh node's with its page,
    and the other nodes' rows it fetches for it), and --reference (returned)."""
    pages = {}  # type: Dict[bytes, Tuple[Callable[[], str], str]]
    if spec.source is not None and spec.outputs.metrics is not None:
        if peer_metrics:
            screen.peer_rows = stack.enter_context(PeerRows(peer_metrics))
        page = (screen.page, "text/html; charset=utf-8")
        pages = {b"/": page, b"/matrix": page, b"/matrix.json": (screen.row_json, "application/json")}
    stack.enter_context(_metrics(spec.outputs.metrics, lambda: screen.metrics() + extra_metrics(),
                                 notes.write, pages))
    if spec.reference is None:
        return None
    return Reference(*spec.reference, timestamps=spec.timestamps).start()


def _add_reference(reference: Reference, recorders: Sequence[Recorder], summaries: Sequence[Dict]) -> None:
    """--reference's verdict in each summary, once its burst is done (unless interrupted)."""
    reference.stop(finish_burst=not recorders[0].interrupted)
    for summary in summaries:
        summary["reference"] = reference.result(summary)


def _verdict(recorders: Sequence[Recorder], timeout: float) -> int:
    """EXIT_OK when every target gave valid replies; else TimecheckError naming those that did not."""
    reasons = [(recorder.target, failure_reason(recorder, timeout)) for recorder in recorders]
    failed = [(target, reason) for target, reason in reasons if reason is not None]
    if len(recorders) == 1 and failed:
        raise TimecheckError(failed[0][1], EXIT_FAILED)
    if failed:
        raise TimecheckError("{} of {} targets failed: {}".format(len(failed), len(recorders), "; ".join(
            "{}: {}".format(target, reason) for target, reason in failed)), EXIT_FAILED)
    return EXIT_OK


def _check_distinct_outputs(outputs: Outputs) -> None:
    """Two outputs in one file would corrupt both: a usage error, after links are resolved."""
    seen = {}  # type: Dict[object, str]
    for option, path in (("--csv", outputs.csv), ("--jsonl", outputs.jsonl), ("--plot", outputs.plot)):
        if path is None or path == "-":
            continue
        try:
            info = os.stat(path)
            identity = (info.st_dev, info.st_ino)  # type: object
        except OSError:
            identity = os.path.realpath(path)
        if identity in seen:
            raise TimecheckError("{} and {} name the same file ({}); give each its own".format(
                seen[identity], option, path))
        seen[identity] = option


def _stdout_writers(outputs: Outputs) -> List[str]:
    """The options that write to stdout: at most one may."""
    on_stdout = [name for name, wanted in (("--json", outputs.json), ("--csv -", outputs.csv == "-"),
                                           ("--jsonl -", outputs.jsonl == "-")) if wanted]
    if len(on_stdout) > 1:
        raise TimecheckError("{} and {} both write to standard output; give one a file".format(*on_stdout))
    return on_stdout


def is_measurement(args: argparse.Namespace) -> bool:
    """Whether any option that only makes sense for a measurement was given (MEASURING_OPTIONS)."""
    return any(getattr(args, dest) not in (None, False) for dest, _ in MEASURING_OPTIONS)


def _count_and_interval(args: argparse.Namespace, measuring: bool) -> Tuple[int, float]:
    """-c and -i as given.  Else ping's: a probe a second, until stopped (Ctrl-C, -w); with
    --measure-delay, the tutorial's loop: DEFAULT_COUNT probes back to back.  Not measuring: one."""
    tutorial = getattr(args, "measure_delay", False)  # a mesh has no --measure-delay
    count = args.count if args.count is not None else (
        1 if not measuring else DEFAULT_COUNT if tutorial and not args.deadline else 0)
    interval = args.interval if args.interval is not None else 0.0 if tutorial else DEFAULT_INTERVAL
    return count, interval


def _check_plot(path: Optional[str]) -> None:
    """--plot's file, tried before anything is sent: a bad path is a usage error, not a lost run."""
    if path is not None and not path.lower().endswith(".svg"):
        raise TimecheckError("--plot draws an SVG: give it a FILE.svg, not {!r}".format(path))
    if path is None or (os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path)):
        return  # a FIFO or a device: written in place
    error = "it is a directory" if os.path.isdir(path) else write_whole_file(path + ".udp-timecheck-try", "")
    if error is not None:
        raise TimecheckError("cannot write {}: {}".format(path, error))
    os.unlink(path + ".udp-timecheck-try")


def _write_plot(path: Optional[str], recorders: Sequence[Recorder]) -> Optional[str]:
    """--plot, whole: written beside, then renamed into place, even when stdout's reader has gone."""
    if path is None:
        return None
    return write_whole_file(path, render_svg(plot_data(recorders)))


def _print_results(out: Sink, spec: RunSpec, recorders: Sequence[Recorder],
                   summaries: Sequence[Dict[str, Any]]) -> None:
    """The results on stdout: the JSON, the summaries and a fleet's table, or the one round trip."""
    if spec.outputs.json:
        lines = [json.dumps(fleet_summary(recorders, summaries, spec.source) if spec.fleet else summaries[0])]
    elif spec.measuring:
        lines = _summary_lines(summaries, spec.source, spec.fleet)
    else:  # the tutorial's single round trip: the server's text, or its verdict
        lines = [line for line in [format_round_trip(recorders[0])] if line is not None]
    for line in lines:
        out.line(line)


def _summary_lines(summaries: Sequence[Mapping], source: Optional[str], fleet: bool) -> List[str]:
    """Each target's summary; with many (or from a mesh node), the table of them all."""
    lines = [line for summary in summaries for line in format_summary(summary)]
    return lines + (format_fleet_table(summaries, source) if fleet else [])


class SntpScreen(Events):
    """Where an sntp run's events go: its header, as its sockets have it, and a line a query."""

    def __init__(self, args: argparse.Namespace, out: Sink) -> None:
        self.args, self.out, self.shown = args, out, not (args.quiet or args.json)

    def started(self, recorder: Recorder) -> None:
        if self.shown:
            self.out.line("SNTP {} ({}): {}, interval {:g} s, timeout {:g} s, {}".format(
                recorder.target, recorder.address, plural(self.args.count, "query", "queries"),
                self.args.interval, self.args.timeout,
                describe_stamps(recorder.timestamps, recorder.local.no_kernel_stamps)))

    def sample(self, sample: Sample) -> None:
        if self.shown:
            self.out.line(format_sntp_sample(sample, sample.target, self.args.timeout))

    def note(self, text: str) -> None:
        _err(text)


def cmd_sntp(args: argparse.Namespace) -> int:
    host, port = endpoint(args.host, args.port, NTP_PORT)
    out = Sink(sys.stdout)
    prober = SntpProber(host, port, SntpScreen(args, out), count=args.count, interval=args.interval,
                        timeout=args.timeout, timestamps=args.timestamps or KERNEL,
                        path=PathOptions(family=args.family))
    with _stop_signals(prober.stop, restore=args.restore_signals):
        recorder = prober.run()
    summary = summarize(recorder)
    for line in [json.dumps(summary)] if args.json else format_sntp_summary(summary):
        out.line(line)
    if out.error is not None:
        raise TimecheckError("cannot write to standard output: {}".format(out.error))
    reason = sntp_failure(recorder, args.timeout)  # type: ignore[arg-type]
    if reason is not None:
        raise TimecheckError(reason, EXIT_FAILED)
    return EXIT_OK


def cmd_mesh(args: argparse.Namespace) -> int:
    """Serve on --listen, and measure every other peer of --peers, as each node of a fleet does."""
    peers = read_peers(args.peers, "peers file")
    host, port = endpoint(args.listen, None, DEFAULT_PORT, lowest_port=1)
    me = find_self(peers, args.name, host, port, args.peers)
    others = [peer for peer in peers if peer is not me]
    if not others:
        raise TimecheckError("{} names no peer but this node".format(args.peers))
    if args.peer_metrics and args.metrics is None:
        raise TimecheckError("--peer-metrics adds the other nodes' rows to the page of --metrics: "
                             "give --metrics")
    for address in args.peer_metrics or ():
        if split_target(address)[1] is None:
            raise TimecheckError("--peer-metrics {!r}: expected HOST:PORT".format(address))
    source = me.name or format_address(me.host, port)
    spec = client_spec(args, others, True, source)
    with TimeServer(host, port, key=spec.key, max_rate=args.max_rate, log=None,
                    timestamps=args.timestamps or KERNEL, stamp=STATEFUL if args.stamp else None) as server:
        server.start()
        _err("mesh node {}: {}".format(source, describe_server(server)))  # stdout may be --json
        try:
            return measure(args, spec, lambda: render_server_metrics(server, 0, source, build_info=False))
        finally:
            server.goodbye()  # the peers that go on count what follows as not up, not lost


def cmd_matrix(args: argparse.Namespace) -> int:
    """The N x N tables of a mesh's (or clients') --json outputs: p50 RTT, loss, offset +- error."""
    matrix = build_matrix([load_measurement(path) for path in args.files], args.files)
    if args.html is not None:
        if not args.html.endswith((".html", ".htm")):
            raise TimecheckError("--html writes a page: give a file name that ends in .html")
        failed = write_whole_file(args.html, render_matrix_html(matrix))
        if failed is not None:
            raise TimecheckError("cannot write {}: {}".format(args.html, failed))
    out = Sink(sys.stdout)
    for line in [json.dumps(matrix)] if args.json else format_matrix(matrix):
        out.line(line)
    if out.error is not None:
        raise TimecheckError("cannot write to standard output: {}".format(out.error))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    out = Sink(sys.stdout)
    status = EXIT_OK
    with TimeServer("127.0.0.1", 0, log=lambda line: out.line("  server | " + line)) as server:
        host, port = server.address[:2]
        typed = ("python3 " if args.program.endswith(".py") else "") + args.program
        out.line("$ {} server {} {}".format(typed, host, port))
        out.line("  server | " + describe_server(server))
        server.start()
        for extra in ((), DEMO_ARGS):
            command = ["client", host, str(port)] + list(extra)
            out.line("\n$ {} {}".format(typed, " ".join(command)))
            status = max(status, main(command))
    out.line("  server | Server stopped: {}".format(server.stats))
    return status


# name: (cmd_<name>, what adds its arguments (and says which groups --help leaves out), its line in
# the top help, its epilog, its usage line (None: argparse's))
SUBCOMMANDS = collections.OrderedDict((
    ("server", (cmd_server, _add_server_arguments, "answer time requests", SERVER_EPILOG,
                "%(prog)s [options] [HOST] [PORT]")),
    ("client", (cmd_client, _add_client_arguments, "ask the time once, or measure one server or many",
                CLIENT_EPILOG, "%(prog)s [options] [TARGET ...] [PORT]")),
    ("sntp", (cmd_sntp, _add_sntp_arguments, "this machine's clock against an NTP server (SNTPv4)",
              SNTP_EPILOG, None)),
    ("mesh", (cmd_mesh, _add_mesh_arguments, "serve, and measure every other peer of a fleet", MESH_EPILOG,
              "%(prog)s --peers FILE --listen HOST:PORT [options]")),
    ("matrix", (cmd_matrix, _add_matrix_arguments, "the N x N tables of a mesh's --json outputs",
                MATRIX_EPILOG, None)),
    ("demo", (cmd_demo, lambda demo, full_help: "", "run a server and a client on loopback, show both", None,
              None)),
))


def program_name() -> str:
    """The program as it was run, for hints and --version: udp-timecheck (pip's command),
    python3 -m udp_timecheck, or the script's file name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name == "udp_timecheck":
        return os.path.basename(sys.executable or "python3").replace(".exe", "") + " -m udp_timecheck"
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name.replace(".exe", "") or "udp-timecheck"


# An option that looks like a key: refused before parsing, so that its value is never echoed.
KEY_LIKE_OPTION = re.compile(r"--?(key|secret|password|psk|hmac)(?!-file$)[\w-]*$", re.IGNORECASE)


def refuse_key_options(argv: Sequence[str]) -> None:
    """A key is never an argument: ps shows every user the command line."""
    for word in itertools.takewhile(lambda word: word != "--", argv):
        name = word.split("=", 1)[0]
        if KEY_LIKE_OPTION.match(name):
            raise TimecheckError("{} is not an option: a key on the command line can be read by every user "
                                 "of this machine (ps); put it in a file for --key-file PATH, or in {} "
                                 "(what followed it is not shown)".format(name, KEY_ENV))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with argv (default sys.argv[1:]); returns the exit code."""
    for stream in (sys.stdout, sys.stderr):  # network text must never crash the output
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        refuse_key_options(sys.argv[1:] if argv is None else argv)
        parser = build_parser(program_name() if argv is None else "udp_timecheck.py")
        args, extras = parser.parse_known_args(argv)
        if extras:  # the subcommand's help, where the options that were meant are
            raise TimecheckError("unrecognized arguments: {} (see: {} --help)".format(
                " ".join(extras), args.help_prog))
        # As the program itself, stop signals are ignored once a command is over, so that
        # one during the exit changes nothing; called as a function, the handlers are restored.
        args.restore_signals = argv is not None
        return args.func(args)
    except TimecheckError as exc:
        _err("udp-timecheck: {}".format(exc))
        return exc.exit_code
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        _discard_output(sys.stdout)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
