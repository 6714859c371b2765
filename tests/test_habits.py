"""ping's habits and a screenful of help: -4/-6, -s/-t/-Q, one default interval, no abbreviations
and no secret echoed, the name the program was run as, addresses as people write them, and one
type a JSON Lines key."""

import json
import os
import re
import sys

import pytest

import udp_timecheck as utc
from conftest import MODULE, POSIX_ONLY, run, run_cli, silent_port


def help_lines(capsys, monkeypatch, *argv):
    monkeypatch.setenv("COLUMNS", "80")  # what argparse wraps to
    assert utc.main([*argv]) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("command, most", [("client", 60), ("server", 40), ("mesh", 60)])
def test_help_fits_a_screen(command, most, capsys, monkeypatch):
    lines = help_lines(capsys, monkeypatch, command, "--help")
    assert len(lines) <= most and max(map(len, lines)) <= 80


@pytest.mark.parametrize("command", ["client", "mesh"])
def test_help_is_in_pings_order_and_help_all_has_every_option(command, capsys, monkeypatch):
    lines = help_lines(capsys, monkeypatch, command, "--help")
    starts = [next(index for index, line in enumerate(lines) if line.lstrip().startswith(option))
              for option in ("-c N", "-i SECONDS", "-w SECONDS", "-W SECONDS", "-4")]
    assert starts == sorted(starts)
    if command == "client":
        assert lines.index("positional arguments:") < starts[0]
    shown = "\n".join(lines)
    assert not any(line.lstrip().startswith("--csv") for line in lines)  # listed by --help-all only
    assert "--help-all shows every option: outputs, clocks, the path" in shown
    every = "\n".join(help_lines(capsys, monkeypatch, command, "--help-all"))
    sub = utc.build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        for option in action.option_strings:
            assert re.search(r"(^|[ ,]){}\b".format(re.escape(option)), every, re.M), option


def test_a_meshs_help_says_nothing_that_is_false_for_a_mesh(capsys, monkeypatch):
    text = " ".join("\n".join(help_lines(capsys, monkeypatch, "mesh", "--help-all")).split())
    for client_only in ("--measure-delay", "--measure_delay", str(utc.DEFAULT_COUNT), "tutorial", "TARGET"):
        assert client_only not in text
    assert "probes to send to each peer (default: until Ctrl-C or -w)" in text


# --- -4 and -6, and ping's short forms --------------------------------------------------------------

