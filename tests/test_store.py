"""store: RoomStore and Subscription (replay, then coalesced changes; never a backlog)."""

from __future__ import annotations

import asyncio

import pytest

from waiting_room.model import LinkStatus, RoomState
from waiting_room.store import Batch, RoomStore, Subscription

DEADLINE = 1.0
ROOMS = [("opd-1", "OPD 1"), ("lab", "Laboratory")]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> RoomStore:
    return RoomStore(ROOMS, clock=clock)


async def next_batch(sub: Subscription) -> Batch:
    async with asyncio.timeout(DEADLINE):
        return await anext(sub)


async def replayed(store: RoomStore) -> Subscription:
    """A subscription whose replay has been consumed."""
    sub = store.subscribe()
    await next_batch(sub)
    assert not sub.pending()
    return sub


# -- replay ------------------------------------------------------------------------------


async def test_new_subscriber_first_gets_every_room_and_the_link(store):
    store.apply_queue("opd-1", 4)
    with store.subscribe() as sub:
        batch = await next_batch(sub)
    assert set(batch.rooms) == {"opd-1", "lab"}
    assert batch.rooms["opd-1"].patients == 4
    assert batch.rooms["opd-1"].name == "OPD 1"
    assert batch.rooms["lab"].patients is None
    assert batch.rooms["lab"].stale is True
    assert batch.link is not None
    assert batch.link.status is LinkStatus.CONNECTING


async def test_replay_includes_component_health(store):
    store.set_component("mqtt", "connected")
    with store.subscribe() as sub:
        batch = await next_batch(sub)
    assert batch.components == {"mqtt": "connected"}


async def test_after_replay_only_changes(store):
    with await replayed(store) as sub:
        assert store.apply_queue("lab", 3)
        batch = await next_batch(sub)
        assert set(batch.rooms) == {"lab"}
        assert batch.rooms["lab"].patients == 3
        assert batch.link is None
        assert not sub.pending()


async def test_subscriber_waiting_in_anext_is_woken_by_a_change(store):
    with await replayed(store) as sub:
        waiting = asyncio.ensure_future(next_batch(sub))
        await asyncio.sleep(0)  # let it park on the event
        assert not waiting.done()
        store.apply_queue("opd-1", 8)
        batch = await waiting
        assert batch.rooms["opd-1"].patients == 8


# -- coalescing --------------------------------------------------------------------------


async def test_slow_subscriber_gets_one_batch_with_the_latest_value(store):
    with await replayed(store) as sub:
        for n in range(1000):
            store.apply_queue("opd-1", n, seq=n)
        batch = await next_batch(sub)
        assert list(batch.rooms) == ["opd-1"]
        assert batch.rooms["opd-1"].patients == 999
        assert batch.rooms["opd-1"].seq == 999
        assert not sub.pending()  # no backlog behind it


async def test_parked_subscriber_wakes_once_for_a_burst(store):
    with await replayed(store) as sub:
        batches: list[Batch] = []
        got_one = asyncio.Event()

        async def consume() -> None:
            async for batch in sub:
                batches.append(batch)
                got_one.set()

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)  # the consumer parks in anext()
        for n in range(1000):  # a burst, with no await in between
            store.apply_queue("opd-1", n)
            store.apply_queue("lab", 1000 - n)
        async with asyncio.timeout(DEADLINE):
            await got_one.wait()
        sub.close()
        async with asyncio.timeout(DEADLINE):
            await task
    assert len(batches) == 1
    assert batches[0].rooms["opd-1"].patients == 999
    assert batches[0].rooms["lab"].patients == 1


async def test_two_subscribers_are_independent(store):
    fast = await replayed(store)
    slow = await replayed(store)
    store.apply_queue("opd-1", 1)
    assert (await next_batch(fast)).rooms["opd-1"].patients == 1
    store.apply_queue("lab", 2)
    assert set((await next_batch(fast)).rooms) == {"lab"}
    assert not fast.pending()
    # the slow one still has both rooms pending, with their latest values
    assert slow.pending()
    batch = await next_batch(slow)
    assert {r: s.patients for r, s in batch.rooms.items()} == {"opd-1": 1, "lab": 2}
    fast.close()
    slow.close()


