"""``waiting-room run | check | simulate``: argument parsing, logging and exit codes.

Exit status 2 means the configuration (or the command line) is wrong: one line on stderr
names the file, the key and what was expected.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Sequence

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
    for noisy in ("websockets", "waiting_room.wire", "waiting_room.mqtt.client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def _run(config: Config, path: str) -> None:
    from .app import App

    app = App(config, config_path=path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_stop)
    loop.add_signal_handler(signal.SIGHUP, app.request_reload)
    await app.run()


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    _setup_logging(args.log_level or config.log_level)
    asyncio.run(_run(config, args.config))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(f"{args.config}: ok ({len(config.rooms)} rooms)")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from . import simulator

    _setup_logging(args.log_level or "info")
    try:
        asyncio.run(simulator.run_from_args(args))
    except KeyboardInterrupt:
        pass
    return 0


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
