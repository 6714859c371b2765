"""Hardened edges, third round: matrix inputs, file descriptors, FIFOs, names on a terminal, target
lists, source addresses, scopes, range messages, and the plot when stdout's reader has gone.  Bad
input gets one line naming what was wrong and exit 2; nothing hangs, nothing is silently replaced,
nothing reaches a terminal raw, and a file we write is whole or reported missing."""

import json
import os
import re
import resource
import signal
import subprocess
import time
import urllib.request
from xml.etree import ElementTree

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import udp_timecheck as utc
from conftest import POSIX_ONLY, cli, needs_linux, needs_linux_machine, run, wait_for

FUZZ_EXAMPLES = int(os.environ.get("UDP_TIMECHECK_FUZZ_EXAMPLES", "300"))  # CI's fuzz step: 10000
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f\u202a-\u202e\u2066-\u2069]")  # what must never reach a terminal


def usage_error(argv, capsys, *fragments):
    """main(argv) ends with exit 2 and one line on stderr holding each fragment."""
    assert utc.main(argv) == utc.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def node(tmp_path, name, targets, source=None):
    """A --json output of a mesh node (source) or a client, with these targets' figures."""
    path = tmp_path / name
    summary = {"targets": [dict({"target": target, "rtt_ms": {"median": 1.5}, "loss_pct": 0.0,
                                 "offset_ms": 0.01, "offset_err_ms": 0.02, "not_up": 0}, **extra)
                           for target, extra in targets]}
    if source is not None:
        summary["source"] = source
    path.write_text(json.dumps(summary))
    return str(path)


