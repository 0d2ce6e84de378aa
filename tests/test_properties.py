"""Property-based tests (hypothesis) of the pure modules: whatever comes in, nothing but the
documented error goes out, and never an invalid room, count or topic.

- protocol.FrameDecoder: arbitrary text, bytes, JSON values and near-valid frames.
- config.parse_config / load_config: arbitrary values at known keys, YAML-ish documents.
- discovery and the MQTT topics: built from any accepted base topic, prefix, client id, room.
- display.render: pages, error pages and push frames for hostile names, labels, tickets.

Every test is derandomized (the same examples on every run, no example database) with a
bounded number of examples, so CI is deterministic and the file runs in a few seconds.
"""

from __future__ import annotations

import copy
import functools
import html
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, reject, settings
from hypothesis import strategies as st

from waiting_room.config import (
    BackoffConfig,
    Config,
    ConfigError,
    DisplayConfig,
    MqttConfig,
    RoomConfig,
    UpstreamConfig,
    load_config,
    parse_config,
)
from waiting_room.discovery import Discovery, safe_id
from waiting_room.display.render import (
    PageOptions,
    heartbeat_frame,
    hello_frame,
    load_assets,
    page_config,
    render_message,
    render_page,
    room_payload,
    state_frame,
)
from waiting_room.model import LinkState, LinkStatus, RoomState
from waiting_room.mqtt import state_payload
from waiting_room.protocol import (
    KNOWN_TYPES,
    MAX_FRAME_BYTES,
    MAX_PATIENTS,
    Dropped,
    Error,
    FrameDecoder,
    Hello,
    Ignored,
    Joined,
    Ping,
    Pong,
    Queue,
)
from waiting_room.store import Batch
from waiting_room.upstream import parse_ts


