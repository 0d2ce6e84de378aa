"""One source of truth: the latest state of each room and of the upstream link.

Every consumer (MQTT, displays, systemd) subscribes and first gets the whole current state,
then each change: the Python counterpart of RxJS ``shareReplay({bufferSize: 1})``. A
subscription is a set of dirty keys plus one event, not a queue: a consumer that lags gets
the latest value of each room when it catches up, never a backlog, and it never slows the
upstream reader or the other consumers.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from msgspec.structs import replace

from .model import LinkState, LinkStatus, RoomState


@dataclass(frozen=True, slots=True)
class Batch:
    """What changed since a subscriber last looked. A room mapped to None was removed."""

    rooms: Mapping[str, RoomState | None]
    link: LinkState | None  # set when the link (or a component's health) changed
    components: Mapping[str, str] = field(default_factory=dict)


class Subscription:
    """A consumer's view: ``async for batch in subscription``."""

    __slots__ = ("_store", "_dirty", "_link_dirty", "_wake", "_closed", "_limit", "_waiting", "fast")

    def __init__(self, store: RoomStore, limit: int | None = None, replay: bool = True) -> None:
        self._store = store
        # At most this many rooms per batch: a consumer that works per room (MQTT) lets the
        # reader run between chunks, so a burst keeps coalescing instead of being drained.
        self._limit = limit
        # Replay: everything is dirty at first, so the first batch is the current state.
        # Without it, only what changes from now on (the caller took the state itself).
        self._dirty: dict[str, None] = dict.fromkeys(store.rooms) if replay else {}
        self._link_dirty = replay
        self._wake = asyncio.Event()
        if replay:
            self._wake.set()
        self._closed = False
        self._waiting = False
        # The consumer's synchronous fast path: called with a room the moment it changes,
        # while the consumer waits for its next batch with nothing dirty; True means the
        # consumer took the change itself (e.g. wrote it to its socket in this very loop
        # pass), and it is not marked dirty. Anything else coalesces as usual, so a batch
        # never overtakes a newer value and a busy consumer is never called.
        self.fast: Callable[[str], bool] | None = None

    def _mark_room(self, room: str) -> None:
        fast = self.fast
        if fast is not None and self._waiting and not self._dirty and not self._link_dirty and fast(room):
            return
        self._dirty[room] = None
        self._wake.set()

    def _mark_link(self) -> None:
        self._link_dirty = True
        self._wake.set()

    def pending(self) -> bool:
        return bool(self._dirty) or self._link_dirty

    def close(self) -> None:
        self._closed = True
        self._store._unsubscribe(self)
        self._wake.set()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Batch:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._dirty or self._link_dirty:
                return self._take()
            self._wake.clear()
            self._waiting = True
            try:
                await self._wake.wait()
            finally:
                self._waiting = False

    def _take(self) -> Batch:
        rooms = self._store.rooms
        if self._limit is None or len(self._dirty) <= self._limit:
            dirty, self._dirty = self._dirty, {}
        else:  # the longest-dirty first; the rest keep coalescing
            dirty = dict.fromkeys(itertools.islice(self._dirty, self._limit))
            for room in dirty:
                del self._dirty[room]
        link = self._store.link if self._link_dirty else None
        components = dict(self._store.components) if self._link_dirty else {}
        self._link_dirty = False
        return Batch({r: rooms.get(r) for r in dirty}, link, components)


class RoomStore:
    """Latest state per configured room; only configured rooms ever get in."""

    def __init__(self, rooms: Iterable[tuple[str, str]] = (), clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._rooms: dict[str, RoomState] = {}
        self._subs: set[Subscription] = set()
        self._components: dict[str, str] = {}
        self.link = LinkState(since=clock())
        self.dropped_frames = 0
        self.last_frame_at: float | None = None
        self.configure(rooms)

    # -- reading -------------------------------------------------------------------------

    @property
    def rooms(self) -> Mapping[str, RoomState]:
        return MappingProxyType(self._rooms)

    @property
    def components(self) -> Mapping[str, str]:
        return MappingProxyType(self._components)

    def subscribe(self, limit: int | None = None, *, replay: bool = True) -> Subscription:
        sub = Subscription(self, limit, replay)
        self._subs.add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    # -- writing -------------------------------------------------------------------------

    def _put(self, state: RoomState) -> None:
        self._rooms[state.room] = state
        for sub in self._subs:
            sub._mark_room(state.room)

    def configure(self, rooms: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
        """Set the configured rooms (id, name); returns (added, removed) ids."""
        wanted = dict(rooms)
        removed = [r for r in self._rooms if r not in wanted]
        for room in removed:
            del self._rooms[room]
            for sub in self._subs:
                sub._mark_room(room)
        added = []
        for room, name in wanted.items():
            current = self._rooms.get(room)
            if current is None:
                added.append(room)
                self._put(RoomState(room=room, name=name))
            elif current.name != name:
                self._put(replace(current, name=name))
        return added, removed

    def apply_queue(
        self,
        room: str,
        patients: int,
        now_serving: str | None = None,
        updated_at: float | None = None,
        seq: int | None = None,
    ) -> bool:
        """Fresh data for a room; False (and nothing changes) when the room is not configured."""
        current = self._rooms.get(room)
        if current is None:
            return False
        now = self._clock()
        self.last_frame_at = now
        self._put(
            RoomState(
                room=room,
                name=current.name,
                patients=patients,
                now_serving=now_serving,
                updated_at=updated_at if updated_at is not None else now,
                received_at=now,
                seq=seq,
                stale=False,
                error=None,
            )
        )
        return True

    def set_room_error(self, room: str, code: str) -> bool:
        current = self._rooms.get(room)
        if current is None:
            return False
        if current.error != code:
            self._put(replace(current, error=code, stale=True))
        return True

    def clear_room_error(self, room: str) -> None:
        current = self._rooms.get(room)
        if current is not None and current.error is not None:
            self._put(replace(current, error=None))

    def set_link(
        self,
        status: LinkStatus,
        detail: str = "",
        retry_in: float | None = None,
        poll_interval: float | None = None,
    ) -> None:
        """Record the upstream's health; a status that is not live (neither ``connected`` nor
        ``degraded``) marks every room stale at once."""
        old = self.link
        if status is LinkStatus.CONNECTED and old.status is not LinkStatus.CONNECTED:
            connects = old.connects + 1
        else:
            connects = old.connects
        since = old.since if status is old.status else self._clock()
        new = LinkState(status, detail, since, retry_in, connects,
                        poll_interval if status is LinkStatus.DEGRADED else None)
        if new == old:
            return
        self.link = new
        if not status.live:
            for state in list(self._rooms.values()):
                if not state.stale:
                    self._put(replace(state, stale=True))
        for sub in self._subs:
            sub._mark_link()

    def set_component(self, name: str, status: str) -> None:
        """Health of a consumer (e.g. ``mqtt``: ``connected``), for status surfaces."""
        if self._components.get(name) == status:
            return
        self._components[name] = status
        for sub in self._subs:
            sub._mark_link()

    def count_dropped(self) -> int:
        self.dropped_frames += 1
        return self.dropped_frames

    def restore(self, states: Iterable[RoomState]) -> None:
        """Last known values from a previous run, shown at once but marked stale."""
        for state in states:
            current = self._rooms.get(state.room)
            if current is not None and current.patients is None:
                self._put(replace(state, name=current.name, stale=True, error=None))
