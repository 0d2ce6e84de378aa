"""The display over HTTPS (display.cert_file + key_file): pages, /ws and /healthz over TLS with
a test CA made in the test; TLS connections counted from their accept; `waiting-room status`
over https; Chromium on the pages, trusting the test certificate."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import uvloop
from websockets.asyncio.client import connect

from browser import CHROMIUM, CHROMIUM_ARGS, http_get, require_browser, serving, wait_patients, wait_state
from conftest import eventually
from waiting_room import tls
from waiting_room.config import DisplayConfig, RoomConfig
from waiting_room.model import LinkStatus
from waiting_room.store import RoomStore

ROOT = Path(__file__).resolve().parent.parent

ROOMS = [RoomConfig(id="opd-1", name="OPD 1"), RoomConfig(id="lab", name="Laboratory")]


def https_display(pki, **kw: object) -> DisplayConfig:
    return DisplayConfig(listen="127.0.0.1:0", cert_file=str(pki.server_chain.cert),  # type: ignore[arg-type]
                         key_file=str(pki.server_chain.key), **kw)


def live_store() -> RoomStore:
    store = RoomStore((r.id, r.title) for r in ROOMS)
    store.set_link(LinkStatus.CONNECTED, "")
    store.set_component("mqtt", "connected")
    store.apply_queue("opd-1", 5, "A-1", None, 1)
    return store


def trusting(pki) -> ssl.SSLContext:
    return tls.client_context(str(pki.ca.cert), section="test")


async def test_pages_ws_and_healthz_over_https(pki):
    async with serving(https_display(pki, access_token="display-secret"), ROOMS, live_store()) as svc:
        assert svc.url == f"https://127.0.0.1:{svc.port}/"
        context = trusting(pki)
        status, headers, body = await http_get(svc.port, "/healthz", ssl=context)
        assert status == 200, body
        doc = json.loads(body)
        assert doc["status"] == "ok" and doc["tls"]["failed_handshakes"] == 0
        status, _, body = await http_get(svc.port, "/rooms/opd-1?token=display-secret", ssl=context)
        assert status == 200 and b"OPD 1" in body
        status, _, _ = await http_get(svc.port, "/rooms/opd-1", ssl=context)
        assert status == 401
        origin = f"https://127.0.0.1:{svc.port}"
        async with connect(f"wss://127.0.0.1:{svc.port}/ws?room=opd-1&token=display-secret", ssl=context,
                           origin=origin) as ws:  # type: ignore[arg-type]
            async with asyncio.timeout(5):
                frames = [json.loads(await ws.recv()) for _ in range(2)]
            assert frames[0]["type"] == "hello"
            assert any(r["patients"] == 5 for r in frames[1]["rooms"])


async def test_a_client_that_does_not_trust_the_certificate_gets_nothing(pki):
    async with serving(https_display(pki), ROOMS, live_store()) as svc:
        with pytest.raises(ssl.SSLCertVerificationError):
            await http_get(svc.port, "/healthz", ssl=tls.client_context(str(pki.rogue.cert), section="test"))


async def test_plain_http_on_the_https_port_is_refused_counted_and_logged(pki, caplog):
    async with serving(https_display(pki), ROOMS, live_store()) as svc:
        status, _, body = await http_get(svc.port, "/healthz")
        assert status == 0 and b"patients" not in body  # no HTTP answer in clear
        context = trusting(pki)

        async def failures() -> int:
            return json.loads((await http_get(svc.port, "/healthz", ssl=context))[2])["tls"]["failed_handshakes"]

        async def failed_once() -> bool:
            return await failures() >= 1

        await eventually(failed_once, 5, "the failed handshake counted")
        assert any("TLS handshake with 127.0.0.1 failed: HTTP_REQUEST (a page opened with http:// on the https:// "
                   "port?)" in r.getMessage() for r in caplog.records)


async def test_tls_connections_are_counted_from_the_accept(pki):
    """A client that opens TCP and never starts TLS holds a counted connection (the display
    limits hold for TLS too) until it goes away."""
    async with serving(https_display(pki), ROOMS, live_store()) as svc:
        context = trusting(pki)

        async def open_now() -> int:
            doc = json.loads((await http_get(svc.port, "/healthz", ssl=context))[2])
            return doc["open_connections"] - 1  # not counting this request

        assert await open_now() == 0
        idle = [await asyncio.open_connection("127.0.0.1", svc.port) for _ in range(5)]
        async def counted(n: int) -> bool:
            return await open_now() == n

        await eventually(lambda: counted(5), 5, "5 idle connections counted")
        doc = json.loads((await http_get(svc.port, "/healthz", ssl=context))[2])
        assert doc["tls"]["handshakes"] == 5
        for _, writer in idle:
            writer.transport.abort()
        await eventually(lambda: counted(0), 5, "the aborted connections no longer counted")
        stranded = [await asyncio.open_connection("127.0.0.1", svc.port) for _ in range(3)]
        await eventually(lambda: counted(3), 5, "3 more idle connections counted")
    # The service stopped with those handshakes under way: aborted, and uncounted too.
    assert svc.limits.open == 0 and not svc._tls.pending
    for reader, writer in stranded:
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


def _status(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "daemon")}
    return subprocess.run([sys.executable, "-m", "waiting_room", "status", *args], capture_output=True, text=True,
                          timeout=30, env=env)


async def test_waiting_room_status_over_https(pki, tmp_path):
    async with serving(https_display(pki), ROOMS, live_store()) as svc:
        url = f"https://127.0.0.1:{svc.port}"
        done = await asyncio.to_thread(_status, "--url", url, "--ca-file", str(pki.ca.cert))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"waiting-room at {url}: healthy")
        # Without the CA: the certificate is not trusted, and it says so.
        done = await asyncio.to_thread(_status, "--url", url)
        assert done.returncode == 3 and "certificate" in done.stderr, done.stderr
        # From the daemon's own config: https, and its certificate trusted.
        config = tmp_path / "config.yaml"
        config.write_text(
            "upstream: {url: 'wss://localhost/ws', token: t}\nrooms: [{id: opd-1}, {id: lab}]\n"
            f"display: {{listen: '0.0.0.0:{svc.port}', cert_file: '{pki.server_chain.cert}', "
            f"key_file: '{pki.server_chain.key}'}}\n"
        )
        done = await asyncio.to_thread(_status, "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"waiting-room at https://127.0.0.1:{svc.port}: healthy")


# -- Chromium on the HTTPS pages ------------------------------------------------------------


async def test_chromium_shows_the_https_pages_trusting_the_test_certificate(pki):
    """Headless Chromium trusts the display's certificate by its public key
    (``--ignore-certificate-errors-spki-list``), as a kiosk would trust the site's CA; the page
    and its wss:// push channel work, and the token travels only inside TLS."""
    require_browser()
    from playwright.async_api import async_playwright

    store = live_store()
    async with serving(https_display(pki, access_token="display-secret"), ROOMS, store) as svc:
        executable = CHROMIUM if os.path.exists(CHROMIUM) else "chromium"
        spki = pki.server_chain.spki_sha256()
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=executable, timeout=30_000,
                args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki}"],
            )
            try:
                page = await browser.new_page()
                response = await page.goto(f"https://127.0.0.1:{svc.port}/rooms/opd-1?token=display-secret")
                assert response is not None and response.status == 200
                security = await response.security_details()
                assert security is not None and security.get("protocol", "").startswith("TLS")
                await wait_state(page, "opd-1", "live")
                await wait_patients(page, "opd-1", "5")
                store.apply_queue("opd-1", 8, "A-2", None, 2)
                await wait_patients(page, "opd-1", "8")
            finally:
                await browser.close()


