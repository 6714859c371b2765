"""A real outage fires the shipped alert rules in a real Prometheus: three mesh nodes in a
network namespace of their own, scraped by Prometheus with contrib/prometheus's rules loaded;
nothing fires while all is well, then nftables drops what goes to one node, and the loss and
node-gone alerts fire for the pairs into it, and for no other.

The rules are the shipped ones with every window and every for: divided by twenty (a minute
becomes 3 s), so that the outage fires in seconds rather than in a minute and a half; the
promtool unit tests (test_alert_rules.py) check the shipped timings themselves."""

import json
import re
import sys

import pytest

from conftest import ROOT, needs_linux, require_programs, run

SCRIPT = r"""
import json, os, re, subprocess, sys, time
sys.path[:0] = [{tests!r}]
from conftest import wait_for
import urllib.parse, urllib.request

work, module = {work!r}, {module!r}
ports, metrics = [17001, 17002, 17003], [19101, 19102, 19103]  # a namespace of our own: all free
with open(os.path.join(work, "peers"), "w") as peers:
    peers.write("".join("n{{}} 127.0.0.1:{{}}\n".format(index + 1, port) for index, port in enumerate(ports)))
nodes = [subprocess.Popen([sys.executable, module, "mesh", "--peers", os.path.join(work, "peers"),
                           "--listen", "127.0.0.1:{{}}".format(port), "-i", "0.1", "-w", "60", "-q",
                           "--metrics", "127.0.0.1:{{}}".format(where)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) for port, where in zip(ports, metrics)]
with open(os.path.join(work, "rules.yml"), "w") as rules:
    rules.write({rules!r})
with open(os.path.join(work, "prometheus.yml"), "w") as config:
    config.write("global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\n"
                 "rule_files:\n  - rules.yml\n"
                 "scrape_configs:\n  - job_name: udp-timecheck\n    static_configs:\n"
                 "      - targets: [{{}}]\n"
                 .format(", ".join("'127.0.0.1:{{}}'".format(where) for where in metrics)))
prometheus = subprocess.Popen(["prometheus", "--config.file=prometheus.yml", "--storage.tsdb.path=data",
                               "--web.listen-address=127.0.0.1:19090"], cwd=work, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)

def query(expression):
    url = "http://127.0.0.1:19090/api/v1/query?query=" + urllib.parse.quote(expression)
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read().decode())["data"]["result"]
    except OSError:
        return None  # not up yet

def firing():
    return sorted((alert["metric"]["alertname"], alert["metric"].get("target", ""))
                  for alert in query('ALERTS{{alertstate="firing"}}') or [])

found = {{}}
try:
    # all well: every pair answered for 5 s (windows of 3 s, and for: up to 1.5 s), and nothing fired
    wait_for(lambda: len(query('increase(udp_timecheck_replies_total[5s]) > 25') or []) == 6, timeout=60)
    found["before"] = firing() + [("pending", alert["metric"]["alertname"])
                                  for alert in query('ALERTS{{alertstate="pending"}}') or []]
    subprocess.run(["nft", "-f", "-"], input="table inet outage {{\n chain input {{\n type filter hook input "
                   "priority 0;\n udp dport 17003 counter drop\n }}\n}}\n", universal_newlines=True,
                   check=True)
    wait_for(lambda: {{"UdpTimecheckLoss", "UdpTimecheckNodeGone"}} <= {{name for name, _ in firing()}},
             timeout=60)
    found["after"] = firing()
    listed = subprocess.run(["nft", "list", "table", "inet", "outage"], stdout=subprocess.PIPE,
                            universal_newlines=True, check=True).stdout
    found["dropped"] = int(re.search(r"packets (\d+)", listed).group(1))
finally:
    for process in nodes + [prometheus]:
        process.terminate()
    for process in nodes + [prometheus]:
        process.wait(timeout=20)
print(json.dumps(found))
"""


def scaled_rules():
    """The shipped rules, each window and each for: a twentieth as long."""
    text = (ROOT / "contrib" / "prometheus" / "udp-timecheck.rules.yml").read_text()
    twentieth = {"1m": "3s", "30s": "1500ms", "5m": "15s", "10m": "30s", "6h": "18m"}
    text = re.sub(r"\[(\w+)\]", lambda match: "[{}]".format(twentieth[match.group(1)]), text)
    return re.sub(r"for: (\w+)", lambda match: "for: {}".format(twentieth[match.group(1)]), text)


@pytest.mark.long(seconds=14)
@needs_linux("a network namespace (unshare -rn) and nftables")
def test_dropping_one_nodes_traffic_fires_its_alerts_and_nothing_before(tmp_path):
    require_programs("unshare", "ip", "nft", "prometheus")
    script = SCRIPT.format(tests=str(ROOT / "tests"), work=str(tmp_path),
                           module=str(ROOT / "udp_timecheck.py"), rules=scaled_rules())
    result = run(["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1"', sys.executable,
                  script], timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    assert found["before"] == []  # a healthy mesh: nothing firing, nothing pending
    assert found["dropped"] > 0
    into_n3 = {("UdpTimecheckLoss", "127.0.0.1:17003"), ("UdpTimecheckNodeGone", "127.0.0.1:17003")}
    after = {tuple(alert) for alert in found["after"]}
    assert into_n3 <= after  # both alerts, for the pairs into the dark node
    assert {target for _, target in after} == {"127.0.0.1:17003"}  # and for no other pair
