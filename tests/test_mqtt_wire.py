"""The fast path's own PUBLISH packets (mqtt.retained_publish_packet) are paho's, byte for byte,
and what a full socket does not take, or a batch queues, still reaches the broker whole and in order."""

from __future__ import annotations

import asyncio
import socket

import paho.mqtt.client as paho_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import eventually

from waiting_room.mqtt import _Client, publish_retained_batch, retained_publish_packet


def paho_packet(topic: str, payload: bytes, protocol: int) -> bytes:
    """What paho itself writes for a retained QoS 0 publish."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        client = paho_client.Client(paho_client.CallbackAPIVersion.VERSION2, protocol=protocol)
        client._sock = ours
        client._state = paho_client._ConnectionState.MQTT_CS_CONNECTED
        assert client.publish(topic, payload, 0, True).rc == paho_client.MQTT_ERR_SUCCESS
        client._sock = None
        ours.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: theirs.recv(65536), b""))


@pytest.mark.parametrize("protocol", [paho_client.MQTTv311, paho_client.MQTTv5])
@pytest.mark.parametrize("size", [0, 1, 100, 127 - 2 - 13, 127 - 2 - 12, 16383 - 40, 16384, 60_000])
def test_a_packet_is_what_paho_writes(protocol, size):
    topic = "waiting-room/r1/state"
    payload = bytes(i % 251 for i in range(size))
    mqtt5 = protocol == paho_client.MQTTv5
    assert retained_publish_packet(topic, payload, mqtt5=mqtt5) == paho_packet(topic, payload, protocol)


@settings(max_examples=60, deadline=None)
@given(topic=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00#+"), min_size=1, max_size=60),
       payload=st.text(max_size=300), mqtt5=st.booleans())
def test_any_topic_and_text_payload_match_paho(topic, payload, mqtt5):
    protocol = paho_client.MQTTv5 if mqtt5 else paho_client.MQTTv311
    assert retained_publish_packet(topic, payload, mqtt5=mqtt5) == paho_packet(topic, payload.encode(), protocol)


async def test_what_a_full_socket_does_not_take_follows_in_order():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    client = _Client("127.0.0.1", 1)
    client._client._sock = ours
    loop = asyncio.get_running_loop()
    try:
        big = bytes(range(256)) * 8192  # 2 MB: more than a socket buffer holds
        messages = [("wire/big", big), ("wire/after", "2")]
        client.write_now(messages)
        assert client._client._out_packet, "the socket took all of it: the test proves nothing"
        expected = b"".join(retained_publish_packet(t, p) for t, p in messages)
        received = bytearray()

        def drain() -> bool:
            try:
                while chunk := theirs.recv(1 << 20):
                    received.extend(chunk)
            except BlockingIOError:
                pass
            return len(received) >= len(expected)

        await eventually(drain, 10, "the queued rest on the socket")
        assert bytes(received) == expected
        await eventually(lambda: not client._client._out_packet, 5, "paho's queue empty again")
    finally:
        loop.remove_writer(ours.fileno())
        client._client._sock = None
        ours.close()
        theirs.close()


async def test_a_batch_reaches_the_broker_whole_and_in_order(broker, watcher):
    messages = [(f"wire/batch/{i % 40}", str(i)) for i in range(400)]
    async with _Client("127.0.0.1", broker.port, identifier="wire-batch") as client:
        await publish_retained_batch(client, messages)
        assert not client._client._out_packet  # awaited the last: everything before it is written
        await watcher.wait_topic("wire/batch/39", "399")
    sent = [(t, p) for t, p in watcher.history if t.startswith("wire/batch/")]
    assert sent == messages
