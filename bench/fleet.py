"""A fleet of daemons reconnecting after one server restart, in virtual time.

Each simulated daemon runs the daemon's real ``policy.ReconnectSchedule`` (the object
``upstream.Upstream`` asks for every delay) with its own seeded RNG, exactly as the daemon
calls it: after the restart closes its healthy connection, ``next(action_for_close(code),
healthy=True)`` (1006: a dropped connection; 1001/1012: an announced restart); after each
refused attempt while the server is down, ``next(BACKOFF)``. The comparison is the same loop
with an un-jittered exponential schedule (initial, 2x, 4x, ... capped at max): every daemon
then knocks at the same instants.

What counts is what the returning server feels: the handshakes it receives once it listens
again (attempts at or after ``downtime``), at their peak per 1-s (and 100-ms) window. Attempts
while it is down meet a closed port (a reset from the kernel) and are reported apart.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

from waiting_room.config import BackoffConfig
from waiting_room.policy import Action, Decision, ReconnectSchedule, action_for_close

MAX_ATTEMPTS = 1000  # per daemon: a bound, never reached with a sane schedule


class Schedule(Protocol):
    def next(self, action: Action, *, healthy: bool = False) -> Decision: ...


class Unjittered:
    """Plain exponential backoff: initial, 2*initial, ... capped, reset by a healthy connection."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.step = 0

    def next(self, action: Action, *, healthy: bool = False) -> Decision:
        if healthy:
            self.step = 0
        delay = min(self.initial * 2 ** self.step, self.maximum)
        self.step += 1
        return Decision(action, delay)


def attempts(n: int, downtime: float, make: Callable[[int], Schedule],
             first: Action = Action.BACKOFF) -> tuple[list[float], list[float]]:
    """Attempt times (s after the restart) of all daemons, and when each got back in."""
    times: list[float] = []
    back: list[float] = []
    for i in range(n):
        schedule = make(i)
        t = schedule.next(first, healthy=True).delay
        times.append(t)
        for _ in range(MAX_ATTEMPTS):
            if t >= downtime:
                break
            t += schedule.next(Action.BACKOFF).delay
            times.append(t)
        back.append(t)
    times.sort()
    return times, back