async def test_closing_a_subscription_ends_iteration_and_unsubscribes(store):
    sub = store.subscribe()
    assert store.subscribers == 1
    await next_batch(sub)
    sub.close()
    assert store.subscribers == 0
    with pytest.raises(StopAsyncIteration):
        await next_batch(sub)
    store.apply_queue("opd-1", 1)  # no error, nobody notified
    assert not sub.pending()


async def test_close_wakes_a_parked_consumer(store):
    sub = await replayed(store)
    seen: list[Batch] = []

    async def consume() -> None:
        async for batch in sub:
            seen.append(batch)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    sub.close()
    async with asyncio.timeout(DEADLINE):
        await task
    assert seen == []


async def test_context_manager_unsubscribes(store):
    with store.subscribe():
        assert store.subscribers == 1
    assert store.subscribers == 0


# -- rooms -------------------------------------------------------------------------------


async def test_unconfigured_rooms_are_refused(store):
    with await replayed(store) as sub:
        assert store.apply_queue("ghost", 5) is False
        assert "ghost" not in store.rooms
        assert not sub.pending()
        assert store.set_room_error("ghost", "forbidden") is False
        assert not sub.pending()


def test_apply_queue_records_fresh_data(store, clock):
    clock.now = 2000.0
    assert store.apply_queue("opd-1", 6, now_serving="A-17", updated_at=1990.0, seq=3) is True
    state = store.rooms["opd-1"]
    assert state == RoomState(room="opd-1", name="OPD 1", patients=6, now_serving="A-17",
                              updated_at=1990.0, received_at=2000.0, seq=3, stale=False, error=None)
    assert store.last_frame_at == 2000.0


def test_apply_queue_without_server_time_uses_the_clock(store, clock):
    clock.now = 1234.5
    store.apply_queue("lab", 1)
    assert store.rooms["lab"].updated_at == 1234.5


def test_rooms_view_is_read_only(store):
    with pytest.raises(TypeError):
        store.rooms["opd-1"] = RoomState(room="opd-1", name="x")  # type: ignore[index]


async def test_disconnect_marks_every_room_stale_and_fresh_data_clears_it(store):
    store.set_link(LinkStatus.CONNECTED)
    store.apply_queue("opd-1", 4)
    store.apply_queue("lab", 2)
    assert not store.rooms["opd-1"].stale and not store.rooms["lab"].stale
    with await replayed(store) as sub:
        store.set_link(LinkStatus.DISCONNECTED, "closed 1011", retry_in=2.0)
        batch = await next_batch(sub)
        assert batch.link is not None and batch.link.status is LinkStatus.DISCONNECTED
        assert batch.link.detail == "closed 1011" and batch.link.retry_in == 2.0
        assert set(batch.rooms) == {"opd-1", "lab"}
        assert all(state.stale for state in batch.rooms.values())
        assert batch.rooms["opd-1"].patients == 4  # last value kept, only marked stale
        store.apply_queue("opd-1", 5)
        batch = await next_batch(sub)
        assert batch.rooms["opd-1"].stale is False
        assert store.rooms["lab"].stale is True


@pytest.mark.parametrize("status", [LinkStatus.DISCONNECTED, LinkStatus.AUTH_FAILED, LinkStatus.CONNECTING])
def test_any_status_but_connected_marks_rooms_stale(store, status):
    store.set_link(LinkStatus.CONNECTED)
    store.apply_queue("opd-1", 4)
    store.set_link(status)
    assert store.rooms["opd-1"].stale is True


def test_degraded_keeps_polled_rooms_fresh(store, clock):
    """Values polled from the snapshot are live: ``degraded`` marks nothing stale, carries the
    polling interval, and does not count as a socket connection."""
    store.set_link(LinkStatus.CONNECTED)
    store.apply_queue("opd-1", 4)
    store.set_link(LinkStatus.DISCONNECTED, "handshake refused: HTTP 426")
    assert store.rooms["opd-1"].stale is True
    store.set_link(LinkStatus.DEGRADED, "handshake refused: HTTP 426", poll_interval=5.0)
    store.apply_queue("opd-1", 6)
    assert store.rooms["opd-1"].stale is False
    assert store.link.poll_interval == 5.0 and store.link.connects == 1
    assert store.link.status.live and store.link.status.feed == "poll"
    clock.now += 1
    store.set_link(LinkStatus.DEGRADED, "handshake refused: HTTP 426", poll_interval=5.0)
    assert store.rooms["opd-1"].stale is False
    store.set_link(LinkStatus.DISCONNECTED, "handshake refused: HTTP 426", poll_interval=5.0)
    assert store.rooms["opd-1"].stale is True and store.link.poll_interval is None
    assert not store.link.status.live and store.link.status.feed is None
    assert LinkStatus.CONNECTED.feed == "socket"