def props(examples: int) -> settings:
    """Deterministic: derandomized, no example database, no per-example deadline."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# PROTOCOL.md's pattern, written out again here rather than imported: "$" as in the document,
# matched with fullmatch so that a trailing newline does not slip through.
ROOM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def valid_room(room: object) -> bool:
    return isinstance(room, str) and ROOM_RE.fullmatch(room) is not None


def valid_topic(topic: str) -> bool:
    """A topic we may publish to: no wildcard, no NUL, no empty level."""
    return bool(topic) and not re.search(r"[+#\x00]", topic) and all(topic.split("/"))


room_ids = st.from_regex(ROOM_RE, fullmatch=True)

# Strings a hostile server or a careless operator may send: separators and wildcards of MQTT,
# markup, control characters, other scripts, the edges of the length limits.
HOSTILE = [
    "", " ", "/", "+", "#", "\x00", "a/b", "a+b", "opd#1", "opd-1\n", "opd\x001", "-opd", ".", "..",
    "<script>alert(1)</script>", "</script>", '"><img src=x onerror=alert(1)>', "'", '"', "</",
    "{{config}}", "&amp;", "\u202eevil", "বহির্বিভাগ ১", "x" * 64, "x" * 65, "x" * 513, "x" * 70_000,
    "\ud800", "\udfff\ud800",
]
hostile_text = st.sampled_from(HOSTILE)
texts = st.one_of(hostile_text, st.text(max_size=80), room_ids)
numbers = st.one_of(
    st.integers(-10, MAX_PATIENTS + 10),
    st.integers(),
    st.sampled_from([-1, 0, MAX_PATIENTS, MAX_PATIENTS + 1, 2**53, 2**53 + 1, 2**63, 10**400]),
    st.floats(),  # nan and infinity too: json.dumps writes them as NaN / Infinity
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)

# What a well-behaved server may add in fields this client does not know.
plain_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=20)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


# -- protocol: the frame decoder ------------------------------------------------------------

FIELDS = ["type", "room", "patients", "now_serving", "ts", "seq", "heartbeat", "code", "message", "token"]
TYPES = st.one_of(st.sampled_from(sorted(KNOWN_TYPES) + ["join", "leave", "QUEUE", "queue "]), texts)
GOOD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "type": TYPES,
    "room": room_ids,
    "patients": st.integers(0, MAX_PATIENTS),
    "now_serving": st.text(max_size=64),
    "ts": st.one_of(st.just("2026-11-25T19:43:20.472Z"), st.text(max_size=64)),
    "seq": st.integers(0, 2**53),
    "heartbeat": st.floats(0.001, 3600),
    "code": st.sampled_from(["unknown_room", "forbidden", "error"]),
    "message": st.text(max_size=100),
}


def encode_object(pairs: list[tuple[str, Any]], ensure_ascii: bool) -> str:
    """A JSON object written by hand: the same key may come twice, as a hostile server may send."""
    return "{" + ",".join(
        f"{json.dumps(k, ensure_ascii=ensure_ascii)}:{json.dumps(v, ensure_ascii=ensure_ascii)}" for k, v in pairs
    ) + "}"


@st.composite
def near_valid_frames(draw: st.DrawFn) -> str:
    pairs = [("type", draw(TYPES))]
    for _ in range(draw(st.integers(0, 6))):
        key = draw(st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)))
        good = GOOD_VALUES.get(key)
        pairs.append((key, draw(st.one_of(good, json_values) if good is not None else json_values)))
    return encode_object(draw(st.permutations(pairs)), draw(st.booleans()))


def check_frame(frame: object) -> None:
    """What any decoded frame may be: a valid frame of PROTOCOL.md, Ignored or Dropped."""
    kind = type(frame)
    assert kind in (Hello, Joined, Queue, Ping, Pong, Error, Ignored, Dropped), kind
    if isinstance(frame, Queue):
        assert frame.room is None or valid_room(frame.room), frame.room
        assert type(frame.patients) is int and 0 <= frame.patients <= MAX_PATIENTS, frame.patients
        for text in (frame.now_serving, frame.ts):
            assert text is None or (type(text) is str and len(text) <= 64)
        assert frame.seq is None or (type(frame.seq) is int and 0 <= frame.seq <= 2**53)
    elif isinstance(frame, Joined):
        assert valid_room(frame.room), frame.room
    elif isinstance(frame, Error):
        assert frame.room is None or valid_room(frame.room), frame.room
        assert type(frame.code) is str and len(frame.code) <= 64
        assert type(frame.message) is str and len(frame.message) <= 512
    elif isinstance(frame, Hello):
        assert type(frame.heartbeat) is float and 0 < frame.heartbeat <= 3600
    elif isinstance(frame, Ignored):
        assert frame.type not in KNOWN_TYPES and len(frame.type) <= 32
    elif isinstance(frame, Dropped):
        # "safe to log (no frame content)": short, one line, plain ASCII, no markup.
        reason = frame.reason
        assert reason.isascii() and reason.isprintable() and len(reason) <= 200, reason
        assert "<" not in reason and "\\" not in reason.replace("\\Z", ""), reason


@pytest.fixture(scope="module")
def decode():
    return FrameDecoder().decode


@props(400)
@given(text=st.one_of(st.text(), st.text(st.characters(codec=None, blacklist_categories=()))))
@example(text="")
@example(text="\ud800")  # a lone surrogate: no UTF-8 for it (found by this property)
@example(text='{"type":"queue","patients":1,"now_serving":"\ud800"}')
@example(text="[" * 100_000)
def test_decode_arbitrary_text(decode, text):
    check_frame(decode(text))


@props(100)
@given(data=st.binary())
@example(data=b'{"type":"queue","room":"opd-1","patients":5}')
@example(data=b"x" * (MAX_FRAME_BYTES + 8))
def test_binary_frames_are_dropped(decode, data):
    assert decode(data) == Dropped("binary frame")
    assert decode(bytearray(data)) == Dropped("binary frame")


@props(400)
@given(value=json_values, ensure_ascii=st.booleans())
def test_decode_arbitrary_json_values(decode, value, ensure_ascii):
    frame = decode(json.dumps(value, ensure_ascii=ensure_ascii))
    check_frame(frame)
    if not isinstance(value, dict):
        assert isinstance(frame, Dropped)


@props(600)
@given(text=near_valid_frames())
# Two type fields, the first one unknown: msgspec quoted it, and the reason is logged (found by
# this property: a newline there forged a log line, 60,000 characters flooded it).
@example(text='{"type":"bogus\\nERROR forged line","type":"queue","patients":1}')
@example(text='{"type":"' + "x" * 60_000 + '","type":"queue","patients":1}')
@example(text='{"type":"queue","patients":1,"room":"opd-1","now_serving":"\ud800"}')
def test_decode_near_valid_frames(decode, text):
    check_frame(decode(text))


@props(300)
@given(
    room=st.one_of(st.none(), room_ids),
    patients=st.integers(0, MAX_PATIENTS),
    now_serving=st.one_of(st.none(), st.text(max_size=64)),
    ts=st.one_of(st.none(), st.text(max_size=64)),
    seq=st.one_of(st.none(), st.integers(0, 2**53)),
    extra=st.dictionaries(st.text(max_size=10).filter(lambda k: k not in FIELDS), plain_json, max_size=3),
    ensure_ascii=st.booleans(),
)
def test_valid_queue_frames_decode_exactly(decode, room, patients, now_serving, ts, seq, extra, ensure_ascii):
    fields = {"room": room, "now_serving": now_serving, "ts": ts, "seq": seq}
    frame = {"type": "queue", "patients": patients, **{k: v for k, v in fields.items() if v is not None}, **extra}
    assert decode(json.dumps(frame, ensure_ascii=ensure_ascii)) == Queue(patients, room, now_serving, ts, seq)


@props(300)
@given(patients=json_values.filter(lambda v: not (type(v) is int and 0 <= v <= MAX_PATIENTS)))
@example(patients=True)
@example(patients=5.0)
@example(patients=-1)
@example(patients=MAX_PATIENTS + 1)
@example(patients="5")
def test_queue_with_an_invalid_count_is_dropped(decode, patients):
    frame = decode(json.dumps({"type": "queue", "room": "opd-1", "patients": patients}))
    assert isinstance(frame, Dropped), frame


@props(300)
@given(room=st.one_of(hostile_text, st.text(max_size=70), json_values).filter(lambda r: not valid_room(r)))
@example(room="opd-1\n")
@example(room="x" * 65)
def test_frames_with_an_invalid_room_are_dropped(decode, room):
    for kind in ("queue", "joined", "error"):
        frame = decode(json.dumps({"type": kind, "room": room, "patients": 1}))
        if room is None and kind != "joined":
            continue  # queue and error frames without a room are allowed
        assert isinstance(frame, Dropped), (kind, room, frame)


@props(60)
@given(char=st.sampled_from(["a", "é", "ঢ", "😀"]), size=st.integers(MAX_FRAME_BYTES - 8, MAX_FRAME_BYTES + 8))
def test_the_64_kib_limit_counts_utf8_bytes(decode, char, size):
    head = '{"type":"queue","patients":1,"x":"'
    room = size - len(head.encode()) - 2
    pad = char * (room // len(char.encode())) + "b" * (room % len(char.encode()))
    text = head + pad + '"}'
    assert len(text.encode()) == size
    frame = decode(text)
    if size > MAX_FRAME_BYTES:
        assert frame == Dropped("oversized frame")
    else:
        assert frame == Queue(patients=1)


# -- config: parse_config and load_config ---------------------------------------------------

SOURCE = "config.yaml"
BASE: dict[str, Any] = {
    "upstream": {"url": "wss://queue.example/ws", "token_file": "/etc/waiting-room/token"},
    "rooms": [{"id": "opd-1", "name": "OPD 1"}, {"id": "lab"}],
    "mqtt": {"base_topic": "hospital/waiting-room", "client_id": "reception"},
}
# Every key the structs know, read from them: keys added later are fuzzed too.
SECTIONS: dict[tuple[str | int, ...], type] = {
    (): Config,
    ("upstream",): UpstreamConfig,
    ("upstream", "backoff"): BackoffConfig,
    ("rooms", 0): RoomConfig,
    ("rooms", 1): RoomConfig,
    ("mqtt",): MqttConfig,
    ("mqtt", "backoff"): BackoffConfig,
    ("display",): DisplayConfig,
}
KEY_PATHS = sorted(
    (section + (name,) for section, struct in SECTIONS.items() for name in struct.__struct_fields__), key=str
)
DELETE = object()

CONFIG_STRINGS = [
    "10s", "500ms", "2m", "1h", "0s", "-1s", "1e9s", "9" * 400 + "s", ".5", "ten",
    "a//b", "/a", "a/", "a/+/b", "#", "a\x00b", "homeassistant", "hospital/waiting-room",
    "wss://queue.example/ws", "ws://x", "http://x", "wss://", "127.0.0.1:8080", "[::1]:80", ":80", "host:99999",
    "en", "bn", "bn-BD", "EN", "header", "query", "body", "debug", "loud", "get-token", "   ", "prompt",
]
config_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 5, 65535, 65536, 4401, 10**7, 10**400, 10**5000]),
    st.floats(),
    st.sampled_from(CONFIG_STRINGS),
    texts.filter(lambda s: "\ud800" not in s and "\udfff" not in s),  # YAML never yields a lone surrogate
    st.dates(),
    st.binary(max_size=8),
    st.lists(st.sampled_from(CONFIG_STRINGS + ["opd-1"]), max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(["id", "initial", "max", "4401", "x"]), st.integers(999, 5000)),
                    st.sampled_from(["prompt", "backoff", "explode", 1, None]), max_size=3),
    st.lists(st.fixed_dictionaries({"id": st.one_of(room_ids, hostile_text)}), max_size=3),
)


def set_path(data: Any, path: tuple[str | int, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node) or not isinstance(node[part], dict):
                return
            node = node[part]
        elif isinstance(node, dict):
            child = node.get(part)
            if not isinstance(child, (dict, list)):
                child = node[part] = {}
            node = child
        else:
            return
    last = path[-1]
    if isinstance(node, dict):
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value


@st.composite
def edited_configs(draw: st.DrawFn) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(KEY_PATHS))
        set_path(data, path, draw(st.one_of(st.just(DELETE), config_values)))
    return data


def check_config_error(message: str, data: Any, source: str = SOURCE) -> None:
    assert "\n" not in message and "\r" not in message, message
    assert "Traceback" not in message
    assert message.startswith(f"{source}: "), message
    rest = message[len(source) + 2:]
    if not isinstance(data, dict):
        return  # "the file is empty" / "expected a mapping at the top level"
    # The line names a key path: a key of the structs or of the document, then ".", "[" or ":".
    heads = set(Config.__struct_fields__) | {
        str(k).replace("\r", "\\r").replace("\n", "\\n") for k in data
    } | {"(top level)"}
    assert any(re.match(re.escape(head) + r"[.\[:]", rest) for head in heads), message


def check_config(cfg: Config) -> None:
    ids = cfg.room_ids
    assert ids and all(valid_room(r) for r in ids), ids
    assert len(set(ids)) == len(ids)
    assert valid_topic(cfg.mqtt.base_topic), cfg.mqtt.base_topic
    assert cfg.mqtt.discovery is None or valid_topic(cfg.mqtt.discovery), cfg.mqtt.discovery
    assert 1 <= cfg.mqtt.port <= 65535
    for seconds in (cfg.upstream.backoff.initial, cfg.upstream.backoff.max, cfg.mqtt.backoff.max,
                    cfg.upstream.stable_after, cfg.display.heartbeat):
        assert math.isfinite(seconds) and seconds > 0


def parse_or_error(data: Any, source: str = SOURCE) -> Config | None:
    try:
        cfg = parse_config(data, source)
    except ConfigError as exc:
        check_config_error(str(exc), data, source)
        return None
    check_config(cfg)
    return cfg


def test_the_base_document_is_valid():
    assert parse_or_error(copy.deepcopy(BASE)) is not None


@props(600)
@given(data=edited_configs())
@example(data={**BASE, "upstream": {**BASE["upstream"], "backoff": {"initial": 10**400}}})  # OverflowError
@example(data={**BASE, "mqtt": {**BASE["mqtt"], "port": 10**5000}})  # int beyond str conversion
@example(data={**BASE, "mqtt": {**BASE["mqtt"], "base_topic": "hospital//waiting-room"}})  # empty level
@example(data={**BASE, "mqtt": {**BASE["mqtt"], "discovery_prefix": "home//assistant"}})
@example(data={**BASE, "upstream": {**BASE["upstream"], "close_codes": {10**5000: "prompt"}}})
def test_parse_config_raises_only_config_error(data):
    parse_or_error(data)


@props(300)
@given(data=st.one_of(json_values, st.dictionaries(st.one_of(st.sampled_from(sorted(Config.__struct_fields__)),
                                                             st.text(max_size=10), st.integers(), st.none()),
                                                   json_values, max_size=5)))
def test_parse_config_of_anything(data):
    parse_or_error(data)


# Scalars as they are written in a YAML file, including those the YAML constructor cannot build.
YAML_SCALARS = [
    "1", "0", "-1", "65536", "1" + "0" * 5000, "0x" + "f" * 5000, "0b" + "1" * 20_000, "1e999", ".inf", ".nan",
    "2024-02-30", "2020-13-45", "2020-01-01", "2020-01-01 25:61:61", "190:20:30", "1_000", "true", "no", "~",
    "!!binary AAAA", "!!str 1", "!!int x", "!!python/object:os.system x", '"\\ud800"', '"\\x00"', "'a//b'",
    "'hospital/+/x'", "10s", "500ms", "wss://queue.example/ws", "[a, b]", "{a: 1}", "&a [*a]", "*undefined",
    "|\n  multi\n  line", '"a\\nb"', "- x", "@x", "`x", "%x", "[", "{", "'unterminated",
]


@st.composite
def yaml_documents(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:  # a valid document with one known key written as a raw YAML scalar
        data = copy.deepcopy(BASE)
        set_path(data, draw(st.sampled_from(KEY_PATHS)), "SCALAR_HERE")
        return yaml.safe_dump(data).replace("SCALAR_HERE", draw(st.sampled_from(YAML_SCALARS)))
    if kind == 1:  # a valid document with random edits, dumped as YAML
        data, allow_unicode = draw(edited_configs()), draw(st.booleans())
        try:
            return yaml.safe_dump(data, allow_unicode=allow_unicode)
        except ValueError:  # PyYAML cannot write an integer of 5,000 digits either
            assume(False)
    if kind == 2:  # a valid document with random text spliced in
        text = yaml.safe_dump(copy.deepcopy(BASE))
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.one_of(st.sampled_from(YAML_SCALARS), st.text(max_size=20))) + text[at:]
    return draw(st.text(st.sampled_from(list("{}[]:,-&*!|>'\"#%@` \n\tab01.\\/+_~?")), max_size=120))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties") / "config.yaml"


@props(500)
@given(text=yaml_documents())
@example(text=yaml.safe_dump(BASE) + "x: 2024-02-30\n")  # the YAML constructor's ValueError
@example(text=yaml.safe_dump(BASE) + "x: 1" + "0" * 5000 + "\n")
def test_load_config_raises_only_config_error(config_file, text):
    config_file.write_text(text, encoding="utf-8")
    name = str(config_file)
    try:
        cfg = load_config(config_file)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and "\r" not in message and message.startswith(f"{name}: "), message
        # A YAML syntax error names its line; anything else names the key path.
        try:
            data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except (yaml.YAMLError, ValueError):
            return
        check_config_error(message, data, name)
    else:
        check_config(cfg)


# -- topics and discovery -------------------------------------------------------------------

topic_levels = st.text(st.characters(blacklist_characters="/+#\x00", blacklist_categories=("Cs",)), max_size=12)
topic_candidates = st.one_of(
    st.lists(topic_levels, min_size=1, max_size=5).map("/".join),
    st.sampled_from(
        ["homeassistant", "hospital/waiting-room", "a//b", "a/", "/a", "a/+", "#", "a\x00b", " ", "ä/ö"]
    ),
)


def accepted_topic(key: str, topic: str) -> str:
    """A topic as the config accepts it for mqtt.<key>; other examples are rejected."""
    data = copy.deepcopy(BASE)
    data["mqtt"][key] = topic
    try:
        cfg = parse_config(data, SOURCE)
    except ConfigError:
        reject()
    value = cfg.mqtt.base_topic if key == "base_topic" else cfg.mqtt.discovery
    assert value == topic
    return topic


client_ids = st.one_of(st.text(min_size=1, max_size=128), st.sampled_from(["reception", "waiting room.1/#+", "é"]))
names = st.one_of(st.text(max_size=200), hostile_text.filter(lambda s: "\ud800" not in s and "\udfff" not in s))


def mqtt_topics(base: str, room: str) -> list[str]:
    """The topics mqtt.py publishes a room's state to, as its f-strings build them."""
    return [f"{base}/{room}/patients", f"{base}/{room}/state", f"{base}/status", f"{base}/upstream"]