def peak_rate(times: list[float], window: float) -> float:
    """The most attempts in any window of this width (sliding), as attempts per second."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best / window


def returning_peak(times: list[float], downtime: float, window: float) -> float:
    """The peak rate the server feels once it listens again (attempts at t >= downtime)."""
    return peak_rate([t for t in times if t >= downtime], window)


def histogram(times: list[float], width: float = 1.0, until: float = 60.0) -> list[int]:
    bins = [0] * int(until / width)
    for t in times:
        i = int(t / width)
        if i < len(bins):
            bins[i] += 1
    return bins


# (close code the fleet sees, how long the server is away): the issue's two cases first.
CASES: tuple[tuple[int, float], ...] = ((1006, 10.0), (1012, 1.0), (1001, 10.0), (1006, 1.0))


def run(n: int, downtimes: tuple[float, ...], seed: int = 1,
        cases: tuple[tuple[int, float], ...] | None = None) -> dict[str, object]:
    cfg = BackoffConfig()
    initial, maximum = float(cfg.initial), float(cfg.max)
    out: dict[str, object] = {"daemons": n, "backoff": {"initial": initial, "max": maximum}, "cases": []}
    wanted = list(cases if cases is not None else CASES)
    wanted += [(1006, d) for d in downtimes if (1006, d) not in wanted]
    for code, downtime in wanted:
        first = action_for_close(code)
        jit, jit_back = attempts(n, downtime, lambda i: ReconnectSchedule(initial, maximum, random.Random(seed * 100_003 + i)),
                                 first)
        flat, flat_back = attempts(n, downtime, lambda i: Unjittered(initial, maximum))
        case = {
            "code": code,
            "downtime_s": downtime,
            "jittered": {
                "returning_peak_1s": returning_peak(jit, downtime, 1.0),
                "returning_peak_100ms": returning_peak(jit, downtime, 0.1),
                "attempts_while_down": sum(1 for t in jit if t < downtime),
                "first_retry_median_s": round(sorted(t for t in jit)[0], 3),
                "attempts": len(jit),
                "peak_per_s_1s_window": peak_rate(jit, 1.0),
                "peak_per_s_100ms_window": peak_rate(jit, 0.1),
                "all_back_after_s": round(max(jit_back), 3),
                "median_back_after_s": round(sorted(jit_back)[len(jit_back) // 2], 3),
                "per_second": histogram(jit, 1.0, max(jit) + 1),
            },
            "unjittered": {
                "returning_peak_1s": returning_peak(flat, downtime, 1.0),
                "returning_peak_100ms": returning_peak(flat, downtime, 0.1),
                "attempts": len(flat),
                "peak_per_s_1s_window": peak_rate(flat, 1.0),
                "peak_per_s_100ms_window": peak_rate(flat, 0.1),
                "all_back_after_s": round(max(flat_back), 3),
                "per_second": histogram(flat, 1.0, max(flat) + 1),
            },
        }
        case["returning_ratio_1s"] = round(
            case["jittered"]["returning_peak_1s"] / case["unjittered"]["returning_peak_1s"], 3)
        case["returning_ratio_100ms"] = round(
            case["jittered"]["returning_peak_100ms"] / case["unjittered"]["returning_peak_100ms"], 3)
        case["ratio_1s"] = round(case["jittered"]["peak_per_s_1s_window"] / case["unjittered"]["peak_per_s_1s_window"], 3)
        case["ratio_100ms"] = round(
            case["jittered"]["peak_per_s_100ms_window"] / case["unjittered"]["peak_per_s_100ms_window"], 3)
        out["cases"].append(case)  # type: ignore[union-attr]
    return out


class SpreadAfterHealthy(ReconnectSchedule):
    """A proposal, not the daemon's code: the first retry after a healthy connection was lost
    is drawn over the whole [initial/10, maximum] window (a fleet that lost its server at the
    same instant comes back spread over ``maximum`` seconds); later retries use the cap
    ``maximum`` with full jitter, or with equal jitter (``[maximum/2, maximum]``) when
    ``equal`` is set. A connection that never became healthy keeps today's schedule."""

    def __init__(self, initial: float, maximum: float, rng: random.Random, *, equal: bool) -> None:
        super().__init__(initial, maximum, rng)
        self.equal = equal
        self.spreading = False

    def next(self, action: Action, *, healthy: bool = False, **kw: object) -> Decision:  # type: ignore[override]
        if healthy:
            self.reset()
            self.spreading = True
            return Decision(action, self._rng.uniform(self.initial / 10, self.maximum))
        if self.spreading and action is Action.BACKOFF:
            low = self.maximum / 2 if self.equal else self.initial / 10
            return Decision(action, self._rng.uniform(low, self.maximum))
        return super().next(action, healthy=healthy, **kw)  # type: ignore[arg-type]


def proposals(n: int, downtimes: tuple[float, ...], seed: int = 1) -> dict[str, object]:
    cfg = BackoffConfig()
    initial, maximum = float(cfg.initial), float(cfg.max)
    out: dict[str, object] = {}
    for name, equal in (("spread_then_full_jitter", False), ("spread_then_equal_jitter", True)):
        cases = []
        for downtime in downtimes:
            times, back = attempts(
                n, downtime, lambda i, equal=equal: SpreadAfterHealthy(initial, maximum, random.Random(seed * 100_003 + i), equal=equal))
            flat, _ = attempts(n, downtime, lambda i: Unjittered(initial, maximum))
            cases.append({
                "downtime_s": downtime,
                "attempts": len(times),
                "peak_per_s_1s_window": peak_rate(times, 1.0),
                "peak_per_s_100ms_window": peak_rate(times, 0.1),
                "ratio_1s": round(peak_rate(times, 1.0) / peak_rate(flat, 1.0), 3),
                "median_back_after_s": round(sorted(back)[len(back) // 2], 3),
                "all_back_after_s": round(max(back), 3),
            })
        out[name] = cases
    return out
