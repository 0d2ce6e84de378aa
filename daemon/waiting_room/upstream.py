"""The one upstream WebSocket: connect, authenticate, join every room, feed the store.

The loop is ours, not websockets' ``async for ws in connect()``: it must read the token
afresh before each attempt, follow PROTOCOL.md's close codes (``policy``), treat 401/403/429
as retryable, and rotate tokens make-before-break. Decisions come from the pure ``policy``
and ``protocol`` modules; this module only waits, sends and receives.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
import urllib.parse
from collections import Counter
from datetime import datetime, timezone
from functools import partial
from typing import Callable, Final, Iterable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode

from . import protocol, tls
from .config import FallbackConfig, UpstreamConfig
from .logutil import RateLimitedLog
from .credentials import SecretError, TokenSource, file_signature, jwt_expiry
from .model import LinkStatus
from .poller import Body, Failed, NotModified, Refused, SnapshotClient
from .policy import (
    PROMPT_MAX_DELAY,
    Action,
    Liveness,
    ReconnectSchedule,
    action_for_close,
    action_for_status,
    liveness,
    parse_retry_after,
)
from .snapshot import RoomRefused, Snapshot, SnapshotDecoder, snapshot_url
from .store import RoomStore

log = logging.getLogger(__name__)


class _WireLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets' logger, minus DEBUG: that level prints the handshake, token included."""

    def isEnabledFor(self, level: int) -> bool:
        return level > logging.DEBUG and self.logger.isEnabledFor(level)


