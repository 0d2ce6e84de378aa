"""``python -m bench.fanout``: many display clients in one process, as cheap as Python allows.

A thousand asyncio transports cost the measuring process more than the daemon spends
serving them, so this probe is a plain ``epoll`` loop over non-blocking sockets: per ready
socket one ``recv``, a minimal RFC 6455 parser (text frames searched for the armed marker,
pings answered with pongs, closes echoed) and nothing else. Commands arrive as JSON lines on
stdin (in the same epoll set); answers go to stdout, like ``bench.probe``.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import struct
import sys
import time


def _masked(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + body


class Client:
    __slots__ = ("buf", "frames", "open", "seen_at", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.seen_at: int | None = None
        self.frames = 0
        self.open = True


class Fanout:
    def __init__(self) -> None:
        self.ep = select.epoll()
        self.clients: dict[int, Client] = {}
        self.marker: bytes | None = None
        self.seen = 0
        self.armed = 0
        self.waiting: float | None = None  # deadline of a pending "wait"
        self.stdin_buf = b""

    # -- commands ------------------------------------------------------------------------

    def connect(self, host: str, port: int, path: str, n: int, timeout: float = 10.0) -> dict:
        started = time.monotonic()
        failures: list[str] = []
        request_head = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n")
        for _ in range(n):
            try:
                sock = socket.create_connection((host, port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                key = base64.b64encode(os.urandom(16)).decode()
                sock.sendall((request_head + f"Sec-WebSocket-Key: {key}\r\n\r\n").encode())
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed during the handshake")
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 101"):
                    raise ConnectionError(head[:40].decode(errors="replace"))
                sock.setblocking(False)
                client = Client(sock)
                client.buf += rest
                self.clients[sock.fileno()] = client
                self.ep.register(sock.fileno(), select.EPOLLIN)
                self._parse(client, time.monotonic_ns())
            except OSError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
        return {"connected": len(self.clients), "failed": len(failures), "errors": failures[:3],
                "seconds": time.monotonic() - started}

    def arm(self, marker: str) -> dict:
        self.marker = marker.encode()
        self.seen = 0
        self.armed = 0
        for c in self.clients.values():
            c.seen_at = None
            if c.open:
                self.armed += 1
        return {"ok": True, "armed": self.armed}

    def result(self) -> dict:
        times = sorted(c.seen_at for c in self.clients.values() if c.seen_at is not None)
        return {"done": self.seen >= self.armed, "count": len(times), "expected": self.armed,
                "t_first": times[0] if times else None, "t_last": times[-1] if times else None,
                "t_median": times[len(times) // 2] if times else None}

    def close(self) -> dict:
        for c in self.clients.values():
            if c.open:
                try:
                    c.sock.send(_masked(0x8, struct.pack("!H", 1000)))
                except OSError:
                    pass
            c.sock.close()
        self.clients = {}
        self.ep.close()
        self.ep = select.epoll()
        self.ep.register(sys.stdin.fileno(), select.EPOLLIN)
        return {"ok": True}

    # -- the socket side -----------------------------------------------------------------

    def _parse(self, c: Client, now: int) -> None:
        buf = c.buf
        pos, end = 0, len(buf)
        while end - pos >= 2:
            b0, n = buf[pos], buf[pos + 1] & 0x7F
            i = pos + 2
            if n == 126:
                if end - i < 2:
                    break
                n = (buf[i] << 8) | buf[i + 1]
                i += 2
            elif n == 127:
                if end - i < 8:
                    break
                n = int.from_bytes(buf[i:i + 8], "big")
                i += 8
            if end - i < n:
                break
            opcode = b0 & 0x0F
            if opcode == 1:
                c.frames += 1
                if self.marker is not None and c.seen_at is None and buf.find(self.marker, i, i + n) >= 0:
                    c.seen_at = now
                    self.seen += 1
            elif opcode == 9:
                c.sock.send(_masked(0xA, bytes(buf[i:i + n])))
            elif opcode == 8:
                try:
                    c.sock.send(_masked(0x8, bytes(buf[i:i + min(n, 2)])))
                except OSError:
                    pass
            pos = i + n
        if pos:
            del buf[:pos]

    def _readable(self, fd: int, now: int) -> None:
        c = self.clients.get(fd)
        if c is None:
            return
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            c.open = False
            self.ep.unregister(fd)
            return
        c.buf += data
        self._parse(c, now)

    # -- the loop ------------------------------------------------------------------------

    def _command(self, line: bytes) -> dict | None:
        cmd = json.loads(line)
        op = cmd["cmd"]
        if op == "connect":
            return self.connect(cmd["host"], cmd["port"], cmd["path"], cmd["n"])
        if op == "arm":
            return self.arm(cmd["marker"])
        if op == "wait":
            self.waiting = time.monotonic() + cmd["timeout"]
            return None  # answered by the loop
        if op == "stats":
            return {"open": sum(1 for c in self.clients.values() if c.open),
                    "frames": sum(c.frames for c in self.clients.values())}
        if op == "close":
            return self.close()
        if op == "exit":
            raise SystemExit(0)
        return {"error": f"unknown command {op}"}

    def run(self) -> None:
        stdin = sys.stdin.fileno()
        os.set_blocking(stdin, False)
        self.ep.register(stdin, select.EPOLLIN)
        out = sys.stdout.buffer
        while True:
            timeout = -1.0
            if self.waiting is not None:
                if self.seen >= self.armed or time.monotonic() >= self.waiting:
                    self.waiting = None
                    out.write(json.dumps(self.result()).encode() + b"\n")
                    out.flush()
                    continue
                timeout = max(0.0, self.waiting - time.monotonic())
            events = self.ep.poll(timeout, 4096)
            now = time.monotonic_ns()
            for fd, _ in events:
                if fd == stdin:
                    chunk = os.read(stdin, 65536)
                    if not chunk:
                        return
                    self.stdin_buf += chunk
                    while b"\n" in self.stdin_buf:
                        line, _, self.stdin_buf = self.stdin_buf.partition(b"\n")
                        try:
                            answer = self._command(line)
                        except SystemExit:
                            out.write(b'{"ok":true}\n')
                            out.flush()
                            return
                        except Exception as exc:  # noqa: BLE001 - reported to the harness
                            answer = {"error": f"{type(exc).__name__}: {exc}"}
                        if answer is not None:
                            out.write(json.dumps(answer).encode() + b"\n")
                            out.flush()
                else:
                    self._readable(fd, now)


if __name__ == "__main__":
    Fanout().run()