async def test_chromium_refuses_the_pages_without_trust(pki):
    require_browser()
    from playwright.async_api import async_playwright

    async with serving(https_display(pki), ROOMS, live_store()) as svc:
        executable = CHROMIUM if os.path.exists(CHROMIUM) else "chromium"
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=30_000)
            try:
                page = await browser.new_page()
                with pytest.raises(Exception, match="ERR_CERT_AUTHORITY_INVALID"):
                    await page.goto(f"https://127.0.0.1:{svc.port}/rooms/opd-1")
            finally:
                await browser.close()


async def served_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial number of the certificate the display presents to a new connection."""
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        return int(writer.get_extra_info("ssl_object").getpeercert()["serialNumber"], 16)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_renewed_certificate_is_served_after_a_reload(pki, tmp_path, caplog):
    cert, key = tmp_path / "display.pem", tmp_path / "display.key"
    shutil.copy(pki.server_chain.cert, cert)
    shutil.copy(pki.server_chain.key, key)
    config = DisplayConfig(listen="127.0.0.1:0", cert_file=str(cert), key_file=str(key))  # type: ignore[arg-type]
    async with serving(config, ROOMS, live_store()) as svc:
        context = trusting(pki)
        first = await served_serial(svc.port, context)
        renewed = pki.ca.issue("server-renewed", chain=True)
        shutil.copy(renewed.cert, cert)
        shutil.copy(renewed.key, key)
        assert await served_serial(svc.port, context) == first  # read at a reload, not by itself
        await svc.reload_certificate()
        second = await served_serial(svc.port, context)
        assert second != first
        # A broken file in between: the certificate in use stays, and the log says why.
        key.write_text("not a key\n")
        await svc.reload_certificate()
        assert await served_serial(svc.port, context) == second
        assert any("the certificate in use stays" in r.getMessage() and "display.key_file" in r.getMessage()
                   for r in caplog.records)


@pytest.mark.parametrize("scenario", [test_pages_ws_and_healthz_over_https,
                                      test_a_client_that_does_not_trust_the_certificate_gets_nothing,
                                      test_tls_connections_are_counted_from_the_accept])
def test_the_same_on_uvloop(pki, scenario):
    """The daemon runs on uvloop, which reads an accepted connection as soon as
    ``connection_made`` returns: the TLS upgrade must have taken it by then."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(pki), 60))