# --- matrix inputs --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, fragment", [
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"targets": [{"target": "b", "rtt_ms": {"median": ' + "9" * 4000 + "}}]}", "integer too long"),
    ('{"targets": [{"target": "b", "rtt_ms": {"median": NaN}, "loss_pct": 0}]}', "NaN is not a number"),
    ('{"targets": [{"target": "b", "rtt_ms": {"median": Infinity}}]}', "Infinity is not a number"),
    ('{"targets": [{"target": "b", "rtt_ms": {"median": 1e400}, "loss_pct": 0, "offset_ms": null, '
     '"offset_err_ms": null}]}', "targets[0].rtt_ms.median: expected null or a number from 0 to 1e+12, got "
                                 "Infinity"),
    ('{"targets": [{"target": "b", "rtt_ms": {"median": 1}, "loss_pct": -50, "offset_ms": null, '
     '"offset_err_ms": null}]}', "targets[0].loss_pct: expected null or a number from 0 to 100, got -50"),
    ('{"targets": [{"target": "b", "rtt_ms": "fast", "loss_pct": 0}]}', "targets[0].rtt_ms.median"),
    ('{"targets": [{"target": "b", "loss_pct": 0}]}', "targets[0].rtt_ms.median: expected null or a number "
                                                      "from 0 to 1e+12, got nothing"),
    ('{"targets": [{"rtt_ms": {}}]}', "targets[0] is not a target's summary"),
    ('{"targets": 5}', "'targets' is not a list"),
    ('[1, 2]', "is not the --json output"),
    ('', "is not the --json output"),
    ('{"a": 1} trailing', "Extra data"),
])
def test_matrix_refuses_hostile_json_with_the_file_and_the_key(tmp_path, capsys, text, fragment):
    path = tmp_path / "node.json"
    path.write_text(text)
    usage_error(["matrix", str(path)], capsys, str(path), fragment)


def test_matrix_never_writes_nan_and_a_pair_without_figures_is_not_measured(tmp_path, capsys):
    files = [node(tmp_path, "a.json", [("b", {"rtt_ms": {"median": None}, "loss_pct": None,
                                              "offset_ms": None, "offset_err_ms": None})], "a"),
             node(tmp_path, "b.json", [("a", {})], "b")]
    assert utc.main(["matrix", *files, "--json"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=pytest.fail)  # no NaN, no Infinity
    assert utc.main(["matrix", *files]) == 0
    text = capsys.readouterr().out
    assert "nan" not in text.lower() and "inf" not in text.lower()


def test_two_files_of_one_node_name_both(tmp_path, capsys):
    first, second = node(tmp_path, "x.json", [("b", {})], "a"), node(tmp_path, "y.json", [("c", {})], "a")
    usage_error(["matrix", first, second], capsys, first, second, "both a's measurements")


def test_matrix_reads_no_more_than_its_cap(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(utc, "MAX_MEASUREMENT_FILE", 1000)
    path = node(tmp_path, "big.json", [("b", {"pad": " " * 2000})], "a")
    usage_error(["matrix", path], capsys, path, "larger than 1000 bytes")


# --- FIFOs: never waited for ------------------------------------------------------------------------

@POSIX_ONLY
@pytest.mark.parametrize("argv", [["client", "--targets", "{fifo}"],
                                  ["mesh", "--peers", "{fifo}", "--listen", "127.0.0.1:1"],
                                  ["matrix", "{fifo}"]])
def test_a_fifo_as_an_input_is_refused_at_once(tmp_path, capsys, argv):
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    usage_error([word.format(fifo=fifo) for word in argv], capsys, str(fifo), "is not a regular file")


@POSIX_ONLY
@pytest.mark.parametrize("option", ["--csv", "--jsonl"])
def test_a_fifo_without_a_reader_as_an_output_is_said_at_once(tmp_path, capsys, option):
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    usage_error(["client", "127.0.0.1", "9", option, str(fifo)], capsys, "FIFO with no reader")


@POSIX_ONLY
def test_ctrl_c_ends_a_run_whose_fifo_reader_never_reads(tmp_path, processes, start_server):
    """The FIFO's reader holds it open and reads nothing: the rows fill it, the writer waits; SIGINT
    still ends the run within a second, and the output is named as failed."""
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    reader = os.open(str(fifo), os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads
    try:
        server = start_server(log=None)
        client = processes(cli("client", *server.address[:2], "-c", "0", "-i", "0.001", "-q", "--csv", fifo))
        served = []  # until the pipe is full (64 KB: some 250 rows) and holds the run up: nothing served
        wait_for(lambda: served.append(server.stats.served) or len(served) > 30 and served[-1] > 50
                 and served[-1] == served[-30], timeout=30)
        client.signal(signal.SIGINT)
        stopped = time.monotonic()
        assert client.wait(timeout=10) == utc.EXIT_USAGE
        assert time.monotonic() - stopped < 2  # within a second, give or take this machine's load
        assert any("cannot write to {}".format(fifo) in line for line in client.rest(client.stderr))
    finally:
        os.close(reader)


# --- names, targets, sources ------------------------------------------------------------------------

def test_names_from_a_file_reach_the_terminal_escaped(tmp_path, capsys, start_server):
    server = start_server("127.0.0.1", log=None)
    targets = tmp_path / "targets"
    targets.write_text("clear\x1b[2J\x07\u202e 127.0.0.1:{0}\ntitle\x1b]0;pwned\x07 127.0.0.2:{0}\n".format(
        server.address[1]))
    utc.main(["client", "--targets", str(targets), "-c", "2", "-i", "0", "-W", "0.2"])
    out = capsys.readouterr()
    assert not RAW.search(out.out + out.err)
    assert "clear\\x1b[2J\\x07\\u202e" in out.out  # said, escaped


def test_a_target_given_twice_is_measured_once_with_a_note_and_one_metric_series(capsys, start_server):
    server = start_server(log=None)
    port = server.address[1]
    argv = ["client", "127.0.0.1:{}".format(port), "127.000.000.001:{}".format(port), "-c", "2", "-i", "0",
            "--json"]
    assert utc.main(argv) == 0  # two ways to write one address
    out = capsys.readouterr()
    assert len(json.loads(out.out)["targets"]) == 1
    assert "127.000.000.001:{} is given twice: measured once".format(port) in out.err


def test_no_duplicate_series_from_a_name_and_its_address(processes, start_server):
    server = start_server(log=None)
    port = server.address[1]
    client = processes(cli("client", "127.0.0.1:{}".format(port), "127.0.0.1:{}".format(port),
                           "127.0.0.2:{}".format(port), "-c", "0", "-i", "0.05", "-q", "--metrics", "0"))
    where = client.stderr.expect(r"^metrics at http://(127\.0\.0\.1:\d+)/metrics$").group(1)
    series = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any("127.0.0.2" in line for line in series):
        with urllib.request.urlopen("http://{}/metrics".format(where), timeout=10) as response:
            series = [line.rsplit(" ", 1)[0] for line in response.read().decode().splitlines()
                      if line and not line.startswith("#")]
    assert series and len(series) == len(set(series))


@pytest.mark.parametrize("text", ["", "# only a comment\n\n   \n"])
def test_a_targets_file_with_no_target_is_an_error(tmp_path, capsys, text):
    targets = tmp_path / "targets"
    targets.write_text(text)
    usage_error(["client", "--targets", str(targets)], capsys, str(targets), "names no target")
    usage_error(["mesh", "--peers", str(targets), "--listen", "127.0.0.1:1"], capsys, "names no target")


@pytest.mark.parametrize("address, kind", [("224.0.0.1", "multicast"), ("255.255.255.255", "broadcast"),
                                           ("0.0.0.0", "unspecified"), ("ff02::1", "multicast"),
                                           ("::", "unspecified")])
def test_a_source_that_cannot_be_one_is_refused_by_name(capsys, address, kind):
    usage_error(["client", "127.0.0.1", "-I", address], capsys, "'{}' is a {} address".format(address, kind))


def test_a_range_error_names_the_value_given(capsys):
    usage_error(["client", "127.0.0.1", "106000"], capsys, "'106000': expected a port number from 0 to 65535")
    usage_error(["client", "127.0.0.1:106000"], capsys, "'127.0.0.1:106000': expected a port number")


def test_an_ipv6_address_keeps_its_scope():
    index = socket_index("lo")
    assert utc.address_text(("fe80::1", 1060, 0, index)) == "fe80::1%lo"
    assert utc.address_text(("fe80::1", 1060, 0, 0)) == "fe80::1"
    assert utc.address_text(("fe80::1%eth0", 1060, 0, 7)) == "fe80::1%eth0"
    assert utc.address_text(("127.0.0.1", 1060)) == "127.0.0.1"


def socket_index(name):
    import socket
    try:
        return socket.if_nametoindex(name)
    except (OSError, AttributeError):
        pytest.skip("no interface named {} here".format(name))


# --- the plot, whole, even when stdout's reader has gone --------------------------------------------

@POSIX_ONLY
def test_the_plot_is_whole_when_stdouts_reader_has_gone(tmp_path, start_server):
    server = start_server(log=None)
    plot = tmp_path / "p.svg"
    client = subprocess.Popen(cli("client", *server.address[:2], "-c", "20", "-i", "0.01", "--plot", plot),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    client.stdout.readline()  # as head -1, then gone
    client.stdout.close()
    client.wait(timeout=30)
    assert ElementTree.parse(str(plot)).getroot().tag == "{http://www.w3.org/2000/svg}svg"
    assert not [name for name in os.listdir(str(tmp_path)) if name != "p.svg"]  # no half-written file


def test_a_plot_that_cannot_be_written_is_said_before_the_run(tmp_path, capsys):
    usage_error(["client", "127.0.0.1", "9", "-c", "1", "--plot", str(tmp_path / "no" / "p.svg")], capsys,
                "cannot write {}".format(tmp_path / "no" / "p.svg"))
    (tmp_path / "d.svg").mkdir()
    usage_error(["client", "127.0.0.1", "9", "-c", "1", "--plot", str(tmp_path / "d.svg")], capsys,
                "it is a directory")
    usage_error(["client", "127.0.0.1", "9", "-c", "1", "--plot", str(tmp_path / "x.png")], capsys,
                "--plot draws an SVG: give it a FILE.svg")
    assert not (tmp_path / "x.png").exists()


# --- file descriptors -----------------------------------------------------------------------------

def limited(soft, hard):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@needs_linux("one socket for every target (IP_RECVERR), and a wildcard server for 1000 addresses")
@needs_linux_machine("setrlimit")
@pytest.mark.parametrize("targets, ports", [(1000, 1), (17, 64)])
def test_many_targets_run_under_ulimit_n_1024(start_server, targets, ports):
    server = start_server("0.0.0.0", log=None)
    port = server.address[1]
    hosts = ["127.1.{}.{}:{}".format(index // 250, index % 250 + 1, port) for index in range(targets)]
    result = run(cli("client", *hosts, "-c", "2", "-i", "0.01", "--ports", ports, "--json"),
                 preexec_fn=limited(1024, 1024), timeout=120)
    assert result.returncode == 0, result.stderr[-500:]
    summary = json.loads(result.stdout)
    assert len(summary["targets"]) == targets and all(t["received"] == 2 for t in summary["targets"])


@needs_linux_machine("setrlimit")
def test_not_enough_file_descriptors_is_said_before_probing():
    """Where each target needs a socket of its own (a simulated macOS), a limit too low is said at once."""
    hosts = ["127.0.1.{}:9".format(index) for index in range(1, 201)]
    result = run(cli("client", *hosts, "--ports", "2", "-c", "1"), preexec_fn=limited(256, 256),
                 env=dict(os.environ, UDP_TIMECHECK_SIMULATE="macos"))
    assert result.returncode == utc.EXIT_USAGE and result.stderr.count("\n") == 1, result.stderr
    assert "file descriptors are needed" in result.stderr and "the limit is 256" in result.stderr


# --- fuzzing the files people hand us ---------------------------------------------------------------

LINES = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["a 127.0.0.1:1", "127.0.0.1 1", "[::1]:5", "# c", "b [fe80::1%lo]:9 # x", "x y z", ":1", "[::1",
     "1.2.3.4:0"]), max_size=6)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                               st.sampled_from(["target", "targets", "source", "rtt_ms", "median", "loss_pct",
                                                "offset_ms", "offset_err_ms", "not_up", "name"]),
                               inner,
                               max_size=6), max_leaves=20)


FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(lines=LINES)
def test_any_targets_or_peers_file_gives_targets_or_a_usage_error(tmp_path, lines):
    path = tmp_path / "peers"
    path.write_text("\n".join(lines), encoding="utf-8")
    for what in ("targets file", "peers file"):
        try:
            peers = utc.read_peers(str(path), what)
        except utc.TimecheckError as exc:
            assert exc.exit_code == utc.EXIT_USAGE and "\n" not in str(exc)
        else:
            assert peers and all(not RAW.search(peer.name or "") for peer in peers)


@FUZZ
@given(value=JSON_VALUES | st.text(max_size=60) | st.binary(max_size=60))
def test_any_matrix_input_gives_a_matrix_or_a_usage_error(tmp_path, value):
    path = tmp_path / "node.json"
    if isinstance(value, bytes):
        path.write_bytes(value)
    else:
        path.write_text(json.dumps(value) if not isinstance(value, str) else value, encoding="utf-8")
    try:
        matrix = utc.build_matrix([utc.load_measurement(str(path))], [str(path)])
    except utc.TimecheckError as exc:
        assert exc.exit_code == utc.EXIT_USAGE and "\n" not in str(exc)
    else:
        text = json.dumps(matrix, allow_nan=False)  # never NaN, never Infinity
        assert not RAW.search(text) and "\n".join(utc.format_matrix(matrix))