def _only_closed(exc: BaseException) -> bool:
    """True for a ConnectionClosed, bare or wrapped in (nested) TaskGroup exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_closed(e) for e in exc.exceptions)
    return isinstance(exc, ConnectionClosed)

DEFAULT_HEARTBEAT: Final = 15.0
MAX_MESSAGE: Final = 1024 * 1024  # larger frames close the socket; up to here they are dropped
CLOSE_TIMEOUT: Final = 2.0


def redact_url(url: str) -> str:
    """The URL as it may be printed: no userinfo, no token query parameter."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = urllib.parse.urlencode(
        [(k, "***" if k.lower() in ("token", "access_token") else v)
         for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)],
        safe="*",
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def url_with_token(url: str, token: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    query.append(("token", token))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def parse_ts(ts: str | None) -> float | None:
    if ts is None:
        return None
    try:
        moment = datetime.fromisoformat(ts)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    try:
        # A time that is not a moment in years 1..9999 in UTC (0001-01-01T00:00+14:00) would
        # fail later, where it is published: it is no time at all.
        moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return None
    return moment.timestamp()


class _Connection(ClientConnection):
    """websockets' client connection with one fast path: a whole text frame that arrives while
    the session's reader waits with nothing queued goes to ``on_text`` in ``data_received``,
    the loop pass that read it from the socket, instead of waking the reader task on the next
    pass. ``on_text`` returns False to leave the frame to the reader, in order."""

    on_text: Callable[[str], bool] | None = None

    def process_event(self, event: object) -> None:
        handler = self.on_text
        if (handler is not None and self.response is not None and type(event) is Frame
                and event.opcode is Opcode.TEXT and event.fin):
            frames = self.recv_messages.frames
            waiter = frames.get_waiter
            if waiter is not None and not waiter.done() and not frames.queue:
                try:
                    text = bytes(event.data).decode()
                except UnicodeDecodeError:
                    pass  # the reader's path closes with 1007
                else:
                    if handler(text):
                        return
        super().process_event(event)  # type: ignore[arg-type]


class _Session:
    """One connection: joins, reads, answers pings, notices silence, retries refused rooms."""

    def __init__(self, upstream: Upstream, ws: ClientConnection, token: str, loop: asyncio.AbstractEventLoop):
        self.up = upstream
        self.ws = ws
        self.token = token
        self._loop = loop
        self._decoder = protocol.FrameDecoder()
        self.feeding = True  # False once a newer session has taken over
        self.joined: set[str] = set()
        self.answered: set[str] = set()  # rooms joined or refused: the session is "ready"
        self.ready = asyncio.Event()
        self._retry_at: dict[str, float] = {}
        self._retry_wake = asyncio.Event()
        self.healthy_since: float | None = None
        self.last_rx = loop.time()
        cfg = upstream.cfg
        self.timeout = float(cfg.heartbeat_timeout or 2 * DEFAULT_HEARTBEAT + 5)
        self.timed_out = False
        self.single_room = False
        self.task: asyncio.Task[None] | None = None
        self._ts_text: str | None = None
        self._ts_value: float | None = None
        if isinstance(ws, _Connection):
            ws.on_text = self._fast_text

    @property
    def close_code(self) -> int:
        if self.timed_out:
            return 1006
        return self.ws.close_code or 1006

    async def run(self) -> None:
        try:
            for room in self.up.room_ids:
                await self.ws.send(protocol.join_frame(room))
                self._await_answer(room)
            async with asyncio.TaskGroup() as tg:
                watchdog = tg.create_task(self._watchdog())
                rejoin = tg.create_task(self._rejoin())
                try:
                    await self._read()
                finally:
                    watchdog.cancel()
                    rejoin.cancel()
        except Exception as exc:
            if not _only_closed(exc):  # a bug must cost a reconnect, never the daemon
                log.exception("upstream session failed")
        finally:
            await self.close(1000)

    async def close(self, code: int) -> None:
        self.feeding = False
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code)
        except (TimeoutError, OSError):
            self.ws.transport.abort()

    async def _read(self) -> None:
        up = self.up
        decode = self._decoder.decode
        loop_time = self._loop.time
        async for message in self.ws:
            self.last_rx = loop_time()
            frame = decode(message)
            if not self.feeding:
                continue
            kind = type(frame)
            if kind is protocol.Queue:
                self._on_queue(frame)  # type: ignore[arg-type]
            elif kind is protocol.Ping:
                await self.ws.send(protocol.PONG_FRAME)
            elif kind is protocol.Joined:
                self._on_joined(frame.room)  # type: ignore[union-attr]
            elif kind is protocol.Error:
                self._on_error(frame)  # type: ignore[arg-type]
            elif kind is protocol.Hello:
                if up.cfg.heartbeat_timeout is None:
                    self.timeout = 2 * frame.heartbeat + 5  # type: ignore[union-attr]
            elif kind is protocol.Dropped:
                up.drop(frame.reason)  # type: ignore[union-attr]
            # Pong and Ignored (unknown types) need nothing.

    def _fast_text(self, message: str) -> bool:
        """From ``_Connection``, while the reader waits: a queue frame is applied at once (and,
        with the MQTT side idle, is on the broker's socket before this returns); anything
        else, or a frame that fails here, goes through the reader as usual."""
        if not self.feeding:
            return False
        frame = self._decoder.decode(message)
        if type(frame) is not protocol.Queue:
            return False
        self.last_rx = self._loop.time()
        try:
            self._on_queue(frame)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - the reader meets it again and costs a reconnect
            return False
        return True

    def _on_queue(self, frame: protocol.Queue) -> None:
        up = self.up
        room = frame.room
        if room is None:
            if len(up.room_ids) != 1:
                up.drop("queue frame without a room, but several rooms are configured")
                return
            room = up.room_ids[0]
            self.single_room = True
            self.store_room_answered(room)
        ts = frame.ts
        if ts is not None and ts != self._ts_text:  # a burst repeats one ts: parse it once
            self._ts_text, self._ts_value = ts, parse_ts(ts)
        updated_at = self._ts_value if ts is not None else None
        if not up.store.apply_queue(room, frame.patients, frame.now_serving, updated_at, frame.seq):
            up.drop("queue frame for a room that is not configured")
            return
        self._mark_receiving()

    def _on_joined(self, room: str) -> None:
        if room not in self.up.store.rooms:
            self.up.drop("joined frame for a room that is not configured")
            return
        self.joined.add(room)
        self._retry_at.pop(room, None)
        self.up.store.clear_room_error(room)
        self.store_room_answered(room)
        self._mark_receiving()

    def _on_error(self, frame: protocol.Error) -> None:
        room = frame.room
        if room is None or room not in self.up.store.rooms:
            self.up.drop("error frame without a configured room")
            return
        if self.single_room:
            return  # a single-room server feeds its room without joins
        code = frame.code if frame.code in ("unknown_room", "forbidden") else "error"
        if self.up.store.set_room_error(room, code):
            log.warning("upstream refused room %s: %s; asking again in %.0f s", room, code,
                        self.up.cfg.room_retry, extra={"ROOM": room, "ROOM_ERROR": code})
        self.joined.discard(room)
        self._retry_at[room] = self._loop.time() + self.up.cfg.room_retry
        self._retry_wake.set()
        self.store_room_answered(room)
        self._mark_receiving()

    def store_room_answered(self, room: str) -> None:
        self.answered.add(room)
        if not self.ready.is_set() and self.answered.issuperset(self.up.room_ids):
            self.ready.set()

    def _mark_receiving(self) -> None:
        if self.healthy_since is None:
            self.healthy_since = self._loop.time()
            self.up.on_session_live(self)

    async def _watchdog(self) -> None:
        """A frozen server or a half-open TCP connection: silence first brings a protocol
        ``ping``; no answer in time, or silence past the heartbeat bound, drops the link
        (``policy.liveness``). Only the application's answer counts: a server whose TCP stack
        still answers RFC 6455 pings while its queue is frozen must not look live."""
        cfg = self.up.cfg
        interval, grace = float(cfg.ping_interval), float(cfg.ping_timeout)
        pinged_at: float | None = None
        while True:
            now = self._loop.time()
            verdict, wake = liveness(now, self.last_rx, pinged_at, interval=interval, timeout=grace,
                                     silence_limit=self.timeout)
            if verdict is Liveness.DEAD:
                log.warning("upstream silent for %.1f s%s: dropping the connection", now - self.last_rx,
                            ", no answer to a ping" if pinged_at is not None and pinged_at > self.last_rx else "")
                self.timed_out = True
                self.ws.transport.abort()
                return
            if verdict is Liveness.PING:
                pinged_at = now
                try:
                    # Bounded: a stalled socket must not stall the watchdog that watches it.
                    async with asyncio.timeout(grace):
                        await self.ws.send(protocol.PING_FRAME)
                except TimeoutError:
                    continue  # past the grace already: dead on the next pass
                except ConnectionClosed:
                    return  # the reader sees the close too
            await asyncio.sleep(max(wake - self._loop.time(), 0.0) + 0.01)

    async def _rejoin(self) -> None:
        while True:
            if not self._retry_at:
                self._retry_wake.clear()
                await self._retry_wake.wait()
                continue
            now = self._loop.time()
            due = [room for room, at in self._retry_at.items() if at <= now]
            for room in due:
                del self._retry_at[room]
                if room in self.up.store.rooms:
                    try:
                        await self.ws.send(protocol.join_frame(room))
                    except ConnectionClosed:
                        return  # the reader sees the close too
                    self._await_answer(room)
            if self._retry_at:
                self._retry_wake.clear()
                wait = min(self._retry_at.values()) - self._loop.time()
                try:
                    async with asyncio.timeout(max(wait, 0.0)):
                        await self._retry_wake.wait()
                except TimeoutError:
                    pass

    async def change_rooms(self, added: Iterable[str], removed: Iterable[str]) -> None:
        for room in removed:
            self._retry_at.pop(room, None)
            self.joined.discard(room)
            await self.ws.send(protocol.leave_frame(room))
        for room in added:
            await self.ws.send(protocol.join_frame(room))
            self._await_answer(room)

    def _await_answer(self, room: str) -> None:
        """A join the server never answers (it was frozen when the join arrived, and dropped
        it) is sent again after connect_timeout; ``joined`` or ``error`` replaces this."""
        if self.single_room:
            return  # the single-room form needs no join
        self._retry_at[room] = self._loop.time() + float(self.up.cfg.connect_timeout)
        self._retry_wake.set()


