"""Reordered replies: matched by id, counted as irtt counts them, and kept out of the jitter's pairing."""

import pytest

import udp_timecheck as utc
from conftest import MS_NS, answer_probe, new_recorder, probe, send_probe


def test_reordered_replies_are_matched_by_id(start_server, relay):
    server = start_server()
    hop = relay(server.address, lambda index, data: [(0.15 if index == 3 else 0.0, data)])
    measurement = probe(hop.address, count=10, interval=0.01, timeout=2)
    assert measurement.totals.received == 10
    assert measurement.samples[4].recv_mono_ns < measurement.samples[3].recv_mono_ns


def test_reordered_replies_are_counted(start_server, relay):
    server = start_server()

    def swap_pairs(index, data):  # replies 2 and 3, 6 and 7 ... come the other way round
        return [(0.05 if index % 4 == 2 else 0.0, data)]

    hop = relay(server.address, swap_pairs)
    recorder = probe(hop.address, count=20, interval=0.01, timeout=2)
    assert recorder.totals.received == 20 and recorder.totals.reordered == 5
    assert utc.summarize(recorder)["reordered"] == 5


def test_jitter_is_mean_absolute_consecutive_difference():
    """1, 3, 2 ms: |3 - 1| and |2 - 3|, 1.5 ms; probes are paired by number, not by arrival."""
    recorder = new_recorder()
    probes = [send_probe(recorder, seq) for seq in range(3)]
    for sample, rtt_ms in ((probes[0], 1), (probes[2], 2), (probes[1], 3)):  # the last two swapped
        answer_probe(recorder, sample, rtt_ms * MS_NS, 0)
    summary = utc.summarize(recorder)
    assert summary["jitter_ms"] == pytest.approx(1.5, rel=0.001)
    assert summary["reordered"] == 1  # seq 1 came after seq 2
