"""tls.py: contexts from the config, one-line errors for unusable files, the handshake
failures described; then the real parts: the simulator behind TLS (a test CA made in the test),
mosquitto with a TLS listener and ``require_certificate``, a wrong CA refused."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from waiting_room import tls
from waiting_room.config import parse_config
from waiting_room.tls import TlsError

ROOT = Path(__file__).resolve().parent.parent


def one_line(message: str, key: str) -> None:
    assert "\n" not in message, message
    assert message.startswith(f"{key}: "), message


# -- contexts -------------------------------------------------------------------------------


def test_client_context_verifies_always(pki):
    ctx = tls.client_context(str(pki.ca.cert), str(pki.client.cert), str(pki.client.key))
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert len(ctx.get_ca_certs()) == 1  # the named CA instead of the system's, not beside it


def test_client_context_without_a_ca_uses_the_system_store():
    ctx = tls.client_context()
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname


def test_server_context(pki):
    ctx = tls.server_context(str(pki.server_chain.cert), str(pki.server_chain.key))
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_contexts_from_the_config(pki):
    config = parse_config({
        "upstream": {"url": "wss://localhost/ws", "token": "t", "ca_file": str(pki.ca.cert),
                     "cert_file": str(pki.client.cert), "key_file": str(pki.client.key)},
        "rooms": [{"id": "a"}],
        "mqtt": {"ca_file": str(pki.ca.cert)},
        "display": {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key)},
    })
    assert tls.upstream_context(config.upstream).check_hostname
    assert tls.mqtt_context(config.mqtt) is not None
    assert tls.display_context(config.display) is not None
    tls.check(config)
    plain = parse_config({"upstream": {"url": "ws://localhost/ws", "token": "t"}, "rooms": [{"id": "a"}]})
    assert tls.mqtt_context(plain.mqtt) is None and tls.display_context(plain.display) is None
    tls.check(plain)


# -- unusable files: one line naming the key and the file, never the content -------------------


@pytest.fixture
def files(tmp_path, pki):
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not PEM\n")
    der = tmp_path / "cert.der"
    subprocess.run(["openssl", "x509", "-in", str(pki.client.cert), "-outform", "DER", "-out", str(der)], check=True)
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.client.key), "-aes256", "-passout", "pass:secret",
                    "-out", str(encrypted)], check=True)
    return {"missing": str(tmp_path / "nope.pem"), "junk": str(junk), "der": str(der), "dir": str(tmp_path),
            "encrypted": str(encrypted)}


@pytest.mark.parametrize(
    ("ca", "cert", "key", "words", "key_name"),
    [
        ("missing", None, None, "No such file", "upstream.ca_file"),
        ("junk", None, None, "not a PEM file", "upstream.ca_file"),
        ("der", None, None, "not a PEM file", "upstream.ca_file"),
        ("dir", None, None, "directory", "upstream.ca_file"),
        ("client.key", None, None, "no certificate in it", "upstream.ca_file"),
        (None, "missing", "client.key", "No such file", "upstream.cert_file"),
        (None, "client.cert", "missing", "No such file", "upstream.key_file"),
        (None, "junk", "client.key", "not a PEM file", "upstream.cert_file"),
        (None, "client.cert", "junk", "not a PEM file", "upstream.key_file"),
        (None, "client.key", "client.key", "no certificate in it", "upstream.cert_file"),
        (None, "client.cert", "client.cert", "no private key in it", "upstream.key_file"),
        (None, "client.cert", "server.key", "does not match the certificate", "upstream.key_file"),
        (None, "client.cert", "encrypted", "passphrase", "upstream.key_file"),
    ],
)
def test_unusable_files_are_one_line_naming_the_key(pki, files, ca, cert, key, words, key_name):
    def path(name):
        if name is None:
            return None
        if name in files:
            return files[name]
        who, _, part = name.partition(".")
        return str(getattr(getattr(pki, who), part))

    with pytest.raises(TlsError) as info:
        tls.client_context(path(ca), path(cert), path(key), section="upstream")
    message = str(info.value).replace("no a ", "no a ")
    one_line(message, key_name)
    assert words.replace("no a ", "no a ") in message.replace("no certificate in it", "no certificate in it"), message
    assert "PRIVATE KEY" not in message and "BEGIN" not in message.replace("-----BEGIN and", "")


def test_the_key_content_is_never_in_an_error(pki, tmp_path):
    key_text = pki.client.key.read_text()
    secret_line = key_text.splitlines()[1]
    for cert, key in ((pki.client.key, pki.client.key), (pki.client.cert, pki.server.key)):
        with pytest.raises(TlsError) as info:
            tls.client_context(None, str(cert), str(key))
        assert secret_line not in str(info.value) and secret_line not in repr(info.value)


def test_display_and_mqtt_errors_name_their_section(pki, files):
    with pytest.raises(TlsError) as info:
        tls.server_context(files["missing"], str(pki.server.key), section="display")
    one_line(str(info.value), "display.cert_file")
    with pytest.raises(TlsError) as info:
        tls.client_context(files["junk"], section="mqtt")
    one_line(str(info.value), "mqtt.ca_file")


def test_check_prefixes_the_config_file(files):
    config = parse_config({"upstream": {"url": "wss://x/ws", "token": "t", "ca_file": files["missing"]},
                           "rooms": [{"id": "a"}]})
    with pytest.raises(TlsError) as info:
        tls.check(config, "/etc/waiting-room/config.yaml")
    one_line(str(info.value), "/etc/waiting-room/config.yaml: upstream.ca_file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key(pki, tmp_path):
    key = tmp_path / "key.pem"
    key.write_bytes(pki.client.key.read_bytes())
    key.chmod(0)
    with pytest.raises(TlsError) as info:
        tls.client_context(None, str(pki.client.cert), str(key))
    assert "Permission denied" in str(info.value)


def test_waiting_room_check_exits_2_with_the_line(tmp_path, pki):
    config = tmp_path / "config.yaml"
    config.write_text(
        "upstream: {url: 'wss://localhost/ws', token: t}\nrooms: [{id: a}]\n"
        f"display: {{cert_file: '{pki.server.cert}', key_file: '{pki.client.key}'}}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "daemon")}
    for command in ("check", "run"):
        done = subprocess.run([sys.executable, "-m", "waiting_room", command, "--config", str(config)],
                              capture_output=True, text=True, timeout=30, env=env)
        assert done.returncode == 2, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(f"{config}: display.key_file: {pki.client.key}: does not match"), lines[0]


# -- Cached: a renewed certificate is used from the next connection -----------------------------


def test_cached_context_is_rebuilt_when_a_file_changes(pki, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca.cert.read_bytes())
    built = []

    def build():
        built.append(1)
        return tls.client_context(str(ca))

    cached = tls.Cached(build, [str(ca), None])
    first = cached.get()
    assert cached.get() is first and len(built) == 1
    ca.write_bytes(pki.ca.cert.read_bytes() + pki.rogue.cert.read_bytes())
    second = cached.get()
    assert second is not first and len(second.get_ca_certs()) == 2


# -- handshake failures, described --------------------------------------------------------------


def _verify_error(message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    exc.verify_message = message
    exc.reason = "CERTIFICATE_VERIFY_FAILED"
    return exc


def _ssl_error(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    exc.reason = reason
    return exc


def _wrapped(inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except Exception:
            raise RuntimeError("did not receive a valid HTTP response") from None  # context kept
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "detail", "lasting"),
    [
        (_verify_error("self-signed certificate"), "TLS certificate not trusted: self-signed certificate", True),
        (_verify_error("unable to get local issuer certificate"),
         "TLS certificate not trusted: unable to get local issuer certificate", True),
        (_verify_error("Hostname mismatch, certificate is not valid for 'x.example'."),
         "TLS certificate not trusted: Hostname mismatch, certificate is not valid for 'x.example'", True),
        (_wrapped(_verify_error("certificate has expired")), "TLS certificate not trusted: certificate has expired",
         True),
        (_wrapped(_ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED")),
         "TLS: the server requires a client certificate (mqtt.cert_file)", True),
        (_ssl_error("TLSV1_ALERT_UNKNOWN_CA"),
         "TLS: the server does not trust our client certificate (mqtt.cert_file): unknown CA", True),
        (_ssl_error("WRONG_VERSION_NUMBER"),
         "TLS handshake failed: the server does not speak TLS on this port (wrong version number)", True),
        (_ssl_error("UNEXPECTED_EOF_WHILE_READING"), "TLS handshake failed: the server closed the connection (EOF)",
         False),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:2427)"),
         "TLS handshake failed: the server closed the connection (EOF)", False),
        (TlsError("mqtt.ca_file: /x: No such file or directory"), "mqtt.ca_file: /x: No such file or directory", True),
    ],
)
def test_describe_failure(exc, detail, lasting):
    assert tls.describe_failure(exc, "mqtt") == tls.Failure(detail, lasting)


def test_an_eof_right_after_a_refusal_is_that_refusal():
    # TLS 1.3: a reset can swallow the alert that refused our certificate; the EOF left is
    # the same refusal, neither news for the log nor a reason for a quick retry.
    refused = tls.describe_failure(_ssl_error("TLSV1_ALERT_UNKNOWN_CA"), "mqtt")
    eof = tls.describe_failure(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "mqtt")
    other = tls.describe_failure(_ssl_error("DECRYPTION_FAILED"), "mqtt")
    assert tls.same_refusal(refused, eof) is refused
    assert tls.same_refusal(None, eof) is eof  # an EOF alone is the network's
    assert tls.same_refusal(eof, eof) is eof
    assert tls.same_refusal(refused, other) is other
    assert tls.same_refusal(refused, None) is None  # e.g. connection refused: the broker went away


@pytest.mark.parametrize("exc", [OSError(111, "Connection refused"), TimeoutError(), ValueError("x")])
def test_not_a_tls_failure(exc):
    assert tls.describe_failure(exc) is None


# -- the upstream: the simulator behind TLS ----------------------------------------------------

import contextlib  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

from conftest import LogWatch, make_config, running, wait_store  # noqa: E402

from waiting_room.model import LinkStatus  # noqa: E402
from waiting_room.simulator import Simulator  # noqa: E402
from waiting_room.systemd import status_text  # noqa: E402


def server_ssl(issued, client_ca=None) -> ssl.SSLContext:
    """The simulator's side; ``client_ca``: a client certificate from it is required."""
    ctx = tls.server_context(str(issued.cert), str(issued.key), section="test")
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(client_ca))
    return ctx


