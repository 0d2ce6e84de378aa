"""systemd: readiness, a truthful STATUS line, the watchdog, and the journal.

Everything here is a no-op without systemd: no ``$NOTIFY_SOCKET``, no notifications; no
``$JOURNAL_STREAM`` on stderr, plain log lines. systemd-python is used when installed
(Debian's ``python3-systemd``); without it the notify protocol is one datagram, sent here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from typing import Callable, Final, Mapping

from .model import LinkStatus
from .store import RoomStore

log = logging.getLogger(__name__)

# The "last update N s ago" part of STATUS goes stale by itself: refresh it this often.
STATUS_REFRESH: Final = 10.0

try:  # Debian's python3-systemd, or systemd-python from PyPI
    from systemd import daemon as _sd_daemon
    from systemd import journal as _sd_journal
except ImportError:  # pragma: no cover - depends on the machine
    _sd_daemon = None
    _sd_journal = None


class Notifier:
    """sd_notify(3): never raises, and does nothing when not run by systemd."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.address = environ.get("NOTIFY_SOCKET") or None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watchdog_ours = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and watchdog_ours else None
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        if self.address is None:
            return False
        message = "\n".join(lines)
        try:
            if _sd_daemon is not None:
                return bool(_sd_daemon.notify(message))
            address = self.address
            if address.startswith("@"):  # abstract namespace
                address = "\0" + address[1:]
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), address)
            return True
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)
            return False

    def ready(self, status: str | None = None) -> None:
        self.notify("READY=1", *self._status_line(status))

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match it; older ones ignore it.
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self.notify(*self._status_line(text))

    def _status_line(self, text: str | None) -> list[str]:
        if text is None:
            return []
        self._last_status = text
        return [f"STATUS={text}"]

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def status_text(store: RoomStore, now: float | None = None, note: str | None = None) -> str:
    """Short and human: what an operator needs from ``systemctl status`` at a glance."""
    now = time.time() if now is None else now
    link = store.link
    rooms = store.rooms
    parts: list[str] = []
    if link.status is LinkStatus.CONNECTED:
        parts.append("upstream connected")
    elif link.status is LinkStatus.DEGRADED:
        every = f"{link.poll_interval:g} s" if link.poll_interval is not None else "a few seconds"
        socket_problem = f" (socket: {link.detail})" if link.detail else ""
        parts.append(f"upstream degraded: polling every {every}{socket_problem}")
    elif link.status is LinkStatus.AUTH_FAILED:
        retry = f", retrying every {_seconds(link.retry_in)}" if link.retry_in else ""
        parts.append(f"upstream: auth failed ({link.detail}){retry}")
    elif link.status is LinkStatus.CONNECTING and not link.detail:
        parts.append("upstream connecting")
    else:
        retry = f", retrying in {_seconds(link.retry_in)}" if link.retry_in is not None else ""
        parts.append(f"upstream down ({link.detail}){retry}")
    parts.append(f"{len(rooms)} room{'s' if len(rooms) != 1 else ''}")
    refused = sum(1 for r in rooms.values() if r.error)
    if refused:
        parts.append(f"{refused} refused")
    if store.last_frame_at is not None:
        parts.append(f"last update {_age(now - store.last_frame_at)} ago")
    for name, state in sorted(store.components.items()):
        parts.append(f"{name} {state}")
    if store.dropped_frames:
        parts.append(f"{store.dropped_frames} bad frames dropped")
    if note:
        parts.append(note)
    return " · ".join(parts)


class SystemdService:
    """Keeps STATUS current and feeds the watchdog from the event loop itself, so that a
    blocked loop stops the pings and systemd restarts the daemon."""

    def __init__(self, store: RoomStore, notifier: Notifier, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.notifier = notifier
        self._clock = clock
        self.note: str | None = None  # e.g. "reload refused: ..."; shown until the next reload

    def current_status(self) -> str:
        return status_text(self.store, self._clock(), self.note)

    async def run(self) -> None:
        if not self.notifier.enabled:
            await asyncio.Event().wait()  # nothing to do, but stay a well-behaved task
        async with asyncio.TaskGroup() as tg:
            if self.notifier.watchdog_interval:
                tg.create_task(self._watchdog(self.notifier.watchdog_interval))
            tg.create_task(self._status())

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _status(self) -> None:
        with self.store.subscribe() as changes:
            while True:
                self.notifier.status(self.current_status())
                try:
                    async with asyncio.timeout(STATUS_REFRESH):
                        while True:
                            batch = await anext(changes)
                            if batch.link is not None:
                                break
                except TimeoutError:
                    pass


# -- logging ---------------------------------------------------------------------------------


def stderr_is_journal(environ: Mapping[str, str] = os.environ) -> bool:
    """``$JOURNAL_STREAM`` is "dev:ino" of the stream systemd connected; it must be *our*
    stderr (a child of the service may inherit the variable with another stderr)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class _PriorityPrefix(logging.Formatter):
    """Plain lines for the journal without systemd-python: "<3>" sets the priority."""

    _PRIORITY: Final = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def log_handler(environ: Mapping[str, str] = os.environ) -> logging.Handler:
    """The journal with structured fields (ROOM=, CLOSE_CODE=, passed as ``extra``) when
    stderr is the journal and systemd-python is there; plain stderr lines otherwise."""
    if stderr_is_journal(environ):
        if _sd_journal is not None:
            return _sd_journal.JournalHandler(SYSLOG_IDENTIFIER="waiting-room")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PriorityPrefix("%(name)s: %(message)s"))
        return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler
