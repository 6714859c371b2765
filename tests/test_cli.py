"""The command line as users run it: exit codes, messages, signals, the demo."""

import configparser
import signal
import subprocess
import sys
import threading

import pytest

import udp_timecheck as utc
from conftest import LISTENING, MODULE, POSIX_ONLY, as_script, cli, run, run_cli, silent_port


@POSIX_ONLY
def test_tutorial_server_command_serves_and_sigterm_exits_0_with_counters(processes):
    # the tutorial's own server command line, with port 0 instead of 8080, run as users run it
    server = processes(as_script("server", "127.0.0.1", "0", "--measure_delay", "1", "--measure_delay", "1"))
    port = int(server.stdout.expect(LISTENING).group(1))
    client = run_cli("client", "127.0.0.1", port, "--measure_delay", "1", "-c", "5")
    assert client.returncode == 0, client.stderr
    assert "5 probes sent, 5 received, 0% loss" in client.stdout
    assert run(as_script("client", "127.0.0.1", port)).returncode == 0  # the client as users run it too
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert any(line.startswith("Server stopped: served 6, malformed 0, unauthenticated 0, rate-limited 0, "
                               "too short to answer 0") for line in server.rest(server.stdout))
    assert server.rest(server.stderr) == []


@POSIX_ONLY
def test_ctrl_c_stops_the_server_cleanly(cli_server):
    server, _ = cli_server("-q")
    server.signal(signal.SIGINT)
    assert server.wait() == 0
    assert server.rest(server.stdout)[-1].startswith("Server stopped: served 0")
    assert server.rest(server.stderr) == []


@POSIX_ONLY
def test_ctrl_c_ends_a_measurement_with_its_summary(processes, cli_server):
    _, port = cli_server("-q")
    client = processes(cli("client", "127.0.0.1", port, "-i", "0.01", "-c", "1000000"))
    client.stdout.expect(r"seq=5 rtt=")
    client.signal(signal.SIGINT)
    assert client.wait() == 0
    rest = client.rest(client.stdout)
    summary = [line for line in rest if " probes sent, " in line]
    assert len(summary) == 1 and "rtt min/avg/max/mdev" in "\n".join(rest)
    sent, received = (int(word) for word in summary[0].split()[0:4:3])
    assert 6 <= sent < 1000000 and received >= 6
    assert client.rest(client.stderr) == []


@POSIX_ONLY
def test_ctrl_c_with_nothing_answered_exits_1(processes):
    with silent_port() as sock:
        client = processes(cli("client", *sock.getsockname(), "-i", "0.05", "-c", "1000000"))
        client.stdout.expect(r"^UDP-TIMECHECK ")
        sock.recv(65535)  # a probe is out: the client is in its loop
        client.signal(signal.SIGINT)
        assert client.wait() == 1
    out = client.rest(client.stdout)
    assert any(" received, 100% loss" in line for line in out), (client.stdout.lines, client.stderr.lines)
    assert "interrupted after " in client.rest(client.stderr)[-1]
    assert "before any reply" in client.stderr.lines[-1]


@POSIX_ONLY
def test_max_rate_limits_a_source_and_counts_it(cli_server):
    server, port = cli_server("--max-rate", "1", "-q")
    client = run_cli("client", "127.0.0.1", port, "-c", "5", "-i", "0.001", "-W", "0.5", "-q")
    assert client.returncode == 0  # one answered: a bucket of one, refilled once a second
    assert "5 probes sent, 1 received, 80% loss" in client.stdout
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert "rate-limited 4," in server.rest(server.stdout)[-1]


def test_client_and_exit_codes_as_a_process(cli_server):
    _, port = cli_server()
    ok = run_cli("client", "127.0.0.1", port)
    assert ok.returncode == 0 and ok.stdout.startswith("The time is ") and ok.stderr == ""
    with silent_port() as sock:
        silent = run_cli("client", *sock.getsockname(), "-W", "0.2")
    assert silent.returncode == 1 and silent.stdout == ""
    assert silent.stderr.count("\n") == 1 and "no reply" in silent.stderr
    usage = run_cli("client", "127.0.0.1", "70000")
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "Traceback" not in usage.stderr


def test_measure_delay_spellings(start_server, capsys):
    server = start_server()
    port = str(server.address[1])
    for spelling in (["--measure-delay"], ["--measure_delay", "1"], ["--measure_delay", "yes"],
                     ["-measure_delay", "true"]):
        assert utc.main(["client", "127.0.0.1", port, *spelling, "-c", "3", "-i", "0"]) == 0
        assert "3 probes sent, 3 received" in capsys.readouterr().out
    assert utc.main(["client", "127.0.0.1", port, "--measure_delay", "0"]) == 0
    assert capsys.readouterr().out.startswith("The time is ")  # off: the single round trip


def test_demo_runs_end_to_end():
    demo = run_cli("demo", timeout=60)
    assert demo.returncode == 0, demo.stderr
    assert "  server | Server listening at 127.0.0.1:" in demo.stdout
    assert "\nThe time is " in demo.stdout
    assert "50 probes sent, 50 received, 0% loss" in demo.stdout
    assert "server clock offset " in demo.stdout and "  server | Server stopped: served 51" in demo.stdout


class _PipeWithoutReader:
    encoding = "utf-8"

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass


def test_a_broken_pipe_in_a_thread_ends_the_program_from_the_main_thread():
    out = utc.Sink(_PipeWithoutReader())
    thread = threading.Thread(target=out.line, args=("  server | a request",))  # the demo's server
    thread.start()
    thread.join(timeout=10)
    assert out.broken_pipe  # said, not raised in the thread (no traceback there)
    with pytest.raises(BrokenPipeError):
        out.line("the main thread's next line")  # main() turns this into a quiet exit


@POSIX_ONLY
def test_the_demo_piped_into_a_reader_that_leaves_says_nothing_more():
    demo = subprocess.Popen(cli("demo"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    try:
        assert demo.stdout.readline().startswith("$ python3 udp_timecheck.py server")
        demo.stdout.close()  # as head -1, or grep -q, leaves
        assert demo.wait(timeout=60) == utc.EXIT_FAILED
        err = demo.stderr.read()
    finally:
        demo.kill()
    assert "Traceback" not in err and "Exception" not in err


def test_import_has_no_side_effects():
    code = ("import socket, sys\n"
            "class Refused(socket.socket):  # the stdlib may subclass sockets; nothing may open one\n"
            "    def __init__(self, *args, **kwargs): raise AssertionError('socket at import')\n"
            "socket.socket = Refused\n"
            "sys.argv = ['x', 'client', 'no-such-host.invalid']\n"
            "import udp_timecheck\n")
    result = run([sys.executable, "-c", code], timeout=30, cwd=str(MODULE.parent))
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


def installed_entry_points():
    """The installed distribution's console scripts, or None (not installed, or Python < 3.8)."""
    try:
        from importlib import metadata
    except ImportError:
        return None
    try:
        return {entry.name: entry.value for entry in metadata.distribution("udp-timecheck").entry_points}
    except metadata.PackageNotFoundError:
        return None


def test_console_script_is_declared():
    setup = configparser.ConfigParser()
    setup.read(str(MODULE.parent / "setup.cfg"))
    console_scripts = setup["options.entry_points"]["console_scripts"]
    assert console_scripts.split() == ["udp-timecheck", "=", "udp_timecheck:main"]
    installed = installed_entry_points()  # CI installs it under the current Python, not under 3.6
    assert installed is None or installed.get("udp-timecheck") == "udp_timecheck:main"
