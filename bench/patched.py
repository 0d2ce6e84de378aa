"""The daemon with proposed changes applied as monkeypatches, to measure them first.

``python -m bench.patched run --config ...`` is ``python -m waiting_room run`` with the
patches in ``PATCHES`` switched on, so ``bench/run --variant patched`` measures a proposal
before anyone edits ``daemon/``. ``BENCH_PATCHES`` (comma-separated names, default all) picks
them. A patch names the daemon function it stands in for.

Empty now: the four proposals measured here on 2026-11-25 (RoomState as a msgspec Struct,
batched QoS 0 publishes with at most 64 rooms per batch, one display subscription per view,
the discovery topic set built once per room list) were applied to ``daemon/``; the README's
benchmark section has their before/after figures.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

PATCHES: dict[str, Callable[[], None]] = {}
ALL = tuple(PATCHES)


def apply(names: str | None = None) -> list[str]:
    wanted = [n for n in (names if names is not None else os.environ.get("BENCH_PATCHES", ",".join(ALL))).split(",") if n]
    unknown = set(wanted) - set(ALL)
    if unknown:
        raise SystemExit(f"BENCH_PATCHES: unknown {', '.join(sorted(unknown))}; known: {', '.join(ALL)}")
    wanted = [n for n in ALL if n in wanted]  # in declaration order
    for name in wanted:
        PATCHES[name]()
    os.environ["BENCH_PATCHES_APPLIED"] = ",".join(wanted)
    return wanted


def main() -> None:
    applied = apply()
    print(f"bench.patched: {', '.join(applied) or 'no patches'}", file=sys.stderr, flush=True)
    from waiting_room.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