def test_connects_counts_transitions_to_connected(store, clock):
    assert store.link.connects == 0
    store.set_link(LinkStatus.CONNECTED)
    store.set_link(LinkStatus.CONNECTED)
    assert store.link.connects == 1
    clock.now += 5
    store.set_link(LinkStatus.DISCONNECTED)
    assert store.link.since == clock.now
    store.set_link(LinkStatus.CONNECTED)
    assert store.link.connects == 2


async def test_unchanged_link_notifies_nobody(store):
    store.set_link(LinkStatus.DISCONNECTED, "x", retry_in=1.0)
    with await replayed(store) as sub:
        store.set_link(LinkStatus.DISCONNECTED, "x", retry_in=1.0)
        assert not sub.pending()


async def test_configure_adds_and_removes_rooms(store):
    store.apply_queue("opd-1", 4)
    with await replayed(store) as sub:
        added, removed = store.configure([("opd-1", "OPD 1"), ("xray", "X-ray")])
        assert added == ["xray"]
        assert removed == ["lab"]
        batch = await next_batch(sub)
        assert batch.rooms["lab"] is None  # removed
        assert batch.rooms["xray"] == RoomState(room="xray", name="X-ray")
        assert "opd-1" not in batch.rooms  # unchanged: not in the batch
        assert set(store.rooms) == {"opd-1", "xray"}
        assert store.rooms["opd-1"].patients == 4
        assert store.apply_queue("lab", 1) is False
        assert store.apply_queue("xray", 1) is True


async def test_configure_renames_a_room_keeping_its_data(store):
    store.apply_queue("opd-1", 4)
    with await replayed(store) as sub:
        added, removed = store.configure([("opd-1", "Outpatients 1"), ("lab", "Laboratory")])
        assert (added, removed) == ([], [])
        batch = await next_batch(sub)
        assert list(batch.rooms) == ["opd-1"]
        assert batch.rooms["opd-1"].name == "Outpatients 1"
        assert batch.rooms["opd-1"].patients == 4


async def test_configure_with_the_same_rooms_changes_nothing(store):
    with await replayed(store) as sub:
        assert store.configure(ROOMS) == ([], [])
        assert not sub.pending()


async def test_set_room_error(store):
    store.set_link(LinkStatus.CONNECTED)
    store.apply_queue("lab", 3)
    with await replayed(store) as sub:
        assert store.set_room_error("lab", "forbidden") is True
        batch = await next_batch(sub)
        assert batch.rooms["lab"].error == "forbidden"
        assert batch.rooms["lab"].stale is True
        assert store.set_room_error("lab", "forbidden") is True  # same error again: no change
        assert not sub.pending()
        store.apply_queue("lab", 4)  # the room came back
        batch = await next_batch(sub)
        assert batch.rooms["lab"].error is None
        assert batch.rooms["lab"].stale is False


async def test_clear_room_error(store):
    store.set_room_error("opd-1", "unknown_room")
    with await replayed(store) as sub:
        store.clear_room_error("opd-1")
        batch = await next_batch(sub)
        assert batch.rooms["opd-1"].error is None
        store.clear_room_error("opd-1")
        store.clear_room_error("ghost")
        assert not sub.pending()


