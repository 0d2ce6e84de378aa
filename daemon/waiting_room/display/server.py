"""The kiosk pages, their push channel, /healthz and /metrics, served by the daemon itself.

One ``websockets`` server does both jobs: ``process_request`` answers the plain GETs (pages,
a fixed whitelist of static files, /healthz, /metrics) and lets only ``/ws`` upgrade. Each browser gets
its own store subscription: it receives the whole current state first, then coalesced
changes, so a slow screen lags on its own (and gets the latest numbers when it catches up)
while every other screen and the one upstream connection carry on.

No client can hurt the rest of the daemon: every TCP connection is counted from the moment it
is accepted (``_Connection``), and one that would eat into the descriptors kept for the
upstream, the broker and the rest, or one too many from an address, is answered with a canned
503 and closed at once; ``/ws`` requests beyond ``max_clients`` (in all, or from one address)
get a 503 too. See ``limits.py``.
"""

from __future__ import annotations

import asyncio
import email.utils
import hmac
import http
import ipaddress
import logging
import ssl
import time
from asyncio import sslproto
from functools import partial
from typing import Any, Awaitable, Callable, Final, Iterable, Mapping
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .. import tls
from ..credentials import SecretError, read_secret_file
from ..config import DisplayConfig, RoomConfig
from ..store import Batch, RoomStore, Subscription
from . import limits, render
from .limits import Budget, ConnectionLimits
from .render import Assets, PageOptions
from ..logutil import RateLimitedLog
from .signs import SignDriver

log = logging.getLogger(__name__)

MAX_INCOMING: Final = 4096  # pages send nothing; anything bigger is misuse
MAX_BUFFER: Final = 256 * 1024  # a screen whose unsent data grows past this is dropped
PING_INTERVAL: Final = 20.0  # RFC 6455 pings: reap browsers that vanished without a close
PING_TIMEOUT: Final = 10.0  # ... unanswered this long: a dead kiosk's socket is freed within 30 s
OPEN_TIMEOUT: Final = 10.0  # a request must arrive whole within this (slowloris)
CLOSE_TIMEOUT: Final = 2.0
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format


class AccessTokenError(Exception):
    """``display.access_token_file`` cannot be read; the message never contains the token."""


def read_access_token(cfg: DisplayConfig) -> str | None:
    """Blocking: call in a thread."""
    if cfg.access_token is not None:
        return cfg.access_token
    if cfg.access_token_file is None:
        return None
    try:
        return read_secret_file(cfg.access_token_file, "display.access_token_file")
    except SecretError as exc:
        raise AccessTokenError(str(exc)) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


WILDCARDS: Final = frozenset({"", "0.0.0.0", "::"})


def host_name(header: str | None) -> str | None:
    """The name in a ``Host`` header, without the port, lower case, without a final dot;
    an IPv6 literal without its brackets. None when there is no usable name."""
    if not header:
        return None
    host = header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 1 else None
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".") or None


class HostCheck:
    """Which ``Host`` the display answers (DNS rebinding): the listen address, ``localhost``
    and loopback addresses, the names in ``display.allowed_hosts``; and, when listening on a
    wildcard address, any IP address (the machine's own are not known from the config, and a
    rebinding attack needs a DNS name: the victim's browser sends the attacker's name)."""

    def __init__(self, listen_host: str, allowed: Iterable[str]) -> None:
        listen = listen_host.strip("[]").lower()
        self.any_ip = listen in WILDCARDS
        self.names = frozenset({"localhost", *(h for h in (host_name(n) for n in (listen, *allowed)) if h)})

    def __call__(self, header: str | None) -> bool:
        host = host_name(header)
        if host is None:
            return False
        if host in self.names:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return self.any_ip or ip.is_loopback


def _canned_refusal(reason: str) -> bytes:
    """Sent before the request is read: the same for every request (pages, /ws, /healthz)."""
    body = b"too many connections, retry later\n"
    headers = [
        ("Retry-After", str(limits.RETRY_AFTER)),
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        *render.SECURITY_HEADERS,
        ("X-Refused", reason),
        ("Connection", "close"),
    ]
    head = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return f"HTTP/1.1 503 Service Unavailable\r\n{head}\r\n".encode() + body


_REFUSALS: Final = {reason: _canned_refusal(reason) for reason in limits.REASON_TEXT}