def matches(subscription: str, topic: str) -> bool:
    """MQTT topic filter matching, for + (one level) and a trailing #."""
    sub, top = subscription.split("/"), topic.split("/")
    for i, level in enumerate(sub):
        if level == "#":
            return True
        if i >= len(top) or (level != "+" and level != top[i]):
            return False
    return len(sub) == len(top)


@props(300)
@given(base=topic_candidates, prefix=topic_candidates, client_id=client_ids, room=room_ids, name=names)
@example(base="hospital//waiting-room", prefix="homeassistant", client_id="a", room="opd-1", name="x")
@example(base="hospital", prefix="home//assistant", client_id="a", room="opd-1", name="x")
def test_topics_stay_valid_and_under_their_prefix(base, prefix, client_id, room, name):
    base = accepted_topic("base_topic", base)
    prefix = accepted_topic("discovery_prefix", prefix)
    for topic in mqtt_topics(base, room):
        assert valid_topic(topic) and topic.startswith(base + "/"), topic
    disc = Discovery.for_client(prefix, base, client_id)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", disc.node_id), disc.node_id
    for topic in (*disc.room_topics(room), disc.upstream_topic):
        assert valid_topic(topic) and topic.startswith(prefix + "/"), topic
        assert len(topic.split("/")) == len(prefix.split("/")) + 4
        assert matches(disc.subscription, topic)
    assert [m.topic for m in disc.removals(room)] == disc.room_topics(room)
    messages = disc.room_messages(room, name, name)
    configs = [json.loads(m.payload) for m in messages]
    assert [c["device"]["name"] for c in configs] == [name] * len(configs)
    assert configs[0]["device"]["suggested_area"] == name if name else "suggested_area" not in configs[0]["device"]
    assert configs[0]["state_topic"] == f"{base}/{room}/patients"
    assert configs[0]["json_attributes_topic"] == f"{base}/{room}/state"
    for config in configs:
        published = [config["state_topic"], *(a["topic"] for a in config["availability"])]
        for topic in published:
            assert valid_topic(topic) and topic.startswith(base + "/"), topic
    for topic in disc.room_topics(room):
        assert not disc.is_stale_entry(topic, set(disc.room_topics(room)))
        assert disc.is_stale_entry(topic, set())
    assert not disc.is_stale_entry(disc.upstream_topic, set())


