"""The HTTP snapshot, fetched: the transport of the fallback (docs/protocol.md, "The snapshot").

One ``GET`` per call, through ``upstream.proxy`` when configured, else through the proxy the
environment names (``https_proxy``, ``http_proxy``, ``no_proxy``), with the socket's TLS
context (``Upstream.tls_context()``: ``upstream.ca_file`` or the system's CA store, never
certifi's bundle, and the client certificate). The body
is read up to 1 MiB and no further. What the answer means is decided elsewhere: ``snapshot``
decodes the body, ``upstream`` decides when to poll and what each outcome does.

``httpx`` does the HTTP: proxies (CONNECT for TLS, absolute-form for plain HTTP), the proxy
environment with ``no_proxy``, TLS, chunked bodies, keep-alive between polls.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from .snapshot import MAX_SNAPSHOT_BYTES

__all__ = ["Body", "Failed", "NotModified", "Outcome", "Refused", "SnapshotClient"]

CLOSE_TIMEOUT: Final = 2.0


@dataclass(frozen=True, slots=True)
class Body:
    """A ``200``: the raw body (at most 1 MiB) and its ETag; or, with ``bad``, why the body
    was not read (it is bad input: counted like a bad frame)."""

    data: bytes
    etag: str | None
    bad: str | None = None


@dataclass(frozen=True, slots=True)
class NotModified:
    """A ``304``: nothing changed since the ETag sent."""


@dataclass(frozen=True, slots=True)
class Refused:
    """Any other HTTP status, with its ``Retry-After`` as sent (the caller parses it)."""

    status: int
    retry_after: str | None


@dataclass(frozen=True, slots=True)
class Failed:
    """No HTTP answer: the network, the proxy, TLS, a timeout. ``detail`` is short and human."""

    detail: str


Outcome = Body | NotModified | Refused | Failed


def _describe(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text[:160]}" if text else name


class SnapshotClient:
    """An HTTP client for one polling period (``async with``): the connection may be reused
    between polls, and is closed when the socket is back."""

    def __init__(self, *, proxy: str | None, timeout: float, verify: ssl.SSLContext) -> None:
        # Imported at the first outage of a daemon with upstream.fallback (Upstream builds the
        # client in a thread): httpx is 1.6 MB of memory a daemon without the fallback never needs.
        import httpx

        self._http_error = httpx.HTTPError
        self._client = httpx.AsyncClient(
            # proxy=None with trust_env: the environment's proxies and no_proxy apply.
            proxy=proxy,
            trust_env=proxy is None,
            verify=verify,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            follow_redirects=False,
            headers={"User-Agent": "waiting-room", "Accept": "application/json", "Accept-Encoding": "identity"},
        )

    async def __aenter__(self) -> SnapshotClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._client.aclose()
        except TimeoutError:
            pass

    async def fetch(self, url: str, headers: Mapping[str, str]) -> Outcome:
        """One GET. The caller bounds it with a timeout too (httpx's is per read, not total)."""
        try:
            async with self._client.stream("GET", url, headers=dict(headers)) as response:
                status = response.status_code
                if status == 304:
                    return NotModified()
                if status != 200:
                    return Refused(status, response.headers.get("Retry-After"))
                etag = response.headers.get("ETag")
                encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    # Asked for identity: a compressed body could expand far past the limit.
                    return Body(b"", etag, bad="compressed snapshot")
                length = response.headers.get("Content-Length", "")
                if length.isdigit() and int(length) > MAX_SNAPSHOT_BYTES:
                    return Body(b"", etag, bad="oversized snapshot")
                data = bytearray()
                async for chunk in response.aiter_raw():
                    data += chunk
                    if len(data) > MAX_SNAPSHOT_BYTES:
                        return Body(b"", etag, bad="oversized snapshot")  # read no further
                return Body(bytes(data), etag)
        except self._http_error as exc:
            return Failed(_describe(exc))
        except (OSError, ssl.SSLError, ValueError) as exc:  # what httpx may leave unwrapped
            return Failed(_describe(exc))
