"""The processes a benchmark run starts: a private mosquitto, the daemon, the probes.

Nothing here touches the machine's broker on 1883: mosquitto gets a free loopback port and a
config of its own. The daemon is ``python -m waiting_room run --config ...`` in its own process,
so its RSS and CPU (``/proc/<pid>/status`` VmRSS, ``/proc/<pid>/stat`` utime+stime) are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- /proc --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[key] = int(value.split()[0])
    return out


def machine_load() -> list[float]:
    return list(os.getloadavg())


# -- mosquitto ------------------------------------------------------------------------------


class Broker:
    """A mosquitto of our own, tuned for measuring (see ``CONF``)."""

    # set_tcp_nodelay: the broker's own sockets send small packets at once (no Nagle);
    # max_queued_*: 0 = unlimited, so a QoS 0 message is never dropped because a probe lags
    # (the probe's message count is then exactly what the daemon published).
    CONF = (
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "set_tcp_nodelay true\nmax_queued_messages 0\nmax_queued_bytes 0\n"
    )

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

    def version(self) -> str:
        try:
            out = subprocess.run([self.exe, "-h"], capture_output=True, text=True, timeout=5, check=False)
            return (out.stdout or out.stderr).splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    def start(self) -> None:
        if not os.path.exists(self.exe):
            raise SystemExit("mosquitto is not installed: run scripts/setup (or apt-get install mosquitto)")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.CONF.format(port=self.port))
        with open(self.workdir / "mosquitto.log", "wb") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.workdir / 'mosquitto.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# -- the daemon -----------------------------------------------------------------------------


def daemon_config(
    upstream_url: str,
    rooms: list[str],
    broker_port: int,
    base_topic: str,
    *,
    display_port: int | None = None,
    backoff: dict[str, Any] | None = None,
    stable_after: float | None = None,
) -> dict[str, Any]:
    """Defaults wherever a user would keep them (discovery on, backoff 1..10 s, QoS as shipped)."""
    upstream: dict[str, Any] = {"url": upstream_url, "token": "daemon"}
    if backoff is not None:
        upstream["backoff"] = backoff
    if stable_after is not None:
        upstream["stable_after"] = stable_after
    return {
        "upstream": upstream,
        "rooms": [{"id": r} for r in rooms],
        "mqtt": {"port": broker_port, "base_topic": base_topic, "client_id": f"bench-{base_topic}"},
        "display": (
            {"enabled": True, "listen": f"127.0.0.1:{display_port}"} if display_port else {"enabled": False}
        ),
        "log_level": "info",
    }


class Daemon:
    """``python -m waiting_room run`` (or the patched launcher) as a child process."""

    def __init__(self, workdir: Path, name: str, config: dict[str, Any], *, module: str = "waiting_room") -> None:
        self.workdir = workdir
        self.name = name
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / f"{name}.log"
        self.module = module
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_ns = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "daemon"), str(ROOT)])}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        with open(self.log_path, "wb") as log:  # the child keeps its own copy
            self.started_ns = time.monotonic_ns()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        return memory_kb(self.pid)

    async def quiet(self, window: float = 0.5, ticks: int = 1, limit: float = 30.0) -> float:
        """Waits until the daemon burns at most ``ticks`` clock ticks in two windows in a row;
        returns how long that took (bounded by ``limit``)."""
        started = time.monotonic()
        calm = 0
        last = self.cpu()
        while time.monotonic() - started < limit:
            await asyncio.sleep(window)
            now = self.cpu()
            calm = calm + 1 if (now - last) * CLK_TCK <= ticks else 0
            last = now
            if calm >= 2:
                break
        return time.monotonic() - started

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- probes ---------------------------------------------------------------------------------


class Probe:
    """A ``python -m bench.probe KIND`` (or ``bench.fanout``) child, driven by JSON lines."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "daemon"), str(ROOT)])}
        # Display clients are many: they get the lean epoll probe (bench.fanout).
        argv = ["-m", "bench.fanout"] if self.kind == "display" else ["-m", "bench.probe", self.kind]
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT, env=env, limit=2**28,
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def call(self, cmd: str, *, limit: float = 120.0, **args: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        limit = max(limit, float(args.get("timeout", 0)) + 15)
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        await self.proc.stdin.drain()
        async with asyncio.timeout(limit):
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"probe {self.kind} exited")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"probe {self.kind}: {cmd}: {answer['error']}")
        return answer

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            await self.call("exit", limit=5)
            async with asyncio.timeout(5):
                await self.proc.wait()
        except (TimeoutError, RuntimeError, BrokenPipeError, ConnectionResetError):
            self.proc.kill()
            await self.proc.wait()