@props(200)
@given(
    rooms=st.lists(room_ids, min_size=1, max_size=12, unique=True),
    client_id=client_ids,
    names=st.lists(names, min_size=12, max_size=12),
)
@example(rooms=["a.b", "a_b", "a-b", "A.b"], client_id="reception", names=["x"] * 12)
def test_discovery_ids_are_stable_and_distinct(rooms, client_id, names):
    pairs = list(zip(rooms, names))
    disc = Discovery.for_client("homeassistant", "hospital/waiting-room", client_id)
    messages = disc.messages(pairs)
    payloads = [json.loads(m.payload) for m in messages]  # valid JSON, every one
    unique_ids = [p["unique_id"] for p in payloads]
    assert len(set(unique_ids)) == len(unique_ids) == 3 * len(rooms) + 1
    assert len({m.topic for m in messages}) == len(messages)
    assert all(m.retain for m in messages)
    # Stable: another daemon run with the same client id announces the very same entries.
    again = Discovery.for_client("homeassistant", "hospital/waiting-room", client_id).messages(pairs)
    assert again == messages
    current = {t for r in rooms for t in disc.room_topics(r)}
    assert not any(disc.is_stale_entry(m.topic, current) for m in messages)
    # Each room's device: its own identifier, via this daemon.
    devices = {json.dumps(p["device"], sort_keys=True) for p in payloads[1:]}
    assert len(devices) == len(rooms)


