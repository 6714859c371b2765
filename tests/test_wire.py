"""The wire format: pure encode/decode functions, and what they refuse."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import udp_timecheck as utc
from conftest import HOSTILE

TEXT = "The time is 2019-05-04 16:20:56.975068"


def test_two_element_request_is_byte_for_byte_the_tutorials():
    # the tutorial sends json.dumps([request_ID, client_time]).encode()
    assert utc.encode_request(491, TEXT) == json.dumps([491, TEXT]).encode()


def test_extended_request_round_trips():
    data = utc.encode_request(2 ** 62 + 5, TEXT, 7, size=300)
    message = utc.decode_message(data)
    assert message.message_id == 2 ** 62 + 5
    assert message.text == TEXT
    assert message.ext["seq"] == 7 and message.ext["size"] == 300
    assert message.mac is None
    # the tutorial's server reads only [0] and [1]
    assert json.loads(data.decode())[:2] == [2 ** 62 + 5, TEXT]


@pytest.mark.parametrize("pad_to", [200, 333, 1500, 65507])
def test_padding_reaches_the_exact_size(pad_to):
    data = utc.encode_request(12345, TEXT, 3, pad_to=pad_to)
    assert len(data) == pad_to
    assert utc.decode_message(data).ext["pad"].strip() == ""


def test_padding_never_shrinks_a_request():
    unpadded = utc.encode_request(12345, TEXT, 3)
    assert utc.encode_request(12345, TEXT, 3, pad_to=10) == unpadded


SERVER_TEXT = b"The time is 2026-01-01 00:00:00.000001"


def test_reply_parts_put_t3_last_and_round_trip():
    head, tail = utc.reply_parts(b"99", SERVER_TEXT, b"4", 1_700_000_000_123_456_789, stamp=b"kernel")
    reply = utc.decode_message(head + b"1700000000123999999" + tail)
    assert reply.message_id == 99
    assert reply.ext == {"seq": 4, "ts": "kernel", "t2": 1_700_000_000_123_456_789,
                         "t3": 1_700_000_000_123_999_999}
    assert list(reply.ext)[-1] == "t3"


def test_two_element_request_gets_the_tutorials_reply_form():
    fields = utc.parse_request(json.dumps([5, TEXT]).encode())
    assert fields[:4] == (b"5", None, 0, False)
    head, tail = utc.reply_parts(fields[0], SERVER_TEXT, fields[1], 1)
    assert tail is None
    assert json.loads(head) == [5, SERVER_TEXT.decode()]
    # the same bytes json.dumps would give, as the tutorial's server sends
    assert head == json.dumps(json.loads(head)).encode()


def test_requested_size_pads_the_reply_but_never_beyond_the_request():
    data = utc.encode_request(99, TEXT, 4, size=1000, pad_to=1000)
    request_id, seq, size, clock = utc.parse_request(data)[:4]
    assert (request_id, seq, size, clock) == (b"99", b"4", 1000, False)
    t2 = 1_700_000_000_123_456_789
    head, tail = utc.reply_parts(request_id, SERVER_TEXT, seq, t2, pad_to=min(size, len(data)))
    assert len(head) + len(str(t2)) + len(tail) == 1000
    with utc.TimeServer("127.0.0.1", 0) as server:  # a request asking for more than it carries
        short = utc.encode_request(99, TEXT, 4, size=1000, pad_to=500)
        assert len(short) == 500 and len(server.respond(short)) <= 500  # gets its own size at most


@pytest.mark.parametrize("data, fields", [
    (b'[491, "The time is 2019-05-04 16:20:56.975068"]', (b"491", None, 0, False)),
    (b'[-7, "x", {"seq": 0, "size": 300, "pad": "   "}, "' + b"a" * 64 + b'"]', (b"-7", b"0", 300, False)),
    (b'  [491 ,"x"]\n', (b"491", None, 0, False)),                  # other spacing: the JSON route
    (b'[491, "caf\\u00e9", {"seq": 3}]', (b"491", b"3", 0, False)),  # an escape: the JSON route
    (b'[491, "x", {"pad": "", "seq": 3}]', (b"491", b"3", 0, False)),  # other key order
    (b'[491, "x", {"size": 300}]', (b"491", None, 0, False)),         # no seq: the tutorial's form
    (b'[491, "x", 7]', (b"491", None, 0, False)),                     # extra elements are ignored
    (b'[18446744073709551615, "x", {"seq": 18446744073709551615}]',
     (b"18446744073709551615", b"18446744073709551615", 0, False)),   # 20 digits: the JSON route
])
def test_request_fields(data, fields):
    assert utc.parse_request(data)[:4] == fields


@pytest.mark.parametrize("data", [b'[18446744073709551616, "x"]', b'[01, "x"]', b'[1, "x", {"seq": -1}]'])
def test_request_fields_refuses_what_decode_refuses(data):
    with pytest.raises(utc.WireError):
        utc.parse_request(data)


def test_real_requests_take_the_quick_route(monkeypatch):
    """The server's speed rests on this: what clients really send never needs the JSON decoder."""
    options = utc.RequestOptions(2 ** 63 - 1, True, True, 1_764_000_000 * 10 ** 9)
    requests = [utc.encode_request(2 ** 63 - 1, TEXT, 999, pad_to=300, key=key, size=size,
                                   ask_clock_state=clock, options=options)
                for key in (None, b"k" * 32) for size in (0, 1400) for clock in (False, True)]
    expected = [utc.parse_request(data) for data in requests + [json.dumps([491, TEXT]).encode()]]
    monkeypatch.setattr(utc, "decode_message", None)  # the JSON route would fail now
    assert [utc.parse_request(data) for data in requests] == expected[:-1]
    assert utc.parse_request(json.dumps([491, TEXT]).encode()) == expected[-1]  # the tutorial's
    assert expected[0].options.exchange == 1_764_000_000 * 10 ** 9 and expected[1].wants_clock_state


