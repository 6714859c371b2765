"""Prometheus metrics from both ends: the format, promtool's check, and a real Prometheus scraping."""

import json
import signal
import subprocess
import urllib.parse
import urllib.request

import pytest

import udp_timecheck as utc
from conftest import MODULE, POSIX_ONLY, cli, free_tcp_port, require_programs, wait_for

METRICS_AT = r"^metrics at http://(127\.0\.0\.1:\d+)/metrics$"
CLIENT_COUNTERS = ["probes_sent_total", "replies_total", "lost_total", "duplicates_total", "reordered_total",
                   "mismatched_total", "forged_total"]


def scrape(where):
    with urllib.request.urlopen("http://{}/metrics".format(where), timeout=10) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return response.read().decode()


def samples(text):
    """{series: value} of the exposition text, HELP and TYPE lines left out."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            found[series] = float(value)
    return found


@pytest.fixture
def measured(cli_server, processes):
    """A server and a client run until stopped, both with --metrics on a port of their own."""
    server, port = cli_server("-q", "--metrics", "0")
    server_metrics = server.stderr.expect(METRICS_AT).group(1)
    client = processes(cli("client", "127.0.0.1", port, "-c", "0", "-i", "0.01", "--json",
                           "--metrics", "127.0.0.1:0"))
    client_metrics = client.stderr.expect(METRICS_AT).group(1)
    return server, client, server_metrics, client_metrics, port


def test_both_endpoints_serve_the_documented_series(measured):
    server, client, server_metrics, client_metrics, port = measured
    target = 'target="127.0.0.1:{}"'.format(port)
    drift = "udp_timecheck_clock_drift_ratio{" + target + "}"
    wait_for(lambda: drift in samples(scrape(client_metrics)))  # the fit wants some points first
    found = samples(scrape(client_metrics))
    for name in CLIENT_COUNTERS:
        assert "udp_timecheck_{}{{{}}}".format(name, target) in found
    assert found['udp_timecheck_rtt_seconds_bucket{' + target + ',le="+Inf"}'] == \
        found["udp_timecheck_rtt_seconds_count{" + target + "}"] >= 20
    assert abs(found["udp_timecheck_clock_offset_seconds{" + target + "}"]) <= \
        found["udp_timecheck_clock_offset_error_seconds{" + target + "}"] + 1e-5
    assert abs(found[drift]) < 1e-3  # one clock: no drift worth the name
    buckets = [value for series, value in found.items()
               if series.startswith("udp_timecheck_rtt_seconds_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    assert 'udp_timecheck_build_info{version="' + utc.__version__ + '"' in scrape(client_metrics)
    served = samples(scrape(server_metrics))
    for result in ("served", "malformed", "unauthenticated", "rate_limited", "too_short", "loop"):
        assert 'udp_timecheck_server_requests_total{result="' + result + '"}' in served
    assert served['udp_timecheck_server_requests_total{result="served"}'] >= 20
    assert served["udp_timecheck_server_log_dropped_total"] == 0


def test_promtool_finds_nothing_to_say_of_either_endpoint(measured):
    require_programs("promtool")
    _, _, server_metrics, client_metrics, port = measured
    wait_for(lambda: "udp_timecheck_clock_drift_ratio" in scrape(client_metrics))
    for where in (server_metrics, client_metrics):
        check = subprocess.run(["promtool", "check", "metrics"], input=scrape(where), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
        assert check.returncode == 0 and check.stdout == "", check.stdout  # no lint warnings either


def query(prometheus, expression):
    url = "http://{}/api/v1/query?query={}".format(prometheus, urllib.parse.quote(expression))
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read().decode())["data"]["result"]
    except OSError:  # not up yet
        return []


@pytest.mark.long(seconds=13)
@POSIX_ONLY
def test_a_real_prometheus_scrapes_both_ends(measured, processes, tmp_path):
    require_programs("prometheus")
    server, client, server_metrics, client_metrics, port = measured
    web = "127.0.0.1:{}".format(free_tcp_port())
    config = tmp_path / "prom.yml"
    config.write_text("global:\n  scrape_interval: 500ms\n  scrape_timeout: 500ms\n"
                      "scrape_configs:\n  - job_name: udp-timecheck\n    static_configs:\n"
                      "      - targets: ['{}', '{}']\n".format(server_metrics, client_metrics))
    processes(["prometheus", "--config.file={}".format(config),
               "--storage.tsdb.path={}".format(tmp_path / "data"), "--web.listen-address={}".format(web)])
    # Prometheus opens connections ahead and keeps them idle for a later scrape: none is closed
    # under it, so up stays 1 (an idle deadline of 5 s made one scrape fail some 5 s in)
    scrapes = 'count_over_time(up{job="udp-timecheck"}[1m])'
    wait_for(lambda: len(query(web, scrapes)) == 2 and all(float(series["value"][1]) >= 16
                                                           for series in query(web, scrapes)), timeout=90)
    worst = query(web, 'min_over_time(up{job="udp-timecheck"}[1m])')
    assert [series["value"][1] for series in worst] == ["1", "1"]  # 16 scrapes and more (8 s), each a success
    for where in (server_metrics, client_metrics):
        assert 'udp_timecheck_metrics_connections_total{result="timed_out"} 0' in scrape(where)
    wait_for(lambda: query(web, "udp_timecheck_probes_sent_total"), timeout=60)
    wait_for(lambda: query(web, 'udp_timecheck_server_requests_total{result="served"} > 50'), timeout=60)
    p99_query = "histogram_quantile(0.99, rate(udp_timecheck_rtt_seconds_bucket[5s]))"
    # a rate needs two scrapes a second apart: the client's figures are taken once a second
    wait_for(lambda: query(web, p99_query) and query(web, p99_query)[0]["value"][1] != "NaN", timeout=30)
    assert 0 < float(query(web, p99_query)[0]["value"][1]) < 0.1
    # the kernel's clock state, where the platform tells it (not Windows): absent when unknown
    assert bool(query(web, 'udp_timecheck_clock_synchronized{end="local"}')) == (utc.LINUX or utc.BSD)
    client.signal(signal.SIGINT)
    assert client.wait(timeout=15) == 0
    final = json.loads(client.rest(client.stdout)[-1])
    wait_for(lambda: query(web, "max_over_time(udp_timecheck_probes_sent_total[5m])"), timeout=10)
    scraped = float(query(web, "max_over_time(udp_timecheck_probes_sent_total[5m])")[0]["value"][1])
    replies = float(query(web, "max_over_time(udp_timecheck_replies_total[5m])")[0]["value"][1])
    # the last scrape was at most one interval (0.5 s, 50 probes at -i 0.01) before the end
    assert 0 <= final["sent"] - scraped <= 150
    assert 0 <= final["received"] - replies <= 150


def test_metrics_beyond_loopback_come_with_a_warning(start_server, capsys):
    server = start_server(log=None)
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "2", "-i", "0",
                     "-q", "--metrics", "0.0.0.0:0"]) == 0
    err = capsys.readouterr().err
    assert "metrics at http://0.0.0.0:" in err and "can be read by anyone who can reach this port" in err


def test_label_values_are_escaped():
    assert utc._labels({"target": 'a"b\\c\nd'}) == '{target="a\\"b\\\\c\\nd"}'


def test_the_monitoring_pages_rules_and_scrape_configs_are_valid(tmp_path):
    require_programs("promtool")
    import re
    page = (MODULE.parent / "docs" / "monitoring.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", page, re.S)
    loaded = tmp_path / "loaded.yml"  # the page's prometheus.yml, with the rules we ship
    loaded.write_text(next(block for block in blocks if block.startswith("rule_files:")).replace(
        "/etc/prometheus/udp-timecheck.rules.yml", str(MODULE.parent / "contrib" / "prometheus" /
                                                       "udp-timecheck.rules.yml")))
    check = subprocess.run(["promtool", "check", "config", str(loaded)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
    assert check.returncode == 0 and "SUCCESS: 5 rules found" in check.stdout, check.stdout
    config = tmp_path / "prometheus.yml"
    config.write_text(next(block for block in blocks if block.startswith("scrape_configs:")))
    check = subprocess.run(["promtool", "check", "config", str(config)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
    assert check.returncode == 0, check.stdout