@props(200)
@given(a=client_ids, b=client_ids)
@example(a="a.b", b="a_b")
def test_distinct_client_ids_give_distinct_node_ids(a, b):
    assume(a != b)
    assert safe_id(a) != safe_id(b)
    room = Discovery.for_client("homeassistant", "w", a).room_config("opd-1", "x")["unique_id"]
    assert room != Discovery.for_client("homeassistant", "w", b).room_config("opd-1", "x")["unique_id"]


@props(150)
@given(text=near_valid_frames(), base=topic_candidates)
def test_no_decoded_room_reaches_an_invalid_topic(decode, text, base):
    base = accepted_topic("base_topic", base)
    frame = decode(text)
    room = getattr(frame, "room", None)
    if isinstance(frame, (Queue, Joined, Error)) and room is not None:
        for topic in mqtt_topics(base, room):
            assert valid_topic(topic) and topic.startswith(base + "/"), topic


# -- display rendering --------------------------------------------------------------------------


@functools.cache
def assets():
    return load_assets()


room_configs = st.builds(
    RoomConfig,
    id=room_ids,
    name=st.one_of(st.none(), names.filter(bool)),
    locale=st.one_of(st.none(), st.sampled_from(["en", "bn", "bn-BD", "xx", "en-GB"])),
    label=st.one_of(st.none(), names),
)
MARKUP = "<>\"'"


