"""Usage and set-up errors: one line naming what is wrong, exit code 2, never a traceback; and
the help that the errors point at."""

import re
import socket
import sys

import pytest

import udp_timecheck as utc
from conftest import MODULE, run


@pytest.mark.parametrize("argv, message", [
    (["client", "127.0.0.1", "99999"], "port number from 0 to 65535"),
    (["client", "127.0.0.1", "http"], "port number"),
    (["client", "--count=-1"], "whole number from 0"),
    (["client", "-c", "-1"], "argument -c/--count: expected one argument"),  # -1 reads as an option (-4, -6)
    (["client", "--interval=-1"], "seconds from 0"),
    (["client", "-i", "nan"], "seconds from 0"),
    (["client", "-W", "0"], "seconds from 0.001"),
    (["client", "no-such-host.invalid", "1060"], "cannot resolve host"),
    (["client", "8080"], "give the host before the port"),
    (["client", "127.0.0.1", "\uff11\uff10\uff16\uff10"], "in ASCII digits, as in: 127.0.0.1 1060"),
    (["client", "1" * 5000], "is not a host"),  # int() refuses past 4,300 digits: no traceback
    (["client", "127.0.0.1", "1" * 5000], "port number from 0 to 65535"),
    (["client", "127.0.0.1:" + "1" * 5000], "port number from 0 to 65535"),
    (["client", "--measure_delay", "maybe"], "expected 1/true/yes or 0/false/no"),
    (["client", "--key-file", "/nonexistent/key"], "cannot read key file"),
    (["server", "--faulty", "2"], "probability from 0 to 1"),
    (["server", "--max-rate", "0"], "replies a second"),
    (["server", "192.0.2.1", "0"], "bind 0.0.0.0"),
    (["bogus"], "invalid choice"),
    ([], "required"),
])
def test_usage_errors_exit_2_with_one_line(argv, message, capsys):
    assert utc.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err
    assert captured.err.startswith("udp-timecheck: ")


@pytest.mark.parametrize("argv, message", [
    (["client", "-i", "0.0000001"], "expected 0 (back to back) or seconds from 0.001 to 3600"),
    (["client", "-i", "1e-12"], "expected 0 (back to back) or seconds from 0.001 to 3600"),
    (["server", "-q", "-v"], "not allowed with argument -q/--quiet"),
    (["client", "--csv", "-", "--json"], "both write to standard output"),
])
def test_more_usage_errors(argv, message, capsys):
    assert utc.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_help_and_version_exit_0(capsys):
    assert utc.main(["--help"]) == 0
    assert "server" in capsys.readouterr().out
    assert utc.main(["client", "--help"]) == 0
    assert "--measure-delay" in capsys.readouterr().out
    assert utc.main(["--version"]) == 0
    assert utc.__version__ in capsys.readouterr().out


@pytest.mark.parametrize("command", ["server", "client"])
def test_each_commands_help_ends_with_examples_and_exit_codes(command, capsys):
    assert utc.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:\n  udp_timecheck.py {} ".format(command) in out
    assert "exit codes: 0 " in out and "set-up error" in out


def test_demo_help_says_what_the_demo_does(capsys):
    assert utc.main(["demo", "--help"]) == 0
    assert "run two clients against\nit in this same process" in capsys.readouterr().out


def test_the_top_level_help_has_examples(capsys):
    assert utc.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and re.search(r"udp_timecheck\.py client \S+ 1060", out)
    assert "udp_timecheck.py demo" in out


def test_a_subcommands_usage_error_points_at_its_own_help(capsys):
    assert utc.main(["client", "127.0.0.1", "1060", "--measure-delay", "1"]) == 2
    assert capsys.readouterr().err == ("udp-timecheck: unrecognized arguments: 1 "
                                       "(see: udp_timecheck.py client --help)\n")
    assert utc.main(["sntp", "127.0.0.1", "-c", "x"]) == 2
    assert "(see: udp_timecheck.py sntp --help)" in capsys.readouterr().err


def test_the_name_in_messages_is_the_one_it_was_run_as():
    code = ("import sys; sys.path.insert(0, {!r}); sys.argv[0] = '/usr/local/bin/udp-timecheck'\n"
            "import udp_timecheck; sys.exit(udp_timecheck.main())").format(str(MODULE.parent))
    version = run([sys.executable, "-c", code, "--version"])
    assert version.stdout == "udp-timecheck {}\n".format(utc.__version__)
    usage = run([sys.executable, "-c", code, "client", "-c", "many"])
    assert usage.returncode == 2 and "(see: udp-timecheck client --help)" in usage.stderr


@pytest.mark.parametrize("size, stamp, message", [
    ("50", False, "--size must be from {} to 65507 bytes (IPv4)".format(utc.MIN_SIZE)),
    ("70000", False, "argument -s/--size"), ("40", False, "expected bytes from 44 to 65527"),
    ("65520", False, "--size must be from {} to 65507 bytes (IPv4)".format(utc.MIN_SIZE)),
    ("50", True, "--size must be from 64 to 65507 bytes for STAMP (IPv4)")])  # 44, and Follow-Up's 20