@contextlib.asynccontextmanager
async def tls_simulator(context: ssl.SSLContext):
    sim = Simulator(rooms=("opd-1", "lab"), token="test-token", heartbeat=15, tick=0, seed=1,
                    initial_patients={"opd-1": 5, "lab": 2})
    await sim.start(ssl=context)
    try:
        yield sim
    finally:
        await sim.stop()


def upstream_tls(pki, client=None, ca=None) -> dict:
    keys = {"upstream__ca_file": str(ca or pki.ca.cert)}
    if client is not None:
        keys |= {"upstream__cert_file": str(client.cert), "upstream__key_file": str(client.key)}
    return keys


async def test_mutual_tls_required_and_satisfied(pki, broker):
    async with tls_simulator(server_ssl(pki.server_chain, client_ca=pki.ca.cert)) as sim:
        assert sim.url.startswith("wss://127.0.0.1:")
        async with running(make_config(sim.url, broker.port, **upstream_tls(pki, pki.client))) as app:
            await wait_store(app, lambda: app.store.link.status is LinkStatus.CONNECTED
                             and app.store.rooms["opd-1"].patients == 5)
            sim.set_queue("lab", 7)
            await wait_store(app, lambda: app.store.rooms["lab"].patients == 7)


async def test_an_https_snapshot_is_verified_with_the_upstream_ca_and_client_certificate(pki, broker):
    # The snapshot is the socket's other door: the same CA and client certificate apply.
    async with tls_simulator(server_ssl(pki.server_chain, client_ca=pki.ca.cert)) as sim:
        assert sim.snapshot_url.startswith("https://127.0.0.1:")
        sim.set_snapshot_poll(1)
        sim.break_upgrades("426")
        fallback = {"url": sim.snapshot_url, "interval": 1, "after": 0.2}
        config = make_config(sim.url, broker.port, upstream__fallback=fallback, **upstream_tls(pki, pki.client))
        async with running(config) as app:
            await wait_store(app, lambda: app.store.link.status is LinkStatus.DEGRADED
                             and app.store.rooms["opd-1"].patients == 5)
            assert sim.snapshot_requests["served"] >= 1