def markup_count(text: str) -> dict[str, int]:
    return {c: text.count(c) for c in MARKUP}


@props(200)
@given(
    rooms=st.lists(room_configs, min_size=1, max_size=5, unique_by=lambda r: r.id),
    one=st.booleans(),
    locale=st.sampled_from(["en", "bn"]),
    heartbeat=st.floats(0.1, 3600),
)
@example(
    rooms=[RoomConfig(id="opd-1", name="</script><script>alert(1)</script>", label='" onload="x', locale="bn")],
    one=True, locale="en", heartbeat=5.0,
)
def test_pages_escape_every_name_and_label(rooms, one, locale, heartbeat):
    shown = rooms[:1] if one else rooms
    room = shown[0].id if one else None
    options = PageOptions(heartbeat=heartbeat)
    page = render_page(shown, room, locale, assets(), options).decode("utf-8")
    # Not one markup character more than the template has: every value is escaped.
    assert markup_count(page) == markup_count(assets().template), page[:300]
    start = page.index('data-config="') + len('data-config="')
    config = json.loads(html.unescape(page[start:page.index('"', start)]))
    assert config == json.loads(json.dumps(page_config(shown, room, locale, assets(), options)))
    assert [r["name"] for r in config["rooms"]] == [r.title for r in shown]
    assert [r["label"] for r in config["rooms"]] == [r.label for r in shown]
    if one:
        assert f"<title>{html.escape(shown[0].title)}</title>" in page


