"""Signs that are not browsers (LED matrix, e-ink): ``display.command`` run on each change.

Each room has one slot holding the values it should show next and at most one process at a
time: a sign that is slow to update gets the newest values when it is ready again, never a
backlog. The program is started without a shell (``{room}`` and friends are substituted per
argument, so an upstream string can never become shell syntax), in its own process group so
a timeout kills whatever it started too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
from dataclasses import dataclass, field
from typing import Final, NamedTuple, Sequence

from ..model import RoomState
from ..store import RoomStore

from ..logutil import RateLimitedLog

log = logging.getLogger(__name__)

_FIELD: Final = re.compile(r"\{(room|name|patients|now_serving|state)\}")
STDERR_KEPT: Final = 2048
KILL_WAIT: Final = 5.0
RETRY_MAX: Final = 60.0


class SignValues(NamedTuple):
    """What a sign shows; a run happens only when this changes."""

    name: str
    patients: str
    now_serving: str
    state: str


def sign_state(state: RoomState) -> str:
    """The page's states, minus ``offline`` (a sign driven by the daemon is never cut off from it)."""
    if state.error is not None:
        return "error"
    if state.patients is None:
        return "connecting"
    return "paused" if state.stale else "live"


def sign_values(state: RoomState) -> SignValues:
    return SignValues(
        state.name,
        "" if state.patients is None else str(state.patients),
        state.now_serving or "",
        sign_state(state),
    )


def command_argv(template: Sequence[str], room: str, values: SignValues) -> list[str]:
    """Substitutes each ``{field}`` in one pass per argument; other braces stay as they are."""
    fields = {"room": room, **values._asdict()}
    return [_FIELD.sub(lambda m: fields[m.group(1)], arg) for arg in template]


@dataclass
class _Slot:
    wanted: SignValues | None = None
    shown: SignValues | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


async def _read_limited(stream: asyncio.StreamReader | None, limit: int) -> bytes:
    """Reads to EOF (so the child never blocks on a full pipe), keeping only the start."""
    kept = b""
    if stream is None:
        return kept
    while chunk := await stream.read(65536):
        if len(kept) < limit:
            kept += chunk[: limit - len(kept)]
    return kept


class SignDriver:
    """Runs ``argv`` per room on change; counts runs, failures and timeouts for /healthz."""

    def __init__(
        self,
        argv: Sequence[str],
        timeout: float,
        store: RoomStore,
        *,
        max_parallel: int = 16,
        retry_initial: float = 1.0,
    ) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self.store = store
        self.runs = 0
        self.failures = 0
        self.timeouts = 0
        self.running = 0
        self._retry_initial = retry_initial
        # Many rooms changing at once (a reconnect) must not fork hundreds of processes.
        self._parallel = asyncio.Semaphore(max_parallel)
        self._slots: dict[str, _Slot] = {}
        self._failed = RateLimitedLog(log)

    def stats(self) -> dict[str, int]:
        return {"runs": self.runs, "failures": self.failures, "timeouts": self.timeouts, "running": self.running}

    async def run(self) -> None:
        with self.store.subscribe() as changes:
            async with asyncio.TaskGroup() as tg:
                async for batch in changes:
                    for room, state in batch.rooms.items():
                        slot = self._slots.get(room)
                        if slot is None:
                            if state is None:
                                continue
                            slot = self._slots[room] = _Slot()
                            tg.create_task(self._worker(room, slot), name=f"sign-{room}")
                        wanted = None if state is None else sign_values(state)
                        if wanted != slot.wanted:
                            slot.wanted = wanted
                            slot.wake.set()

    async def _worker(self, room: str, slot: _Slot) -> None:
        retry = self._retry_initial
        while True:
            await slot.wake.wait()
            slot.wake.clear()
            values = slot.wanted
            if values is None or values == slot.shown:
                continue
            async with self._parallel:
                ok = await self._run_once(room, command_argv(self.argv, room, values))
            if ok:
                slot.shown = values
                retry = self._retry_initial
                continue
            # A sign that is unplugged gets the latest values again later, or at the next change.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(retry):
                    await slot.wake.wait()
            retry = min(retry * 2, RETRY_MAX)
            slot.wake.set()

    async def _run_once(self, room: str, argv: list[str]) -> bool:
        self.runs += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            self._fail(room, "cannot start %s: %s", argv[0], exc.strerror or type(exc).__name__)
            return False
        self.running += 1
        try:
            async with asyncio.timeout(self.timeout):
                err = await _read_limited(proc.stderr, STDERR_KEPT)
                code = await proc.wait()
        except TimeoutError:
            self.timeouts += 1
            await self._kill(proc)
            self._fail(room, "%s did not finish within %.1f s: killed", argv[0], self.timeout)
            return False
        except BaseException:
            # Cancelled (the daemon is stopping): leave no sign program behind.
            await self._kill(proc)
            raise
        finally:
            self.running -= 1
        if code != 0:
            detail = err.decode("utf-8", "replace").strip().splitlines()
            self._fail(room, "%s exited with status %d%s", argv[0], code, f": {detail[-1][:200]}" if detail else "")
            return False
        return True

    def _fail(self, room: str, msg: str, *args: object) -> None:
        self.failures += 1
        self._failed.warning("sign for room %s: " + msg + " (%d failures so far)", room, *args, self.failures)

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        try:
            async with asyncio.timeout(KILL_WAIT):
                await proc.wait()
        except TimeoutError:
            log.error("sign program %d did not exit after SIGKILL", proc.pid)
