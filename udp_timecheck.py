#!/usr/bin/env python3
"""udp-timecheck: UDP round-trip time, loss and clock offset, in one file.

Copy this file to both machines (standard library only, Python 3.8+) and run::

    python3 udp_timecheck.py server 0.0.0.0 1060
    python3 udp_timecheck.py client SERVER-ADDRESS 1060 --measure-delay

It speaks the protocol of the tutorial "udp server & client in python": the
client sends ``[request_id, "The time is <client time>"]`` as JSON and the
server answers ``[request_id, "The time is <server time>"]``.  It works with the
tutorial's own client and server in both directions: what it adds (server
timestamps, padding, authentication) travels in extra array elements, which
the tutorial's code ignores.  README.md documents the datagrams.
"""

import argparse
import contextlib
import csv
import datetime
import errno
import hashlib
import hmac
import io
import json
import json.scanner
import os
import platform
import queue
import random
import re
import secrets
import select
import signal
import socket
import stat
import statistics
import struct
import sys
import threading
import time
from typing import (Callable, Dict, Iterator, List, Mapping, NamedTuple, NoReturn,
                    Optional, Sequence, TextIO, Tuple)

__version__ = "1.1.0"
__all__ = [
    # the wire format
    "Message", "WireError", "NotARequest", "encode_request", "decode_message", "request_fields",
    "quick_fields", "reply_parts", "fit_tutorial_reply", "min_request_size", "seal", "mac_matches",
    "mac_of_datagram", "reply_context",
    # timing and statistics
    "Timing", "probe_timing", "arrival_ns", "clock_offset_ns", "percentile", "rtt_summary",
    "mean_abs_difference", "histogram", "wall_ns", "monotonic_ns",
    # the server
    "TimeServer", "ServerStats", "RateLimiter", "LoopGuard", "enable_kernel_timestamps",
    "enable_transmit_timestamps", "enable_packet_info", "read_ancillary", "read_transmit_stamp",
    # the client
    "Prober", "Measurement", "Sample",
    # the command line
    "TimecheckError", "build_parser", "main",
]

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1060                 # the tutorial's declared default
MAX_DATAGRAM = 65535                # receive buffer, the tutorial's MAX_BYTES
MAX_UDP_PAYLOAD = {socket.AF_INET: 65507, socket.AF_INET6: 65527}
FAULTY_PROBABILITY = 0.5            # how often the tutorial's FAULTY_SERVER lies
DEFAULT_COUNT = 1000                # the tutorial's measuring loop
DEFAULT_TIMEOUT = 1.0
MIN_INTERVAL = 0.001                # seconds between probes, unless back to back (0)
DEMO_ARGS = ("--measure-delay", "-c", "50", "-i", "0.02")
LOG_LINES_PER_SECOND = 10
LOG_TEXT_BYTES = 180                # of client text per log line, after escaping: lines stay < 320
LOG_QUEUE_LINES = 1000              # lines waiting for a slow or blocked stdout before they drop
PROGRESS_EVERY = 0.25               # seconds between progress updates on a terminal (-q)
SOURCE_TABLE_SIZE = 4096            # source addresses --max-rate and the loop guard keep
PRIVILEGED_PORTS = 1024             # echo, daytime, DNS, NTP...: never answered (loop DoS)
ID_BITS = 63                        # request ids: secrets.randbits(63)
ID_LIMIT = 2 ** 64                  # larger ids and timestamps are malformed
TIMESTAMP_DIGITS = 20               # room for any time_ns() value until 5138 AD
SAMPLE_TEXT = "The time is 2000-01-01 00:00:00.000000"
KEY_ENV = "UDP_TIMECHECK_KEY"
MAX_KEY_FILE = 4096                 # bytes: a key, not a file to read until memory runs out
ZERO_MAC = b"0" * 64                # placeholder for the hex HMAC-SHA256 while it is computed
MAC_TRAILER = len(ZERO_MAC) + 2     # the MAC, its closing quote and the closing bracket
REQUEST_LABEL = b"udp-timecheck/1 request\n"
REPLY_LABEL = b"udp-timecheck/1 reply\n"
PAD_OVERHEAD = len(b', "pad": ""')
TIME_FRACTION = len(".123456")      # what str(datetime) leaves out at microsecond 0
JSON_WHITESPACE = " \t\n\r"
MAX_SEPARATORS = 64                 # commas and colons after the text of a datagram to decode
MAX_ESCAPES = 128                   # backslashes in it: \uXXXX costs ten times its six bytes
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128 + 2          # what a shell reports for a command ended by SIGINT
OK, LOST, MISMATCHED, PENDING = "ok", "lost", "mismatched", "pending"
# Why a probe was lost; a reply that failed authentication or echoed the request
# leaves its probe waiting for a real one until the timeout.
TIMED_OUT, REFUSED, FORGED, ECHOED, NOT_SENT, INTERRUPTED = (
    "timeout", "refused", "forged", "echo", "not sent", "interrupted")
NS_PER_S = 1_000_000_000

# Timestamps.  The kernel stamps each datagram as it arrives (SO_TIMESTAMPNS, on
# CLOCK_REALTIME): with it, a round trip no longer includes the time our own two
# processes take to wake up.  The socket module exports none of these constants.
KERNEL, USER = "kernel", "user"
# (SO_TIMESTAMPNS, SO_TIMESTAMPING) by architecture; most share asm-generic's values.
SO_TIMESTAMPNS, SO_TIMESTAMPING = (
    {"sparc": (0x21, 0x23), "sparc64": (0x21, 0x23), "parisc": (0x4013, 0x4014),
     "parisc64": (0x4013, 0x4014)}.get(platform.machine(), (35, 37))
    if sys.platform.startswith("linux") else (None, None))
# SO_TIMESTAMPING: software transmit stamps, reported without the datagram's bytes
TRANSMIT_STAMPS = (1 << 1) | (1 << 4) | (1 << 11)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8 if sys.platform.startswith("linux") else None)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", None)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", None)
TIMESPEC = struct.Struct("@ll")     # struct timespec: the payload of SO_TIMESTAMPNS
ANCILLARY_SPACE = 256               # room for a timestamp and a packet-info message
MAX_QUEUE_WAIT_NS = NS_PER_S        # an older kernel timestamp means the clocks disagree
RECEIVE_TIMEOUT = 0.25              # the server looks at its stop flag at least this often
WALL_STEP_TOLERANCE_NS = 50_000     # wall vs monotonic over one round trip, beyond read gaps


def _nanoseconds(seconds_clock: Callable[[], float]) -> Callable[[], int]:
    return lambda: int(seconds_clock() * NS_PER_S)


# Nanosecond clocks: Python 3.6 has only the float ones (0.25 us steps at today's epoch).
wall_ns = getattr(time, "time_ns", None) or _nanoseconds(time.time)  # type: Callable[[], int]
monotonic_ns = getattr(time, "perf_counter_ns", None) or _nanoseconds(time.perf_counter)  # type: Callable[[], int]


class TimecheckError(Exception):
    """An error for the user: main() prints it as one line and exits with exit_code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------
# Wire format: pure functions, no I/O
# ---------------------------------------------------------------------------

class WireError(ValueError):
    """A datagram that is not a well-formed udp-timecheck message."""


class NotARequest(WireError):
    """A well-formed reply where a request was expected: answering it could start a loop."""


class Message(NamedTuple):
    """A decoded request or reply: ``[id, text, ext?, mac?]``."""
    message_id: int
    text: str
    ext: Optional[Dict[str, object]]   # our extension object; None in the tutorial's form
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


def _refuse_number(text: str) -> NoReturn:
    # No float is ever valid here: refusing the first costs nothing, decoding thousands does.
    raise ValueError("not an integer: {!r}".format(text[:20]))


# The C scanner behind json.loads, called without its Python wrappers.  It raises
# StopIteration where json.loads says "Expecting value".
_scan_json = json.scanner.make_scanner(json.JSONDecoder(
    parse_float=_refuse_number, parse_constant=_refuse_number,
    parse_int=None if hasattr(sys, "get_int_max_str_digits") else _bounded_int))
_EXT_INTS = frozenset(("seq", "size", "t2", "t3"))
_REPLY_ONLY = frozenset(("t2", "t3", "ts"))


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
    start = _REQUEST_START.match(text)
    if start is None:
        raise WireError("not an [id, text, ...] array")
    if text.count(",", start.end()) + text.count(":", start.end()) > MAX_SEPARATORS:
        raise WireError("more than {} commas and colons after the text".format(MAX_SEPARATORS))


def decode_message(data: bytes) -> Message:
    """Decode a datagram, or raise WireError; nothing else escapes, whatever the bytes."""
    try:
        text = data.decode("utf-8").strip(JSON_WHITESPACE)
        _check_shape(text)
        obj, end = _scan_json(text, 0)
    except (ValueError, RecursionError, StopIteration) as exc:  # bad UTF-8 or JSON, too deep or long
        raise WireError("not a JSON datagram: {}".format(exc if isinstance(exc, WireError)
                                                         else type(exc).__name__)) from None
    if end != len(text) or type(obj) is not list or len(obj) < 2:
        raise WireError("not an [id, text, ...] array")
    message_id, message_text = obj[0], obj[1]
    if type(message_id) is not int or not -ID_LIMIT < message_id < ID_LIMIT or type(message_text) is not str:
        raise WireError("not an id of at most 64 bits and a text")
    try:  # a JSON escape can smuggle in an unpaired surrogate: not text
        message_text.encode("utf-8")
    except UnicodeEncodeError:
        raise WireError("the text holds an unpaired surrogate") from None
    ext = obj[2] if len(obj) > 2 and type(obj[2]) is dict else None
    if ext:
        for name, value in ext.items():  # unknown names pass: room for later extensions
            if name in _EXT_INTS and (type(value) is not int or not 0 <= value < ID_LIMIT):
                raise WireError("{!r} is not a non-negative integer".format(name))
            if name == "pad" and type(value) is not str:
                raise WireError("'pad' is not a string")
    mac = obj[3] if len(obj) > 3 and type(obj[3]) is str else None
    return Message(message_id, message_text, ext, mac)


def _mac(key: bytes, context: bytes, unsigned: bytes) -> bytes:
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
    expected = _mac(key, context, data[:-MAC_TRAILER] + ZERO_MAC + b'"]')
    return hmac.compare_digest(expected, mac_of_datagram(data))


def reply_context(request_id: bytes, request_mac: bytes) -> bytes:
    """What a reply's MAC covers besides the reply: the request it answers (id as decimal digits)."""
    return REPLY_LABEL + b"%b\n%b\n" % (request_id, request_mac)


