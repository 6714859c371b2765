"""The TimeServer in-process: serving, stopping, bad input, logging, limits."""

import json
import random
import socket
import threading
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import udp_timecheck as utc
from conftest import HOSTILE, FakeClock, ask, ipv6_loopback_available, needs_linux, request

MAX_SENDABLE = 65507


def test_serves_on_port_zero_and_stops_from_another_thread():
    server = utc.TimeServer("127.0.0.1", 0, log=None)
    assert server.address[1] != 0
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    reply = ask(server.address, request(7))
    assert json.loads(reply)[0] == 7
    server.shutdown()  # from this thread, while serve_forever runs in the other
    thread.join(timeout=10)
    assert not thread.is_alive()
    server.close()
    assert server.stats.served == 1


def test_context_manager_shuts_down_and_closes():
    with utc.TimeServer("127.0.0.1", 0) as server:
        server.start()
        assert ask(server.address, request(8)) is not None
    assert server.socket.fileno() == -1
    assert not server.thread.is_alive()


def test_wildcard_server_stops_too():
    with utc.TimeServer("0.0.0.0", 0) as server:
        server.start()
        assert ask(("127.0.0.1", server.address[1]), request(9)) is not None
    assert not server.thread.is_alive()


def test_tutorial_request_gets_tutorial_reply_and_log_line(start_server):
    server = start_server()
    data = json.dumps([491, "The time is 2019-05-04 16:20:56.975068"]).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        client_port = sock.getsockname()[1]
        sock.settimeout(10)
        sock.sendto(data, server.address)
        reply = json.loads(sock.recv(65535))
    assert reply[0] == 491 and reply[1].startswith("The time is ") and len(reply) == 2
    server.shutdown()  # joins the loop: it logs and counts after sending
    assert server.logs == ["127.0.0.1:{} Request ID: 491. Client request, The time is 2019-05-04 "
                           "16:20:56.975068".format(client_port)]


def test_extended_request_gets_server_timestamps_from_its_clock(start_server):
    clock = FakeClock()
    server = start_server(wall_clock=clock, timestamps=utc.USER)
    reply = utc.decode_message(ask(server.address, request(5, seq=3, pad_to=200)))
    assert reply.message_id == 5
    assert reply.ext == {"seq": 3, "ts": "user", "t2": clock.now_ns, "t3": clock.now_ns}
    assert reply.text.startswith("The time is 2025-11-2")  # the fake clock's date, local time


@needs_linux("kernel receive stamps (SO_TIMESTAMPNS)")
def test_kernel_receive_stamp_is_carried_over_to_the_servers_clock(start_server):
    clock = FakeClock()  # stopped: any T2 before it is the kernel's stamp, aged on the real clock
    server = start_server(wall_clock=clock)
    assert server.timestamps == utc.KERNEL
    reply = utc.decode_message(ask(server.address, request(5, seq=3, pad_to=200)))
    assert reply.ext["ts"] == "kernel" and reply.ext["t3"] == clock.now_ns
    assert 0 < reply.ext["t3"] - reply.ext["t2"] < utc.NS_PER_S
    assert server.stats.user_stamps == 0


def test_hostile_datagrams_are_counted_and_serving_goes_on(start_server):
    server = start_server()
    sendable = [data for data in HOSTILE.values() if len(data) <= MAX_SENDABLE]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.connect(server.address)
        for data in sendable:
            sock.send(data)
        sock.send(request(1234, seq=0, pad_to=200))
        # the server answers in order: the valid reply comes first only if nothing else was answered
        assert utc.decode_message(sock.recv(65535)).message_id == 1234
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(65535)
    server.shutdown()
    assert server.stats.malformed == len(sendable)
    assert server.stats.served == 1
    assert all("Traceback" not in line for line in server.logs)


def test_reply_is_never_larger_than_its_request():
    with utc.TimeServer("127.0.0.1", 0) as server:
        # the tutorial's form, with a text too short for the server's time
        assert server.respond(b'[1, "x"]') is None
        assert server.stats.too_short == 1
        # our form without padding: the timestamps would not fit
        assert server.respond(request(1, seq=0)) is None
        assert server.stats.too_short == 2
        padded = request(1, seq=0, pad_to=150)
        assert len(server.respond(padded)) <= len(padded)


