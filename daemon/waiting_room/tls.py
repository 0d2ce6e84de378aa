"""Every TLS context of the daemon, built from the config in one place.

Verification is always on: a client context requires a certificate that chains to the
configured CA bundle (or the system's store when none is named) and matches the host name;
TLS 1.2 at least. The upstream socket and its snapshot share ``upstream_context``, the broker
connection uses ``mqtt_context``, the display serves with ``display_context``.

A file that is missing, unreadable, not PEM, a key that does not match its certificate or is
encrypted: a ``TlsError`` (a ``ConfigError``: exit status 2 at start, "reload refused" on
SIGHUP), one line naming the key and the file, never the file's content. Building reads
files: in the event loop, call these in a thread (``Cached.get`` too).

``describe_failure`` turns a failed handshake into the one line an operator can act on
(``TLS certificate not trusted: self-signed certificate``), and says whether retrying soon
could help (a certificate problem will not fix itself in seconds).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Callable, Final, Iterable

from .config import Config, ConfigError, DisplayConfig, MqttConfig, UpstreamConfig

__all__ = [
    "Cached",
    "Failure",
    "TlsError",
    "check",
    "client_context",
    "describe_failure",
    "display_context",
    "mqtt_context",
    "server_context",
    "upstream_context",
]

MAX_PEM_BYTES: Final = 1024 * 1024  # a CA bundle of the whole web is ~200 KiB
_BEGIN: Final = b"-----BEGIN "


class TlsError(ConfigError):
    """A TLS file cannot be used: one line naming the key and the file."""


class _Encrypted(Exception):
    pass


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and block the daemon.
    raise _Encrypted


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise TlsError(f"{key}: {path}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_PEM_BYTES:
        raise TlsError(f"{key}: {path}: larger than 1 MiB, not a PEM file")
    return data


def _require_pem(key: str, path: str, data: bytes, marker: bytes, noun: str) -> None:
    if _BEGIN not in data:
        raise TlsError(f"{key}: {path}: not a PEM file (expected a {noun} between -----BEGIN and -----END lines)")
    if marker not in data:
        raise TlsError(f"{key}: {path}: no {noun} in it")


def _load_ca(ctx: ssl.SSLContext, key: str, path: str) -> None:
    data = _read(key, path)
    _require_pem(key, path, data, b"CERTIFICATE-----", "certificate")
    try:
        ctx.load_verify_locations(cadata=data.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise TlsError(f"{key}: {path}: cannot load the CA certificates ({_reason(exc)})") from None


def _load_chain(ctx: ssl.SSLContext, section: str, cert_file: str, key_file: str) -> None:
    cert_key, key_key = f"{section}.cert_file", f"{section}.key_file"
    _require_pem(cert_key, cert_file, _read(cert_key, cert_file), b"CERTIFICATE-----", "certificate")
    _require_pem(key_key, key_file, _read(key_key, key_file), b"PRIVATE KEY-----", "private key")
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except _Encrypted:
        raise TlsError(f"{key_key}: {key_file}: encrypted with a passphrase, which the daemon cannot type; "
                       f"store it unencrypted (openssl pkey -in KEY -out KEY.new) and chmod 600 it") from None
    except OSError as exc:  # replaced or removed since it was read
        if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(f"{key_key}: {key_file}: does not match the certificate in {cert_key} {cert_file}") from None
        if isinstance(exc, ssl.SSLError):
            raise TlsError(f"{cert_key}: {cert_file}: cannot load the certificate with {key_key} "
                           f"({_reason(exc)})") from None
        raise TlsError(f"{cert_key}: {cert_file}: {exc.strerror or type(exc).__name__}") from None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    text = str(reason) if reason else str(exc)
    return text.replace("_", " ").lower() if reason else text[:120]


def client_context(
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    *,
    section: str = "upstream",
) -> ssl.SSLContext:
    """For a connection the daemon opens (the upstream, its snapshot, the broker): the server
    must present a certificate from ``ca_file`` (else the system's store) for the host name
    connected to; with ``cert_file`` + ``key_file`` the daemon presents its own."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        _load_ca(ctx, f"{section}.ca_file", ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file and key_file:
        _load_chain(ctx, section, cert_file, key_file)
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    return ctx


def server_context(cert_file: str, key_file: str, *, section: str = "display") -> ssl.SSLContext:
    """For the display's HTTPS: this certificate (chain: the server's first, then any
    intermediates) and its key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, section, cert_file, key_file)
    return ctx


def upstream_context(cfg: UpstreamConfig) -> ssl.SSLContext:
    """The upstream's: for the ``wss://`` socket and the ``https://`` snapshot alike."""
    return client_context(cfg.ca_file, cfg.cert_file, cfg.key_file, section="upstream")


def mqtt_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    """None: plain MQTT (no ``mqtt.ca_file``)."""
    if not cfg.ca_file:
        return None
    return client_context(cfg.ca_file, cfg.cert_file, cfg.key_file, section="mqtt")


def display_context(cfg: DisplayConfig) -> ssl.SSLContext | None:
    """None: plain HTTP (no ``display.cert_file``)."""
    if not (cfg.cert_file and cfg.key_file):
        return None
    return server_context(cfg.cert_file, cfg.key_file, section="display")


def check(config: Config, source: str = "config") -> None:
    """Builds every context the config names a file for (``waiting-room check``, start,
    reload): a ``TlsError`` names the config file, the key and the file that cannot be used."""
    try:
        up = config.upstream
        if up.ca_file or up.cert_file:
            upstream_context(up)
        mqtt_context(config.mqtt)
        if config.display.enabled:
            display_context(config.display)
    except TlsError as exc:
        raise TlsError(f"{source}: {exc}") from None


def _signature(path: str | None) -> tuple[int, int, int] | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Cached:
    """A context built again only when one of its files changed: a renewed certificate or
    CA bundle is used from the next connection on, without a restart. ``get`` is blocking
    (a few ``stat`` calls; reading and building on a change): call it in a thread."""

    def __init__(self, build: Callable[[], ssl.SSLContext], files: Iterable[str | None]) -> None:
        self._build = build
        self._files = tuple(f for f in files if f)
        self._made: tuple[tuple[tuple[int, int, int] | None, ...], ssl.SSLContext] | None = None

    def get(self) -> ssl.SSLContext:
        signatures = tuple(_signature(f) for f in self._files)
        if self._made is None or self._made[0] != signatures:
            self._made = (signatures, self._build())
        return self._made[1]


# -- a failed handshake, for the log and `systemctl status` ---------------------------------

# OpenSSL's reasons when the peer refused our certificate (or wanted one we did not send).
_PEER_REFUSED: Final = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate ({section}.cert_file)",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the server refused the handshake (a client certificate may be required: "
                                     "{section}.cert_file)",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust our client certificate ({section}.cert_file): unknown CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused our client certificate ({section}.cert_file)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the server refused our client certificate ({section}.cert_file)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server says our client certificate has expired ({section}.cert_file)",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the server says our client certificate is revoked ({section}.cert_file)",
    "TLSV1_ALERT_ACCESS_DENIED": "the server denied access to our client certificate ({section}.cert_file)",
}


