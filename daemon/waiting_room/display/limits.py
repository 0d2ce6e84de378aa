"""How many display connections the daemon takes, counted per address and in all.

No sockets here: the server calls ``opened``/``closed`` from its connection's
``connection_made``/``connection_lost`` (every TCP connection, in every state) and
``take_client`` when a ``/ws`` request arrives, and sends the refusal these return. The budget
comes from the process's descriptor limit, so that no client of the display port can take
the descriptors the upstream, the broker, the state file and the sign command need.
"""

from __future__ import annotations

import ipaddress
import logging
import resource
from collections import Counter
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)

# Descriptors never given to display clients: the upstream socket (two during a token
# rotation), the broker, the state file, sign and token commands, Python's own.
RESERVE_FDS: Final = 64
# asyncio accepts up to ``backlog`` connections in one go before any of them is looked at:
# that many more descriptors must be free when the budget is reached.
MAX_ACCEPT_BATCH: Final = 100
# Connections that are not screens (pages, /static, /healthz, handshakes in flight): room
# kept for them in the total, and allowed per address on top of max_clients_per_address.
HTTP_ROOM: Final = 64
HTTP_PER_ADDRESS: Final = 8
# Beyond max_open, this many more connections are taken for /healthz alone (anything else
# gets the 503): monitoring keeps working while a flood holds every other slot.
HEALTH_ROOM: Final = 32
RETRY_AFTER: Final = 5  # seconds, in every refusal

# Reasons, as counted in /healthz.
TOO_MANY_CONNECTIONS: Final = "connections"  # open connections would eat into the reserve
TOO_MANY_FROM_ADDRESS: Final = "address_connections"  # one address holds too many connections
TOO_MANY_CLIENTS: Final = "clients"  # display.max_clients screens
TOO_MANY_CLIENTS_FROM_ADDRESS: Final = "address_clients"  # display.max_clients_per_address
HEALTH_ONLY: Final = "health_only"  # not a refusal: this connection may ask for /healthz only
REASON_TEXT: Final = {
    TOO_MANY_CONNECTIONS: "too many open connections (descriptor reserve)",
    TOO_MANY_FROM_ADDRESS: "too many open connections from this address",
    TOO_MANY_CLIENTS: "display.max_clients reached",
    TOO_MANY_CLIENTS_FROM_ADDRESS: "display.max_clients_per_address reached",
}


def raise_fd_limit() -> tuple[int, int]:
    """The soft RLIMIT_NOFILE up to the hard limit (for the daemon's own process);
    returns the (soft, hard) limits in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft >= hard):
        return soft, hard
    target = hard
    if target == resource.RLIM_INFINITY:  # Linux refuses infinity: its ceiling is nr_open
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft, hard
    return target, hard


def soft_fd_limit() -> int | None:
    """None when unlimited."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def address_key(peer: object) -> str:
    """The address a client is counted under: its IP, an IPv4-mapped IPv6 address as IPv4,
    and any other IPv6 address as its /64 (one host is given a whole /64)."""
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    if not isinstance(host, str):
        return "?"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class Budget:
    """What the display may hold, from the config and the descriptor limit."""

    max_open: int  # TCP connections in every state, in all
    health_open: int  # and up to this many when the request is for /healthz
    max_clients: int  # screens in all (display.max_clients, clamped to fit)
    per_address_open: int
    per_address_clients: int
    fd_ceiling: int | None  # an accepted descriptor numbered this high means the table is nearly full
    accept_batch: int  # the listen backlog, and so how many asyncio accepts at once
    clamped: bool  # max_clients did not fit

    @classmethod
    def plan(cls, max_clients: int, max_per_address: int, soft_limit: int | None) -> "Budget":
        if soft_limit is None:
            batch = MAX_ACCEPT_BATCH
            max_open = max_clients + HTTP_ROOM
            ceiling = None
        else:
            batch = max(8, min(MAX_ACCEPT_BATCH, soft_limit // 8))
            ceiling = max(HTTP_ROOM + HEALTH_ROOM + 1, soft_limit - RESERVE_FDS - batch)
            max_open = min(max_clients + HTTP_ROOM, ceiling - HEALTH_ROOM)
        fitting = max(1, max_open - HTTP_ROOM)
        # Up to the descriptor ceiling, connections beyond max_open are taken for /healthz.
        health_open = max_open + HEALTH_ROOM if ceiling is None else ceiling
        return cls(
            max_open=max_open,
            health_open=health_open,
            max_clients=min(max_clients, fitting),
            per_address_open=max_per_address + HTTP_PER_ADDRESS,
            per_address_clients=max_per_address,
            fd_ceiling=ceiling,
            accept_batch=batch,
            clamped=max_clients > fitting,
        )


class ConnectionLimits:
    """The counts, and the refusal reason (or None) for one more connection or screen."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.open = 0
        self.clients = 0
        self._open_by: Counter[str] = Counter()
        self._clients_by: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    def opened(self, key: str, fd: int | None = None) -> str | None:
        """A TCP connection was accepted; it is counted whatever the answer (it holds a
        descriptor until ``closed``). A reason means: refuse it at once; ``HEALTH_ONLY``: take
        it, but answer nothing but /healthz."""
        self.open += 1
        self._open_by[key] += 1
        b = self.budget
        reason = None
        if self.open > b.health_open or (b.fd_ceiling is not None and fd is not None and fd >= b.fd_ceiling):
            reason = TOO_MANY_CONNECTIONS
        elif self._open_by[key] > b.per_address_open:
            reason = TOO_MANY_FROM_ADDRESS
        elif self.open > b.max_open:
            return HEALTH_ONLY
        if reason is not None:
            self.refused[reason] += 1
        return reason

    def refuse_beyond_health(self) -> str:
        """A connection taken for /healthz alone asked for something else."""
        self.refused[TOO_MANY_CONNECTIONS] += 1
        return TOO_MANY_CONNECTIONS

    def take_client(self, key: str) -> str | None:
        """A ``/ws`` request: None takes a screen's slot (give it back with ``closed``)."""
        b = self.budget
        reason = None
        if self._clients_by[key] >= b.per_address_clients:
            reason = TOO_MANY_CLIENTS_FROM_ADDRESS
        elif self.clients >= b.max_clients:
            reason = TOO_MANY_CLIENTS
        if reason is not None:
            self.refused[reason] += 1
            return reason
        self.clients += 1
        self._clients_by[key] += 1
        return None

    def closed(self, key: str, client: bool) -> None:
        self.open -= 1
        _drop(self._open_by, key)
        if client:
            self.clients -= 1
            _drop(self._clients_by, key)

    def stats(self) -> dict[str, object]:
        return {
            "open_connections": self.open,
            "refused_clients": sum(self.refused.values()),
            "refused_by_reason": dict(sorted(self.refused.items())),
            "limits": {
                "max_clients": self.budget.max_clients,
                "max_clients_per_address": self.budget.per_address_clients,
                "max_connections": self.budget.max_open,
            },
        }


def _drop(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
