"""The real parts that tests, benchmarks and the chaos runner start: one copy, shared.

A private mosquitto on a free loopback port (never the machine's broker on 1883), the daemon
as a separate process (``python -m waiting_room run``), and ``/proc`` readings of a process.
Nothing here imports pytest: a problem is a ``RuntimeError`` that each caller reports its way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not start listening on {port}")


async def http_get(port: int, target: str, headers: dict[str, str] | None = None, method: str = "GET", *,
                   source: str = "127.0.0.1", timeout: float = 5.0, ssl: Any = None,
                   host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request to a loopback port, the target sent byte for byte, from a chosen
    loopback source address (a flood from "other machines" comes from 127.0.x.y). Status 0:
    the answer was not HTTP. ``ssl``: an ``SSLContext`` (HTTPS); ``host``: the Host header
    (default ``127.0.0.1:<port>``; "" sends none)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0), ssl=ssl)
        try:
            host_line = [f"Host: {host if host is not None else f'127.0.0.1:{port}'}"] if host != "" else []
            lines = [f"{method} {target} HTTP/1.1", *host_line, "Connection: close"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            raw = await reader.read()
        finally:
            writer.transport.abort()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    if not status_line.startswith("HTTP/"):
        return 0, {}, body
    parsed = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines if line)}
    return int(status_line.split()[1]), parsed, body


def terminate(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """SIGTERM, and SIGKILL if it has not gone after ``grace`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- TLS: a certificate authority of the test's own ------------------------------------------


class Issued:
    """A certificate and its private key (PEM files), as issued by ``CertAuthority``."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key

    def spki_sha256(self) -> str:
        """base64(SHA-256(SubjectPublicKeyInfo)): what Chromium's
        ``--ignore-certificate-errors-spki-list`` and HPKP-style pins name."""
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-noout", "-pubkey"],
                             capture_output=True, check=True).stdout
        spki = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=der,
                              capture_output=True, check=True).stdout
        return base64.b64encode(hashlib.sha256(spki).digest()).decode()


class CertAuthority:
    """A small CA made with the ``openssl`` binary (EC P-256: fast), and certificates it signs
    for servers and clients with the names a test connects by. Short-lived, in ``workdir``;
    private keys are written 0600."""

    def __init__(self, workdir: Path, name: str = "waiting-room test CA") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        slug = "".join(c if c.isalnum() else "-" for c in name)
        self.cert = self.dir / f"{slug}.pem"
        self.key = self.dir / f"{slug}.key"
        self._serial = 0
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-keyout", self.key, "-out", self.cert, "-days", "2", "-subj", f"/CN={name}",
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        os.chmod(self.key, 0o600)

    @staticmethod
    def _openssl(*args: object) -> None:
        if shutil.which("openssl") is None:
            raise RuntimeError("the openssl binary is missing (apt-get install openssl)")
        done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()[-500:]}")

    def issue(self, name: str, *, dns: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1", "::1"),
              client: bool = False, chain: bool = False) -> Issued:
        """A server certificate for these names (``client``: a client certificate named ``name``).
        ``chain``: the CA's certificate follows it in the file, as a server would send it."""
        self._serial += 1
        slug = "".join(c if c.isalnum() else "-" for c in name)
        key, csr, cert = self.dir / f"{slug}.key", self.dir / f"{slug}.csr", self.dir / f"{slug}.pem"
        ext = self.dir / f"{slug}.ext"
        sans = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
        lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
                 f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}"]
        if sans and not client:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        self._openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        os.chmod(key, 0o600)
        self._openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
                      "-set_serial", str(1000 + self._serial), "-days", "2", "-out", cert, "-extfile", ext)
        if chain:
            cert.write_text(cert.read_text() + self.cert.read_text())
        return Issued(cert, key)


# -- mosquitto ------------------------------------------------------------------------------


class Broker:
    """A mosquitto of our own. ``restart()`` keeps the port; retained messages survive it only
    with ``persistence`` (saved on a clean stop, as a broker's reboot would)."""

    BASE = "listener {port} 127.0.0.1\nallow_anonymous true\n"
    # For measuring: the broker's own sockets send small packets at once (no Nagle), and a
    # QoS 0 message is never dropped because a probe lags (0 = unlimited queues).
    TUNED = "set_tcp_nodelay true\nmax_queued_messages 0\nmax_queued_bytes 0\n"

    def __init__(self, workdir: Path, *, tuned: bool = False, persistence: bool = False,
                 tls: Issued | None = None, ca: Path | None = None, require_certificate: bool = False,
                 users: dict[str, str] | None = None, extra: str = "") -> None:
        """``tls``: the listener speaks TLS only, with this server certificate; ``ca`` and
        ``require_certificate``: clients must present a certificate issued by that CA.
        ``users``: name -> password (a mosquitto password file); anonymous clients refused.
        ``extra``: more configuration lines (a bridge's ``connection`` block, say)."""
        self.workdir = workdir
        self.port = free_port()
        self.tuned = tuned
        self.persistence = persistence
        self.tls = tls
        self.ca = ca
        self.require_certificate = require_certificate
        self.users = users
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.log_path = workdir / "mosquitto.log"

    def version(self) -> str:
        try:
            out = subprocess.run([self.exe, "-h"], capture_output=True, text=True, timeout=5, check=False)
            return (out.stdout or out.stderr).splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    def _conf(self) -> str:
        conf = self.BASE.format(port=self.port)
        if self.users is not None:
            passwords = self.workdir / "mosquitto.passwd"
            passwords.write_text("")
            passwords.chmod(0o600)
            for name, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwords), name, password], check=True,
                               capture_output=True)
            conf = conf.replace("allow_anonymous true", "allow_anonymous false") + f"password_file {passwords}\n"
        if self.tls is not None:
            conf += f"certfile {self.tls.cert}\nkeyfile {self.tls.key}\n"
            if self.ca is not None:
                conf += f"cafile {self.ca}\n"
            conf += f"require_certificate {'true' if self.require_certificate else 'false'}\n"
        if (self.tls is not None or self.users is not None) and os.geteuid() == 0:
            # mosquitto started as root drops to its own user before reading these files,
            # which live in the test's private (0700) directory.
            conf += "user root\n"
        if self.persistence:
            conf += f"persistence true\npersistence_location {self.workdir}/\nautosave_interval 0\n"
        else:
            conf += "persistence false\n"
        return conf + (self.TUNED if self.tuned else "") + self.extra

    def start(self) -> None:
        if not os.path.exists(self.exe):
            raise RuntimeError("mosquitto is not installed: run scripts/setup (or apt-get install mosquitto)")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self._conf())
        with open(self.log_path, "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log)
        wait_listening(self.port, self.proc, "mosquitto", self.log_path)

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


# -- a NATS cluster with its MQTT gateway ----------------------------------------------------


class NatsCluster:
    """``size`` nats-server nodes in one cluster, each on its own free loopback ports (client,
    cluster route, MQTT, monitoring), with its own config and JetStream store directory:
    never the machine's NATS on 4222. JetStream is on (NATS keeps MQTT sessions and retained
    messages in streams) and the MQTT streams are replicated on ``size`` nodes, so that they
    survive the loss of one. ``kill(i)`` is SIGKILL; ``start_node(i)`` brings a node back
    with its store, to catch up from the others.
    """

    def __init__(self, workdir: Path, size: int = 3, name: str = "waiting-room-test") -> None:
        self.workdir = workdir
        self.size = size
        self.name = name
        self.exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.client_ports = [free_port() for _ in range(size)]
        self.route_ports = [free_port() for _ in range(size)]
        self.mqtt_ports = [free_port() for _ in range(size)]
        self.http_ports = [free_port() for _ in range(size)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size

    @property
    def hosts(self) -> list[str]:
        """Every node's MQTT listener, as ``mqtt.hosts`` takes them."""
        return [f"127.0.0.1:{port}" for port in self.mqtt_ports]

    def log_path(self, i: int) -> Path:
        return self.workdir / f"nats-{i}.log"

    def version(self) -> str:
        try:
            out = subprocess.run([self.exe, "--version"], capture_output=True, text=True, timeout=5, check=False)
            return out.stdout.strip() or "unknown"
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"

    def _conf(self, i: int) -> str:
        routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in self.route_ports)
        store = self.workdir / f"nats-{i}-store"
        return (
            f"server_name: n{i}\n"
            f"listen: 127.0.0.1:{self.client_ports[i]}\n"
            f"http: 127.0.0.1:{self.http_ports[i]}\n"
            f'jetstream {{ store_dir: "{store}" }}\n'
            f"cluster {{ name: {self.name}, listen: 127.0.0.1:{self.route_ports[i]}, routes: [{routes}] }}\n"
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_ports[i]}, stream_replicas: {self.size} }}\n"
        )

    def start_node(self, i: int) -> None:
        conf = self.workdir / f"nats-{i}.conf"
        conf.write_text(self._conf(i))
        with open(self.log_path(i), "ab") as log:
            self.procs[i] = subprocess.Popen([self.exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)

    def start(self, timeout: float = 30.0) -> None:
        if not os.path.exists(self.exe):
            raise RuntimeError("nats-server is not installed: run scripts/setup (or apt-get install nats-server)")
        for i in range(self.size):
            self.start_node(i)
        for i in range(self.size):
            self.wait_ready(i, timeout)

    def wait_ready(self, i: int, timeout: float = 30.0) -> None:
        """The node listens for MQTT and its /healthz says JetStream is current (a meta
        leader is known and its streams caught up)."""
        proc = self.procs[i]
        assert proc is not None
        wait_listening(self.mqtt_ports[i], proc, f"nats-server n{i}", self.log_path(i), timeout)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"nats-server n{i} exited: {self.log_path(i).read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.http_ports[i]), 1) as s:
                    s.sendall(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                    s.settimeout(2)
                    last = b"".join(iter(lambda: s.recv(4096), b"")).decode(errors="replace")
                if " 200 " in last.split("\r\n", 1)[0] and '"ok"' in last:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"nats-server n{i} not ready (JetStream): {last[-300:]}")

    def kill(self, i: int) -> None:
        """SIGKILL: the node vanishes without a goodbye to its clients or its peers."""
        proc = self.procs[i]
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self.procs[i] = None

    def alive(self, i: int) -> bool:
        proc = self.procs[i]
        return proc is not None and proc.poll() is None

    def stop(self) -> None:
        for proc in self.procs:
            terminate(proc)
        self.procs = [None] * self.size


# -- the daemon -----------------------------------------------------------------------------


class Daemon:
    """``python -m waiting_room run`` (or another launcher module) as a child process.

    Its output goes to ``<name>.log``, appended across restarts (a crash-restart loop keeps
    the whole story). Signals are an operator's and systemd's: stop, kill, SIGSTOP/SIGCONT,
    SIGHUP.
    """

    def __init__(self, workdir: Path, name: str, config: dict[str, Any], *, module: str = "waiting_room") -> None:
        self.workdir = workdir
        self.name = name
        self.config_path = workdir / f"{name}.yaml"
        self.write_config(config)
        self.log_path = workdir / f"{name}.log"
        self.module = module
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_ns = 0
        self.preexec = None

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)  # a reload never reads half a file

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "daemon"), str(ROOT)])}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy
            self.started_ns = time.monotonic_ns()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                preexec_fn=self.preexec,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a power cut would: no goodbye, the will fires."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            self.proc.wait()

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        return memory_kb(self.pid)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            terminate(self.proc)
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


# -- a forward HTTP proxy ----------------------------------------------------------------------


class Tinyproxy:
    """Debian's tinyproxy on a free loopback port, with a config and a log of its own.

    ``connect_ports`` empty: CONNECT to any port (the proxy carries WebSocket upgrades); e.g.
    ``(443,)``: CONNECT elsewhere is refused with 403, as many site proxies do (it breaks the
    socket to a queue server on another port while plain HTTP GETs pass). ``requests()`` are
    the request lines it logged ("CONNECT 127.0.0.1:8765", "GET http://...").
    """

    def __init__(self, workdir: Path, *, connect_ports: tuple[int, ...] = ()) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.connect_ports = connect_ports
        self.proc: subprocess.Popen[bytes] | None = None
        self.exe = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
        self.log_path = workdir / "tinyproxy.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _conf(self) -> str:
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            f'LogFile "{self.log_path}"',
            "LogLevel Connect",  # each connection and request line
            f'PidFile "{self.workdir}/tinyproxy.pid"',
            "MaxClients 50",
            "Allow 127.0.0.1",
        ]
        lines += [f"ConnectPort {port}" for port in self.connect_ports]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        if not os.path.exists(self.exe):
            raise RuntimeError("tinyproxy is not installed: run scripts/setup (or apt-get install tinyproxy)")
        conf = self.workdir / "tinyproxy.conf"
        conf.write_text(self._conf())
        stderr = self.workdir / "tinyproxy.stderr"
        with open(stderr, "ab") as err:
            self.proc = subprocess.Popen([self.exe, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=err)
        wait_listening(self.port, self.proc, "tinyproxy", stderr)

    def stop(self) -> None:
        terminate(self.proc)

    def requests(self) -> list[str]:
        """"METHOD target" of every request it logged, in order."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            _, sep, rest = line.partition("]: Request (file descriptor ")
            if sep:
                request = rest.partition("): ")[2]
                out.append(request.rsplit(" HTTP/", 1)[0])
        return out


# -- a real Home Assistant ---------------------------------------------------------------------


HA_VERSION = "2024.3.3"


def home_assistant_venv() -> Path | None:
    """The venv scripts/install-ha-test-deps made (the same places, in the same order), when
    its install finished; else None."""
    candidates = [os.environ.get("WAITING_ROOM_HA_VENV"), "/var/cache/waiting-room-tests/ha-2024.3",
                  str(ROOT / ".cache" / "ha-2024.3")]
    for candidate in candidates:
        if candidate and (Path(candidate) / f".installed-{HA_VERSION}").exists():
            return Path(candidate)
    return None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_jwt(claims: dict[str, Any], key: str) -> str:
    """A JSON Web Token signed with HMAC-SHA256, as Home Assistant's access tokens are."""
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(key.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(signature)}"


class HomeAssistant:
    """Home Assistant itself (``hass`` from scripts/install-ha-test-deps' venv) with a minimal
    configuration of its own on a free loopback port: onboarding done, an owner whose
    long-lived access token (``token``) the test made itself in ``.storage/auth``, the REST
    and websocket APIs and the frontend, no YAML for MQTT (``add_mqtt`` goes through the
    integration's config flow, as a user does), no recorder, nothing that phones home.
    It starts with ``--skip-pip``: it installs nothing at run time."""

    def __init__(self, workdir: Path, venv: Path) -> None:
        self.dir = workdir / "home-assistant"
        self.venv = venv
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "home-assistant.log"
        self.token = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        storage = self.dir / ".storage"
        storage.mkdir(parents=True, exist_ok=True)
        (self.dir / "configuration.yaml").write_text(yaml.safe_dump({
            "homeassistant": {"name": "Hospital", "latitude": 23.81, "longitude": 90.41, "elevation": 10,
                              "unit_system": "metric", "time_zone": "UTC", "country": "BD", "currency": "BDT"},
            "http": {"server_host": "127.0.0.1", "server_port": self.port},
            "api": None, "config": None, "frontend": None,
            "logger": {"default": "warning"},
        }))

        def store(key: str, data: object, version: int = 1) -> None:
            doc = {"version": version, "minor_version": 1, "key": key, "data": data}
            (storage / key).write_text(json.dumps(doc))

        store("onboarding", {"done": ["user", "core_config", "analytics", "integration"]}, version=4)
        user, token_id, jwt_key = uuid.uuid4().hex, uuid.uuid4().hex, secrets.token_hex(64)
        now = time.time()
        store("auth", {
            "users": [{"id": user, "group_ids": ["system-admin"], "is_owner": True, "is_active": True,
                       "name": "waiting-room tests", "system_generated": False, "local_only": False}],
            "groups": [{"id": "system-admin", "name": "Administrators"}, {"id": "system-users", "name": "Users"},
                       {"id": "system-read-only", "name": "Read Only"}],
            "credentials": [],
            "refresh_tokens": [{
                "id": token_id, "user_id": user, "client_id": None, "client_name": "waiting-room tests",
                "client_icon": None, "token_type": "long_lived_access_token",
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now)),
                "access_token_expiration": 86400.0, "token": secrets.token_hex(64), "jwt_key": jwt_key,
                "last_used_at": None, "last_used_ip": None, "expire_at": None, "credential_id": None,
                "version": HA_VERSION,
            }],
        })
        self.token = hs256_jwt({"iss": token_id, "iat": int(now) - 5, "exp": int(now) + 86400}, jwt_key)

    def start(self) -> None:
        hass = self.venv / "bin" / "hass"
        if not hass.exists():
            raise RuntimeError(f"{hass} is missing: run scripts/install-ha-test-deps")
        if self.proc is None:
            self._write_config()
        with open(self.dir / "home-assistant.stderr", "ab") as err:
            self.proc = subprocess.Popen(
                [str(hass), "-c", str(self.dir), "--skip-pip", "--log-file", str(self.log_path), "--log-no-color"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        wait_listening(self.port, self.proc, "Home Assistant", self.dir / "home-assistant.stderr", limit=120)

    def stop(self) -> None:
        terminate(self.proc, grace=30)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def rest(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        """One REST API call with the token: (status, the JSON answer or None)."""
        import httpx

        async with httpx.AsyncClient(base_url=self.url, timeout=30, trust_env=False) as client:
            response = await client.request(method, path, json=body,
                                            headers={"Authorization": f"Bearer {self.token}"})
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None

    async def ws(self, *commands: dict[str, Any]) -> list[Any]:
        """Websocket API commands (``{"type": "config/device_registry/list"}``, ...): their results."""
        from websockets.asyncio.client import connect

        async with connect(f"ws://127.0.0.1:{self.port}/api/websocket", max_size=None, proxy=None) as ws:
            await ws.recv()  # auth_required
            await ws.send(json.dumps({"type": "auth", "access_token": self.token}))
            answer = json.loads(await ws.recv())
            if answer.get("type") != "auth_ok":
                raise RuntimeError(f"Home Assistant refused the token: {answer}")
            results = []
            for number, command in enumerate(commands, 1):
                await ws.send(json.dumps({**command, "id": number}))
                while True:
                    message = json.loads(await ws.recv())
                    if message.get("id") == number and message.get("type") == "result":
                        break
                if not message.get("success"):
                    raise RuntimeError(f"{command['type']}: {message.get('error')}")
                results.append(message["result"])
            return results

    async def add_mqtt(self, broker_port: int) -> None:
        """The MQTT integration, set up as a user does it in the UI: its config flow, pointed
        at the test's broker (discovery on, with its default prefix and birth message)."""
        status, flow = await self.rest("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
        if status != 200 or flow.get("type") != "form":
            raise RuntimeError(f"mqtt config flow: HTTP {status}: {flow}")
        status, done = await self.rest("POST", f"/api/config/config_entries/flow/{flow['flow_id']}",
                                       {"broker": "127.0.0.1", "port": broker_port})
        if status != 200 or done.get("type") != "create_entry":
            raise RuntimeError(f"mqtt config flow: HTTP {status}: {done}")
