"""A minimal MQTT 3.1.1 client for measuring, not for production.

The probes must cost as little as possible, so that what is measured is the broker and the
daemon rather than the measuring tool: one asyncio Protocol, QoS 0 only, no keepalive
(``keepalive=0``), packets parsed straight out of a bytearray. TCP_NODELAY is set explicitly
on the socket (asyncio also sets it by default); ``nodelay`` reports what the kernel says.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable

OnMessage = Callable[[bytes, bytes, int], None]  # topic, payload, monotonic_ns at arrival


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def publish_packet(topic: bytes, payload: bytes, retain: bool = False) -> bytes:
    body = _str(topic) + payload
    return bytes([0x30 | (1 if retain else 0)]) + _remaining_length(len(body)) + body


class _Protocol(asyncio.Protocol):
    def __init__(self, client: MqttLite) -> None:
        self.client = client
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        on_message = self.client.on_message
        while end - pos >= 2:
            header = buf[pos]
            length, mult, i, complete = 0, 1, pos + 1, False
            for _ in range(4):  # the remaining length: 1 to 4 bytes
                if i >= end:
                    break
                b = buf[i]
                i += 1
                length += (b & 0x7F) * mult
                if not b & 0x80:
                    complete = True
                    break
                mult <<= 7
            if not complete or end - i < length:
                break  # wait for the rest of the packet
            kind = header >> 4
            if kind == 3:  # PUBLISH
                tlen = (buf[i] << 8) | buf[i + 1]
                t0 = i + 2
                p0 = t0 + tlen
                qos = (header >> 1) & 3
                if qos:
                    p0 += 2
                if on_message is not None:
                    on_message(bytes(buf[t0:t0 + tlen]), bytes(buf[p0:i + length]), now)
            elif kind == 2:  # CONNACK
                self.client._connack.set_result(buf[i + 1])
            elif kind == 9:  # SUBACK
                fut = self.client._subacks.pop(0) if self.client._subacks else None
                if fut is not None and not fut.done():
                    fut.set_result(bytes(buf[i + 2:i + length]))
            pos = i + length
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.closed.set()


class MqttLite:
    def __init__(self, host: str, port: int, client_id: str, on_message: OnMessage | None = None) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id
        self.on_message = on_message
        self._transport: asyncio.Transport | None = None
        self._connack: asyncio.Future[int] | None = None
        self._subacks: list[asyncio.Future[bytes]] = []
        self._mid = 0
        self.closed = asyncio.Event()
        self.nodelay: bool | None = None

    async def connect(self, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        await loop.create_connection(lambda: _Protocol(self), sock=sock)
        # CONNECT: protocol MQTT level 4, clean session, keepalive 0 (no pings needed).
        var = _str(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", 0)
        body = var + _str(self.client_id.encode())
        assert self._transport is not None
        self._transport.write(b"\x10" + _remaining_length(len(body)) + body)
        async with asyncio.timeout(timeout):
            rc = await self._connack
        if rc != 0:
            raise ConnectionError(f"CONNACK {rc}")

    async def subscribe(self, *filters: str, timeout: float = 5.0) -> None:
        assert self._transport is not None
        self._mid = self._mid % 65535 + 1
        body = struct.pack("!H", self._mid) + b"".join(_str(f.encode()) + b"\x00" for f in filters)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._subacks.append(fut)
        self._transport.write(b"\x82" + _remaining_length(len(body)) + body)
        async with asyncio.timeout(timeout):
            codes = await fut
        if any(c == 0x80 for c in codes):
            raise ConnectionError(f"SUBACK refused: {codes!r}")

    def publish(self, topic: bytes, payload: bytes, retain: bool = False) -> None:
        assert self._transport is not None
        self._transport.write(publish_packet(topic, payload, retain))

    def write_raw(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    async def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"\xe0\x00")  # DISCONNECT
            self._transport.close()
        try:
            async with asyncio.timeout(2):
                await self.closed.wait()
        except TimeoutError:
            pass
