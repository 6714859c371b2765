"""Shared-key authentication: HMAC-SHA256 on requests and on replies bound to them."""

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

import udp_timecheck as utc
from conftest import KEY, ask, probe, request, run_cli, write_key_file


def keyed_probe(address, **kwargs):
    return probe(address, key=KEY, **kwargs)


def test_same_key_on_both_ends_works(start_server):
    server = start_server(key=KEY)
    measurement = keyed_probe(server.address, count=10, interval=0.005)
    summary = utc.summarize(measurement)
    assert summary["received"] == 10 and summary["forged"] == 0 and summary["offset_ms"] is not None


def test_keyed_server_is_silent_to_everything_unauthenticated(start_server):
    server = start_server(key=KEY)
    unauthenticated = [
        json.dumps([491, "The time is 2019-05-04 16:20:56.975068"]).encode(),  # the tutorial's form
        request(1, seq=0, pad_to=300),                                        # ours, no MAC
        request(2, seq=0, pad_to=300, key=b"another key entirely, 32 bytes!"),  # wrong key
        request(3, seq=0, pad_to=300, key=KEY)[:-3] + b'0"]',                  # a MAC digit changed
    ]
    for data in unauthenticated:
        assert server.respond(data) is None
    assert server.stats.unauthenticated == len(unauthenticated) and server.stats.malformed == 0
    assert ask(server.address, request(4, seq=0, pad_to=300, key=KEY)) is not None


def test_unkeyed_client_gets_silence_from_a_keyed_server(start_server, capsys):
    server = start_server(key=KEY)
    assert utc.main(["client", *map(str, server.address), "-W", "0.3"]) == 1
    assert "no reply" in capsys.readouterr().err


def test_keyed_client_rejects_an_unkeyed_server(start_server, tmp_path, capsys):
    server = start_server()
    assert utc.main(["client", *map(str, server.address), "--key-file", write_key_file(tmp_path),
                     "-c", "3", "-i", "0", "-W", "0.3", "--json"]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["received"] == 0 and summary["forged"] == 3
    assert "replies are not authenticated: is the server running with the same key?" in captured.err


def _rewrite_digit_of_t2(data):
    at = data.index(b'"t2": ') + 10
    return data[:at] + (b"1" if data[at:at + 1] != b"1" else b"2") + data[at + 1:]


def tamper_second_reply(index, data):
    return [(0.0, _rewrite_digit_of_t2(data) if index == 1 else data)]


def test_tampered_reply_is_forged(start_server, relay):
    server = start_server(key=KEY)
    hop = relay(server.address, tamper_second_reply)
    measurement = keyed_probe(hop.address, count=3, timeout=0.5)
    assert [sample.status for sample in measurement.samples] == [utc.OK, utc.LOST, utc.OK]
    assert measurement.totals.forged == 1


def test_tampering_is_what_the_key_catches(start_server, relay):
    """The same tampering, unkeyed: nothing can tell, which is why the key exists."""
    server = start_server()
    hop = relay(server.address, tamper_second_reply)
    measurement = probe(hop.address, count=3, timeout=0.5)
    assert measurement.totals.received == 3 and measurement.totals.forged == 0


def test_reply_readdressed_to_another_request_is_forged(start_server, relay):
    server = start_server(key=KEY)

    def readdress(index, data):
        if index != 3:
            return [(0.0, data)]
        other_id = utc.decode_message(hop.requests[2]).message_id
        this_id = utc.decode_message(data).message_id
        return [(0.0, data.replace(b"[%d, " % this_id, b"[%d, " % other_id, 1))]

    hop = relay(server.address, readdress)
    measurement = keyed_probe(hop.address, count=5, timeout=0.5)
    assert measurement.totals.forged == 1 and measurement.totals.duplicates == 0
    assert [sample.status for sample in measurement.samples] == [utc.OK] * 3 + [utc.LOST, utc.OK]


def test_old_replies_replayed_to_new_requests_are_forged(start_server, relay, monkeypatch, capsys):
    server = start_server(key=KEY)
    recorder = relay(server.address)
    assert keyed_probe(recorder.address, count=5).totals.received == 5
    old = list(recorder.replies)
    replayer = relay(server.address, lambda index, data: [(0.0, old[index % len(old)])])
    measurement = keyed_probe(replayer.address, count=3, timeout=0.3)
    assert measurement.totals.received == 0 and measurement.totals.forged == 3
    monkeypatch.setenv(utc.KEY_ENV, KEY.decode())
    assert utc.main(["client", *map(str, replayer.address), "-c", "3", "-i", "0", "-W", "0.3", "-q"]) == 1
    captured = capsys.readouterr()
    assert "3 probes sent, 0 received, 100% loss" in captured.out and ", 3 forged" in captured.out
    assert "3 replies failed authentication" in captured.err


def test_any_forged_reply_fails_the_run(start_server, relay, tmp_path, monkeypatch, capsys):
    server = start_server(key=KEY)
    hop = relay(server.address, lambda index, data: [(0.0, data), (0.0, _rewrite_digit_of_t2(data))]
                if index == 0 else [(0.0, data)])
    monkeypatch.setenv(utc.KEY_ENV, KEY.decode())
    assert utc.main(["client", *map(str, hop.address), "-c", "3", "-i", "0", "--json"]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["received"] == 3 and summary["forged"] == 1
    assert "1 reply failed authentication" in captured.err  # in the singular


def test_keyed_faulty_server_is_a_liar_not_a_forger(start_server):
    server = start_server(key=KEY, faulty=1.0)
    measurement = keyed_probe(server.address, count=3)
    assert measurement.totals.mismatched == 3 and measurement.totals.forged == 0


def test_size_with_a_key(start_server, relay):
    server = start_server(key=KEY)
    hop = relay(server.address)
    measurement = keyed_probe(hop.address, count=2, size=900)
    assert measurement.totals.received == 2 and [len(data) for data in hop.replies] == [900, 900]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_keyed_processes_end_to_end(cli_server, tmp_path):
    path = write_key_file(tmp_path)
    _, port = cli_server("--key-file", path)
    keyed = run_cli("client", "127.0.0.1", port, "--key-file", path)
    assert keyed.returncode == 0 and keyed.stdout.startswith("The time is ")
    os.chmod(path, 0o644)
    warned = run_cli("client", "127.0.0.1", port, "--key-file", path, "-c", "2")
    assert warned.returncode == 0 and "warning: key file" in warned.stderr
    unkeyed = run_cli("client", "127.0.0.1", port, "-W", "0.3")
    assert unkeyed.returncode == 1


@given(st.binary(min_size=1, max_size=64), st.integers(0, 2 ** 63 - 1), st.text(max_size=50),
       st.integers(0, 10 ** 6), st.data())
def test_mac_round_trips_and_any_flipped_byte_breaks_it(key, request_id, text, seq, data):
    datagram = utc.encode_request(request_id, text, seq, key=key)
    assert utc.mac_matches(key, utc.REQUEST_LABEL, datagram)
    position = data.draw(st.integers(0, len(datagram) - 1))
    flipped = bytearray(datagram)
    flipped[position] ^= data.draw(st.integers(1, 255))
    assert not utc.mac_matches(key, utc.REQUEST_LABEL, bytes(flipped))
