"""Where Python runs: what each platform lacks, and the clear word that replaces it.

The whole suite also runs on a simulated Windows and macOS (tests/simulate.py); the tests
here check the platform paths directly, whatever the platform of this run.
"""

import json
import os
import re
import shutil
import socket
import subprocess

import pytest

import udp_timecheck as utc
from conftest import (LISTENING, as_script, cli, free_udp_port, ipv6_loopback_available, needs_linux_machine,
                      run)


def python2():
    """A Python 2 that runs (a pyenv shim may name one that does not), or None."""
    for path in (os.path.expanduser("~/.pyenv/versions/2.7.18/bin/python2.7"),
                 shutil.which("python2.7"), shutil.which("python2")):
        if path and subprocess.run([path, "-c", "pass"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL).returncode == 0:
            return path
    return None


PYTHON2 = python2()


# --- the BSDs and macOS: microseconds, and IP_RECVDSTADDR ------------------------------------

def test_a_microsecond_receive_stamp_and_a_bsd_destination_address(monkeypatch):
    monkeypatch.setattr(utc, "RECEIVE_STAMPS", utc.StampOption(0x0400, utc.TIMEVAL, 1000))
    monkeypatch.setattr(utc, "IP_PKTINFO", None)
    monkeypatch.setattr(utc, "IP_RECVDSTADDR", 7)
    monkeypatch.setattr(utc, "IP_SENDSRCADDR", 7)
    destination = socket.inet_aton("127.0.0.2")
    ancillary = [(socket.SOL_SOCKET, 0x0400, utc.TIMEVAL.pack(1_764_000_000, 123456)),
                 (socket.IPPROTO_IP, 7, destination)]
    stamp_ns, control = utc.read_ancillary(ancillary)
    assert stamp_ns == 1_764_000_000_123_456_000  # microseconds, in ns
    assert control == [(socket.IPPROTO_IP, 7, destination)]  # sent back as IP_SENDSRCADDR


def test_the_bsds_clock_state_comes_from_ntp_adjtime(monkeypatch):
    if not (utc.LINUX or utc.BSD):
        pytest.skip("no ntp_adjtime in this platform's C library")
    monkeypatch.setattr(utc, "LINUX", False)
    monkeypatch.setattr(utc, "BSD", True)
    state = utc.read_clock_state()  # glibc has ntp_adjtime too, with the same first fields
    assert state.synchronized in (True, False) and state.maxerror_ns >= 0


# --- Windows: no recvmsg, no sendmsg, a DWORD timeout, resets for refusals ----------------------

class NoMessageCalls(socket.socket):
    """A socket as Windows' Python has it."""

    @property
    def recvmsg(self):
        raise AttributeError("recvmsg")

    @property
    def sendmsg(self):
        raise AttributeError("sendmsg")


def test_without_recvmsg_a_server_and_a_client_still_measure(monkeypatch):
    monkeypatch.setattr(socket, "socket", NoMessageCalls)
    with utc.TimeServer("127.0.0.1", 0) as server:
        server.start()
        assert server.timestamps == utc.USER and server.no_kernel_stamps == "no recvmsg on this platform"
        recorder = utc.Prober(*server.address[:2], count=5, interval=0.01).run()
        summary = utc.summarize(recorder)
    assert summary["received"] == 5 and summary["timestamps"]["client"] == utc.USER
    header = utc.format_header(recorder)
    assert "user timestamps (no kernel timestamps: no recvmsg on this platform)" in header


def test_windows_takes_its_receive_timeout_in_milliseconds_or_python_keeps_it(monkeypatch):
    monkeypatch.setattr(utc, "WINDOWS", True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        utc._set_receive_timeout(sock, 0.25)
        if utc.LINUX:  # Linux refuses a DWORD: Python's own timeout instead, still 0.25 s
            assert sock.gettimeout() == 0.25
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(utc.NOTHING_YET):  # a quiet socket gives up, whichever way
            sock.recv(10)


class ResetOnRefusal(NoMessageCalls):
    """Windows' socket: no recvmsg, and a refusal reported by recvfrom as a reset (WSAECONNRESET)."""

    def recvfrom(self, *args):
        try:
            return super().recvfrom(*args)
        except ConnectionRefusedError:
            raise ConnectionResetError(10054, "An existing connection was forcibly closed") from None


def test_a_reset_is_a_refusal_as_windows_reports_it(monkeypatch):
    monkeypatch.setattr(socket, "socket", ResetOnRefusal)
    monkeypatch.setattr(utc, "SHARED_CHANNELS", False)  # a connected socket a target, as on Windows
    recorder = utc.Prober("127.0.0.1", free_udp_port(), count=1, timeout=5).run()
    assert recorder.totals.refused == 1 and recorder.samples[0].reason == utc.REFUSED
    assert recorder.duration_ns < 4 * utc.NS_PER_S  # said by the refusal, not by the timeout


def test_the_header_says_which_timestamps_this_platform_gives(start_server, capsys):
    server = start_server(log=None)
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "2", "-i", "0"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    if utc.LINUX:
        assert header.endswith(", kernel timestamps")
    else:
        assert ", user timestamps (no kernel timestamps: " in header


def test_a_wildcard_server_that_cannot_tell_the_address_asked_says_so(processes):
    server = processes(cli("server", "0.0.0.0", "0"))
    line = server.stdout.expect(r"^Server listening at ").string
    said = "replies from the kernel's choice of source address" in line
    assert said == (not utc.LINUX and utc.IP_RECVDSTADDR is None)  # Linux has IP_PKTINFO


# --- any locale ------------------------------------------------------------------------------------

def ascii_environment():
    return dict(os.environ, LC_ALL="C", LANG="C", PYTHONIOENCODING="ascii")  # strict ASCII, any Python


def test_an_ascii_stdout_gets_every_line_in_ascii(start_server):
    server = start_server(log=None)
    result = run(cli("client", *server.address[:2], "-c", "20", "-i", "0.01"), env=ascii_environment())
    assert result.returncode == 0, result.stderr
    assert " +/- " in result.stdout and "\u00b1" not in result.stdout
    assert result.stdout.splitlines()[-1].startswith(" ")  # the histogram's last row: nothing cut off


def test_sntp_on_an_ascii_stdout():
    from conftest import FakeNtpServer
    with FakeNtpServer(root=(0, 1)) as ntp:
        result = run(cli("sntp", "127.0.0.1:{}".format(ntp.port), "-c", "2", "-i", "0.05"),
                     env=ascii_environment())
    assert result.returncode == 0, result.stderr
    assert " ms +/- " in result.stdout and "this machine's clock: " in result.stdout


def test_fit_encoding_keeps_what_fits_and_replaces_the_rest():
    assert utc.fit_encoding("1 \u00b1 2", "utf-8") == "1 \u00b1 2"
    assert utc.fit_encoding("1 \u00b1 2", "latin-1") == "1 \u00b1 2"  # Latin-1 has the sign
    assert utc.fit_encoding("1 \u00b1 2 \u2014 \u00e9\u4e2d", "ascii") == "1 +/- 2 -- \\xe9\\u4e2d"


# --- Python 2 --------------------------------------------------------------------------------------

@pytest.mark.skipif(PYTHON2 is None, reason="no Python 2 here")
def test_python_2_stops_at_a_line_that_says_why():
    result = run([PYTHON2, str(utc.__file__).replace(".pyc", ".py"), "demo"], timeout=30)
    assert result.returncode != 0 and "SyntaxError" in result.stderr
    assert "udp_timecheck.py needs Python 3.6 or newer: run it with python3" in result.stderr


# --- HOST:PORT and [V6]:PORT ----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1", ("127.0.0.1", None)),
    ("127.0.0.1:1060", ("127.0.0.1", 1060)),
    ("example.com:53", ("example.com", 53)),
    ("[::1]:1060", ("::1", 1060)),
    ("[::1]", ("::1", None)),
    ("::1", ("::1", None)),  # a bare IPv6 address names no port
    ("fe80::1%eth0", ("fe80::1%eth0", None)),
])
def test_split_target(text, expected):
    assert utc.split_target(text) == expected