class _TlsHandshakes:
    """The TLS handshakes under way (display.cert_file), each a waiter owned here and aborted
    when the service stops; failures are logged once a minute with a count.

    A connection is upgraded in its own ``connection_made``, before the loop reads a byte
    from it: asyncio's ``SSLProtocol`` takes the transport there and then, which is what
    ``loop.start_tls`` does a loop turn later (and too late on uvloop, which starts reading an
    accepted connection as soon as ``connection_made`` returns)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.pending: dict[asyncio.Future[None], asyncio.BaseTransport] = {}
        self.failures = 0
        self._log = RateLimitedLog(log)

    def upgrade(self, connection: _Connection, transport: asyncio.BaseTransport) -> None:
        """TLS from the first byte: ``connection.connection_made`` is called again, with the
        secure transport, once the handshake is done; ``connection.handshake_ended`` either way."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        secure = sslproto.SSLProtocol(loop, connection, self.context, done, server_side=True,
                                      ssl_handshake_timeout=OPEN_TIMEOUT)
        transport.set_protocol(secure)
        secure.connection_made(transport)
        self.pending[done] = transport
        done.add_done_callback(partial(self._ended, connection))

    def _ended(self, connection: _Connection, done: asyncio.Future[None]) -> None:
        self.pending.pop(done, None)
        connection.handshake_ended()
        exc = None if done.cancelled() else done.exception()
        if exc is not None:
            self.failed(connection.address, exc)

    def failed(self, address: str, exc: BaseException) -> None:
        """A TLS error is counted and logged; a client that just went away is not news."""
        if not isinstance(exc, ssl.SSLError):
            return
        self.failures += 1
        reason = exc.reason or type(exc).__name__
        hint = " (a page opened with http:// on the https:// port?)" if reason == "HTTP_REQUEST" else ""
        self._log.warning("display: TLS handshake with %s failed: %s%s", address, reason, hint)

    def cancel(self) -> None:
        """The service stops: no page behind these yet."""
        for transport in list(self.pending.values()):
            transport.abort()


