"""protocol.FrameDecoder and the client frames, against PROTOCOL.md (no event loop, no I/O)."""

from __future__ import annotations

import json

import pytest

from waiting_room.protocol import (
    MAX_FRAME_BYTES,
    PONG_FRAME,
    Dropped,
    Error,
    FrameDecoder,
    Hello,
    Ignored,
    Joined,
    Ping,
    Pong,
    Queue,
    is_valid_room_id,
    join_frame,
    leave_frame,
)


@pytest.fixture
def decode():
    return FrameDecoder().decode


def queue(**fields: object) -> str:
    return json.dumps({"type": "queue", "room": "opd-1", "patients": 5, **fields}, ensure_ascii=False)


# -- every valid server frame of PROTOCOL.md ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"hello","heartbeat":15}', Hello(heartbeat=15.0)),
        ('{"type":"hello","heartbeat":2.5}', Hello(heartbeat=2.5)),
        ('{"type":"hello"}', Hello(heartbeat=15.0)),  # 15 when absent
        ('{"type":"joined","room":"opd-1"}', Joined(room="opd-1")),
        ('{"type":"queue","room":"opd-1","patients":5}', Queue(patients=5, room="opd-1")),
        ('{"type":"queue","patients":5}', Queue(patients=5, room=None)),  # single-room form
        ('{"type":"queue","room":"opd-1","patients":0}', Queue(patients=0, room="opd-1")),
        (
            '{"type":"queue","room":"opd-1","patients":7,"now_serving":"A-17",'
            '"ts":"2024-05-01T10:00:00Z","seq":42}',
            Queue(patients=7, room="opd-1", now_serving="A-17", ts="2024-05-01T10:00:00Z", seq=42),
        ),
        ('{"type":"ping"}', Ping()),
        ('{"type":"pong"}', Pong()),
        (
            '{"type":"error","room":"opd-9","code":"unknown_room","message":"no such room"}',
            Error(room="opd-9", code="unknown_room", message="no such room"),
        ),
        (
            '{"type":"error","room":"opd-9","code":"forbidden","message":"..."}',
            Error(room="opd-9", code="forbidden", message="..."),
        ),
    ],
)
def test_valid_server_frames_decode_to_their_type(decode, text, expected):
    frame = decode(text)
    assert type(frame) is type(expected)
    assert frame == expected


@pytest.mark.parametrize(
    "room",
    ["a", "opd-1", "A", "9lives", "ward_3.east-wing", "x" * 64, "a." + "b" * 62],
)
def test_room_ids_matching_the_pattern_are_accepted(decode, room):
    assert decode(queue(room=room)) == Queue(patients=5, room=room)
    assert is_valid_room_id(room)


def test_largest_plausible_count_is_accepted(decode):
    assert decode(queue(patients=10_000)) == Queue(patients=10_000, room="opd-1")


# -- forward compatibility ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"queue","room":"opd-1","patients":5,"priority":"high","extra":{"a":[1,2]}}',
        '{"type":"ping","sent_at":123}',
        '{"type":"hello","heartbeat":15,"server":"v2","features":["x"]}',
        '{"type":"joined","room":"opd-1","members":3}',
    ],
)
def test_unknown_fields_are_accepted(decode, text):
    frame = decode(text)
    assert not isinstance(frame, (Dropped, Ignored))
    assert type(frame).__name__.lower() == json.loads(text)["type"]


def test_unknown_field_values_do_not_leak_into_the_frame(decode):
    frame = decode('{"type":"queue","room":"opd-1","patients":3,"patients_v2":999}')
    assert frame == Queue(patients=3, room="opd-1")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ('{"type":"announce","text":"hello"}', "announce"),
        ('{"type":"queue_v2","room":"a/b","patients":-1}', "queue_v2"),  # fields of an unknown type are not checked
        ('{"type":"","x":1}', ""),
    ],
)
def test_unknown_type_is_ignored(decode, text, kind):
    frame = decode(text)
    assert isinstance(frame, Ignored)
    assert frame.type == kind


