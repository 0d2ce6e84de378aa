"""YAML configuration, validated into frozen structs with one-line errors naming the key.

msgspec does the structural work (types, unknown keys, missing keys) and reports a JSON
path; ``load_config`` turns that into ``config.yaml: upstream.backoff.max: expected a number
> 0, got "ten"``, the line an operator can act on without reading a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
import yaml

from .protocol import ROOM_ID_PATTERN

_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNITS: Final = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_TOPIC_BAD: Final = re.compile(r"[+#\x00]")
_CLOSE_ACTIONS: Final = ("backoff", "prompt", "at_least_max", "refresh_token", "auth_failed", "restart")


class ConfigError(Exception):
    """A configuration problem, as the one line an operator sees (exit status 2)."""


class Seconds(float):
    """A duration > 0: a number of seconds, or a string such as "500ms", "10s", "2m"."""


def parse_duration(value: object) -> Seconds:
    if isinstance(value, bool):
        raise ValueError("expected a number > 0")
    if isinstance(value, (int, float)):
        # abs() first: float() of an integer beyond the float range raises OverflowError.
        seconds = float(value) if abs(value) < 10**7 else float("inf")
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError('expected a number > 0 (seconds, or a string like "10s" or "500ms")')
    if not 0 < seconds < 10**7:
        raise ValueError("expected a number > 0")
    return Seconds(seconds)


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is Seconds:
        return parse_duration(value)
    raise NotImplementedError


def _check_topic(name: str, value: str) -> None:
    if not value or _TOPIC_BAD.search(value) or "" in value.split("/"):
        raise ValueError(
            f"{name}: expected an MQTT topic without +, #, NUL, an empty level or a leading or trailing /"
        )


def _check_pair(cert_file: str | None, key_file: str | None, ca_file: str | None = None) -> None:
    """A client or server certificate comes with its private key: both or neither."""
    if cert_file and not key_file:
        raise ValueError("key_file: required with cert_file")
    if key_file and not cert_file:
        raise ValueError("cert_file: required with key_file")
    for name, value in (("cert_file", cert_file), ("key_file", key_file), ("ca_file", ca_file)):
        if value is not None and not value.strip():
            raise ValueError(f"{name}: expected a file name")


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class BackoffConfig(_Strict):
    initial: Seconds = Seconds(1.0)
    max: Seconds = Seconds(10.0)

    def __post_init__(self) -> None:
        if self.max < self.initial:
            raise ValueError("max: expected a number >= initial")


TokenIn = Literal["header", "query"]
CloseAction = Literal["backoff", "prompt", "at_least_max", "refresh_token", "auth_failed", "restart"]

_HTTP_URL: Final = re.compile(r"^https?://[^/?#\s]+([/?#]\S*)?$")
_PROXY_URL: Final = re.compile(r"^https?://([^/?#\s@]+@)?[^/?#\s@:]+(:\d{1,5})?/?$")


class FallbackConfig(_Strict):
    """The HTTP snapshot polled while no socket is joined (docs/protocol.md, "The snapshot")."""

    url: str
    # The shortest interval between polls; the server's ``poll`` may raise it, never lower it.
    interval: Seconds = Seconds(5.0)
    # How long without a joined socket before polling starts.
    after: Seconds = Seconds(10.0)

    def __post_init__(self) -> None:
        if not _HTTP_URL.match(self.url):
            raise ValueError("url: expected an http:// or https:// URL")


class UpstreamConfig(_Strict):
    url: str
    token: str | None = None
    token_file: str | None = None
    token_command: str | list[str] | None = None
    token_credential: str | None = None
    token_in: TokenIn = "header"
    backoff: BackoffConfig = msgspec.field(default_factory=BackoffConfig)
    # None: twice the server's hello heartbeat plus 5 s (PROTOCOL.md).
    heartbeat_timeout: Seconds | None = None
    # Silence this long brings a client ``ping`` (PROTOCOL.md); no answer within ping_timeout
    # drops the link: a half-open one is noticed within their sum.
    ping_interval: Seconds = Seconds(5.0)
    ping_timeout: Seconds = Seconds(4.0)
    # A connection must be joined and receiving this long before the backoff resets.
    stable_after: Seconds = Seconds(10.0)
    connect_timeout: Seconds = Seconds(10.0)
    # A room the server refused is asked for again this often.
    room_retry: Seconds = Seconds(60.0)
    # How often the token file is checked for a rotation; a JWT is renewed this long before exp.
    token_check: Seconds = Seconds(5.0)
    token_renew_before: Seconds = Seconds(60.0)
    # Operators' overrides of PROTOCOL.md's close-code table, e.g. {4401: refresh_token}.
    close_codes: dict[int, CloseAction] = {}
    # The snapshot to poll while the socket cannot be had; None: no polling.
    fallback: FallbackConfig | None = None
    # An HTTP proxy for both the socket (CONNECT) and the snapshot; None: the environment's
    # https_proxy / http_proxy / no_proxy apply.
    proxy: str | None = None
    # TLS (tls.py): verify the server against this CA bundle instead of the system's; present
    # this client certificate (mutual TLS). For the socket and the snapshot alike.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if not re.match(r"^wss?://[^/?#\s]+", self.url):
            raise ValueError("url: expected a ws:// or wss:// URL")
        sources = [k for k in ("token", "token_file", "token_command", "token_credential")
                   if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError(
                "expected exactly one of token, token_file, token_command, token_credential"
                + (f" (found {', '.join(sources)})" if sources else "")
            )
        if isinstance(self.token_command, str) and not shlex.split(self.token_command):
            raise ValueError("token_command: expected a command")
        if isinstance(self.token_command, list) and not self.token_command:
            raise ValueError("token_command: expected a command")
        for code in self.close_codes:
            if not 1000 <= code <= 4999:
                raise ValueError(f"close_codes: {code}: expected a close code 1000..4999")
        if self.proxy is not None and not _PROXY_URL.match(self.proxy):
            raise ValueError("proxy: expected an http://host:port proxy URL")
        _check_pair(self.cert_file, self.key_file, self.ca_file)
        if (self.ca_file or self.cert_file) and not (
            self.url.startswith("wss://") or (self.fallback is not None and self.fallback.url.startswith("https://"))
        ):
            key = "ca_file" if self.ca_file else "cert_file"
            raise ValueError(f"{key}: only used with a wss:// url (or an https:// fallback.url)")

    @property
    def token_argv(self) -> list[str] | None:
        if self.token_command is None:
            return None
        if isinstance(self.token_command, str):
            return shlex.split(self.token_command)
        return list(self.token_command)


class RoomConfig(_Strict):
    id: Annotated[str, msgspec.Meta(pattern=ROOM_ID_PATTERN)]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    # Display overrides: this room's language and the label above its number.
    locale: str | None = None
    label: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    # Home Assistant: the area the room's device is put in when it first appears there
    # (discovery's suggested_area); a user may move it later.
    area: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None

    @property
    def title(self) -> str:
        return self.name or self.id


_MQTT_HOST: Final = "127.0.0.1"
_MQTT_PORT: Final = 1883


def _split_node(node: str) -> tuple[str, int] | None:
    """ "host:port" or "[v6]:port" -> (host, port); None if it is neither."""
    host, sep, port = node.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not _is_ip(host):
            return None
    elif ":" in host:
        return None  # an IPv6 address needs its brackets before the port
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    if not (_HOST_NAME.match(host) or _is_ip(host)):
        return None
    return host, int(port)


class MqttConfig(_Strict):
    host: str = _MQTT_HOST
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = _MQTT_PORT
    base_topic: str = "waiting-room"
    discovery_prefix: str | bool = "homeassistant"
    username: str | None = None
    password_file: str | None = None
    password_credential: str | None = None
    # TLS to the broker when set, verified against this CA bundle; with cert_file + key_file
    # the daemon presents a client certificate (mosquitto's require_certificate).
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    # The broker declares a silent (hung, stopped) daemon dead after 1.5 x keepalive and
    # publishes its will: 5 s shows "offline" within 7.5 s (13 s with mosquitto 2.0, which
    # checks keepalives every 5-6 s).
    keepalive: Annotated[int, msgspec.Meta(ge=2, le=3600)] = 5
    backoff: BackoffConfig = msgspec.field(default_factory=BackoffConfig)
    # The nodes of a clustered broker, ["host:port", ...], instead of host and port: the
    # first that answers is used; when it is lost the daemon tries the next, then around.
    hosts: Annotated[list[str], msgspec.Meta(max_length=100)] | None = None
    # A node that takes the TCP connection but does not answer the CONNECT (a cluster node
    # during a re-election) is left after this long, for the next one.
    connect_timeout: Seconds = Seconds(10.0)

    def __post_init__(self) -> None:
        if self.hosts is not None:
            if (self.host, self.port) != (_MQTT_HOST, _MQTT_PORT):
                raise ValueError("hosts: expected either hosts or host and port, not both")
            if not self.hosts:
                raise ValueError('hosts: expected at least one "host:port"')
            for i, node in enumerate(self.hosts):
                if _split_node(node) is None:
                    raise ValueError(f'hosts[{i}]: expected "host:port", e.g. "broker-2.example:1883"')
            if len(set(self.nodes)) != len(self.nodes):
                raise ValueError("hosts: a node is listed twice")
        _check_topic("base_topic", self.base_topic)
        if self.discovery_prefix is True:
            raise ValueError("discovery_prefix: expected a topic prefix, or false")
        if isinstance(self.discovery_prefix, str):
            _check_topic("discovery_prefix", self.discovery_prefix)
        if (self.password_file or self.password_credential) and not self.username:
            raise ValueError("username: required with password_file or password_credential")
        if self.password_file and self.password_credential:
            raise ValueError("expected one of password_file, password_credential")
        _check_pair(self.cert_file, self.key_file, self.ca_file)
        if self.cert_file and not self.ca_file:
            raise ValueError("cert_file: needs ca_file (TLS to the broker is on when ca_file is set)")

    @property
    def discovery(self) -> str | None:
        return self.discovery_prefix if isinstance(self.discovery_prefix, str) else None

    @property
    def nodes(self) -> tuple[tuple[str, int], ...]:
        """The broker's nodes as (host, port), in the configured order: ``hosts``, or the
        one ``host`` and ``port``."""
        if self.hosts is None:
            return ((self.host, self.port),)
        return tuple(n for n in map(_split_node, self.hosts) if n is not None)


_LOCALE_RE: Final = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")
# A DNS name: labels of letters, digits, hyphens and underscores, an optional final dot.
_HOST_NAME: Final = re.compile(r"^(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                               r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]") if text.startswith("[") and text.endswith("]") else text)
    except ValueError:
        return False
    return True


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError('listen: expected "host:port", e.g. "127.0.0.1:8080"')
    return host.strip("[]"), int(port)


class DisplayConfig(_Strict):
    """The wall displays: kiosk pages served by the daemon, and command-driven signs."""

    enabled: bool = True
    listen: str = "127.0.0.1:8080"
    locale: str = "en"
    # Required when listening beyond loopback? Optional: browsers pass it as ?token=.
    access_token: str | None = None
    access_token_file: str | None = None
    # Heartbeat to the pages: they show "offline" when it stops.
    heartbeat: Seconds = Seconds(5.0)
    # A program run on each change, e.g. ["/usr/local/bin/sign", "{room}", "{patients}"].
    command: Annotated[list[str], msgspec.Meta(min_length=1)] | None = None
    command_timeout: Seconds = Seconds(10.0)
    # Screens (WebSocket clients) in all, and from one address (an IPv6 /64 counts as one);
    # beyond them a client gets 503 + Retry-After. Both also bound the open connections.
    max_clients: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 500
    max_clients_per_address: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 20
    # HTTPS: the pages, /ws and /healthz over TLS with this certificate (chain) and key.
    cert_file: str | None = None
    key_file: str | None = None
    # Host names the display is reached by, besides the listen address and localhost: a
    # request with any other Host is refused (DNS rebinding).
    allowed_hosts: Annotated[list[str], msgspec.Meta(max_length=1000)] = []

    def __post_init__(self) -> None:
        _split_listen(self.listen)
        if not _LOCALE_RE.match(self.locale):
            raise ValueError("locale: expected a language code such as en or bn")
        if self.access_token is not None and self.access_token_file is not None:
            raise ValueError("expected one of access_token, access_token_file")
        _check_pair(self.cert_file, self.key_file)
        for i, name in enumerate(self.allowed_hosts):
            if not _HOST_NAME.match(name) and not _is_ip(name):
                raise ValueError(
                    f"allowed_hosts[{i}]: expected a host name or an IP address, without scheme or port"
                )

    @property
    def host(self) -> str:
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_listen(self.listen)[1]


class Config(_Strict):
    upstream: UpstreamConfig
    rooms: Annotated[list[RoomConfig], msgspec.Meta(min_length=1, max_length=100_000)]
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    display: DisplayConfig = msgspec.field(default_factory=DisplayConfig)
    # Where the last known state is kept; default $STATE_DIRECTORY (systemd), else none.
    state_dir: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for i, room in enumerate(self.rooms):
            if room.id in seen:
                raise ValueError(f"rooms[{i}].id: duplicate room id")
            seen.add(room.id)
            if room.locale is not None and not _LOCALE_RE.match(room.locale):
                raise ValueError(f"rooms[{i}].locale: expected a language code such as en or bn")

    @property
    def room_ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.rooms)


_TYPE_WORDS: Final = {
    "float": "a number",
    "int": "an integer",
    "str": "a string",
    "bool": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "nothing",
}


_CHOICES: Final = {
    "token_in": "header or query",
    "log_level": "debug, info, warning or error",
    "close_codes": "one of " + ", ".join(_CLOSE_ACTIONS),
}


def _words(msg: str) -> str:
    """msgspec's `float`, `bool | str` -> "a number", "true or false or a string"."""
    def say(m: re.Match[str]) -> str:
        return " or ".join(_TYPE_WORDS.get(t.strip(), t.strip()) for t in m.group(1).split("|"))

    return re.sub(r"`([\w |]+)`", say, msg)


