"""The state file as a consumer of the store: written after changes, and caught up after a
failed write (full disk, vanished directory) without waiting for the next change."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from conftest import LogWatch, eventually
from waiting_room.statefile import FILE_NAME, StateFile, load
from waiting_room.store import RoomStore


async def wait_for_file(path: Path, patients: dict[str, int], timeout: float = 5.0) -> None:
    """A file: there is no event to await."""
    await eventually(lambda: {s.room: s.patients for s in load(path)} == patients, timeout, f"{patients} in {path}")


async def test_written_after_a_change(tmp_path):
    store = RoomStore([("lab", "Lab")])
    state = StateFile(tmp_path, store, min_interval=0.05)
    task = asyncio.create_task(state.run())
    await asyncio.sleep(0)  # run() takes what is in the store as already on disk: start it first
    try:
        store.apply_queue("lab", 4, "B-1", None, 1)
        await wait_for_file(tmp_path / FILE_NAME, {"lab": 4})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_failed_write_is_retried_without_a_new_change(tmp_path):
    directory = tmp_path / "state"
    store = RoomStore([("lab", "Lab")])
    state = StateFile(directory, store, min_interval=0.05)

    def said(words: str) -> int:
        return sum(words in r.getMessage() for r in logs.records)

    async with LogWatch("waiting_room.statefile") as logs:
        task = asyncio.create_task(state.run())
        await asyncio.sleep(0)
        try:
            store.apply_queue("lab", 1, None, None, 1)
            await wait_for_file(directory / FILE_NAME, {"lab": 1})
            # The directory becomes unwritable (as a full disk would: every write fails).
            shutil.rmtree(directory)
            directory.write_text("not a directory")
            store.apply_queue("lab", 2, None, None, 2)
            await logs.wait(lambda: said("cannot write the state file") >= 1, 5, "the failed write logged")
            directory.unlink()  # room again; no further change arrives
            await wait_for_file(directory / FILE_NAME, {"lab": 2})
            assert said("cannot write the state file") == 1  # rate-limited, not per retry
            assert said("written again") == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
