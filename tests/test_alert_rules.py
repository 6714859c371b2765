"""The alert rules in contrib/prometheus: promtool checks them and runs their unit tests (each
rule fires on what should fire it and stays quiet on noise), and every metric they use is one
udp-timecheck exports."""

import re
import subprocess

from conftest import ROOT, require_programs

RULES = ROOT / "contrib" / "prometheus"


def promtool(*args):
    return subprocess.run(["promtool", *args], cwd=str(RULES), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)


def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    require_programs("promtool")
    checked = promtool("check", "rules", "udp-timecheck.rules.yml")
    assert checked.returncode == 0 and "SUCCESS: 5 rules found" in checked.stdout, checked.stdout
    tested = promtool("test", "rules", "udp-timecheck.rules.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout


def test_every_metric_the_rules_use_is_one_we_export():
    source = (ROOT / "udp_timecheck.py").read_text()
    used = set(re.findall(r"udp_timecheck_(\w+)", (RULES / "udp-timecheck.rules.yml").read_text()))
    assert {"lost_total", "probes_sent_total", "replies_total", "rtt_seconds_bucket"} <= used
    for name in used:
        exported = name[:-len("_bucket")] if name.endswith("_bucket") else name
        assert '"{}"'.format(exported) in source, name


def test_every_alert_keeps_the_pair_and_names_what_it_means():
    rules = (RULES / "udp-timecheck.rules.yml").read_text()
    names = re.findall(r"- alert: (\w+)", rules)
    assert names == ["UdpTimecheckLoss", "UdpTimecheckNodeGone", "UdpTimecheckRttRising",
                     "UdpTimecheckClockBeyondBound", "UdpTimecheckNotScraped"]
    assert rules.count("{{ $labels.source }} to {{ $labels.target }}") == 4  # the scrape's is per instance
    assert "by (source, target, le)" in rules  # the RTT rule keeps the pair's labels