def encode_request(request_id: int, text: str, seq: Optional[int] = None, *,
                   size: int = 0, pad_to: int = 0, key: Optional[bytes] = None) -> bytes:
    """A request datagram; without seq it is the tutorial's two-element form.

    With seq it carries our extension object, padded with a "pad" string to at
    least pad_to bytes (exactly, when pad_to leaves room for the pad field);
    size asks the server to pad its reply to that many bytes.  With a key the
    MAC is appended as the last element.
    """
    if seq is None:
        return json.dumps([request_id, text]).encode()
    ext: Dict[str, object] = {"seq": seq}
    if size:
        ext["size"] = size
    items = [request_id, text, ext] + ([ZERO_MAC.decode()] if key is not None else [])
    data = json.dumps(items).encode()
    if pad_to > len(data):
        ext["pad"] = " " * max(0, pad_to - len(data) - PAD_OVERHEAD)
        data = json.dumps(items).encode()
    return data if key is None else seal(key, REQUEST_LABEL, data)


# The layout json.dumps gives our client's requests and the tutorial's: one regex
# finds the digits a reply copies, without decoding any JSON.  Anything else (other
# spacing, escapes, other keys) goes through decode_message to the same fields.
_CANONICAL_REQUEST = re.compile(
    rb'\[(0|-?[1-9][0-9]{0,18}), "[ !#-\[\]-~]*"'
    rb'(?:, \{"seq": (0|[1-9][0-9]{0,18})(?:, "size": ([1-9][0-9]{0,4}))?(?:, "pad": " *")?\}'
    rb'(?:, "[0-9a-f]{64}")?)?\]')


def fields_of(request: Message) -> Tuple[bytes, Optional[bytes], int]:
    """What a reply needs of a request: its id and seq as decimal digits, and the size asked for.

    seq is None for the tutorial's form: no extension object, or one without a seq.
    A message carrying a server's timestamps is a reply: NotARequest.
    """
    if request.ext is not None and not _REPLY_ONLY.isdisjoint(request.ext):
        raise NotARequest("a reply, not a request: it carries server timestamps")
    seq = request.seq
    if seq is None:
        return b"%d" % request.message_id, None, 0
    return b"%d" % request.message_id, b"%d" % seq, request.ext.get("size") or 0


def quick_fields(data: bytes) -> Optional[Tuple[bytes, Optional[bytes], int]]:
    """request_fields() for a request in the layout json.dumps gives, or None for any other."""
    match = _CANONICAL_REQUEST.fullmatch(data)
    if match is None:
        return None
    request_id, seq, size = match.groups()
    return request_id, seq, int(size) if size else 0


def request_fields(data: bytes) -> Tuple[bytes, Optional[bytes], int]:
    """fields_of(decode_message(data)), the quick way for requests in json.dumps' layout."""
    return quick_fields(data) or fields_of(decode_message(data))


def reply_parts(reply_id: bytes, time_text: bytes, *, seq: Optional[bytes], server_recv_ns: int,
                stamp: bytes = KERNEL.encode(), size: int = 0, request_size: int = 0,
                keyed: bool = False) -> Tuple[bytes, Optional[bytes]]:
    """The reply, split where the send timestamp T3 goes; ids and seq as decimal digits.

    A request in the tutorial's form (seq None) gets the tutorial's reply, whole
    (tail None).  Otherwise the reply is head + str(T3) + tail, built before T3
    is read so that reading it is the last thing before the send.  stamp says
    where T2 came from: b"kernel" or b"user".
    """
    if seq is None:
        return b'[%b, "%b"]' % (reply_id, time_text), None
    head = b'[%b, "%b", {"seq": %b, "ts": "%b", "t2": %d, "t3": ' % (
        reply_id, time_text, seq, stamp, server_recv_ns)
    tail = b'}, "' + ZERO_MAC + b'"]' if keyed else b"}]"
    if size:
        room = (min(size, request_size) - len(head) - len(b"%d" % server_recv_ns)
                - len(tail) - PAD_OVERHEAD)
        if room >= 0:
            tail = b', "pad": "' + b" " * room + b'"' + tail
    return head, tail


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


def min_request_size(highest_seq: int, *, size: int = 0, keyed: bool = False) -> int:
    """The smallest request our server can answer whole, for any id and time.

    A reply is never larger than its request, so requests are padded to the
    longest reply they can get: the largest id, T2 and T3 of TIMESTAMP_DIGITS
    digits, and the longer stamp.
    """
    worst_id = ID_LIMIT - 1
    head, tail = reply_parts(b"%d" % worst_id, SAMPLE_TEXT.encode(), seq=b"%d" % highest_seq,
                             server_recv_ns=10 ** (TIMESTAMP_DIGITS - 1), stamp=KERNEL.encode(),
                             keyed=keyed)
    request = encode_request(worst_id, SAMPLE_TEXT, highest_seq, size=size,
                             key=b"k" if keyed else None)
    return max(len(head) + TIMESTAMP_DIGITS + len(tail), len(request) + PAD_OVERHEAD)


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