async def test_restore_shows_last_values_marked_stale(store):
    old = [
        RoomState(room="opd-1", name="old name", patients=12, now_serving="B-2", seq=9, stale=False),
        RoomState(room="lab", name="Laboratory", patients=1, stale=False, error="forbidden"),
        RoomState(room="gone", name="Gone", patients=3, stale=False),
    ]
    with await replayed(store) as sub:
        store.restore(old)
        batch = await next_batch(sub)
        assert set(batch.rooms) == {"opd-1", "lab"}  # an unconfigured room is not restored
        opd = batch.rooms["opd-1"]
        assert (opd.patients, opd.now_serving, opd.seq) == (12, "B-2", 9)
        assert opd.stale is True
        assert opd.name == "OPD 1"  # the configured name wins
        assert batch.rooms["lab"].stale is True and batch.rooms["lab"].error is None
        assert "gone" not in store.rooms


def test_restore_never_overwrites_fresh_data(store):
    store.apply_queue("opd-1", 2)
    store.restore([RoomState(room="opd-1", name="OPD 1", patients=50, stale=False)])
    assert store.rooms["opd-1"].patients == 2
    assert store.rooms["opd-1"].stale is False


async def test_set_component_marks_the_link_dirty(store):
    with await replayed(store) as sub:
        store.set_component("mqtt", "connected")
        batch = await next_batch(sub)
        assert batch.rooms == {}
        assert batch.link is not None
        assert batch.components == {"mqtt": "connected"}
        store.set_component("mqtt", "connected")  # unchanged
        assert not sub.pending()
        store.set_component("mqtt", "disconnected")
        assert (await next_batch(sub)).components == {"mqtt": "disconnected"}


def test_count_dropped(store):
    assert store.count_dropped() == 1
    assert store.count_dropped() == 2
    assert store.dropped_frames == 2


async def test_a_subscription_without_replay_gets_only_later_changes():
    store = RoomStore([("opd-1", "OPD 1"), ("lab", "Lab")])
    with store.subscribe(replay=False) as changes:
        assert not changes.pending()  # the caller took the current state itself
        store.apply_queue("lab", 3, None, None, 1)
        async with asyncio.timeout(1):
            batch = await anext(aiter(changes))
        assert list(batch.rooms) == ["lab"] and batch.link is None


# -- the consumer's synchronous fast path (Subscription.fast) --------------------------------


async def test_fast_path_takes_a_change_while_the_consumer_waits_and_nothing_is_dirty(store):
    with await replayed(store) as sub:
        seen: list[tuple[str, int | None]] = []

        def fast(room: str) -> bool:
            seen.append((room, store.rooms[room].patients))  # the new state is in the store already
            return True

        sub.fast = fast
        store.apply_queue("opd-1", 5)  # not waiting in anext(): never called
        assert seen == [] and sub.pending()
        await next_batch(sub)
        waiting = asyncio.ensure_future(next_batch(sub))
        await asyncio.sleep(0)  # parked
        store.apply_queue("opd-1", 6)
        store.apply_queue("lab", 7)
        assert seen == [("opd-1", 6), ("lab", 7)]
        assert not sub.pending() and not waiting.done()
        waiting.cancel()


async def test_fast_path_refusing_a_change_leaves_it_and_the_rest_of_the_burst_to_coalesce(store):
    with await replayed(store) as sub:
        calls: list[str] = []

        def fast(room: str) -> bool:
            calls.append(room)
            return len(calls) == 1  # takes the first change only (e.g. one per loop pass)

        sub.fast = fast
        waiting = asyncio.ensure_future(next_batch(sub))
        await asyncio.sleep(0)
        for n in range(100):  # a burst with no await in between
            store.apply_queue("opd-1", n)
        store.set_link(LinkStatus.CONNECTED)
        batch = await waiting
        # taken: 0; refused: 1, then the room is dirty and the fast path is no longer asked
        assert calls == ["opd-1", "opd-1"]
        assert batch.rooms["opd-1"].patients == 99 and batch.link is not None


async def test_fast_path_is_not_asked_while_the_link_is_dirty(store):
    with await replayed(store) as sub:
        calls: list[str] = []
        sub.fast = lambda room: calls.append(room) or True
        waiting = asyncio.ensure_future(next_batch(sub))
        await asyncio.sleep(0)
        store.set_component("mqtt", "connected")  # link dirty: wakes the consumer
        store.apply_queue("opd-1", 1)
        batch = await waiting
        assert calls == [] and batch.rooms["opd-1"].patients == 1