def test_size_asks_for_a_reply_of_the_same_size():
    with utc.TimeServer("127.0.0.1", 0) as server:
        data = request(1, seq=0, size=1200, pad_to=1200)
        assert len(server.respond(data)) == 1200


def test_faulty_server_lies_with_the_given_probability():
    draws = iter([0.1, 0.9])
    with utc.TimeServer("127.0.0.1", 0, faulty=0.5, rng=lambda: next(draws)) as server:
        assert json.loads(server.respond(request(41)))[0] == 42  # 0.1 < 0.5: a lie
        assert json.loads(server.respond(request(41)))[0] == 41  # 0.9: the truth


def test_log_is_limited_to_ten_lines_a_second(start_server):
    clock = FakeClock()
    server = start_server(wall_clock=clock)
    for request_id in range(25):
        assert ask(server.address, request(request_id)) is not None
    clock.advance(1)
    assert ask(server.address, request(99)) is not None
    server.shutdown()
    shown = [line.split(" ", 1)[1] for line in server.logs]  # after the client's address
    assert shown[:10] == ["Request ID: {}. Client request, The time is 2019-05-04 "
                          "16:20:56.975068".format(i) for i in range(10)]
    assert server.logs[10] == "... 15 more requests not shown"
    assert shown[11:] == ["Request ID: 99. Client request, The time is 2019-05-04 16:20:56.975068"]
    assert server.stats.not_logged == 15 and server.stats.served == 26


def test_verbose_logs_every_request(start_server):
    clock = FakeClock()
    server = start_server(wall_clock=clock, log_limit=None)
    for request_id in range(15):
        assert ask(server.address, request(request_id)) is not None
    server.shutdown()
    assert len(server.logs) == 15


def test_control_characters_from_the_network_are_escaped_in_the_log(start_server):
    server = start_server()
    text = "The time is \x1b[2J\x1b]0;pwned\x07 now\r\n"
    assert ask(server.address, utc.encode_request(3, text, 0, pad_to=200)) is not None
    server.shutdown()
    (line,) = server.logs
    assert "\x1b" not in line and "\x07" not in line and "\r" not in line and "\n" not in line
    assert line.split(" ", 1)[1] == ("Request ID: 3. Client request, The time is \\x1b[2J\\x1b]0;pwned\\x07 "
                                     "now\\r\\n")


def test_long_text_is_answered_and_shortened_in_the_log(start_server):
    server = start_server()
    data = utc.encode_request(4, "x" * 60000, 0)
    assert ask(server.address, data) is not None
    server.shutdown()
    (line,) = server.logs
    assert len(line.encode()) < 320 and line.endswith("... (60000 characters in all)")


def test_bind_to_an_address_not_on_this_machine_suggests_all_interfaces():
    with pytest.raises(utc.TimecheckError) as caught:
        utc.TimeServer("192.0.2.1", 0)  # TEST-NET-1: never a local address
    assert caught.value.exit_code == 2
    assert "0.0.0.0" in str(caught.value)


@pytest.mark.skipif(not ipv6_loopback_available(), reason="this machine has no ::1")
def test_ipv6_loopback(start_server):
    server = start_server(host="::1")
    assert server.socket.family == socket.AF_INET6
    reply = utc.decode_message(ask(server.address, request(6, seq=0, pad_to=200)))
    assert reply.message_id == 6 and reply.ext["t2"] > 0


