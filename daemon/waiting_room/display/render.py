"""What the display serves, as pure functions: pages, push frames, the health document.

No sockets and no event loop here, so every security-relevant choice (what is escaped, which
paths exist, what a browser may see) can be tested by feeding values in and reading bytes out.
The only I/O is reading the package's own files, once, at start-up (``load_assets``).
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Iterable, Mapping

import msgspec

from ..config import RoomConfig
from ..model import LinkState, LinkStatus, RoomState
from ..store import Batch

HERE: Final = Path(__file__).resolve().parent
STATIC_DIR: Final = HERE / "static"
LOCALES_DIR: Final = HERE / "locales"
DEFAULT_LOCALE: Final = "en"

# The only files a browser can ever get from static/: a fixed whitelist, never a path join.
STATIC_FILES: Final = MappingProxyType({
    "display.js": "text/javascript; charset=utf-8",
    "display.css": "text/css; charset=utf-8",
})

_LOCALE_NAME: Final = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")
_PLACEHOLDER: Final = re.compile(r"\{\{(\w+)\}\}")

# Every response, including errors: the page loads nothing from elsewhere and runs no inline code.
SECURITY_HEADERS: Final = (
    (
        "Content-Security-Policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    # The access token travels in the page's query string: never leak it to another site.
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)

_encode = msgspec.json.Encoder().encode


class LocaleError(Exception):
    """A locale file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Locale:
    code: str
    name: str
    digits: str  # the ten digits 0..9 in this script
    direction: str  # "ltr" or "rtl"
    strings: Mapping[str, str]

    def for_page(self) -> dict[str, Any]:
        return {"digits": self.digits, "dir": self.direction, "strings": dict(self.strings)}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


@dataclass(frozen=True)
class Assets:
    """The page template, the whitelisted static files and the locales, read once."""

    template: str
    static: Mapping[str, Asset]
    locales: Mapping[str, Locale]

    def url(self, name: str) -> str:
        # Content-addressed: a kiosk caches the file until the daemon ships a new one.
        return f"/static/{name}?v={self.static[name].etag}"


def parse_locale(code: str, text: str, fallback: Locale | None = None) -> Locale:
    """A locale file: ``{"name": ..., "digits": "0123456789", "strings": {...}}``.

    Missing strings come from ``fallback`` (English), so a new language can start small.
    """
    if not _LOCALE_NAME.match(code):
        raise LocaleError(f"{code}.json: the file name must be a language code such as en or bn")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise LocaleError(f"{code}.json: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LocaleError(f"{code}.json: expected a JSON object")
    digits = data.get("digits", fallback.digits if fallback else "0123456789")
    if not isinstance(digits, str) or len(digits) != 10:
        raise LocaleError(f"{code}.json: digits: expected a string of the ten digits 0 to 9")
    direction = data.get("dir", "ltr")
    if direction not in ("ltr", "rtl"):
        raise LocaleError(f"{code}.json: dir: expected ltr or rtl")
    strings = data.get("strings", {})
    if not isinstance(strings, dict) or not all(isinstance(v, str) for v in strings.values()):
        raise LocaleError(f"{code}.json: strings: expected an object of strings")
    merged = dict(fallback.strings) if fallback else {}
    merged.update(strings)
    name = data.get("name", code)
    return Locale(code, name if isinstance(name, str) else code, digits, direction, merged)


def load_assets(static_dir: Path = STATIC_DIR, locales_dir: Path = LOCALES_DIR) -> Assets:
    """Blocking file reads: call once at start-up, in a thread."""
    template = (static_dir / "index.html").read_text(encoding="utf-8")
    static = {}
    for name, content_type in STATIC_FILES.items():
        body = (static_dir / name).read_bytes()
        static[name] = Asset(body, content_type, hashlib.sha256(body).hexdigest()[:16])
    english = parse_locale(DEFAULT_LOCALE, (locales_dir / f"{DEFAULT_LOCALE}.json").read_text(encoding="utf-8"))
    locales = {DEFAULT_LOCALE: english}
    for path in sorted(locales_dir.glob("*.json")):
        if path.stem != DEFAULT_LOCALE:
            locales[path.stem] = parse_locale(path.stem, path.read_text(encoding="utf-8"), english)
    return Assets(template, static, locales)


def fill(template: str, values: Mapping[str, str]) -> str:
    """One pass over ``{{name}}`` placeholders, each value HTML-escaped (quotes too).

    A substituted value is never scanned again, so a room called ``{{config}}`` stays text.
    """
    return _PLACEHOLDER.sub(lambda m: html.escape(values.get(m.group(1), ""), quote=True), template)


def resolve_locale(wanted: str | None, locales: Mapping[str, Locale]) -> str:
    """``bn-BD`` falls back to ``bn``, anything unknown to English."""
    if wanted:
        if wanted in locales:
            return wanted
        base = wanted.split("-", 1)[0]
        if base in locales:
            return base
    return DEFAULT_LOCALE


@dataclass(frozen=True)
class PageOptions:
    """What a page needs beyond the rooms: its timings, so tests can make them short."""

    heartbeat: float
    backoff_initial: float = 1.0
    backoff_max: float = 10.0  # as the daemon's own upstream.backoff.max
    stable_after: float = 10.0


def page_config(
    rooms: Iterable[RoomConfig],
    room: str | None,
    locale: str,
    assets: Assets,
    options: PageOptions,
) -> dict[str, Any]:
    """The page's settings, embedded as data (never as code) in the HTML."""
    shown = list(rooms)
    used = {locale} | {resolve_locale(r.locale, assets.locales) for r in shown if r.locale}
    return {
        "room": room,
        "ws": "/ws" if room is None else f"/ws?room={room}",
        "heartbeat": options.heartbeat,
        "backoff": [options.backoff_initial, options.backoff_max],
        "stable": options.stable_after,
        "locale": locale,
        "rooms": [
            {
                "id": r.id,
                "name": r.title,
                "locale": resolve_locale(r.locale, assets.locales) if r.locale else None,
                "label": r.label,
            }
            for r in shown
        ],
        "locales": {code: assets.locales[code].for_page() for code in sorted(used)},
    }


def render_page(
    rooms: Iterable[RoomConfig],
    room: str | None,
    locale: str,
    assets: Assets,
    options: PageOptions,
) -> bytes:
    shown = list(rooms)
    config = page_config(shown, room, locale, assets, options)
    strings = assets.locales[locale].strings
    title = shown[0].title if room is not None and shown else strings.get("title", "Waiting room")
    return fill(
        assets.template,
        {
            "lang": locale,
            "dir": assets.locales[locale].direction,
            "title": title,
            "css": assets.url("display.css"),
            "js": assets.url("display.js"),
            "noscript": strings.get("noscript", ""),
            "config": json.dumps(config, ensure_ascii=False, separators=(",", ":")),
        },
    ).encode("utf-8")


def render_message(title: str, message: str, assets: Assets | None = None) -> bytes:
    """A small error page (unknown room, token required): readable on a kiosk, fully escaped."""
    css = f'<link rel="stylesheet" href="{html.escape(assets.url("display.css"))}">' if assets else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>{css}</head>"
        f'<body class="message" data-state="error"><main><h1>{html.escape(title)}</h1>'
        f"<p>{html.escape(message)}</p></main></body></html>"
    ).encode("utf-8")


