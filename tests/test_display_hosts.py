"""The display's Host allow-list (DNS rebinding): a request whose Host is not the listen
address, localhost/loopback or a name in display.allowed_hosts gets 421 on every path,
/healthz and /ws included, even with a matching Origin."""

from __future__ import annotations

import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from browser import http_get, serving
from waiting_room.config import DisplayConfig, RoomConfig
from waiting_room.display.server import HostCheck, host_name
from waiting_room.store import RoomStore

ROOMS = [RoomConfig(id="opd-1", name="OPD 1")]
PATHS = ["/", "/rooms/opd-1", "/healthz", "/static/display.css", "/favicon.ico", "/ws", "/nope"]


def store() -> RoomStore:
    return RoomStore((r.id, r.title) for r in ROOMS)


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("kiosk.example:8080", "kiosk.example"),
        ("Kiosk.Example.", "kiosk.example"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("[fe80::1]", "fe80::1"),
        ("::1", "::1"),
        ("", None),
        (None, None),
        ("[", None),
        (":8080", None),
    ],
)
def test_host_name(header, name):
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("listen", "allowed", "host", "ok"),
    [
        ("127.0.0.1", [], "127.0.0.1:8080", True),
        ("127.0.0.1", [], "localhost:8080", True),
        ("127.0.0.1", [], "LOCALHOST.", True),
        ("127.0.0.1", [], "127.0.0.2", True),  # loopback
        ("127.0.0.1", [], "[::1]:8080", True),
        ("127.0.0.1", [], "evil.example:8080", False),
        ("127.0.0.1", [], "10.0.0.5:8080", False),  # an IP that is not ours
        ("127.0.0.1", [], None, False),
        ("10.0.0.5", [], "10.0.0.5:8443", True),  # the listen address
        ("10.0.0.5", ["wall-1.ward.example"], "wall-1.ward.example:8443", True),
        ("10.0.0.5", ["wall-1.ward.example"], "wall-2.ward.example:8443", False),
        ("10.0.0.5", ["wall-1.ward.example"], "ward.example", False),
        ("10.0.0.5", ["Wall-1.Ward.Example."], "wall-1.ward.example", True),
        ("0.0.0.0", [], "192.168.1.20:8080", True),  # wildcard: any IP literal
        ("0.0.0.0", [], "[2001:db8::7]:8080", True),
        ("0.0.0.0", [], "evil.example", False),  # ... but never an unknown name
        ("0.0.0.0", [], "192.168.1.20.nip.io", False),
        ("::", ["kiosk"], "kiosk", True),
        ("[::]", [], "evil.example", False),
        ("kiosk.example", [], "kiosk.example:8080", True),  # listening on a name
    ],
)
def test_host_check(listen, allowed, host, ok):
    assert HostCheck(listen, allowed)(host) is ok


@pytest.mark.parametrize("path", PATHS)
async def test_every_path_refuses_an_unknown_host(path):
    async with serving(DisplayConfig(listen="127.0.0.1:0"), ROOMS, store()) as svc:
        headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Origin": "http://evil.example:8080"}
        status, response_headers, body = await http_get(svc.port, path, headers if path == "/ws" else None,
                                                        host="evil.example:8080")
        assert status == 421, (path, status, body)
        assert b"display.allowed_hosts" in body and b"patients" not in body
        assert response_headers["content-type"] == "text/plain; charset=utf-8"
        assert "default-src 'self'" in response_headers["content-security-policy"]
        # The same request with a known Host is answered.
        status, _, _ = await http_get(svc.port, path, headers if path == "/ws" else None, host="localhost")
        assert status != 421


async def test_a_rebound_websocket_gets_nothing_even_with_a_matching_origin():
    """What a page at http://evil.example:PORT does after its name was rebound to the display:
    its WebSocket carries Host and Origin evil.example, which agree with each other."""
    async with serving(DisplayConfig(listen="127.0.0.1:0"), ROOMS, store()) as svc:
        with pytest.raises(InvalidStatus) as info:
            # Host and Origin from the URI; the TCP connection to the display's address.
            async with connect(f"ws://evil.example:{svc.port}/ws", origin=f"http://evil.example:{svc.port}",  # type: ignore[arg-type]
                               host="127.0.0.1", port=svc.port):
                pass
        assert info.value.response.status_code == 421
        async with connect(f"ws://127.0.0.1:{svc.port}/ws", origin=f"http://127.0.0.1:{svc.port}") as ws:  # type: ignore[arg-type]
            assert json.loads(await ws.recv())["type"] == "hello"


async def test_two_host_headers_are_refused_not_an_error():
    async with serving(DisplayConfig(listen="127.0.0.1:0"), ROOMS, store()) as svc:
        status, _, _ = await http_get(svc.port, "/healthz", {"Host": "evil.example"})  # a second Host
        assert status == 421


async def test_allowed_names_and_ip_literals_on_a_wildcard_listener():
    cfg = DisplayConfig(listen="0.0.0.0:0", allowed_hosts=["wall-1.ward.example"])
    async with serving(cfg, ROOMS, store()) as svc:
        for host, expected in [
            (f"wall-1.ward.example:{svc.port}", 200),
            (f"192.168.7.20:{svc.port}", 200),
            (f"[::1]:{svc.port}", 200),
            (f"wall-2.ward.example:{svc.port}", 421),
            ("", 421),  # no Host at all
        ]:
            status, _, _ = await http_get(svc.port, "/rooms/opd-1", host=host)
            assert status == expected, (host, status)
        status, _, body = await http_get(svc.port, "/healthz")
        assert json.loads(body)["refused_hosts"] == 2


async def test_refusals_are_logged_at_a_limited_rate(caplog):
    caplog.set_level("INFO", logger="waiting_room.display.server")
    async with serving(DisplayConfig(listen="127.0.0.1:0"), ROOMS, store()) as svc:
        for _ in range(5):
            assert (await http_get(svc.port, "/healthz", host="evil.example"))[0] == 421
    lines = [r.getMessage() for r in caplog.records if "refused a request for Host" in r.getMessage()]
    assert len(lines) == 1 and "'evil.example'" in lines[0], lines
