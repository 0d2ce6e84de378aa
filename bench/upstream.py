"""The benchmark's upstream: a PROTOCOL.md server built to send fast and to timestamp.

It follows the contract (bearer token, ``hello``, ``joined`` then a ``queue`` snapshot, JSON
``ping`` every heartbeat, ``error`` for unknown rooms) but sends ``queue`` frames by writing
pre-encoded WebSocket frames straight to the transport: one write per paced frame, large
writes for a flood. websockets writes whole frames, so nothing interleaves mid-frame.

Connections are told apart by their token: the daemon presents ``daemon``, the bare floor
client ``bare``, the seed stack ``seed``. ``go_down``/``go_up`` simulate an outage on the same port; while down, a
listener accepts and resets every TCP connection, so attempts can be counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .wsraw import text_frame

PATH = "/ws/waiting-room"
TOKENS = ("daemon", "bare", "seed")
HEARTBEAT = 15


def rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def queue_json(room: str, patients: int, seq: int, ts: str, now_serving: str = "A-17") -> bytes:
    return (
        '{"type":"queue","room":"%s","patients":%d,"now_serving":"%s","seq":%d,"ts":"%s"}'  # noqa: UP031
        % (room, patients, now_serving, seq, ts)
    ).encode()


@dataclass
class Conn:
    label: str
    ws: ServerConnection
    opened_ns: int
    joined: set[str] = field(default_factory=set)
    all_joined: asyncio.Event = field(default_factory=asyncio.Event)


class _Resetter(asyncio.Protocol):
    """While 'down': every TCP connection is counted and reset at once."""

    def __init__(self, up: FastUpstream) -> None:
        self.up = up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.up.refused_attempts.append(time.monotonic_ns())
        transport.abort()  # type: ignore[attr-defined]


class FastUpstream:
    def __init__(self, rooms: dict[str, int] | None = None, heartbeat: int = HEARTBEAT) -> None:
        self.rooms: dict[str, int] = dict(rooms or {})
        self.seq: dict[str, int] = {r: 1 for r in self.rooms}
        self.heartbeat = heartbeat
        self.host = "127.0.0.1"
        self.port = 0
        self.conns: list[Conn] = []
        self.handshakes: list[tuple[int, str]] = []  # (monotonic_ns, label)
        self.refused_attempts: list[int] = []
        self.joins = 0
        self._server: Server | None = None
        self._resetter: asyncio.base_events.Server | None = None
        self._changed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{PATH}"

    async def start(self) -> None:
        self._server = await serve(
            self._handle, self.host, self.port, process_request=self._check,
            ping_interval=None, max_size=64 * 1024, compression=None, close_timeout=1,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._resetter is not None:
            self._resetter.close()
            await self._resetter.wait_closed()
            self._resetter = None

    async def go_down(self) -> None:
        """Every connection closed with 1001 (a restart), then nothing but resets."""
        await self.stop()
        self.refused_attempts.clear()
        loop = asyncio.get_running_loop()
        self._resetter = await loop.create_server(lambda: _Resetter(self), self.host, self.port, reuse_address=True)

    async def go_up(self) -> None:
        if self._resetter is not None:
            self._resetter.close()
            await self._resetter.wait_closed()
            self._resetter = None
        await self.start()

    # -- observation -----------------------------------------------------------------------

    def conn(self, label: str) -> Conn | None:
        for c in reversed(self.conns):
            if c.label == label:
                return c
        return None

    def active(self, label: str | None = None) -> int:
        return sum(1 for c in self.conns if label is None or c.label == label)

    async def wait_for(self, predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()

    # -- server side of PROTOCOL.md ----------------------------------------------------------

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        header = request.headers.get("Authorization", "")
        token = header.partition(" ")[2].strip() if header.lower().startswith("bearer ") else ""
        if token not in TOKENS:
            return connection.respond(401, "token missing, invalid or expired\n")
        self.handshakes.append((time.monotonic_ns(), token))
        self._notify()
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        header = ws.request.headers.get("Authorization", "")
        conn = Conn(header.partition(" ")[2].strip(), ws, time.monotonic_ns())
        self.conns.append(conn)
        self._notify()
        beat = asyncio.create_task(self._heartbeat(ws))
        try:
            await ws.send(json.dumps({"type": "hello", "heartbeat": self.heartbeat}))
            async for message in ws:
                self._on_frame(conn, message)
        except ConnectionClosed:
            pass
        finally:
            beat.cancel()
            self.conns.remove(conn)
            self._notify()

    async def _heartbeat(self, ws: ServerConnection) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                await ws.send('{"type":"ping"}')
            except ConnectionClosed:
                return

    def _on_frame(self, conn: Conn, message: str | bytes) -> None:
        try:
            frame = json.loads(message)
        except ValueError:
            return
        kind = frame.get("type") if isinstance(frame, dict) else None
        room = frame.get("room") if isinstance(frame, dict) else None
        write = conn.ws.transport.write
        if kind == "join" and isinstance(room, str):
            self.joins += 1
            if room not in self.rooms:
                write(text_frame(json.dumps({"type": "error", "room": room, "code": "unknown_room",
                                             "message": "no such room"}).encode()))
                return
            conn.joined.add(room)
            write(text_frame(b'{"type":"joined","room":"%s"}' % room.encode()))
            write(text_frame(queue_json(room, self.rooms[room], self.seq[room], rfc3339_now())))
            if len(conn.joined) >= len(self.rooms):
                conn.all_joined.set()
                self._notify()
        elif kind == "leave" and isinstance(room, str):
            conn.joined.discard(room)
        elif kind == "ping":
            write(text_frame(b'{"type":"pong"}'))

    # -- sending -----------------------------------------------------------------------------

    def set_room(self, room: str, patients: int) -> tuple[bytes, int]:
        """Record a new value; returns the encoded frame (for sending) and its seq."""
        self.seq[room] = self.seq.get(room, 0) + 1
        self.rooms[room] = patients
        return queue_json(room, patients, self.seq[room], rfc3339_now()), self.seq[room]

    def send_now(self, conn: Conn, room: str, patients: int) -> int:
        """One queue frame, written at once; returns monotonic_ns taken just before the write."""
        payload, _ = self.set_room(room, patients)
        frame = text_frame(payload)
        t = time.monotonic_ns()
        conn.ws.transport.write(frame)
        return t

    async def flood(self, conn: Conn, chunks: list[bytes], high_water: int = 1024 * 1024,
                    timeout: float = 120.0) -> tuple[int, int]:
        """Write a pre-encoded flood as fast as the peer takes it. Each chunk holds whole
        frames, so whatever else goes out on this connection lands between frames.

        Returns (first write, last byte handed to the kernel) in monotonic_ns.
        """
        transport = conn.ws.transport
        deadline = time.monotonic() + timeout
        t_first = time.monotonic_ns()
        for chunk in chunks:
            transport.write(chunk)
            while transport.get_write_buffer_size() > high_water:
                if transport.is_closing() or time.monotonic() > deadline:
                    raise ConnectionError("flood receiver went away or stalled")
                await asyncio.sleep(0.0002)
        while transport.get_write_buffer_size() > 0:
            if transport.is_closing() or time.monotonic() > deadline:
                raise ConnectionError("flood receiver went away or stalled")
            await asyncio.sleep(0.0002)
        return t_first, time.monotonic_ns()
