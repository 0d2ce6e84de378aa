"""upstream's pure helpers: URL redaction, the query-string token, timestamps, log limiting."""

from __future__ import annotations

import logging
import urllib.parse
from datetime import datetime, timezone

import pytest

from waiting_room.logutil import RateLimitedLog
from waiting_room.upstream import parse_ts, redact_url, url_with_token

SECRET = "s3cr3t-T0KEN"


# -- redact_url --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"wss://queue.example/ws/waiting-room?token={SECRET}",
        f"wss://queue.example/ws/waiting-room?room=all&token={SECRET}&v=1",
        f"wss://queue.example/ws?TOKEN={SECRET}",
        f"wss://queue.example/ws?access_token={SECRET}",
        f"wss://queue.example/ws?%74oken={SECRET}",  # percent-encoded key
        f"wss://user:{SECRET}@queue.example/ws",
        f"wss://{SECRET}@queue.example:8443/ws",
        f"wss://user:p%40ss{SECRET}@queue.example/ws",
        f"wss://queue.example/ws?token={SECRET}#frag",
        f"ws://127.0.0.1:8765/ws?token={urllib.parse.quote(SECRET + ' /&=')}",
    ],
)
def test_redact_url_hides_tokens_and_userinfo(url):
    redacted = redact_url(url)
    assert SECRET not in redacted
    assert SECRET not in urllib.parse.unquote(redacted)
    assert "@" not in redacted


def test_redact_url_keeps_what_helps_debugging():
    redacted = redact_url(f"wss://user:pw@queue.example:8443/ws/waiting-room?room=opd-1&token={SECRET}")
    parts = urllib.parse.urlsplit(redacted)
    assert parts.scheme == "wss"
    assert parts.netloc == "queue.example:8443"
    assert parts.path == "/ws/waiting-room"
    query = dict(urllib.parse.parse_qsl(parts.query))
    assert query["room"] == "opd-1"
    assert "token" in query and query["token"] != SECRET


def test_redact_url_leaves_a_clean_url_alone():
    assert redact_url("wss://queue.example/ws/waiting-room") == "wss://queue.example/ws/waiting-room"
    assert redact_url("ws://[::1]:8765/ws") == "ws://[::1]:8765/ws"


# -- url_with_token ----------------------------------------------------------------------


def test_url_with_token_adds_the_query_parameter():
    url = url_with_token("wss://queue.example/ws/waiting-room", "abc")
    parts = urllib.parse.urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("wss", "queue.example", "/ws/waiting-room")
    assert urllib.parse.parse_qs(parts.query) == {"token": ["abc"]}


def test_url_with_token_replaces_an_old_token_and_keeps_other_parameters():
    url = url_with_token("wss://q.example/ws?room=opd-1&token=old&v=2", "new")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query == {"room": ["opd-1"], "v": ["2"], "token": ["new"]}


def test_url_with_token_encodes_the_token():
    token = "a b&c=d/é+"
    url = url_with_token("wss://q.example/ws", token)
    assert " " not in url and "&c=" not in url
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["token"] == [token]


def test_url_with_token_round_trips_through_redaction():
    assert SECRET not in redact_url(url_with_token("wss://q.example/ws", SECRET))


# -- parse_ts ----------------------------------------------------------------------------

EXPECTED = datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2024-05-01T10:00:00Z", EXPECTED),
        ("2024-05-01T10:00:00+00:00", EXPECTED),
        ("2024-05-01T12:00:00+02:00", EXPECTED),
        ("2024-05-01T04:30:00-05:30", EXPECTED),
        ("2024-05-01T10:00:00", EXPECTED),  # naive: taken as UTC
        ("2024-05-01T10:00:00.250Z", EXPECTED + 0.25),
    ],
)
def test_parse_ts(ts, expected):
    assert parse_ts(ts) == pytest.approx(expected)


@pytest.mark.parametrize("ts", [None, "", "garbage", "yesterday", "2024-13-01T00:00:00Z", "2024-05-01T25:00:00Z", "1714557600"])
def test_parse_ts_garbage_is_none(ts):
    assert parse_ts(ts) is None


@pytest.mark.parametrize("ts", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"])
def test_parse_ts_outside_years_1_to_9999_in_utc_is_no_time(ts):
    assert parse_ts(ts) is None  # it could not be published (mqtt.rfc3339) or shown


def test_parse_ts_extreme_years_in_utc_are_kept():
    assert isinstance(parse_ts("0001-01-01T00:00:00"), float)
    assert isinstance(parse_ts("9999-12-31T23:59:59Z"), float)


# -- RateLimitedLog ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited(caplog):
    caplog.set_level(logging.WARNING, logger="test.ratelimit")
    clock = Clock()
    return RateLimitedLog(logging.getLogger("test.ratelimit"), interval=60.0, clock=clock), clock, caplog


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.ratelimit"]


def test_first_warning_is_logged(limited):
    log, _, caplog = limited
    log.warning("dropped a bad frame: %s", "not JSON")
    assert messages(caplog) == ["dropped a bad frame: not JSON"]
    assert caplog.records[0].levelno == logging.WARNING


def test_warnings_within_the_interval_are_suppressed(limited):
    log, clock, caplog = limited
    log.warning("bad frame %d", 1)
    for n in range(2, 1001):
        clock.now += 0.05  # 1,000 frames in under 60 s
        log.warning("bad frame %d", n)
    assert messages(caplog) == ["bad frame 1"]


def test_next_warning_after_the_interval_reports_the_count(limited):
    log, clock, caplog = limited
    log.warning("bad frame %s", "a")
    for _ in range(5):
        clock.now += 1
        log.warning("bad frame %s", "b")
    clock.now = 100.0 + 60.0
    log.warning("bad frame %s", "c")
    logged = messages(caplog)
    assert len(logged) == 2
    assert logged[1].startswith("bad frame c")
    assert "5 more" in logged[1]
    assert "60 s" in logged[1]


def test_count_restarts_after_each_report(limited):
    log, clock, caplog = limited
    log.warning("x")
    log.warning("x")
    clock.now += 61
    log.warning("x")  # reports 1 more
    clock.now += 61
    log.warning("x")  # nothing suppressed since
    logged = messages(caplog)
    assert len(logged) == 3
    assert "1 more" in logged[1]
    assert logged[2] == "x"


def test_a_quiet_period_logs_without_a_count(limited):
    log, clock, caplog = limited
    log.warning("x")
    clock.now += 3600
    log.warning("y")
    assert messages(caplog) == ["x", "y"]


def test_message_with_percent_and_args_is_formatted_once(limited):
    log, clock, caplog = limited
    log.warning("dropped %s (%d so far)", "oversized frame", 1)
    log.warning("dropped %s (%d so far)", "oversized frame", 2)
    clock.now += 60
    log.warning("dropped %s (%d so far)", "oversized frame", 3)
    assert messages(caplog) == [
        "dropped oversized frame (1 so far)",
        "dropped oversized frame (3 so far) (and 1 more in the last 60 s)",
    ]
