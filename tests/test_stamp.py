"""STAMP (RFC 8762, RFC 8972): our Session-Sender against our Session-Reflector, stateful and
stateless, plain and authenticated; the loss split against a relay's log; the packets read by
implementations nobody on this project wrote: tshark's TWAMP-Test dissector and scapy's STAMP
layers."""

import json
import socket
import struct
import subprocess
import threading
import time

import pytest

import udp_timecheck as utc
from conftest import (KEY, SECOND_NS, cli, free_udp_ports, require_programs, run_cli, wait_for,
                      write_key_file)


def stamp_seq(datagram):
    """A STAMP packet's own sequence number, as the relay sees it: its first four bytes."""
    return struct.unpack_from("!I", datagram)[0]


def measure(capsys, address, *argv):
    code = utc.main(["client", "--stamp", *map(str, address[:2]), *map(str, argv), "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def reflector(start_server):
    def start(mode=utc.STATEFUL, **kwargs):
        return start_server(log=None, stamp=mode, **kwargs)
    return start


# --- the wire format -------------------------------------------------------------------------

@pytest.mark.parametrize("error_ns", [1, 999, 1000, 4_000, 123_456, 10 ** 9, 16 * 10 ** 9, 10 ** 15])
def test_an_error_estimate_is_a_bound_and_a_close_one(error_ns):
    synchronized, said = utc.decode_error_estimate(utc.encode_error_estimate(True, error_ns))
    assert synchronized and error_ns <= said <= error_ns * 1.01 + 2  # 8 bits of multiplier: within 1%


def test_the_s_bit_only_for_a_synchronised_clock_and_an_unknown_error_is_the_largest():
    assert utc.encode_error_estimate(False, 1000) & 0x8000 == 0
    assert utc.encode_error_estimate(None, 1000) & 0x8000 == 0
    assert utc.encode_error_estimate(False, None) == 0x3FFF  # scale 63, multiplier 255: Z stays 0


@pytest.mark.parametrize("keyed", [False, True])
def test_packets_have_rfc_8762s_sizes_and_read_back(keyed):
    key = KEY if keyed else None
    sender = utc.StampPacket(7, 0x1122334455667788, 0x8123, 99, tlvs=((0, utc.TLV_FOLLOW_UP, bytes(16)),))
    reflected = utc.StampPacket(3, 5, 6, 99, 8, 7, 0x1122334455667788, 0x8123, 61)
    assert len(utc.encode_stamp(sender._replace(tlvs=()), False, key)) == (112 if keyed else 44)
    assert len(utc.encode_stamp(reflected, True, key)) == (112 if keyed else 44)
    assert utc.decode_stamp(utc.encode_stamp(sender, False, key), False, key) == sender
    assert utc.decode_stamp(utc.encode_stamp(reflected, True, key, 200), True, key) == reflected
    if keyed:
        with pytest.raises(utc.WireError):
            utc.decode_stamp(utc.encode_stamp(reflected, True, b"another key"), True, key)


# --- our sender against our reflector ----------------------------------------------------------

@pytest.mark.parametrize("mode", [utc.STATEFUL, utc.STATELESS])
@pytest.mark.parametrize("keyed", [False, True])
def test_our_sender_measures_our_reflector(reflector, capsys, tmp_path, mode, keyed):
    server = reflector(mode, key=KEY if keyed else None)
    key_args = ["--key-file", write_key_file(tmp_path)] if keyed else []
    code, summary = measure(capsys, server.address, "-c", 20, "-i", 0.005, *key_args)
    assert code == 0 and summary["protocol"] == "stamp" and summary["received"] == 20
    assert summary["request_bytes"] == (112 if keyed else 44) + 20  # and the Follow-Up Telemetry TLV
    assert abs(summary["offset_ms"]) <= summary["offset_err_ms"]  # one clock: the truth is 0
    wait_for(lambda: server.stats.served == 20)  # counted just after its send: the last may lag the reply
    if utc.LINUX:  # where the reflector reads a TTL, and the kernel stamps its sends
        assert summary["ttl"]["received_by_server"] == 64
        kernel_t3 = [sample for sample in summary["samples"] if sample["t3_from"] == utc.KERNEL]
        assert len(kernel_t3) >= 10  # each from a later reflection's Follow-Up Telemetry
    else:
        assert summary["ttl"]["received_by_server"] is None  # Ses-Sender TTL 0: not known


def test_a_wrong_key_is_forged_and_a_reflector_with_a_key_ignores_a_sender_without(reflector, capsys,
                                                                                     tmp_path):
    server = reflector(key=b"the reflector's own key")
    code, summary = measure(capsys, server.address, "-c", 3, "-i", 0.005, "-W", 0.3,
                            "--key-file", write_key_file(tmp_path))
    assert code == 1 and summary["received"] == 0
    wait_for(lambda: server.stats.unauthenticated == 3)
    unkeyed = reflector()
    code, summary = measure(capsys, unkeyed.address, "-c", 2, "-i", 0.005, "-W", 0.3,
                            "--key-file", write_key_file(tmp_path))
    assert code == 1 and summary["received"] == 0  # a 132-byte packet, unsigned: its HMAC is wrong


def test_the_loss_split_is_exact_against_the_relays_drop_log(reflector, relay, capsys):
    server = reflector()
    requests_dropped, replies_dropped = {2, 3, 7, 20, 21, 40}, {5, 8, 30, 41, 42}
    hop = relay(server.address, lambda index, data: [] if struct.unpack_from("!I", data, 24)[0]
                in replies_dropped else [(0.0, data)],  # by the sender's seq the reflection carries
                forward=lambda index, data, client: stamp_seq(data) not in requests_dropped)
    code, summary = measure(capsys, hop.address, "-c", 50, "-i", 0.005, "-W", 0.5)
    assert (len(hop.dropped_requests), len(hop.dropped_replies)) == (6, 5)
    assert summary["lost"] == 11
    assert (summary["lost_up"], summary["lost_down"], summary["lost_direction_unknown"]) == (6, 5, 0)


def shifted(by):
    """A relay policy that moves the sender timestamp a reflection carries by `by` (2**-32 s)."""
    def policy(index, data):
        timestamp = struct.unpack_from("!Q", data, 28)[0]
        return [(0.0, data[:28] + struct.pack("!Q", timestamp + by) + data[36:])]
    return policy


def test_a_reflected_timestamp_rounded_within_a_microsecond_still_matches(reflector, relay, capsys):
    server = reflector()
    rounded = relay(server.address, shifted(3))  # as a reflector that converts timestamps rounds them
    code, summary = measure(capsys, rounded.address, "-c", 5, "-i", 0.005)
    assert code == 0 and summary["received"] == 5 and summary["mismatched"] == 0
    moved = relay(server.address, shifted(utc.STAMP_ROUNDING + 1))  # a forger's guess: not good enough
    code, summary = measure(capsys, moved.address, "-c", 3, "-i", 0.005, "-W", 0.3)
    assert code == 1 and summary["received"] == 0 and summary["mismatched"] == 3


def test_a_stateless_reflector_gives_no_split(reflector, relay, capsys):
    server = reflector(utc.STATELESS)
    hop = relay(server.address, forward=lambda index, data, client: stamp_seq(data) != 3)
    code, summary = measure(capsys, hop.address, "-c", 8, "-i", 0.005, "-W", 0.3)
    assert summary["lost"] == 1  # its seqs are ours: which way it went, nobody can tell
    assert summary["lost_up"] is summary["lost_down"] is summary["lost_direction_unknown"] is None


def test_the_class_of_service_tlv_brings_the_dscp_the_reflector_received(reflector, capsys):
    server = reflector()
    code, summary = measure(capsys, server.address, "-c", 3, "-i", 0.005, "--tos", "0xb8")
    tos = summary["tos"]
    assert code == 0 and tos["sent"] == 0xB8
    if utc.LINUX:  # where the reflector reads the TOS a packet came with
        assert tos["received_by_server"] == 0xB8 and tos["received_back"] == 0xB8


def test_many_targets_and_every_output_work_as_for_our_protocol(reflector, capsys, tmp_path):
    first, second = reflector(), reflector(utc.STATELESS)
    csv, plot = tmp_path / "probes.csv", tmp_path / "plot.svg"
    targets = ["127.0.0.1:{}".format(server.address[1]) for server in (first, second)]
    assert utc.main(["client", "--stamp", *targets, "-c", "5", "-i", "0.01", "--json", "--csv", str(csv),
                     "--plot", str(plot)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [target["received"] for target in summary["targets"]] == [5, 5]
    assert len(csv.read_text().splitlines()) == 1 + 10 and "</svg>" in plot.read_text()


def test_a_silent_reflector_gets_the_hint_that_names_stamp_and_its_port(capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        assert utc.main(["client", "--stamp", "127.0.0.1", str(silent.getsockname()[1]), "-c", "1",
                         "-W", "0.2"]) == 1
    error = capsys.readouterr().err
    assert "STAMP or TWAMP-light reflector" in error and "862" in error


# --- what the reflector refuses ----------------------------------------------------------------

def sent_to(server, data, source_port=0):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", source_port))
        sock.settimeout(0.5)
        sock.sendto(data, server.address)
        try:
            return sock.recv(65535)
        except socket.timeout:
            return None


def test_the_reflector_reflects_no_reflection_nor_anything_short(reflector):
    server = reflector()
    reflection = utc.encode_stamp(utc.StampPacket(1, 2, 3, 4, 5, 6, 7, 8, 9), True)
    assert sent_to(server, reflection) is None  # another reflector's reply: a loop, never started
    assert sent_to(server, reflection[:43]) is None
    wait_for(lambda: server.stats.malformed == 2)
    assert server.stats.served == 0
    assert sent_to(server, utc.encode_stamp(utc.StampPacket(1, 2, 3, 4), False)) is not None
    assert len(sent_to(server, utc.encode_stamp(utc.StampPacket(1, 2, 3, 4), False, size=300))) == 300


def test_the_reflector_marks_a_tlv_it_does_not_know(reflector):
    server = reflector()
    reply = sent_to(server, utc.encode_stamp(utc.StampPacket(1, 2, 3, 4, tlvs=((0, 200, b"abcd"),)), False))
    assert utc.decode_stamp(reply, True).tlvs == ((utc.TLV_UNRECOGNIZED, 200, b"abcd"),)


@pytest.mark.skipif(not utc.LINUX, reason="needs Linux: the kernel's transmit stamps (Follow-Up Telemetry)")
def test_a_duplicate_is_answered_but_never_named_by_a_follow_up(reflector):
    """A packet sent again (the network's copy, or a stranger's from the sender's address) gets the
    seq of the first reflection: the Follow-Up that comes next still names the first's send."""
    server = reflector()
    follow_up = ((0, utc.TLV_FOLLOW_UP, bytes(utc.FOLLOW_UP.size)),)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        first = utc.encode_stamp(utc.StampPacket(0, 11, 0, 7, tlvs=follow_up), False)
        replies = []
        for data in (first, first, utc.encode_stamp(utc.StampPacket(1, 12, 0, 7, tlvs=follow_up), False)):
            sock.sendto(data, server.address)
            replies.append(utc.decode_stamp(sock.recv(2048), True))
    original, duplicate, after = replies
    assert original.seq == duplicate.seq == 0 and after.seq == 1  # the duplicate counted once
    seq, sent_at, mode = utc.FOLLOW_UP.unpack_from(after.tlvs[0][2])
    assert (seq, mode) == (0, utc.TIMESTAMP_SW_LOCAL)
    assert original.receive <= sent_at < duplicate.receive  # the first reflection's send, not the copy's


def test_a_packet_of_thousands_of_tlvs_costs_sixteen(reflector):
    server = reflector()
    many = utc.encode_stamp(utc.StampPacket(1, 2, 3, 4, tlvs=((0, 200, b""),) * 15000), False)
    reply = sent_to(server, many)
    assert len(reply) == len(many) == 44 + 4 * 15000  # as large as it came, no larger
    tlvs = utc.decode_stamp(reply, True).tlvs
    assert len(tlvs) == utc.STAMP_TLVS_MOST and all(flags == utc.TLV_UNRECOGNIZED for flags, _, _ in tlvs)


# --- an independent dissector: tshark's TWAMP-Test ---------------------------------------------

def ip_udp(source, target, payload, ttl=64):
    """An IPv4 datagram, its header checksummed, as a capture holds it."""
    udp = struct.pack("!HHHH", source[1], target[1], 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, ttl, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(source[0]), socket.inet_aton(target[0]))
    total = sum(struct.unpack("!10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    return header[:10] + struct.pack("!H", ~(total + (total >> 16)) & 0xFFFF) + header[12:] + udp


def write_pcap(path, datagrams):
    """A classic pcap file of raw IPv4 datagrams (link type 228)."""
    with open(str(path), "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 228))
        for index, datagram in enumerate(datagrams):
            out.write(struct.pack("<IIII", 1_700_000_000 + index, 0, len(datagram), len(datagram)) + datagram)


FIELDS = ["twamp.test.seq_number", "twamp.test.timestamp", "twamp.test.error_estimate.s",
          "twamp.test.error_estimate.scale", "twamp.test.error_estimate.multiplier", "twamp.test.mbz1",
          "twamp.test.receive_timestamp", "twamp.test.sender_seq_number", "twamp.test.sender_timestamp",
          "twamp.test.sender_ttl"]


def test_tshark_reads_every_field_of_both_ends_packets(reflector, relay, capsys, tmp_path):
    require_programs("tshark")
    server = reflector()
    hop = relay(server.address)
    code, summary = measure(capsys, hop.address, "-c", 5, "-i", 0.005, "--no-interleaved")
    assert code == 0
    client, port = ("127.0.0.1", 40000), utc.STAMP_PORT  # a capture's view: the reflector at 862
    datagrams = [ip_udp(client, ("127.0.0.1", port), request) for request in hop.requests]
    datagrams += [ip_udp(("127.0.0.1", port), client, reply, ttl=63) for reply in hop.replies]
    write_pcap(tmp_path / "stamp.pcap", datagrams)
    fields = [arg for field in FIELDS for arg in ("-e", field)]
    out = subprocess.run(["tshark", "-r", str(tmp_path / "stamp.pcap"), "-d", "udp.port==862,twamp.test",
                          "-T", "fields", "-E", "separator=|", *fields], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    rows = [line.split("|") for line in out.stdout.splitlines()]
    assert len(rows) == 10, out.stderr
    for request, row in zip(hop.requests, rows[:5]):
        ours = utc.decode_stamp(request, False)
        assert int(row[0]) == ours.seq and int(row[5]) == ours.ssid
        synchronized, scale, multiplier = (int(value) for value in
                                           (row[2].split(",")[0], row[3].split(",")[0], row[4].split(",")[0]))
        assert ours.error == (synchronized << 15) | scale << 8 | multiplier
    for reply, row in zip(hop.replies, rows[5:]):
        ours = utc.decode_stamp(reply, True)
        assert (int(row[0]), int(row[7]), int(row[9]), int(row[5])) == (
            ours.seq, ours.sender_seq, ours.sender_ttl, ours.ssid)
        sample = next(sample for sample in summary["samples"] if sample["seq"] == ours.sender_seq)
        assert tshark_ns(row[6]) == pytest.approx(sample["t2_ns"], abs=1)  # T2, as our client read it
        assert tshark_ns(row[1]) == pytest.approx(sample["t3_ns"], abs=1)  # T3 (not interleaved: this one)


def tshark_ns(text):
    """An absolute time tshark printed (UTC), as ns since 1970."""
    import datetime
    date, fraction = text.replace(" UTC", "").rsplit(".", 1)
    moment = datetime.datetime.strptime(date, "%b %d, %Y %H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp()) * SECOND_NS + int(fraction.ljust(9, "0")[:9])


# --- an independent implementation: scapy's STAMP layers ---------------------------------------

def test_scapy_builds_a_sender_packet_our_reflector_answers_and_reads_the_reflection(reflector):
    stamp = pytest.importorskip("scapy.contrib.stamp", reason="scapy 2.8's STAMP layers need Python 3.7+")
    server = reflector()
    error = stamp.ErrorEstimate(S=1, Z=0, scale=5, multiplier=135)
    sent = stamp.STAMPSessionSenderTestUnauthenticated(seq=41, err_estimate=error, ssid=777)
    raw = bytes(sent)
    timestamp = struct.unpack_from("!Q", raw, 4)[0]  # scapy's own reading of its clock
    assert len(raw) == 44 and utc.decode_stamp(raw, False) == utc.StampPacket(
        41, timestamp, 0x8000 | 5 << 8 | 135, 777)
    data = sent_to(server, raw)
    reply = stamp.STAMPSessionReflectorTestUnauthenticated(data)
    assert (reply.seq, reply.seq_sender, reply.ssid, reply.mbz1) == (0, 41, 777, 0)
    assert reply.ttl_sender == (64 if utc.LINUX else 0)  # 0: the reflector could not read it
    assert (reply.err_estimate_sender.S, reply.err_estimate_sender.scale,
            reply.err_estimate_sender.multiplier) == (1, 5, 135)
    ours = utc.decode_stamp(data, True)
    assert ours.sender_timestamp == timestamp and 0 < ours.receive <= ours.timestamp  # T2, then T3


class ScapyReflector:
    """A stateful STAMP reflector whose reflections scapy's layers build, from what they parse of
    the sender's packet: T2 and T3 from this machine's clock, a 244 us error estimate, TTL 64.
    It never sees the packets whose seq is in lose (lost on the way there)."""

    def __init__(self, stamp, lose=()):
        self.stamp, self.lose, self.reflected = stamp, set(lose), 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        stamp, ntp = self.stamp, utc.NTP_EPOCH_OFFSET  # scapy's timestamps count seconds from 1900
        while not self.stop.is_set():
            try:
                data, source = self.sock.recvfrom(2048)
            except socket.timeout:
                continue
            received = time.time() + ntp
            sent = stamp.STAMPSessionSenderTestUnauthenticated(data)
            if sent.seq in self.lose:
                continue
            reply = stamp.STAMPSessionReflectorTestUnauthenticated(
                seq=self.reflected, err_estimate=stamp.ErrorEstimate(S=0, Z=0, scale=13, multiplier=0x80),
                ssid=sent.ssid, ts_rx=received, seq_sender=sent.seq, ts_sender=sent.ts,
                err_estimate_sender=sent.err_estimate, ttl_sender=64, ts=time.time() + ntp)
            self.reflected += 1
            self.sock.sendto(bytes(reply)[:len(data)] + bytes(max(0, len(data) - len(reply))), source)


def test_our_sender_measures_a_reflector_that_scapy_builds(capsys):
    stamp = pytest.importorskip("scapy.contrib.stamp", reason="scapy 2.8's STAMP layers need Python 3.7+")
    other = ScapyReflector(stamp, lose={3})
    try:
        code, summary = measure(capsys, other.sock.getsockname(), "-c", 12, "-i", 0.01, "-W", 0.5,
                                "--no-interleaved")
    finally:
        other.stop.set()
        other.thread.join(5)
    assert summary["received"] == 11 and summary["lost"] == 1
    assert (summary["lost_up"], summary["lost_down"]) == (1, 0)  # its own seqs: a stateful reflector
    assert abs(summary["offset_ms"]) <= summary["offset_err_ms"]  # one clock: the truth is 0
    assert summary["ttl"]["received_by_server"] == 64
    server_clock = summary["clock"]["server"]  # 0x80 * 2**13 * 2**-32 s: 2**-12 s, 244.140625 us
    assert server_clock["synchronized"] is False and server_clock["maxerror_ms"] == 0.244141


def test_scapy_reads_our_senders_packets(reflector, relay, capsys):
    stamp = pytest.importorskip("scapy.contrib.stamp", reason="scapy 2.8's STAMP layers need Python 3.7+")
    server = reflector()
    hop = relay(server.address)
    assert measure(capsys, hop.address, "-c", 3, "-i", 0.005)[0] == 0
    for seq, request in enumerate(hop.requests):
        packet = stamp.STAMPSessionSenderTestUnauthenticated(request)
        assert (packet.seq, packet.ssid, packet.mbz) == (seq, utc.decode_stamp(request, False).ssid, 0)
        assert packet.err_estimate.Z == 0 and packet.err_estimate.multiplier >= 1
        follow_up = packet.tlv_objects[0]
        assert (follow_up.type, follow_up.len) == (utc.TLV_FOLLOW_UP, 16)


# --- a mesh that speaks STAMP ------------------------------------------------------------------

def test_a_stamp_mesh_measures_each_pair_and_its_matrix_reads_it(tmp_path):
    ports = free_udp_ports(2)
    peers = tmp_path / "peers"
    peers.write_text("".join("n{} 127.0.0.1:{}\n".format(index, port) for index, port in enumerate(ports)))
    nodes = [subprocess.Popen(cli("mesh", "--stamp", "--peers", peers, "--listen",
                                  "127.0.0.1:{}".format(port), "-c", "100", "-i", "0.02", "-W", "2",
                                  "--json"),
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True) for port in ports]
    for index, node in enumerate(nodes):
        out, err = node.communicate(timeout=60)
        assert "STAMP reflector, stateful" in err
        output = json.loads(out)
        (tmp_path / "n{}.json".format(index)).write_text(out)
        for target in output["targets"]:  # a peer not up yet is not lost: it started a moment later
            assert target["protocol"] == "stamp" and target["received"] > 0  # how many: the starts decide
            # STAMP has no goodbye: a probe in flight as its peer stopped (before refusals) is lost
            assert target["lost"] <= 1 and target["received"] + target["not_up"] + target["lost"] == 100
    matrix = run_cli("matrix", tmp_path / "n0.json", tmp_path / "n1.json", "--json")
    assert len(json.loads(matrix.stdout)["cells"]) == 2


def test_a_stamp_targets_series_say_protocol_stamp(reflector):
    server = reflector()
    prober_spec = utc.RunSpec(targets=(utc.Peer(None, "127.0.0.1", server.address[1]),), count=3,
                              interval=0.005, protocol=utc.STAMP)
    recorders = utc.Measurement(prober_spec).run()
    text = utc.render_client_metrics(recorders)
    assert 'udp_timecheck_replies_total{{target="127.0.0.1:{}",protocol="stamp"}} 3'.format(
        server.address[1]) in text
