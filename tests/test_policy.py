"""policy: PROTOCOL.md's close-code table, handshake statuses, Retry-After and the schedule."""

from __future__ import annotations

import collections
import math
import random
from email.utils import format_datetime
from datetime import datetime, timezone

import pytest

from waiting_room.policy import (
    Liveness,
    liveness,
    PROMPT_MAX_DELAY,
    PROMPT_STREAK_MAX,
    OUTAGE_FLOOR,
    RESTART_SPREAD,
    RETRY_AFTER_CAP,
    Action,
    ReconnectSchedule,
    action_for_close,
    action_for_status,
    parse_retry_after,
)

INITIAL = 1.0
MAXIMUM = 60.0


class UpperBound(random.Random):
    """Every jitter draw at its top: the delay is the schedule's current cap (no jitter)."""

    def uniform(self, a: float, b: float) -> float:
        return b


class LowerBound(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


def schedule(seed: int = 1, initial: float = INITIAL, maximum: float = MAXIMUM) -> ReconnectSchedule:
    return ReconnectSchedule(initial, maximum, random.Random(seed))


# -- PROTOCOL.md "Close codes", row by row ---------------------------------------------

CLOSE_TABLE = [
    (1000, Action.BACKOFF),  # normal closure (maintenance)
    (1001, Action.RESTART),  # going away: an announced restart
    (1008, Action.BACKOFF),  # policy violation
    (1011, Action.BACKOFF),  # internal error
    (1012, Action.RESTART),  # service restart
    (1013, Action.AT_LEAST_MAX),  # try again later
    (4000, Action.PROMPT),  # reconnect now
    (4001, Action.REFRESH_TOKEN),  # token expired or invalid
    (4003, Action.AUTH_FAILED),  # forbidden
    (4008, Action.BACKOFF),  # heartbeat missed
    (1006, Action.BACKOFF),  # dropped without a close frame: like 1011
    (None, Action.BACKOFF),  # no close code at all: 1006
    (4999, Action.BACKOFF),  # unknown application code
    (3000, Action.BACKOFF),  # unknown registered code
    (1002, Action.BACKOFF),  # protocol error, not in the table
]


@pytest.mark.parametrize(("code", "action"), CLOSE_TABLE)
def test_close_code_table(code, action):
    assert action_for_close(code) is action


def test_1006_and_none_are_treated_like_1011():
    assert action_for_close(None) is action_for_close(1006) is action_for_close(1011)


@pytest.mark.parametrize(
    ("status", "like_close"),
    [(401, 4001), (403, 4003)],
)
def test_handshake_auth_statuses_act_like_their_close_codes(status, like_close):
    assert action_for_status(status) is action_for_close(like_close)


@pytest.mark.parametrize(
    ("status", "action"),
    [
        (401, Action.REFRESH_TOKEN),
        (403, Action.AUTH_FAILED),
        (429, Action.BACKOFF),
        (503, Action.BACKOFF),
        (500, Action.BACKOFF),
        (404, Action.BACKOFF),
        (502, Action.BACKOFF),
    ],
)
def test_handshake_statuses(status, action):
    assert action_for_status(status) is action


# -- config overrides --------------------------------------------------------------------


def test_override_adds_an_unknown_code():
    overrides = {4401: Action.REFRESH_TOKEN}
    assert action_for_close(4401) is Action.BACKOFF
    assert action_for_close(4401, overrides) is Action.REFRESH_TOKEN


def test_override_replaces_a_known_code_and_only_that_code():
    overrides = {1013: Action.BACKOFF, 4000: Action.BACKOFF}
    assert action_for_close(1013, overrides) is Action.BACKOFF
    assert action_for_close(4000, overrides) is Action.BACKOFF
    assert action_for_close(4003, overrides) is Action.AUTH_FAILED
    assert action_for_close(4001, overrides) is Action.REFRESH_TOKEN
    assert action_for_close(None, overrides) is Action.BACKOFF


def test_empty_or_missing_overrides_change_nothing():
    for code, action in CLOSE_TABLE:
        assert action_for_close(code, {}) is action
        assert action_for_close(code, None) is action


def test_override_of_1006_applies_to_a_missing_close_code():
    overrides = {1006: Action.PROMPT}
    assert action_for_close(1006, overrides) is Action.PROMPT
    assert action_for_close(None, overrides) is Action.PROMPT


# -- Retry-After -------------------------------------------------------------------------

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("120", 120.0), ("0", 0.0), (" 7 ", 7.0), ("1.5", 1.5), ("-5", 0.0)],
)
def test_retry_after_delta_seconds(value, seconds):
    assert parse_retry_after(value, NOW) == pytest.approx(seconds)


