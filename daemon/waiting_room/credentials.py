"""Where the upstream token and the MQTT password come from, read fresh when needed.

Reading is blocking file or process I/O: callers run it in a thread. Nothing here logs a
secret, and errors name the source, never its content.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Sequence

COMMAND_TIMEOUT: Final = 20.0


class SecretError(Exception):
    """A secret could not be read; the message names the source, never the secret."""


def credential_path(name: str) -> Path:
    """A systemd credential (``LoadCredential=``) by name, from ``$CREDENTIALS_DIRECTORY``."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise SecretError(f"credential {name!r}: $CREDENTIALS_DIRECTORY is not set (not run by systemd?)")
    if "/" in name or name in ("", ".", ".."):
        raise SecretError(f"credential {name!r}: not a credential name")
    return Path(directory) / name


def read_secret_file(path: str | os.PathLike[str], what: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
        raise SecretError(f"{what} {os.fspath(path)}: {reason}") from None
    if not value:
        raise SecretError(f"{what} {os.fspath(path)}: empty")
    return value


def run_secret_command(argv: Sequence[str], what: str) -> str:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SecretError(f"{what} {argv[0]}: {type(exc).__name__}") from None
    if done.returncode != 0:
        raise SecretError(f"{what} {argv[0]}: exited with status {done.returncode}")
    value = done.stdout.strip()
    if not value:
        raise SecretError(f"{what} {argv[0]}: printed nothing")
    return value


@dataclass(frozen=True)
class TokenSource:
    """Exactly one of a literal, a file, a command or a systemd credential."""

    literal: str | None = None
    file: str | None = None
    command: tuple[str, ...] | None = None
    credential: str | None = None

    def read(self) -> str:
        if self.literal is not None:
            return self.literal
        if self.file is not None:
            return read_secret_file(self.file, "token_file")
        if self.command is not None:
            return run_secret_command(self.command, "token_command")
        if self.credential is not None:
            return read_secret_file(credential_path(self.credential), "token credential")
        raise SecretError("no token source configured")

    @property
    def watched_file(self) -> Path | None:
        """The file whose change means a rotated token."""
        if self.file is not None:
            return Path(self.file)
        if self.credential is not None:
            try:
                return credential_path(self.credential)
            except SecretError:
                return None
        return None


def file_signature(path: Path | None) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten (inode, size, mtime)."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim (Unix seconds) of a JWT, without verifying it; None otherwise."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        return None
    return float(exp)