def test_ignored_type_name_is_truncated(decode):
    frame = decode(json.dumps({"type": "z" * 1000}))
    assert isinstance(frame, Ignored)
    assert len(frame.type) <= 32


# -- PROTOCOL.md "Bad input": every case is Dropped --------------------------------------

NOT_JSON = [
    "",
    "hello",
    "{",
    '{"type":"ping"',
    "{'type':'ping'}",
    '{"type":"ping"} trailing',
    '{"type":"queue","room":"opd-1","patients":NaN}',
    "\x00",
]

NOT_OBJECTS = [
    "null",
    "true",
    "42",
    '"queue"',
    "[]",
    '[{"type":"ping"}]',
    "{}",  # an object, but no string type
    '{"type":null}',
    '{"type":5}',
    '{"type":["ping"]}',
    '{"room":"opd-1","patients":5}',
]

BAD_PATIENTS = {
    "negative": -1,
    "very negative": -(10**9),
    "fractional": 5.5,
    "string": "5",
    "empty string": "",
    "boolean true": True,
    "boolean false": False,
    "null": None,
    "list": [5],
    "object": {"n": 5},
    "absurdly large": 10**12,
    "beyond 64 bits": 10**30,
    "huge float": 1e300,
}

BAD_ROOMS = {
    "slash": "opd/1",
    "plus": "opd+1",
    "hash": "opd#1",
    "NUL": "opd\x001",
    "wildcard only": "#",
    "space": "opd 1",
    "empty": "",
    "leading dot": ".hidden",
    "leading dash": "-opd",
    "leading underscore": "_opd",
    "too long": "a" * 65,
    "way too long": "a" * 5000,
    "non-ASCII": "opd-ü",
    "emoji": "opd-🙂",
    "control char": "opd\x1b[31m",
    "leading newline": "\nopd",
    "not a string": 17,
    "list": ["opd-1"],
}


@pytest.mark.parametrize("text", NOT_JSON)
def test_not_json_is_dropped(decode, text):
    assert isinstance(decode(text), Dropped)


@pytest.mark.parametrize("text", NOT_OBJECTS)
def test_not_an_object_with_a_string_type_is_dropped(decode, text):
    assert isinstance(decode(text), Dropped)


@pytest.mark.parametrize("data", [b'{"type":"ping"}', bytearray(b'{"type":"ping"}'), b"", b"\xff\xfe"])
def test_binary_frames_are_dropped(decode, data):
    assert isinstance(decode(data), Dropped)


def test_oversized_frame_is_dropped_even_when_otherwise_valid(decode):
    padding = "x" * MAX_FRAME_BYTES
    assert isinstance(decode(queue(padding=padding)), Dropped)
    assert isinstance(decode("{" * (MAX_FRAME_BYTES + 1)), Dropped)


def test_frame_of_exactly_64_kib_is_accepted(decode):
    base = queue(padding="")
    text = queue(padding="x" * (64 * 1024 - len(base)))
    assert len(text.encode()) == 64 * 1024
    assert decode(text) == Queue(patients=5, room="opd-1")


def test_oversized_is_measured_in_bytes_not_characters(decode):
    text = queue(padding="é" * 40_000)  # 40 k characters, 80 k bytes
    assert len(text) < MAX_FRAME_BYTES < len(text.encode())
    assert isinstance(decode(text), Dropped)


@pytest.mark.parametrize("value", BAD_PATIENTS.values(), ids=BAD_PATIENTS.keys())
def test_bad_patients_are_dropped(decode, value):
    assert isinstance(decode(queue(patients=value)), Dropped)


def test_missing_patients_is_dropped(decode):
    assert isinstance(decode('{"type":"queue","room":"opd-1"}'), Dropped)