class _Connection(ServerConnection):
    """Counts itself from accept to close (every state: before its request, pages, screens),
    and refuses itself at once, before any handshake is spent on it, when over the limits.

    With TLS, the connection is counted from the TCP accept too, then upgraded here
    (``_TlsHandshakes.upgrade``) rather than by the server socket: a client that never
    finishes its TLS handshake holds a counted descriptor for at most ``OPEN_TIMEOUT``, and
    one over the limits is dropped before any handshake is spent on it."""

    def __init__(self, *args: Any, counts: ConnectionLimits, on_refused: Callable[[str, str], None],
                 handshakes: _TlsHandshakes | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.counts = counts
        self.on_refused = on_refused
        self.handshakes = handshakes
        self.address = "?"
        self.counted = False
        self.client = False  # holds a screen's slot (taken in process_request)
        self.health_only = False  # taken beyond the budget: /healthz, /metrics and nothing else
        self._upgrading = False  # the next connection_made brings the TLS transport
        self._made = False  # websockets' side has its transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._upgrading:  # the TLS handshake is done: the page's HTTP starts now
            self._upgrading = False
            self._made = True
            super().connection_made(transport)
            return
        self.address = limits.address_key(transport.get_extra_info("peername"))
        sock = transport.get_extra_info("socket")
        self.counted = True
        reason = self.counts.opened(self.address, sock.fileno() if sock is not None else None)
        if reason is None or reason == limits.HEALTH_ONLY:
            self.health_only = reason is not None
            if self.handshakes is not None:
                self._upgrading = True
                self.handshakes.upgrade(self, transport)
                return
            self._made = True
            super().connection_made(transport)
            return
        self._made = True
        Connection.connection_made(self, transport)  # no handshake: answered and closed now
        # A stream transport: asyncio's is a WriteTransport, uvloop's TCPTransport is not a
        # subclass of it (an isinstance check would refuse it) but has the same methods.
        stream: Any = transport
        if self.handshakes is not None:
            stream.abort()  # no TLS handshake spent on it: a TLS client sees a reset
        else:
            stream.write(_REFUSALS[reason])
            stream.close()
        self.on_refused(reason, self.address)

    def handshake_ended(self) -> None:
        """A handshake that ended without a secure connection (it failed, the client left, the
        service aborted it) brings no connection_lost: the connection is uncounted here."""
        if self._upgrading:
            self._upgrading = False
            self._uncount()

    def _uncount(self) -> None:
        if self.counted:
            self.counted = False
            self.counts.closed(self.address, self.client)
            self.client = False

    def connection_lost(self, exc: Exception | None) -> None:
        self._uncount()
        if self._made:
            super().connection_lost(exc)


class _View:
    """The screens that show the same thing: every room, or one room."""

    __slots__ = ("room", "clients", "task", "changes")

    def __init__(self, room: str | None, changes: Subscription) -> None:
        self.room = room
        self.clients: set[ServerConnection] = set()
        self.task: asyncio.Task[None] | None = None
        # Taken when the view is made, in the same step as its first screen's full state:
        # a change in between (before the fan-out task first runs) is not lost.
        self.changes = changes


class DisplayService:
    """A consumer of the store, like MQTT: serves the displays until cancelled.

    ``ready`` is set once the socket listens (``port`` is then the bound port, useful with
    ``listen: host:0``) or at once when only the sign command runs.
    """

    def __init__(
        self,
        cfg: DisplayConfig,
        rooms: Iterable[RoomConfig],
        store: RoomStore,
        *,
        required_components: Iterable[str] = ("mqtt",),
        page_options: PageOptions | None = None,
        clock: Callable[[], float] = time.time,
        max_buffer: int = MAX_BUFFER,
        metrics: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        self.cfg = cfg
        # /metrics: the Prometheus text the composition root renders (metrics.py); None: 404.
        self.metrics = metrics
        self.rooms: Mapping[str, RoomConfig] = {r.id: r for r in rooms}
        self.store = store
        self.required = tuple(required_components)
        self.page_options = page_options or PageOptions(heartbeat=float(cfg.heartbeat))
        self.clock = clock
        self.max_buffer = max_buffer
        self._views: dict[str | None, _View] = {}
        self._tg: asyncio.TaskGroup | None = None
        self.signs = SignDriver(cfg.command, float(cfg.command_timeout), store) if cfg.command else None
        self.ready = asyncio.Event()
        self.port: int | None = None
        self.clients = 0
        self.slow_clients = 0
        self._assets: Assets | None = None
        self._token: bytes | None = None
        self._slow = RateLimitedLog(log)
        self._refusals = RateLimitedLog(log)
        self.limits: ConnectionLimits | None = None
        self._tls: _TlsHandshakes | None = None  # HTTPS (display.cert_file)
        self._host_ok = HostCheck(cfg.host, cfg.allowed_hosts)
        self._hosts_refused = RateLimitedLog(log)
        self.refused_hosts = 0

    async def reload_certificate(self) -> None:
        """``systemctl reload`` (what a renewal hook runs): display.cert_file and key_file are
        read again and serve the handshakes from now on; open connections keep theirs. A
        file that cannot be used keeps the certificate in use (the reload's check has
        refused such a config already; this covers a file changed in between)."""
        if self._tls is None:
            return
        try:
            context = await asyncio.to_thread(tls.display_context, self.cfg)
        except tls.TlsError as exc:
            log.error("display: the certificate in use stays: %s", exc)
            return
        if context is not None:
            self._tls.context = context

    def update_rooms(self, rooms: Iterable[RoomConfig]) -> None:
        """A reload changed the rooms: pages and ``/ws`` follow at once, and open pages learn
        of added and removed rooms through the store (which the reload has already updated)."""
        self.rooms = {r.id: r for r in rooms}

    @property
    def url(self) -> str | None:
        if self.port is None:
            return None
        host = self.cfg.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
        scheme = "https" if self.cfg.cert_file else "http"
        return f"{scheme}://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{self.port}/"

    async def run(self) -> None:
        # Listening comes first and outside the TaskGroup: a busy port is a plain OSError
        # that App reports as a start-up failure.
        server = await self._listen() if self.cfg.enabled else None
        try:
            if server is not None:
                self.port = server.sockets[0].getsockname()[1]
                log.info("display: pages at %s (one room: %srooms/<id>)", self.url, self.url)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg  # owns the fan-out task of each view
                self.ready.set()
                if self.signs is not None:
                    tg.create_task(self.signs.run(), name="display-signs")
                await asyncio.Future()  # until cancelled
        finally:
            self._tg = None
            self.ready.clear()
            if server is not None:
                # Every page is closed with 1001 (going away): it shows "offline" at once.
                server.close()
                if self._tls is not None:
                    self._tls.cancel()  # handshakes under way: no page behind them yet
                try:
                    async with asyncio.timeout(CLOSE_TIMEOUT + 3):
                        await server.wait_closed()
                        if self._tls is not None and self._tls.pending:
                            await asyncio.wait(set(self._tls.pending))
                except TimeoutError:
                    log.warning("display: some pages did not close in time")

    async def _listen(self) -> Server:
        self._assets = await asyncio.to_thread(render.load_assets)
        token = await asyncio.to_thread(read_access_token, self.cfg)
        self._token = token.encode() if token is not None else None
        context = await asyncio.to_thread(tls.display_context, self.cfg)
        self._tls = _TlsHandshakes(context) if context is not None else None
        for r in self.rooms.values():
            if r.locale and render.resolve_locale(r.locale, self._assets.locales) == render.DEFAULT_LOCALE != r.locale:
                log.warning("display: room %s: no locale %r in display/locales, using English", r.id, r.locale)
        if render.resolve_locale(self.cfg.locale, self._assets.locales) != self.cfg.locale:
            log.warning("display: no locale %r in display/locales, using English", self.cfg.locale)
        if self._token is None and not is_loopback(self.cfg.host):
            log.warning(
                "display: listening on %s without display.access_token: anyone who can reach it sees the pages",
                self.cfg.listen,
            )
        elif self._tls is None and not is_loopback(self.cfg.host):
            log.warning(
                "display: listening on %s over plain HTTP: the access token travels in clear; "
                "set display.cert_file and display.key_file", self.cfg.listen,
            )
        budget = Budget.plan(self.cfg.max_clients, self.cfg.max_clients_per_address, limits.soft_fd_limit())
        if budget.clamped:
            log.warning(
                "display: display.max_clients %d does not fit the descriptor limit (RLIMIT_NOFILE %s, of which "
                "%d are kept for the upstream, the broker and the rest): at most %d screens; raise LimitNOFILE "
                "or lower display.max_clients",
                self.cfg.max_clients, limits.soft_fd_limit(), limits.RESERVE_FDS + budget.accept_batch,
                budget.max_clients,
            )
        self.limits = ConnectionLimits(budget)
        try:
            return await serve(
                self._connection,
                self.cfg.host,
                self.cfg.port,
                process_request=self._route,
                process_response=self._finish,
                server_header=None,
                max_size=MAX_INCOMING,
                max_queue=4,
                ping_interval=PING_INTERVAL,
                ping_timeout=PING_TIMEOUT,
                open_timeout=OPEN_TIMEOUT,
                close_timeout=CLOSE_TIMEOUT,
                create_connection=partial(_Connection, counts=self.limits, on_refused=self._refused,
                                          handshakes=self._tls),
                backlog=budget.accept_batch,
            )
        except OSError as exc:
            log.error("display: cannot listen on %s: %s", self.cfg.listen, exc.strerror or exc)
            raise

    # -- HTTP -------------------------------------------------------------------------------

    def _respond(
        self,
        status: int,
        body: bytes,
        content_type: str,
        extra: Iterable[tuple[str, str]] = (),
    ) -> Response:
        phrase = http.HTTPStatus(status).phrase
        headers = Headers(
            [
                ("Date", email.utils.formatdate(usegmt=True)),
                ("Connection", "close"),
                ("Content-Type", content_type),
                ("Content-Length", str(len(body))),
                *render.SECURITY_HEADERS,
                *extra,
            ]
        )
        return Response(status, phrase, headers, body)

    @staticmethod
    def _finish(connection: ServerConnection, request: Request, response: Response) -> None:
        """websockets' own refusals (e.g. 426 for a plain GET of /ws) get the headers too."""
        if response.status_code != 101:
            for name, value in render.SECURITY_HEADERS:
                if name not in response.headers:
                    response.headers[name] = value

    def _message(self, status: int, title: str, message: str) -> Response:
        return self._respond(
            status, render.render_message(title, message, self._assets), "text/html; charset=utf-8",
            [("Cache-Control", "no-store")],
        )

    def _authorised(self, query: Mapping[str, list[str]]) -> bool:
        if self._token is None:
            return True
        presented = query.get("token", [""])[0].encode()
        return hmac.compare_digest(presented, self._token)

    def _route(self, connection: ServerConnection, request: Request) -> Response | Awaitable[Response] | None:
        """Every request lands here; only an authorised ``/ws`` returns None (upgrade), and
        only ``/metrics`` a coroutine."""
        assert self._assets is not None
        hosts = request.headers.get_all("Host")
        host = hosts[0] if len(hosts) == 1 else None  # none, or several: no answer either
        if not self._host_ok(host):
            # A page elsewhere that rebinds its own name to this address gets nothing: not the
            # pages, not the feed, not /healthz.
            self.refused_hosts += 1
            self._hosts_refused.log(logging.INFO, "display: refused a request for Host %r from %s "
                                    "(not the listen address, localhost or in display.allowed_hosts)",
                                    (host or "")[:100], getattr(connection, "address", "?"))
            return self._respond(
                421, b"unknown host name: add it to display.allowed_hosts\n", "text/plain; charset=utf-8",
                [("Cache-Control", "no-store")],
            )
        parts = urlsplit(request.path)
        path = parts.path
        try:
            query = parse_qs(parts.query, max_num_fields=8)
        except ValueError:
            return self._message(400, "Bad request", "Too many query parameters.")
        if request.method != "GET":
            return self._respond(
                405, b"method not allowed\n", "text/plain; charset=utf-8", [("Allow", "GET")]
            )
        if getattr(connection, "health_only", False) and path not in ("/healthz", "/metrics"):
            reason = self.limits.refuse_beyond_health()
            self._refused(reason, connection.address)  # type: ignore[attr-defined]
            return self._respond(
                503, limits.REASON_TEXT[reason].encode() + b"\n", "text/plain; charset=utf-8",
                [("Retry-After", str(limits.RETRY_AFTER)), ("Cache-Control", "no-store")],
            )
        if path.startswith("/static/"):
            asset = self._assets.static.get(path[len("/static/"):])
            if asset is None:
                return self._message(404, "Not found", "There is no such file.")
            return self._respond(
                200, asset.body, asset.content_type,
                [("Cache-Control", "public, max-age=31536000, immutable" if query.get("v") else "no-cache")],
            )
        if path == "/healthz":
            return self._health()
        if path == "/metrics" and self.metrics is not None:
            # Monitoring, as /healthz: no token, and answered beyond the budget too. A
            # coroutine: websockets awaits it (the text is formatted off the event loop).
            return self._metrics_response(self.metrics)
        if path == "/favicon.ico":
            return self._respond(204, b"", "image/x-icon")
        room: str | None = None
        if path == "/ws" or path == "/":
            room = query.get("room", [None])[0] if path == "/ws" else None
        elif path.startswith("/rooms/"):
            room = path[len("/rooms/"):].rstrip("/")
            if not room:
                return self._message(404, "Not found", "There is no such page.")
        else:
            return self._message(404, "Not found", "There is no such page.")
        if not self._authorised(query):
            log.info("display: refused %s without a valid access token", path)
            return self._message(
                401, "Access token required", "Open this page with the display's ?token=... in its address."
            )
        if room is not None and room not in self.rooms:
            return self._message(
                404, "Unknown room", "This display server has no such room. Check the room id in the address."
            )
        if path == "/ws":
            return self._check_origin(request) or self._take_client(connection)
        locale = self._page_locale(room, query.get("lang", [None])[0])
        shown = [self.rooms[room]] if room is not None else list(self.rooms.values())
        body = render.render_page(shown, room, locale, self._assets, self.page_options)
        return self._respond(200, body, "text/html; charset=utf-8", [("Cache-Control", "no-store")])

    def _page_locale(self, room: str | None, override: str | None) -> str:
        assert self._assets is not None
        wanted = override or (self.rooms[room].locale if room is not None else None) or self.cfg.locale
        return render.resolve_locale(wanted, self._assets.locales)

    def _check_origin(self, request: Request) -> Response | None:
        """A browser on another site must not read the pages' feed (cross-site WebSocket)."""
        origin = request.headers.get("Origin")
        host = request.headers.get("Host")
        if origin is not None and host is not None:
            origin_host = urlsplit(origin).netloc
            if origin_host.lower() != host.lower():
                log.info("display: refused a WebSocket from origin %r", origin[:100])
                return self._message(403, "Forbidden", "Cross-origin connections are not allowed.")
        return None

    def _take_client(self, connection: ServerConnection) -> Response | None:
        """The screen limits, checked when the request arrives. The slot is taken here, so
        that screens still in their handshake count, and given back when the connection closes."""
        if self.limits is None or not isinstance(connection, _Connection) or connection.client:
            return None
        reason = self.limits.take_client(connection.address)
        if reason is None:
            connection.client = True
            return None
        self._refused(reason, connection.address)
        return self._respond(
            503, b"too many displays, retry later\n", "text/plain; charset=utf-8",
            [("Retry-After", str(limits.RETRY_AFTER)), ("Cache-Control", "no-store")],
        )

    def _refused(self, reason: str, address: str) -> None:
        self._refusals.warning("display: refused a client from %s: %s", address, limits.REASON_TEXT[reason])

    async def _metrics_response(self, metrics: Callable[[], Awaitable[bytes]]) -> Response:
        return self._respond(200, await metrics(), METRICS_CONTENT_TYPE, [("Cache-Control", "no-store")])

    def _health(self) -> Response:
        extra: dict[str, object] = {
            "display_clients": self.clients,
            "slow_clients": self.slow_clients,
            "tasks": len(asyncio.all_tasks()),  # a leak shows here first (bench/chaos watches it)
        }
        if self.limits is not None:
            extra.update(self.limits.stats())
        if self._tls is not None:
            extra["tls"] = {"handshakes": len(self._tls.pending), "failed_handshakes": self._tls.failures}
        extra["refused_hosts"] = self.refused_hosts
        if self.signs is not None:
            extra["signs"] = self.signs.stats()
        status, body = render.health(
            self.store.link,
            self.store.components,
            self.store.rooms,
            self.store.dropped_frames,
            self.clock(),
            self.required,
            extra,
        )
        return self._respond(status, body, "application/json", [("Cache-Control", "no-store")])

    # -- WebSocket --------------------------------------------------------------------------

    def _view(self, room: str | None) -> _View | None:
        view = self._views.get(room)
        if view is None:
            if self._tg is None:  # stopping
                return None
            view = self._views[room] = _View(room, self.store.subscribe(replay=False))
            view.task = self._tg.create_task(self._fan_out(view), name=f"display-view-{room or '*'}")
        return view

    async def _connection(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        room = parse_qs(urlsplit(ws.request.path).query).get("room", [None])[0]
        view = self._view(room)
        if view is None:
            return  # the service is stopping: the server closes this page with 1001
        now = self.clock()
        link = self.store.link
        full = Batch(dict(self.store.rooms), link, dict(self.store.components))
        # The whole current state, then membership of the view, in one step (no await in
        # between): no change can slip past this screen.
        broadcast([ws], render.hello_frame(float(self.cfg.heartbeat), now).decode())
        first = render.state_frame(full, link, room, now)
        if first is not None:
            broadcast([ws], first.decode())
        view.clients.add(ws)
        self.clients += 1
        try:
            # Pages send nothing we need; reading keeps close frames flowing.
            async for _ in ws:
                pass
        except ConnectionClosed:
            pass
        finally:
            view.clients.discard(ws)
            self.clients -= 1

    async def _fan_out(self, view: _View) -> None:
        """One store subscription per view: a change is rendered once and written to every
        screen of the view without awaiting any of them."""
        heartbeat = float(self.cfg.heartbeat)
        try:
            with view.changes as changes:
                it = aiter(changes)  # no replay: each screen got the whole state as it connected
                while True:
                    try:
                        async with asyncio.timeout(heartbeat):
                            batch = await anext(it)
                    except TimeoutError:
                        frame: bytes | None = render.heartbeat_frame(self.clock())
                    else:
                        frame = render.state_frame(batch, self.store.link, view.room, self.clock())
                    if not view.clients:
                        return  # the last screen left: the view ends (a new one starts afresh)
                    if frame is not None:
                        self._broadcast(view, frame)
        finally:
            view.changes.close()
            if self._views.get(view.room) is view:
                del self._views[view.room]

    def _broadcast(self, view: _View, frame: bytes) -> None:
        for ws in [ws for ws in view.clients if ws.transport.get_write_buffer_size() > self.max_buffer]:
            # Its socket stopped draining: let this one screen go rather than hold anything.
            view.clients.discard(ws)
            self.slow_clients += 1
            self._slow.warning("display: dropped a client that stopped reading")
            ws.transport.abort()
        broadcast(view.clients, frame.decode())