def test_size_out_of_range_is_a_usage_error(start_server, size, stamp, message, capsys):
    server = start_server()
    assert utc.main(["client", *["--stamp"] * stamp, *map(str, server.address), "--size", size]) == 2
    assert message in capsys.readouterr().err
    server.shutdown()
    assert server.stats.served == 0


def test_the_one_size_minimum_holds_any_request_and_help_names_it(capsys):
    """MIN_SIZE is enough for the longest request a run can need: keyed, asking for the path's marks,
    and a seq of a count's largest; --help names that figure."""
    options = utc.RequestOptions(1, True, True)
    needed = utc.min_request_size(10 ** 12, size=65527, keyed=True, options=options)
    assert needed <= utc.MIN_SIZE < needed + 8
    assert utc.main(["client", "--help-all"]) == 0
    assert "from {}".format(utc.MIN_SIZE) in " ".join(capsys.readouterr().out.split())


def test_csv_to_a_bad_path_is_a_usage_error(start_server, tmp_path, capsys):
    server = start_server()
    bad = tmp_path / "missing-dir" / "run.csv"
    assert utc.main(["client", *map(str, server.address), "--csv", str(bad)]) == 2
    assert "cannot write" in capsys.readouterr().err
    server.shutdown()
    assert server.stats.served == 0  # nothing was sent before the error


@pytest.mark.parametrize("outputs", [("--csv", "same", "--jsonl", "same"),
                                     ("--csv", "p.svg", "--plot", "p.svg"),
                                     ("--csv", "real.csv", "--jsonl", "link.csv")])
def test_two_outputs_in_one_file_is_a_usage_error(outputs, tmp_path, capsys):
    (tmp_path / "real.csv").write_text("")
    (tmp_path / "link.csv").symlink_to(tmp_path / "real.csv")
    argv = [word if word.startswith("--") else str(tmp_path / word) for word in outputs]
    assert utc.main(["client", "127.0.0.1", "9", "-c", "1"] + argv) == 2
    assert "name the same file" in capsys.readouterr().err


def test_a_bad_tos_is_a_usage_error(capsys):
    assert utc.main(["client", "127.0.0.1", "9", "--tos", "AF9"]) == 2
    assert "neither a TOS byte from 0 to 255 nor a DSCP name" in capsys.readouterr().err


def test_a_source_address_not_on_this_machine_is_a_usage_error(start_server, capsys):
    server = start_server()
    assert utc.main(["client", *map(str, server.address), "-I", "192.0.2.1"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and " from 192.0.2.1: " in err


def test_a_target_that_does_not_resolve_is_a_usage_error_naming_it(capsys):
    assert utc.main(["client", "127.0.0.1", "no-such-host.invalid", "1060", "-c", "1"]) == 2
    assert "no-such-host.invalid" in capsys.readouterr().err


@pytest.mark.parametrize("peers_text, listen, message", [
    ("a 127.0.0.1:1\n", "127.0.0.1:2", "none of the peers in"),
    ("a 127.0.0.1:1\n", "127.0.0.1:1", "names no peer but this node"),
])
def test_mesh_usage_errors(peers_text, listen, message, tmp_path, capsys):
    peers = tmp_path / "peers"
    peers.write_text(peers_text)
    assert utc.main(["mesh", "--peers", str(peers), "--listen", listen]) == 2
    assert message in capsys.readouterr().err


def test_matrix_of_an_unreadable_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("not json")
    assert utc.main(["matrix", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "is not JSON" in err and "matrix reads what 'mesh --json' or 'client --json' printed" in err


def test_port_in_use_is_a_setup_error():
    with utc.TimeServer("127.0.0.1", 0) as first:
        with pytest.raises(utc.TimecheckError, match="already in use") as caught:
            utc.TimeServer("127.0.0.1", first.address[1])
    assert caught.value.exit_code == 2


def test_unresolvable_host_is_a_setup_error():
    with pytest.raises(utc.TimecheckError, match="cannot resolve") as caught:
        utc.TimeServer("no-such-host.invalid", 0)
    assert caught.value.exit_code == 2


def test_a_busy_metrics_port_is_a_setup_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert utc.main(["server", "127.0.0.1", "0", "--metrics", str(port)]) == 2
    assert "already in use" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["²", "١٢٣", "１０６０"])  # digits to str.isdigit(), not to int() or a user
def test_a_port_of_other_digits_is_a_usage_error(port, tmp_path, capsys):
    assert utc.main(["client", "127.0.0.1:" + port, "-c", "1"]) == 2
    assert "expected a port number from 0 to 65535" in capsys.readouterr().err
    peers = tmp_path / "peers"
    peers.write_text("a 127.0.0.1:{}\n".format(port), encoding="utf-8")
    with pytest.raises(utc.TimecheckError, match="expected a port number"):
        utc.read_peers(str(peers))
