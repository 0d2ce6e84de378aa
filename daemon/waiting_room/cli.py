"""``waiting-room run | check | status | simulate``: argument parsing, logging and exit codes.

Exit status 2 means the configuration (or the command line) is wrong: one line on stderr
names the file, the key and what was expected.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Callable, Sequence

from . import __version__
from .config import Config, ConfigError, load_config

EXIT_CONFIG = 2


def _setup_logging(level: str) -> None:
    from .systemd import log_handler

    root = logging.getLogger()
    root.handlers[:] = [log_handler()]
    root.setLevel(level.upper())
    # Third-party chatter stays out of the journal unless it is a real problem; the
    # websockets handshake logger is never allowed to DEBUG (it would print the token).
    # httpx logs every snapshot poll at INFO, URL included (with ?token= when token_in is query).
    for noisy in ("websockets", "waiting_room.wire", "waiting_room.mqtt.client", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def _run(config: Config, path: str) -> None:
    from .app import App

    app = App(config, config_path=path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_stop)
    loop.add_signal_handler(signal.SIGHUP, app.request_reload)
    await app.run()


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop (a dependency: the benchmarks' paced latency and CPU per change are
    lower on it), or None, asyncio's own loop, where uvloop cannot be imported."""
    log = logging.getLogger(__name__)
    try:
        import uvloop
    except ImportError as exc:
        log.debug("event loop: uvloop unavailable (%s), the standard asyncio event loop", exc)
        return None
    log.debug("event loop: uvloop %s", uvloop.__version__)
    return uvloop.new_event_loop


