"""What makes the client measure, one rule stated three times (behaviour, --help, docs/usage.md), and
-w as ping's: until the deadline, unless -c comes first; a probe in flight then is not lost."""

import json

import pytest

import udp_timecheck as utc
from conftest import ROOT, silent_port, wait_for

USAGE = (ROOT / "docs" / "usage.md").read_text()


def measured(out):
    """Whether the client's stdout is a measurement's, or the tutorial's single round trip."""
    lines = out.splitlines()
    if len(lines) == 1 and lines[0].startswith("The time is "):
        return False
    return "udp-timecheck statistics ---" in out or '"sent": ' in out


def option_argv(written, tmp_path, ntp_port):
    """The option as a user would give it, with a value where it takes one."""
    return {
        "--measure-delay": ["--measure-delay"], "-c": ["-c", "3"], "-i": ["-i", "0.001", "-c", "5"],
        "-w": ["-w", "0.2"], "-q": ["-q"], "--json": ["--json"], "--csv": ["--csv", str(tmp_path / "r.csv")],
        "--jsonl": ["--jsonl", str(tmp_path / "r.jsonl")], "--plot": ["--plot", str(tmp_path / "r.svg")],
        "--reference": ["--reference", "127.0.0.1:{}".format(ntp_port)],
        "--report-every": ["--report-every", "60"],
        "-D": ["-D"], "--size": ["--size", "400"], "--timestamps": ["--timestamps", "user"],
        "--metrics": ["--metrics", "127.0.0.1:0"], "--tos": ["--tos", "EF"], "--ttl": ["--ttl", "64"],
        "--ports": ["--ports", "2"],
    }[written]


@pytest.fixture(scope="module")
def ntp():
    from conftest import FakeNtpServer
    with FakeNtpServer(root=(0, 1)) as server:
        yield server


@pytest.mark.parametrize("written", [written for _, written in utc.MEASURING_OPTIONS])
def test_every_measuring_option_alone_makes_a_measurement(written, tmp_path):
    argv = ["client", "127.0.0.1", "1060"] + option_argv(written, tmp_path, 123)
    assert utc.is_measurement(utc.build_parser().parse_args(argv)), written


def test_all_measuring_options_at_once_measure(start_server, ntp, tmp_path, capsys):
    """The rule above is what cmd_client follows: one real run with every measuring option."""
    server = start_server(log=None)
    argv = ["client", *map(str, server.address[:2])]
    for _, written in utc.MEASURING_OPTIONS:
        if written not in ("-c", "-i", "-w", "--json"):  # given below; and text, to read it
            argv += option_argv(written, tmp_path, ntp.port)
    assert utc.main(argv + ["-c", "3", "-i", "0.01", "-w", "10"]) == 0
    out = capsys.readouterr().out
    assert measured(out) and "3 probes sent, 3 received" in out
    assert (tmp_path / "r.csv").exists() and (tmp_path / "r.jsonl").exists() and (tmp_path / "r.svg").exists()


@pytest.mark.parametrize("extra", [[], ["-W", "2"], ["--key-file", "KEY"], ["--measure_delay", "0"]])
def test_the_other_options_ask_once_as_the_tutorial_does(extra, start_server, tmp_path, capsys):
    key = tmp_path / "key"
    key.write_bytes(b"a key")
    key.chmod(0o600)
    server = start_server(log=None, key=b"a key" if "--key-file" in extra else None)
    argv = ["client", *map(str, server.address[:2])] + [str(key) if word == "KEY" else word for word in extra]
    assert utc.main(argv) == 0
    assert not measured(capsys.readouterr().out)
    wait_for(lambda: server.stats.served >= 1)  # the server counts a reply once it has gone
    assert server.stats.served == 1


def test_the_rule_in_help_and_the_usage_page_is_the_behaviours(capsys):
    assert utc.main(["client", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    usage = " ".join(USAGE.split())
    listed = ", ".join(written for _, written in utc.MEASURING_OPTIONS)
    assert "Any of " + listed + " makes it measure" in help_text
    assert "-W, --key-file, -4, -6, -I and --interleaved do not make it measure" in help_text
    assert listed.replace(", ", "`, `") in usage  # the usage page lists the same options, in `code`
    assert "`-W`, `--key-file`, `-4`, `-6`, `-I` and `--interleaved` do not make it measure" in usage


# --- -w, as ping's -w ------------------------------------------------------------------------

def test_w_alone_has_no_count_limit_and_a_probe_a_second(start_server, capsys):
    server = start_server(log=None)
    assert utc.main(["client", *map(str, server.address[:2]), "-w", "1.5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 0 and summary["interval"] == utc.DEFAULT_INTERVAL
    assert summary["sent"] == 2 and summary["stopped_because"] == "deadline"  # at 0 and 1 s


def test_a_count_reached_before_the_deadline_ends_the_run(start_server, capsys):
    server = start_server(log=None)
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "5", "-i", "0.01", "-w", "30",
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sent"] == 5 and summary["stopped_because"] is None and summary["duration_s"] < 10


def test_a_silent_host_until_the_deadline_no_wait_said_longer_than_it_was(capsys):
    with silent_port() as sock:
        code = utc.main(["client", *map(str, sock.getsockname()), "-c", "0", "-w", "1.2", "-W", "5"])
    captured = capsys.readouterr()
    assert code == 1
    assert "before the deadline (1.2 s)" in captured.err and "within 5 s" not in captured.err
    assert "seq=0: still in flight at the deadline" in captured.out
    assert "2 probes still in flight at the deadline: not counted as lost" in captured.out
    assert "no loss figure" in captured.out


def test_probes_in_flight_at_the_deadline_are_not_lost(start_server, relay, capsys):
    server = start_server(log=None)
    hop = relay(server.address, lambda index, data: [(0.5, data)])  # every reply half a second late
    assert utc.main(["client", *map(str, hop.address[:2]), "-c", "0", "-i", "0.1", "-w", "1.2", "-W", "2",
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["lost"] == 0 and summary["in_flight"] >= 4 and summary["loss_pct"] == 0
    assert summary["received"] + summary["in_flight"] == summary["sent"]
    assert all(sample["status"] in ("ok", "in flight") for sample in summary["samples"])


# --- messages ------------------------------------------------------------------------------------


def test_the_header_after_a_fallback_names_the_address_that_answered(start_server, monkeypatch, capsys):
    server = start_server(log=None)
    port = server.address[1]
    with silent_port() as nobody:  # the first address: a port that refuses, on 127.0.0.2
        refused = ("127.0.0.2", nobody.getsockname()[1])
    addresses = [(utc.socket.AF_INET, refused), (utc.socket.AF_INET, ("127.0.0.1", port))]
    monkeypatch.setattr(utc, "resolve", lambda host, port_, passive=False, wanted=0: addresses)
    assert utc.main(["client", "localhost", str(port), "-c", "2", "-i", "0"]) == 0
    captured = capsys.readouterr()
    headers = [line for line in captured.out.splitlines() if line.startswith("UDP-TIMECHECK ")]
    assert headers[0].startswith("UDP-TIMECHECK localhost:{} (127.0.0.2)".format(port))
    assert headers[-1].startswith("UDP-TIMECHECK localhost:{} (127.0.0.1)".format(port))
    assert "nobody listens at 127.0.0.2:" in captured.err


def test_a_keyed_servers_silence_hints_at_a_key(start_server, capsys):
    server = start_server(log=None, key=b"the server's key")
    assert utc.main(["client", *map(str, server.address[:2]), "-W", "0.3"]) == 1
    assert "A server started with a key answers only clients with that key" in capsys.readouterr().err
