"""Wire compatibility with the tutorial's own server() and client(), both ways."""

import re
import sys

import udp_timecheck as utc
from conftest import REFERENCE, probe, run, run_reference_client

TIME_TEXT = r"The time is \d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?"


def test_tutorial_client_against_our_server(start_server):
    server = start_server()
    result = run_reference_client(server.address[1])
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(TIME_TEXT, result.stdout.strip())
    server.shutdown()  # joins the loop: it logs after sending
    (line,) = server.logs
    assert re.fullmatch(r"127\.0\.0\.1:\d+ Request ID: \d{1,4}\. Client request, " + TIME_TEXT, line)


def test_tutorial_client_with_its_log_against_our_server(start_server):
    server = start_server()
    result = run_reference_client(server.address[1], log=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Request time: The time is ")
    assert re.fullmatch(TIME_TEXT, lines[1])
    assert lines[2] == "Server time: " + lines[1]
    assert lines[3].startswith("Receipt time: ")


def test_tutorial_client_catches_our_faulty_server(start_server):
    server = start_server(faulty=1.0)
    result = run_reference_client(server.address[1])
    assert result.stdout == "Server is a liar!\n"


def test_tutorial_client_against_our_server_process(cli_server):
    server, port = cli_server()
    result = run_reference_client(port)
    assert re.fullmatch(TIME_TEXT, result.stdout.strip())
    server.stdout.expect(r"^127\.0\.0\.1:\d+ Request ID: \d+\. Client request, The time is ")


def test_our_client_against_tutorial_server(reference_server, capsys):
    process, port = reference_server()
    assert utc.main(["client", "127.0.0.1", str(port)]) == 0
    assert re.fullmatch(TIME_TEXT, capsys.readouterr().out.strip())
    # the tutorial's server read our three-element request as its own two elements
    match = process.stdout.expect(r"^Request ID: (\d+)\. Client request, (.*)$")
    assert int(match.group(1)) < 2 ** 63 and re.fullmatch(TIME_TEXT, match.group(2))


def test_our_measurement_against_tutorial_server(reference_server):
    _, port = reference_server()
    measurement = probe(("127.0.0.1", port), count=20)
    summary = utc.summarize(measurement)
    assert summary["received"] == 20 and summary["lost"] == 0
    assert summary["rtt_ms"]["median"] > 0
    assert summary["offset_ms"] is None and summary["server_proc_ms"] is None  # no timestamps
    assert any("offset: unavailable" in line for line in utc.format_summary(summary))


def test_our_client_catches_tutorial_faulty_server(reference_server, capsys):
    _, port = reference_server(faulty=True)
    # a lie is known as one once nothing else came in time: -W, to wait a moment only
    assert utc.main(["client", "127.0.0.1", str(port), "-W", "0.2"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "Server is a liar!\n" and "liar" in captured.err
    assert utc.main(["client", "127.0.0.1", str(port), "-c", "5", "-i", "0", "-q", "-W", "0.2"]) == 1
    assert "5 mismatched" in capsys.readouterr().out


def test_tutorial_measure_delay_crashes_with_name_error():
    """The bug we fix, on the tutorial's own code: it dies before sending anything."""
    original = run([sys.executable, str(REFERENCE / "cs_example.py"), "client", "127.0.0.1", "9",
                    "--measure_delay", "1"], timeout=20)
    assert original.returncode == 1 and "NameError: name 'log' is not defined" in original.stderr
