"""The fleet on real sockets: many of the daemon's own ``Upstream`` loops in one process, one
real websockets server that restarts, and the handshakes it receives once it listens again.

Each client is a real ``upstream.Upstream`` (its reconnect loop, sessions, close-code policy and
``ReconnectSchedule``) with a one-room store. The server answers joins as PROTOCOL.md says
(``joined``, then a ``queue`` frame), so every connection becomes healthy; then it closes all
of them with ``code`` (1012: "service restart", announced), stops listening (the port refuses)
and listens again ``downtime`` seconds later. An un-jittered fleet would all come back in one
instant: its peak per 1-s window is the fleet's size.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any

import msgspec
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from waiting_room.config import UpstreamConfig, _dec_hook
from waiting_room.store import RoomStore
from waiting_room.upstream import Upstream

from . import fleet


class _RestartingServer:
    def __init__(self) -> None:
        self.port = 0
        self.handshakes: list[float] = []
        self.server: Server | None = None
        self.live = 0

    async def start(self) -> None:
        self.server = await serve(self._handle, "127.0.0.1", self.port, process_request=self._count,
                                  ping_interval=None, compression=None, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    def _count(self, connection: ServerConnection, request: Any) -> None:
        self.handshakes.append(time.monotonic())

    async def _handle(self, ws: ServerConnection) -> None:
        self.live += 1
        try:
            await ws.send('{"type":"hello","heartbeat":15}')
            async for message in ws:
                frame = json.loads(message)
                if frame.get("type") == "join":
                    room = frame["room"]
                    await ws.send(json.dumps({"type": "joined", "room": room}))
                    await ws.send(json.dumps({"type": "queue", "room": room, "patients": 1, "seq": 1}))
                elif frame.get("type") == "ping":
                    await ws.send('{"type":"pong"}')
        except ConnectionClosed:
            pass
        finally:
            self.live -= 1

    async def restart(self, code: int, downtime: float) -> float:
        """Closes every connection with ``code``, refuses for ``downtime``, listens again;
        returns when it listens again (monotonic)."""
        assert self.server is not None
        self.server.close(close_connections=True, code=code, reason="restart")
        await self.server.wait_closed()
        await asyncio.sleep(downtime)
        await self.start()
        return time.monotonic()


async def run(clients: int = 200, code: int = 1012, downtime: float = 1.0, *, seed: int = 1,
              stable_after: float = 1.0, limit: float = 40.0) -> dict[str, Any]:
    logging.getLogger("waiting_room").setLevel(logging.ERROR)
    server = _RestartingServer()
    await server.start()
    cfg = msgspec.convert({"url": f"ws://127.0.0.1:{server.port}/", "token": "fleet",
                           "stable_after": stable_after, "backoff": {"initial": 1, "max": 10}}, UpstreamConfig,
                           dec_hook=_dec_hook)
    ups = []
    for i in range(clients):
        store = RoomStore([("room", "room")])
        ups.append((Upstream(cfg, ["room"], store, rng=random.Random(seed * 100_003 + i)), store))
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(up.run()) for up, _ in ups]
        try:
            deadline = time.monotonic() + limit
            while server.live < clients and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(stable_after + 0.5)  # every connection healthy
            back_at = await server.restart(code, downtime)
            before = len(server.handshakes)
            deadline = time.monotonic() + limit
            while server.live < clients and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            all_back = server.live >= clients
            times = sorted(t - back_at for t in server.handshakes)
            times = [t for t in times if t >= 0]
        finally:
            for task in tasks:
                task.cancel()
    if server.server is not None:
        server.server.close()
        await server.server.wait_closed()
    peak = fleet.peak_rate(times, 1.0)
    model = fleet.run(clients, (), seed=seed, cases=((code, downtime),))["cases"][0]  # type: ignore[index]
    return {
        "clients": clients, "code": code, "downtime_s": downtime,
        "reconnected": len(server.handshakes) - before, "all_back": all_back,
        "returning_peak_1s": peak, "unjittered_peak_1s": float(clients),
        "ratio_1s": round(peak / clients, 3),
        "all_back_after_s": round(max(times), 2) if times else None,
        "per_second": fleet.histogram(times, 1.0, (max(times) + 1) if times else 1),
        "model_ratio_1s": model["returning_ratio_1s"],
    }


if __name__ == "__main__":
    import sys

    print(json.dumps(asyncio.run(run(int(sys.argv[1]) if len(sys.argv) > 1 else 200)), indent=1))
