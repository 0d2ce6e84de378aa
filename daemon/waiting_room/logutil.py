"""Logging helpers shared by the adapters."""

from __future__ import annotations

import logging
import time
from typing import Callable


class RateLimitedLog:
    """Logs the first of a kind of problem, then at most once per interval with a count."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._next = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += " (and %d more in the last %.0f s)"
            args = (*args, self._suppressed, self._interval)
        self._suppressed = 0
        self._next = now + self._interval
        self._log.warning(msg, *args)
