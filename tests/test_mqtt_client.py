"""The aiomqtt client as the daemon uses it: the loop-registration race that bench/chaos found
(a broker gone while paho asks to write) must not reach the log as a traceback."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import socket
import warnings

import aiomqtt
import pytest

from conftest import make_config, running, wait_store

from waiting_room.mqtt import _bounded, _Client


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


async def test_a_broker_restart_leaves_no_unretrieved_error_behind(sim, broker, watcher, caplog):
    # Found by bench/chaos and the secret-leak test: one "Future exception was never
    # retrieved" (aiomqtt's Unexpected disconnection) in the log per broker restart.
    caplog.set_level(logging.ERROR, "asyncio")
    async with running(make_config(sim.url, broker.port)) as app:
        await watcher.wait_topic("waiting-room/status", "online")
        for _ in range(3):
            broker.restart()
            await wait_store(app, lambda: app.store.components.get("mqtt") != "connected")
            await wait_store(app, lambda: app.store.components.get("mqtt") == "connected")
    gc.collect()  # an unretrieved exception is reported when its future is collected
    assert "never retrieved" not in caplog.text, caplog.text


def writer_registered(sock: socket.socket) -> bool:
    key = asyncio.get_running_loop()._selector.get_map().get(sock.fileno())  # type: ignore[attr-defined]
    return key is not None and key.data[1] is not None  # (reader, writer) handles


async def test_write_now_writes_in_this_pass_and_leaves_no_writer_behind(broker, watcher):
    # The publisher's fast path: paho's socket write happens in the caller's loop pass; the
    # writer aiomqtt would have registered later must not be left registered (it would fire
    # on every turn of the loop).
    async with _Client("127.0.0.1", broker.port, identifier="write-now") as client:
        sock = client._client.socket()
        for _ in range(5):
            await asyncio.sleep(0)
        assert client.can_write_now()
        client.write_now([("write-now/a", "1"), ("write-now/b", b"2")])
        assert not client._client._out_packet  # on the socket already, before any await
        assert client.can_write_now()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not writer_registered(sock)
        await watcher.wait_topic("write-now/b", "2")


async def test_an_operation_on_a_lost_connection_is_refused_without_a_stray_coroutine():
    client = _Client("127.0.0.1", 1)
    client._disconnected.set_exception(aiomqtt.MqttError("gone"))
    client._disconnected.exception()  # retrieved: this test is about the coroutine
    publishing = client.publish("waiting-room/status", "online")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would be a RuntimeWarning
        with pytest.raises(aiomqtt.MqttError, match="the broker connection is lost"):
            await _bounded(client, publishing, "publish")
        assert inspect.getcoroutinestate(publishing) == inspect.CORO_CLOSED
        del publishing
        gc.collect()