@props(200)
@given(title=names, message=names, with_assets=st.booleans())
def test_error_pages_escape_title_and_message(title, message, with_assets):
    used = assets() if with_assets else None
    page = render_message(title, message, used).decode("utf-8")
    assert markup_count(page) == markup_count(render_message("t", "m", used).decode("utf-8"))
    assert f"<h1>{html.escape(title)}</h1>" in page and f"<p>{html.escape(message)}</p>" in page


link_states = st.builds(
    LinkState,
    status=st.sampled_from(list(LinkStatus)),
    detail=names,
    since=st.floats(0, 4e9),
    connects=st.integers(0, 10),
)
room_states = st.builds(
    RoomState,
    room=room_ids,
    name=names,
    patients=st.one_of(st.none(), st.integers(0, MAX_PATIENTS)),
    now_serving=st.one_of(st.none(), names),
    updated_at=st.one_of(st.none(), st.floats(0, 4e9)),
    received_at=st.one_of(st.none(), st.floats(0, 4e9)),
    seq=st.one_of(st.none(), st.integers(0, 2**53)),
    stale=st.booleans(),
    error=st.one_of(st.none(), st.sampled_from(["unknown_room", "forbidden", "error"])),
)


@props(200)
@given(
    states=st.lists(st.one_of(room_states, room_ids), max_size=6),
    link=link_states,
    batch_link=st.one_of(st.none(), link_states),
    wanted=st.one_of(st.none(), room_ids),
    now=st.floats(0, 4e9),
)
def test_push_frames_are_valid_json_with_the_values_unchanged(states, link, batch_link, wanted, now):
    rooms = {s if isinstance(s, str) else s.room: None if isinstance(s, str) else s for s in states}
    frame = state_frame(Batch(rooms, batch_link), link, wanted, now)
    concerned = {r: s for r, s in rooms.items() if wanted is None or r == wanted}
    if frame is None:
        assert not concerned and batch_link is None
        return
    doc = json.loads(frame)
    assert doc["type"] == "state" and doc["now"] == now
    assert [r["room"] for r in doc["rooms"]] == [r for r, s in concerned.items() if s is not None]
    assert doc.get("removed", []) == [r for r, s in concerned.items() if s is None]
    for sent in doc["rooms"]:
        state = concerned[sent["room"]]
        assert sent == room_payload(state, link)
        assert sent["name"] == state.name and sent["now_serving"] == state.now_serving
        assert sent["patients"] == state.patients
        assert sent["as_of"] in (None, state.received_at, link.since)
        # The same state as MQTT publishes it: valid JSON too.
        assert json.loads(state_payload(state))["now_serving"] == state.now_serving


