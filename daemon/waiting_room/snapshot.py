"""The HTTP snapshot (docs/protocol.md, "The snapshot"), decoded without any I/O.

The fallback for networks that pass plain HTTP but break WebSocket upgrades: the body of a
``GET <snapshot URL>?room=…`` goes in, with the rooms that were asked for, and a
:class:`Snapshot` (each asked-for room's state or refusal, the poll interval, the reasons of
the entries dropped) or a :class:`~waiting_room.protocol.Dropped` for the whole body comes
out. A room's state follows the rules of a ``queue`` frame: the field types come from
``protocol``, so the "Bad input" defence is the same on both paths. The caller does the HTTP,
counts every reason in ``Snapshot.dropped`` (and a ``Dropped`` body) like a bad frame, and
applies the states to the store.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Final

import msgspec

from .protocol import ROOM_ERRORS, Dropped, Patients, RoomId, Seq, ShortText

__all__ = [
    "DEFAULT_POLL",
    "MAX_POLL",
    "MAX_SNAPSHOT_BYTES",
    "MIN_POLL",
    "RoomRefused",
    "RoomSnapshot",
    "Snapshot",
    "SnapshotDecoder",
    "snapshot_url",
]

MAX_SNAPSHOT_BYTES: Final = 1024 * 1024
DEFAULT_POLL: Final = 5.0
# A server's poll is honoured within these bounds: faster than once a second is not a
# fallback any more; slower than Retry-After's cap (policy.RETRY_AFTER_CAP) is not fresh.
MIN_POLL: Final = 1.0
MAX_POLL: Final = 600.0


class RoomSnapshot(msgspec.Struct, frozen=True):
    """One room's state, with the fields and the limits of a ``queue`` frame."""

    room: RoomId
    patients: Patients
    now_serving: ShortText | None = None
    ts: ShortText | None = None
    seq: Seq | None = None


class RoomRefused(msgspec.Struct, frozen=True):
    """A room the server would not give: ``unknown_room``, ``forbidden``, or ``error`` for a
    code this client does not know (as for an ``error`` frame). A requested room missing
    from the answer is ``unknown_room``."""

    room: str
    error: str


class Snapshot(msgspec.Struct, frozen=True):
    """A usable answer. ``rooms`` has every requested room, in the order asked, with its state
    or its refusal; ``dropped`` holds one reason (safe to log: no content) per bad part, each
    to be counted like a bad frame. Bad input never becomes a state nor a refusal: a requested
    room whose entry was dropped is left out of ``rooms`` (no news: keep what is known) and
    named in ``unreadable``, unless a good entry for it came too."""

    rooms: Mapping[str, RoomSnapshot | RoomRefused]
    poll: float = DEFAULT_POLL
    dropped: tuple[str, ...] = ()
    unreadable: tuple[str, ...] = ()


class _Body(msgspec.Struct):
    rooms: list[msgspec.Raw]
    poll: msgspec.Raw = msgspec.Raw(b"")


class _Probe(msgspec.Struct):
    """Just enough of an entry to tell a state from a refusal, and whose it is."""

    error: msgspec.Raw = msgspec.Raw(b"")
    room: msgspec.Raw = msgspec.Raw(b"")


class _ErrorEntry(msgspec.Struct):
    room: RoomId
    error: ShortText