@pytest.mark.parametrize("room", BAD_ROOMS.values(), ids=BAD_ROOMS.keys())
@pytest.mark.parametrize("kind", ["queue", "joined", "error"])
def test_bad_room_ids_are_dropped(decode, room, kind):
    fields: dict[str, object] = {"type": kind, "room": room}
    if kind == "queue":
        fields["patients"] = 5
    if kind == "error":
        fields["code"] = "unknown_room"
    assert isinstance(decode(json.dumps(fields)), Dropped)
    if isinstance(room, str):
        assert not is_valid_room_id(room)


def test_room_id_with_trailing_newline_is_dropped(decode):
    assert not is_valid_room_id("opd-1\n")  # the helper (fullmatch) is right...
    assert isinstance(decode(queue(room="opd-1\n")), Dropped)  # ...the decoder is not


@pytest.mark.parametrize(
    "text",
    [
        queue(now_serving="A" * 65),  # longer than a ticket
        queue(now_serving=17),
        queue(seq=-1),
        queue(seq=1.5),
        queue(seq="7"),
        queue(seq=True),
        queue(ts=12345),
        '{"type":"hello","heartbeat":0}',
        '{"type":"hello","heartbeat":-15}',
        '{"type":"hello","heartbeat":"15"}',
        '{"type":"hello","heartbeat":1e9}',
        '{"type":"joined"}',
        '{"type":"error","room":"opd-9","message":"' + "m" * 600 + '"}',
    ],
)
def test_other_invalid_fields_of_known_types_are_dropped(decode, text):
    assert isinstance(decode(text), Dropped)


def test_drop_reason_never_contains_frame_content(decode):
    secret = "SECRETVALUE"
    for text in (
        queue(room=f"{secret}/x"),
        queue(patients=f"{secret}"),
        queue(now_serving=secret * 10),
        f'{{"type":"queue","room":"{secret}',
    ):
        frame = decode(text)
        assert isinstance(frame, Dropped)
        assert secret not in frame.reason


@pytest.mark.parametrize(
    "template",
    [
        '{"type":"queue","room":"opd-1","patients":5,"x":%s}',
        '{"type":"future","x":%s}',
        '{"x":%s,"type":"ping"}',
    ],
)
def test_deeply_nested_frame_is_dropped_not_raised(decode, template):
    text = template % ("[" * 1000 + "]" * 1000)
    assert len(text.encode()) < MAX_FRAME_BYTES
    assert isinstance(decode(text), (Dropped, Ignored))


def test_deeply_nested_top_level_array_is_dropped(decode):
    assert isinstance(decode("[" * 30_000 + "]" * 30_000), Dropped)


def test_bad_frames_do_not_stop_the_valid_frames_that_follow(decode):
    bad = [*NOT_JSON, *NOT_OBJECTS, *(queue(patients=v) for v in BAD_PATIENTS.values()),
           *(queue(room=r) for r in BAD_ROOMS.values())]
    for i, text in enumerate(bad):
        assert isinstance(decode(text), Dropped), text
        assert decode(queue(patients=i)) == Queue(patients=i, room="opd-1")


def test_a_flood_of_bad_frames_is_all_dropped(decode):
    results = [decode(queue(patients=-n)) for n in range(1, 5001)]
    assert all(isinstance(r, Dropped) for r in results)
    assert decode('{"type":"ping"}') == Ping()


# -- client frames -----------------------------------------------------------------------


def test_join_frame_is_valid_json():
    assert json.loads(join_frame("opd-1")) == {"type": "join", "room": "opd-1"}


def test_leave_frame_is_valid_json():
    assert json.loads(leave_frame("opd-1")) == {"type": "leave", "room": "opd-1"}


def test_pong_frame_is_valid_json():
    assert json.loads(PONG_FRAME) == {"type": "pong"}


@pytest.mark.parametrize("room", ['a"b', "a\\b", "a\nb", "ü"])
def test_client_frames_escape_their_room(room):
    assert json.loads(join_frame(room))["room"] == room
    assert json.loads(leave_frame(room))["room"] == room


def test_client_frames_are_single_compact_lines():
    for text in (join_frame("opd-1"), leave_frame("opd-1"), PONG_FRAME):
        assert "\n" not in text
        assert len(text.encode()) < 100
