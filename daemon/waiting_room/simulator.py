"""A stand-in for the hospital's waiting-room socket (server side of PROTOCOL.md).

The demo and the tests need an upstream that follows the contract exactly, and that can
also misbehave on demand (refuse handshakes, go silent, close with any code, send junk)
so the daemon's defences can be exercised in-process without a real hospital system.
It also serves the HTTP snapshot of PROTOCOL.md 1.1 (the fallback) on the same port, and can
break WebSocket upgrades the way a proxy does, so that fallback can be exercised too.

Standalone on purpose: standard library plus ``websockets`` only, no project imports,
so the contract it embodies never drifts with the daemon's own code.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import email.utils
import hashlib
import hmac
import http
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from ssl import SSLContext
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import EXTERNAL_CLOSE_CODES
from websockets.http11 import Request, Response

__all__ = ["BREAK_MODES", "SNAPSHOT_PATH", "RoomQueue", "Simulator", "add_arguments", "run_from_args"]

WS_PATH = "/ws/waiting-room"
SNAPSHOT_PATH = "/api/waiting-room/rooms"
CONTROL_PREFIX = "/control"
DEFAULT_SNAPSHOT_POLL = 5.0
# How a proxy breaks upgrades: "426"/"400" (Upgrade stripped, the server answers the plain
# GET), "200"/"403" (the proxy answers itself), "cut" (upgraded, then cut after N seconds).
BREAK_MODES = ("426", "400", "200", "403", "cut")
MAX_PATIENTS = 40
MAX_FRAME = 64 * 1024
CLOSE_HEARTBEAT_MISSED = 4008
_TICKET = re.compile(r"^(.*?)(\d+)$")


def _now_rfc3339() -> str:
    """UTC time with millisecond precision and a ``Z`` suffix, as clients expect in ``ts``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _next_ticket(ticket: str) -> str:
    """Advance "A-17" to "A-18" (keeping zero padding) so served tickets look real."""
    match = _TICKET.match(ticket)
    if match is None:
        return f"{ticket}-1"
    prefix, digits = match.groups()
    return prefix + str(int(digits) + 1).zfill(len(digits))


def _json_number(value: float) -> int | float:
    """Send 15 rather than 15.0 when the value is whole, like a real server would."""
    return int(value) if float(value).is_integer() else value


def _check_close_code(code: int) -> None:
    """Fail early with a clear error instead of deep inside the library."""
    if not (code in EXTERNAL_CLOSE_CODES or 3000 <= code < 5000):
        raise ValueError(f"close code {code} cannot be sent in a close frame")


@dataclasses.dataclass
class RoomQueue:
    """The current queue of one room, as the simulator would report it."""

    patients: int
    now_serving: str
    seq: int = 1
    ts: str = dataclasses.field(default_factory=_now_rfc3339)


@dataclasses.dataclass(frozen=True)
class _Close:
    """Outbox item: close the connection after everything queued before it is sent."""

    code: int
    reason: str


@dataclasses.dataclass(frozen=True)
class _Frame:
    """Outbox item; ``forced`` frames (test actions) are sent even when silent."""

    data: str | bytes
    forced: bool = False


class _Client:
    """One open connection: its subscriptions and an ordered outbox.

    Everything sent goes through the outbox so that synchronous control methods
    (``set_queue``...) can broadcast without spawning tasks, and so that frames
    keep the order in which they were produced.
    """

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.rooms: set[str] = set()
        self.outbox: asyncio.Queue[_Frame | _Close] = asyncio.Queue()
        self.pong = asyncio.Event()
        self.done = asyncio.Event()