def iso_utc(ns: int) -> str:
    """A wall-clock time in ns as ISO 8601 in UTC, to the microsecond: 2026-11-25T16:51:39.914437Z."""
    seconds, nanoseconds = divmod(ns, NS_PER_S)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).replace(
        microsecond=nanoseconds // 1000, tzinfo=None)
    return moment.isoformat(timespec="microseconds") + "Z"


def format_address(host: str, port: int) -> str:
    return "[{}]:{}".format(host, port) if ":" in host else "{}:{}".format(host, port)


# ---------------------------------------------------------------------------
# Statistics: pure functions over samples
# ---------------------------------------------------------------------------

def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (NumPy's default, Excel's PERCENTILE.INC)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    position = (len(sorted_values) - 1) * fraction
    lower = int(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


def rtt_summary(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """min/avg/median/p90/p99/max and ping's mdev (population standard deviation)."""
    if not values:
        return dict.fromkeys(("min", "avg", "median", "p90", "p99", "max", "mdev"))
    ordered = sorted(values)
    return {"min": ordered[0], "avg": sum(ordered) / len(ordered),
            "median": percentile(ordered, 0.5), "p90": percentile(ordered, 0.9),
            "p99": percentile(ordered, 0.99), "max": ordered[-1],
            "mdev": statistics.pstdev(ordered)}


def mean_abs_difference(values: Sequence[float]) -> Optional[float]:
    """Jitter: the mean |difference| between consecutive values (IPDV, as irtt reports)."""
    if len(values) < 2:
        return None
    return sum(abs(later - earlier) for earlier, later in zip(values, values[1:])) / (len(values) - 1)


def median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def histogram(values: Sequence[float], bins: Optional[int] = None) -> List[Tuple[float, float, int]]:
    """Counts in equal bins from the minimum to the 99th percentile, plus one bin above it.

    The open top bin keeps one outlier from squeezing everything else into one row.
    bins defaults to about the square root of the count, at most 10.
    """
    if not values:
        return []
    bins = bins or max(1, min(10, round(len(values) ** 0.5)))
    ordered = sorted(values)
    low, high = ordered[0], percentile(ordered, 0.99)
    if high <= low:
        return [(low, ordered[-1], len(ordered))]
    width = (high - low) / bins
    counts = [0] * bins
    above = 0
    for value in ordered:
        if value > high:
            above += 1
        else:
            counts[min(int((value - low) / width), bins - 1)] += 1
    rows = [(low + index * width, low + (index + 1) * width, count)
            for index, count in enumerate(counts)]
    if above:
        rows.append((high, ordered[-1], above))
    return rows


def clock_offset_ns(clock: Callable[[], int]) -> int:
    """How far clock is ahead of CLOCK_REALTIME, the kernel's stamps' clock.

    Read between two readings of the real clock, three times, keeping the
    tightest: the time a reading takes (longest the first time round) must not
    count as offset.
    """
    best = None  # type: Optional[Tuple[int, int]]
    for _ in range(3):
        before = wall_ns()
        reading = clock()
        after = wall_ns()
        if best is None or after - before < best[0]:
            best = (after - before, reading - (before + after) // 2)
    return best[1]


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


class Timing(NamedTuple):
    """What one answered probe measured; see probe_timing()."""
    rtt_ns: int                 # the round trip, without the server's processing time
    proc_ns: Optional[int]      # the server's T3 - T2, when plausible
    offset_ns: Optional[float]  # NTP's offset: positive when the server's clock is ahead
    trusted: bool               # the wall clock held steady: the offset can be used
    kernel: bool                # rtt_ns came from kernel timestamps, not from wake-ups


def probe_timing(t1: int, t2: Optional[int], t3: Optional[int], t4: int, *, raw_ns: int, span_ns: int,
                 kernel: bool) -> Timing:
    """RTT, server processing time and clock offset of one probe, NTP's way.

    raw_ns is the monotonic time from before the send to after the receive, and
    span_ns the wall clock over the same interval, read next to it: when the two
    disagree, the wall clock stepped, and neither (T4 - T1) nor the offset can be
    trusted.  With kernel stamps (t4 from the kernel), the RTT is
    (T4 - T1) - (T3 - T2) when that is positive and no longer than raw_ns; else,
    and with user-space stamps, it is raw_ns - (T3 - T2), wake-ups included.
    """
    proc = t3 - t2 if t2 is not None and t3 is not None and 0 <= t3 - t2 <= raw_ns else None
    steady = abs(span_ns - raw_ns) <= WALL_STEP_TOLERANCE_NS + raw_ns // 1000
    rtt, trusted = raw_ns - (proc or 0), steady
    if kernel:
        kernel_rtt = t4 - t1 - (proc or 0)
        kernel = trusted = steady and 0 < kernel_rtt <= raw_ns
        if kernel:
            rtt = kernel_rtt
    offset = None if t2 is None or t3 is None else ((t2 - t1) + (t3 - t4)) / 2
    return Timing(rtt, proc, offset, trusted, kernel)


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------

def resolve(host: str, port: int, passive: bool = False) -> List[Tuple[int, tuple]]:
    """Every (family, sockaddr) for host and port, IPv4 or IPv6, in the resolver's order.

    "[::1]" is taken for "::1", as the tool itself prints such addresses; no
    address at all is a usage error.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM, 0,
                                   socket.AI_PASSIVE if passive else 0)
    except (socket.gaierror, UnicodeError) as exc:
        raise TimecheckError("cannot resolve host {!r}: {}".format(
            host, getattr(exc, "strerror", None) or exc)) from None
    found = [(family, address) for family, _, _, _, address in infos if family in MAX_UDP_PAYLOAD]
    if not found:
        raise TimecheckError("host {!r} has no IPv4 or IPv6 address".format(host))
    return found


def _time_prefix(second: int) -> bytes:
    """b"The time is <local date and time>"; the server appends the microseconds, as
    the tutorial's datetime.now() prints them."""
    return datetime.datetime.fromtimestamp(second).strftime("The time is %Y-%m-%d %H:%M:%S").encode("ascii")


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


class RecentTable:
    """A dict of at most max_entries keys; the least recently stored goes first.

    The server's tables of source addresses, so that memory stays flat under
    traffic from any number of sources.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries = {}  # type: Dict[object, object]

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: object) -> Optional[object]:
        """The value stored under key, removed (store it again to keep it)."""
        return self._entries.pop(key, None)

    def store(self, key: object, value: object) -> None:
        entries = self._entries
        if len(entries) >= self.max_entries and key not in entries:
            del entries[next(iter(entries))]
        entries[key] = value


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


def enable_kernel_timestamps(sock: socket.socket) -> bool:
    """Ask the kernel to stamp each datagram as it arrives; False where it cannot."""
    if SO_TIMESTAMPNS is None or not hasattr(sock, "recvmsg"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def enable_transmit_timestamps(sock: socket.socket) -> bool:
    """Ask the kernel to stamp each datagram as it leaves, on the socket's error queue."""
    if SO_TIMESTAMPING is None or not hasattr(sock, "recvmsg"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, TRANSMIT_STAMPS)
    except OSError:
        return False
    return True


def read_transmit_stamp(sock: socket.socket, not_before_ns: int) -> Optional[int]:
    """The kernel's stamp, in ns, of the datagram just sent on non-blocking sock, or None.

    Stamps queue up in the order the datagrams left; one earlier than
    not_before_ns (CLOCK_REALTIME before the send) belongs to an earlier one.
    """
    for _ in range(4):
        try:
            _, ancillary, _, _ = sock.recvmsg(1, ANCILLARY_SPACE, MSG_ERRQUEUE)
        except OSError:  # BlockingIOError: nothing (more) queued
            return None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPING and len(payload) >= TIMESPEC.size:
                seconds, nanoseconds = TIMESPEC.unpack_from(payload)  # the first of three: software
                stamp_ns = seconds * NS_PER_S + nanoseconds
                if stamp_ns >= not_before_ns:
                    return stamp_ns
    return None


def enable_packet_info(sock: socket.socket) -> bool:
    """Ask for each datagram's destination address, so that the reply can come from it."""
    if sock.family == socket.AF_INET6:
        level, option = socket.IPPROTO_IPV6, IPV6_RECVPKTINFO
    else:
        level, option = socket.IPPROTO_IP, IP_PKTINFO
    if option is None or not hasattr(sock, "sendmsg"):
        return False
    try:
        sock.setsockopt(level, option, 1)
    except OSError:
        return False
    return True


_PACKET_INFO_LEVELS = frozenset((socket.IPPROTO_IP, socket.IPPROTO_IPV6))


def read_ancillary(ancillary: Sequence[Tuple[int, int, bytes]]) -> Tuple[Optional[int], Sequence[tuple]]:
    """(the kernel's receive time in ns or None, the packet info to send the reply with)."""
    level, kind, payload = ancillary[0]
    rest = ancillary[1:]
    if kind == SO_TIMESTAMPNS and level == socket.SOL_SOCKET and len(payload) == TIMESPEC.size \
            and (not rest or len(rest) == 1 and rest[0][0] in _PACKET_INFO_LEVELS):  # the kernel's order
        seconds, nanoseconds = TIMESPEC.unpack(payload)
        return seconds * NS_PER_S + nanoseconds, rest
    kernel_ns, control = None, []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) == TIMESPEC.size:
            seconds, nanoseconds = TIMESPEC.unpack(payload)
            kernel_ns = seconds * NS_PER_S + nanoseconds
        elif level in _PACKET_INFO_LEVELS:  # in_pktinfo or in6_pktinfo: sent back as it came
            control.append((level, kind, payload))
    return kernel_ns, control


def _set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    """A blocking receive that gives up after seconds (EAGAIN), at no cost per call."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("@ll", int(seconds), int(seconds % 1 * 1e6)))
    except (OSError, struct.error):  # a platform with another timeval: shutdown resends instead
        pass


class ServerStats:
    """What the server did with the datagrams it received."""
    __slots__ = ("served", "malformed", "unauthenticated", "rate_limited", "too_short", "loops", "errors",
                 "not_logged", "user_stamps")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> Dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __str__(self) -> str:
        return ("served {0.served}, malformed {0.malformed}, unauthenticated {0.unauthenticated}, "
                "rate-limited {0.rate_limited}, too short to answer {0.too_short}, "
                "loops refused {0.loops}, send/receive errors {0.errors}".format(self))


class TimeServer:
    """The time server: bind on construction (port 0 for any), then serve.

    serve_forever() answers in the calling thread, start() in a background
    thread; shutdown() stops either from another thread; as a context manager
    it shuts down and closes on exit.  clock returns wall-clock nanoseconds
    since the epoch (tests inject a shifted one; the kernel's receive stamps
    are carried over to it by their age); timestamps is KERNEL where the
    platform has it, else USER; log receives one line per request, at most
    log_limit a second (None: no limit).
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                 faulty: float = 0.0, key: Optional[bytes] = None,
                 max_rate: Optional[float] = None,
                 log: Optional[Callable[[str], None]] = None,
                 log_limit: Optional[int] = LOG_LINES_PER_SECOND,
                 clock: Optional[Callable[[], int]] = None, timestamps: str = KERNEL,
                 rng: Callable[[], float] = random.random) -> None:
        family, address = resolve(host, port, passive=True)[0]
        self.socket = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6 and address[0] == "::":  # IPv4 too, whatever the default
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.socket.bind(address)
        except OSError as exc:
            self.socket.close()
            raise _bind_error(address[0], port, exc) from None
        self.address = self.socket.getsockname()
        _set_receive_timeout(self.socket, RECEIVE_TIMEOUT)
        self.timestamps = KERNEL if timestamps == KERNEL and enable_kernel_timestamps(self.socket) else USER
        # A wildcard server answers from the address each request was sent to: the
        # kernel's own choice can differ on a host with several, and clients drop that.
        self.packet_info = self.address[0] in ("0.0.0.0", "::") and enable_packet_info(self.socket)
        self.stats = ServerStats()
        self.keyed = key is not None
        self._faulty, self._key, self._rng = faulty, key, rng
        self._clock, self._real_clock = clock or wall_ns, clock is None
        self._limiter = RateLimiter(max_rate) if max_rate else None
        self._loops = LoopGuard()
        self._wildcard = self.address[0] in ("0.0.0.0", "::")
        self._log, self._log_limit = log, log_limit
        self._log_second = self._log_lines = self._log_hidden = 0
        self._text_second, self._text_prefix = -1, b""
        self._stopping = False
        self._idle = threading.Event()
        self._idle.set()
        self.thread = None  # type: Optional[threading.Thread]  # start()'s

    def __enter__(self) -> "TimeServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.close()

    def serve_forever(self) -> None:
        """Answer requests until shutdown(); a bad datagram is counted, never fatal."""
        recvmsg, sendmsg = self._socket_calls()
        clock, arrival, reply_for, stats = self._clock, self._arrival, self._reply_for, self.stats
        log = self._log_request if self._log is not None else None
        self._idle.clear()
        try:
            while not self._stopping:
                try:
                    data, ancillary, _, source = recvmsg(MAX_DATAGRAM, ANCILLARY_SPACE)
                except BlockingIOError:  # SO_RCVTIMEO: a look at _stopping when all is quiet
                    continue
                except OSError:  # Windows reports an earlier reply's ICMP error here
                    if self.socket.fileno() < 0:
                        break
                    stats.errors += 1
                    continue
                user_ns = clock()
                if self._stopping:
                    break
                server_recv_ns, stamp, control = arrival(ancillary, user_ns) if ancillary \
                    else (user_ns, b"user", ())
                reply = reply_for(data, source, server_recv_ns, stamp)
                if reply is None:
                    continue
                try:
                    sendmsg((reply,), control, 0, source)
                except OSError:  # e.g. a spoofed source port 0, or no route back
                    stats.errors += 1
                    continue
                stats.served += 1
                if log is not None:
                    log(data, source, server_recv_ns)
        finally:
            self._flush_log()
            self._idle.set()

    def _socket_calls(self) -> Tuple[Callable, Callable]:
        """recvmsg and sendmsg, or stand-ins where the platform has neither (Windows)."""
        sock = self.socket
        if hasattr(sock, "recvmsg") and hasattr(sock, "sendmsg"):
            return sock.recvmsg, sock.sendmsg

        def recvmsg(size: int, _ancillary_size: int) -> Tuple[bytes, list, int, tuple]:
            data, source = sock.recvfrom(size)
            return data, [], 0, source

        def sendmsg(buffers: Sequence[bytes], _control: object, _flags: int, target: tuple) -> int:
            return sock.sendto(b"".join(buffers), target)
        return recvmsg, sendmsg

    def _arrival(self, ancillary: list, user_ns: int) -> Tuple[int, bytes, Sequence[tuple]]:
        """T2, where it came from (b"kernel" or b"user"), and the packet info to reply with."""
        kernel_ns, control = read_ancillary(ancillary)
        real_ns = user_ns if self._real_clock else user_ns - clock_offset_ns(self._clock)
        server_recv_ns = arrival_ns(kernel_ns, user_ns, real_ns, MAX_QUEUE_WAIT_NS)
        if server_recv_ns is not None:
            return server_recv_ns, b"kernel", control
        if self.timestamps == KERNEL:
            self.stats.user_stamps += 1
        return user_ns, b"user", control

    def respond(self, data: bytes, source: tuple = ("127.0.0.1", 49152)) -> Optional[bytes]:
        """The reply serve_forever() would send to data from source, or None; no I/O."""
        return self._reply_for(data, source, self._clock(), b"user")

    def _reply_for(self, data: bytes, source: tuple, server_recv_ns: int, stamp: bytes) -> Optional[bytes]:
        stats = self.stats
        if self._refused_source(source):
            stats.loops += 1
            return None
        if self._limiter is not None and not self._limiter.allow(source[0], server_recv_ns):
            stats.rate_limited += 1
            return None
        try:
            request_id, seq, size = request_fields(data)
        except NotARequest:
            stats.loops += 1
            return None
        except WireError:
            stats.malformed += 1
            return None
        key = self._key
        if key is not None and (seq is None or not mac_matches(key, REQUEST_LABEL, data)):
            stats.unauthenticated += 1  # silence: a keyed server cannot be used to probe or reflect
            return None
        if seq is None and self._loops.looping(source, int(request_id)):
            stats.loops += 1
            return None
        reply_id = request_id
        if self._faulty and self._rng() < self._faulty:
            reply_id = b"%d" % (int(request_id) + 1)  # the tutorial's FAULTY_SERVER: a wrong id
        reply = self._build_reply(data, request_id, reply_id, seq, size, server_recv_ns, stamp)
        if reply is None:
            stats.too_short += 1
        elif seq is None:
            self._loops.answered(source, int(reply_id))
        return reply

    def _refused_source(self, source: tuple) -> bool:
        """Privileged ports (echo, daytime, DNS, NTP...) and our own port: a loop in the making."""
        port = source[1]
        return port < PRIVILEGED_PORTS or (port == self.address[1] and (self._wildcard or
                                                                         source[0] == self.address[0]))

    def _build_reply(self, data: bytes, request_id: bytes, reply_id: bytes, seq: Optional[bytes], size: int,
                     server_recv_ns: int, stamp: bytes) -> Optional[bytes]:
        """The reply, T3 read last; None if it would be larger than the request."""
        second, fraction = divmod(server_recv_ns, NS_PER_S)
        if second != self._text_second:  # formatting the date once a second is enough
            self._text_second, self._text_prefix = second, _time_prefix(second)
        key = self._key
        head, tail = reply_parts(reply_id, b"%b.%06d" % (self._text_prefix, fraction // 1000), seq=seq,
                                 server_recv_ns=server_recv_ns, stamp=stamp, size=size,
                                 request_size=len(data), keyed=key is not None)
        if tail is None:
            return fit_tutorial_reply(head, len(data))
        if key is None:
            reply = b"%b%d%b" % (head, self._clock(), tail)  # T3: as late as the reply allows
        else:
            context = reply_context(request_id, mac_of_datagram(data))
            reply = seal(key, context, b"%b%d%b" % (head, self._clock(), tail))
        return reply if len(reply) <= len(data) else None  # no reply is ever larger than its request

    def _log_request(self, data: bytes, source: tuple, server_recv_ns: int) -> None:
        """The tutorial's line for an answered request, at most log_limit a second."""
        second = server_recv_ns // NS_PER_S
        if second != self._log_second:
            self._flush_log()
            self._log_second, self._log_lines = second, 0
        if self._log_limit is not None and self._log_lines >= self._log_limit:
            self._log_hidden += 1
            return
        self._log_lines += 1
        request = decode_message(data)  # only for the lines shown: the hot path never decodes
        self._log("{} Request ID: {}. Client request, {}".format(
            format_address(*source[:2]), request.message_id, clip(request.text, LOG_TEXT_BYTES)))

    def _flush_log(self) -> None:
        if self._log_hidden:
            self._log("... {} more requests not shown".format(self._log_hidden))
            self.stats.not_logged += self._log_hidden
            self._log_hidden = 0

    def start(self) -> "TimeServer":
        """Serve in a daemon thread; returns self."""
        self._idle.clear()
        self.thread = threading.Thread(target=self.serve_forever, name="udp-timecheck-server",
                                        daemon=True)
        self.thread.start()
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


# ---------------------------------------------------------------------------
# Client: the prober
# ---------------------------------------------------------------------------

def _ms(ns: Optional[float]) -> Optional[float]:
    return None if ns is None else round(ns / 1e6, 6)


class Sample:
    """One probe: its request, its timestamps and, once answered, what it measured.

    t1 and t4 are this machine's wall clock at send and receive, t2 and t3 the
    server's at receive and send (NTP's names).  send_mono_ns and recv_mono_ns
    are the monotonic clock around the same send and receive.
    """
    __slots__ = ("seq", "request_id", "request_mac", "request", "status", "reason", "send_mono_ns",
                 "recv_mono_ns",
                 "t1", "t1_user", "t1_kernel", "t2", "t3", "t4", "t4_kernel", "server_stamp", "reply_id",
                 "reply_text",
                 "reply_size", "timing")

    def __init__(self, seq: int, request_id: int, request_mac: bytes = b"") -> None:
        self.seq, self.request_id, self.request_mac = seq, request_id, request_mac
        self.request = b""  # the datagram sent, kept while it waits: an echo is byte for byte it
        self.status = PENDING
        self.reason = None  # type: Optional[str]  # why a lost probe was lost: see LOST_REASONS
        self.send_mono_ns = self.t1 = self.t1_user = 0
        self.recv_mono_ns = self.t2 = self.t3 = self.t4 = None  # type: Optional[int]
        self.t1_kernel = self.t4_kernel = False
        self.server_stamp = self.reply_id = self.reply_text = None  # type: Optional[object]
        self.reply_size = 0
        self.timing = None  # type: Optional[Timing]

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
        return None if self.offset_ns is None else self.timing.rtt_ns / 2

    def settle(self, user_t4: int, *, kernel_mode: bool) -> None:
        """Work out what the probe measured, once its reply is recorded."""
        self.timing = probe_timing(self.t1, self.t2, self.t3, self.t4, raw_ns=self.raw_rtt_ns,
                                   span_ns=user_t4 - self.t1_user, kernel=kernel_mode and self.t4_kernel)

    def as_dict(self) -> Dict[str, object]:
        timing = self.timing
        return {"seq": self.seq, "id": self.request_id, "status": self.status,
                "rtt_ms": _ms(self.rtt_ns), "raw_rtt_ms": _ms(self.raw_rtt_ns),
                "server_proc_ms": _ms(self.server_proc_ns), "offset_ms": _ms(self.offset_ns),
                "offset_err_ms": _ms(self.offset_err_ns), "reply_id": self.reply_id,
                "lost_because": self.reason,
                "t1_ns": self.t1, "t2_ns": self.t2, "t3_ns": self.t3, "t4_ns": self.t4,
                "t1_from": KERNEL if self.t1_kernel else USER, "t4_from": KERNEL if self.t4_kernel else USER,
                "timestamps": None if timing is None else (KERNEL if timing.kernel else USER),
                "server_timestamps": self.server_stamp,
                "trusted": None if timing is None else timing.trusted}


SAMPLE_FIELDS = ("seq", "id", "status", "rtt_ms", "raw_rtt_ms", "server_proc_ms", "offset_ms",
                 "offset_err_ms", "reply_id", "lost_because", "t1_ns", "t2_ns", "t3_ns", "t4_ns",
                 "t1_from", "t4_from", "timestamps", "server_timestamps", "trusted")  # as_dict()'s keys


def describe_timestamps(client: str, server: Optional[str]) -> str:
    """Which timestamps each end used, in words: "kernel (both ends)", ..."""
    here = "user-space" if client == USER else client
    if server is None:
        return "{} here; the server sends none".format(here)
    there = {USER: "user-space", "mixed": "kernel and user-space"}.get(server, server)
    return "{} (both ends)".format(here) if here == there else "{} here, {} at the server".format(here, there)


class Measurement:
    """What a run of probes found; summary() is the --json object."""

    def __init__(self, target: str, address: str, request_size: int, keyed: bool, timestamps: str,
                 settings: Optional[Dict[str, object]] = None) -> None:
        self.target, self.address, self.request_size, self.keyed = target, address, request_size, keyed
        self.timestamps = timestamps
        self.settings = settings or {}  # what was asked for: count, interval, timeout, size
        self.started_ns = wall_ns()
        self.duration_ns = 0
        self.transmit_stamps = False  # T1 from the kernel's transmit stamps
        self.samples = []  # type: List[Sample]
        self.duplicates = 0     # a second reply to an answered probe
        self.late = 0           # a reply after its probe timed out (the probe stays lost)
        self.mismatched = 0     # a reply whose id matches no probe: the server lied
        self.forged = 0         # a reply that failed authentication
        self.malformed = 0      # a reply that is not a udp-timecheck message at all
        self.echoes = 0         # a reply byte for byte its request: an echo service
        self.unsigned = 0       # ... because it carried no MAC at all
        self.refused = 0        # ICMP port unreachable
        self.errors = 0         # probes the kernel refused to send
        self.interrupted = False
        self.stop_reason = None  # type: Optional[str]
        self.last_error = None  # type: Optional[str]

    def count(self, status: str) -> int:
        return sum(1 for sample in self.samples if sample.status == status)

    @property
    def received(self) -> int:
        return self.count(OK)

    def timestamp_summary(self, answered: Sequence[Sample]) -> Dict[str, object]:
        stamps = {sample.server_stamp for sample in answered if sample.server_stamp is not None}
        server = stamps.pop() if len(stamps) == 1 else ("mixed" if stamps else None)
        kernel = self.timestamps == KERNEL
        return {"client": self.timestamps, "server": server, "transmit": self.transmit_stamps,
                "user_fallbacks": sum(1 for sample in answered if kernel and not sample.timing.kernel),
                "transmit_fallbacks": sum(1 for sample in answered
                                          if self.transmit_stamps and not sample.t1_kernel),
                "untrusted": sum(1 for sample in answered if not sample.timing.trusted),
                "described": describe_timestamps(self.timestamps, server)}

    def run_record(self) -> Dict[str, object]:
        """The run's settings, first in the JSON: what was asked for, when, and how."""
        record = {"version": __version__, "started_at": iso_utc(self.started_ns),
                  "duration_s": round(self.duration_ns / NS_PER_S, 6)}
        for name in ("count", "interval", "timeout", "size"):
            record[name] = self.settings.get(name)
        record.update(request_bytes=self.request_size, keyed=self.keyed)
        return record

    def summary(self) -> Dict[str, object]:
        answered = [sample for sample in self.samples if sample.status == OK]
        rtts = [sample.rtt_ns for sample in answered]
        procs = [sample.server_proc_ns for sample in answered if sample.server_proc_ns is not None]
        # NTP's clock filter: the offset of the lowest-delay sample has the smallest error,
        # and only a sample over which the wall clock held steady can be that sample.
        best = min((sample for sample in answered if sample.offset_ns is not None and sample.timing.trusted),
                   key=lambda sample: sample.rtt_ns, default=None)
        sent, lost = len(self.samples), self.count(LOST)
        return dict(self.run_record(), **{
                "target": self.target, "address": self.address, "stopped_because": self.stop_reason,
                "sent": sent, "received": len(answered), "lost": lost,
                "loss_pct": round(100.0 * lost / sent, 3) if sent else None,
                "duplicates": self.duplicates, "late": self.late, "mismatched": self.mismatched,
                "forged": self.forged, "malformed": self.malformed, "echoes": self.echoes,
                "refused": self.refused, "errors": self.errors,
                "interrupted": self.interrupted, "timestamps": self.timestamp_summary(answered),
                "rtt_ms": {name: _ms(value) for name, value in rtt_summary(rtts).items()},
                "jitter_ms": _ms(mean_abs_difference(rtts)), "server_proc_ms": _ms(median(procs)),
                "offset_ms": _ms(best and best.offset_ns), "offset_err_ms": _ms(best and best.offset_err_ns),
                "offset_seq": best and best.seq,
                "histogram_ms": [[_ms(low), _ms(high), count] for low, high, count in histogram(rtts)],
                "samples": [sample.as_dict() for sample in self.samples]})


class Prober:
    """Sends count probes to one server and matches the replies; run() returns a Measurement.

    interval 0 is the tutorial's loop: the next probe goes when the last is
    answered or timed out.  interval > 0 sends isochronously, like ping and
    irtt, with replies matched by their random id.  on_sample is called as
    each probe ends (ok, lost or mismatched), on_note with a line about the
    run (another address tried).  clock is this machine's wall clock in ns
    (tests inject a shifted one); timestamps is KERNEL to take T1 and T4 from
    the kernel where the platform has it, or USER.
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, count: int = 1,
                 interval: float = 0.0, timeout: float = DEFAULT_TIMEOUT, size: int = 0,
                 key: Optional[bytes] = None, clock: Optional[Callable[[], int]] = None,
                 timestamps: str = KERNEL, on_sample: Optional[Callable[[Sample], None]] = None,
                 on_note: Optional[Callable[[str], None]] = None) -> None:
        self.addresses = resolve(host, port)
        self.family, self.address = self.addresses[0]
        self.target = format_address(host.strip("[]"), port)
        self.count, self.interval, self.timeout = count, interval, timeout
        self.size, self.key, self.on_sample, self.on_note = size, key, on_sample, on_note
        self.clock, self._real_clock = clock or wall_ns, clock is None
        self.timestamps = KERNEL if timestamps == KERNEL and SO_TIMESTAMPNS is not None else USER
        # Pad every request so the server's reply fits: it never answers with more bytes.
        smallest = min_request_size(count, size=size, keyed=key is not None)
        largest = MAX_UDP_PAYLOAD[self.family]
        if size and not smallest <= size <= largest:
            raise TimecheckError("--size must be from {} to {} bytes".format(smallest, largest))
        self.request_size = size or smallest
        self._transmit_stamps = self._stopping = False
        self._waker = []  # type: List[socket.socket]  # a socket pair: stop() wakes select()
        self._pending = {}  # type: Dict[int, Sample]  # request id -> probe awaiting its reply, oldest first
        self._by_id = {}  # type: Dict[int, Sample]

    def run(self) -> Measurement:
        """Probe until every probe has ended; Ctrl-C ends the run early with what it has.

        A name with several addresses (localhost: ::1, then 127.0.0.1) is tried
        at the next one when nobody listens at this one.
        """
        for index, (family, address) in enumerate(self.addresses):
            self.family, self.address = family, address
            measurement = self._run_at_address()
            refused = measurement.stop_reason == REFUSED and not measurement.received
            if not refused or index + 1 == len(self.addresses):
                return measurement
            if self.on_note is not None:
                self.on_note("nobody listens at {} (connection refused); trying {}".format(
                    format_address(address[0], address[1]), self.addresses[index + 1][1][0]))
        raise AssertionError("resolve() returns at least one address")

    def stop(self) -> None:
        """End the run soon, with what it has; safe in a signal handler, and to call again."""
        self._stopping = True
        try:
            self._waker[1].send(b"\0")  # select() returns at once
        except (OSError, AttributeError, IndexError):
            pass  # no run yet, or its end is already on the way

    def _run_at_address(self) -> Measurement:
        self._pending.clear()
        self._by_id.clear()
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.socket(self.family, socket.SOCK_DGRAM))
            try:
                sock.connect(self.address)  # replies from anyone else are dropped by the kernel
            except OSError as exc:
                raise TimecheckError("cannot reach {}: {}".format(self.target, exc.strerror or exc)) from None
            sock.setblocking(False)
            self._waker = [stack.enter_context(end) for end in socket.socketpair()]
            self._waker[1].setblocking(False)
            measurement = self._measurement(sock)
            started = monotonic_ns()
            try:
                self._loop(sock, measurement)
            except KeyboardInterrupt:  # SIGINT's default, where no handler calls stop()
                self._stopping = True
            measurement.interrupted = self._stopping
            measurement.duration_ns = monotonic_ns() - started
            self._waker = []
        for sample in measurement.samples:  # all, not just _pending: Ctrl-C can strike anywhere
            if sample.status == PENDING:
                self._finish(sample, LOST, INTERRUPTED)
        return measurement

    def _measurement(self, sock: socket.socket) -> Measurement:
        """A new Measurement, once the socket has its timestamping options."""
        if self.timestamps == KERNEL and not enable_kernel_timestamps(sock):
            self.timestamps = USER
        self._transmit_stamps = self.timestamps == KERNEL and enable_transmit_timestamps(sock)
        measurement = Measurement(self.target, self.address[0], self.request_size, self.key is not None,
                                  self.timestamps, {"count": self.count, "interval": self.interval,
                                                    "timeout": self.timeout, "size": self.size or None})
        measurement.transmit_stamps = self._transmit_stamps
        return measurement

    def new_probe(self, seq: int) -> Tuple[Sample, bytes]:
        """Probe number seq and its request datagram, as this prober sends it."""
        request_id = secrets.randbits(ID_BITS)  # unguessable, unlike the tutorial's 0..1000
        data = encode_request(request_id, "The time is {}".format(datetime.datetime.now()), seq,
                              size=self.size, pad_to=self.request_size, key=self.key)
        sample = Sample(seq, request_id, mac_of_datagram(data) if self.key is not None else b"")
        sample.request = data
        return sample, data

    def _loop(self, sock: socket.socket, measurement: Measurement) -> None:
        perf = monotonic_ns
        timeout_ns, interval_ns = int(self.timeout * NS_PER_S), int(self.interval * NS_PER_S)
        pending, samples = self._pending, measurement.samples
        next_send_ns = perf()
        while measurement.stop_reason is None and not self._stopping:
            now = perf()
            while pending:
                oldest = next(iter(pending.values()))
                if now - oldest.send_mono_ns < timeout_ns:
                    break
                self._finish(oldest, LOST, TIMED_OUT)
            may_send = len(samples) < self.count and (interval_ns or not pending)
            if may_send and now >= next_send_ns:
                self._send_probe(sock, measurement)
                next_send_ns = max(next_send_ns + interval_ns, now)
                continue
            if not may_send and not pending:
                break
            wake_ns = next_send_ns if may_send else now + timeout_ns
            if pending:
                wake_ns = min(wake_ns, next(iter(pending.values())).send_mono_ns + timeout_ns)
            if sock in select.select([sock, self._waker[0]], [], [], max(0, wake_ns - now) / NS_PER_S)[0]:
                self._receive_reply(sock, measurement)

    def _send_probe(self, sock: socket.socket, measurement: Measurement) -> None:
        sample, data = self.new_probe(len(measurement.samples))
        measurement.samples.append(sample)  # registered before it goes: Ctrl-C from here on still counts it
        self._by_id[sample.request_id] = self._pending[sample.request_id] = sample
        send, clock = sock.send, self.clock
        send_mono_ns = monotonic_ns()  # the monotonic reading first, T1 right before the send
        t1 = clock()
        try:
            send(data)
        except ConnectionRefusedError:  # an earlier probe's ICMP error, reported here
            self._refused(measurement, sample)
        except OSError as exc:  # no route, a firewall...: like ping, sent and lost
            measurement.errors += 1
            measurement.last_error = exc.strerror or str(exc)
            self._finish(sample, LOST, NOT_SENT)
        sample.send_mono_ns, sample.t1 = send_mono_ns, t1
        sample.t1_user = t1
        kernel_t1 = self._transmit_time(sock, t1) if self._transmit_stamps else None
        if kernel_t1 is not None:
            sample.t1, sample.t1_kernel = kernel_t1, True

    def _transmit_time(self, sock: socket.socket, t1: int) -> Optional[int]:
        """T1 from the kernel's transmit stamp, carried over to our clock, or None.

        The stamp leaves out our own way down through the send call, as the receive
        stamps leave out wake-ups.  One from before t1 belongs to an earlier probe.
        """
        offset = 0 if self._real_clock else clock_offset_ns(self.clock)
        stamp_ns = read_transmit_stamp(sock, t1 - offset)
        return None if stamp_ns is None else stamp_ns + offset

    def _receive_reply(self, sock: socket.socket, measurement: Measurement) -> None:
        try:
            data, ancillary, _, _ = sock.recvmsg(MAX_DATAGRAM, ANCILLARY_SPACE)
            user_t4 = self.clock()  # the wall clock, then the monotonic one: T4 - T1 spans within it
            recv_mono_ns = monotonic_ns()
        except BlockingIOError:  # only transmit stamps that came too late: drop them
            if self._transmit_stamps:
                read_transmit_stamp(sock, wall_ns() + NS_PER_S)
            return
        except ConnectionRefusedError:
            self._refused(measurement)
            return
        except OSError:
            measurement.errors += 1
            return
        real_t4 = user_t4 if self._real_clock else user_t4 - clock_offset_ns(self.clock)
        kernel_t4 = read_ancillary(ancillary)[0] if ancillary else None
        self._on_reply(measurement, data, (kernel_t4, user_t4, real_t4, recv_mono_ns))

    def _finish(self, sample: Sample, status: str, reason: Optional[str] = None) -> None:
        self._pending.pop(sample.request_id, None)
        sample.status, sample.request = status, b""
        if status != LOST:
            sample.reason = None
        elif reason != TIMED_OUT or sample.reason is None:  # a forged reply or an echo says more
            sample.reason = reason
        if self.on_sample is not None:
            self.on_sample(sample)

    def _refused(self, measurement: Measurement, sample: Optional[Sample] = None) -> None:
        """ICMP port unreachable: that probe (default: the oldest waiting) is lost."""
        measurement.refused += 1
        if sample is None and self._pending:
            sample = next(iter(self._pending.values()))
        if sample is not None:
            self._finish(sample, LOST, REFUSED)
        if not measurement.received:  # nobody is listening: waiting longer tells nothing more
            measurement.stop_reason = REFUSED

    def _on_reply(self, measurement: Measurement, data: bytes,
                  stamps: Tuple[Optional[int], int, int, int]) -> None:
        try:
            reply = decode_message(data)
        except WireError:
            measurement.malformed += 1  # garbage is not a liar: only a well-formed reply can lie
            return
        sample = self._by_id.get(reply.message_id)
        if sample is not None and data == sample.request:
            measurement.echoes += 1
            sample.reason = ECHOED  # if no real reply comes before the timeout, this is why
            return
        claimed = sample or self._attributable(reply, measurement)
        if self.key is not None and not self._authentic(measurement, reply, data, claimed):
            if claimed is not None and claimed.status == PENDING:
                claimed.reason = FORGED
            return
        if sample is None:
            measurement.mismatched += 1
            if claimed is not None and claimed.status == PENDING:
                self._record(claimed, reply, data, stamps)
                self._finish(claimed, MISMATCHED)
            return
        if sample.status == PENDING:
            self._record(sample, reply, data, stamps)
            self._finish(sample, OK)
        elif sample.status == LOST:
            measurement.late += 1
        else:
            measurement.duplicates += 1

    def _authentic(self, measurement: Measurement, reply: Message, data: bytes,
                   claimed: Optional[Sample]) -> bool:
        """Whether the reply's MAC is right for the request it claims to answer; counts it if not."""
        if reply.mac is None:
            measurement.forged += 1
            measurement.unsigned += 1
            return False
        if claimed is None or not mac_matches(
                self.key, reply_context(b"%d" % claimed.request_id, claimed.request_mac), data):
            measurement.forged += 1  # tampered with, re-addressed, or replayed
            return False
        return True

    def _attributable(self, reply: Message, measurement: Measurement) -> Optional[Sample]:
        """The probe a reply with a wrong id answers: by its echoed seq, or the only one waiting."""
        seq = reply.seq
        if seq is not None:
            return measurement.samples[seq] if seq < len(measurement.samples) else None
        return next(iter(self._pending.values())) if len(self._pending) == 1 else None

    def _record(self, sample: Sample, reply: Message, data: bytes,
                stamps: Tuple[Optional[int], int, int, int]) -> None:
        """Keep what the reply says, and when it came: the kernel's T4 if plausible, else ours."""
        kernel_t4, user_t4, real_t4, sample.recv_mono_ns = stamps
        kernel_mode = self.timestamps == KERNEL
        t4 = arrival_ns(kernel_t4, user_t4, real_t4, user_t4 - sample.t1) if kernel_mode else None
        sample.t4, sample.t4_kernel = (user_t4, False) if t4 is None else (t4, True)
        sample.reply_id, sample.reply_text, sample.reply_size = reply.message_id, reply.text, len(data)
        if reply.ext is not None:
            sample.t2, sample.t3 = reply.ext.get("t2"), reply.ext.get("t3")
            stamp = reply.ext.get("ts")
            sample.server_stamp = stamp if stamp in (KERNEL, USER) else None
        sample.settle(user_t4, kernel_mode=kernel_mode)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def load_key(path: Optional[str],
             environ: Mapping[str, str] = os.environ) -> Tuple[Optional[bytes], List[str]]:
    """The shared key from a key file, else $UDP_TIMECHECK_KEY (None: no key), and warnings.

    The key is the file's bytes, or the variable's UTF-8, without surrounding
    ASCII white space: the same key gives the same bytes both ways.  A variable
    that is set but empty is an error, not "no key".
    """
    warnings = []  # type: List[str]
    if path is not None:
        key, mode = _read_key_file(path)
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


def _read_key_file(path: str) -> Tuple[bytes, int]:
    """A key file's bytes and mode; it must be a regular file of sane size."""
    try:  # non-blocking: opening a FIFO must not wait for a writer
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(descriptor, "rb") as key_file:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                raise TimecheckError("key file {} is not a regular file".format(path))
            key = key_file.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise TimecheckError("cannot read key file {}: {}".format(path, exc.strerror or exc)) from None
    if len(key) > MAX_KEY_FILE:
        raise TimecheckError("key file {} is larger than {} bytes: not a key".format(path, MAX_KEY_FILE))
    return key, info.st_mode


def plural(count: int, noun: str) -> str:
    """'1 probe', '2 probes', '0 probes'."""
    return "{} {}{}".format(count, noun, "" if count == 1 else "s")


def signed(value: float, digits: int = 3) -> str:
    """'+0.012' or '-0.012', and never '-0.000'."""
    text = "{:+.{}f}".format(value, digits)
    return "+" + text[1:] if float(text) == 0 else text


LOST_LINES = {
    TIMED_OUT: "lost, no reply within {timeout:g} s",
    REFUSED: "refused: nothing listens on that port (ICMP port unreachable)",
    FORGED: "lost: its only reply failed authentication (forged)",
    ECHOED: "lost: the reply was its own request, echoed back",
    NOT_SENT: "not sent: the kernel refused it",
    INTERRUPTED: "interrupted before its reply",
}


def format_sample(sample: Sample, target: str, timeout: float) -> str:
    """A ping-like line for one probe."""
    if sample.status == OK:
        line = "{} bytes from {}: seq={} rtt={:.3f} ms".format(
            sample.reply_size, target, sample.seq, sample.rtt_ns / 1e6)
        if sample.offset_ns is not None:
            line += " offset={} ms".format(signed(sample.offset_ns / 1e6))
        return line
    if sample.status == MISMATCHED:
        return "seq={}: Server is a liar! (reply id {} for request id {})".format(
            sample.seq, sample.reply_id, sample.request_id)
    return "seq={}: {}".format(sample.seq, LOST_LINES.get(sample.reason, LOST_LINES[TIMED_OUT]).format(
        timeout=timeout))


def format_counts(summary: Mapping) -> List[str]:
    """The summary's first lines: what became of the probes, and why the run ended early."""
    counts = "{} sent, {} received, {:g}% loss, {}, {} late, {} mismatched, {} forged".format(
        plural(summary["sent"], "probe"), summary["received"], summary["loss_pct"] or 0,
        plural(summary["duplicates"], "duplicate"), summary["late"], summary["mismatched"], summary["forged"])
    counts += "".join(", {} {}".format(summary[key], name) for key, name in (
        ("malformed", "malformed"), ("echoes", "echoed")) if summary[key])
    lines = [counts]
    if summary["refused"] or summary["errors"]:
        lines.append("{} refused by the server's host, {} could not be sent".format(
            summary["refused"], summary["errors"]))
    if summary["interrupted"]:
        lines.append("interrupted after {} of {} ({:.1f} s)".format(
            summary["sent"], plural(summary["count"], "probe"), summary["duration_s"]))
    elif summary["stopped_because"] == REFUSED:
        lines.append("stopped after {} of {}: connection refused, nothing listens on that port".format(
            summary["sent"], plural(summary["count"], "probe")))
    return lines


def format_clock(summary: Mapping) -> List[str]:
    """The server's processing time and clock offset, in words."""
    if summary["server_proc_ms"] is None:
        return ["server processing time: not reported, so it is part of each rtt",
                "server clock offset: unavailable (the server sends no timestamps: the tutorial's server?)"]
    offset = signed(summary["offset_ms"])
    relation = "level with" if float(offset) == 0 else "ahead of" if offset[0] == "+" else "behind"
    return ["server processing median {:.3f} ms: from its kernel receiving a request to its reply, "
            "left out of each rtt".format(summary["server_proc_ms"]),
            "server clock offset {} ms \u00b1 {:.3f} ms (server {} this machine; from seq {}, the "
            "lowest-rtt probe)".format(offset, summary["offset_err_ms"], relation, summary["offset_seq"])]


def format_summary(summary: Mapping) -> List[str]:
    """The human summary of Measurement.summary(), like ping's."""
    lines = ["", "--- {} udp-timecheck statistics ---".format(summary["target"])] + format_counts(summary)
    rtt = summary["rtt_ms"]
    if rtt["min"] is None:
        return lines
    lines.append("rtt min/avg/max/mdev = {min:.3f}/{avg:.3f}/{max:.3f}/{mdev:.3f} ms".format(**rtt))
    lines.append("rtt median/p90/p99 = {median:.3f}/{p90:.3f}/{p99:.3f} ms".format(**rtt))
    jitter = summary["jitter_ms"]
    lines.append("jitter {}".format("n/a (one reply)" if jitter is None else "{:.3f} ms".format(jitter)))
    lines += format_clock(summary)
    stamps = summary["timestamps"]
    fallbacks = ", {} timed from user-space readings".format(plural(stamps["user_fallbacks"], "probe")) \
        if stamps["user_fallbacks"] else ""
    lines.append("timestamps: {}{}".format(stamps["described"], fallbacks))
    rows = summary["histogram_ms"]
    widest = max(count for _, _, count in rows)
    lines.append("rtt histogram:")
    for low, high, count in rows:
        bar = "#" * max(1 if count else 0, round(40 * count / widest))
        lines.append("  {:9.3f} - {:9.3f} ms |{:<40} {}".format(low, high, bar, count))
    return lines


def failure_reason(measurement: Measurement, timeout: float) -> Optional[str]:
    """Why a run failed, in one line, with what to check; None if it did not.

    It fails without a valid reply, and with any liar, forged reply or echo.
    """
    target = measurement.target
    if measurement.echoes:
        return "{} echoes requests back: it is an echo service, not a time server".format(target)
    if measurement.unsigned and not measurement.received:
        return "replies are not authenticated: is the server running with the same key?"
    if measurement.forged:
        return "{} replies failed authentication (tampered with, replayed, or another key)".format(
            measurement.forged)
    if measurement.mismatched:
        return "the server is a liar: {} replies did not match a request id".format(measurement.mismatched)
    if measurement.received:
        return None
    if measurement.interrupted:
        return "interrupted after {:.1f} s, before any reply from {}".format(
            measurement.duration_ns / NS_PER_S, target)
    if measurement.stop_reason == REFUSED:
        return "connection refused by {}: no server is listening on that port".format(target)
    if measurement.malformed:
        return "{} sent {} replies that are not udp-timecheck replies".format(target, measurement.malformed)
    if measurement.errors:
        return "cannot send to {}: {}".format(target, measurement.last_error)
    return ("no reply from {} within {:g} s (is the server running{}, and is its UDP port "
            "open to you?)".format(target, timeout, " with the same key" if measurement.keyed else ""))


class Output:
    """Lines to a text stream, one write and flush each, so that threads never split a line.

    A stream that cannot be written (closed, a full disk) does not stop the
    program: the first failure is kept in .error, later lines are dropped.
    A broken pipe (output piped into head) still ends it, as it should.
    """

    def __init__(self, stream: Optional[TextIO]) -> None:
        self._stream = stream
        self.error = None if stream is not None else "it is closed"  # type: Optional[str]

    def line(self, text: str = "") -> None:
        if self.error is not None:
            return
        try:
            self._stream.write(text + "\n")
            self._stream.flush()
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as exc:
            self.error = getattr(exc, "strerror", None) or str(exc)
            _discard_output(self._stream)


def _discard_output(stream: Optional[TextIO]) -> None:
    """Point a failed stream at the null device, so that flushing it at exit cannot fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
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
    """Lines to a stream's file descriptor from a daemon thread: write() never blocks.

    The server's output: a line that finds the queue full (stdout is slower
    than the lines come, or blocked: a pipe nobody reads) or that cannot be
    written (a full disk, a closed or broken stdout) is dropped and counted.
    Serving never waits for it.
    """

    def __init__(self, stream: Optional[TextIO], max_queued: int = LOG_QUEUE_LINES) -> None:
        self.queue_drops = self.write_drops = 0
        self._fd = _file_descriptor(stream)
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._queue = queue.Queue(max_queued)  # type: queue.Queue
        self._final_written = threading.Event()
        self.thread = threading.Thread(target=self._run, name="udp-timecheck-output", daemon=True)
        self.thread.start()

    @property
    def dropped(self) -> int:
        return self.queue_drops + self.write_drops

    def write(self, line: str) -> None:
        try:
            self._queue.put_nowait((line, False))
        except queue.Full:
            self.queue_drops += 1

    def close(self, final_line: str, timeout: float = 0.5) -> bool:
        """Write final_line after the others, waiting at most timeout seconds; False if not written."""
        deadline = time.monotonic() + timeout
        try:
            self._queue.put((final_line, True), timeout=timeout)
        except queue.Full:
            return False
        return self._final_written.wait(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while True:
            line, final = self._queue.get()
            if not self._write((line + "\n").encode(self._encoding, "backslashreplace")):
                self.write_drops += 1
            elif final:
                self._final_written.set()
            if final:
                return

    def _write(self, data: bytes) -> bool:
        if self._fd is None:
            return False
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError:  # ENOSPC, EPIPE, EBADF...: this line is lost, the next may go
            return False
        return True


def _file_descriptor(stream: Optional[TextIO]) -> Optional[int]:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return None  # closed (python ... >&-), or not a file at all


@contextlib.contextmanager
def _stop_signals(on_signal: Callable[[], None], restore: bool = True) -> Iterator[None]:
    """Call on_signal() for each Ctrl-C or SIGTERM while inside, even if SIGINT came ignored.

    restore=False leaves the handlers in place for the rest of the process,
    so that a signal during the exit itself changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        on_signal()

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            if restore:
                signal.signal(signum, signal.SIG_DFL if old is None else old)


def _key_for(args: argparse.Namespace) -> Optional[bytes]:
    key, warnings = load_key(args.key_file)
    for warning in warnings:
        _err(warning)
    return key


def _check_host(host: str) -> None:
    if host.isdigit():  # getaddrinfo would take "8080" for the address 0.0.31.144
        raise TimecheckError("{0!r} is not a host; give the host before the port, "
                             "as in: 127.0.0.1 {0}".format(host))


def describe_server(server: TimeServer) -> str:
    """What the server's first line says after its address: who it answers, and its timestamps."""
    access = "key required (HMAC-SHA256)" if server.keyed else "no key: answers anyone"
    return "{}; {} timestamps".format(access, server.timestamps)


def cmd_server(args: argparse.Namespace) -> int:
    _check_host(args.host)
    output = LineWriter(sys.stdout)  # serving never waits for, or fails with, its output
    server = TimeServer(args.host, args.port, faulty=args.faulty, key=_key_for(args),
                        max_rate=args.max_rate, log=None if args.quiet else output.write,
                        log_limit=None if args.verbose else LOG_LINES_PER_SECOND, timestamps=args.timestamps)
    with server, _stop_signals(server.request_stop, restore=args.restore_signals):
        output.write("Server listening at {}; {}".format(server.address, describe_server(server)))
        server.serve_forever()
    stopped = "Server stopped: {}, log lines dropped {}".format(server.stats, output.dropped)
    if not output.close(stopped):
        _err(stopped)  # stdout is closed, full or blocked: the counters still go somewhere
    return EXIT_OK


def format_header(prober: Prober) -> str:
    """The first line of a measurement, like ping's."""
    return ("UDP-TIMECHECK {} ({}): {} probes of {} bytes, interval {:g} s, timeout {:g} s, "
            "{} timestamps{}").format(prober.target, prober.address[0], prober.count, prober.request_size,
                                      prober.interval, prober.timeout, prober.timestamps,
                                      ", HMAC-SHA256" if prober.key else "")


class ProbeRows:
    """One row per probe as it ends, flushed, so that a killed run keeps every probe that ended.

    CSV with a header row, or JSON Lines.  A failure to write is kept in
    .error, and the run goes on.
    """

    def __init__(self, stream: TextIO, name: str, kind: str) -> None:
        self.name, self.error = name, None  # type: str, Optional[str]
        self._stream = stream
        self._csv = csv.DictWriter(stream, fieldnames=SAMPLE_FIELDS) if kind == "csv" else None
        if self._csv is not None:
            self._write(self._csv.writeheader)

    def add(self, sample: Sample) -> None:
        if self.error is None:
            row = sample.as_dict()
            self._write(lambda: self._csv.writerow(row) if self._csv is not None
                        else self._stream.write(json.dumps(row) + "\n"))

    def _write(self, write: Callable[[], object]) -> None:
        try:
            write()
            self._stream.flush()
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as exc:
            self.error = getattr(exc, "strerror", None) or str(exc)


def _open_rows(path: Optional[str], kind: str, stack: contextlib.ExitStack) -> Optional[ProbeRows]:
    """--csv or --jsonl: opened before anything is sent, so a bad path is a usage error, not a lost run."""
    if path is None:
        return None
    if path == "-":
        return ProbeRows(sys.stdout, "standard output", kind)
    if os.path.isfile(path) and os.path.getsize(path):
        _err("note: {} exists; writing it anew".format(path))
    try:
        stream = open(path, "w", newline="" if kind == "csv" else None)
    except OSError as exc:
        raise TimecheckError("cannot write {}: {}".format(path, exc.strerror or exc)) from None
    stack.callback(_close_quietly, stream)
    return ProbeRows(stream, path, kind)


def _close_quietly(stream: TextIO) -> None:
    try:
        stream.close()
    except OSError:  # what it could not write has been reported already
        pass


class Progress:
    """Probes done and the time left, a few times a second, on a terminal: with -q, a long run
    is not silent.  Nothing at all when the stream is not a terminal."""

    def __init__(self, stream: Optional[TextIO], total: int) -> None:
        self._stream = stream if stream is not None and stream.isatty() else None
        self._total, self._started, self._next = total, time.monotonic(), 0.0
        self._shown = False

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self._stream is None or now < self._next:
            return
        self._next = now + PROGRESS_EVERY
        left = (now - self._started) / done * (self._total - done) if done else 0
        self._show("\r{}/{}, about {:.0f} s left ".format(done, plural(self._total, "probe"), left))

    def clear(self) -> None:
        if self._shown:
            self._show("\r" + " " * 60 + "\r")

    def _show(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
            self._shown = True
        except (OSError, ValueError):
            self._stream = None


def cmd_client(args: argparse.Namespace) -> int:
    _check_host(args.host)
    if args.csv == "-" and args.json:
        raise TimecheckError("--csv - and --json both write to standard output; give --csv a file")
    text = Output(sys.stderr if args.csv == "-" else sys.stdout)  # stdout is the CSV's, then
    measuring = (args.measure_delay or args.quiet or args.json or args.csv is not None
                 or args.count is not None or args.interval is not None)
    prober = Prober(args.host, args.port, count=args.count or (DEFAULT_COUNT if measuring else 1),
                    interval=args.interval or 0.0, timeout=args.timeout, size=args.size or 0,
                    key=_key_for(args), timestamps=args.timestamps, on_note=_err)
    with contextlib.ExitStack() as stack:
        rows = [sink for sink in (_open_rows(args.csv, "csv", stack),) if sink is not None]
        progress = Progress(sys.stderr if args.quiet else None, prober.count)
        show = measuring and not (args.quiet or args.json or args.csv == "-")
        prober.on_sample = _on_sample(text if show else None, rows, progress, prober.target, args.timeout)
        if measuring and not args.json:
            text.line(format_header(prober))
        stack.enter_context(_stop_signals(prober.stop, restore=args.restore_signals))
        measurement = prober.run()  # a signal ends it; after it, signals change nothing
        progress.clear()
        _print_result(text, args, measuring, measurement, measurement.summary())
    for sink_name, error in [(sink.name, sink.error) for sink in rows] + [("standard output", text.error)]:
        if error is not None:
            raise TimecheckError("cannot write to {}: {}".format(sink_name, error))
    reason = failure_reason(measurement, args.timeout)
    if reason is not None:
        raise TimecheckError(reason, EXIT_FAILED)
    return EXIT_OK


def _on_sample(text: Optional[Output], rows: Sequence[ProbeRows], progress: Progress, target: str,
               timeout: float) -> Callable[[Sample], None]:
    """What happens as each probe ends: its line, its rows, the progress."""
    def ended(sample: Sample) -> None:
        if text is not None:
            text.line(format_sample(sample, target, timeout))
        for sink in rows:
            sink.add(sample)
        progress.update(sample.seq + 1)
    return ended


def _print_result(out: Output, args: argparse.Namespace, measuring: bool, measurement: Measurement,
                  summary: Dict[str, object]) -> None:
    if args.json:
        out.line(json.dumps(summary))
    elif measuring:
        for line in format_summary(summary):
            out.line(line)
    else:  # the tutorial's single round trip: the server's text, or its verdict
        sample = measurement.samples[0] if measurement.samples else None
        if sample is not None and sample.status == OK:
            out.line(printable(sample.reply_text))
        elif sample is not None and sample.status == MISMATCHED:
            out.line("Server is a liar!")


def cmd_demo(args: argparse.Namespace) -> int:
    out = Output(sys.stdout)
    status = EXIT_OK
    with TimeServer("127.0.0.1", 0, log=lambda line: out.line("  server | " + line)) as server:
        host, port = server.address[:2]
        out.line("$ python3 udp_timecheck.py server {} {}".format(host, port))
        out.line("  server | Server listening at {}; {}".format(server.address, describe_server(server)))
        server.start()
        for extra in ((), DEMO_ARGS):
            command = ["client", host, str(port)] + list(extra)
            out.line("\n$ python3 udp_timecheck.py " + " ".join(command))
            status = max(status, main(command))
    out.line("  server | Server stopped: {}".format(server.stats))
    return status


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


SERVER_EPILOG = """examples:
  %(prog)s 0.0.0.0 1060     all IPv4 interfaces: what a cloud VM wants
  %(prog)s :: 1060 -q       all IPv6 interfaces, IPv4 too; no line per request
  %(prog)s 0.0.0.0 1060 --key-file key

exit codes: 0 stopped by Ctrl-C or SIGTERM; 2 a usage or set-up error (a port
in use, an address not on this machine, an unreadable key)"""
CLIENT_EPILOG = """The client asks once, as the tutorial's does, unless it measures: with
--measure-delay, or -c, -i, -q, --json or --csv, it sends {count} probes
unless -c says otherwise.

examples:
  %(prog)s 203.0.113.7 1060                     the server's time, once
  %(prog)s 203.0.113.7 1060 --measure-delay     {count} probes, then statistics
  %(prog)s 203.0.113.7 1060 -c 100 -i 0.2 --json

exit codes: 0 at least one valid reply, and no liar, forged reply or echo;
1 no valid reply, a liar, a forged reply or an echo service; 2 a usage or
set-up error""".format(count=DEFAULT_COUNT)
DEMO_DESCRIPTION = """Start a server on 127.0.0.1, on a free port, and run two clients against
it in this same process: the tutorial's single round trip, then a
measurement of 50 probes.  Both sides' output is shown; the server's lines
are marked "server |".  Nothing leaves this machine."""


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line; prog is the name in messages (default: the name it was run as)."""
    parser = _ArgumentParser(prog=prog, description=(
        "UDP latency and clock check: a time server, and a client that measures round-trip "
        "time, loss and the server's clock offset."))
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="{server,client,demo}")
    commands.required = True
    formatter = argparse.RawDescriptionHelpFormatter
    server = commands.add_parser("server", help="answer time requests", epilog=SERVER_EPILOG,
                                 formatter_class=formatter)
    client = commands.add_parser("client", help="ask the time once, or measure with --measure-delay",
                                 epilog=CLIENT_EPILOG, formatter_class=formatter)
    demo = commands.add_parser("demo", help="run a server and a client on loopback, show both",
                               description=DEMO_DESCRIPTION, formatter_class=formatter)
    _add_common_options(server, "address to listen on; 0.0.0.0 for all IPv4 interfaces, "
                                "and :: for IPv6 and IPv4")
    _add_common_options(client, "server to ask: a name, an IPv4 or an IPv6 address")
    _add_server_options(server)
    _add_client_options(client)
    server.set_defaults(func=cmd_server)
    client.set_defaults(func=cmd_client)
    demo.set_defaults(func=cmd_demo)
    return parser


def _add_common_options(sub: argparse.ArgumentParser, role: str) -> None:
    sub.add_argument("host", nargs="?", default=DEFAULT_HOST, metavar="HOST",
                     help="{} (default %(default)s)".format(role))
    sub.add_argument("port", nargs="?", default=DEFAULT_PORT, metavar="PORT",
                     type=_ranged(int, 0, 65535, "a port number from 0 to 65535"),
                     help="UDP port (default %(default)s)")
    sub.add_argument("--key-file", metavar="PATH", help="shared secret for HMAC-SHA256 "
                     "authentication; or set {} (never a key on the command line)".format(KEY_ENV))
    sub.add_argument("--timestamps", choices=(KERNEL, USER), default=KERNEL,
                     help="take receive times from the kernel (default, where it works) or "
                          "read them in user space after each wake-up")
    sub.add_argument("--measure_delay", "-measure_delay", type=_truthy, default=False, metavar="BOOL",
                     help="the tutorial's spelling (1/true/yes or 0/false/no)" + (
                         "; the server accepts and ignores it" if sub.prog.endswith("server") else ""))


def _add_server_options(server: argparse.ArgumentParser) -> None:
    verbosity = server.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="no line per request")
    verbosity.add_argument("-v", "--verbose", action="store_true",
                           help="a line for every request (default: at most {} a second)".format(
                               LOG_LINES_PER_SECOND))
    server.add_argument("--faulty", nargs="?", const=FAULTY_PROBABILITY, default=0.0, metavar="P",
                        type=_ranged(float, 0, 1, "a probability from 0 to 1"),
                        help="answer with a wrong id with probability P (default %(const)s), "
                             "as the tutorial's FAULTY_SERVER")
    server.add_argument("--max-rate", type=_ranged(float, 0.01, 1e9, "replies a second, above 0"),
                        metavar="N", help="answer at most N requests a second per source address")


def _add_client_options(client: argparse.ArgumentParser) -> None:
    client.add_argument("--measure-delay", action="store_true",
                        help="measure: many probes, then statistics (implied by the options below)")
    client.add_argument("-c", "--count", type=_ranged(int, 1, 10 ** 9, "a whole number from 1"),
                        help="probes to send (default {} when measuring, else 1)".format(DEFAULT_COUNT))
    client.add_argument("-i", "--interval", type=_interval,
                        help="seconds between probes, from {:g}; 0 (default) sends the next as soon "
                             "as the last is answered or timed out".format(MIN_INTERVAL))
    client.add_argument("-W", "--timeout", type=_ranged(float, 0.001, 3600, "seconds from 0.001 to 3600"),
                        default=DEFAULT_TIMEOUT, help="seconds to wait for a reply (default %(default)s)")
    client.add_argument("-q", "--quiet", action="store_true",
                        help="the summary only (and progress on stderr, when it is a terminal)")
    client.add_argument("--json", action="store_true", help="one JSON object instead of text")
    client.add_argument("--csv", metavar="FILE", help="also write one row per probe to FILE (- for stdout)")
    client.add_argument("--size", type=_ranged(int, 1, 65527, "bytes from 1 to 65527"),
                        help="pad requests and replies to SIZE bytes (MTU and fragmentation tests; "
                             "at least what a request needs, about 150)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with argv (default sys.argv[1:]); returns the exit code."""
    for stream in (sys.stdout, sys.stderr):  # network text must never crash the output
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = build_parser(None if argv is None else "udp_timecheck.py").parse_args(argv)
        # As the program itself, signal handlers stay to the end, so that a signal
        # during the exit changes nothing; called as a function, they are restored.
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
