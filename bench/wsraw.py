"""RFC 6455 at its barest: an unmasked server-to-client text frame, so the fast sender can
build a whole flood in advance and hand it to the transport in large writes (the display
clients' side of the wire is in ``fanout``)."""

from __future__ import annotations

import struct


def text_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + struct.pack("!H", n) + payload
    return bytes((0x81, 127)) + struct.pack("!Q", n) + payload
