"""When and how fast to reconnect: close codes, handshake statuses and the backoff schedule.

Pure data and arithmetic, no I/O and no clock: the upstream client asks this module how long
to wait and then does the sleeping. PROTOCOL.md's close-code table lives here as data so that
an operator can override one entry in config (``upstream.close_codes``).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Final, Iterator, Mapping

import backoff


class Action(enum.Enum):
    """What a client does after a connection ends or a handshake is refused."""

    BACKOFF = "backoff"  # reconnect with exponential backoff and full jitter
    PROMPT = "prompt"  # reconnect after a short random delay, without growing the backoff
    AT_LEAST_MAX = "at_least_max"  # the server is overloaded: wait at least the maximum
    REFRESH_TOKEN = "refresh_token"  # read the token afresh; back off if it did not change
    AUTH_FAILED = "auth_failed"  # token refused for good: retry at the maximum, loudly
    RESTART = "restart"  # the server announced a restart: the first retry spread over RESTART_SPREAD


# PROTOCOL.md, "Close codes". 1006 (dropped without a close frame) is treated like 1011.
CLOSE_CODES: Final[Mapping[int, Action]] = {
    1000: Action.BACKOFF,
    1001: Action.RESTART,
    1006: Action.BACKOFF,
    1008: Action.BACKOFF,
    1011: Action.BACKOFF,
    1012: Action.RESTART,
    1013: Action.AT_LEAST_MAX,
    4000: Action.PROMPT,
    4001: Action.REFRESH_TOKEN,
    4003: Action.AUTH_FAILED,
    4008: Action.BACKOFF,
}

# PROTOCOL.md, "Endpoint and authentication": a handshake refused with an HTTP status.
HANDSHAKE_STATUSES: Final[Mapping[int, Action]] = {
    401: Action.REFRESH_TOKEN,
    403: Action.AUTH_FAILED,
    429: Action.BACKOFF,
    503: Action.BACKOFF,
}

# PROTOCOL.md: "reconnect after a short random delay (at most 1 s)".
PROMPT_MAX_DELAY: Final = 1.0
# A server that answers every connection with 4000 gets this many prompt reconnects in a
# row; after that the ordinary backoff applies until a connection proves healthy.
PROMPT_STREAK_MAX: Final = 3
# A server that announces a restart (1001 going away, 1012 service restart) closes every
# client at the same instant and listens again moments later: the first retry is drawn over
# [initial/10, this] (at most the maximum), so a fleet arrives spread over these seconds
# instead of within the first one (bench/fleet: 1,000 daemons, a server back after 1 s).
# An unannounced loss (1006, 1011, ...) keeps the quick first retry: a blip costs ~0.5 s.
RESTART_SPREAD: Final = 10.0
# After a healthy connection is lost, the first retry is quick (a blip costs under a second);
# if that one is refused too, the server is away and every client that lost it at the same
# instant is knocking: the cap goes straight to the maximum and the draws to
# [OUTAGE_FLOOR * maximum, maximum], so a fleet reaches the returning server spread over
# seconds (bench/fleet: server down 10 s, peak per 1-s window 0.16 of an un-jittered fleet's).
OUTAGE_FLOOR: Final = 0.3
# A hostile or confused Retry-After must not park the daemon for a day.
RETRY_AFTER_CAP: Final = 600.0


def action_for_close(code: int | None, overrides: Mapping[int, Action] | None = None) -> Action:
    code = 1006 if code is None else code
    if overrides and code in overrides:
        return overrides[code]
    return CLOSE_CODES.get(code, Action.BACKOFF)


def action_for_status(status: int) -> Action:
    return HANDSHAKE_STATUSES.get(status, Action.BACKOFF)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


@dataclass(frozen=True)
class Decision:
    action: Action
    delay: float


class ReconnectSchedule:
    """Exponential backoff with full jitter, reset only by a connection that proved healthy.

    A server that accepts and closes at once never resets it, so it cannot cause a tight
    loop; the floor (a tenth of ``initial``) keeps even an unlucky jitter draw from
    reconnecting instantly.
    """

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("need 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or random.Random()
        self._caps = self._new_caps()
        self.failures = 0  # consecutive steps since the last reset
        self._prompt_streak = 0
        self._outage = False  # the last reset was a healthy connection's loss

    def _new_caps(self) -> Iterator[float]:
        # backoff.expo yields initial, 2*initial, 4*initial, ... capped at maximum, after
        # a None that primes it for .send().
        caps = backoff.expo(base=2, factor=self.initial, max_value=self.maximum)
        next(caps)
        return caps

    def reset(self) -> None:
        self._caps = self._new_caps()
        self.failures = 0
        self._prompt_streak = 0
        self._outage = False

    def _jittered(self) -> float:
        cap = next(self._caps)
        if self._outage and self.failures >= 1:
            # A healthy connection was lost and the quick retry failed: an outage.
            self.failures += 1
            return self._rng.uniform(OUTAGE_FLOOR * self.maximum, self.maximum)
        self.failures += 1
        # Full jitter above a floor: the floor stops an unlucky draw from being a tight loop,
        # drawing above it (rather than clamping to it) keeps a fleet spread out.
        return self._rng.uniform(min(self.initial / 10, cap), cap)

    def next(
        self,
        action: Action,
        *,
        healthy: bool = False,
        retry_after: float | None = None,
        token_changed: bool = False,
    ) -> Decision:
        """How long to wait before the next attempt.

        ``healthy``: the connection that just ended had been joined and receiving for a
        while. ``token_changed``: after a 4001/401, the token read afresh differs.
        """
        if healthy:
            self.reset()
            self._outage = True
        prompt = action is Action.PROMPT or (action is Action.REFRESH_TOKEN and token_changed)
        self._prompt_streak = self._prompt_streak + 1 if prompt else 0
        if prompt and self._prompt_streak <= PROMPT_STREAK_MAX:
            delay = self._rng.uniform(0, min(PROMPT_MAX_DELAY, self.maximum))
        elif action is Action.AT_LEAST_MAX:
            delay = self._rng.uniform(self.maximum, 1.5 * self.maximum)
        elif action is Action.AUTH_FAILED:
            delay = self.maximum
        elif action is Action.RESTART and self.failures == 0:
            # The first retry after an announced restart; later ones (the server is not back
            # yet) follow the backoff from its start.
            # Counted as a step: a server that closes every fresh connection with 1012
            # gets the spread once, then the backoff.
            self.failures += 1
            delay = self._rng.uniform(self.initial / 10, max(self.initial, min(RESTART_SPREAD, self.maximum)))
        else:
            delay = self._jittered()
        if retry_after is not None:
            delay = max(delay, retry_after)
        return Decision(action, delay)


class NodeRotation:
    """Which node of a clustered broker to try next, and when to wait first.

    The first attempt goes to the first node. A failed attempt moves on to the next node at
    once, until every node has failed in this round: then the caller waits its backoff, and
    the next round starts where this one did. A connection that was up and is lost moves on
    to the next node too (the one it was on comes last), after the usual backoff: a fleet
    that loses one node spreads out in time rather than piling onto the next one at once.
    With one node this is today's behaviour: wait, then try it again.
    """

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("need at least one node")
        self.count = count
        self.current = 0  # the node of the next attempt
        self._left = count  # attempts left in this round, the next one included

    def failed(self) -> bool:
        """The attempt on ``current`` failed. True: a whole round failed, wait the backoff."""
        self.current = (self.current + 1) % self.count
        self._left -= 1
        if self._left > 0:
            return False
        self._left = self.count
        return True

    def lost(self) -> bool:
        """The connection to ``current`` was up and is lost: a new round from the next node,
        after the backoff (always True)."""
        self.current = (self.current + 1) % self.count
        self._left = self.count
        return True


class Liveness(enum.Enum):
    """What the silence watchdog of a connection does next."""

    WAIT = "wait"  # nothing to do until the returned time
    PING = "ping"  # silent for ping_interval: ask the server to answer
    DEAD = "dead"  # no answer to the ping in time, or silent past the heartbeat bound


def liveness(
    now: float,
    last_rx: float,
    pinged_at: float | None,
    *,
    interval: float,
    timeout: float,
    silence_limit: float,
) -> tuple[Liveness, float]:
    """The watchdog's decision and when to look again.

    Any frame from the server counts as an answer. A half-open
    link is declared dead at most ``interval + timeout`` after its last arrival, whatever the
    server's own heartbeat; ``silence_limit`` (PROTOCOL.md's bound) stays as a backstop.
    """
    if pinged_at is not None and last_rx < pinged_at:
        deadline = pinged_at + timeout
        return (Liveness.DEAD, now) if now >= deadline else (Liveness.WAIT, deadline)
    if now >= last_rx + silence_limit:
        return Liveness.DEAD, now
    if now >= last_rx + interval:
        return Liveness.PING, now + timeout
    return Liveness.WAIT, min(last_rx + interval, last_rx + silence_limit)
