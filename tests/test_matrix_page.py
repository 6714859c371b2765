"""matrix --html: one self-contained page of three heatmaps, from a real mesh run, opened in a
real headless Chromium; its cells hold the figures of matrix --json."""

import html.parser
import json
import signal
import socket
import struct
import subprocess
import urllib.request
import zlib

import pytest

import udp_timecheck as utc
from conftest import cli, free_tcp_port, free_udp_ports, require_programs, run_cli, wait_for

NAMES = ["alpha", "beta", "gamma<b>"]  # a name with markup in it: it must show as text


class Cells(html.parser.HTMLParser):
    """The data-* attributes of each measured cell, and every element's tag."""

    def __init__(self):
        super().__init__()
        self.cells, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attributes = dict(attrs)
        if tag == "td" and "data-source" in attributes:
            self.cells.append(attributes)


def mesh_outputs(tmp_path):
    ports = free_udp_ports(3)
    peers = tmp_path / "peers"
    peers.write_text("".join("{} 127.0.0.1:{}\n".format(name, port) for name, port in zip(NAMES, ports)))
    nodes = [subprocess.Popen(cli("mesh", "--peers", peers, "--listen", "127.0.0.1:{}".format(port),
                                  "-c", "30", "-i", "0.02", "-W", "2", "--json"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True) for port in ports]
    paths = []
    for index, node in enumerate(nodes):
        out, _ = node.communicate(timeout=60)
        paths.append(tmp_path / "node{}.json".format(index))
        paths[-1].write_text(out)
    return paths


def png_colours(path):
    """How many distinct byte values the first rows of a PNG's pixels hold (1 or 2: blank)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat = 8, b""
    while offset < len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        if kind == b"IDAT":
            idat += data[offset + 8:offset + 8 + length]
        offset += 12 + length
    return len(set(zlib.decompress(idat)[:400_000]))


@pytest.mark.long(seconds=5)
def test_the_page_of_a_real_mesh_in_a_real_browser_holds_the_matrix_figures(tmp_path):
    require_programs("chromium")
    paths = mesh_outputs(tmp_path)
    page = tmp_path / "matrix.html"
    matrix = json.loads(run_cli("matrix", *paths, "--json", "--html", page).stdout)
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir={}".format(
        tmp_path / "profile")]
    dom = subprocess.run(browser + ["--dump-dom", page.as_uri()], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=90).stdout
    parsed = Cells()
    parsed.feed(dom)
    assert "b" not in parsed.tags and "script" not in parsed.tags and "gamma&lt;b&gt;" in dom
    assert "http" not in page.read_text().replace("http://www.w3.org", "")  # nothing fetched from anywhere
    assert len(matrix["cells"]) == 6 and not matrix["missing"]
    shown = {(cell["data-source"], cell["data-target"], table): cell for table, cell in
             zip([figure for figure in ("rtt", "loss", "offset") for _ in range(6)], parsed.cells)}
    for cell in matrix["cells"]:
        for table in ("rtt", "loss", "offset"):
            on_page = shown[(cell["source"], cell["target"], table)]
            assert float(on_page["data-rtt-p50-ms"]) == cell["rtt_p50_ms"]
            assert float(on_page["data-loss-pct"]) == cell["loss_pct"]
            assert float(on_page["data-offset-ms"]) == cell["offset_ms"]
            assert float(on_page["data-offset-err-ms"]) == cell["offset_err_ms"]
            assert int(on_page["data-sent"]) == cell["sent"] == 30
    screenshot = tmp_path / "matrix.png"
    subprocess.run(browser + ["--screenshot={}".format(screenshot), "--window-size=1000,1300", page.as_uri()],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=90, check=True)
    assert png_colours(screenshot) > 20  # text and coloured cells, not a blank page


def test_a_hundred_nodes_shrink_their_cells_and_thin_their_labels():
    names = ["node{:03d}".format(index) for index in range(100)]
    cells = [{"source": source, "target": target, "rtt_p50_ms": 1.0 + index, "loss_pct": 0.0,
              "offset_ms": 0.0, "offset_err_ms": 0.1, "not_up": 0}
             for index, source in enumerate(names) for target in names if target != source]
    page = utc.render_matrix_html({"nodes": names, "cells": cells, "missing": []})
    assert "td{width:9px;height:9px;font-size:0}" in page
    labels = page.count('<th class="col">node')
    assert 3 * 20 <= labels <= 3 * 34  # a label every few columns, in each of the three maps
    assert page.count('title="node000 to node001:') == 3  # every pair keeps its figures in its tooltip


def test_a_pair_not_measured_is_marked_so():
    pair = {"source": "a", "target": "b", "rtt_p50_ms": 1.0, "loss_pct": 0.0, "offset_ms": 0.0,
            "offset_err_ms": 0.1, "not_up": 0}
    matrix = {"nodes": ["a", "b"], "cells": [pair],
              "missing": [["b", "a"]]}
    page = utc.render_matrix_html(matrix)
    assert page.count('title="b to a: not measured"') == 3 and page.count('title="a to a: itself"') == 3


def test_a_mesh_nodes_metrics_port_serves_its_row_of_the_matrix_live(processes, tmp_path):
    ports = free_udp_ports(2)
    peers = tmp_path / "peers"
    peers.write_text("".join("{} 127.0.0.1:{}\n".format(name, port) for name, port in zip(NAMES, ports)))
    nodes = [processes(cli("mesh", "--peers", peers, "--listen", "127.0.0.1:{}".format(port), "-i", "0.05",
                           "-w", "20", "-q", "--metrics", "127.0.0.1:0")) for port in ports]
    where = nodes[0].stderr.expect(r"metrics at http://(127\.0\.0\.1:\d+)/metrics").group(1)

    def row():
        with urllib.request.urlopen("http://{}/".format(where), timeout=10) as response:
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            parsed = Cells()
            parsed.feed(response.read().decode("utf-8"))
            return parsed.cells
    wait_for(lambda: any(int(cell["data-sent"] or 0) >= 10 and cell["data-rtt-p50-ms"] for cell in row()),
             timeout=30)
    cells = row()
    assert {(cell["data-source"], cell["data-target"]) for cell in cells} == {("alpha", "beta")}
    assert all(float(cell["data-rtt-p50-ms"]) > 0 and float(cell["data-loss-pct"]) == 0 for cell in cells)
    with urllib.request.urlopen("http://{}/matrix".format(where), timeout=10) as response:
        assert b"<h2>Loss</h2>" in response.read()
    for node in nodes:
        node.signal(signal.SIGINT)
        assert node.wait(timeout=15) == 0


@pytest.mark.long(seconds=5)
def test_a_nodes_page_joins_the_rows_it_fetches_from_the_other_nodes(processes, tmp_path):
    ports, metrics = free_udp_ports(2), [free_tcp_port(), free_tcp_port()]
    peers = tmp_path / "peers"
    peers.write_text("".join("{} 127.0.0.1:{}\n".format(name, port) for name, port in zip(NAMES, ports)))
    with socket.socket() as silent:  # a peer that takes the connection and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        nodes = [processes(cli("mesh", "--peers", peers, "--listen", "127.0.0.1:{}".format(port),
                               "-i", "0.05", "-w", "20", "-q", "--metrics", "127.0.0.1:{}".format(mine),
                               "--peer-metrics", "127.0.0.1:{}".format(theirs),
                               "--peer-metrics", "127.0.0.1:{}".format(silent.getsockname()[1])))
                 for port, mine, theirs in zip(ports, metrics, reversed(metrics))]

        def pairs():
            with urllib.request.urlopen("http://127.0.0.1:{}/".format(metrics[0]), timeout=10) as response:
                parsed = Cells()
                parsed.feed(response.read().decode("utf-8"))
            return {(cell["data-source"], cell["data-target"]) for cell in parsed.cells}
        for node in nodes:
            node.stderr.expect(r"^metrics at http://")
        wait_for(lambda: pairs() == {("alpha", "beta"), ("beta", "alpha")}, timeout=30)  # its own, and beta's
        with urllib.request.urlopen("http://127.0.0.1:{}/".format(metrics[0]), timeout=10) as response:
            assert b"Rows fetched from 1 of 2 other nodes;" in response.read()  # the silent one: none
        for node in nodes:
            node.signal(signal.SIGINT)
            assert node.wait(timeout=15) == 0


def test_a_row_from_another_node_is_checked_cell_by_cell():
    good = {"source": "b", "target": "a<script>", "rtt_p50_ms": 0.5, "loss_pct": 0.0, "offset_ms": None,
            "offset_err_ms": None, "not_up": 0}
    assert utc._row_cell(good)["target"] == "a<script>"  # kept as text: the page escapes it
    assert utc._row_cell(dict(good, loss_pct=250.0)) is None  # out of range
    assert utc._row_cell(dict(good, rtt_p50_ms="1")) is None  # not a number
    assert utc._row_cell(dict(good, source=["b"])) is None  # not a name
    assert utc._row_cell("cell") is None
    page = utc.render_matrix_html({"nodes": ["b", "a<script>"], "cells": [utc._row_cell(good)],
                                   "missing": []})
    assert "<script>" not in page and "a&lt;script&gt;" in page