def canonical_request(request_id, text, seq, size, pad, keyed):
    """A request as json.dumps lays it out, which the regex route takes when it can."""
    items = [request_id, text]
    if seq is not None:
        ext = {"seq": seq}
        if size:
            ext["size"] = size
        if pad:
            ext["pad"] = " " * pad
        items.append(ext)
        if keyed:
            items.append("f" * 64)
    return json.dumps(items).encode()


SIZES, PADS = st.sampled_from([0, 0, 1, 250, 65507]), st.integers(0, 300)


@settings(max_examples=200, deadline=None)
@given(st.tuples(st.integers(-(2 ** 64) + 1, 2 ** 64 - 1), st.text(max_size=40),
                 st.none() | st.integers(0, 2 ** 64 - 1), SIZES, PADS, st.booleans()))
def test_quick_and_json_routes_agree_on_valid_requests(pieces):
    data = canonical_request(*pieces)
    assert utc.parse_request(data) == utc.parse_request(b" " + data)  # a leading space: the JSON route


@settings(max_examples=150, deadline=None)
@given(st.tuples(st.integers(2 ** 64, 10 ** 20) | st.integers(-(10 ** 20), -(2 ** 64)), st.text(max_size=40),
                 st.none() | st.integers(0, 10 ** 20), SIZES, PADS, st.booleans()))
def test_quick_and_json_routes_both_refuse_an_id_out_of_range(pieces):
    data = canonical_request(*pieces)
    for route in (utc.decode_message, utc.parse_request):
        with pytest.raises(utc.WireError):
            route(data)


@settings(max_examples=150, deadline=None)
@given(st.tuples(st.integers(-(2 ** 63), 2 ** 63), st.text(max_size=40),
                 st.integers(2 ** 64, 10 ** 20) | st.integers(-5, -1), SIZES, PADS, st.booleans()))
def test_quick_and_json_routes_both_refuse_a_seq_out_of_range(pieces):
    data = canonical_request(*pieces)
    for route in (utc.decode_message, utc.parse_request):
        with pytest.raises(utc.WireError):
            route(data)


def canonical_reply(request_id, text, seq, stamp, members, t2, t3, pad, mac):
    """A reply as our server lays it out (reply_parts' order), which the client's regex route takes."""
    ext = {"seq": seq, "ts": stamp}
    ext.update(members)
    ext.update({"t2": t2, "t3": t3})
    if pad:
        ext["pad"] = " " * pad
    return json.dumps([request_id, text, ext] + ([mac] if mac else [])).encode()


