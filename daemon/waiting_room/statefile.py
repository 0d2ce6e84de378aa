"""The last known state on disk, so that a restart shows numbers at once (marked stale).

Written atomically (temporary file, fsync, rename, fsync of the directory) and at most
every ``min_interval`` seconds, in a thread: an SD card must not be written on every frame
of a burst, and the event loop must never wait on a disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Final

import msgspec

from .logutil import RateLimitedLog
from .model import RoomState
from .store import RoomStore

log = logging.getLogger(__name__)

FILE_NAME: Final = "state.json"
VERSION: Final = 1
FLUSH_TIMEOUT: Final = 2.0


class _Room(msgspec.Struct, frozen=True):
    patients: int
    now_serving: str | None = None
    updated_at: float | None = None
    received_at: float | None = None
    seq: int | None = None


class _File(msgspec.Struct, frozen=True):
    version: int
    saved_at: float
    rooms: dict[str, _Room]


def state_directory(configured: str | None, environ: os._Environ[str] | dict[str, str] = os.environ) -> Path | None:
    """Config ``state_dir`` wins; else systemd's ``$STATE_DIRECTORY`` (first entry); else none."""
    if configured:
        return Path(configured)
    value = environ.get("STATE_DIRECTORY", "")
    first = value.split(":")[0]
    return Path(first) if first else None


def load(path: Path) -> list[RoomState]:
    """Blocking, at start-up. A missing or corrupt file is a warning, never fatal."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("state file %s unreadable (%s): starting without last known values", path, exc.strerror)
        return []
    try:
        data = msgspec.json.decode(raw, type=_File)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("state file %s is corrupt (%s): starting without last known values", path, exc)
        return []
    if data.version != VERSION:
        log.warning("state file %s has version %s: ignored", path, data.version)
        return []
    return [
        RoomState(room=room, name=room, patients=r.patients, now_serving=r.now_serving,
                  updated_at=r.updated_at, received_at=r.received_at, seq=r.seq, stale=True)
        for room, r in data.rooms.items()
    ]


def save(path: Path, rooms: dict[str, _Room]) -> None:
    """Blocking: temporary file in the same directory, fsync, rename, fsync the directory."""
    payload = msgspec.json.encode(_File(VERSION, time.time(), rooms))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def snapshot(store: RoomStore) -> dict[str, _Room]:
    return {
        room: _Room(s.patients, s.now_serving, s.updated_at, s.received_at, s.seq)
        for room, s in store.rooms.items()
        if s.patients is not None
    }


class StateFile:
    """A consumer of the store that keeps ``state.json`` current."""

    def __init__(self, directory: Path, store: RoomStore, min_interval: float = 5.0) -> None:
        self.path = directory / FILE_NAME
        self.store = store
        self.min_interval = min_interval
        self.writes = 0
        self._failures = RateLimitedLog(log)
        self._failing = False

    def restore(self) -> int:
        """Blocking, before the loop's other work starts: loads into the store (stale)."""
        states = load(self.path)
        self.store.restore(states)
        return sum(1 for s in states if s.room in self.store.rooms)

    async def _write(self, rooms: dict[str, _Room]) -> bool:
        try:
            await asyncio.to_thread(save, self.path, rooms)
        except OSError as exc:
            self._failures.warning("cannot write the state file %s: %s", self.path, exc.strerror or exc)
            self._failing = True
            return False
        self.writes += 1
        if self._failing:
            self._failing = False
            log.info("the state file %s is written again", self.path)
        return True

    async def run(self) -> None:
        written = snapshot(self.store)  # what restore() put there is on disk already
        try:
            with self.store.subscribe() as changes:
                it = aiter(changes)
                behind = False  # the last write failed (disk full, read-only): retry, change or not
                while True:
                    if not behind:
                        await anext(it)
                    current = snapshot(self.store)
                    if current == written:
                        behind = False
                        continue
                    behind = not await self._write(current)
                    if not behind:
                        written = current
                    # Throttle: what changes meanwhile coalesces in the subscription.
                    await asyncio.sleep(self.min_interval)
        finally:
            current = snapshot(self.store)
            if current != written:  # a clean stop keeps the very latest values
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FLUSH_TIMEOUT):
                        await self._write(current)
