"""Measuring ends that run in their own process: ``python -m bench.probe mqtt|ws``.

Receive timestamps are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for every process
on the machine), so they compare directly with the send times the harness records. A probe
in its own process never waits on the harness's event loop for its turn.

The harness drives a probe with one JSON command per line on stdin and reads one JSON
answer per line on stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from .mqttlite import MqttLite


class MqttProbe:
    def __init__(self) -> None:
        self.client: MqttLite | None = None
        self.last: dict[bytes, bytes] = {}
        self.recording = False
        self.samples: list[tuple[bytes, bytes, int]] = []
        self.count = 0
        self.per_prefix: dict[bytes, int] = {}  # messages per topic "directory" (up to the last /)
        self.watch: dict[bytes, bytes] = {}
        self.satisfied: dict[bytes, int] = {}
        self.done: asyncio.Event = asyncio.Event()

    def on_message(self, topic: bytes, payload: bytes, t: int) -> None:
        self.last[topic] = payload
        self.count += 1
        head = topic[: topic.find(b"/") + 1]
        self.per_prefix[head] = self.per_prefix.get(head, 0) + 1
        if self.recording:
            self.samples.append((topic, payload, t))
        watch = self.watch
        if watch and topic in watch:
            if payload == watch[topic]:
                if topic not in self.satisfied:
                    self.satisfied[topic] = t
                    if len(self.satisfied) == len(watch):
                        self.done.set()
            else:
                self.satisfied.pop(topic, None)

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["cmd"]
        if op == "connect":
            self.client = MqttLite(cmd["host"], cmd["port"], cmd["client_id"], self.on_message)
            await self.client.connect()
            await self.client.subscribe(*cmd["filters"])
            return {"ok": True, "nodelay": self.client.nodelay}
        if op == "subscribe_more":
            assert self.client is not None
            await self.client.subscribe(*cmd["filters"])
            return {"ok": True}
        if op == "record":
            if cmd.get("clear", True):
                self.samples = []
                self.count = 0
            self.recording = bool(cmd.get("on", True))
            return {"ok": True}
        if op == "count":
            prefix = cmd.get("prefix", "").encode()
            n = sum(v for k, v in self.per_prefix.items() if k.startswith(prefix)) if prefix else self.count
            self.count = 0
            self.per_prefix = {}
            return {"count": n}
        if op == "dump":
            samples = [(t.decode(), p.decode(errors="replace"), ts) for t, p, ts in self.samples]
            self.samples = []
            return {"samples": samples, "count": self.count}
        if op == "watch":
            self.watch = {k.encode(): v.encode() for k, v in cmd["values"].items()}
            self.satisfied = {}
            self.done = asyncio.Event()
            if cmd.get("accept_current", False):
                now = time.monotonic_ns()
                for topic, want in self.watch.items():
                    if self.last.get(topic) == want:
                        self.satisfied[topic] = now
                if len(self.satisfied) == len(self.watch):
                    self.done.set()
            return {"ok": True, "already": len(self.satisfied)}
        if op == "wait":
            try:
                async with asyncio.timeout(cmd["timeout"]):
                    await self.done.wait()
            except TimeoutError:
                pass
            missing = [t for t in self.watch if t not in self.satisfied]
            wrong = {t.decode(): (self.last.get(t, b"<none>").decode(errors="replace"), self.watch[t].decode())
                     for t in missing[:5]}
            result = {
                "done": not missing,
                "t": max(self.satisfied.values()) if self.satisfied else None,
                "t_first": min(self.satisfied.values()) if self.satisfied else None,
                "missing": len(missing),
                "examples": wrong,
                "count": self.count,
            }
            self.watch = {}
            return result
        if op == "last":
            prefix = cmd.get("prefix", "").encode()
            return {"values": {t.decode(): p.decode(errors="replace")
                               for t, p in self.last.items() if t.startswith(prefix)}}
        raise ValueError(f"unknown command {op}")


class WsProbe:
    """The floor's bare client: the websockets library, receive and timestamp, nothing else."""

    def __init__(self) -> None:
        self.ws: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.recording = False
        self.samples: list[tuple[int, str]] = []
        self.queue_frames = 0
        self.target: int | None = None
        self.t_last: int | None = None
        self.t_first: int | None = None
        self.done = asyncio.Event()
        self.last_message: str | None = None

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self.ws:
                t = time.monotonic_ns()
                if message.startswith('{"type":"queue"'):
                    self.queue_frames += 1
                    self.last_message = message
                    if self.t_first is None:
                        self.t_first = t
                    if self.target is not None and self.queue_frames >= self.target:
                        self.t_last = t
                        self.done.set()
                        self.target = None
                if self.recording:
                    self.samples.append((t, message))
        except ConnectionClosed:
            pass

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["cmd"]
        if op == "connect":
            from websockets.asyncio.client import connect

            # The daemon's own client options (upstream._open), so the floor is like for like.
            self.ws = await connect(
                cmd["url"], additional_headers={"Authorization": f"Bearer {cmd['token']}"},
                ping_interval=20, ping_timeout=20, max_size=1024 * 1024, compression=None,
            )
            for room in cmd.get("rooms", []):
                await self.ws.send(json.dumps({"type": "join", "room": room}))
            self.reader = asyncio.create_task(self._read())
            sock = self.ws.transport.get_extra_info("socket")
            import socket

            nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            return {"ok": True, "nodelay": nodelay}
        if op == "record":
            if cmd.get("clear", True):
                self.samples = []
            self.recording = bool(cmd.get("on", True))
            return {"ok": True}
        if op == "dump":
            samples, self.samples = self.samples, []
            return {"samples": samples}
        if op == "expect":
            self.queue_frames = 0
            self.t_first = None
            self.t_last = None
            self.target = int(cmd["n"])
            self.done = asyncio.Event()
            return {"ok": True}
        if op == "wait":
            try:
                async with asyncio.timeout(cmd["timeout"]):
                    await self.done.wait()
            except TimeoutError:
                pass
            return {"done": self.done.is_set(), "t": self.t_last, "t_first": self.t_first,
                    "count": self.queue_frames, "last": self.last_message}
        if op == "close":
            await self.ws.close()
            return {"ok": True}
        if op == "serve":
            # The display fan-out's floor: a bare websockets server that holds the clients.
            from websockets.asyncio.server import serve

            self.held: set[Any] = set()

            async def hold(ws: Any) -> None:
                self.held.add(ws)
                try:
                    await ws.wait_closed()
                finally:
                    self.held.discard(ws)

            self.server = await serve(hold, "127.0.0.1", 0, compression=None, ping_interval=None)
            return {"port": self.server.sockets[0].getsockname()[1]}
        if op == "broadcast":
            from websockets.asyncio.server import broadcast

            t0 = time.monotonic_ns()
            broadcast(self.held, cmd["frame"])
            return {"t0": t0, "clients": len(self.held)}
        if op == "unserve":
            self.server.close()
            await self.server.wait_closed()
            return {"ok": True}
        raise ValueError(f"unknown command {op}")


async def _serve(kind: str) -> None:
    probe: Any = {"mqtt": MqttProbe, "ws": WsProbe}[kind]()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    while True:
        line = await reader.readline()
        if not line:
            return
        cmd = json.loads(line)
        if cmd.get("cmd") == "exit":
            out.write(b'{"ok":true}\n')
            out.flush()
            return
        try:
            answer = await probe.handle(cmd)
        except Exception as exc:  # noqa: BLE001 - reported to the harness, which raises
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer).encode() + b"\n")
        out.flush()


def main() -> None:
    asyncio.run(_serve(sys.argv[1]))


if __name__ == "__main__":
    main()
