"""Which files hold the daemon's secrets, and whether other users of the machine can read them.

At start and on each reload the daemon warns, naming the file and the fix, about a secret file
that users other than its owner can read (or change): the config (it may hold a token inline,
and names the commands the daemon runs), ``upstream.token_file``, ``mqtt.password_file``,
``display.access_token_file`` and the TLS private keys. Group access is fine when the group is
the daemon's own (the process's, or ``waiting-room``, which ``scripts/install`` creates for
the service): the installed config is 0640 root:waiting-room, which the service reads through
its group and nobody else can. systemd credentials
(``$CREDENTIALS_DIRECTORY``) are private by construction and not checked. A missing file is
not reported here: reading it reports it, with its key.

Blocking (``stat``): call it in a thread from the event loop.
"""

from __future__ import annotations

import grp
import os
import stat
from typing import Iterable

from .config import Config

__all__ = ["SERVICE_GROUP", "secret_files", "warnings"]

# The group scripts/install gives the service (and the config): its members are the daemon.
SERVICE_GROUP = "waiting-room"


def secret_files(config: Config, config_path: str | None = None) -> list[tuple[str, str]]:
    """(what, path) of every secret file the config names, the config file first."""
    files: list[tuple[str, str]] = []
    if config_path:
        files.append(("config file", config_path))
    up, mqtt, display = config.upstream, config.mqtt, config.display
    for what, path in (
        ("upstream.token_file", up.token_file),
        ("upstream.key_file", up.key_file),
        ("mqtt.password_file", mqtt.password_file),
        ("mqtt.key_file", mqtt.key_file),
        ("display.access_token_file", display.access_token_file),
        ("display.key_file", display.key_file),
    ):
        if path:
            files.append((what, path))
    return files


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def warnings(files: Iterable[tuple[str, str]], own_gid: int | None = None) -> list[str]:
    """One line per file that others can read or write, with the command that fixes it."""
    own_gid = os.getegid() if own_gid is None else own_gid
    out: list[str] = []
    seen: set[str] = set()
    for what, path in files:
        if path in seen:
            continue
        seen.add(path)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode)
        who = []
        if mode & 0o060 and st.st_gid != own_gid and _group_name(st.st_gid) != SERVICE_GROUP:
            who.append(f"group {_group_name(st.st_gid)}")
        if mode & 0o006:
            who.append("every user")
        if not who:
            continue
        access = "readable" if not mode & 0o022 else "writable" if not mode & 0o044 else "readable and writable"
        if what == "config file":
            fix = (f"chmod 640 {path} and chgrp it to the daemon's group (scripts/install: root:waiting-room), "
                   f"or chmod 600 {path}")
        else:
            fix = f"chmod 600 {path}"
        out.append(f"{what} {path} is {access} by {' and '.join(who)} (mode {mode:04o}): {fix}")
    return out
