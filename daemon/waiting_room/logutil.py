"""Logging helpers shared by the adapters."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable


class RateLimitedLog:
    """Logs the first of a kind of problem, then at most once per interval with a count."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._next = 0.0
        self._suppressed = 0

    def admit(self) -> int | None:
        """None: stay quiet this time; else log now, mentioning this many suppressed before."""
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return None
        suppressed, self._suppressed = self._suppressed, 0
        self._next = now + self._interval
        return suppressed

    def note(self, suppressed: int) -> str:
        return f" (and {suppressed} more in the last {self._interval:.0f} s)" if suppressed else ""

    def log(self, level: int, msg: str, *args: object, **kwargs: Any) -> None:
        suppressed = self.admit()
        if suppressed is None:
            return
        if suppressed:
            msg += " (and %d more in the last %.0f s)"
            args = (*args, suppressed, self._interval)
        self._log.log(level, msg, *args, **kwargs)

    def warning(self, msg: str, *args: object, **kwargs: Any) -> None:
        self.log(logging.WARNING, msg, *args, **kwargs)

    def error(self, msg: str, *args: object, **kwargs: Any) -> None:
        self.log(logging.ERROR, msg, *args, **kwargs)


class LoopExceptionLog:
    """An event loop's exception handler (``loop.set_exception_handler``) that logs each kind
    of error (the same message and exception type) the first time, then at most once per
    interval with a count, so that an error repeated by the loop itself (e.g. asyncio's
    ``socket.accept() out of system resource``, retried every second) cannot flood the log."""

    MAX_KINDS = 100  # beyond that many kinds, the rest share one limit

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._kinds: dict[tuple[str, str], RateLimitedLog] = {}
        self.count = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.count += 1
        message = str(context.get("message") or "Unhandled exception in event loop")
        exc = context.get("exception")
        kind = (message, type(exc).__name__ if exc is not None else "")
        limit = self._kinds.get(kind)
        if limit is None:
            if len(self._kinds) >= self.MAX_KINDS:
                kind = ("(other)", "")
                limit = self._kinds.get(kind)
            if limit is None:
                limit = self._kinds[kind] = RateLimitedLog(logging.getLogger("asyncio"), self._interval, self._clock)
        suppressed = limit.admit()
        if suppressed is None:
            return
        if suppressed:
            context = {**context, "message": message + limit.note(suppressed)}
        loop.default_exception_handler(context)
