"""The simulator must follow PROTOCOL.md, since the daemon's tests trust it as upstream."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from waiting_room.simulator import SNAPSHOT_PATH, Simulator, _next_ticket, add_arguments, run_from_args
from waiting_room.snapshot import RoomRefused, RoomSnapshot, Snapshot, SnapshotDecoder

DEADLINE = 2.0


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(initial_patients={"opd-1": 5, "lab": 2}, seed=1) as simulator:
        yield simulator


async def recv(ws: ClientConnection, timeout: float = DEADLINE) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        return json.loads(await ws.recv())


async def recv_type(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """Next frame of this type, skipping heartbeats and other noise."""
    async with asyncio.timeout(DEADLINE):
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == kind:
                return frame


async def expect_close(ws: ClientConnection, timeout: float = DEADLINE) -> int | None:
    async with asyncio.timeout(timeout):
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.recv()
    return ws.close_code


def http_get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=DEADLINE) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_hello_join_snapshot_and_leave(sim: Simulator) -> None:
    async with connect(sim.url) as ws:
        assert await recv(ws) == {"type": "hello", "heartbeat": 15}
        await ws.send(json.dumps({"type": "join", "room": "opd-1"}))
        assert await recv(ws) == {"type": "joined", "room": "opd-1"}
        snapshot = await recv(ws)
        assert snapshot["type"] == "queue" and snapshot["room"] == "opd-1"
        assert snapshot["patients"] == 5 and snapshot["seq"] == 1
        assert snapshot["now_serving"] == sim.rooms["opd-1"].now_serving
        assert snapshot["ts"].endswith("Z")
        assert sim.joins == ["opd-1"] and sim.joined_rooms() == {"opd-1"}
        assert (sim.handshakes, sim.connections, sim.active) == (1, 1, 1)

        await ws.send(json.dumps({"type": "join", "room": "opd-1"}))  # harmless repeat
        assert (await recv(ws))["type"] == "joined"
        assert (await recv(ws))["seq"] == 1
        await ws.send(json.dumps({"type": "leave", "room": "lab"}))  # not joined: harmless
        await ws.send(json.dumps({"type": "leave", "room": "opd-1"}))
        await sim.wait_until(lambda: len(sim.leaves) == 2)
        assert sim.joined_rooms() == set()
    await sim.wait_until(lambda: sim.active == 0)


async def test_unknown_and_forbidden_rooms_keep_connection(sim: Simulator) -> None:
    sim.forbid("lab")
    async with connect(sim.url) as ws:
        await recv_type(ws, "hello")
        await ws.send(json.dumps({"type": "join", "room": "opd-9"}))
        error = await recv(ws)
        assert error["type"] == "error" and error["room"] == "opd-9" and error["code"] == "unknown_room"
        assert isinstance(error["message"], str)
        await ws.send(json.dumps({"type": "join", "room": "lab"}))
        assert (await recv(ws))["code"] == "forbidden"
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv(ws) == {"type": "pong"}
    assert sim.joins == ["opd-9", "lab"]


async def test_token_header_and_query() -> None:
    async with Simulator(token="s3cret") as sim:
        for url, headers in ((sim.url, None), (sim.url + "?token=nope", None),
                             (sim.url, {"Authorization": "Bearer wrong"})):
            with pytest.raises(InvalidStatus) as info:
                async with connect(url, additional_headers=headers):
                    pass
            assert info.value.response.status_code == 401
        async with connect(sim.url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            await recv_type(ws, "hello")
        async with connect(sim.url + "?token=s3cret") as ws:
            await recv_type(ws, "hello")
        assert sim.tokens_seen == ["", "nope", "wrong", "s3cret", "s3cret"]
        assert (sim.handshakes, sim.connections) == (5, 2)
        sim.set_token(None)
        async with connect(sim.url) as ws:
            await recv_type(ws, "hello")


async def test_refuse_with_retry_after(sim: Simulator) -> None:
    sim.refuse(503, retry_after=7)
    with pytest.raises(InvalidStatus) as info:
        async with connect(sim.url):
            pass
    assert info.value.response.status_code == 503
    assert info.value.response.headers["Retry-After"] == "7"
    sim.refuse(None)
    async with connect(sim.url) as ws:
        await recv_type(ws, "hello")
    assert (sim.handshakes, sim.connections) == (2, 1)


async def test_close_all_with_code(sim: Simulator) -> None:
    async with connect(sim.url) as first, connect(sim.url) as second:
        await sim.wait_until(lambda: sim.active == 2)
        await sim.close_all(4001, "token expired")
        assert sim.active == 0
        assert await expect_close(first) == 4001
        assert await expect_close(second) == 4001
        assert second.close_reason == "token expired"
    with pytest.raises(ValueError):
        await sim.close_all(1006)


async def test_heartbeat_pong_then_4008() -> None:
    async with Simulator(heartbeat=0.05, pong_timeout=0.1) as sim:
        async with connect(sim.url) as ws:
            assert (await recv(ws))["heartbeat"] == 0.05
            assert await recv(ws) == {"type": "ping"}
            await ws.send(json.dumps({"type": "pong"}))
            await sim.wait_until(lambda: sim.pongs == 1)
            assert await recv(ws) == {"type": "ping"}  # connection survived; now stay mute
            assert await expect_close(ws) == 4008
        assert sim.pongs == 1


async def test_single_room_mode() -> None:
    with pytest.raises(ValueError):
        Simulator(("a", "b"), single_room=True)
    async with Simulator(("opd-1",), single_room=True, initial_patients={"opd-1": 3}) as sim:
        async with connect(sim.url) as ws:
            await recv_type(ws, "hello")
            first = await recv(ws)
            assert first["type"] == "queue" and "room" not in first and first["patients"] == 3
            sim.set_queue("opd-1", 7, "B-3")
            update = await recv(ws)
            assert "room" not in update
            assert (update["patients"], update["now_serving"], update["seq"]) == (7, "B-3", first["seq"] + 1)


async def test_set_queue_reaches_only_subscribers(sim: Simulator) -> None:
    async with connect(sim.url) as opd, connect(sim.url) as lab:
        for ws, room in ((opd, "opd-1"), (lab, "lab")):
            await recv_type(ws, "hello")
            await ws.send(json.dumps({"type": "join", "room": room}))
            await recv_type(ws, "queue")
        sim.set_queue("opd-1", 9, "A-30")
        sim.set_queue("lab", 4)
        update = await recv(opd)
        assert (update["room"], update["patients"], update["now_serving"], update["seq"]) == ("opd-1", 9, "A-30", 2)
        other = await recv(lab)  # the opd-1 update never reached lab's connection
        assert (other["room"], other["patients"], other["seq"]) == ("lab", 4, 2)
        assert sim.rooms["opd-1"].seq == 2


async def test_tick_moves_queues_within_range() -> None:
    sim = Simulator(tick=0.005, seed=7, initial_patients={"opd-1": 39, "lab": 0})
    async with sim:
        async with connect(sim.url) as ws:
            await recv_type(ws, "hello")
            last: dict[str, dict[str, Any]] = {}
            for room in ("opd-1", "lab"):
                await ws.send(json.dumps({"type": "join", "room": room}))
                await recv_type(ws, "joined")
                last[room] = await recv_type(ws, "queue")
            for _ in range(40):
                frame = await recv_type(ws, "queue")
                previous = last[frame["room"]]
                assert 0 <= frame["patients"] <= 40
                assert frame["seq"] == previous["seq"] + 1
                if frame["patients"] < previous["patients"]:
                    assert frame["patients"] == previous["patients"] - 1
                    assert frame["now_serving"] == _next_ticket(previous["now_serving"])
                else:
                    assert 1 <= frame["patients"] - previous["patients"] <= 2 or frame["patients"] == 40
                last[frame["room"]] = frame
    assert _next_ticket("A-17") == "A-18" and _next_ticket("B-009") == "B-010"


async def test_silent_sends_nothing_but_keeps_tcp() -> None:
    async with Simulator(heartbeat=0.05, pong_timeout=0.05) as sim:
        sim.set_silent(True)
        async with connect(sim.url) as ws:
            await ws.send(json.dumps({"type": "ping"}))
            with pytest.raises(TimeoutError):
                await recv(ws, timeout=0.3)  # several heartbeats: no hello, ping, pong or 4008
            async with asyncio.timeout(DEADLINE):
                await (await ws.ping())  # the TCP/WebSocket layer still answers
            sim.set_silent(False)
            assert await recv_type(ws, "ping") == {"type": "ping"}
            await sim.send_raw("raw frame")  # explicit test actions work regardless
            async with asyncio.timeout(DEADLINE):
                while await ws.recv() != "raw frame":
                    pass


async def test_junk_client_frames_are_ignored(sim: Simulator) -> None:
    async with connect(sim.url) as ws:
        await recv_type(ws, "hello")
        for junk in ("not json", b"\x00\x01", "[1, 2]", '{"type": "bogus"}', '{"type": "join", "room": 5}'):
            await ws.send(junk)
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv(ws) == {"type": "pong"}
        assert sim.frames_received == 6 and sim.joins == []


async def test_send_raw_and_rooms_added_and_removed(sim: Simulator) -> None:
    sim.add_room("xray", 4)
    async with connect(sim.url) as ws:
        await recv_type(ws, "hello")
        await ws.send(json.dumps({"type": "join", "room": "xray"}))
        assert (await recv_type(ws, "queue"))["patients"] == 4
        sim.remove_room("xray")
        assert sim.joined_rooms() == set()
        await ws.send(json.dumps({"type": "join", "room": "xray"}))
        assert (await recv(ws))["code"] == "unknown_room"
        await sim.send_raw(b"\xff binary")
        assert await ws.recv() == b"\xff binary"


async def test_http_control(sim: Simulator) -> None:
    base = f"http://127.0.0.1:{sim.port}/control"
    async with connect(sim.url) as ws:
        await recv_type(ws, "hello")
        await ws.send(json.dumps({"type": "join", "room": "opd-1"}))
        await recv_type(ws, "queue")

        status, state = await asyncio.to_thread(http_get, f"{base}/state")
        assert status == 200
        assert (state["handshakes"], state["active"], state["joins"]) == (1, 1, 1)
        assert state["rooms"]["opd-1"] == {"patients": 5, "now_serving": sim.rooms["opd-1"].now_serving, "seq": 1}

        status, state = await asyncio.to_thread(http_get, f"{base}/set?room=opd-1&patients=12&now_serving=C-1")
        assert status == 200 and state["rooms"]["opd-1"]["seq"] == 2
        update = await recv_type(ws, "queue")
        assert (update["patients"], update["now_serving"]) == (12, "C-1")

        assert (await asyncio.to_thread(http_get, f"{base}/set?room=nope&patients=1"))[0] == 404
        assert (await asyncio.to_thread(http_get, f"{base}/set?room=opd-1&patients=x"))[0] == 400
        assert (await asyncio.to_thread(http_get, f"{base}/nothing"))[0] == 404

        status, state = await asyncio.to_thread(http_get, f"{base}/silent?on=1")
        assert state["silent"] is True
        status, state = await asyncio.to_thread(http_get, f"{base}/silent?on=0")
        assert state["silent"] is False

        status, body = await asyncio.to_thread(http_get, f"{base}/close?code=4000")
        assert (status, body["closed"]) == (200, 1)
        assert await expect_close(ws) == 4000

    status, state = await asyncio.to_thread(http_get, f"{base}/refuse?status=429&retry_after=5")
    assert state["refusing"] == 429
    with pytest.raises(InvalidStatus) as info:
        async with connect(sim.url):
            pass
    assert info.value.response.status_code == 429 and info.value.response.headers["Retry-After"] == "5"
    await asyncio.to_thread(http_get, f"{base}/refuse?status=0")

    status, state = await asyncio.to_thread(http_get, f"{base}/token?value=T0k")
    assert state["auth"] is True and "T0k" not in json.dumps(state)
    with pytest.raises(InvalidStatus):
        async with connect(sim.url):
            pass
    async with connect(sim.url + "?token=T0k") as ws:
        await recv_type(ws, "hello")


async def test_stop_closes_with_1001_and_is_idempotent() -> None:
    sim = Simulator(tick=0.01)
    await sim.start()
    async with connect(sim.url) as ws:
        await recv_type(ws, "hello")
        await sim.stop()
        assert await expect_close(ws) == 1001
    await sim.stop()
    assert sim.active == 0
    with pytest.raises(TimeoutError):
        await sim.wait_until(lambda: False, timeout=0.01)


async def test_cli_runs_until_cancelled(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args([])
    assert (defaults.port, defaults.heartbeat, defaults.tick, defaults.single_room) == (8765, 15.0, 3.0, False)

    args = parser.parse_args(["--port", "0", "--rooms", "a,b", "--token", "hush", "--seed", "3"])
    ready: asyncio.Future[Simulator] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_from_args(args, on_ready=ready.set_result))
    try:
        async with asyncio.timeout(DEADLINE):
            sim = await ready
        assert set(sim.rooms) == {"a", "b"}
        async with connect(sim.url, additional_headers={"Authorization": "Bearer hush"}) as ws:
            await recv_type(ws, "hello")
            task.cancel()
            assert await expect_close(ws) == 1001
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    out = capsys.readouterr().out
    assert out.startswith(f"simulator listening on ws://127.0.0.1:{sim.port}/ws/waiting-room (control: http://")
    assert "hush" not in out


async def test_restart_on_same_port_keeps_rooms() -> None:
    """Daemon reconnection tests restart the upstream where the client expects it."""
    sim = Simulator(initial_patients={"opd-1": 1, "lab": 1})
    await sim.start()
    port, url = sim.port, sim.url
    sim.set_queue("opd-1", 6)
    await sim.stop()
    await sim.start(port=port)
    try:
        assert sim.url == url
        async with connect(sim.url) as ws:
            await recv_type(ws, "hello")
            await ws.send(json.dumps({"type": "join", "room": "opd-1"}))
            snapshot = await recv_type(ws, "queue")
            assert (snapshot["patients"], snapshot["seq"]) == (6, 2)
        assert sim.connections == 1
    finally:
        await sim.stop()


# -- the HTTP snapshot (PROTOCOL.md 1.1) and broken upgrades ------------------------------


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    """GET over a plain http.client connection: (status, headers, body); 304 has no body."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=DEADLINE)
    try:
        connection.request("GET", f"{parts.path}?{parts.query}" if parts.query else parts.path,
                           headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


async def aget(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    async with asyncio.timeout(DEADLINE):
        return await asyncio.to_thread(fetch, url, headers)


async def expect_refused(url: str, status: int) -> Any:
    """The handshake fails with ``status``; returns the response."""
    with pytest.raises(InvalidStatus) as info:
        async with asyncio.timeout(DEADLINE):
            async with connect(url):
                pass
    assert info.value.response.status_code == status
    return info.value.response


async def test_snapshot_follows_protocol_1_1(sim: Simulator) -> None:
    sim.forbid("lab")
    sim.add_room("xray", 4)
    assert sim.snapshot_url == f"http://127.0.0.1:{sim.port}{SNAPSHOT_PATH}"
    status, headers, body = await aget(f"{sim.snapshot_url}?room=opd-1&room=lab&room=nope&room=xray&room=opd-1")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert headers["ETag"].startswith('"') and headers["ETag"].endswith('"')
    opd = sim.rooms["opd-1"]
    assert json.loads(body) == {
        "rooms": [
            {"room": "opd-1", "patients": 5, "now_serving": opd.now_serving, "seq": 1, "ts": opd.ts},
            {"room": "lab", "error": "forbidden"},
            {"room": "nope", "error": "unknown_room"},
            {"room": "xray", "patients": 4, "now_serving": sim.rooms["xray"].now_serving, "seq": 1,
             "ts": sim.rooms["xray"].ts},
        ],
        "poll": 5,
    }
    # The daemon's own parser reads it as the contract says.
    result = SnapshotDecoder().decode(body, ["opd-1", "lab", "nope", "xray"])
    assert isinstance(result, Snapshot) and result.dropped == () and result.poll == 5.0
    assert result.rooms["opd-1"] == RoomSnapshot("opd-1", 5, opd.now_serving, opd.ts, 1)
    assert result.rooms["lab"] == RoomRefused("lab", "forbidden")
    assert result.rooms["nope"] == RoomRefused("nope", "unknown_room")
    assert sim.snapshot_last_rooms == ("opd-1", "lab", "nope", "xray")
    assert sim.snapshot_requests == {"served": 1, "not_modified": 0, "refused": 0}
    assert (sim.handshakes, sim.connections) == (0, 0)  # not a WebSocket handshake

    status, _, body = await aget(sim.snapshot_url)
    assert (status, sim.snapshot_requests["refused"]) == (400, 1)


async def test_snapshot_etag_and_304(sim: Simulator) -> None:
    url = f"{sim.snapshot_url}?room=opd-1"
    status, headers, body = await aget(url)
    etag = headers["ETag"]
    for match in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        status, headers, body = await aget(url, {"If-None-Match": match})
        assert (status, headers["ETag"], headers["Cache-Control"], body) == (304, etag, "no-store", b"")
    assert (await aget(url, {"If-None-Match": '"other"'}))[0] == 200
    # Another room set is another answer: another ETag.
    assert (await aget(f"{sim.snapshot_url}?room=lab", {"If-None-Match": etag}))[0] == 200

    sim.set_queue("opd-1", 6)
    status, headers, body = await aget(url, {"If-None-Match": etag})
    assert status == 200 and headers["ETag"] != etag
    assert json.loads(body)["rooms"][0]["patients"] == 6
    sim.set_snapshot_poll(2.5)  # the poll is part of the answer too
    status, _, body = await aget(url, {"If-None-Match": headers["ETag"]})
    assert status == 200 and json.loads(body)["poll"] == 2.5
    sim.set_snapshot_poll(None)
    assert "poll" not in json.loads((await aget(url))[2])
    assert sim.snapshot_requests == {"served": 6, "not_modified": 4, "refused": 0}
    assert sim.state()["snapshot"] == {"served": 6, "not_modified": 4, "refused": 0,
                                       "refusing": None, "poll": None, "raw": False}


async def test_snapshot_token_header_and_query() -> None:
    async with Simulator(token="s3cret", initial_patients={"opd-1": 1, "lab": 2}) as sim:
        url = f"{sim.snapshot_url}?room=lab"
        for target, headers in ((url, None), (url + "&token=nope", None),
                                (url, {"Authorization": "Bearer wrong"})):
            status, response_headers, _ = await aget(target, headers)
            assert (status, response_headers["WWW-Authenticate"]) == (401, "Bearer")
        status, _, body = await aget(url, {"Authorization": "Bearer s3cret"})
        assert status == 200 and json.loads(body)["rooms"][0]["patients"] == 2
        assert (await aget(url + "&token=s3cret"))[0] == 200
        assert sim.snapshot_tokens_seen == ["", "nope", "wrong", "s3cret", "s3cret"]
        assert sim.tokens_seen == [] and sim.handshakes == 0
        assert sim.snapshot_requests == {"served": 2, "not_modified": 0, "refused": 3}
        sim.set_token(None)
        assert (await aget(url))[0] == 200


async def test_snapshot_refusals_are_apart_from_the_socket(sim: Simulator) -> None:
    url = f"{sim.snapshot_url}?room=opd-1"
    for status, retry in ((503, 7), (429, 0.5), (403, None), (401, None)):
        sim.refuse_snapshot(status, retry_after=retry)
        got, headers, _ = await aget(url)
        assert got == status
        assert headers["Retry-After"] == (None if retry is None else str(retry).removesuffix(".0"))
        assert headers["Cache-Control"] == "no-store"
    async with connect(sim.url) as ws:  # the socket is fine meanwhile
        await recv_type(ws, "hello")
    sim.refuse_snapshot(None)
    sim.refuse(503, retry_after=3)  # and the other way round
    assert (await aget(url))[0] == 200
    await expect_refused(sim.url, 503)
    assert sim.snapshot_requests == {"served": 1, "not_modified": 0, "refused": 4}
    with pytest.raises(ValueError):
        sim.refuse_snapshot(999)


async def test_snapshot_raw_body_for_bad_input_tests(sim: Simulator) -> None:
    url = f"{sim.snapshot_url}?room=opd-1"
    for raw in ("<html>not json</html>", b"x" * (1024 * 1024 + 1), b'{"rooms":[{"room":"opd-1","patients":-1}]}'):
        sim.set_snapshot_raw(raw)
        status, headers, body = await aget(url)
        assert (status, body) == (200, raw.encode() if isinstance(raw, str) else raw)
        assert headers["ETag"]
    assert sim.state()["snapshot"]["raw"] is True
    sim.set_snapshot_raw(None)
    assert json.loads((await aget(url))[2])["rooms"][0]["room"] == "opd-1"


@pytest.mark.parametrize("mode", ["426", "400", "200", "403"])
async def test_broken_upgrades_answered_like_a_proxy(sim: Simulator, mode: str) -> None:
    sim.break_upgrades(mode)
    response = await expect_refused(sim.url, int(mode))
    if mode == "426":
        assert response.headers["Upgrade"] == "websocket"
    await expect_refused(sim.url + "?token=x", int(mode))
    assert (sim.upgrades_broken, sim.handshakes, sim.connections) == (2, 0, 0)
    assert sim.state()["break_upgrades"] == mode and sim.state()["upgrades_broken"] == 2
    # Plain HTTP passes: the snapshot is the way round.
    assert (await aget(f"{sim.snapshot_url}?room=opd-1"))[0] == 200
    sim.break_upgrades(None)
    async with connect(sim.url) as ws:
        await recv_type(ws, "hello")
    assert (sim.upgrades_broken, sim.handshakes) == (2, 1)


async def test_broken_upgrades_cut_after_n_seconds(sim: Simulator) -> None:
    sim.break_upgrades("cut", cut_after=0.2)
    loop = asyncio.get_running_loop()
    async with connect(sim.url) as ws:
        started = loop.time()
        await recv_type(ws, "hello")
        await ws.send(json.dumps({"type": "join", "room": "opd-1"}))
        assert (await recv_type(ws, "queue"))["patients"] == 5
        assert await expect_close(ws) == 1006  # no close frame: TCP was cut
        assert loop.time() - started >= 0.15
    await sim.wait_until(lambda: sim.active == 0)
    assert (sim.upgrades_cut, sim.handshakes, sim.connections) == (1, 1, 1)
    assert sim.close_codes == [1006]
    sim.break_upgrades("off")
    async with connect(sim.url) as ws:  # a connection made after the fix is not cut
        await recv_type(ws, "hello")
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv(ws) == {"type": "pong"}
    assert sim.upgrades_cut == 1
    for bad in ("404", "cut-everything"):
        with pytest.raises(ValueError):
            sim.break_upgrades(bad)
    with pytest.raises(ValueError):
        sim.break_upgrades("cut", cut_after=-1)


async def test_http_control_of_snapshot_and_broken_upgrades(sim: Simulator) -> None:
    base = f"http://127.0.0.1:{sim.port}/control"
    status, _, body = await aget(f"{base}/break?mode=403")
    assert status == 200 and json.loads(body)["break_upgrades"] == "403"
    await expect_refused(sim.url, 403)
    status, _, body = await aget(f"{base}/break?mode=cut&after=0.1")
    state = json.loads(body)
    assert (state["break_upgrades"], state["cut_after"], state["upgrades_broken"]) == ("cut", 0.1, 1)
    async with connect(sim.url) as ws:
        await recv_type(ws, "hello")
        assert await expect_close(ws) == 1006
    await sim.wait_until(lambda: sim.upgrades_cut == 1)
    assert (await aget(f"{base}/break?mode=bogus"))[0] == 400
    assert (await aget(f"{base}/break?mode=cut&after=x"))[0] == 400
    status, _, body = await aget(f"{base}/break?mode=off")
    assert json.loads(body)["break_upgrades"] is None

    status, _, body = await aget(f"{base}/snapshot?refuse=429&retry_after=3&poll=2")
    assert json.loads(body)["snapshot"]["refusing"] == 429
    status, headers, _ = await aget(f"{sim.snapshot_url}?room=lab")
    assert (status, headers["Retry-After"]) == (429, "3")
    status, _, body = await aget(f"{base}/snapshot?refuse=0")
    assert json.loads(body)["snapshot"]["refusing"] is None
    assert json.loads((await aget(f"{sim.snapshot_url}?room=lab"))[2])["poll"] == 2
    await aget(f"{base}/snapshot?poll=0")
    assert "poll" not in json.loads((await aget(f"{sim.snapshot_url}?room=lab"))[2])
    assert (await aget(f"{base}/snapshot?refuse=abc"))[0] == 400
    state = json.loads((await aget(f"{base}/state"))[2])
    assert state["snapshot"] == {"served": 2, "not_modified": 0, "refused": 1,
                                 "refusing": None, "poll": None, "raw": False}


async def test_cli_snapshot_and_broken_upgrade_options(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args([])
    assert (defaults.snapshot_path, defaults.snapshot_poll, defaults.break_upgrades, defaults.cut_after) == (
        SNAPSHOT_PATH, 5.0, None, 3.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--break-upgrades", "404"])
    args = parser.parse_args(["--port", "0", "--rooms", "a", "--snapshot-path", "/rooms", "--snapshot-poll", "0",
                              "--break-upgrades", "426"])
    ready: asyncio.Future[Simulator] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_from_args(args, on_ready=ready.set_result))
    try:
        async with asyncio.timeout(DEADLINE):
            sim = await ready
        await expect_refused(sim.url, 426)
        status, _, body = await aget(f"http://127.0.0.1:{sim.port}/rooms?room=a")
        assert status == 200 and "poll" not in json.loads(body)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    out = capsys.readouterr().out
    assert f"snapshot: http://127.0.0.1:{sim.port}/rooms" in out and "upgrades broken: 426" in out