_EOF_DETAIL: Final = "TLS handshake failed: the server closed the connection (EOF)"


@dataclass(frozen=True)
class Failure:
    """``detail``: one line. ``lasting``: a certificate or configuration problem, which a
    quick retry will not fix (retry at the backoff's maximum)."""

    detail: str
    lasting: bool


def same_refusal(previous: Failure | None, now: Failure | None) -> Failure | None:
    """The failure to report, given the one before it.

    TLS 1.3 tells a client that its certificate was refused only after the client's own
    handshake finished, and a reset (the server closed with our first bytes unread) can
    swallow that alert: the same refusal then arrives as an EOF. Right after a lasting
    failure, such an EOF is taken for that failure, so it is neither retried quickly nor
    logged as news; any other failure is reported as itself.
    """
    if previous is not None and previous.lasting and now is not None and now.detail == _EOF_DETAIL:
        return previous
    return now


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        for nxt in (e.__cause__, e.__context__):
            if nxt is not None:
                todo.append(nxt)


def describe_failure(exc: BaseException, section: str = "upstream") -> Failure | None:
    """A TLS problem anywhere in ``exc``'s causes, as one line; None when there is none."""
    for e in _chain(exc):
        if isinstance(e, TlsError):
            return Failure(str(e), True)
        if isinstance(e, ssl.SSLCertVerificationError):
            reason = e.verify_message or _reason(e)
            return Failure(f"TLS certificate not trusted: {reason.rstrip('.')}", True)
    for e in _chain(exc):
        if isinstance(e, ssl.SSLError):
            reason = getattr(e, "reason", None) or ""
            if reason in _PEER_REFUSED:
                return Failure("TLS: " + _PEER_REFUSED[reason].format(section=section), True)
            if reason == "WRONG_VERSION_NUMBER":
                return Failure("TLS handshake failed: the server does not speak TLS on this port (wrong version number)",
                               True)
            if isinstance(e, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
                return Failure(_EOF_DETAIL, False)
            return Failure(f"TLS handshake failed: {_reason(e)}", False)
    return None
