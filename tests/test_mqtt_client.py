"""The aiomqtt client as the daemon uses it: the loop-registration race that bench/chaos found
(a broker gone while paho asks to write) must not reach the log as a traceback."""

from __future__ import annotations

import asyncio
import socket

import aiomqtt

from waiting_room.mqtt import _Client


async def register_closed_socket(client: aiomqtt.Client) -> list[dict]:
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        sock = socket.socket()
        client._client._sock = sock  # paho holds it ...
        client._on_socket_register_write(client._client, None, sock)
        sock.close()  # ... and it is closed before the loop gets to the registration
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
        client._client._sock = None
    return errors


async def test_a_socket_closed_before_its_writer_is_registered_is_left_alone():
    assert await register_closed_socket(_Client("127.0.0.1", 1)) == []


async def test_the_library_alone_logs_the_race():
    # The reason for _Client: without it the loop reports an exception (a traceback in the log).
    errors = await register_closed_socket(aiomqtt.Client("127.0.0.1", 1))
    assert errors and "exception" in errors[0]
