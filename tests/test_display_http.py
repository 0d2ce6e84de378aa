"""The display server over real sockets: pages, static files, /healthz and the push channel."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from browser import http_get, serving
from conftest import make_config, running, wait_store
from waiting_room.config import DisplayConfig, RoomConfig
from waiting_room.model import LinkStatus
from waiting_room.store import RoomStore

ROOMS = [RoomConfig(id="opd-1", name="OPD 1"), RoomConfig(id="lab", name="Laboratory", locale="bn")]
EVIL = '<img src=x onerror=alert(1)>'


def display(**kw: object) -> DisplayConfig:
    return DisplayConfig(listen="127.0.0.1:0", **kw)  # type: ignore[arg-type]


def store_for(rooms: list[RoomConfig]) -> RoomStore:
    return RoomStore((r.id, r.title) for r in rooms)


async def recv_json(ws, timeout: float = 5.0) -> dict:
    async with asyncio.timeout(timeout):
        return json.loads(await ws.recv())


async def recv_until(ws, predicate, timeout: float = 5.0) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            frame = json.loads(await ws.recv())
            if predicate(frame):
                return frame


async def wait_app(app, predicate, what: str, timeout: float = 10.0) -> None:
    """wait_store, failing with what the store held (link, components) instead of a bare timeout."""
    try:
        await wait_store(app, predicate, timeout)
    except TimeoutError:
        raise AssertionError(
            f"timed out waiting for {what}: link={app.store.link}, components={dict(app.store.components)}"
        ) from None


def patients_of(frame: dict, room: str) -> int | None:
    for r in frame.get("rooms", []):
        if r["room"] == room:
            return r["patients"]
    return None


def assert_secure(headers: dict[str, str]) -> None:
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


async def test_pages_static_files_and_content_types():
    async with serving(display(), ROOMS, store_for(ROOMS)) as svc:
        port = svc.port
        status, headers, body = await http_get(port, "/")
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert_secure(headers)
        assert b'data-config="' in body and b"OPD 1" in body and b"Laboratory" in body
        # No inline script anywhere: the CSP would refuse it, and the page needs none.
        assert body.count(b"<script") == 1 and b'<script src="/static/display.js?v=' in body

        status, headers, body = await http_get(port, "/rooms/lab")
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert b'lang="bn"' in body and "অপেক্ষমাণ রোগী".encode() in body and b"Laboratory" in body
        assert b"OPD 1" not in body
        assert (await http_get(port, "/rooms/lab?lang=en"))[2].count(b'lang="en"') == 1
        assert (await http_get(port, "/rooms/opd-1/"))[0] == 200

        for name, ctype in (("display.js", "text/javascript; charset=utf-8"), ("display.css", "text/css; charset=utf-8")):
            status, headers, body = await http_get(port, f"/static/{name}")
            assert status == 200 and headers["content-type"] == ctype and len(body) > 1000
            assert_secure(headers)
            assert headers["cache-control"] == "no-cache"
            versioned = await http_get(port, f"/static/{name}?v=whatever")
            assert "immutable" in versioned[1]["cache-control"]

        status, headers, body = await http_get(port, "/healthz")
        assert status == 503 and headers["content-type"] == "application/json"
        assert json.loads(body)["upstream"]["status"] == "connecting"
        assert (await http_get(port, "/favicon.ico"))[0] == 204
        status, headers, _ = await http_get(port, "/", method="POST")
        assert status == 405 and headers["allow"] == "GET"


@pytest.mark.parametrize(
    "target",
    [
        "/rooms/nope",
        "/rooms/",
        "/rooms/opd-1/x",
        "/rooms/OPD-1",
        "/static/../config.py",
        "/static/%2e%2e/config.py",
        "/static/%2E%2E%2Fconfig.py",
        "/static/..%2fconfig.py",
        "/static/..%5cconfig.py",
        "/static/display.js/../../config.py",
        "/static/./display.js",
        "/static//etc/passwd",
        "/static/index.html",
        "/static/",
        "/../../config.py",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/rooms/../display/server.py",
        "/rooms/opd-1/../../../pyproject.toml",
        "/locales/en.json",
        "/server.py",
        "/wsx",
    ],
)
async def test_unknown_paths_and_traversal_are_404(target):
    async with serving(display(), ROOMS, store_for(ROOMS)) as svc:
        status, headers, body = await http_get(svc.port, target)
        assert status == 404, (target, status)
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert_secure(headers)
        for secret in (b"import ", b"class ", b"root:", b"[project]", b"Waiting patients"):
            assert secret not in body, (target, secret)


async def test_unknown_room_has_a_clear_message():
    async with serving(display(), ROOMS, store_for(ROOMS)) as svc:
        status, _, body = await http_get(svc.port, "/rooms/x-ray")
        assert status == 404 and b"Unknown room" in body and b"no such room" in body
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://127.0.0.1:{svc.port}/ws?room=x-ray", open_timeout=5):
                pass
        assert refused.value.response.status_code == 404


async def test_access_token_required_for_pages_and_feed(tmp_path: Path):
    token_file = tmp_path / "display-token"
    token_file.write_text("s3cret-display\n")
    for cfg in (display(access_token="s3cret-display"), display(access_token_file=str(token_file))):
        async with serving(cfg, ROOMS, store_for(ROOMS)) as svc:
            port = svc.port
            for target in ("/", "/rooms/opd-1", "/?token=wrong", "/rooms/opd-1?token=s3cret-displayX", "/?token="):
                status, headers, body = await http_get(port, target)
                assert status == 401 and b"Access token required" in body, target
                assert b"OPD 1" not in body
            # An unknown room is not revealed to someone without the token.
            assert (await http_get(port, "/rooms/x-ray"))[0] == 401
            assert (await http_get(port, "/?token=s3cret-display"))[0] == 200
            assert (await http_get(port, "/rooms/opd-1?token=s3cret-display"))[0] == 200
            assert (await http_get(port, "/rooms/x-ray?token=s3cret-display"))[0] == 404
            # Static files are public code, and the page loads them without the token.
            assert (await http_get(port, "/static/display.js"))[0] == 200
            for url in (f"ws://127.0.0.1:{port}/ws", f"ws://127.0.0.1:{port}/ws?token=nope"):
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(url, open_timeout=5):
                        pass
                assert refused.value.response.status_code == 401
            async with connect(f"ws://127.0.0.1:{port}/ws?room=lab&token=s3cret-display", open_timeout=5) as ws:
                assert (await recv_json(ws))["type"] == "hello"


async def test_room_names_and_upstream_strings_are_never_emitted_unescaped():
    rooms = [
        RoomConfig(id="opd-1", name=EVIL, label='</script><script>alert("label")</script>'),
        RoomConfig(id="lab", name='"><svg onload=alert(2)>{{config}}'),
    ]
    store = store_for(rooms)
    store.apply_queue("opd-1", 3, now_serving='<script>alert("ticket")</script>')
    async with serving(display(), rooms, store) as svc:
        for target in ("/", "/rooms/opd-1", "/rooms/lab"):
            status, _, body = await http_get(svc.port, target)
            assert status == 200
            text = body.decode()
            for raw in ("<img", "<svg", "</script><script>", "alert(1)>", '"><svg', "<script>alert"):
                assert raw not in text, (target, raw)
            assert body.count(b"<script") == 1
        page = (await http_get(svc.port, "/"))[2].decode()
        assert "&lt;img src=x onerror=alert(1)&gt;" in page
        # The feed carries them as JSON strings: the page puts them in with textContent.
        async with connect(f"ws://127.0.0.1:{svc.port}/ws", open_timeout=5) as ws:
            frame = await recv_until(ws, lambda f: f["type"] == "state")
            names = {r["room"]: r for r in frame["rooms"]}
            assert names["opd-1"]["name"] == EVIL
            assert names["opd-1"]["now_serving"] == '<script>alert("ticket")</script>'


async def test_a_change_just_after_the_first_screen_of_a_view_connects_reaches_it():
    # Found by bench/chaos: the first screen of a view got the whole state, then a change
    # arrived before the view's fan-out task had subscribed; the task threw its replay away
    # as "already sent", and the screen showed the old number as live until the next change.
    store = store_for(ROOMS)
    store.set_link(LinkStatus.CONNECTED)
    store.apply_queue("lab", 1, now_serving="L-1")
    async with serving(display(heartbeat=5), ROOMS, store) as svc:
        make_view = svc._view
        loop = asyncio.get_running_loop()

        def view_then_change(room):
            # Queued before the fan-out task's first step: it runs once the connection
            # handler has sent the whole state and yields.
            loop.call_soon(store.apply_queue, "lab", 42, "L-42")
            return make_view(room)

        svc._view = view_then_change
        async with connect(f"ws://127.0.0.1:{svc.port}/ws", open_timeout=5) as ws:
            first = await recv_until(ws, lambda f: f["type"] == "state")
            assert {r["room"]: r["patients"] for r in first["rooms"]}["lab"] == 1
            later = await recv_until(ws, lambda f: f["type"] == "state" and any(r["room"] == "lab" for r in f["rooms"]))
            assert {r["room"]: r["patients"] for r in later["rooms"]}["lab"] == 42


async def test_feed_sends_whole_state_then_changes_and_heartbeats():
    store = store_for(ROOMS)
    store.set_link(LinkStatus.CONNECTED)
    store.apply_queue("opd-1", 5, now_serving="A-3")
    async with serving(display(heartbeat=0.2), ROOMS, store) as svc:
        async with connect(f"ws://127.0.0.1:{svc.port}/ws", open_timeout=5) as all_rooms, \
                connect(f"ws://127.0.0.1:{svc.port}/ws?room=lab", open_timeout=5) as lab_only:
            hello = await recv_json(all_rooms)
            assert hello["type"] == "hello" and hello["heartbeat"] == 0.2
            first = await recv_json(all_rooms)
            assert first["type"] == "state" and first["link"]["status"] == "connected"
            rooms = {r["room"]: r for r in first["rooms"]}
            assert set(rooms) == {"opd-1", "lab"}
            assert rooms["opd-1"]["patients"] == 5 and rooms["opd-1"]["now_serving"] == "A-3"
            assert rooms["opd-1"]["stale"] is False and rooms["lab"]["patients"] is None
            lab_first = await recv_until(lab_only, lambda f: f["type"] == "state")
            assert [r["room"] for r in lab_first["rooms"]] == ["lab"]

            store.apply_queue("opd-1", 6)
            change = await recv_until(all_rooms, lambda f: f["type"] == "state")
            assert patients_of(change, "opd-1") == 6 and "link" not in change
            store.apply_queue("lab", 1)
            assert patients_of(await recv_until(lab_only, lambda f: f["type"] == "state"), "lab") == 1

            # Nothing changes: heartbeats keep coming, so a page can tell "quiet" from "hung".
            beats = 0
            async with asyncio.timeout(3):
                while beats < 3:
                    beats += (await recv_json(all_rooms))["type"] == "heartbeat"

            store.set_link(LinkStatus.DISCONNECTED, "closed 1011")
            lost = await recv_until(all_rooms, lambda f: f["type"] == "state" and "link" in f)
            assert lost["link"]["status"] == "disconnected"
            paused = {r["room"]: r for r in lost["rooms"]}["opd-1"]
            assert paused["stale"] is True and paused["patients"] == 6
            assert paused["as_of"] == pytest.approx(lost["link"]["since"])
            assert svc.clients == 2


async def test_cross_site_websocket_is_refused():
    async with serving(display(), ROOMS, store_for(ROOMS)) as svc:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://127.0.0.1:{svc.port}/ws", origin="http://evil.example", open_timeout=5):
                pass
        assert refused.value.response.status_code == 403
        async with connect(f"ws://127.0.0.1:{svc.port}/ws", origin=f"http://127.0.0.1:{svc.port}",
                           open_timeout=5) as ws:
            assert (await recv_json(ws))["type"] == "hello"


async def test_healthz_follows_upstream_and_mqtt(sim, broker):
    config = make_config(sim.url, broker.port, display={"listen": "127.0.0.1:0"})
    async with running(config) as app:
        svc = app.display  # the daemon's own, as wired in App
        def healthy() -> bool:
            return app.store.link.status is LinkStatus.CONNECTED and app.store.components.get("mqtt") == "connected"

        await wait_app(app, healthy, "upstream and mqtt connected")
        status, _, body = await http_get(svc.port, "/healthz")
        doc = json.loads(body)
        assert status == 200, doc
        assert doc["status"] == "ok" and doc["upstream"]["status"] == "connected" and doc["mqtt"] == "connected"
        assert set(doc["rooms"]) == {"opd-1", "lab"} and 0 <= doc["rooms"]["opd-1"]["age"] < 10
        assert doc["dropped_frames"] == 0
        assert "test-token" not in body.decode()

        port = sim.port
        await sim.stop()
        await wait_app(app, lambda: app.store.link.status is not LinkStatus.CONNECTED, "upstream lost")
        status, _, body = await http_get(svc.port, "/healthz")
        doc = json.loads(body)
        assert status == 503 and doc["upstream"]["status"] == "disconnected"
        assert doc["rooms"]["opd-1"]["stale"] is True
        assert any(p.startswith("upstream") for p in doc["problems"])

        await sim.start(port=port)
        await wait_app(app, healthy, "upstream and mqtt connected")
        assert (await http_get(svc.port, "/healthz"))[0] == 200

        broker.stop()
        await wait_app(app, lambda: app.store.components.get("mqtt") == "disconnected", "mqtt lost")
        status, _, body = await http_get(svc.port, "/healthz")
        assert status == 503 and json.loads(body)["problems"] == ["mqtt disconnected"]
        broker.start()
        await wait_app(app, healthy, "upstream and mqtt connected")
        assert (await http_get(svc.port, "/healthz"))[0] == 200


async def test_200_screens_share_one_upstream_connection(sim, broker):
    # All from one address: its limit (20 by default) raised for the test.
    config = make_config(sim.url, broker.port, display={"listen": "127.0.0.1:0", "max_clients_per_address": 200})
    async with running(config) as app:
        svc = app.display
        await wait_store(app, lambda: app.store.rooms["opd-1"].patients == 5)
        url = f"ws://127.0.0.1:{svc.port}/ws"

        async def screen(i: int, started: asyncio.Event, go: asyncio.Event) -> int:
            async with connect(url if i % 2 else f"{url}?room=opd-1", open_timeout=20) as ws:
                await recv_until(ws, lambda f: patients_of(f, "opd-1") == 5, timeout=20)
                started.set()
                await go.wait()
                frame = await recv_until(ws, lambda f: patients_of(f, "opd-1") == 42, timeout=10)
                return patients_of(frame, "opd-1")

        go = asyncio.Event()
        startups = [asyncio.Event() for _ in range(200)]
        async with asyncio.TaskGroup() as tg:
            screens = [tg.create_task(screen(i, startups[i], go)) for i in range(200)]
            async with asyncio.timeout(30):
                for started in startups:
                    await started.wait()
            assert svc.clients == 200
            sim.set_queue("opd-1", 42)
            go.set()
        assert [s.result() for s in screens] == [42] * 200
        assert sim.connections == 1 and sim.active == 1


async def test_a_screen_that_stops_reading_does_not_hold_the_others():
    # Big frames (many rooms with long names) fill a stuck screen's socket quickly.
    rooms = [RoomConfig(id=f"room-{i}", name=f"Room {i} " + "x" * 190) for i in range(40)]
    store = store_for(rooms)
    async with serving(display(heartbeat=30), rooms, store) as svc:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.setblocking(False)
        await asyncio.get_running_loop().sock_connect(stuck, ("127.0.0.1", svc.port))
        await asyncio.get_running_loop().sock_sendall(
            stuck,
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{svc.port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode(),
        )
        try:
            async with connect(f"ws://127.0.0.1:{svc.port}/ws", open_timeout=5, max_size=None) as fast:
                await recv_until(fast, lambda f: f["type"] == "state")
                assert svc.clients == 2
                for n in range(1, 301):
                    for r in rooms:
                        store.apply_queue(r.id, n)
                    await asyncio.sleep(0)
                    # The fast screen keeps up the whole time.
                    if n % 50 == 0:
                        await recv_until(fast, lambda f, n=n: patients_of(f, "room-0") == n, timeout=2)
                async with asyncio.timeout(5):
                    while svc.slow_clients == 0:
                        store.apply_queue("room-1", 0)
                        await recv_until(fast, lambda f: patients_of(f, "room-1") == 0, timeout=2)
                        store.apply_queue("room-1", 1)
                        await recv_until(fast, lambda f: patients_of(f, "room-1") == 1, timeout=2)
                assert svc.slow_clients == 1
                status, _, body = await http_get(svc.port, "/healthz")
                assert json.loads(body)["slow_clients"] == 1
                async with asyncio.timeout(5):
                    while svc.clients != 1:
                        store.apply_queue("room-2", svc.clients)
                        await recv_until(fast, lambda f: f["type"] == "state", timeout=2)
        finally:
            stuck.close()


async def test_a_reload_adds_and_removes_rooms_on_the_open_pages(sim, broker):
    config = make_config(sim.url, broker.port, display={"listen": "127.0.0.1:0"})
    async with running(config) as app:
        svc = app.display
        await wait_store(app, lambda: app.store.rooms["lab"].patients == 2)
        async with connect(f"ws://127.0.0.1:{svc.port}/ws", open_timeout=5) as ws:
            await recv_until(ws, lambda f: patients_of(f, "lab") == 2)
            sim.add_room("x-ray", 4)
            reloaded = make_config(sim.url, broker.port, display={"listen": "127.0.0.1:0"},
                                   rooms=[{"id": "opd-1", "name": "OPD 1"}, {"id": "x-ray", "name": "X-ray"}])
            await app.apply(reloaded)
            assert app.display is svc  # same display settings: the pages stay connected
            frame = await recv_until(ws, lambda f: "lab" in f.get("removed", []))
            assert frame["type"] == "state"
            await recv_until(ws, lambda f: patients_of(f, "x-ray") == 4)
        assert (await http_get(svc.port, "/rooms/x-ray"))[0] == 200
        assert (await http_get(svc.port, "/rooms/lab"))[0] == 404


async def test_plain_get_of_the_feed_and_a_busy_port():
    async with serving(display(), ROOMS, store_for(ROOMS)) as svc:
        status, headers, _ = await http_get(svc.port, "/ws")
        assert status == 426 and headers["x-content-type-options"] == "nosniff"
        busy = DisplayConfig(listen=f"127.0.0.1:{svc.port}")
        with pytest.raises(OSError):
            async with serving(busy, ROOMS, store_for(ROOMS)):
                pass