class Upstream:
    """Keeps exactly one healthy connection (two, briefly, while rotating the token)."""

    def __init__(
        self,
        cfg: UpstreamConfig,
        room_ids: Iterable[str],
        store: RoomStore,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.room_ids: tuple[str, ...] = tuple(room_ids)
        self.store = store
        self._rng = rng
        self._bad_frames = RateLimitedLog(log)
        self._session: _Session | None = None
        self._rotation_retry_at = 0.0
        self._last_failure: str | None = None
        self._last_tls: tls.Failure | None = None  # the last attempt's TLS failure
        # Set by reconfigure(): cuts a backoff pause short, or starts a make-before-break.
        self._reconfigured = asyncio.Event()
        # The fallback (upstream.fallback): the socket's own state, and the poller's.
        self._socket_link: tuple[LinkStatus, str, float | None] = (LinkStatus.CONNECTING, "", None)
        self._joined = False  # a socket is joined and receiving
        self._down_since = 0.0  # loop time since when no socket has been healthy
        self._feed_event = asyncio.Event()  # a new one per change: no wake-up is lost
        self._poll_every: float | None = None  # while the last poll succeeded
        self._poll_problem: str | None = None
        self._poll_auth_failed = False
        self._poll_token_retried = False
        self._next_poll_at = 0.0
        self._etag: str | None = None
        self._client_outdated = False
        self._snapshots = SnapshotDecoder()
        # Plain counters, read by the metrics at scrape time: connection attempts by outcome
        # (connected: the handshake succeeded; refused: an HTTP status; tls: a lasting TLS
        # problem; failed: anything else the network did; no_token), and the close code of
        # each connection that ended.
        self.attempts: Counter[str] = Counter()
        self.close_codes: Counter[int] = Counter()
        self._apply(cfg)

    def _apply(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.tokens = TokenSource(
            literal=cfg.token,
            file=cfg.token_file,
            command=tuple(cfg.token_argv) if cfg.token_argv else None,
            credential=cfg.token_credential,
        )
        self.schedule = ReconnectSchedule(cfg.backoff.initial, cfg.backoff.max, self._rng)
        self._overrides = {code: Action(name) for code, name in cfg.close_codes.items()}
        # One client context for the socket and the snapshot (tls.upstream_context), built
        # again when upstream.ca_file, cert_file or key_file changes on disk.
        self._tls = tls.Cached(lambda: tls.upstream_context(cfg), (cfg.ca_file, cfg.cert_file, cfg.key_file))

    def reconfigure(self, cfg: UpstreamConfig) -> None:
        """New settings (URL, token source, ...): the live connection is replaced
        make-before-break; while disconnected, the next attempt starts now."""
        if cfg == self.cfg:
            return
        self._apply(cfg)
        self._rotation_retry_at = 0.0
        self._reconfigured.set()
        self._client_outdated = True  # the proxy or the snapshot URL may have changed
        self._feed_notify()

    async def _pause(self, delay: float) -> None:
        """The backoff sleep, cut short by reconfigure()."""
        self._reconfigured.clear()
        try:
            async with asyncio.timeout(delay):
                await self._reconfigured.wait()
        except TimeoutError:
            pass
        self._reconfigured.clear()

    # -- called by sessions ---------------------------------------------------------------

    def drop(self, reason: str) -> None:
        count = self.store.count_dropped()
        self._bad_frames.warning("dropped a bad frame from upstream: %s (%d so far)", reason, count)

    def on_session_live(self, session: _Session) -> None:
        if session is self._session and self.store.link.status is not LinkStatus.CONNECTED:
            log.info("upstream connected to %s, %d rooms", redact_url(self.cfg.url), len(self.room_ids))
            self._last_failure = None
            self._set_link(LinkStatus.CONNECTED, "")

    async def set_rooms(self, room_ids: Iterable[str]) -> None:
        """Join and leave on the live socket: a changed room list needs no reconnect."""
        new = tuple(room_ids)
        added = [r for r in new if r not in self.room_ids]
        removed = [r for r in self.room_ids if r not in new]
        self.room_ids = new
        if self._session is not None and (added or removed):
            try:
                await self._session.change_rooms(added, removed)
            except ConnectionClosed:
                pass  # the next connection joins the new list

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._down_since = loop.time()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._fallback(), name="upstream-fallback")
            while True:
                session, delay = await self._attempt(loop, tg)
                if session is None:
                    await self._pause(delay)
                    continue
                await self._serve(session, tg)
                delay = await self._after_close(session)
                await self._pause(delay)

    async def _read_token(self) -> str:
        return await asyncio.to_thread(self.tokens.read)

    async def tls_context(self) -> ssl.SSLContext:
        """The upstream's TLS client context (``upstream.ca_file``, ``cert_file``, ``key_file``;
        verification always on), for the ``wss://`` socket and the ``https://`` snapshot alike.
        Raises ``tls.TlsError`` when a file cannot be used."""
        return await asyncio.to_thread(self._tls.get)

    async def _open(self, token: str) -> ClientConnection:
        url, headers = self.cfg.url, None
        if self.cfg.token_in == "query":
            url = url_with_token(url, token)
        else:
            headers = {"Authorization": f"Bearer {token}"}
        context = await self.tls_context() if url.startswith("wss://") else None
        return await connect(
            url,
            ssl=context,
            # upstream.proxy, else what the environment says (https_proxy, no_proxy, ...).
            proxy=self.cfg.proxy or True,
            additional_headers=headers,
            open_timeout=float(self.cfg.connect_timeout),
            close_timeout=CLOSE_TIMEOUT,
            ping_interval=None,  # the session's watchdog pings (policy.liveness)
            max_size=MAX_MESSAGE,
            compression=None,
            logger=_WireLog(logging.getLogger("waiting_room.wire"), {}),
            user_agent_header="waiting-room",
            create_connection=_Connection,
        )

    def _failed(self, status: LinkStatus, detail: str, delay: float, *, level: int = logging.WARNING,
                **fields: object) -> None:
        """Logs state changes, not every attempt: the same failure again goes to DEBUG.
        ``fields`` become structured journal fields (CLOSE_CODE=, HTTP_STATUS=)."""
        level = logging.DEBUG if detail == self._last_failure else level
        self._last_failure = detail
        log.log(level, "upstream %s; retrying in %.1f s", detail, delay, extra=fields)
        self._set_link(status, detail, retry_in=delay)

    async def _attempt(
        self, loop: asyncio.AbstractEventLoop, tg: asyncio.TaskGroup
    ) -> tuple[_Session | None, float]:
        """One connection attempt: a running session, or how long to wait before the next."""
        try:
            token = await self._read_token()
        except SecretError as exc:
            self.attempts["no_token"] += 1
            delay = self.schedule.next(Action.BACKOFF).delay
            self._failed(LinkStatus.DISCONNECTED, f"token unavailable: {exc}", delay)
            return None, delay
        try:
            ws = await self._open(token)
        except InvalidStatus as exc:
            self._last_tls = None
            self.attempts["refused"] += 1
            status = exc.response.status_code
            action = action_for_status(status)
            retry_after = parse_retry_after(exc.response.headers.get("Retry-After"), time.time())
            token_changed = False
            if action is Action.REFRESH_TOKEN:
                token_changed = await self._token_changed(token)
            decision = self.schedule.next(action, retry_after=retry_after, token_changed=token_changed)
            link = LinkStatus.AUTH_FAILED if action is Action.AUTH_FAILED else LinkStatus.DISCONNECTED
            self._failed(link, f"handshake refused: HTTP {status}", decision.delay, HTTP_STATUS=status)
            return None, decision.delay
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # OSError, timeouts, bad handshakes: the network's problems
            failure = self._last_tls = tls.same_refusal(self._last_tls, tls.describe_failure(exc, "upstream"))
            self.attempts["tls" if failure is not None and failure.lasting else "failed"] += 1
            if failure is not None and failure.lasting:
                # An untrusted certificate, a refused client certificate, an unusable TLS
                # file: no quick retry fixes these. Retried at the backoff's maximum, loudly.
                delay = self.schedule.next(Action.AT_LEAST_MAX).delay
                self._failed(LinkStatus.DISCONNECTED, failure.detail, delay, level=logging.ERROR)
                return None, delay
            delay = self.schedule.next(Action.BACKOFF).delay
            detail = failure.detail if failure is not None else f"connect failed: {self._describe(exc, token)}"
            self._failed(LinkStatus.DISCONNECTED, detail, delay)
            return None, delay
        self.attempts["connected"] += 1
        self._last_tls = None
        session = _Session(self, ws, token, loop)
        self._session = session
        session.task = tg.create_task(session.run())
        return session, 0.0

    async def _token_changed(self, used: str) -> bool:
        try:
            return await self._read_token() != used
        except SecretError:
            return False

    def _describe(self, exc: BaseException, token: str) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return text.replace(token, "***") if token else text

    async def _serve(self, session: _Session, tg: asyncio.TaskGroup) -> None:
        """Until the session ends; swaps in a new one when the token rotates."""
        while True:
            watcher = tg.create_task(self._rotation_due(session.token))
            try:
                await asyncio.wait({session.task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
            if session.task.done():
                return
            if watcher.done() and not watcher.cancelled() and watcher.exception() is None:
                replacement = await self._make_before_break(session, watcher.result(), tg)
                if replacement is not None:
                    session = replacement

    async def _make_before_break(self, old: _Session, token: str, tg: asyncio.TaskGroup) -> _Session | None:
        """Open and join with the new token, then close the old connection: no stale gap."""
        try:
            ws = await self._open(token)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.attempts["refused" if isinstance(exc, InvalidStatus) else "failed"] += 1
            self._rotation_retry_at = time.monotonic() + float(self.cfg.backoff.max)
            log.warning("token rotation: new connection failed (%s); keeping the current one",
                        self._describe(exc, token))
            return None
        self.attempts["connected"] += 1
        new = _Session(self, ws, token, asyncio.get_running_loop())
        new.task = tg.create_task(new.run())
        try:
            async with asyncio.timeout(float(self.cfg.connect_timeout)):
                await new.ready.wait()
        except TimeoutError:
            log.warning("token rotation: new connection did not join every room in time; switching anyway")
        if new.task.done():
            self._rotation_retry_at = time.monotonic() + float(self.cfg.backoff.max)
            log.warning("token rotation: new connection closed at once; keeping the current one")
            return None
        self._session = new
        await old.close(1000)
        log.info("token rotated: switched to a new connection")
        return new

    async def _rotation_due(self, token: str) -> str:
        """Returns a fresh token when the token file changed or a JWT nears its expiry."""
        path = self.tokens.watched_file
        signature = await asyncio.to_thread(file_signature, path) if path else None
        expiry = jwt_expiry(token)
        now = time.time()
        renew_at = None
        if expiry is not None:
            renew_at = max(now + (expiry - now) / 2, expiry - float(self.cfg.token_renew_before))
        while True:
            waits = []
            if path is not None:
                waits.append(float(self.cfg.token_check))
            if renew_at is not None:
                waits.append(max(renew_at - time.time(), 0.0))
            wait = max(min(waits), self._rotation_retry_at - time.monotonic()) if waits else None
            try:
                async with asyncio.timeout(wait):  # None: a literal token without exp
                    await self._reconfigured.wait()
                self._reconfigured.clear()
            except TimeoutError:
                pass
            else:
                try:
                    return await self._read_token()  # new settings: switch even to the same token
                except SecretError as exc:
                    log.warning("new upstream settings: %s; keeping the current connection", exc)
                    continue
            if time.monotonic() < self._rotation_retry_at:
                continue
            due = renew_at is not None and time.time() >= renew_at
            if path is not None:
                current = await asyncio.to_thread(file_signature, path)
                if current != signature:
                    signature = current
                    due = True
            if not due:
                continue
            try:
                fresh = await self._read_token()
            except SecretError as exc:
                log.warning("token rotation: %s", exc)
                continue
            if fresh != token:
                return fresh
            renew_at = None  # same token still: the server will say 4001 when it expires

    async def _after_close(self, session: _Session) -> float:
        code = session.close_code
        self.close_codes[code] += 1
        if self._session is session:
            self._session = None
        loop = asyncio.get_running_loop()
        healthy = (
            session.healthy_since is not None
            and loop.time() - session.healthy_since >= float(self.cfg.stable_after)
        )
        if healthy:
            self._down_since = loop.time()  # fallback.after counts from here
        action = action_for_close(code, self._overrides)
        token_changed = False
        if action is Action.REFRESH_TOKEN:
            token_changed = await self._token_changed(session.token)
        decision = self.schedule.next(action, healthy=healthy, token_changed=token_changed)
        reason = session.ws.close_reason if not session.timed_out else ""
        detail = "heartbeat timeout" if session.timed_out else f"closed {code}"
        if reason:
            detail += f" ({reason[:80]!r})"
        link = LinkStatus.AUTH_FAILED if action is Action.AUTH_FAILED else LinkStatus.DISCONNECTED
        if link is LinkStatus.AUTH_FAILED:
            log.error("upstream: authorisation failed (%s); retrying every %.0f s", detail, decision.delay,
                      extra={"CLOSE_CODE": code})
            self._set_link(link, detail, retry_in=decision.delay)
        else:
            self._failed(link, f"lost: {detail}", decision.delay, CLOSE_CODE=code)
        return decision.delay

    # -- the fallback: the snapshot, polled while no socket is joined ----------------------

    def _feed_notify(self) -> None:
        self._feed_event.set()
        self._feed_event = asyncio.Event()

    async def _feed_wait(self, timeout: float | None) -> None:
        """Until the socket is joined or lost, the settings change, or ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._feed_event.wait()
        except TimeoutError:
            pass

    def _set_link(self, status: LinkStatus, detail: str = "", retry_in: float | None = None) -> None:
        """The socket's state; the world sees it combined with the poller's (``_show_link``)."""
        self._socket_link = (status, detail, retry_in)
        joined = status is LinkStatus.CONNECTED
        if joined:
            # The socket is back: polling stops, and a later polling period starts afresh.
            self._poll_every = None
            self._poll_problem = None
            self._poll_auth_failed = False
            self._etag = None
        if joined != self._joined:
            self._joined = joined
            self._feed_notify()
        self._show_link()

    def _show_link(self) -> None:
        """``connected`` with a socket; ``degraded`` while polls succeed without one (the detail
        stays the socket's problem); else the socket's state, with the snapshot's problem."""
        status, detail, retry_in = self._socket_link
        if status is LinkStatus.CONNECTED:
            self.store.set_link(status, detail)
        elif self._poll_every is not None:
            self.store.set_link(LinkStatus.DEGRADED, detail, retry_in, poll_interval=self._poll_every)
        else:
            if self._poll_problem:
                detail = f"{detail}; snapshot: {self._poll_problem}" if detail else f"snapshot: {self._poll_problem}"
            if self._poll_auth_failed:
                status = LinkStatus.AUTH_FAILED
            self.store.set_link(status, detail, retry_in)

    async def _fallback(self) -> None:
        """Polls ``fallback.url`` while no socket has been joined for ``fallback.after``
        (counted from the end of the last healthy connection), never faster than the
        interval or the server's ``poll``; stops the moment a socket is joined. The socket
        loop goes on meanwhile, with its usual backoff. Idle without a fallback configured."""
        loop = asyncio.get_running_loop()
        client: SnapshotClient | None = None
        try:
            while True:
                fallback = self.cfg.fallback
                if fallback is None or self._joined or self._client_outdated:
                    # The client (its TLS context, a few MB with the system's CA store) lives
                    # across degraded spells: one per spell grew the RSS (found by bench/chaos).
                    if client is not None and (fallback is None or self._client_outdated):
                        await client.aclose()
                        client = None
                    self._client_outdated = False
                    if fallback is None and (self._poll_every is not None or self._poll_problem is not None):
                        self._poll_state(None, None)  # the fallback was configured away
                    if fallback is None or self._joined:
                        await self._feed_wait(None)
                        continue
                due = max(self._down_since + float(fallback.after), self._next_poll_at)
                if loop.time() < due:
                    await self._feed_wait(due - loop.time())
                    continue
                if client is None:
                    try:
                        # The socket's context: upstream.ca_file and the client certificate
                        # apply to an https:// snapshot too.
                        verify = await self.tls_context()
                    except tls.TlsError as exc:
                        self._poll_failed(str(exc), float(fallback.interval))
                        self._next_poll_at = loop.time() + float(fallback.interval)
                        continue
                    # In a thread: the first one imports httpx (SnapshotClient says why then).
                    client = await asyncio.to_thread(partial(
                        SnapshotClient, proxy=self.cfg.proxy, timeout=float(self.cfg.connect_timeout), verify=verify))
                try:
                    delay = await self._poll(client, fallback)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug must cost a poll, never the daemon
                    log.exception("upstream snapshot: poll failed")
                    delay = float(fallback.interval)
                self._next_poll_at = loop.time() + delay
        finally:
            if client is not None:
                await client.aclose()

    async def _poll(self, client: SnapshotClient, fallback: FallbackConfig) -> float:
        """One poll, its outcome applied; returns the seconds until the next one."""
        interval = float(fallback.interval)
        try:
            token = await self._read_token()
        except SecretError as exc:
            self._poll_failed(f"token unavailable: {exc}", interval)
            return interval
        rooms = self.room_ids
        in_query = self.cfg.token_in == "query"
        url = snapshot_url(fallback.url, rooms, token if in_query else None)
        headers = {} if in_query else {"Authorization": f"Bearer {token}"}
        if self._etag is not None:
            headers["If-None-Match"] = self._etag
        try:
            async with asyncio.timeout(float(self.cfg.connect_timeout)):
                outcome = await client.fetch(url, headers)
        except TimeoutError:
            outcome = Failed(f"no answer within {float(self.cfg.connect_timeout):g} s")
        if self._joined or self.cfg.fallback is None:
            return interval  # the socket came back meanwhile: its values are newer
        if isinstance(outcome, Body):
            return self._on_body(outcome, rooms, interval)
        if isinstance(outcome, NotModified):
            if self._poll_every is None:  # no ETag was sent: the server is confused
                self._poll_failed("HTTP 304 without an ETag sent", interval)
                return interval
            return self._poll_every
        if isinstance(outcome, Refused):
            return await self._on_refused(outcome, token, interval)
        self._poll_failed(self._describe_text(outcome.detail, token), interval)
        return interval

    def _on_body(self, body: Body, rooms: tuple[str, ...], interval: float) -> float:
        decoded = self._snapshots.decode(body.data, rooms) if body.bad is None else protocol.Dropped(body.bad)
        if isinstance(decoded, protocol.Dropped):
            self.drop(decoded.reason)  # counted like a bad frame; nothing of it is shown
            self._poll_failed(f"bad snapshot ({decoded.reason})", interval)
            return interval
        for reason in decoded.dropped:
            self.drop(reason)
        every = max(interval, decoded.poll)
        self._etag = body.etag
        self._poll_state(every, None)
        self._apply_snapshot(decoded)
        return every

    def _apply_snapshot(self, snapshot: Snapshot) -> None:
        store = self.store
        for room, entry in snapshot.rooms.items():
            current = store.rooms.get(room)
            if current is None:
                continue  # taken out of the config while the request was under way
            if isinstance(entry, RoomRefused):
                if current.error != entry.error:
                    log.warning("upstream snapshot refused room %s: %s", room, entry.error,
                                extra={"ROOM": room, "ROOM_ERROR": entry.error})
                store.set_room_error(room, entry.error)
            else:
                store.apply_queue(room, entry.patients, entry.now_serving, parse_ts(entry.ts), entry.seq)

    async def _on_refused(self, refused: Refused, token: str, interval: float) -> float:
        """As for the handshake: 401 reads the token afresh (a new one is tried within 1 s,
        once), 403 is an authorisation failure, 429/503 wait at least ``Retry-After``."""
        status = refused.status
        action = action_for_status(status)
        retry_after = parse_retry_after(refused.retry_after, time.time())
        if action is Action.REFRESH_TOKEN and not self._poll_token_retried and await self._token_changed(token):
            self._poll_token_retried = True
            return min(PROMPT_MAX_DELAY, interval)
        self._poll_token_retried = False
        if action is Action.AUTH_FAILED:
            delay = max(interval, float(self.cfg.backoff.max))
            self._poll_failed(f"HTTP {status}", delay, auth_failed=True)
            return delay
        delay = max(interval, retry_after or 0.0)
        self._poll_failed(f"HTTP {status}", delay)
        return delay

    def _poll_failed(self, problem: str, delay: float, *, auth_failed: bool = False) -> None:
        level = logging.DEBUG if problem == self._poll_problem else logging.WARNING
        if auth_failed and problem != self._poll_problem:
            level = logging.ERROR
        log.log(level, "upstream snapshot: %s; polling again in %.1f s", problem, delay)
        self._etag = None  # the next success is a full answer
        self._poll_state(None, problem, auth_failed=auth_failed)

    def _poll_state(self, every: float | None, problem: str | None, *, auth_failed: bool = False) -> None:
        if every is not None and every != self._poll_every:
            socket = self._socket_link[1] or self._socket_link[0].value
            log.info("upstream degraded: polling %s every %g s (socket: %s)",
                     redact_url(self.cfg.fallback.url) if self.cfg.fallback else "the snapshot", every, socket)
        if every is not None:
            self._poll_token_retried = False
        self._poll_every = every
        self._poll_problem = problem
        self._poll_auth_failed = auth_failed
        self._show_link()

    def _describe_text(self, text: str, token: str) -> str:
        return text.replace(token, "***") if token else text