def test_minus_6_and_minus_4_choose_the_family(start_server, capsys):
    server = start_server("::1", log=None)
    port = str(server.address[1])
    assert utc.main(["client", "-6", "::1", port, "-c", "2", "-i", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["address"] == "::1"
    assert utc.main(["client", "-4", "::1", port]) == 2
    assert "host '::1' has no IPv4 address" in capsys.readouterr().err
    assert utc.main(["client", "-6", "127.0.0.1", port]) == 2
    assert "host '127.0.0.1' has no IPv6 address" in capsys.readouterr().err
    assert utc.main(["client", "-4", "-6", "::1", port]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_pings_short_forms_are_the_long_ones():
    parser = utc.build_parser()
    short = parser.parse_args(["client", "-s", "400", "-t", "9", "-Q", "EF"])
    long = parser.parse_args(["client", "--size", "400", "--ttl", "9", "--tos", "EF"])
    assert (short.size, short.ttl, short.tos) == (long.size, long.ttl, long.tos) == (400, 9, 0xb8)
    assert utc.is_measurement(parser.parse_args(["client", "-Q", "EF"]))


# --- one default interval ---------------------------------------------------------------------------

@pytest.mark.parametrize("tutorial, interval", [([], utc.DEFAULT_INTERVAL), (["--measure-delay"], 0.0)])
def test_the_interval_is_one_whatever_c_and_w_say(tutorial, interval, start_server, capsys):
    server = start_server(log=None)
    target = [*map(str, server.address[:2])]
    assert utc.main(["client", *target, *tutorial, "-c", "2", "--json"]) == 0
    by_count = json.loads(capsys.readouterr().out)
    assert utc.main(["client", *target, *tutorial, "-w", "1.2", "--json"]) == 0
    by_deadline = json.loads(capsys.readouterr().out)
    assert by_count["interval"] == by_deadline["interval"] == interval
    assert by_count["sent"] == 2 and (by_deadline["sent"] == 2 if not tutorial else by_deadline["sent"] > 10)


def test_help_names_the_default_interval_and_count(capsys, monkeypatch):
    text = " ".join("\n".join(help_lines(capsys, monkeypatch, "client", "--help")).split())
    assert "(default {:g}, as ping; 0 with --measure-delay".format(utc.DEFAULT_INTERVAL) in text
    assert "(default: until Ctrl-C or -w; {} with --measure-delay)".format(utc.DEFAULT_COUNT) in text


def test_measure_delay_alone_is_the_tutorials_loop():
    spec = utc.client_spec(utc.build_parser().parse_args(["client", "--measure-delay"]),
                           [utc.Peer(None, "127.0.0.1", 1060)], True)
    assert (spec.count, spec.interval) == (utc.DEFAULT_COUNT, 0.0)
    ping = utc.client_spec(utc.build_parser().parse_args(["client", "-q"]),
                           [utc.Peer(None, "127.0.0.1", 1060)], True)
    assert (ping.count, ping.interval) == (0, utc.DEFAULT_INTERVAL)  # until stopped, as ping


# --- no abbreviations, no secret echoed ------------------------------------------------------------

def test_abbreviations_are_refused(capsys):
    assert utc.main(["client", "127.0.0.1", "--cou", "3"]) == 2
    assert "unrecognized arguments: --cou" in capsys.readouterr().err
    assert utc.main(["server", "--verb"]) == 2
    assert "unrecognized arguments: --verb" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--key", "s3cret-value"], ["--key=s3cret-value"],
                                  ["--keyfile", "s3cret-value"], ["--key-fil", "s3cret-value"],
                                  ["--secret", "s3cret-value"]])
def test_a_key_on_the_command_line_is_refused_and_never_echoed(argv, capsys):
    with silent_port() as sock:
        code = utc.main(["client", *map(str, sock.getsockname()), *argv, "-c", "1"])
        sock.settimeout(0.05)
        with pytest.raises(OSError):
            sock.recv(100)  # nothing was sent
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and captured.err.count("\n") == 1
    assert "s3cret-value" not in captured.err
    assert "--key-file PATH" in captured.err and "UDP_TIMECHECK_KEY" in captured.err


# --- the name it was run as -------------------------------------------------------------------------

@POSIX_ONLY
def test_python_m_names_itself_in_hints_and_version():
    typed = "{} -m udp_timecheck".format(os.path.basename(sys.executable))
    wrong = run([sys.executable, "-m", "udp_timecheck", "client", "--cout", "3"], cwd=str(MODULE.parent))
    assert wrong.returncode == 2 and "(see: {} client --help)".format(typed) in wrong.stderr
    version = run([sys.executable, "-m", "udp_timecheck", "--version"], cwd=str(MODULE.parent))
    assert version.stdout == "{} {}\n".format(typed, utc.__version__)
    script = run([sys.executable, str(MODULE), "client", "--cout", "3"])
    assert "(see: udp_timecheck.py client --help)" in script.stderr


# --- addresses as people write them --------------------------------------------------------------

@pytest.mark.parametrize("host, shown", [("127.0.0.1", "127.0.0.1:"), ("::1", "[::1]:")])
def test_the_servers_first_line_writes_its_address_as_people_do(host, shown):
    with utc.TimeServer(host, 0) as server:
        assert utc.describe_server(server).startswith(
            "Server listening at {}{}; no key: answers anyone; ".format(shown, server.address[1]))


def test_a_mesh_node_says_where_its_server_listens(tmp_path, capsys):
    ports = []
    for _ in range(2):
        with silent_port() as sock:
            ports.append(sock.getsockname()[1])
    peers = tmp_path / "peers"
    peers.write_text("a 127.0.0.1:{}\nb 127.0.0.1:{}\n".format(*ports))
    assert utc.main(["mesh", "--peers", str(peers), "--listen", "127.0.0.1:{}".format(ports[0]), "-c", "1",
                     "-W", "0.2", "--json"]) == 1  # b never answers
    err = capsys.readouterr().err
    assert "mesh node a: Server listening at 127.0.0.1:{}; ".format(ports[0]) in err


# --- JSON Lines ------------------------------------------------------------------------------------------

def json_types(value, path="", found=None):
    """{path: the set of JSON types its non-null values take} over nested objects and lists."""
    found = {} if found is None else found
    kind = {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), "number")
    if value is not None:
        found.setdefault(path, set()).add(kind)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        json_types(item, "{}.{}".format(path, key if isinstance(key, str) else "[]"), found)
    return found


def test_json_lines_keys_keep_one_type(start_server):
    server = start_server(log=None)
    result = run_cli("client", *server.address[:2], "-c", "24", "-i", "0.05", "--report-every", "0.4",
                     "--json")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) >= 3 and "samples" in lines[-1] and "samples" not in lines[0]
    found = {}
    for line in lines:
        json_types(line, found=found)
    assert {path: kinds for path, kinds in found.items() if len(kinds) > 1} == {}
    assert found[".interval"] == {"number"} and found[".period"] == {"object"}