class SnapshotDecoder:
    """Decodes snapshot bodies; one instance keeps its msgspec decoders for every poll."""

    def __init__(self) -> None:
        self._body = msgspec.json.Decoder(_Body)
        self._probe = msgspec.json.Decoder(_Probe)
        self._state = msgspec.json.Decoder(RoomSnapshot)
        self._error = msgspec.json.Decoder(_ErrorEntry)
        self._poll = msgspec.json.Decoder(float | None)
        self._room = msgspec.json.Decoder(RoomId)

    def decode(self, body: bytes | str, requested: Iterable[str]) -> Snapshot | Dropped:
        if isinstance(body, str):
            if len(body) > MAX_SNAPSHOT_BYTES:
                return Dropped("oversized snapshot")
            body = body.encode("utf-8", "surrogatepass")
        if len(body) > MAX_SNAPSHOT_BYTES:
            return Dropped("oversized snapshot")
        try:
            # JSON is UTF-8; msgspec would not look inside the fields it skips.
            bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            return Dropped("snapshot is not JSON")
        try:
            parsed = self._body.decode(body)
        except msgspec.ValidationError as exc:
            # msgspec's message names the field and the rule, never the offending value.
            return Dropped(f"not a snapshot object: {exc}")
        except msgspec.DecodeError:
            return Dropped("snapshot is not JSON")
        except RecursionError:
            return Dropped("snapshot nested too deeply")

        wanted = dict.fromkeys(requested)
        found: dict[str, RoomSnapshot | RoomRefused] = {}
        bad: set[str] = set()
        dropped: list[str] = []
        for raw in parsed.rooms:
            entry, room = self._entry(raw)
            if isinstance(entry, Dropped):
                dropped.append(entry.reason)
                if room in wanted:
                    bad.add(room)
            elif entry.room not in wanted:
                dropped.append("snapshot entry for a room that was not requested")
            elif entry.room in found:
                dropped.append("second snapshot entry for one room")
            else:
                found[entry.room] = entry
        rooms: dict[str, RoomSnapshot | RoomRefused] = {}
        for room in wanted:
            state = found.get(room)
            if state is not None:
                rooms[room] = state
            elif room not in bad:
                rooms[room] = RoomRefused(room, "unknown_room")  # missing from the answer
        unreadable = tuple(room for room in wanted if room in bad and room not in found)
        poll = self._poll_of(parsed.poll, dropped)
        return Snapshot(rooms, poll, tuple(dropped), unreadable)

    def _entry(self, raw: msgspec.Raw) -> tuple[RoomSnapshot | RoomRefused | Dropped, str | None]:
        """The entry, or why it is dropped and (when readable) the room it was about."""
        try:
            probe = self._probe.decode(raw)
        except msgspec.ValidationError:
            return Dropped("invalid snapshot entry: not an object"), None
        except RecursionError:
            return Dropped("snapshot entry nested too deeply"), None
        try:
            if len(probe.error) == 0 or bytes(probe.error) == b"null":
                return self._state.decode(raw), None
            entry = self._error.decode(raw)
        except msgspec.ValidationError as exc:
            return Dropped(f"invalid snapshot entry: {exc}"), self._room_of(probe.room)
        except RecursionError:
            return Dropped("snapshot entry nested too deeply"), self._room_of(probe.room)
        code = entry.error if entry.error in ROOM_ERRORS else "error"
        return RoomRefused(entry.room, code), None

    def _room_of(self, raw: msgspec.Raw) -> str | None:
        try:
            return self._room.decode(raw) if len(raw) else None
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None

    def _poll_of(self, raw: msgspec.Raw, dropped: list[str]) -> float:
        if len(raw) == 0:
            return DEFAULT_POLL
        try:
            poll = self._poll.decode(raw)
        except (msgspec.ValidationError, RecursionError):
            poll = -1.0
        if poll is None:
            return DEFAULT_POLL
        if not (math.isfinite(poll) and poll > 0):
            dropped.append("invalid snapshot poll: expected a positive number of seconds")
            return DEFAULT_POLL
        return min(MAX_POLL, max(MIN_POLL, poll))


def snapshot_url(url: str, rooms: Iterable[str], token: str | None = None) -> str:
    """The request URL: one ``room`` parameter per room, and ``token`` when given (pass it
    only when ``token_in`` is ``query``). The URL's own query parameters are kept, except a
    ``room`` or ``token`` already there, which these replace; a fragment is not sent."""
    parts = urllib.parse.urlsplit(url)
    query = [
        (key, value)
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if key != "room" and (token is None or key != "token")
    ]
    query.extend(("room", room) for room in dict.fromkeys(rooms))
    if token is not None:
        query.append(("token", token))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query), fragment=""))
