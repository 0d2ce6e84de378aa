"""config: load_config / parse_config and the one-line errors of ``waiting-room check|run``."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from waiting_room.config import ConfigError, load_config, parse_config, parse_duration

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "config.yaml"

FULL: dict[str, Any] = {
    "upstream": {
        "url": "wss://queue.hospital.example/ws/waiting-room",
        "token_file": "/etc/waiting-room/token",
        "token_in": "header",
        "backoff": {"initial": "500ms", "max": "2m"},
        "heartbeat_timeout": "40s",
    },
    "rooms": [
        {"id": "opd-1", "name": "OPD 1"},
        {"id": "lab", "name": "Laboratory"},
        {"id": "ward_3.east", "name": "Ward 3 East"},
    ],
    "mqtt": {
        "host": "broker.local",
        "port": 8883,
        "base_topic": "hospital/waiting-room",
        "discovery_prefix": "homeassistant",
        "username": "waiting-room",
        "password_file": "/etc/waiting-room/mqtt-password",
        "ca_file": "/etc/ssl/certs/ca.pem",
        "client_id": "waiting-room-reception",
        "keepalive": 45,
    },
}


def variant(*edits: tuple[str, Any]) -> dict[str, Any]:
    """FULL with edits: ("a.b.c", value) sets, ("a.b.c", DELETE) removes."""
    data = copy.deepcopy(FULL)
    for path, value in edits:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if value is DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


DELETE = object()


def error_of(data: Any, source: str = SOURCE) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source)
    return str(info.value)


def assert_one_line(message: str, source: str, key: str) -> None:
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(f"{source}: {key}"), message
    assert "Traceback" not in message


# -- valid files -------------------------------------------------------------------------


def test_full_example_parses():
    config = parse_config(FULL, SOURCE)
    up = config.upstream
    assert up.url == "wss://queue.hospital.example/ws/waiting-room"
    assert up.token_file == "/etc/waiting-room/token"
    assert up.token is None and up.token_command is None
    assert up.token_in == "header"
    assert up.backoff.initial == 0.5
    assert up.backoff.max == 120.0
    assert up.heartbeat_timeout == 40.0
    assert config.room_ids == ("opd-1", "lab", "ward_3.east")
    assert [r.title for r in config.rooms] == ["OPD 1", "Laboratory", "Ward 3 East"]
    m = config.mqtt
    assert (m.host, m.port, m.base_topic) == ("broker.local", 8883, "hospital/waiting-room")
    assert m.discovery == "homeassistant"
    assert (m.username, m.password_file, m.ca_file) == (
        "waiting-room", "/etc/waiting-room/mqtt-password", "/etc/ssl/certs/ca.pem")
    assert m.client_id == "waiting-room-reception"
    assert m.keepalive == 45


def test_full_example_loads_from_a_yaml_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(FULL))
    config = load_config(path)
    assert config.room_ids == ("opd-1", "lab", "ward_3.east")
    assert config.upstream.backoff.max == 120.0


def test_minimal_file_gets_defaults():
    config = parse_config({"upstream": {"url": "ws://localhost:8765/ws", "token": "t"},
                           "rooms": [{"id": "opd-1"}]}, SOURCE)
    assert config.upstream.token_in == "header"
    assert config.upstream.heartbeat_timeout is None
    assert config.upstream.backoff.initial <= config.upstream.backoff.max
    assert config.mqtt.port == 1883
    assert config.mqtt.base_topic == "waiting-room"
    assert config.mqtt.discovery == "homeassistant"
    assert config.rooms[0].title == "opd-1"  # the id when no name


@pytest.mark.parametrize(
    "source",
    [
        {"token": "literal"},
        {"token_file": "/run/token"},
        {"token_command": "/usr/bin/get-token --room all"},
        {"token_command": ["/usr/bin/get-token", "--room", "all"]},
    ],
)
def test_each_token_source_alone_is_accepted(source):
    up = dict(FULL["upstream"])
    del up["token_file"]
    up.update(source)
    config = parse_config({**FULL, "upstream": up}, SOURCE)
    if "token_command" in source:
        assert config.upstream.token_argv == ["/usr/bin/get-token", "--room", "all"]
    else:
        assert config.upstream.token_argv is None


@pytest.mark.parametrize("token_in", ["header", "query"])
def test_token_in(token_in):
    assert parse_config(variant(("upstream.token_in", token_in)), SOURCE).upstream.token_in == token_in


def test_discovery_prefix_false_disables_discovery():
    config = parse_config(variant(("mqtt.discovery_prefix", False)), SOURCE)
    assert config.mqtt.discovery is None


def test_mqtt_username_without_password_is_fine():
    config = parse_config(variant(("mqtt.password_file", DELETE)), SOURCE)
    assert config.mqtt.username == "waiting-room"


def test_no_fallback_by_default():
    upstream = parse_config(FULL, SOURCE).upstream
    assert upstream.fallback is None and upstream.proxy is None


def test_fallback_and_proxy():
    config = parse_config(
        variant(
            ("upstream.fallback", {"url": "https://queue.example/api/rooms?site=a", "interval": "2s"}),
            ("upstream.proxy", "http://proxy.example:3128"),
        ),
        SOURCE,
    )
    fallback = config.upstream.fallback
    assert fallback is not None
    assert (fallback.url, fallback.interval, fallback.after) == ("https://queue.example/api/rooms?site=a", 2.0, 10.0)
    assert config.upstream.proxy == "http://proxy.example:3128"
    assert parse_config(variant(("upstream.proxy", "http://user:secret@10.0.0.1:8080/")), SOURCE).upstream.proxy


def test_tls_keys():
    config = parse_config(
        variant(
            ("upstream.ca_file", "/etc/waiting-room/hospital-ca.pem"),
            ("upstream.cert_file", "/etc/waiting-room/client.pem"),
            ("upstream.key_file", "/etc/waiting-room/client.key"),
            ("mqtt.cert_file", "/etc/waiting-room/mqtt-client.pem"),
            ("mqtt.key_file", "/etc/waiting-room/mqtt-client.key"),
            ("display", {"listen": "0.0.0.0:8443", "cert_file": "/etc/waiting-room/display.pem",
                         "key_file": "/etc/waiting-room/display.key",
                         "allowed_hosts": ["wall-1.ward.hospital.example", "kiosk", "10.1.2.3", "fe80::1"]}),
        ),
        SOURCE,
    )
    up, m, d = config.upstream, config.mqtt, config.display
    assert (up.ca_file, up.cert_file, up.key_file) == (
        "/etc/waiting-room/hospital-ca.pem", "/etc/waiting-room/client.pem", "/etc/waiting-room/client.key")
    assert (m.ca_file, m.cert_file, m.key_file) == (
        "/etc/ssl/certs/ca.pem", "/etc/waiting-room/mqtt-client.pem", "/etc/waiting-room/mqtt-client.key")
    assert (d.cert_file, d.key_file) == ("/etc/waiting-room/display.pem", "/etc/waiting-room/display.key")
    assert d.allowed_hosts == ["wall-1.ward.hospital.example", "kiosk", "10.1.2.3", "fe80::1"]


def test_tls_keys_default_to_none():
    config = parse_config(FULL, SOURCE)
    assert (config.upstream.ca_file, config.upstream.cert_file, config.upstream.key_file) == (None, None, None)
    assert (config.mqtt.cert_file, config.mqtt.key_file) == (None, None)
    assert (config.display.cert_file, config.display.key_file, config.display.allowed_hosts) == (None, None, [])


def test_upstream_ca_file_with_a_plain_socket_but_an_https_snapshot():
    config = parse_config(
        variant(("upstream.url", "ws://queue.example/ws"), ("upstream.ca_file", "/ca.pem"),
                ("upstream.fallback", {"url": "https://queue.example/api/rooms"})),
        SOURCE,
    )
    assert config.upstream.ca_file == "/ca.pem"


def test_close_code_overrides():
    config = parse_config(variant(("upstream.close_codes", {4401: "refresh_token", 1000: "prompt"})), SOURCE)
    assert config.upstream.close_codes == {4401: "refresh_token", 1000: "prompt"}


# -- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(3, 3.0), (0.25, 0.25), ("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("1h", 3600.0),
     ("1.5s", 1.5), (" 30 s ", 30.0), ("7", 7.0), (".5", 0.5)],
)
def test_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)
    config = parse_config(variant(("upstream.heartbeat_timeout", value)), SOURCE)
    assert config.upstream.heartbeat_timeout == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["ten", "10 parsecs", "-1s", "0", 0, -3, True, "", "1d", [10], {"s": 1}])
def test_bad_durations(value):
    message = error_of(variant(("upstream.heartbeat_timeout", value)))
    assert_one_line(message, SOURCE, "upstream.heartbeat_timeout:")
    assert "expected a number > 0" in message


def test_backoff_max_not_a_number_is_the_documented_line():
    message = error_of(variant(("upstream.backoff.max", "ten")))
    assert_one_line(message, SOURCE, "upstream.backoff.max:")
    assert "expected a number > 0" in message
    assert message.endswith(', got "ten"')


def test_backoff_max_below_initial():
    message = error_of(variant(("upstream.backoff", {"initial": "5s", "max": "1s"})))
    assert_one_line(message, SOURCE, "upstream.backoff.max:")
    assert "initial" in message


# -- errors: one line, file name, then the dotted key path -------------------------------

ERRORS = [
    # wrong types
    ("upstream.url", 5, "upstream.url"),
    ("mqtt.host", ["a"], "mqtt.host"),
    ("mqtt.port", "abc", "mqtt.port"),
    ("mqtt.port", True, "mqtt.port"),
    ("mqtt.port", 1.5, "mqtt.port"),
    ("mqtt.keepalive", "often", "mqtt.keepalive"),
    ("mqtt", "broker.local", "mqtt"),
    ("upstream", "wss://x", "upstream"),
    ("rooms", "opd-1", "rooms"),
    ("rooms.0", "opd-1", "rooms[0]"),
    ("rooms.1.name", 5, "rooms[1].name"),
    ("upstream.backoff.initial", "soon", "upstream.backoff.initial"),
    ("mqtt.backoff.max", -1, "mqtt.backoff.max"),
    ("upstream.token_in", "body", "upstream.token_in"),
    # unknown keys (typos) at several levels
    ("tokn", "x", "tokn"),
    ("room", [{"id": "a"}], "room"),
    ("upstream.tokn_file", "/t", "upstream.tokn_file"),
    ("upstream.backoff.maximum", 10, "upstream.backoff.maximum"),
    ("mqtt.hots", "broker", "mqtt.hots"),
    ("mqtt.backoff.initail", 1, "mqtt.backoff.initail"),
    ("rooms.0.nmae", "OPD", "rooms[0].nmae"),
    # missing required keys
    ("upstream", DELETE, "upstream"),
    ("rooms", DELETE, "rooms"),
    ("upstream.url", DELETE, "upstream.url"),
    ("rooms.1", {"name": "no id"}, "rooms[1].id"),
    # room ids
    ("rooms.0.id", "opd/1", "rooms[0].id"),
    ("rooms.0.id", "opd+1", "rooms[0].id"),
    ("rooms.0.id", "opd#1", "rooms[0].id"),
    ("rooms.0.id", "opd 1", "rooms[0].id"),
    ("rooms.0.id", "", "rooms[0].id"),
    ("rooms.0.id", "a" * 65, "rooms[0].id"),
    ("rooms.2.id", "opd-1", "rooms[2].id"),  # duplicate
    ("rooms", [], "rooms"),
    # URL
    ("upstream.url", "http://queue.example/ws", "upstream.url"),
    ("upstream.url", "https://queue.example/ws", "upstream.url"),
    ("upstream.url", "queue.example/ws", "upstream.url"),
    ("upstream.url", "wss://", "upstream.url"),
    # MQTT topics and numbers
    ("mqtt.base_topic", "hospital/+/rooms", "mqtt.base_topic"),
    ("mqtt.base_topic", "hospital/#", "mqtt.base_topic"),
    ("mqtt.base_topic", "/hospital", "mqtt.base_topic"),
    ("mqtt.base_topic", "", "mqtt.base_topic"),
    ("mqtt.discovery_prefix", True, "mqtt.discovery_prefix"),
    ("mqtt.discovery_prefix", "ha/+", "mqtt.discovery_prefix"),
    ("mqtt.port", 0, "mqtt.port"),
    ("mqtt.port", 65536, "mqtt.port"),
    ("mqtt.port", -1, "mqtt.port"),
    ("mqtt.username", DELETE, "mqtt.username"),  # password_file without username
    ("upstream.close_codes", {99: "prompt"}, "upstream.close_codes"),
    ("upstream.close_codes", {4401: "explode"}, "upstream.close_codes"),
    ("log_level", "loud", "log_level"),
    # the snapshot fallback and the proxy
    ("upstream.fallback", "https://queue.example/api/rooms", "upstream.fallback"),
    ("upstream.fallback", {}, "upstream.fallback.url"),
    ("upstream.fallback", {"url": "wss://queue.example/api"}, "upstream.fallback.url"),
    ("upstream.fallback", {"url": "https://"}, "upstream.fallback.url"),
    ("upstream.fallback", {"url": "https://q/api", "interval": 0}, "upstream.fallback.interval"),
    ("upstream.fallback", {"url": "https://q/api", "after": "soon"}, "upstream.fallback.after"),
    ("upstream.fallback", {"url": "https://q/api", "intervall": 3}, "upstream.fallback.intervall"),
    ("upstream.proxy", "proxy.example:3128", "upstream.proxy"),
    ("upstream.proxy", "socks5://proxy.example:1080", "upstream.proxy"),
    ("upstream.proxy", "http://proxy.example:3128/path", "upstream.proxy"),
    ("upstream.proxy", 3128, "upstream.proxy"),
    # TLS files: a certificate comes with its key; a CA only where TLS is spoken
    ("upstream.cert_file", "/c.pem", "upstream.key_file"),
    ("upstream.key_file", "/c.key", "upstream.cert_file"),
    ("upstream.ca_file", "", "upstream.ca_file"),
    ("upstream.ca_file", 5, "upstream.ca_file"),
    ("mqtt.cert_file", "/c.pem", "mqtt.key_file"),
    ("mqtt.key_file", "/c.key", "mqtt.cert_file"),
    ("mqtt.ca_file", ["/a", "/b"], "mqtt.ca_file"),
    ("display.cert_file", "/c.pem", "display.key_file"),
    ("display.key_file", "/c.key", "display.cert_file"),
    ("display.cert_file", "", "display.cert_file"),
    ("display.allowed_hosts", "kiosk.example", "display.allowed_hosts"),
    ("display.allowed_hosts", ["kiosk", "http://kiosk.example"], "display.allowed_hosts[1]"),
    ("display.allowed_hosts", ["kiosk.example:8443"], "display.allowed_hosts[0]"),
    ("display.allowed_hosts", ["*.example"], "display.allowed_hosts[0]"),
    ("display.allowed_hosts", [""], "display.allowed_hosts[0]"),
    ("display.allowed_hosts", [5], "display.allowed_hosts[0]"),
]


@pytest.mark.parametrize(("path", "value", "key"), ERRORS, ids=[f"{p}={v!r}"[:60] for p, v, _ in ERRORS])
def test_errors_are_one_line_naming_file_and_key(path, value, key):
    message = error_of(variant((path, value)))
    assert_one_line(message, SOURCE, key)


@pytest.mark.parametrize(
    ("path", "value", "words"),
    [
        ("upstream.tokn_file", "/t", "unknown key"),
        ("upstream.url", DELETE, "required"),
        ("mqtt.port", 70000, "65535"),
        ("rooms.2.id", "opd-1", "duplicate"),
        ("upstream.url", "http://x/ws", "ws://"),
        ("mqtt.base_topic", "a/+", "+"),
        ("upstream.token_in", "body", "header or query"),
        ("upstream.fallback", {"url": "ws://q/api"}, "http:// or https://"),
        ("upstream.proxy", "proxy:3128", "http://host:port"),
    ],
)
def test_error_says_what_was_expected(path, value, words):
    assert words in error_of(variant((path, value)))


def test_wrong_value_is_quoted_in_the_error():
    assert error_of(variant(("mqtt.port", "abc"))).endswith(', got "abc"')
    assert error_of(variant(("mqtt.port", 70000))).endswith(", got 70000")


@pytest.mark.parametrize(
    ("edits", "key", "words"),
    [
        ([("upstream.url", "ws://queue.example/ws"), ("upstream.ca_file", "/ca.pem")], "upstream.ca_file", "wss://"),
        ([("upstream.url", "ws://queue.example/ws"), ("upstream.cert_file", "/c.pem"), ("upstream.key_file", "/k")],
         "upstream.cert_file", "wss://"),
        ([("mqtt.ca_file", DELETE), ("mqtt.cert_file", "/c.pem"), ("mqtt.key_file", "/k")], "mqtt.cert_file",
         "ca_file"),
        ([("upstream.cert_file", "/c.pem")], "upstream.key_file", "required with cert_file"),
        ([("display.allowed_hosts", ["https://kiosk"])], "display.allowed_hosts[0]", "without scheme or port"),
    ],
)
def test_tls_errors_say_what_to_do(edits, key, words):
    message = error_of(variant(*edits))
    assert_one_line(message, SOURCE, key + ":")
    assert words in message


def test_two_token_sources():
    message = error_of(variant(("upstream.token", "literal")))
    assert_one_line(message, SOURCE, "upstream:")
    assert "exactly one" in message and "token" in message and "token_file" in message


def test_three_token_sources():
    message = error_of(variant(("upstream.token", "x"), ("upstream.token_command", "get-token")))
    assert_one_line(message, SOURCE, "upstream:")
    assert "exactly one" in message


def test_no_token_source():
    message = error_of(variant(("upstream.token_file", DELETE)))
    assert_one_line(message, SOURCE, "upstream:")
    assert "exactly one" in message


def test_empty_token_command():
    data = variant(("upstream.token_file", DELETE), ("upstream.token_command", "   "))
    assert_one_line(error_of(data), SOURCE, "upstream.token_command:")


@pytest.mark.parametrize(
    ("edits", "key", "secret"),
    [
        ([("upstream.proxy", "http://nurse:s3cret-pw@proxy.example:notaport")], "upstream.proxy", "s3cret-pw"),
        ([("upstream.proxy", "socks5://nurse:s3cret-pw@proxy.example:1080")], "upstream.proxy", "s3cret-pw"),
        ([("upstream.url", "ftp://queue.example/ws?token=s3cret-tk")], "upstream.url", "s3cret-tk"),
        ([("upstream.token_file", DELETE), ("upstream.token", 73317331)], "upstream.token", "73317331"),
        ([("display.access_token", 73317331)], "display.access_token", "73317331"),
    ],
)
def test_a_wrong_value_never_shows_a_secret(edits, key, secret):
    message = error_of(variant(*edits))
    assert_one_line(message, SOURCE, key + ":")
    assert secret not in message


def test_a_long_wrong_value_is_shortened():
    message = error_of(variant(("mqtt.host", 12345678901234567890 * 10**80)))
    assert_one_line(message, SOURCE, "mqtt.host:")
    assert len(message) < 200


# -- mqtt.hosts: the nodes of a clustered broker ------------------------------------------


def test_mqtt_hosts_are_the_nodes_in_order():
    data = variant(("mqtt.host", DELETE), ("mqtt.port", DELETE),
                   ("mqtt.hosts", ["mq-2.example:1883", "10.0.0.7:8883", "[fd00::3]:1883"]))
    config = parse_config(data, SOURCE)
    assert config.mqtt.nodes == (("mq-2.example", 1883), ("10.0.0.7", 8883), ("fd00::3", 1883))


def test_mqtt_host_and_port_are_one_node():
    assert parse_config(variant(), SOURCE).mqtt.nodes == (("broker.local", 8883),)
    minimal = variant(("mqtt", DELETE))
    assert parse_config(minimal, SOURCE).mqtt.nodes == (("127.0.0.1", 1883),)


ONE_OR_THE_OTHER = [("mqtt.host", DELETE), ("mqtt.port", DELETE)]
HOSTS_ERRORS = [
    # one or the other
    ([("mqtt.hosts", ["a:1883"])], "mqtt.hosts", "not both"),
    ([("mqtt.host", DELETE), ("mqtt.hosts", ["a:1883"])], "mqtt.hosts", "not both"),  # port 8883 still set
    ([("mqtt.port", DELETE), ("mqtt.hosts", ["a:1883"])], "mqtt.hosts", "not both"),
    # each node
    ([*ONE_OR_THE_OTHER, ("mqtt.hosts", [])], "mqtt.hosts", "at least one"),
    ([*ONE_OR_THE_OTHER, ("mqtt.hosts", "a:1883")], "mqtt.hosts", "list"),
    ([*ONE_OR_THE_OTHER, ("mqtt.hosts", ["a:1883", "b"])], "mqtt.hosts[1]", '"host:port"'),
    ([*ONE_OR_THE_OTHER, ("mqtt.hosts", ["a:0"])], "mqtt.hosts[0]", '"host:port"'),
    ([*ONE_OR_THE_OTHER, ("mqtt.hosts", ["a:65536"])], "mqtt.hosts[0]", '"host:port"'),
    ([*ONE_OR_THE_OTHER, ("mqtt.hosts", ["fd00::3:1883"])], "mqtt.hosts[0]", '"host:port"'),
    ([*ONE_OR_THE_OTHER, ("mqtt.hosts", ["mqtt://a:1883"])], "mqtt.hosts[0]", '"host:port"'),
    ([*ONE_OR_THE_OTHER, ("mqtt.hosts", [":1883"])], "mqtt.hosts[0]", '"host:port"'),
    ([*ONE_OR_THE_OTHER, ("mqtt.hosts", [1883])], "mqtt.hosts[0]", "string"),
    ([*ONE_OR_THE_OTHER, ("mqtt.hosts", ["a:1883", "a:1883"])], "mqtt.hosts", "twice"),
]


@pytest.mark.parametrize(("edits", "key", "words"), HOSTS_ERRORS, ids=[repr(e[-1][1])[:50] for e, _, _ in HOSTS_ERRORS])
def test_mqtt_hosts_errors(edits, key, words):
    message = error_of(variant(*edits))
    assert_one_line(message, SOURCE, key + ":")
    assert words in message, message


def test_top_level_not_a_mapping():
    for data in (["upstream"], "upstream", 5):
        message = error_of(data)
        assert_one_line(message, SOURCE, "")
        assert "mapping" in message


def test_unknown_key_with_a_newline_is_still_one_line():
    message = error_of(variant(("upstream.typo\nkey", 1)))
    assert "\n" not in message
    assert "unknown key" in message


def test_room_id_with_trailing_newline_is_refused():
    message = error_of(variant(("rooms.0.id", "opd-1\n")))
    assert message.startswith(f"{SOURCE}: rooms[0].id")


def test_a_room_may_name_its_home_assistant_area():
    config = parse_config(variant(("rooms.0.area", "Outpatients")), SOURCE)
    assert config.rooms[0].area == "Outpatients"
    assert config.rooms[1].area is None
    assert error_of(variant(("rooms.0.area", ""))).startswith(f"{SOURCE}: rooms[0].area")
    assert error_of(variant(("rooms.0.area", 7))).startswith(f"{SOURCE}: rooms[0].area")


# -- files -------------------------------------------------------------------------------


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("upstream:\n  url: wss://x/ws\n  token: t\nrooms: [\n  {id: a}\n  bad: : :\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert_one_line(message, str(path), "line ")
    assert "invalid YAML" in message
    line = int(message.split("line ")[1].split(":")[0])
    assert 4 <= line <= 7


def test_invalid_yaml_mapping_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("upstream:\n  url: wss://x/ws\nmqtt: port: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: line 3: invalid YAML")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert_one_line(message, str(path), "cannot read")
    assert "No such file" in message


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert_one_line(str(info.value), str(tmp_path), "cannot read")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(FULL))
    path.chmod(0)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_one_line(str(info.value), str(path), "cannot read")


def test_path_through_a_file_is_unreadable_even_for_root(tmp_path):
    blocker = tmp_path / "etc"
    blocker.write_text("")
    path = blocker / "config.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_one_line(str(info.value), str(path), "cannot read")


def test_not_utf8_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"upstream:\n  url: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_one_line(str(info.value), str(path), "cannot read")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert_one_line(message, str(path), "")
    assert "empty" in message


def test_errors_from_a_file_name_the_file_and_key(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(variant(("upstream.backoff.max", "ten"))))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_one_line(str(info.value), str(path), "upstream.backoff.max: expected a number > 0")


def test_python_specific_yaml_tags_are_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("upstream: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_one_line(str(info.value), str(path), "line 1")


# -- the CLI -----------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("STATE_DIRECTORY", "CREDENTIALS_DIRECTORY")}
    return subprocess.run(
        [sys.executable, "-m", "waiting_room", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env,
    )


def test_check_good_file_exits_0(tmp_path, pki):
    path = tmp_path / "config.yaml"
    # check reads the TLS files it names (tests/test_tls.py): this CA file exists.
    path.write_text(yaml.safe_dump(variant(("mqtt.ca_file", str(pki.ca.cert)))))
    done = cli("check", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert str(path) in done.stdout
    assert done.stderr == ""


def test_check_bad_file_exits_2_with_one_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(variant(("upstream.backoff.max", "ten"))))
    done = cli("check", "--config", str(path))
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{path}: upstream.backoff.max: ")
    assert done.stdout == ""


def test_check_missing_file_exits_2_with_one_line(tmp_path):
    done = cli("check", "--config", str(tmp_path / "missing.yaml"))
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1
    assert "missing.yaml" in done.stderr


def test_run_bad_file_exits_2_with_one_line_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("upstream:\n  url: http://not-a-websocket\n  token: t\nrooms:\n  - id: opd-1\n")
    done = cli("run", "--config", str(path))
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{path}: upstream.url: ")
    assert "Traceback" not in done.stderr
