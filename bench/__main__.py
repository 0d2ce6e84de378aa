"""``python -m bench`` (or ``bench/run``): the benchmark suite of issue 5.

Starts its own upstream, a private mosquitto on a free port and the daemon (a separate
process), runs every scenario next to its floor, prints a table and writes JSON (with the
machine's description) to ``bench/results/``.

    python -m bench                  # the full suite, ~6 minutes on 2 cores
    python -m bench --smoke          # seconds: tiny sizes, for CI (no timing assertions)
    python -m bench --only flood,scale
    python -m bench --variant patched   # the daemon with the proposals in bench/patched.py
    python -m bench capacity         # 50 sites x 20 rooms on a NATS cluster and on mosquitto (bench/capacity.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from . import patched
from .procs import ROOT, Broker, machine_load
from .stats import machine, source_fingerprint
from .suite import Row, Sizes, Suite

SCENARIOS = ("footprint", "latency", "display", "recovery", "flood", "scale", "fleet", "profile")
RESULTS = ROOT / "bench" / "results"


def format_value(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return f"{v:,}"


def table(rows: list[Row]) -> str:
    head = ("scenario", "metric", "value", "unit", "floor", "x floor", "target", "status")
    body = [(r.scenario, r.metric, format_value(r.value), r.unit, format_value(r.floor),
             format_value(r.ratio), r.target, r.status) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


def markdown(rows: list[Row]) -> str:
    lines = ["| scenario | metric | value | floor | × floor | target | status |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        unit = f" {r.unit}" if r.unit else ""
        floor = f"{format_value(r.floor)}{unit}" if r.floor is not None else "–"
        lines.append(f"| {r.scenario} | {r.metric} | {format_value(r.value)}{unit} | {floor} | "
                     f"{format_value(r.ratio) if r.ratio is not None else '–'} | {r.target or '–'} | {r.status or '–'} |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    sizes = Sizes.smoke_sizes() if args.smoke else Sizes()
    if args.no_profile:
        sizes.profile = False
    if args.no_seed:
        sizes.seed = False
    for item in args.set or []:
        key, _, value = item.partition("=")
        if not hasattr(sizes, key):
            print(f"--set: no size named {key!r}", file=sys.stderr)
            return 2
        current = getattr(sizes, key)
        if isinstance(current, tuple):
            setattr(sizes, key, tuple(type(current[0])(v) for v in value.split(",")))
        elif isinstance(current, bool):
            setattr(sizes, key, value.lower() in ("1", "true", "yes"))
        else:
            setattr(sizes, key, type(current)(value))
    only = set(args.only.split(",")) if args.only else None
    if only and only - set(SCENARIOS):
        print(f"unknown scenario(s): {', '.join(sorted(only - set(SCENARIOS)))}; known: {', '.join(SCENARIOS)}",
              file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-smoke" if args.smoke else "") + (
        f"-{args.variant}" if args.variant != "stock" else "")
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{stamp}-", dir=out_dir))
    suite = Suite(sizes, workdir, variant=args.variant, only=only, pinning=not args.no_pin)
    started = time.monotonic()
    broker_version = Broker(workdir).version()
    doc: dict[str, object] = {
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT), "-m", "bench", *sys.argv[1:]]),
        "machine": machine(broker_version),
        "variant": args.variant,
        "daemon_source": source_fingerprint(ROOT),
        "patches": (os.environ.get("BENCH_PATCHES") or ",".join(patched.ALL)) if args.variant == "patched" else None,
        "sizes": asdict(sizes),
        "workdir": str(workdir.relative_to(ROOT)) if workdir.is_relative_to(ROOT) else str(workdir),
    }
    failure: BaseException | None = None
    await suite.setup()
    try:
        main_daemon = None
        if any(suite.wanted(n) for n in ("footprint", "latency", "display", "recovery")):
            suite.log("== footprint")
            main_daemon = await suite.footprint()
            if suite.wanted("latency"):
                seed = None
                if suite.seed_on:
                    suite.log("== the seed stack (bench/seed)")
                    seed = await suite.start_seed()
                suite.log("== latency")
                await suite.latency(main_daemon, seed)
                if seed is not None:
                    suite.stop_daemon(seed)
            if suite.wanted("display"):
                suite.log("== display fan-out")
                await suite.display(main_daemon)
            if suite.wanted("recovery"):
                suite.log("== recovery")
                await suite.recovery(main_daemon)
            suite.stop_daemon(main_daemon)
            if not suite.wanted("footprint"):
                suite.rows = [r for r in suite.rows if r.scenario != "footprint"]
        if suite.wanted("flood"):
            suite.log("== flood")
            await suite.flood()
        if suite.wanted("scale"):
            suite.log("== scale")
            await suite.scale()
        if suite.wanted("fleet"):
            suite.log("== fleet")
            await suite.fleet()
        if suite.wanted("profile") and sizes.profile:
            suite.log("== profile (py-spy)")
            await suite.profile(out_dir, stamp)
    except BaseException as exc:  # noqa: BLE001 - the partial results are still written
        failure = exc
    finally:
        await suite.teardown()
    doc["machine"]["loadavg_at_end"] = machine_load()  # type: ignore[index]
    doc["duration_s"] = round(time.monotonic() - started, 1)
    doc["table"] = [asdict(r) for r in suite.rows]
    doc["results"] = suite.results
    doc["complete"] = failure is None
    if failure is not None:
        doc["error"] = f"{type(failure).__name__}: {failure}"
    path = out_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out_dir / ("latest-smoke.json" if args.smoke else "latest.json")).write_text(path.read_text())
    (out_dir / f"bench-{stamp}.md").write_text(markdown(suite.rows) + "\n")
    m = doc["machine"]
    print(f"\nwaiting-room benchmark ({args.variant}) on {m['cpu_model']}, {m['cores']} cores, "  # type: ignore[index]
          f"Python {m['python']}, {m['date']}; {doc['duration_s']} s")  # type: ignore[index]
    print(table(suite.rows))
    print(f"\nJSON: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if failure is not None:
        raise failure
    return 0


def main() -> None:
    if sys.argv[1:2] == ["capacity"]:  # a scenario of its own (issue 14), never in the default run
        from . import capacity

        sys.exit(capacity.main(sys.argv[2:]))
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: completes in seconds (CI)")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(SCENARIOS)}")
    parser.add_argument("--variant", choices=("stock", "patched"), default="stock",
                        help="patched: run the daemon through bench/patched.py (the proposals)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the measured process to its own CPU (see Suite.pin)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--no-seed", action="store_true",
                        help="skip the seed stack (bench/seed: node, installed with npm ci on first use)")
    parser.add_argument("--set", action="append", metavar="SIZE=VALUE",
                        help="override one size, e.g. --set rest_seconds=5 --set flood_rooms=1,1000")
    parser.add_argument("--out", help="results directory (default bench/results)")
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
