"""snapshot.SnapshotDecoder and snapshot_url, against docs/protocol.md (no event loop, no I/O)."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlsplit

import pytest

from waiting_room.protocol import Dropped
from waiting_room.snapshot import (
    DEFAULT_POLL,
    MAX_POLL,
    MAX_SNAPSHOT_BYTES,
    MIN_POLL,
    RoomRefused,
    RoomSnapshot,
    Snapshot,
    SnapshotDecoder,
    snapshot_url,
)

ASKED = ("opd-1", "lab")


@pytest.fixture
def decode():
    decoder = SnapshotDecoder()
    return lambda body, requested=ASKED: decoder.decode(body, requested)


def body(*entries: object, **top: object) -> bytes:
    return json.dumps({"rooms": list(entries), **top}, ensure_ascii=False).encode()


def entry(room: str = "opd-1", **fields: object) -> dict[str, object]:
    return {"room": room, "patients": 5, **fields}


# -- valid answers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "rooms", "poll"),
    [
        pytest.param(
            b'{"rooms":[{"room":"opd-1","patients":5,"now_serving":"A-17","ts":"2026-11-25T19:43:20.472Z",'
            b'"seq":118},{"room":"lab","error":"forbidden"}],"poll":5}',
            {"opd-1": RoomSnapshot("opd-1", 5, "A-17", "2026-11-25T19:43:20.472Z", 118),
             "lab": RoomRefused("lab", "forbidden")},
            5.0,
            id="the documented example",
        ),
        pytest.param(
            body(entry(), entry("lab", patients=0)),
            {"opd-1": RoomSnapshot("opd-1", 5), "lab": RoomSnapshot("lab", 0)},
            DEFAULT_POLL,
            id="only the required fields, poll absent",
        ),
        pytest.param(
            body(entry("lab", patients=2), entry()),
            {"opd-1": RoomSnapshot("opd-1", 5), "lab": RoomSnapshot("lab", 2)},
            DEFAULT_POLL,
            id="any order in the answer",
        ),
        pytest.param(
            body(entry(), {"room": "lab", "error": "unknown_room", "message": "no such room"}),
            {"opd-1": RoomSnapshot("opd-1", 5), "lab": RoomRefused("lab", "unknown_room")},
            DEFAULT_POLL,
            id="unknown_room entry",
        ),
        pytest.param(
            body(entry()),
            {"opd-1": RoomSnapshot("opd-1", 5), "lab": RoomRefused("lab", "unknown_room")},
            DEFAULT_POLL,
            id="a requested room missing from the answer is unknown_room",
        ),
        pytest.param(
            body(),
            {"opd-1": RoomRefused("opd-1", "unknown_room"), "lab": RoomRefused("lab", "unknown_room")},
            DEFAULT_POLL,
            id="empty list",
        ),
        pytest.param(
            body(entry(error=None, future="x", nested={"a": [1]}), {"room": "lab", "error": "gone"}),
            {"opd-1": RoomSnapshot("opd-1", 5), "lab": RoomRefused("lab", "error")},
            DEFAULT_POLL,
            id="unknown fields and codes: forward compatible",
        ),
        pytest.param(
            body(entry(), entry("lab"), poll=30, server="v2"),
            {"opd-1": RoomSnapshot("opd-1", 5), "lab": RoomSnapshot("lab", 5)},
            30.0,
            id="poll and unknown top-level fields",
        ),
        pytest.param(
            body(entry(), entry("lab"), poll=None),
            {"opd-1": RoomSnapshot("opd-1", 5), "lab": RoomSnapshot("lab", 5)},
            DEFAULT_POLL,
            id="poll null is absent",
        ),
    ],
)
def test_valid_answers(decode, data, rooms, poll):
    result = decode(data)
    assert result == Snapshot(rooms, poll)
    assert list(result.rooms) == list(ASKED)  # in the order asked


def test_str_body_and_one_requested_room(decode):
    assert decode(body(entry()).decode(), ["opd-1"]) == Snapshot({"opd-1": RoomSnapshot("opd-1", 5)})


def test_repeated_requested_rooms_count_once(decode):
    assert list(decode(body(entry()), ["opd-1", "opd-1"]).rooms) == ["opd-1"]


@pytest.mark.parametrize(
    ("poll", "expected"),
    [(5, 5.0), (2.5, 2.5), (MIN_POLL / 2, MIN_POLL), (10**6, MAX_POLL), (MAX_POLL, MAX_POLL)],
)
def test_poll_is_kept_within_sane_bounds(decode, poll, expected):
    result = decode(body(entry(), entry("lab"), poll=poll))
    assert (result.poll, result.dropped) == (expected, ())


@pytest.mark.parametrize("poll", [0, -5, "5", True, [5], {"s": 5}, "fast"])
def test_bad_poll_falls_back_to_the_default_and_is_counted(decode, poll):
    result = decode(body(entry(), entry("lab"), poll=poll))
    assert isinstance(result, Snapshot)
    assert result.poll == DEFAULT_POLL
    assert len(result.dropped) == 1 and "poll" in result.dropped[0]
    assert result.rooms["opd-1"] == RoomSnapshot("opd-1", 5)  # the rooms are still good


def test_poll_beyond_a_double_is_bad(decode):
    result = decode(b'{"rooms":[],"poll":1e400}')
    assert result.poll == DEFAULT_POLL and len(result.dropped) == 1


# -- the whole body is bad input ----------------------------------------------------------

BAD_BODIES = {
    "empty": b"",
    "not JSON": b"<html>proxy error</html>",
    "truncated": b'{"rooms":[{"room":"opd-1","patients":5}',
    "trailing junk": body(entry()) + b" x",
    "not UTF-8": b'{"rooms":[],"x":"\xff"}',
    "NaN": b'{"rooms":[{"room":"opd-1","patients":NaN}]}',
    "null": b"null",
    "a list": b'[{"room":"opd-1","patients":5}]',
    "a number": b"5",
    "a string": b'"rooms"',
    "no rooms": b'{"poll":5}',
    "rooms null": b'{"rooms":null}',
    "rooms an object": b'{"rooms":{"opd-1":{"patients":5}}}',
    "rooms a string": b'{"rooms":"opd-1"}',
    "deeply nested": b'{"rooms":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "a queue frame": b'{"type":"queue","room":"opd-1","patients":5}',
}


@pytest.mark.parametrize("data", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_bodies_are_dropped(decode, data):
    result = decode(data)
    assert isinstance(result, Dropped)
    assert result.reason


def test_oversized_body_is_dropped_even_when_otherwise_valid(decode):
    padding = "x" * MAX_SNAPSHOT_BYTES
    assert isinstance(decode(body(entry(), pad=padding)), Dropped)
    assert isinstance(decode(body(entry(), pad=padding).decode()), Dropped)


def test_body_of_exactly_1_mib_is_accepted(decode):
    base = body(entry(), pad="")
    data = body(entry(), pad="x" * (MAX_SNAPSHOT_BYTES - len(base)))
    assert len(data) == MAX_SNAPSHOT_BYTES
    assert decode(data).rooms["opd-1"] == RoomSnapshot("opd-1", 5)


def test_oversized_is_measured_in_bytes_not_characters(decode):
    text = body(entry(), pad="é" * (MAX_SNAPSHOT_BYTES // 2 + 1)).decode()
    assert len(text) < MAX_SNAPSHOT_BYTES < len(text.encode())
    assert isinstance(decode(text), Dropped)


# -- bad entries: dropped one by one, the good ones kept -----------------------------------

BAD_ENTRIES = {
    "negative": entry(patients=-1),
    "fractional": entry(patients=5.5),
    "a string count": entry(patients="5"),
    "a boolean count": entry(patients=True),
    "null count": entry(patients=None),
    "absurdly large": entry(patients=10**12),
    "beyond 64 bits": entry(patients=10**30),
    "no count": {"room": "opd-1"},
    "now_serving too long": entry(now_serving="A" * 65),
    "now_serving a number": entry(now_serving=17),
    "ts a number": entry(ts=12345),
    "seq negative": entry(seq=-1),
    "seq fractional": entry(seq=1.5),
    "seq a string": entry(seq="7"),
    "error not a string": {"room": "opd-1", "error": 403},
    "error too long": {"room": "opd-1", "error": "e" * 65},
}


@pytest.mark.parametrize("bad", BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
def test_a_bad_entry_of_a_requested_room_is_dropped_and_its_room_left_alone(decode, bad):
    result = decode(body(bad, entry("lab", patients=2)))
    assert isinstance(result, Snapshot)
    assert len(result.dropped) == 1
    # Bad input is never a state nor a refusal: no news for opd-1, lab is kept.
    assert result.rooms == {"lab": RoomSnapshot("lab", 2)}
    assert result.unreadable == ("opd-1",)


BAD_ROOMS = {
    "slash": "opd/1",
    "plus": "opd+1",
    "hash": "#",
    "NUL": "opd\x001",
    "empty": "",
    "leading dot": ".hidden",
    "too long": "a" * 65,
    "non-ASCII": "opd-ü",
    "trailing newline": "opd-1\n",
    "not a string": 17,
    "null": None,
}


@pytest.mark.parametrize("room", BAD_ROOMS.values(), ids=BAD_ROOMS.keys())
@pytest.mark.parametrize("kind", ["state", "error"])
def test_bad_room_ids_are_dropped(decode, room, kind):
    bad = {"room": room, "patients": 5} if kind == "state" else {"room": room, "error": "forbidden"}
    result = decode(body(bad, entry()))
    assert len(result.dropped) == 1
    assert result.rooms == {"opd-1": RoomSnapshot("opd-1", 5), "lab": RoomRefused("lab", "unknown_room")}
    assert result.unreadable == ()


@pytest.mark.parametrize(
    "data",
    [
        b'{"rooms":[{"room":"opd-1","patients":5,"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}]}",
        b'{"rooms":[' + b"[" * 50_000 + b"]" * 50_000 + b"]}",
        b'{"rooms":[],"poll":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    ],
    ids=["inside an entry", "as an entry", "as the poll"],
)
def test_deep_nesting_is_dropped_not_raised(decode, data):
    assert len(data) < MAX_SNAPSHOT_BYTES
    result = decode(data)
    assert isinstance(result, Dropped) or result.dropped


@pytest.mark.parametrize(
    "bad",
    [None, 5, "opd-1", [entry()], True],
    ids=["null", "number", "string", "list", "boolean"],
)
def test_entries_that_are_not_objects_are_dropped(decode, bad):
    result = decode(body(bad, entry(), entry("lab")))
    assert len(result.dropped) == 1
    assert set(result.rooms) == set(ASKED)


def test_entries_of_rooms_not_requested_are_dropped(decode):
    result = decode(body(entry(), entry("lab"), entry("xray"), {"room": "ward-9", "error": "forbidden"}))
    assert len(result.dropped) == 2
    assert set(result.rooms) == set(ASKED)


def test_the_first_good_entry_of_a_room_wins(decode):
    result = decode(body(entry(patients=1), entry(patients=2), {"room": "opd-1", "error": "forbidden"}))
    assert result.rooms["opd-1"] == RoomSnapshot("opd-1", 1)
    assert len(result.dropped) == 2


def test_a_bad_entry_then_a_good_one_for_the_same_room(decode):
    result = decode(body(entry(patients=-1), entry(patients=4)))
    assert result.rooms["opd-1"] == RoomSnapshot("opd-1", 4)
    assert len(result.dropped) == 1 and result.unreadable == ()


def test_every_bad_part_is_counted_and_the_good_ones_kept(decode):
    bads = [*BAD_ENTRIES.values(), *({"room": r, "patients": 1} for r in BAD_ROOMS.values())]
    result = decode(body(*bads, entry("lab", patients=3), poll="x"))
    assert len(result.dropped) == len(bads) + 1  # and the poll
    assert result.rooms == {"lab": RoomSnapshot("lab", 3)}


def test_reasons_never_contain_content(decode):
    secret = "SECRETVALUE"
    for data in (
        body(entry(room=f"{secret}/x")),
        body(entry(patients=secret)),
        body(entry(now_serving=secret * 10)),
        body({"room": "opd-1", "error": secret * 10}),
        body(entry(), poll=secret),
        body(secret),
        json.dumps({"rooms": secret}).encode(),
        f'{{"rooms":[{{"room":"{secret}'.encode(),
    ):
        result = decode(data)
        reasons = [result.reason] if isinstance(result, Dropped) else list(result.dropped)
        assert reasons, data
        assert all(secret not in reason for reason in reasons)


# -- the request URL -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "rooms", "token", "expected"),
    [
        ("https://h/api/waiting-room/rooms", ["opd-1", "lab"], None,
         "https://h/api/waiting-room/rooms?room=opd-1&room=lab"),
        ("https://h/api/waiting-room/rooms", ["opd-1"], "s3cr+t/=",
         "https://h/api/waiting-room/rooms?room=opd-1&token=s3cr%2Bt%2F%3D"),
        ("https://h/rooms?site=a&v=", ["lab"], None, "https://h/rooms?site=a&v=&room=lab"),
        ("https://h/rooms?site=a&token=old&room=x", ["lab"], "new", "https://h/rooms?site=a&room=lab&token=new"),
        ("https://h/rooms?token=static", ["lab"], None, "https://h/rooms?token=static&room=lab"),
        ("http://h:8765/api/waiting-room/rooms#frag", ["a", "b", "a"], None,
         "http://h:8765/api/waiting-room/rooms?room=a&room=b"),
        ("https://user@h/rooms", [], None, "https://user@h/rooms"),
    ],
)
def test_snapshot_url(url, rooms, token, expected):
    assert snapshot_url(url, rooms, token) == expected


def test_snapshot_url_round_trips_every_room_id():
    rooms = ["opd-1", "ward_3.east-wing", "x" * 64]
    query = parse_qsl(urlsplit(snapshot_url("https://h/r?keep=1", rooms, token="t")).query)
    assert query == [("keep", "1"), *(("room", r) for r in rooms), ("token", "t")]