def _lookup(data: Any, path: list[str | int]) -> tuple[bool, Any]:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, data


def _parse_path(raw: str) -> list[str | int]:
    parts: list[str | int] = []
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]", raw):
        parts.append(name if name else int(index) if index.isdigit() else "...")
    return parts


def _dotted(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) or p == "..." else (f".{p}" if out else p)
    return out


# Keys whose values are secrets: an error names the key, never the value.
_SECRET_KEYS: Final = frozenset({"token", "access_token", "password"})
_URL_USERINFO: Final = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s\"]*@")
_TOKEN_PARAMETER: Final = re.compile(r"(?i)([?&](?:access_)?token=)[^&#\s\"]*")


def _without_secrets(shown: str) -> str:
    """A value as an error line may show it: no userinfo in a URL (a proxy's password), no
    token in a query."""
    return _TOKEN_PARAMETER.sub(r"\1***", _URL_USERINFO.sub(r"\1***@", shown))


def _describe(exc: msgspec.ValidationError, data: Any) -> str:
    """msgspec's "Expected `float`, got `str` - at `$.a.b`" -> "a.b: expected a number, got "x"."""
    text = str(exc)
    message, _, where = text.partition(" - at `")
    path = _parse_path(where.rstrip("`")) if where else []
    if m := re.match(r"Object contains unknown field `(.+)`", message, re.S):
        return f"{_dotted([*path, m.group(1)])}: unknown key"
    if m := re.match(r"Object missing required field `(.+)`", message, re.S):
        return f"{_dotted([*path, m.group(1)])}: required key is missing"
    # Our own checks may name a sub-key first ("max: expected ...").
    if m := re.match(r"^([A-Za-z_\[\]0-9.]+): (.*)$", message):
        path = [*path, *_parse_path("." + m.group(1))]
        message = m.group(2)
    if message.startswith("Invalid enum value"):
        key = next((p for p in reversed(path) if isinstance(p, str) and p != "..."), "")
        message = f"expected {_CHOICES.get(key, 'one of the documented values')}"
    message = _words(message)
    message = message[0].lower() + message[1:] if message else "invalid value"
    message = re.sub(r", got (a|an|true|nothing) \S.*$", "", message)
    found, value = _lookup(data, path)
    key = next((p for p in reversed(path) if isinstance(p, str) and p != "..."), "")
    if found and key in _SECRET_KEYS:
        pass  # a secret, even a malformed one, is never shown
    elif found and not isinstance(value, (dict, list)):
        try:
            shown = json.dumps(value, ensure_ascii=False, default=str)
        except ValueError:  # an integer beyond Python's int-to-str limit (4300 digits)
            shown = "a number too long to show"
        shown = _without_secrets(shown)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        message += f", got {shown}"
    return f"{_dotted(path) or '(top level)'}: {message}"


def parse_config(data: Any, source: str = "config") -> Config:
    if data is None:
        raise ConfigError(f"{source}: the file is empty; expected at least upstream and rooms")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return msgspec.convert(data, Config, dec_hook=_dec_hook, str_keys=True)
    except msgspec.ValidationError as exc:
        # One line, whatever a quoted YAML key or value holds.
        line = _describe(exc, data).replace("\r", "\\r").replace("\n", "\\n")
        raise ConfigError(f"{source}: {line}") from None


def load_config(path: str | os.PathLike[str]) -> Config:
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{name}: cannot read: {reason}") from None
    try:
        # libyaml's C loader when present: a 10,000-room file loads in a fraction of the time.
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{name}: {where}invalid YAML: {problem}") from None
    except ValueError as exc:  # a scalar the YAML constructor cannot build: 2024-02-30, 5,000 digits
        raise ConfigError(f"{name}: invalid YAML: {exc}") from None
    return parse_config(data, name)