async def test_a_renewed_client_certificate_is_used_from_the_next_connection(pki, broker, tmp_path):
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(pki.rogue_client.cert.read_bytes())
    key.write_bytes(pki.rogue_client.key.read_bytes())
    keys = upstream_tls(pki) | {"upstream__cert_file": str(cert), "upstream__key_file": str(key)}
    async with tls_simulator(server_ssl(pki.server, client_ca=pki.ca.cert)) as sim:
        async with running(make_config(sim.url, broker.port, **keys)) as app:
            await wait_store(app, lambda: bool(app.store.link.detail))  # refused: an untrusted client
            assert app.store.link.status is not LinkStatus.CONNECTED
            key.write_bytes(pki.client.key.read_bytes())  # renewed in place, as certbot would
            cert.write_bytes(pki.client.cert.read_bytes())
            await wait_store(app, lambda: app.store.link.status is LinkStatus.CONNECTED, timeout=10)


@pytest.mark.parametrize(
    ("served", "detail"),
    [
        ("self_signed", "TLS certificate not trusted: self-signed certificate"),
        ("rogue_server", "TLS certificate not trusted: unable to get local issuer certificate"),
        ("wrong_host", "TLS certificate not trusted: IP address mismatch, certificate is not valid for '127.0.0.1'"),
    ],
)
async def test_an_untrusted_server_is_one_clear_line_retried_at_the_maximum(pki, broker, served, detail):
    async with tls_simulator(server_ssl(getattr(pki, served))) as sim, LogWatch("waiting_room.upstream") as logs:
        config = make_config(sim.url, broker.port, **upstream_tls(pki, pki.client))
        maximum = float(config.upstream.backoff.max)
        async with running(config) as app:

            def attempts() -> list[logging.LogRecord]:
                return [r for r in logs.records if detail in r.getMessage()]

            await logs.wait(lambda: len(attempts()) >= 4, what=f"4 attempts failing with {detail!r}")
            link = app.store.link
            assert (link.status, link.detail) == (LinkStatus.DISCONNECTED, detail)
            assert link.retry_in is not None and link.retry_in >= maximum
            assert f"upstream down ({detail})" in status_text(app.store)
            records = attempts()
            # One line at ERROR, then the same failure at DEBUG only; never a tight loop.
            assert [r.levelno for r in records[:4]] == [logging.ERROR] + [logging.DEBUG] * 3, records
            assert "\n" not in records[0].getMessage()
            gaps = [b.created - a.created for a, b in zip(records, records[1:])]
            assert min(gaps) >= maximum * 0.9, gaps
            assert sim.connections == 0  # never got past TLS: no WebSocket, no token sent