def test_a_port_may_have_leading_zeros_but_not_thousands_of_digits():
    assert utc.split_target("127.0.0.1:" + "0" * 9 + "1060") == ("127.0.0.1", 1060)
    with pytest.raises(utc.TimecheckError, match="expected a port number"):
        utc.port_number("1" * 5000, "PORT")  # int() refuses past 4,300 digits


@pytest.mark.parametrize("text, message", [
    ("127.0.0.1:70000", "expected a port number from 0 to 65535"),
    ("127.0.0.1:", "expected a port number"),
    ("[::1]:x", "expected a port number"),
    ("[::1", "expected [IPV6] or [IPV6]:PORT"),
    ("[::1]1060", "expected [IPV6] or [IPV6]:PORT"),
    (":1060", "names no host"),
    ("8080", "is not a host; give the host before the port, in ASCII digits, as in: 127.0.0.1 8080"),
    ("\uff11\uff10\uff16\uff10", "is not a host; .* as in: 127.0.0.1 1060"),  # full-width: IDNA makes it 1060
    ("\u00b2", "is not a host"),  # a superscript digit
])
def test_split_target_refuses(text, message):
    with pytest.raises(utc.TimecheckError, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        utc.split_target(text)
    assert caught.value.exit_code == utc.EXIT_USAGE


def test_client_and_sntp_take_host_colon_port(start_server, capsys):
    server = start_server()
    host, port = server.address[:2]
    assert utc.main(["client", "{}:{}".format(host, port)]) == 0
    assert capsys.readouterr().out.startswith("The time is ")
    assert utc.main(["client", "{}:{}".format(host, port), "-c", "2", "-i", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == "{}:{}".format(host, port)
    assert utc.main(["client", host, str(port), "-c", "2", "-i", "0", "--json"]) == 0  # HOST PORT still works
    assert json.loads(capsys.readouterr().out)["received"] == 2
    assert utc.main(["client", "{}:{}".format(host, port), "9"]) == 0  # its own port wins over PORT
    from conftest import FakeNtpServer
    with FakeNtpServer(root=(0, 1)) as ntp:
        assert utc.main(["sntp", "127.0.0.1:{}".format(ntp.port), "-c", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["received"] == 1


@pytest.mark.skipif(not ipv6_loopback_available(), reason="this machine has no ::1")
def test_client_takes_bracketed_ipv6_and_port(start_server, capsys):
    server = start_server("::1")
    assert utc.main(["client", "[::1]:{}".format(server.address[1]), "-c", "2", "-i", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["received"] == 2 and summary["target"] == "[::1]:{}".format(server.address[1])


def test_server_takes_host_colon_port(processes):
    server = processes(cli("server", "127.0.0.1:0"))
    assert server.stdout.expect(r"^Server listening at 127\.0\.0\.1:(\d+)")
    usage = run(cli("server", "127.0.0.1:1060", "1061"))
    assert usage.returncode == 2 and "give the port once" in usage.stderr


# --- a simulated client against this machine's real server ----------------------------------------

def simulated(platform, *args):
    """argv of the program on a simulated platform, whatever this run's own."""
    return dict(os.environ, UDP_TIMECHECK_SIMULATE=platform), cli(*args)


@needs_linux_machine("the server reads each request's TOS with IP_RECVTOS")
def test_a_windows_clients_tos_is_reported_back_as_on_linux(processes):
    server = processes(as_script("server", "127.0.0.1", "0", "-q"))  # this machine as it is
    port = server.stdout.expect(LISTENING).group(1)
    env, argv = simulated("windows", "client", "127.0.0.1", port, "-c", "3", "-i", "0", "-Q", "EF")
    text = run(argv + ["-q"], env=env)
    summary = json.loads(run(argv + ["--json"], env=env).stdout)
    assert summary["tos"]["received_by_server"] == 0xb8 and summary["tos"]["received_back"] is None
    assert summary["tos"]["checked"] == 3 and summary["tos"]["checked_back"] == 0
    assert ("TOS 0xb8 (EF) sent, 0xb8 (EF) at the server, unknown back (this platform cannot read it): "
            "kept on the way out") in text.stdout


@pytest.mark.parametrize("platform", ["windows", "macos"])
def test_the_sntp_header_says_the_stamps_its_json_says(platform):
    from conftest import FakeNtpServer
    with FakeNtpServer(root=(0, 1)) as ntp:
        env, argv = simulated(platform, "sntp", "127.0.0.1:{}".format(ntp.port), "-c", "2", "-i", "0.05")
        header = run(argv, env=env).stdout.splitlines()[0]
        summary = json.loads(run(argv + ["--json"], env=env).stdout)
    said = re.search(r", (kernel|user) timestamps", header).group(1)
    assert said == summary["timestamps"]["client"] == "user"  # neither simulated kernel stamps a receive here