def test_rate_limiter_buckets():
    limiter = utc.RateLimiter(rate=5)
    now = 10 * utc.NS_PER_S
    assert [limiter.allow("a", now) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("b", now)  # another source has its own bucket
    assert limiter.allow("a", now + utc.NS_PER_S // 5)  # one token back after 1/5 s
    assert not limiter.allow("a", now + utc.NS_PER_S // 5)
    assert limiter.allow("a", now - utc.NS_PER_S) is False  # a clock stepped back refills nothing


def test_rate_limiter_table_is_bounded():
    limiter = utc.RateLimiter(rate=1, max_entries=100)
    for index in range(10000):
        limiter.allow("10.0.{}.{}".format(index // 256, index % 256), index)
    assert len(limiter) == 100


def test_server_max_rate_drops_and_counts():
    clock = FakeClock()
    with utc.TimeServer("127.0.0.1", 0, max_rate=3, wall_clock=clock) as server:
        answers = [server.respond(request(10 * i), ("127.0.0.1", 5000)) for i in range(5)]
        assert [answer is not None for answer in answers] == [True] * 3 + [False] * 2
        assert server.respond(request(9), ("127.0.0.2", 5000)) is not None
        clock.advance(1)
        assert server.respond(request(10), ("127.0.0.1", 5000)) is not None
    assert server.stats.rate_limited == 2 and server.stats.served == 0  # respond() sends nothing


@pytest.fixture(scope="module")
def idle_server():
    with utc.TimeServer("127.0.0.1", 0) as server:
        yield server


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_any_bytes_never_raise_and_never_amplify(idle_server, data):
    reply = idle_server.respond(data)
    assert reply is None or len(reply) <= len(data)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children,
                                                                        max_size=4),
    max_leaves=12)
EXTENSIONS = st.fixed_dictionaries({}, optional={
    "seq": st.integers(min_value=-5, max_value=2 ** 65), "size": st.integers(min_value=-5, max_value=70000),
    "pad": st.text(max_size=300) | st.integers(), "t2": JSON_VALUES})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=-2 ** 70, max_value=2 ** 70) | JSON_VALUES, st.text(max_size=80) | JSON_VALUES,
       st.lists(EXTENSIONS | JSON_VALUES, max_size=3))
def test_any_json_request_never_raises_and_never_amplifies(idle_server, request_id, text, extra):
    data = json.dumps([request_id, text] + extra).encode("utf-8", "surrogatepass")
    reply = idle_server.respond(data)
    assert reply is None or len(reply) <= len(data)


ANSWERABLE_EXTENSIONS = st.fixed_dictionaries(
    {"pad": st.just(" " * 300)},  # room for any reply
    optional={"seq": st.integers(0, 2 ** 64 - 1), "size": st.integers(0, 600),
              "sid": st.integers(0, 2 ** 64 - 1), "xl": st.integers(0, 1), "pi": st.integers(0, 1)})


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=-2 ** 64 + 1, max_value=2 ** 64 - 1), st.text(max_size=80),
       ANSWERABLE_EXTENSIONS)
def test_any_well_formed_request_is_answered_with_its_id_and_no_larger(request_id, text, ext):
    data = json.dumps([request_id, text, ext]).encode("utf-8", "surrogatepass")
    with utc.TimeServer("127.0.0.1", 0) as server:  # a fresh one: no loop guard remembers the last id
        reply = server.respond(data)
    assert reply is not None and len(reply) <= len(data)
    answer = utc.decode_message(reply)
    assert answer.message_id == request_id and answer.seq == ext.get("seq")


def _fuzz(rng):
    valid = request(rng.getrandbits(63), seq=rng.randrange(1000), pad_to=200)
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 400)))
    if kind == 1:  # a valid request with a few bytes flipped
        mutated = bytearray(valid)
        for _ in range(rng.randrange(1, 5)):
            mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
        return bytes(mutated)
    if kind == 2:
        return valid[:rng.randrange(len(valid))]
    return valid


def test_fuzz_flood_leaves_the_server_answering_with_flat_memory_and_a_short_log(start_server):
    clock = FakeClock()  # every request in one second: the log limit must hold
    server = start_server(wall_clock=clock)
    rng = random.Random(20261125)
    datagrams = [_fuzz(rng) for _ in range(3000)]

    def flood_then_confirm():
        for start in range(0, len(datagrams), 100):  # a new source port every 100 datagrams
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for data in datagrams[start:start + 100]:
                    sock.sendto(data, server.address)
        for attempt in range(50):  # the flood may have filled the socket buffer: retry, bounded
            if ask(server.address, request(attempt, seq=0, pad_to=200), timeout=0.5) is not None:
                return True
        return False

    tracemalloc.start()
    try:
        assert flood_then_confirm()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            assert flood_then_confirm()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    server.shutdown()
    assert after - before < 256 * 1024
    stats = server.stats
    assert stats.served > 0 and stats.malformed > 0
    # one fake second: ten request lines, then at shutdown one line for all the rest
    assert len(server.logs) == utc.LOG_LINES_PER_SECOND + 1
    assert server.logs[-1] == "... {} more requests not shown".format(stats.served - utc.LOG_LINES_PER_SECOND)
    assert stats.served + stats.too_short + stats.malformed <= 4 * len(datagrams) + 200