async def test_a_server_requiring_a_client_certificate_refuses_one_without(pki, broker):
    async with tls_simulator(server_ssl(pki.server, client_ca=pki.ca.cert)) as sim:
        async with running(make_config(sim.url, broker.port, **upstream_tls(pki))) as app:
            await wait_store(app, lambda: bool(app.store.link.detail))
            assert app.store.link.status is LinkStatus.DISCONNECTED
            assert sim.connections == 0


# -- MQTT: mosquitto with a TLS listener and require_certificate -------------------------------

from conftest import Broker, watching  # noqa: E402


@pytest.fixture
def tls_broker(tmp_path, pki):
    b = Broker(tmp_path, tls=pki.server_chain, ca=pki.ca.cert, require_certificate=True)
    b.start()
    yield b
    b.stop()


@contextlib.asynccontextmanager
async def tls_watcher(broker, pki):
    """A subscriber to everything, itself with a client certificate."""
    context = tls.client_context(str(pki.ca.cert), str(pki.client.cert), str(pki.client.key), section="test")
    async with watching(broker.port, tls_context=context) as w:
        yield w


def mqtt_tls(pki, client=None, ca=None) -> dict:
    keys = {"mqtt__ca_file": str(ca or pki.ca.cert)}
    if client is not None:
        keys |= {"mqtt__cert_file": str(client.cert), "mqtt__key_file": str(client.key)}
    return keys


async def test_a_broker_requiring_client_certificates_is_reached(sim, tls_broker, pki):
    async with tls_watcher(tls_broker, pki) as watcher:
        async with running(make_config(sim.url, tls_broker.port, **mqtt_tls(pki, pki.client))) as app:
            await watcher.wait_topic("waiting-room/status", "online")
            await watcher.wait_topic("waiting-room/opd-1/patients", "5")
            assert app.store.components["mqtt"] == "connected"
        await watcher.wait_topic("waiting-room/status", "offline")


@pytest.mark.parametrize(
    ("ca", "client", "detail"),
    [
        ("rogue", "client", "TLS certificate not trusted: "),
        (None, None, "TLS: the server requires a client certificate (mqtt.cert_file)"),
        (None, "rogue_client", "TLS: the server does not trust our client certificate (mqtt.cert_file): unknown CA"),
    ],
)
async def test_a_broker_refusal_is_one_clear_line(sim, tls_broker, pki, ca, client, detail):
    keys = mqtt_tls(pki, getattr(pki, client) if client else None, pki.rogue.cert if ca else None)
    config = make_config(sim.url, tls_broker.port, **keys)
    started = time.time()  # LogRecord.created is wall-clock time
    async with LogWatch("waiting_room.mqtt") as logs, running(config) as app:

        def attempts() -> list[logging.LogRecord]:
            return [r for r in logs.records if r.name == "waiting_room.mqtt" and detail in r.getMessage()]

        await logs.wait(lambda: len(attempts()) >= 3, what=f"3 attempts failing with {detail!r}")
        records = attempts()
        assert [r.levelno for r in records[:3]] == [logging.ERROR, logging.DEBUG, logging.DEBUG], records
        # Refused at once, not after aiomqtt's 10 s wait for a CONNACK; then at the maximum.
        assert records[0].created - started < 5
        gaps = [b.created - a.created for a, b in zip(records, records[1:])]
        assert min(gaps) >= float(config.mqtt.backoff.max) * 0.9, gaps
        state = app.store.components["mqtt"]
        assert state.startswith("disconnected (") and detail in state
        assert detail in status_text(app.store)
