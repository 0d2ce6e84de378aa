"""Percentiles and the description of the machine a run happened on."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import math
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

PACKAGES = ("waiting-room", "websockets", "aiomqtt", "paho-mqtt", "msgspec", "backoff", "PyYAML", "uvloop",
            "py-spy", "pyinstrument")


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary_ms(samples_ns: Iterable[int]) -> dict[str, float | int | None]:
    """p50/p90/p99/max/mean in milliseconds, and the count."""
    values = sorted(s / 1e6 for s in samples_ns)
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 4),  # type: ignore[arg-type]
        "p90": round(percentile(values, 90), 4),  # type: ignore[arg-type]
        "p99": round(percentile(values, 99), 4),  # type: ignore[arg-type]
        "max": round(values[-1], 4),
        "mean": round(sum(values) / len(values), 4),
    }


def median(values: Sequence[float]) -> float | None:
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def ratio(value: float | None, floor: float | None) -> float | None:
    if value is None or floor is None or floor <= 0:
        return None
    return round(value / floor, 2)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mb() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def source_fingerprint(root: Path) -> dict[str, object]:
    """Which daemon was measured: a hash over its sources (others edit them meanwhile)."""
    digest = hashlib.sha256()
    files = sorted(p for p in (root / "daemon" / "waiting_room").rglob("*.py"))
    newest = 0.0
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
        newest = max(newest, path.stat().st_mtime)
    return {
        "sha256": digest.hexdigest()[:16],
        "files": len(files),
        "newest_change": _dt.datetime.fromtimestamp(newest, _dt.UTC).isoformat(timespec="seconds"),
    }


def machine(mosquitto_version: str) -> dict[str, object]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        node = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=5,
                              check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        node = None
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_mb": _mem_total_mb(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "packages": versions,
        "mosquitto": mosquitto_version,
        "mosquitto_path": shutil.which("mosquitto") or "/usr/sbin/mosquitto",
        "node": node or None,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "loadavg_at_start": list(os.getloadavg()),
    }