NUMBERS = st.integers(0, 2 ** 64 - 1)
MEMBERS = st.fixed_dictionaries({}, optional={"rx": NUMBERS, "xl": st.just(1), "tos": st.integers(0, 255),
                                              "ttl": st.integers(0, 300)})


@settings(max_examples=300, deadline=None)
@given(st.tuples(st.integers(-(2 ** 64) + 1, 2 ** 64 - 1), st.text(max_size=40), NUMBERS,
                 st.sampled_from(["kernel", "user"]), MEMBERS, NUMBERS, NUMBERS, st.integers(0, 40),
                 st.none() | st.just("ab" * 32)))
def test_quick_and_json_routes_agree_on_replies(pieces):
    """A reply read by the regex and the same read as JSON (a leading space): one Message, or one
    refusal (a number out of range)."""
    data = canonical_reply(*pieces)
    try:
        expected = utc.decode_message(b" " + data)
    except utc.WireError:
        with pytest.raises(utc.WireError):
            utc.decode_message(data)
        return
    got = utc.decode_message(data)
    for message in (expected, got):
        message.ext.pop("pad", None)  # the regex route leaves the padding out: nothing reads it
    assert got == expected


def test_real_replies_take_the_quick_route(monkeypatch):
    """What our server sends (with the session's count, an interleaved stamp, the path's marks, a
    key) never needs the JSON decoder on the client."""
    replies = []
    for key in (None, b"k" * 32):
        with utc.TimeServer("127.0.0.1", 0, key=key) as server:
            for seq in range(3):
                options = utc.RequestOptions(77, True, True, None)
                replies.append(server.respond(utc.encode_request(10 + seq, TEXT, seq, pad_to=400, key=key,
                                                                 options=options)))
    monkeypatch.setattr(utc, "_JSON", None)  # the JSON route would fail now
    messages = [utc.decode_message(reply) for reply in replies]
    assert [message.seq for message in messages] == [0, 1, 2] * 2 and all(m.ext["rx"] for m in messages)
    assert messages[3].mac is not None and messages[0].mac is None


@pytest.mark.parametrize("data", HOSTILE.values(), ids=list(HOSTILE))
def test_hostile_datagrams_raise_only_wire_error(data):
    with pytest.raises(utc.WireError):
        utc.decode_message(data)


def test_surrogate_pairs_are_fine():
    message = utc.decode_message(b'[1, "\\ud83d\\ude00 ok"]')
    assert message.text == "\U0001F600 ok"


def test_leading_and_trailing_json_whitespace_is_accepted_as_json_loads_does():
    assert utc.decode_message(b' \n[1, "x"]\r\n').message_id == 1


def test_mac_seal_and_verify():
    key = b"k" * 32
    data = utc.encode_request(77, TEXT, 1, key=key)
    assert data.endswith(b'"]') and utc.decode_message(data).mac == data[-66:-2].decode()
    assert utc.mac_matches(key, utc.REQUEST_LABEL, data)
    assert not utc.mac_matches(b"other key", utc.REQUEST_LABEL, data)
    assert not utc.mac_matches(key, utc.REPLY_LABEL, data)  # a request MAC never passes as a reply's
    tampered = data.replace(b"77", b"78", 1)
    assert not utc.mac_matches(key, utc.REQUEST_LABEL, tampered)
    assert not utc.mac_matches(key, utc.REQUEST_LABEL, data + b" ")


def test_printable_escapes_terminal_controls():
    assert utc.printable("The time is 12:00") == "The time is 12:00"
    shown = utc.printable("evil \x1b[2J\x1b]0;title\x07 \x9b31m \u202e \ud800 done")
    assert "\x1b" not in shown and "\x07" not in shown and "\x9b" not in shown
    assert "\u202e" not in shown and "\ud800" not in shown
    assert "\\x1b[2J" in shown and shown.endswith(" done")


def test_format_address():
    assert utc.format_address("127.0.0.1", 1060) == "127.0.0.1:1060"
    assert utc.format_address("::1", 1060) == "[::1]:1060"