def test_retry_after_http_date():
    when = datetime.fromtimestamp(NOW + 90, timezone.utc)
    header = format_datetime(when, usegmt=True)  # "Tue, 14 Nov 2023 22:14:50 GMT"
    assert header.endswith("GMT")
    assert parse_retry_after(header, NOW) == pytest.approx(90.0)


def test_retry_after_http_date_in_the_past_is_zero():
    header = format_datetime(datetime.fromtimestamp(NOW - 3600, timezone.utc), usegmt=True)
    assert parse_retry_after(header, NOW) == 0.0


@pytest.mark.parametrize("value", ["999999999", "1e30", "inf", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_huge_retry_after_is_capped(value):
    assert parse_retry_after(value, NOW) == RETRY_AFTER_CAP


@pytest.mark.parametrize("value", [None, "", "soon", "nan", "Mon, 99 Foo 2024", "12 seconds"])
def test_unusable_retry_after_is_none(value):
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize("status", [429, 503])
def test_overloaded_handshake_backs_off_and_honours_retry_after(status):
    s = schedule()
    action = action_for_status(status)
    decision = s.next(action, retry_after=parse_retry_after("45", NOW))
    assert decision.action is Action.BACKOFF
    assert decision.delay >= 45.0
    # without Retry-After it is an ordinary backoff step (the first cap is INITIAL)
    assert schedule().next(action, retry_after=None).delay <= INITIAL


@pytest.mark.parametrize("status", [429, 503])
def test_overloaded_handshake_with_http_date_retry_after(status):
    header = format_datetime(datetime.fromtimestamp(NOW + 30, timezone.utc), usegmt=True)
    delay = schedule().next(action_for_status(status), retry_after=parse_retry_after(header, NOW)).delay
    assert delay == pytest.approx(30.0, abs=1.0)


def test_huge_retry_after_is_capped_in_the_delay():
    delay = schedule().next(Action.BACKOFF, retry_after=parse_retry_after("86400", NOW)).delay
    assert delay == RETRY_AFTER_CAP


# -- the schedule ------------------------------------------------------------------------


@pytest.mark.parametrize(("initial", "maximum"), [(0, 10), (-1, 10), (10, 5)])
def test_schedule_rejects_nonsense_bounds(initial, maximum):
    with pytest.raises(ValueError):
        ReconnectSchedule(initial, maximum)


def test_backoff_caps_grow_exponentially_to_the_maximum():
    s = ReconnectSchedule(INITIAL, MAXIMUM, UpperBound())
    delays = [s.next(Action.BACKOFF).delay for _ in range(10)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]


def test_backoff_floor_is_a_tenth_of_initial():
    s = ReconnectSchedule(2.0, MAXIMUM, LowerBound())
    assert [s.next(Action.BACKOFF).delay for _ in range(5)] == [0.2] * 5


@pytest.mark.parametrize("seed", range(20))
def test_seeded_backoff_delays_stay_within_floor_and_cap(seed):
    s = schedule(seed)
    for n in range(40):
        delay = s.next(Action.BACKOFF).delay
        cap = min(INITIAL * 2**n, MAXIMUM)
        assert INITIAL / 10 <= delay <= cap
        assert delay <= MAXIMUM


def test_backoff_is_full_jitter():
    """Across many seeds the n-th delay spreads over the whole [0, cap], mean about cap / 2."""
    for n, cap in [(0, 1.0), (3, 8.0), (8, 60.0)]:
        samples = []
        for seed in range(2000):
            s = schedule(seed)
            for _ in range(n):
                s.next(Action.BACKOFF)
            samples.append(s.next(Action.BACKOFF).delay)
        assert max(samples) <= cap
        assert max(samples) > 0.95 * cap
        assert min(samples) < 0.15 * cap
        assert sum(samples) / len(samples) == pytest.approx(cap / 2, rel=0.1)


def test_same_seed_same_delays():
    a, b = schedule(7), schedule(7)
    assert [a.next(Action.BACKOFF).delay for _ in range(10)] == [b.next(Action.BACKOFF).delay for _ in range(10)]


@pytest.mark.parametrize("seed", range(50))
def test_prompt_is_at_most_one_second(seed):
    s = schedule(seed)
    for _ in range(20):
        decision = s.next(Action.PROMPT)
        assert decision.action is Action.PROMPT
        assert 0 <= decision.delay <= PROMPT_MAX_DELAY == 1.0
        s.next(Action.PROMPT, healthy=True)  # each prompt reconnect proved healthy


def test_endless_4000_falls_back_to_the_backoff():
    """A server closing every connection with 4000 at once must not get 2 reconnects/s forever."""
    s = ReconnectSchedule(INITIAL, MAXIMUM, UpperBound())
    delays = [s.next(Action.PROMPT).delay for _ in range(PROMPT_STREAK_MAX + 4)]
    assert all(d <= 1.0 for d in delays[:PROMPT_STREAK_MAX])
    assert delays[PROMPT_STREAK_MAX:] == [1, 2, 4, 8]
    assert s.next(Action.PROMPT, healthy=True).delay <= 1.0  # a healthy connection: prompt again


def test_prompt_is_at_most_the_maximum_when_the_maximum_is_tiny():
    s = ReconnectSchedule(0.05, 0.3, UpperBound())
    assert s.next(Action.PROMPT).delay <= 0.3


def test_prompt_does_not_grow_the_backoff():
    with_prompts = ReconnectSchedule(INITIAL, MAXIMUM, UpperBound())
    without = ReconnectSchedule(INITIAL, MAXIMUM, UpperBound())
    seen_with, seen_without = [], []
    for _ in range(6):
        seen_with.append(with_prompts.next(Action.BACKOFF).delay)
        for _ in range(PROMPT_STREAK_MAX):
            with_prompts.next(Action.PROMPT)
        seen_without.append(without.next(Action.BACKOFF).delay)
    assert seen_with == seen_without == [1, 2, 4, 8, 16, 32]


def test_prompt_after_several_failures_keeps_the_next_cap():
    s = ReconnectSchedule(INITIAL, MAXIMUM, UpperBound())
    for _ in range(3):
        s.next(Action.BACKOFF)  # caps 1, 2, 4
    assert s.next(Action.PROMPT).delay <= 1.0
    assert s.next(Action.BACKOFF).delay == 8  # not 16, and not reset to 1


@pytest.mark.parametrize("seed", range(30))
def test_1013_waits_at_least_the_maximum(seed):
    s = schedule(seed)
    decision = s.next(action_for_close(1013))
    assert decision.action is Action.AT_LEAST_MAX
    assert decision.delay >= MAXIMUM


def test_4003_waits_exactly_the_maximum_every_time():
    s = schedule()
    for _ in range(5):
        decision = s.next(action_for_close(4003))
        assert decision.action is Action.AUTH_FAILED
        assert decision.delay == MAXIMUM


@pytest.mark.parametrize("seed", range(30))
def test_refresh_token_with_a_new_token_is_prompt(seed):
    s = schedule(seed)
    for _ in range(5):
        s.next(Action.BACKOFF)  # the backoff cap is now 32 s
    decision = s.next(action_for_close(4001), token_changed=True)
    assert decision.action is Action.REFRESH_TOKEN
    assert 0 <= decision.delay <= PROMPT_MAX_DELAY


def test_refresh_token_with_the_same_token_backs_off():
    s = ReconnectSchedule(INITIAL, MAXIMUM, UpperBound())
    delays = [s.next(Action.REFRESH_TOKEN, token_changed=False).delay for _ in range(6)]
    assert delays == [1, 2, 4, 8, 16, 32]  # grows like BACKOFF, not prompt


def test_401_with_same_token_backs_off_and_with_new_token_is_prompt():
    same = ReconnectSchedule(INITIAL, MAXIMUM, UpperBound())
    for _ in range(4):
        same.next(Action.BACKOFF)
    assert same.next(action_for_status(401), token_changed=False).delay == 16
    changed = ReconnectSchedule(INITIAL, MAXIMUM, UpperBound())
    for _ in range(4):
        changed.next(Action.BACKOFF)
    assert changed.next(action_for_status(401), token_changed=True).delay <= 1.0


def test_healthy_resets_the_schedule():
    s = ReconnectSchedule(INITIAL, MAXIMUM, UpperBound())
    for _ in range(8):
        s.next(Action.BACKOFF)
    assert s.next(Action.BACKOFF).delay == MAXIMUM
    assert s.next(Action.BACKOFF, healthy=True).delay == INITIAL
    # refused again: an outage, drawn over the maximum (OUTAGE_TABLE)
    assert s.next(Action.BACKOFF).delay == MAXIMUM


def test_unhealthy_does_not_reset_the_schedule():
    s = ReconnectSchedule(INITIAL, MAXIMUM, UpperBound())
    delays = [s.next(Action.BACKOFF, healthy=False).delay for _ in range(8)]
    assert delays[-1] == MAXIMUM


def test_reset_method_restarts_the_caps():
    s = ReconnectSchedule(INITIAL, MAXIMUM, UpperBound())
    for _ in range(5):
        s.next(Action.BACKOFF)
    s.reset()
    assert s.next(Action.BACKOFF).delay == INITIAL


@pytest.mark.parametrize("seed", range(10))
def test_server_that_accepts_and_closes_at_once_never_causes_a_tight_loop(seed):
    """50 connections that each close before they prove healthy: the delays keep growing."""
    s = schedule(seed)
    codes = [1000, 1001, 1006, 1011, 1012, 4008, None]
    delays = [s.next(action_for_close(codes[i % len(codes)]), healthy=False).delay for i in range(50)]
    assert all(d >= INITIAL / 10 for d in delays)
    assert all(d <= MAXIMUM for d in delays)
    assert sum(delays) >= 50 * INITIAL / 10
    # Far from a loop: about 44 draws from uniform(0, 60) once the cap is reached.
    assert sum(delays) > 10 * MAXIMUM
    assert sum(delays[25:]) > sum(delays[:5])


# -- the fleet ---------------------------------------------------------------------------

FLEET = 1000
RETRIES = 5


def _bucket_counts(make_rng, initial: float, maximum: float) -> collections.Counter[int]:
    buckets: collections.Counter[int] = collections.Counter()
    for seed in range(FLEET):
        s = ReconnectSchedule(initial, maximum, make_rng(seed))
        t = 0.0  # every client lost the upstream at t = 0
        for _ in range(RETRIES):
            t += s.next(Action.BACKOFF).delay
            buckets[math.floor(t)] += 1
    return buckets


def test_fleet_retries_are_spread_out_by_jitter():
    """1,000 daemons failing together do not come back together (initial 10 s, max 5 min).

    With initial = 1 s every first retry falls in [0.1, 1] s by construction, so the spread
    is measured with an initial larger than the 1-second bucket.
    """
    jittered = _bucket_counts(random.Random, 10.0, 300.0)
    unjittered = _bucket_counts(lambda seed: UpperBound(seed), 10.0, 300.0)
    assert max(unjittered.values()) == FLEET  # the thundering herd
    assert sum(jittered.values()) == FLEET * RETRIES
    assert max(jittered.values()) < FLEET * 0.3
    assert len(jittered) > 50 * len(unjittered)


# -- the silence watchdog ------------------------------------------------------------------

LIVE = dict(interval=5.0, timeout=4.0, silence_limit=35.0)


@pytest.mark.parametrize(
    "now, last_rx, pinged_at, verdict, wake",
    [
        (1.0, 0.0, None, Liveness.WAIT, 5.0),  # quiet for a while: look again at interval
        (5.0, 0.0, None, Liveness.PING, 9.0),  # silent for interval: ping, answer due by 9
        (7.0, 0.0, 5.0, Liveness.WAIT, 9.0),  # pinged, no answer yet
        (9.0, 0.0, 5.0, Liveness.DEAD, 9.0),  # no answer in time: dead 9 s after the last frame
        (9.0, 6.0, 5.0, Liveness.WAIT, 11.0),  # answered at 6: quiet again until 11
        (40.0, 0.0, None, Liveness.DEAD, 40.0),  # the heartbeat bound stays a backstop
    ],
)
def test_liveness_table(now, last_rx, pinged_at, verdict, wake):
    assert liveness(now, last_rx, pinged_at, **LIVE) == (verdict, wake)


def test_liveness_bounds_a_dead_link_by_interval_plus_timeout():
    """Walked like the watchdog does: a link silent from t=0 is dead at interval + timeout."""
    now, pinged_at = 0.0, None
    for _ in range(10):
        verdict, wake = liveness(now, 0.0, pinged_at, **LIVE)
        if verdict is Liveness.DEAD:
            break
        if verdict is Liveness.PING:
            pinged_at = now
        now = wake
    assert verdict is Liveness.DEAD and now == pytest.approx(9.0)


# -- an announced restart (1001, 1012): the first retry spread over RESTART_SPREAD ------------

# (close code, healthy, seeds) -> every first delay within [lo, hi], and their spread
FIRST_RETRY_TABLE = [
    # announced, after a healthy connection: over [initial/10, RESTART_SPREAD] (here 10 s)
    (1001, True, 0.1, RESTART_SPREAD, 6.0),
    (1012, True, 0.1, RESTART_SPREAD, 6.0),
    # a lone drop after a healthy connection: still within the first second
    (1006, True, 0.1, 1.0, 0.5),
    (None, True, 0.1, 1.0, 0.5),
    (1011, True, 0.1, 1.0, 0.5),
]


@pytest.mark.parametrize(("code", "healthy", "lo", "hi", "min_spread"), FIRST_RETRY_TABLE)
def test_first_retry_after_a_healthy_connection(code, healthy, lo, hi, min_spread):
    delays = []
    for seed in range(200):
        s = ReconnectSchedule(INITIAL, MAXIMUM, random.Random(seed))
        delays.append(s.next(action_for_close(code), healthy=healthy).delay)
    assert lo <= min(delays) and max(delays) <= hi
    assert max(delays) - min(delays) >= min_spread  # drawn over the window, not bunched


@pytest.mark.parametrize(("initial", "maximum", "hi"), [(1.0, 60.0, RESTART_SPREAD), (1.0, 4.0, 4.0),
                                                       (2.0, 2.0, 2.0), (0.1, 0.3, 0.3)])
def test_restart_spread_is_capped_by_the_maximum(initial, maximum, hi):
    s = ReconnectSchedule(initial, maximum, UpperBound())
    assert s.next(Action.RESTART, healthy=True).delay == hi
    s = ReconnectSchedule(initial, maximum, LowerBound())
    assert s.next(Action.RESTART, healthy=True).delay == pytest.approx(initial / 10)


# After a healthy connection is lost: (first action, rng) -> the delays of the first retries
# while the server stays away. The quick (or spread) first retry, then the outage draws over
# [OUTAGE_FLOOR * maximum, maximum].
OUTAGE_TABLE = [
    (Action.BACKOFF, UpperBound(), [1.0, MAXIMUM, MAXIMUM, MAXIMUM]),
    (Action.BACKOFF, LowerBound(), [0.1, OUTAGE_FLOOR * MAXIMUM, OUTAGE_FLOOR * MAXIMUM]),
    (Action.RESTART, UpperBound(), [RESTART_SPREAD, MAXIMUM, MAXIMUM]),
    (Action.RESTART, LowerBound(), [0.1, OUTAGE_FLOOR * MAXIMUM]),
]


@pytest.mark.parametrize(("first", "rng", "expected"), OUTAGE_TABLE)
def test_a_lost_healthy_connection_retries_once_then_spreads_over_the_maximum(first, rng, expected):
    s = ReconnectSchedule(INITIAL, MAXIMUM, rng)
    delays = [s.next(first, healthy=True).delay] + [s.next(Action.BACKOFF).delay for _ in expected[1:]]
    assert delays == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(30))
def test_outage_draws_stay_within_their_window(seed):
    s = schedule(seed)
    assert s.next(Action.BACKOFF, healthy=True).delay <= 1.0
    for _ in range(10):
        assert OUTAGE_FLOOR * MAXIMUM <= s.next(Action.BACKOFF).delay <= MAXIMUM


def test_a_schedule_never_healthy_keeps_the_exponential_caps():
    s = ReconnectSchedule(INITIAL, MAXIMUM, UpperBound())
    assert [s.next(Action.BACKOFF).delay for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_a_server_closing_every_fresh_connection_with_1012_gets_the_spread_once():
    s = ReconnectSchedule(INITIAL, MAXIMUM, UpperBound())
    first = s.next(Action.RESTART, healthy=True).delay
    later = [s.next(Action.RESTART).delay for _ in range(3)]  # never healthy again
    assert first == RESTART_SPREAD and later == [MAXIMUM] * 3


def test_restart_can_be_configured_for_another_code():
    assert action_for_close(4500, {4500: Action.RESTART}) is Action.RESTART
    assert action_for_close(1001, {1001: Action.BACKOFF}) is Action.BACKOFF
