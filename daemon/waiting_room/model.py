"""The frozen values every part of the daemon shares: a room's state and the link's health."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgspec


class LinkStatus(str, enum.Enum):
    """The upstream socket as the rest of the world should see it."""

    CONNECTING = "connecting"  # never connected yet since start
    CONNECTED = "connected"  # joined and receiving
    DISCONNECTED = "disconnected"  # lost; reconnecting with backoff
    AUTH_FAILED = "auth_failed"  # token refused for good (4003 / 403): needs a human
    # No socket, but fresh values from the polled HTTP snapshot (upstream.fallback): the
    # rooms are live, only every few seconds instead of at once.
    DEGRADED = "degraded"

    @property
    def live(self) -> bool:
        """Values arrive (by the socket, or by polling): the rooms need not be stale."""
        return self is LinkStatus.CONNECTED or self is LinkStatus.DEGRADED

    @property
    def feed(self) -> str | None:
        """Where the values come from: ``socket``, ``poll``, or None while nothing arrives."""
        return "socket" if self is LinkStatus.CONNECTED else "poll" if self is LinkStatus.DEGRADED else None


class RoomState(msgspec.Struct, frozen=True):
    """The latest known state of one room.

    ``stale`` is true until fresh data arrives and again as soon as the upstream is lost: a
    consumer must never present a stale number as live. Times are Unix seconds. A msgspec
    Struct rather than a dataclass: one is built per frame, and its __init__ runs in C.
    """

    room: str
    name: str
    patients: int | None = None
    now_serving: str | None = None
    updated_at: float | None = None  # when the count changed (the server's ts when given)
    received_at: float | None = None  # when this daemon last heard about the room
    seq: int | None = None
    stale: bool = True
    error: str | None = None  # e.g. "unknown_room", "forbidden" when the server refused it


@dataclass(frozen=True, slots=True)
class LinkState:
    """Health of the upstream connection (the counters of frames live on the store)."""

    status: LinkStatus = LinkStatus.CONNECTING
    detail: str = ""  # short and human: "closed 1011", "handshake refused: HTTP 503" (the socket's, while degraded)
    since: float = 0.0  # Unix seconds of the last status change
    retry_in: float | None = None  # seconds until the next attempt, while disconnected
    connects: int = 0  # successful connections since start
    poll_interval: float | None = None  # while degraded: seconds between polls of the snapshot
