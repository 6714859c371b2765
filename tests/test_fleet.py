"""Many targets from one client, a mesh of nodes, and the matrix of a mesh: on 127.0.0.x, served
by servers these tests start."""

import csv
import json
import subprocess
import urllib.request
import xml.etree.ElementTree as ElementTree

import pytest

import udp_timecheck as utc
from conftest import cli, free_udp_port, free_udp_ports, require_programs, silent_port, wait_for

LOOPBACKS = ["127.0.0.{}".format(index) for index in range(1, 4)]


LOOPBACKS_USED = ["127.0.0.{}".format(index) for index in range(1, 22)]  # by any test here


@pytest.fixture
def wildcard_server(start_server):
    """One server on 0.0.0.0, answering every loopback address from the address asked.  Where
    the platform cannot tell which address a request came to (Windows; the simulated macOS), the
    server says so, and one server for each address, all on one port, stands in for it."""
    server = start_server("0.0.0.0", log=None)
    if server.packet_info:
        yield server
        return
    assert "this platform cannot say which address a request came to" in utc.describe_server(server)
    server.shutdown()
    server.close()
    first = start_server(LOOPBACKS_USED[0], log=None)
    servers = [utc.TimeServer(host, first.address[1], log=None).start() for host in LOOPBACKS_USED[1:]]
    yield first
    for each in servers:
        each.shutdown()
        each.close()


def fleet(server, *extra, capsys):
    argv = ["client"] + LOOPBACKS + [str(server.address[1]), "-c", "5", "-i", "0.01"] + list(extra)
    code = utc.main(argv)
    return code, capsys.readouterr()


def test_several_targets_on_loopback_served_by_one_wildcard_server(wildcard_server, capsys):
    code, captured = fleet(wildcard_server, "--json", capsys=capsys)
    measurement = json.loads(captured.out)
    assert code == 0 and [target["target"] for target in measurement["targets"]] == [
        "{}:{}".format(host, wildcard_server.address[1]) for host in LOOPBACKS]
    assert all(target["received"] == 5 and target["address"] == host
               for target, host in zip(measurement["targets"], LOOPBACKS))
    assert measurement["count"] == 5 and measurement["interval"] == 0.01  # the run's record, beside them
    assert set(measurement["targets"][0]) - {"name"} == set(utc.summarize(utc.Recorder(
        "h:1", "h", utc.RunSpec())))  # a single target's keys, each


def test_one_target_keeps_the_json_it_had(wildcard_server, capsys):
    assert utc.main(["client", "127.0.0.1", str(wildcard_server.address[1]), "-c", "2", "-i", "0",
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "targets" not in summary and summary["received"] == 2 and "name" not in summary


def test_the_text_names_targets_and_ends_with_a_table(wildcard_server, capsys):
    with silent_port() as silent:
        dead = "127.0.0.1:{}".format(silent.getsockname()[1])
        argv = ["client"] + LOOPBACKS + [dead, str(wildcard_server.address[1]), "-c", "3", "-i", "0.05",
                                         "-W", "0.3"]
        assert utc.main(argv) == 1
    captured = capsys.readouterr()
    assert "{} seq=0: lost, no reply within 0.3 s".format(dead) in captured.out  # lines name their target
    table = captured.out[captured.out.index("--- 4 targets, rtt and offset in "):].splitlines()
    assert table[1].split()[:4] == ["target", "sent", "received", "loss"]
    rows = {row.split()[0]: row.split() for row in table[2:]}
    live = "127.0.0.2:{}".format(wildcard_server.address[1])
    assert rows[dead][1:4] == ["3", "0", "100%"] and rows[live][1:4] == ["3", "3", "0%"]
    assert captured.err.startswith("udp-timecheck: 1 of 4 targets failed: {}: no reply".format(dead))


def test_a_target_that_refuses_is_retried_and_said_not_up(wildcard_server, capsys):
    refusing = "127.0.0.1:{}".format(free_udp_port())
    argv = ["client", "127.0.0.1:{}".format(wildcard_server.address[1]), refusing, "-c", "4", "-i", "0.02",
            "--json"]
    assert utc.main(argv) == 1
    captured = capsys.readouterr()
    targets = {target["target"]: target for target in json.loads(captured.out)["targets"]}
    assert targets[refusing]["sent"] == 4 and targets[refusing]["not_up"] == 4  # every one tried, none lost
    assert targets[refusing]["lost"] == 0 and targets[refusing]["loss_pct"] is None
    assert "connection refused by {}".format(refusing) in captured.err


def test_the_targets_file(wildcard_server, tmp_path, capsys):
    port = wildcard_server.address[1]
    targets = tmp_path / "targets"
    targets.write_text("# the fleet\nalpha 127.0.0.1:{0}\n127.0.0.2 {0}  # host and port\n\n"
                       "127.0.0.3\n".format(port))
    assert utc.main(["client", "--targets", str(targets), str(port), "-c", "2", "-i", "0.01", "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)["targets"]
    assert [(target["name"], target["target"]) for target in measured] == [
        ("alpha", "127.0.0.1:{}".format(port)), (None, "127.0.0.2:{}".format(port)),
        (None, "127.0.0.3:{}".format(port))]  # the last takes the final PORT of the command line
    targets.write_text("alpha 127.0.0.1:1 extra\n")
    assert utc.main(["client", "--targets", str(targets)]) == 2
    assert "line 1: expected [NAME] HOST:PORT" in capsys.readouterr().err


def test_each_target_on_its_own_a_delay_on_one_path_stays_on_it(wildcard_server, relay, capsys):
    port = wildcard_server.address[1]
    hop = relay(("127.0.0.3", port), lambda index, data: [(0.02, data)])  # 20 ms more to one target
    delayed_target = "{}:{}".format(*hop.address[:2])
    argv = ["client", "127.0.0.1:{}".format(port), "127.0.0.2:{}".format(port), delayed_target,
            "-c", "20", "-i", "0.02", "--json"]
    assert utc.main(argv) == 0
    measured = json.loads(capsys.readouterr().out)["targets"]
    p50 = {target["target"]: target["rtt_ms"]["median"] for target in measured}
    delayed = p50.pop(delayed_target)
    assert delayed >= 20 and all(value < delayed / 4 for value in p50.values())


def test_csv_and_jsonl_rows_name_their_target(wildcard_server, tmp_path, capsys):
    code, _ = fleet(wildcard_server, "-q", "--csv", str(tmp_path / "r.csv"),
                    "--jsonl", str(tmp_path / "r.jsonl"), capsys=capsys)
    assert code == 0
    with open(str(tmp_path / "r.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    objects = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    port = wildcard_server.address[1]
    expected = sorted("{}:{}".format(host, port) for host in LOOPBACKS for _ in range(5))
    assert sorted(row["target"] for row in rows) == expected == sorted(row["target"] for row in objects)


def test_reports_name_their_target(wildcard_server, capsys):
    argv = ["client"] + LOOPBACKS[:2] + [str(wildcard_server.address[1]), "-c", "0", "-i", "0.01",
                                         "-w", "0.5", "--report-every", "0.2"]
    assert utc.main(argv) == 0
    out = capsys.readouterr().out
    for host in LOOPBACKS[:2]:
        assert out.count("report {}:{}: ".format(host, wildcard_server.address[1])) == 2


def test_the_plot_draws_a_line_per_target_for_twenty_one_targets(wildcard_server, tmp_path, capsys):
    hosts = LOOPBACKS_USED
    path = tmp_path / "fleet.svg"
    assert utc.main(["client"] + hosts + [str(wildcard_server.address[1]), "-c", "5", "-i", "0.01", "-q",
                                          "--plot", str(path)]) == 0
    root = ElementTree.parse(str(path)).getroot()
    panel = next(group for group in root.iter("{http://www.w3.org/2000/svg}g") if group.get("id") == "rtt")
    lines = [element for element in panel.iter("{http://www.w3.org/2000/svg}polyline")
             if element.get("class") == "target"]
    styles = {(line.get("stroke"), line.get("stroke-dasharray")) for line in lines}
    assert len(lines) == 21 and len(styles) == 21  # a line each, each told apart
    legend = [element.text for element in root.iter("{http://www.w3.org/2000/svg}text")]
    assert all("{}:{}".format(host, wildcard_server.address[1]) in legend for host in hosts)


def scrape(port):
    """The metrics, or "" when the endpoint is not answering yet (or closed this one, busy)."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:{}/metrics".format(port), timeout=10) as response:
            return response.read().decode()
    except OSError:
        return ""


def test_metrics_label_every_series_with_its_target_and_promtool_agrees(processes, wildcard_server):
    require_programs("promtool")
    port = wildcard_server.address[1]
    client = processes(cli("client", *LOOPBACKS, port, "-c", "0", "-i", "0.05", "-q",
                           "--metrics", "127.0.0.1:0"))
    metrics_port = int(client.stderr.expect(r"metrics at http://127\.0\.0\.1:(\d+)/metrics").group(1))
    wait_for(lambda: scrape(metrics_port).count("udp_timecheck_replies_total{") == 3)
    text = scrape(metrics_port)
    for host in LOOPBACKS:
        assert 'udp_timecheck_replies_total{{target="{}:{}"}}'.format(host, port) in text
        assert 'udp_timecheck_rtt_seconds_count{{target="{}:{}"}}'.format(host, port) in text
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
    assert checked.returncode == 0, checked.stdout


# --- a mesh and its matrix ----------------------------------------------------------------------

def test_a_four_node_mesh_and_its_matrix(tmp_path, capsys):
    ports = free_udp_ports(4)
    names = ["north", "east", "south", "west"]
    peers = tmp_path / "peers"
    peers.write_text("".join("{} 127.0.0.1:{}\n".format(name, port) for name, port in zip(names, ports)))
    nodes = [subprocess.Popen(cli("mesh", "--peers", peers, "--listen", "127.0.0.1:{}".format(port),
                                  "-w", "2", "-i", "0.05", "--json"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True) for port in ports]
    outputs = []
    for node, name in zip(nodes, names):
        out, err = node.communicate(timeout=60)
        assert node.returncode == 0, err
        (tmp_path / (name + ".json")).write_text(out)
        outputs.append(json.loads(out))
    for output, name in zip(outputs, names):
        assert output["source"] == name and sorted(t["name"] for t in output["targets"]) == sorted(
            other for other in names if other != name)
        # before a peer is up, and after it has gone (refused, or it said goodbye), nothing is lost:
        # each probe was answered, sent while its peer was not up, or still out at the deadline (how
        # many of each, the nodes' staggered starts decide: a loaded machine starts them seconds apart)
        for target in output["targets"]:
            counts = {key: target[key] for key in ("sent", "received", "lost", "not_up", "in_flight")}
            assert counts["received"] > 0 and counts["lost"] == 0, (name, counts)
            assert counts["sent"] == sum(counts[key] for key in ("received", "not_up", "in_flight")), counts
    files = [str(tmp_path / (name + ".json")) for name in names]
    assert utc.main(["matrix"] + files + ["--json"]) == 0
    matrix = json.loads(capsys.readouterr().out)
    assert matrix["nodes"] == names and len(matrix["cells"]) == 12 and matrix["missing"] == []
    assert utc.main(["matrix"] + files[:3]) == 0  # west's own measurements missing: marked
    text = capsys.readouterr().out
    assert "   4  west" in text and "p50 rtt (" in text and "loss (%)" in text
    tables = text.split("from \\ to")[1:]
    not_up = any(cell["not_up"] for cell in matrix["cells"] if cell["source"] != "west")
    assert len(tables) == 3 + not_up and ("not up (probes" in text) == not_up
    for table in tables:  # three sources, four columns each, west's column measured by the others
        rows = [line.split() for line in table.splitlines()[1:4]]
        assert [row[0] for row in rows] == ["1", "2", "3"] and all(len(row) == 5 for row in rows)
        assert [row[index + 1] for index, row in enumerate(rows)] == ["--", "--", "--"]


def test_mesh_metrics_carry_source_and_target(processes, tmp_path):
    require_programs("promtool")
    ports = free_udp_ports(2)
    peers = tmp_path / "peers"
    peers.write_text("a 127.0.0.1:{}\nb 127.0.0.1:{}\n".format(*ports))
    node = processes(cli("mesh", "--peers", peers, "--listen", "127.0.0.1:{}".format(ports[0]), "-i", "0.05",
                         "-q", "--metrics", "127.0.0.1:0"))
    other = processes(cli("mesh", "--peers", peers, "--listen", "127.0.0.1:{}".format(ports[1]), "-i", "0.05",
                          "-q"))
    metrics_port = int(node.stderr.expect(r"metrics at http://127\.0\.0\.1:(\d+)/metrics").group(1))
    target = "127.0.0.1:{}".format(ports[1])
    series = 'udp_timecheck_replies_total{{source="a",target="{}"}}'.format(target)
    wait_for(lambda: series in scrape(metrics_port))
    text = scrape(metrics_port)
    assert 'udp_timecheck_server_requests_total{source="a",result="served"}' in text
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
    assert checked.returncode == 0, checked.stdout
    assert other.proc.poll() is None
