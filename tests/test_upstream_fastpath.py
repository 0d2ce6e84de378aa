"""upstream._Connection: a text frame that arrives while the reader waits with nothing queued
goes to ``on_text`` in data_received; the order of the frames is kept whichever path each took."""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from waiting_room.upstream import _Connection


async def test_frames_keep_their_order_across_the_fast_path_and_the_reader():
    release = asyncio.Event()

    async def handler(ws):
        await ws.recv()  # the client's reader is parked by now
        await ws.send("q1")  # fast path
        await asyncio.sleep(0.05)
        # one write holding several frames: q2 fast, then p (refused: the reader's), and
        # q3 behind it must wait for the reader, in order
        ws.transport.write(b"".join(bytes([0x81, len(m)]) + m for m in (b"q2", b"p", b"q3")))
        await release.wait()
        await ws.send("q4")  # the reader is parked again: fast
        await asyncio.sleep(0.05)
        await ws.close()

    seen: list[tuple[str, str]] = []

    def on_text(text: str) -> bool:
        if text.startswith("q"):
            seen.append(("fast", text))
            return True
        return False  # e.g. a ping: the reader's

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", create_connection=_Connection) as ws:
            assert isinstance(ws, _Connection)
            ws.on_text = on_text
            await ws.send("go")
            async for message in ws:
                seen.append(("reader", message))
                if message == "q3":
                    release.set()
    assert seen == [("fast", "q1"), ("fast", "q2"), ("reader", "p"), ("reader", "q3"), ("fast", "q4")]