def _load(path: str, *, files: bool = True) -> Config:
    """The config, or exit 2 with its one line. ``files``: the TLS files it names must be
    usable too (missing, unreadable, not PEM, a key that does not match: exit 2)."""
    from . import tls

    try:
        config = load_config(path)
        if files:
            tls.check(config, path)
        return config
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_run(args: argparse.Namespace) -> int:
    import faulthandler

    from .display.limits import raise_fd_limit

    config = _load(args.config)
    _setup_logging(args.log_level or config.log_level)
    # As many descriptors as allowed: the display's budget is this minus a reserve.
    raise_fd_limit()
    # A watchdog kill (SIGABRT) then leaves the blocked loop's Python traceback in the journal.
    faulthandler.enable()
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(_run(config, args.config))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from . import secretfiles

    config = _load(args.config)
    print(f"{args.config}: ok ({len(config.rooms)} rooms)")
    for line in secretfiles.warnings(secretfiles.secret_files(config, args.config)):
        print(f"warning: {line}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from . import simulator

    _setup_logging(args.log_level or "info")
    try:
        asyncio.run(simulator.run_from_args(args))
    except KeyboardInterrupt:
        pass
    return 0


def format_health(doc: dict, url: str, now: float) -> str:
    """The /healthz document as a few human lines."""
    import time as _time

    up = doc.get("upstream", {})
    since = up.get("since")
    when = _time.strftime("%H:%M:%S", _time.localtime(since)) if isinstance(since, (int, float)) else "?"
    verdict = {"ok": "healthy", "degraded": "healthy, degraded (values polled from the snapshot)"}
    lines = [f"waiting-room at {url}: {verdict.get(doc.get('status'), 'UNHEALTHY')}"]
    detail = f", {up['detail']}" if up.get("detail") else ""
    if up.get("feed") == "poll" and isinstance(up.get("poll_interval"), (int, float)):
        detail = f", polling every {up['poll_interval']:g} s" + (f" (socket: {up['detail']})" if up.get("detail") else "")
    lines.append(f"  upstream: {up.get('status', '?')} since {when}{detail}")
    for name, state in sorted(doc.get("components", {}).items()):
        lines.append(f"  {name}: {state}")
    rooms = doc.get("rooms", {})
    parts = []
    for room, info in rooms.items():
        if info.get("error"):
            parts.append(f"{room} refused ({info['error']})")
        elif info.get("age") is None:
            parts.append(f"{room} no data yet")
        else:
            parts.append(f"{room} {info['age']:.0f} s ago{' (stale)' if info.get('stale') else ''}")
    shown = ", ".join(parts[:10]) + (f", and {len(parts) - 10} more" if len(parts) > 10 else "")
    lines.append(f"  rooms: {len(rooms)}{': ' + shown if shown else ''}")
    if doc.get("dropped_frames"):
        lines.append(f"  bad frames dropped: {doc['dropped_frames']}")
    if doc.get("problems"):
        lines.append(f"  problems: {'; '.join(doc['problems'])}")
    return "\n".join(lines)


def _pinned_context(cert_file: str) -> object:
    """Trusts exactly the daemon's own certificate (the first in ``display.cert_file``), for
    ``status --config`` on the machine itself: whatever names it was made for, the loopback
    address it is reached by here need not be one of them."""
    import ssl

    try:
        with open(cert_file, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        print(f"display.cert_file: {cert_file}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        print(f"display.cert_file: {cert_file}: no certificate in it", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the pin is the certificate itself
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a trust anchor that is not a CA
    context.load_verify_locations(cadata=text[start:stop + len(end)])
    return context


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 healthy, 1 unhealthy, 3 unreachable (2 stays "bad configuration")."""
    import json
    import time
    import urllib.error
    import urllib.request

    url = args.url
    context = None
    if url is None:
        display = _load(args.config, files=False).display if args.config else None
        listen = display.listen if display is not None else "127.0.0.1:8080"
        host, _, port = listen.rpartition(":")
        host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host in ("::", "[::]") else host.strip("[]")
        secure = display is not None and display.cert_file is not None
        url = f"{'https' if secure else 'http'}://{'[' + host + ']' if ':' in host else host}:{port}"
        if secure and args.ca_file is None:
            context = _pinned_context(display.cert_file)  # type: ignore[union-attr,arg-type]
    if args.ca_file is not None:
        from . import tls

        try:
            context = tls.client_context(args.ca_file, section="--ca-file")
        except tls.TlsError as exc:
            print(str(exc).replace("--ca-file.ca_file", "--ca-file"), file=sys.stderr)
            return EXIT_CONFIG
    url = url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=args.timeout, context=context) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:  # 503 carries the same document
        body = exc.read()
    except (OSError, ValueError) as exc:
        from . import tls

        failure = tls.describe_failure(exc, "display")
        reason = f"{failure.detail}; --ca-file names the CA to trust" if failure else getattr(exc, "reason", exc)
        print(f"waiting-room at {url}: unreachable ({reason})", file=sys.stderr)
        return 3
    try:
        doc = json.loads(body)
    except ValueError:
        print(f"waiting-room at {url}: not a waiting-room health document", file=sys.stderr)
        return 3
    print(format_health(doc, url, time.time()))
    return 0 if doc.get("status") in ("ok", "degraded") else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="waiting-room", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"waiting-room {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c", required=True, help="YAML configuration file")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a configuration file without connecting")
    check.add_argument("--config", "-c", required=True)
    check.set_defaults(func=cmd_check)

    status = sub.add_parser("status", help="a short summary of a running daemon (from its /healthz)")
    status.add_argument("--config", "-c", help="find the daemon's display address in this config")
    status.add_argument("--url", help="the daemon's display service, e.g. http://127.0.0.1:8080 or https://kiosk:8443")
    status.add_argument("--ca-file", help="trust the display's https certificate through this CA (PEM)")
    status.add_argument("--timeout", type=float, default=5.0)
    status.set_defaults(func=cmd_status)

    from . import simulator

    simulate = sub.add_parser("simulate", help="run a waiting-room server simulator (PROTOCOL.md)")
    simulator.add_arguments(simulate)
    simulate.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    simulate.set_defaults(func=cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
