"""The waiting-room socket's frames (../shared/PROTOCOL.md), decoded without any I/O.

Text goes in, a typed frame or a reason for dropping it comes out. The decoder is a
msgspec tagged union on ``type``: one pass over the bytes validates types, ranges and the
room-id pattern, which keeps the hot path of a flood in C.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Union

import msgspec

MAX_FRAME_BYTES: Final = 64 * 1024
# A waiting room with more patients than this is a server bug, not a queue.
MAX_PATIENTS: Final = 100_000
# PROTOCOL.md's pattern, anchored with \Z: "$" would also accept a trailing newline.
ROOM_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"
_ROOM_ID_RE: Final = re.compile(ROOM_ID_PATTERN)

RoomId = Annotated[str, msgspec.Meta(pattern=ROOM_ID_PATTERN)]
Patients = Annotated[int, msgspec.Meta(ge=0, le=MAX_PATIENTS)]
ShortText = Annotated[str, msgspec.Meta(max_length=64)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
# The refusals a server may give for one room (an ``error`` frame's code, a snapshot entry's
# ``error``); any other code is kept as the generic "error".
ROOM_ERRORS: Final = frozenset({"unknown_room", "forbidden"})


def is_valid_room_id(room: str) -> bool:
    return _ROOM_ID_RE.fullmatch(room) is not None


class Hello(msgspec.Struct, tag_field="type", tag="hello", frozen=True):
    heartbeat: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 15.0


class Joined(msgspec.Struct, tag_field="type", tag="joined", frozen=True):
    room: RoomId


class Queue(msgspec.Struct, tag_field="type", tag="queue", frozen=True):
    patients: Patients
    room: RoomId | None = None
    now_serving: ShortText | None = None
    ts: ShortText | None = None
    seq: Seq | None = None


class Ping(msgspec.Struct, tag_field="type", tag="ping", frozen=True):
    pass


class Pong(msgspec.Struct, tag_field="type", tag="pong", frozen=True):
    pass


class Error(msgspec.Struct, tag_field="type", tag="error", frozen=True):
    room: RoomId | None = None
    code: ShortText = "error"
    message: Annotated[str, msgspec.Meta(max_length=512)] = ""


ServerFrame = Union[Hello, Joined, Queue, Ping, Pong, Error]
KNOWN_TYPES: Final = frozenset({"hello", "joined", "queue", "ping", "pong", "error"})


class Ignored(msgspec.Struct, frozen=True):
    """A well-formed frame of a type this client does not know: forward compatibility."""

    type: str


class Dropped(msgspec.Struct, frozen=True):
    """A frame the contract does not allow; ``reason`` is safe to log (no frame content)."""

    reason: str


class _AnyType(msgspec.Struct):
    type: str


class FrameDecoder:
    """Decodes server frames; one instance per connection keeps its decoder warm."""

    def __init__(self) -> None:
        self._decoder = msgspec.json.Decoder(ServerFrame)
        self._type_only = msgspec.json.Decoder(_AnyType)

    def decode(self, data: str | bytes) -> ServerFrame | Ignored | Dropped:
        if not isinstance(data, str):
            return Dropped("binary frame")
        # Characters first (cheap); UTF-8 bytes only when the text could be over the limit.
        if len(data) > MAX_FRAME_BYTES or (
            len(data) * 4 > MAX_FRAME_BYTES and len(data.encode("utf-8", "surrogatepass")) > MAX_FRAME_BYTES
        ):
            return Dropped("oversized frame")
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            return self._classify(data, exc)
        except msgspec.DecodeError:
            return Dropped("not JSON")
        except UnicodeEncodeError:  # a lone surrogate: text that no UTF-8 frame can carry
            return Dropped("not UTF-8")
        except RecursionError:
            return Dropped("nested too deeply")

    def _classify(self, data: str, exc: msgspec.ValidationError) -> Ignored | Dropped:
        try:
            frame_type = self._type_only.decode(data).type
        except (msgspec.ValidationError, msgspec.DecodeError):
            return Dropped("not an object with a string type")
        except RecursionError:
            return Dropped("nested too deeply")
        if frame_type not in KNOWN_TYPES:
            return Ignored(frame_type[:32])
        if str(exc).endswith("`$.type`"):
            # Two type fields (the tag is read from the first, frame_type from the last):
            # msgspec's message would quote the first one, which may hold anything.
            return Dropped("conflicting type fields")
        # msgspec's message names the field and the rule, never the offending value.
        return Dropped(f"invalid {frame_type} frame: {exc}")


_encoder = msgspec.json.Encoder()


def join_frame(room: str) -> str:
    return _encoder.encode({"type": "join", "room": room}).decode()


def leave_frame(room: str) -> str:
    return _encoder.encode({"type": "leave", "room": room}).decode()


PONG_FRAME: Final = '{"type":"pong"}'
PING_FRAME: Final = '{"type":"ping"}'  # the client heartbeat; a server answers pong
