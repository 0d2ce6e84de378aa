"""Secrets: files other users can read are warned about at start and on reload, naming the
file and the fix; the upstream token, the MQTT password and the private keys never appear in
the logs (debug on), the exceptions they carry, MQTT, the pages, /healthz, the state file or
the process title, with TLS everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import signal
import ssl
from pathlib import Path

import aiomqtt
import pytest
import yaml
from conftest import Broker, eventually, make_config

from browser import http_get
from testsupport import Daemon
from waiting_room import secretfiles, tls
from waiting_room.app import App
from waiting_room.simulator import Simulator

# -- warnings ---------------------------------------------------------------------------------


def make(path: Path, mode: int, text: str = "secret\n") -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_private_files_get_no_warning(tmp_path):
    files = [("upstream.token_file", make(tmp_path / "token", 0o600)),
             ("config file", make(tmp_path / "config.yaml", 0o640))]
    assert secretfiles.warnings(files, own_gid=os.stat(tmp_path / "config.yaml").st_gid) == []


@pytest.mark.parametrize(
    ("what", "mode", "words"),
    [
        ("upstream.token_file", 0o644, "is readable by every user (mode 0644): chmod 600 {path}"),
        ("mqtt.key_file", 0o604, "is readable by every user (mode 0604): chmod 600 {path}"),
        ("display.key_file", 0o666, "is readable and writable by every user (mode 0666): chmod 600 {path}"),
        ("config file", 0o644, "(mode 0644): chmod 640 {path} and chgrp it to the daemon's group"),
    ],
)
def test_files_others_can_read_are_named_with_the_fix(tmp_path, what, mode, words):
    path = make(tmp_path / "secret", mode)
    lines = secretfiles.warnings([(what, path)])
    assert len(lines) == 1 and lines[0].startswith(f"{what} {path} is "), lines
    assert words.format(path=path) in lines[0], lines


@pytest.mark.skipif(os.geteuid() != 0, reason="chgrp to a foreign group needs root")
def test_group_access_is_fine_only_for_the_daemons_own_group(tmp_path):
    path = make(tmp_path / "token", 0o640)
    foreign = grp.getgrnam("nogroup").gr_gid if "nogroup" in {g.gr_name for g in grp.getgrall()} else 65534
    os.chown(path, 0, foreign)
    lines = secretfiles.warnings([("upstream.token_file", path)], own_gid=0)
    assert len(lines) == 1 and "by group " in lines[0] and f"chmod 600 {path}" in lines[0]
    assert secretfiles.warnings([("upstream.token_file", path)], own_gid=foreign) == []


def test_the_installed_layout_gets_no_warning(tmp_path):
    """scripts/install: the config 0640 root:waiting-room; the token 0600 root; credentials."""
    try:
        gid = grp.getgrnam(secretfiles.SERVICE_GROUP).gr_gid
    except KeyError:
        gid = None
    config = make(tmp_path / "config.yaml", 0o640)
    if gid is not None and os.geteuid() == 0:
        os.chown(config, 0, gid)
        assert secretfiles.warnings([("config file", config)], own_gid=12345) == []
    assert secretfiles.warnings([("config file", config)], own_gid=os.stat(config).st_gid) == []


def test_missing_files_and_credentials_are_not_this_checks_business(tmp_path):
    config = make_config("wss://localhost/ws", 1883, upstream__token=None, upstream__token_credential="upstream-token",
                         upstream__ca_file=str(tmp_path / "missing-ca.pem"))
    assert secretfiles.secret_files(config) == []
    assert secretfiles.warnings([("upstream.token_file", str(tmp_path / "nope"))]) == []


async def test_warned_at_start_and_on_reload(tmp_path, sim, broker, caplog):
    caplog.set_level(logging.WARNING, logger="waiting_room.app")
    token = make(tmp_path / "token", 0o644, "test-token\n")
    config_path = tmp_path / "config.yaml"
    data = {"upstream": {"url": sim.url, "token_file": token, "backoff": {"initial": 0.05, "max": 0.3}},
            "rooms": [{"id": "opd-1"}, {"id": "lab"}],
            "mqtt": {"port": broker.port, "client_id": "wr-secrets"}, "display": {"enabled": False}}
    config_path.write_text(yaml.safe_dump(data))
    config_path.chmod(0o600)

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if "chmod" in r.getMessage()]

    app = App(make_config(sim.url, broker.port, upstream__token=None, upstream__token_file=token), config_path=str(config_path))
    task = asyncio.create_task(app.run())
    try:
        await eventually(lambda: warned(), what="a warning about the token file")
        assert warned() == [f"upstream.token_file {token} is readable by every user (mode 0644): chmod 600 {token}"]
        os.chmod(token, 0o600)
        config_path.chmod(0o644)
        caplog.clear()
        app.request_reload()
        await eventually(lambda: warned(), what="a warning about the config file on reload")
        assert len(warned()) == 1 and warned()[0].startswith(f"config file {config_path} is readable by every user")
    finally:
        app.request_stop()
        async with asyncio.timeout(5):
            await task


# -- no leaks, with TLS everywhere and debug logging -------------------------------------------

UPSTREAM_TOKEN = "upstream-TOKEN-7f3c9a61e2b4"
ROTATED_TOKEN = "upstream-ROTATED-51d0c8aa93"
MQTT_PASSWORD = "mqtt-PASSWORD-c2e8b7f104"
WRONG_PASSWORD = "mqtt-WRONG-9a7b3c2d1e"


def key_lines(*paths: Path) -> list[str]:
    """The base64 body lines of private keys: any of them anywhere is a leak."""
    out = []
    for path in paths:
        out += [line for line in path.read_text().splitlines() if line and not line.startswith("-----")]
    return out


async def test_no_secret_leaks_anywhere(tmp_path, pki):
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    token_file = Path(make(secrets_dir / "token", 0o600, UPSTREAM_TOKEN + "\n"))
    password_file = Path(make(secrets_dir / "mqtt-password", 0o600, MQTT_PASSWORD + "\n"))
    display_token = Path(make(secrets_dir / "display-token", 0o600, "display-TOKEN-0b1c\n"))
    keys = key_lines(pki.client.key, pki.server_chain.key)
    secrets = [UPSTREAM_TOKEN, ROTATED_TOKEN, MQTT_PASSWORD, WRONG_PASSWORD, *keys]

    def leaks(text: str | bytes) -> list[str]:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        return [s[:12] + "..." for s in secrets if s in text]

    server = tls.server_context(str(pki.server_chain.cert), str(pki.server_chain.key), section="test")
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cafile=str(pki.ca.cert))
    sim = Simulator(rooms=("opd-1", "lab"), token=UPSTREAM_TOKEN, heartbeat=15, tick=0, seed=1,
                    initial_patients={"opd-1": 5, "lab": 2})
    await sim.start(ssl=server)
    broker = Broker(tmp_path, tls=pki.server_chain, ca=pki.ca.cert, require_certificate=True,
                    users={"wr": MQTT_PASSWORD, "watcher": "watcher-pw"})
    broker.start()
    display_port = 0
    config = {
        "upstream": {"url": sim.url, "token_file": str(token_file), "token_in": "query",
                     "ca_file": str(pki.ca.cert), "cert_file": str(pki.client.cert), "key_file": str(pki.client.key),
                     "backoff": {"initial": 0.05, "max": 0.3}, "token_check": 0.2},
        "rooms": [{"id": "opd-1", "name": "OPD 1"}, {"id": "lab"}],
        "mqtt": {"port": broker.port, "client_id": "wr-leaks", "username": "wr", "password_file": str(password_file),
                 "ca_file": str(pki.ca.cert), "cert_file": str(pki.client.cert), "key_file": str(pki.client.key),
                 "backoff": {"initial": 0.05, "max": 0.3}},
        "display": {"listen": f"127.0.0.1:{display_port}", "access_token_file": str(display_token),
                    "cert_file": str(pki.server_chain.cert), "key_file": str(pki.server_chain.key)},
        "state_dir": str(tmp_path / "state"),
        "log_level": "debug",
    }
    from testsupport import free_port
    config["display"]["listen"] = f"127.0.0.1:{free_port()}"
    display_port = int(config["display"]["listen"].rpartition(":")[2])
    daemon = Daemon(tmp_path, "leaks", config)
    daemon.config_path.chmod(0o600)
    watch_ctx = tls.client_context(str(pki.ca.cert), str(pki.client.cert), str(pki.client.key), section="test")
    seen: list[tuple[str, bytes]] = []
    try:
        daemon.start()
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="leak-watcher", username="watcher",
                                  password="watcher-pw", tls_context=watch_ctx) as client:
            await client.subscribe("#")

            async def pump() -> None:
                async for message in client.messages:
                    payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
                    seen.append((message.topic.value, payload))

            pumping = asyncio.create_task(pump())
            try:
                await eventually(lambda: ("waiting-room/opd-1/patients", b"5") in seen, timeout=20,
                                 what=f"opd-1 on MQTT; log: {daemon.log_tail()}")
                # Failure paths, whose messages and exceptions must not carry the secrets either:
                # a refused handshake, a token rotation with 4001, a wrong broker password.
                sim.refuse(401)
                await sim.close_all(4001)
                await eventually(lambda: "HTTP 401" in daemon.log_text(), timeout=10, what="a refused handshake")
                sim.set_token(ROTATED_TOKEN)
                token_file.write_text(ROTATED_TOKEN + "\n")
                sim.refuse(None)
                await sim.wait_until(lambda: sim.active >= 1, timeout=10)
                password_file.write_text(WRONG_PASSWORD + "\n")
                await asyncio.to_thread(broker.restart)
                await eventually(lambda: "Not authorized" in daemon.log_text() or "not authori" in daemon.log_text(),
                                 timeout=15, what="a refused broker login")
                password_file.write_text(MQTT_PASSWORD + "\n")
                daemon.signal(signal.SIGHUP)  # a reload reads the files again, and warns or not
                await eventually(lambda: "mqtt connected" in daemon.log_text().rsplit("Not authori", 1)[-1],
                                 timeout=15, what="the broker again")
            finally:
                pumping.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await pumping
        # What a browser, a monitor and the machine's users see.
        https = tls.client_context(str(pki.ca.cert), section="test")
        pages = [await http_get(display_port, path, ssl=https)
                 for path in ("/?token=display-TOKEN-0b1c", "/rooms/opd-1?token=display-TOKEN-0b1c", "/healthz",
                              "/rooms/opd-1", "/static/display.js")]
        assert pages[0][0] == 200 and pages[2][0] == 200
        with open(f"/proc/{daemon.pid}/cmdline", "rb") as f:
            cmdline = f.read()
        state_dir = tmp_path / "state"
        await eventually(lambda: (state_dir / "state.json").exists(), timeout=10, what="the state file")
    finally:
        daemon.stop()
        broker.stop()
        await sim.stop()
    log_text = daemon.log_text()
    assert "DEBUG" in log_text or "debug" in log_text.lower()
    assert "Traceback" not in log_text, daemon.log_tail(40)
    assert leaks(log_text) == [], "in the daemon's log"
    assert leaks(b"".join(t.encode() + p for t, p in seen)) == [], "on MQTT"
    for status, headers, body in pages:
        assert leaks(body) == [] and leaks(json.dumps(headers)) == [], "in a page or /healthz"
    assert leaks(cmdline) == [], "in the process title"
    assert leaks((state_dir / "state.json").read_bytes()) == [], "in the state file"
    assert not [p for p in state_dir.iterdir() if leaks(p.read_bytes())]