class Simulator:
    """In-process waiting-room server; see PROTOCOL.md for the contract it serves.

    Observations are plain attributes so tests can assert on them directly and
    wait for them with :meth:`wait_until`.
    """

    def __init__(
        self,
        rooms: Iterable[str] = ("opd-1", "lab"),
        *,
        token: str | None = None,
        heartbeat: float = 15.0,
        tick: float = 0.0,
        seed: int | None = None,
        single_room: bool = False,
        pong_timeout: float = 10.0,
        send_hello: bool = True,
        initial_patients: Mapping[str, int] | None = None,
        snapshot_path: str = SNAPSHOT_PATH,
        snapshot_poll: float | None = DEFAULT_SNAPSHOT_POLL,
    ) -> None:
        names = [rooms] if isinstance(rooms, str) else list(rooms)
        if heartbeat <= 0 or pong_timeout <= 0:
            raise ValueError("heartbeat and pong_timeout must be positive")
        if tick < 0:
            raise ValueError("tick must be >= 0")
        if single_room and len(names) != 1:
            raise ValueError("single_room mode needs exactly one room")
        self.heartbeat = heartbeat
        self.tick = tick
        self.pong_timeout = pong_timeout
        self.send_hello = send_hello
        self.single_room = single_room
        self._rng = random.Random(seed)
        self.rooms: dict[str, RoomQueue] = {}
        for index, name in enumerate(names):
            if initial_patients is None:
                patients = self._rng.randint(0, 12)
            else:
                patients = initial_patients.get(name, 0)
            self.rooms[name] = RoomQueue(patients, f"{chr(65 + index % 26)}-{self._rng.randint(1, 30)}")
        self._single = names[0] if single_room else None
        self._token: str | None = token or None
        self._forbidden: set[str] = set()
        self._silent = False
        self._refuse_status: int | None = None
        self._retry_after: float | None = None
        if not snapshot_path.startswith("/") or snapshot_path.rstrip("/") in ("", CONTROL_PREFIX):
            raise ValueError("snapshot_path must be an absolute path outside /control")
        self.snapshot_path = snapshot_path
        self.snapshot_poll = snapshot_poll  # None: the field is left out (clients assume 5)
        self._snapshot_refuse: int | None = None
        self._snapshot_retry_after: float | None = None
        self._snapshot_raw: bytes | None = None
        self._break_mode: str | None = None
        self._cut_after = 3.0

        self.host = "127.0.0.1"
        self.port: int | None = None
        self.url: str | None = None
        self.snapshot_url: str | None = None
        self.handshakes = 0
        self.connections = 0
        self.tokens_seen: list[str] = []
        self.joins: list[str] = []
        self.leaves: list[str] = []
        self.pongs = 0
        self.frames_received = 0
        # The close code of each ended connection (the client's, when it closed first).
        self.close_codes: list[int | None] = []
        # Snapshot requests by outcome: 200, 304, and anything else (401/403/429/503/400).
        self.snapshot_requests = {"served": 0, "not_modified": 0, "refused": 0}
        self.snapshot_tokens_seen: list[str] = []
        self.snapshot_last_rooms: tuple[str, ...] = ()
        self.upgrades_broken = 0  # upgrades answered by the "proxy" (never reach the server)
        self.upgrades_cut = 0  # upgraded connections cut without a close frame

        self._clients: set[_Client] = set()
        self._changed = asyncio.Event()
        self._server: Server | None = None
        self._tick_task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0, ssl: SSLContext | None = None) -> None:
        """Listen; with ``port=0`` the OS picks a free port, published in ``port``/``url``.
        ``ssl``: behind TLS (``wss://``, ``https://``), e.g. with a client certificate required
        (``verify_mode = CERT_REQUIRED`` on the context)."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=self._process_request,
            ping_interval=None,  # the protocol's heartbeat is the JSON ping below
            max_size=MAX_FRAME,
            close_timeout=2.0,
            ssl=ssl,
        )
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]
        netloc = f"[{host}]" if ":" in host else host
        secure = "s" if ssl is not None else ""
        self.url = f"ws{secure}://{netloc}:{self.port}{WS_PATH}"
        self.snapshot_url = f"http{secure}://{netloc}:{self.port}{self.snapshot_path}"
        if self.tick > 0:
            self._tick_task = asyncio.create_task(self._tick_loop(), name="simulator-tick")

    async def stop(self) -> None:
        """Close every connection with 1001 and stop listening; safe to call twice."""
        task, self._tick_task = self._tick_task, None
        if task is not None:
            task.cancel()
            # wait() rather than await: the task's own CancelledError must not be
            # mistaken for ours (stop() often runs while the caller is being cancelled).
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        server, self._server = self._server, None
        if server is not None:
            server.close()  # closes open connections with 1001 (going away)
            await server.wait_closed()
        self._notify()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------- observations

    @property
    def active(self) -> int:
        """Connections open now."""
        return len(self._clients)

    def joined_rooms(self) -> set[str]:
        """Rooms joined on at least one open connection."""
        return set().union(*(client.rooms for client in self._clients))

    def state(self) -> dict[str, Any]:
        """A JSON-ready summary (never includes the token), as served by /control/state."""
        return {
            "handshakes": self.handshakes,
            "connections": self.connections,
            "active": self.active,
            "joins": len(self.joins),
            "leaves": len(self.leaves),
            "pongs": self.pongs,
            "silent": self._silent,
            "refusing": self._refuse_status,
            "auth": self._token is not None,
            "snapshot": {
                **self.snapshot_requests,
                "refusing": self._snapshot_refuse,
                "poll": self.snapshot_poll,
                "raw": self._snapshot_raw is not None,
            },
            "break_upgrades": self._break_mode,
            "cut_after": self._cut_after if self._break_mode == "cut" else None,
            "upgrades_broken": self.upgrades_broken,
            "upgrades_cut": self.upgrades_cut,
            "rooms": {
                name: {"patients": q.patients, "now_serving": q.now_serving, "seq": q.seq}
                for name, q in self.rooms.items()
            },
        }

    async def wait_until(self, predicate: Callable[[], bool], timeout: float | None = 5.0) -> None:
        """Return once ``predicate()`` holds, re-checking after every observable event.

        Event-driven rather than polling, so tests are both fast and free of sleeps.
        """
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"simulator condition not met within {timeout} s") from None

    def _notify(self) -> None:
        """Wake every waiter; a fresh Event per generation means no wake-up is lost."""
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ control

    def set_queue(self, room: str, patients: int, now_serving: str | None = None) -> None:
        """Set a room's count (not clamped, so tests can push odd values) and broadcast it."""
        queue = self.rooms[room]
        queue.patients = patients
        if now_serving is not None:
            queue.now_serving = now_serving
        self._publish(room)

    def add_room(self, room: str, patients: int = 0) -> None:
        """Make a new room joinable (not allowed in single-room mode)."""
        if self._single is not None:
            raise ValueError("single_room mode serves exactly one room")
        if room in self.rooms:
            raise ValueError(f"room {room!r} already exists")
        self.rooms[room] = RoomQueue(patients, f"{chr(65 + len(self.rooms) % 26)}-1")
        self._notify()

    def remove_room(self, room: str) -> None:
        """Drop a room: subscribers stop getting it and later joins get unknown_room."""
        if self._single is not None:
            raise ValueError("single_room mode serves exactly one room")
        del self.rooms[room]
        for client in self._clients:
            client.rooms.discard(room)
        self._notify()

    def forbid(self, room: str) -> None:
        """Later joins of ``room`` are refused with code ``forbidden``."""
        self._forbidden.add(room)

    async def close_all(self, code: int, reason: str = "") -> None:
        """Close every open connection with ``code`` (after frames already queued).

        Works even when silent, since it is an explicit test action. Returns once
        those connections are gone, so ``active`` is already updated.
        """
        _check_close_code(code)
        clients = list(self._clients)
        for client in clients:
            client.outbox.put_nowait(_Close(code, reason))
        await asyncio.gather(*(client.done.wait() for client in clients))

    def set_silent(self, silent: bool) -> None:
        """Freeze: send nothing (no hello, pings, queues, answers) but keep TCP open.

        Frames produced while silent are dropped, not delayed; client frames are still
        counted (joins, leaves, pongs) but joins are not processed. The library still
        answers RFC 6455 pings, as a stuck application behind a live TCP stack would.
        """
        self._silent = silent
        self._notify()

    def refuse(self, status: int | None, retry_after: float | None = None) -> None:
        """Refuse later handshakes with ``status`` (and ``Retry-After``); None stops."""
        if status is not None:
            http.HTTPStatus(status)  # raises ValueError for codes the library cannot send
        self._refuse_status = status
        self._retry_after = retry_after if status is not None else None

    def set_token(self, token: str | None) -> None:
        """Token accepted from now on; None or "" disables auth. Open connections stay."""
        self._token = token or None

    def refuse_snapshot(self, status: int | None, retry_after: float | None = None) -> None:
        """Refuse later snapshot requests with ``status`` (and ``Retry-After``); None stops.

        Independent of :meth:`refuse`, which refuses handshakes only: the socket and the REST
        API can fail apart.
        """
        if status is not None:
            http.HTTPStatus(status)
        self._snapshot_refuse = status
        self._snapshot_retry_after = retry_after if status is not None else None

    def set_snapshot_poll(self, poll: float | None) -> None:
        """The ``poll`` the snapshot announces (not checked: tests push odd values); None omits it."""
        self.snapshot_poll = poll

    def set_snapshot_raw(self, body: str | bytes | None) -> None:
        """Answer snapshot requests (that pass the token check) with exactly this 200 body,
        for bad-input tests (oversized, not JSON, bad entries); None serves real ones again."""
        self._snapshot_raw = body.encode() if isinstance(body, str) else body

    def break_upgrades(self, mode: str | int | None, cut_after: float = 3.0) -> None:
        """Break later WebSocket upgrades the way a proxy does; None (or "off") stops.

        ``"426"`` or ``"400"``: the Upgrade header was stripped, the server answers the plain
        GET; ``"200"`` or ``"403"``: the proxy answers itself (such requests are counted in
        ``upgrades_broken``, not ``handshakes``: the server never sees them); ``"cut"``: the
        upgrade succeeds and the connection is cut, without a close frame, ``cut_after``
        seconds later (connections upgraded in this mode only). The snapshot, plain HTTP,
        is never broken.
        """
        name = None if mode is None else str(mode).strip().lower()
        if name in (None, "", "off", "none", "0"):
            self._break_mode = None
        elif name in BREAK_MODES:
            if cut_after < 0:
                raise ValueError("cut_after must be >= 0")
            self._break_mode = name
            self._cut_after = float(cut_after)
        else:
            raise ValueError(f"break mode must be one of {', '.join(BREAK_MODES)} or off")
        self._notify()

    async def send_raw(self, data: str | bytes) -> None:
        """Queue this exact frame to every open connection (for bad-input tests).

        Sent even when silent, in order behind frames already queued.
        """
        for client in self._clients:
            client.outbox.put_nowait(_Frame(data, forced=True))

    # ---------------------------------------------------------------- internals

    def _send(self, client: _Client, frame: Mapping[str, Any]) -> None:
        if not self._silent:
            client.outbox.put_nowait(_Frame(json.dumps(frame)))

    def _queue_frame(self, room: str, roomed: bool) -> dict[str, Any]:
        queue = self.rooms[room]
        frame: dict[str, Any] = {"type": "queue"}
        if roomed:
            frame["room"] = room
        frame.update(patients=queue.patients, now_serving=queue.now_serving, seq=queue.seq, ts=queue.ts)
        return frame

    def _publish(self, room: str) -> None:
        """Record one update of ``room`` (seq+1, new ts) and tell everyone concerned."""
        queue = self.rooms[room]
        queue.seq += 1
        queue.ts = _now_rfc3339()
        for client in self._clients:
            if room in client.rooms:
                self._send(client, self._queue_frame(room, roomed=True))
            if room == self._single:
                self._send(client, self._queue_frame(room, roomed=False))
        self._notify()

    async def _tick_loop(self) -> None:
        """Move a random room every ``tick`` s (jittered) so the demo looks alive."""
        while True:
            await asyncio.sleep(self.tick * self._rng.uniform(0.5, 1.5))
            if not self.rooms:
                continue
            room = self._rng.choice(list(self.rooms))
            queue = self.rooms[room]
            if queue.patients <= 0:
                arrive = True
            elif queue.patients >= MAX_PATIENTS:
                arrive = False
            else:
                arrive = self._rng.random() < 0.5
            if arrive:
                patients = queue.patients + self._rng.randint(1, 2)
            else:
                patients = queue.patients - 1
                queue.now_serving = _next_ticket(queue.now_serving)
            queue.patients = max(0, min(MAX_PATIENTS, patients))
            self._publish(room)

    def _presented_token(self, request: Request, query: str) -> str:
        """The header token if any (preferred by the contract), else the query one."""
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() == "bearer":
                return value.strip()
        values = parse_qs(query, keep_blank_values=True).get("token")
        return values[0] if values else ""

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer /control/* as plain HTTP; refuse or admit WebSocket handshakes."""
        parts = urlsplit(request.path)
        if parts.path == CONTROL_PREFIX or parts.path.startswith(CONTROL_PREFIX + "/"):
            return await self._control(connection, parts.path, parts.query)
        if parts.path == self.snapshot_path:
            return self._snapshot(request, parts.query)
        if self._break_mode is not None and self._break_mode != "cut":
            return self._broken_upgrade(self._break_mode)
        self.handshakes += 1
        token = self._presented_token(request, parts.query)
        self.tokens_seen.append(token)
        self._notify()
        if self._refuse_status is not None:
            response = connection.respond(self._refuse_status, "refused by simulator\n")
            if self._retry_after is not None:
                response.headers["Retry-After"] = f"{_json_number(self._retry_after)}"
            return response
        expected = self._token
        if expected is not None and not hmac.compare_digest(token.encode(), expected.encode()):
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "token missing, invalid or expired\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        """Serve one upgraded connection; its writer and heartbeat die with it."""
        client = _Client(ws)
        self._clients.add(client)
        self.connections += 1
        self._notify()
        try:
            if self.send_hello:
                self._send(client, {"type": "hello", "heartbeat": _json_number(self.heartbeat)})
            if self._single is not None and self._single in self.rooms:
                self._send(client, self._queue_frame(self._single, roomed=False))
            cut_after = self._cut_after if self._break_mode == "cut" else None
            async with asyncio.TaskGroup() as group:
                writer = group.create_task(self._writer(client))
                beat = group.create_task(self._heartbeat(client))
                cutter = None if cut_after is None else group.create_task(self._cut(client, cut_after))
                try:
                    await self._reader(client)
                finally:
                    writer.cancel()
                    beat.cancel()
                    if cutter is not None:
                        cutter.cancel()
        finally:
            self._clients.discard(client)
            self.close_codes.append(ws.close_code)
            client.done.set()
            self._notify()

    async def _writer(self, client: _Client) -> None:
        while True:
            item = await client.outbox.get()
            if isinstance(item, _Close):
                await client.ws.close(item.code, item.reason)
                return
            if self._silent and not item.forced:
                continue
            try:
                await client.ws.send(item.data)
            except ConnectionClosed:
                return

    async def _cut(self, client: _Client, after: float) -> None:
        """What a proxy with an idle or session timeout does: drop TCP, no close frame."""
        await asyncio.sleep(after)
        self.upgrades_cut += 1
        client.ws.transport.abort()
        self._notify()

    async def _heartbeat(self, client: _Client) -> None:
        """Ping every ``heartbeat`` s; close with 4008 when no pong comes in time."""
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + self.heartbeat
        while True:
            await asyncio.sleep(max(0.0, next_ping - loop.time()))
            next_ping = loop.time() + self.heartbeat
            if self._silent:
                continue
            client.pong.clear()
            self._send(client, {"type": "ping"})
            try:
                async with asyncio.timeout(self.pong_timeout):
                    await client.pong.wait()
            except TimeoutError:
                if self._silent:  # a frozen server sends no close frame either
                    continue
                await client.ws.close(CLOSE_HEARTBEAT_MISSED, "heartbeat missed")
                return

    async def _reader(self, client: _Client) -> None:
        try:
            async for message in client.ws:
                self.frames_received += 1
                self._on_frame(client, message)
                self._notify()
        except ConnectionClosed:
            return

    def _on_frame(self, client: _Client, message: str | bytes) -> None:
        """Apply one client frame; junk and unknown types are ignored per the contract."""
        if isinstance(message, bytes):
            return
        try:
            frame = json.loads(message)
        except ValueError:
            return
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        room = frame.get("room")
        if kind == "pong":
            self.pongs += 1
            client.pong.set()
        elif kind == "ping":
            self._send(client, {"type": "pong"})
        elif kind == "join" and isinstance(room, str):
            self.joins.append(room)
            if not self._silent:
                self._join(client, room)
        elif kind == "leave" and isinstance(room, str):
            self.leaves.append(room)
            client.rooms.discard(room)

    def _join(self, client: _Client, room: str) -> None:
        if room in self._forbidden:
            self._send(client, {"type": "error", "room": room, "code": "forbidden",
                                "message": f"not allowed to join {room}"})
        elif room not in self.rooms:
            self._send(client, {"type": "error", "room": room, "code": "unknown_room",
                                "message": f"no such room: {room}"})
        else:
            # A repeated join is answered again: harmless, and it re-syncs the client.
            client.rooms.add(room)
            self._send(client, {"type": "joined", "room": room})
            self._send(client, self._queue_frame(room, roomed=True))

    # ---------------------------------------------------- HTTP snapshot (1.1)

    @staticmethod
    def _http(status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
              headers: Mapping[str, str] | None = None) -> Response:
        """A plain HTTP response (the connection closes after it, as websockets does)."""
        code = http.HTTPStatus(status)
        fields = Headers([("Date", email.utils.formatdate(usegmt=True)), ("Connection", "close")])
        if code != http.HTTPStatus.NOT_MODIFIED:  # a 304 has no body, nor its length
            fields["Content-Length"] = str(len(body))
            fields["Content-Type"] = content_type
        for name, value in (headers or {}).items():
            fields[name] = value
        return Response(code.value, code.phrase, fields, body)

    def _snapshot_refused(self, status: int, text: str, headers: Mapping[str, str] | None = None) -> Response:
        self.snapshot_requests["refused"] += 1
        self._notify()
        return self._http(status, text.encode(), headers={"Cache-Control": "no-store", **(headers or {})})

    def _snapshot(self, request: Request, query: str) -> Response:
        """GET <snapshot path>?room=…: the rooms' current state, as PROTOCOL.md 1.1 says."""
        token = self._presented_token(request, query)
        self.snapshot_tokens_seen.append(token)
        rooms = tuple(dict.fromkeys(parse_qs(query, keep_blank_values=True).get("room", [])))
        self.snapshot_last_rooms = rooms
        if self._snapshot_refuse is not None:
            extra = {}
            if self._snapshot_retry_after is not None:
                extra["Retry-After"] = f"{_json_number(self._snapshot_retry_after)}"
            return self._snapshot_refused(self._snapshot_refuse, "refused by simulator\n", extra)
        expected = self._token
        if expected is not None and not hmac.compare_digest(token.encode(), expected.encode()):
            return self._snapshot_refused(401, "token missing, invalid or expired\n", {"WWW-Authenticate": "Bearer"})
        if self._snapshot_raw is not None:
            body = self._snapshot_raw
        elif not rooms:
            return self._snapshot_refused(400, "no room parameter\n")
        else:
            body = self._snapshot_body(rooms)
        # The ETag is the body's digest: any change of a count, ticket, seq or poll changes it.
        etag = '"' + hashlib.sha256(body).hexdigest()[:24] + '"'
        headers = {"ETag": etag, "Cache-Control": "no-store"}
        if self._if_none_match(request) & {etag, "*"}:
            self.snapshot_requests["not_modified"] += 1
            self._notify()
            return self._http(304, headers=headers)
        self.snapshot_requests["served"] += 1
        self._notify()
        return self._http(200, body, "application/json", headers)

    def _snapshot_body(self, rooms: Iterable[str]) -> bytes:
        entries: list[dict[str, Any]] = []
        for room in rooms:
            if room in self._forbidden:
                entries.append({"room": room, "error": "forbidden"})
            elif room not in self.rooms:
                entries.append({"room": room, "error": "unknown_room"})
            else:
                entries.append(self._queue_frame(room, roomed=True))
                del entries[-1]["type"]
        payload: dict[str, Any] = {"rooms": entries}
        if self.snapshot_poll is not None:
            payload["poll"] = _json_number(self.snapshot_poll)
        return json.dumps(payload).encode()

    @staticmethod
    def _if_none_match(request: Request) -> set[str]:
        tags: set[str] = set()
        for value in request.headers.get_all("If-None-Match"):
            for tag in value.split(","):
                tags.add(tag.strip().removeprefix("W/"))
        return tags

    def _broken_upgrade(self, mode: str) -> Response:
        """The answer a WebSocket upgrade gets behind a proxy that breaks it."""
        self.upgrades_broken += 1
        self._notify()
        if mode == "426":  # what websockets itself answers to a GET without Upgrade
            return self._http(426, b"Failed to open a WebSocket connection: missing Upgrade header.\n",
                              headers={"Upgrade": "websocket"})
        if mode == "400":
            return self._http(400, b"Failed to open a WebSocket connection: missing Connection header.\n")
        page = b"<!doctype html><title>Proxy</title><p>%s</p>\n"
        if mode == "403":
            return self._http(403, page % b"Access denied by the web proxy.", "text/html; charset=utf-8")
        return self._http(200, page % b"Welcome to the hospital network.", "text/html; charset=utf-8")

    # ------------------------------------------------------------- HTTP control

    def _json_response(self, connection: ServerConnection, status: int, payload: Any) -> Response:
        response = connection.respond(status, json.dumps(payload) + "\n")
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response

    async def _control(self, connection: ServerConnection, path: str, query: str) -> Response:
        """Plain-HTTP knobs for the demo and manual testing (GET with query parameters)."""
        params = {key: values[0] for key, values in parse_qs(query, keep_blank_values=True).items()}
        action = path[len(CONTROL_PREFIX):].strip("/")
        try:
            if action == "state":
                pass
            elif action == "set":
                room = params.get("room", "")
                if room not in self.rooms:
                    return self._json_response(connection, 404, {"error": "unknown room"})
                self.set_queue(room, int(params["patients"]), params.get("now_serving") or None)
            elif action == "close":
                code = int(params.get("code", "1000"))
                clients = self.active
                await self.close_all(code, params.get("reason", ""))
                return self._json_response(connection, 200, {"closed": clients, "code": code})
            elif action == "silent":
                self.set_silent(params.get("on", "1").lower() in ("1", "true", "yes", "on"))
            elif action == "refuse":
                status = int(params.get("status", "0"))
                retry = params.get("retry_after")
                self.refuse(status or None, float(retry) if retry else None)
            elif action == "token":
                self.set_token(params.get("value") or None)
            elif action == "snapshot":
                if "refuse" in params:
                    retry = params.get("retry_after")
                    self.refuse_snapshot(int(params["refuse"] or "0") or None, float(retry) if retry else None)
                if "poll" in params:
                    poll = float(params["poll"] or "0")
                    self.set_snapshot_poll(poll or None)
            elif action == "break":
                after = params.get("after")
                self.break_upgrades(params.get("mode", "off"), float(after) if after else 3.0)
            else:
                return self._json_response(connection, 404, {"error": "unknown control path"})
        except (KeyError, ValueError) as exc:
            return self._json_response(connection, 400, {"error": f"bad parameters: {exc}"})
        return self._json_response(connection, 200, self.state())


# --------------------------------------------------------------------- CLI glue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``simulate`` command (the lead's CLI owns the parser)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (default: %(default)s)")
    parser.add_argument("--rooms", default="opd-1,lab", help="comma-separated room ids (default: %(default)s)")
    parser.add_argument("--token", default=None, help="bearer token clients must present (default: no auth)")
    parser.add_argument("--token-file", default=None,
                        help="read the token from this file (keeps it out of the process list)")
    parser.add_argument("--heartbeat", type=float, default=15.0, help="ping interval in seconds (default: %(default)s)")
    parser.add_argument("--tick", type=float, default=3.0,
                        help="mean seconds between queue changes, 0 to freeze (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible queues")
    parser.add_argument("--single-room", action="store_true", help="send the unroomed single-room form")
    parser.add_argument("--snapshot-path", default=SNAPSHOT_PATH,
                        help="path of the HTTP snapshot on the same port (default: %(default)s)")
    parser.add_argument("--snapshot-poll", type=float, default=DEFAULT_SNAPSHOT_POLL,
                        help="the snapshot's poll in seconds, 0 to leave it out (default: %(default)s)")
    parser.add_argument("--break-upgrades", choices=BREAK_MODES, default=None,
                        help="break WebSocket upgrades like a proxy: answer 426/400 (Upgrade stripped), "
                             "200/403 (the proxy answers), or cut upgraded connections (default: off)")
    parser.add_argument("--cut-after", type=float, default=3.0,
                        help="with --break-upgrades cut: seconds before the cut (default: %(default)s)")


async def run_from_args(
    args: argparse.Namespace, *, on_ready: Callable[[Simulator], object] | None = None
) -> None:
    """Run until cancelled, then stop cleanly. ``on_ready`` lets tests find the simulator."""
    rooms = tuple(room.strip() for room in args.rooms.split(",") if room.strip())
    token = args.token
    if getattr(args, "token_file", None):
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
    simulator = Simulator(
        rooms,
        token=token,
        heartbeat=args.heartbeat,
        tick=args.tick,
        seed=args.seed,
        single_room=args.single_room,
        snapshot_path=getattr(args, "snapshot_path", SNAPSHOT_PATH),
        snapshot_poll=getattr(args, "snapshot_poll", DEFAULT_SNAPSHOT_POLL) or None,
    )
    if getattr(args, "break_upgrades", None):
        simulator.break_upgrades(args.break_upgrades, args.cut_after)
    await simulator.start(args.host, args.port)
    try:
        netloc = f"[{simulator.host}]" if ":" in simulator.host else simulator.host
        print(
            f"simulator listening on {simulator.url} "
            f"(control: http://{netloc}:{simulator.port}{CONTROL_PREFIX}/state; "
            f"snapshot: {simulator.snapshot_url}"
            + (f"; upgrades broken: {simulator.state()['break_upgrades']}" if getattr(args, "break_upgrades", None)
               else "")
            + ")",
            flush=True,
        )
        if on_ready is not None:
            on_ready(simulator)
        await asyncio.Event().wait()  # until cancelled
    finally:
        await simulator.stop()
