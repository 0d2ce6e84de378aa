"""What one ``/metrics`` scrape costs with 10,000 rooms (issue 11: Prometheus scrapes every 15 s).

    bench/metrics                     # 10,000 rooms, 30 scrapes; about a minute
    bench/metrics --rooms 100 --scrapes 5

Two figures, printed and written to ``bench/results/metrics-*.json``:

- in process: the collector alone rendering a store of N live rooms (what the event loop is
  busy with during a scrape), median and worst of the renders, and the size of the text;
- end to end: the daemon as its own process (a private mosquitto, the project's simulator
  serving the N rooms, discovery on), scraped over HTTP on its display port once it is quiet:
  wall time per scrape, the daemon's CPU per scrape (utime + stime over the scrapes, less what
  it burns idle over as long), bytes; ``/healthz`` beside it, which walks the same rooms;
- the event loop meanwhile: the latency of small requests (``/favicon.ico``, answered by the
  loop at once) sent back to back during the scrapes, against the same without scrapes.

No timing assertions anywhere: this measures, ``tests/test_metrics.py`` checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from testsupport import ROOT, Broker, Daemon, free_port, http_get, wait_listening

from .procs import daemon_config
from .stats import machine

RESULTS = ROOT / "bench" / "results"


def in_process(rooms: int, renders: int) -> dict[str, Any]:
    from waiting_room.metrics import Counters, Metrics
    from waiting_room.model import LinkStatus
    from waiting_room.store import RoomStore

    store = RoomStore((f"room-{i:05d}", f"Room {i}") for i in range(rooms))
    store.set_link(LinkStatus.CONNECTED)
    for i in range(rooms):
        store.apply_queue(f"room-{i:05d}", i % 40, f"A-{i % 100}")
    metrics = Metrics(store, Counters)
    metrics.render()  # warm-up
    times = []
    for _ in range(renders):
        started = time.perf_counter()
        body = metrics.render()
        times.append(time.perf_counter() - started)
    return {"rooms": rooms, "renders": renders, "render_ms_median": statistics.median(times) * 1000,
            "render_ms_max": max(times) * 1000, "bytes": len(body), "lines": body.count(b"\n")}


async def end_to_end(rooms: int, scrapes: int, workdir: Path) -> dict[str, Any]:
    ids = [f"room-{i:05d}" for i in range(rooms)]
    broker = Broker(workdir, tuned=True)
    broker.start()
    sim_port, display_port = free_port(), free_port()
    sim_log = open(workdir / "simulator.log", "ab")
    sim = subprocess.Popen(
        [sys.executable, "-m", "waiting_room", "simulate", "--port", str(sim_port), "--rooms", ",".join(ids),
         "--token", "daemon", "--tick", "0", "--seed", "1"],
        stdin=subprocess.DEVNULL, stdout=sim_log, stderr=subprocess.STDOUT,
        env={"PYTHONPATH": f"{ROOT / 'daemon'}:{ROOT}"}, cwd=ROOT)
    daemon = Daemon(workdir, "daemon", daemon_config(f"ws://127.0.0.1:{sim_port}/ws", ids, broker.port,
                                                     "bench-metrics", display_port=display_port))
    try:
        wait_listening(sim_port, sim, "simulator", workdir / "simulator.log", limit=60)
        daemon.start()
        wait_listening(display_port, daemon.proc, "daemon", daemon.log_path, limit=60)
        started = time.monotonic()
        while True:  # every room live
            status, _, body = await http_get(display_port, "/healthz", timeout=30)
            doc = json.loads(body) if status else {}
            if status == 200 and not any(r["stale"] for r in doc.get("rooms", {}).values()):
                break
            if time.monotonic() - started > 120:
                raise RuntimeError(f"rooms not live after 120 s: {daemon.log_tail()}")
            await asyncio.sleep(0.5)
        live_after = time.monotonic() - started
        await quiet(daemon)  # discovery and the first publishes are over

        window = 5.0
        cpu = daemon.cpu()
        await asyncio.sleep(window)
        idle_per_s = (daemon.cpu() - cpu) / window

        def figures(path: str, walls: list[float], cpu_used: float, elapsed: float, size: int) -> dict[str, Any]:
            return {"path": path, "wall_ms_median": statistics.median(walls) * 1000,
                    "wall_ms_max": max(walls) * 1000,
                    "cpu_ms_per_scrape": max(0.0, cpu_used - idle_per_s * elapsed) / len(walls) * 1000,
                    "bytes": size}

        out = {"rooms": rooms, "scrapes": scrapes, "rooms_live_after_s": live_after,
               "daemon_idle_cpu_percent": idle_per_s * 100}
        for path in ("/metrics", "/healthz"):
            walls = []
            cpu, t0 = daemon.cpu(), time.monotonic()
            for _ in range(scrapes):
                started = time.perf_counter()
                status, _, body = await http_get(display_port, path, timeout=30)
                walls.append(time.perf_counter() - started)
                assert status == 200, (path, status, body[:200])
            out[path.strip("/")] = figures(path, walls, daemon.cpu() - cpu, time.monotonic() - t0, len(body))
        if b'waiting_room_room_patients{room="room-00000"}' not in body and path == "/metrics":
            raise RuntimeError("the scrape misses a room")
        out["loop_idle"] = await small_requests(display_port, 2.0)
        scraping = asyncio.create_task(scrape_loop(display_port, scrapes))
        out["loop_scraping"] = await small_requests(display_port, None, until=scraping)
        return out
    finally:
        daemon.stop()
        sim.terminate()
        sim.wait(10)
        sim_log.close()
        broker.stop()


async def scrape_loop(port: int, scrapes: int) -> None:
    for _ in range(scrapes):
        await http_get(port, "/metrics", timeout=30)


async def small_requests(port: int, duration: float | None, until: asyncio.Task[None] | None = None) -> dict[str, float]:
    """Latency of /favicon.ico (the loop answers it at once) sent back to back, for
    ``duration`` seconds or until ``until`` is done."""
    times: list[float] = []
    ends = time.monotonic() + (duration or 0)
    while (until is not None and not until.done()) or (until is None and time.monotonic() < ends):
        started = time.perf_counter()
        await http_get(port, "/favicon.ico", timeout=30)
        times.append(time.perf_counter() - started)
    if until is not None:
        await until
    times.sort()
    return {"requests": len(times), "ms_median": statistics.median(times) * 1000,
            "ms_p99": times[int(len(times) * 0.99)] * 1000, "ms_max": times[-1] * 1000}


async def quiet(daemon: Daemon, limit: float = 120.0) -> None:
    """Until the daemon burns almost nothing for two half-seconds in a row."""
    started, calm, last = time.monotonic(), 0, daemon.cpu()
    while time.monotonic() - started < limit and calm < 2:
        await asyncio.sleep(0.5)
        now = daemon.cpu()
        calm = calm + 1 if now - last <= 0.02 else 0
        last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mosquitto = Broker(Path(tmp)).version()
    result: dict[str, Any] = {"machine": machine(mosquitto), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    result["in_process"] = in_process(args.rooms, args.scrapes)
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        result["end_to_end"] = asyncio.run(end_to_end(args.rooms, args.scrapes, Path(tmp)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"metrics-{args.rooms}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    p, e = result["in_process"], result["end_to_end"]
    print(f"{args.rooms} rooms: render {p['render_ms_median']:.1f} ms median ({p['render_ms_max']:.1f} max), "
          f"{p['bytes'] / 1024:.0f} KiB, {p['lines']} lines")
    for name in ("metrics", "healthz"):
        f = e[name]
        print(f"  GET {f['path']}: {f['wall_ms_median']:.1f} ms median ({f['wall_ms_max']:.1f} max), "
              f"daemon CPU {f['cpu_ms_per_scrape']:.1f} ms/scrape, {f['bytes'] / 1024:.0f} KiB")
    print(f"  daemon idle: {e['daemon_idle_cpu_percent']:.2f} % CPU; every 15 s the scrape adds "
          f"{e['metrics']['cpu_ms_per_scrape'] / 150:.2f} % CPU")
    for name, label in (("loop_idle", "no scrape"), ("loop_scraping", "scraping back to back")):
        f = e[name]
        print(f"  GET /favicon.ico, {label}: median {f['ms_median']:.2f} ms, p99 {f['ms_p99']:.2f} ms, "
              f"max {f['ms_max']:.1f} ms ({f['requests']} requests)")
    print(f"written to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