@props(100)
@given(heartbeat=st.floats(allow_nan=False), now=st.floats(allow_nan=False))
def test_hello_and_heartbeat_frames_are_valid_json(heartbeat, now):
    hello = json.loads(hello_frame(heartbeat, now))
    assert hello["type"] == "hello" and set(hello) == {"type", "heartbeat", "now"}
    assert json.loads(heartbeat_frame(now))["type"] == "heartbeat"


rfc3339_texts = st.from_regex(
    r"[0-9]{4}-[01][0-9]-[0-3][0-9][T ][0-2][0-9]:[0-5][0-9]:[0-5][0-9]"
    r"(\.[0-9]{1,6})?(Z|[+-][01][0-9]:[0-5][0-9])?",
    fullmatch=True,
)


@props(200)
@given(ts=st.one_of(rfc3339_texts, st.text(max_size=64)))
@example(ts="0001-01-01T00:00:00+14:00")
@example(ts="9999-12-31T23:59:59-14:00")
def test_any_server_ts_can_be_published(ts):
    state = RoomState("opd-1", "OPD 1", patients=1, updated_at=parse_ts(ts), stale=False)
    assert json.loads(state_payload(state))["patients"] == 1


def test_regressions_found_by_these_properties(decode, config_file):
    """Each was an exception or a wrong result before; the properties above found them."""
    # protocol: a lone surrogate raised UnicodeEncodeError; a duplicated type field put the
    # first one's text (newlines included) into the logged reason.
    assert decode("\ud800") == Dropped("not UTF-8")
    forged = '{"type":"bogus\\nERROR forged","type":"queue","patients":1}'
    assert decode(forged) == Dropped("conflicting type fields")
    assert decode('{"type":"queue","type":"hello"}') == Dropped("conflicting type fields")

    # config: OverflowError and ValueError escaped parse_config; "a//b" was an accepted topic.
    def error(section: str, values: dict[str, Any]) -> str:
        data = copy.deepcopy(BASE)
        data.setdefault(section, {}).update(values)
        with pytest.raises(ConfigError) as info:
            parse_config(data, SOURCE)
        return str(info.value)

    assert error("upstream", {"backoff": {"initial": 10**400}}).startswith(
        f"{SOURCE}: upstream.backoff.initial: expected a number > 0"
    )
    assert error("mqtt", {"port": 10**5000}).startswith(f"{SOURCE}: mqtt.port: expected an integer <= 65535")
    assert "empty level" in error("mqtt", {"base_topic": "hospital//waiting-room"})
    assert error("mqtt", {"discovery_prefix": "home//assistant"}).startswith(f"{SOURCE}: mqtt.discovery_prefix:")

    # load_config: the YAML constructor's own ValueError (a date that does not exist) escaped.
    config_file.write_text(yaml.safe_dump(BASE) + "x: 2024-02-30\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r": invalid YAML: day is out of range for month$"):
        load_config(config_file)


def test_a_hostile_ticket_travels_from_frame_to_page_as_text():
    """End to end without I/O: a hostile now_serving goes from frame to page frame as text."""
    frame = FrameDecoder().decode(json.dumps({"type": "queue", "room": "opd-1", "patients": 3,
                                              "now_serving": "</script><b>A-1</b>"}))
    assert isinstance(frame, Queue)
    state = RoomState("opd-1", "OPD 1", patients=frame.patients, now_serving=frame.now_serving, stale=False)
    doc = json.loads(state_frame(Batch({"opd-1": state}, None), LinkState(LinkStatus.CONNECTED), None, 1.0))
    assert doc["rooms"][0]["now_serving"] == "</script><b>A-1</b>"