# -- push frames ---------------------------------------------------------------------------


def as_of(state: RoomState, link: LinkState) -> float | None:
    """When this room's number was last known to be current, for "last updated HH:MM".

    While values arrive (by the socket, or polled while ``degraded``) that is the last
    frame or poll; once they stop, a number heard on this run was live until then
    (``link.since``). A number restored from a previous run (no connection yet) is as old
    as its last frame.
    """
    if state.received_at is None:
        return None
    if (
        not link.status.live
        and link.connects > 0
        and state.received_at <= link.since
        and state.error is None
    ):
        return link.since
    return state.received_at


def room_payload(state: RoomState, link: LinkState) -> dict[str, Any]:
    return {
        "room": state.room,
        "name": state.name,
        "patients": state.patients,
        "now_serving": state.now_serving,
        "stale": state.stale,
        "error": state.error,
        "as_of": as_of(state, link),
    }


def link_payload(link: LinkState) -> dict[str, Any]:
    """``feed`` is ``socket``, ``poll`` (with ``poll_interval``, seconds) or null."""
    return {"status": link.status.value, "since": link.since, "feed": link.status.feed,
            "poll_interval": link.poll_interval}


def hello_frame(heartbeat: float, now: float) -> bytes:
    return _encode({"type": "hello", "heartbeat": heartbeat, "now": now})


def heartbeat_frame(now: float) -> bytes:
    return _encode({"type": "heartbeat", "now": now})


def state_frame(batch: Batch, link: LinkState, wanted: str | None, now: float) -> bytes | None:
    """The push for one store batch, limited to one room when the page shows one; None if
    nothing in it concerns this page."""
    rooms = []
    removed = []
    for room, state in batch.rooms.items():
        if wanted is not None and room != wanted:
            continue
        if state is None:
            removed.append(room)
        else:
            rooms.append(room_payload(state, link))
    if not rooms and not removed and batch.link is None:
        return None
    frame: dict[str, Any] = {"type": "state", "now": now, "rooms": rooms}
    if removed:
        frame["removed"] = removed
    if batch.link is not None:
        frame["link"] = link_payload(batch.link)
    return _encode(frame)


# -- /healthz --------------------------------------------------------------------------------


def health(
    link: LinkState,
    components: Mapping[str, str],
    rooms: Mapping[str, RoomState],
    dropped_frames: int,
    now: float,
    required: Iterable[str] = ("mqtt",),
    extra: Mapping[str, Any] | None = None,
) -> tuple[int, bytes]:
    """200 when values arrive (the upstream is connected, or ``degraded``: polling the
    snapshot) and every required component is connected, else 503. Degraded is working:
    the top-level ``status`` says ``degraded`` rather than ``ok``, with the same 200."""
    problems = []
    if not link.status.live:
        problems.append(f"upstream {link.status.value}")
    for name in required:
        status = components.get(name, "unknown")
        if status != "connected":
            problems.append(f"{name} {status}")
    overall = "unhealthy" if problems else "degraded" if link.status is LinkStatus.DEGRADED else "ok"
    doc: dict[str, Any] = {
        "status": overall,
        "problems": problems,
        "upstream": {
            "status": link.status.value,
            "detail": link.detail,
            "since": link.since,
            "connects": link.connects,
            "feed": link.status.feed,
            "poll_interval": link.poll_interval,
        },
        "mqtt": components.get("mqtt", "unknown"),
        "components": dict(components),
        "dropped_frames": dropped_frames,
        "rooms": {
            room: {
                "age": None if s.received_at is None else round(max(0.0, now - s.received_at), 3),
                "stale": s.stale,
                "error": s.error,
            }
            for room, s in rooms.items()
        },
    }
    if extra:
        doc.update(extra)
    return (200 if not problems else 503), _encode(doc) + b"\n"
