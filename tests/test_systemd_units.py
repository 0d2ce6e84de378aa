"""The unit files in systemd/: `systemd-analyze verify` accepts them without a warning, and
the service keeps the hardening the README promises.

verify needs every ExecStart= program to exist: the unit's own text is checked, with only
the paths of programs not installed here pointed at stubs in a temporary directory.
Without systemd-analyze (package `systemd`) the checks skip with the reason, or fail under
CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

UNIT_DIR = ROOT / "systemd"
UNITS = sorted(p for p in UNIT_DIR.glob("*") if p.suffix in (".service", ".socket", ".timer", ".path"))
SERVICE = UNIT_DIR / "waiting-room.service"
VENV_BIN = "/opt/waiting-room/venv/bin/"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: the systemd checks must run here)")
    pytest.skip(reason)


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None and os.geteuid() == 0:
        subprocess.run([str(ROOT / "scripts" / "install-systemd-test-deps")], check=False,
                       stdout=subprocess.DEVNULL, timeout=600)
        exe = shutil.which("systemd-analyze")
    if exe is None:
        _unavailable("systemd-analyze is not installed (apt-get install systemd, or "
                     "scripts/install-systemd-test-deps as root)")
    return exe  # type: ignore[return-value]


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values, in order (systemd's repeated keys accumulate)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    lines: list[str] = []
    for raw in path.read_text().splitlines():  # a trailing backslash continues the line
        if lines and lines[-1].endswith("\\") and not raw.lstrip().startswith(("#", ";")):
            lines[-1] = lines[-1][:-1] + " " + raw.strip()
        else:
            lines.append(raw)
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[(.+)\]", line):
            current = sections.setdefault(m.group(1), {})
            continue
        assert current is not None, f"{path.name}: {raw!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {raw!r} is not key=value"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_there_is_a_service_unit():
    assert SERVICE in UNITS


EXEC_KEYS = ("ExecStart", "ExecStartPre", "ExecStartPost", "ExecReload", "ExecStop", "ExecStopPost",
             "ExecCondition")


def programs(unit: Path) -> set[str]:
    """The absolute program paths of a unit's Exec*= lines (without the -@:+! prefixes)."""
    found = set()
    for key, values in parse_unit(unit).get("Service", {}).items():
        if key in EXEC_KEYS:
            for value in values:
                argv0 = value.lstrip("-@:+!").split()[0] if value.strip() else ""
                if argv0.startswith("/"):
                    found.add(argv0)
    return found


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_analyze_verify(unit: Path, tmp_path: Path):
    """verify needs every program to exist; those that are not on this machine (the venv's,
    made by scripts/install; an OS package's, such as a kiosk's compositor) are replaced by a
    stub in a temporary directory, everything else in the unit text is as shipped. All the
    units are copied together, so references between them resolve."""
    analyze = _systemd_analyze()
    units_dir, stubs = tmp_path / "units", tmp_path / "stubs"
    units_dir.mkdir()
    stubs.mkdir()
    for each in UNITS:
        text = each.read_text()
        for program in programs(each):
            if not os.access(program, os.X_OK):
                stub = stubs / program.strip("/").replace("/", "_")
                stub.write_text("#!/bin/sh\nexit 0\n")
                stub.chmod(0o755)
                text = text.replace(program, str(stub))
        (units_dir / each.name).write_text(text)
    done = subprocess.run([analyze, "verify", "--man=no", str(units_dir / unit.name)], capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_UNIT_PATH": f"{units_dir}:"})
    # verify exits 0 on mere warnings (an unknown or misspelt key is "ignoring"): any output counts.
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), (
        f"systemd-analyze verify {unit.name}:\n{done.stdout}{done.stderr}"
    )


def test_service_is_type_notify_with_watchdog_reload_and_restart():
    service = parse_unit(SERVICE)["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["ExecStart"] == [VENV_BIN + "waiting-room run --config /etc/waiting-room/config.yaml"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["2"]  # a bad config is not retried in a loop
    assert service["StateDirectory"] == ["waiting-room"]
    assert service["LoadCredential"] == ["upstream-token:/etc/waiting-room/upstream-token"]
    watchdog = service["WatchdogSec"][0]
    assert re.fullmatch(r"\d+s?", watchdog) and 10 <= int(watchdog.rstrip("s")) <= 120
    assert service["LimitCORE"] == ["0"]  # a core would hold the secrets
    assert parse_unit(SERVICE)["Install"]["WantedBy"] == ["multi-user.target"]


HARDENING = {
    "User": "waiting-room",
    "Group": "waiting-room",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateUsers": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
}


@pytest.mark.parametrize("key", HARDENING)
def test_service_hardening(key: str):
    service = parse_unit(SERVICE)["Service"]
    assert service.get(key) == [HARDENING[key]], f"{key}= in {SERVICE.name}"


def test_service_system_call_filter():
    service = parse_unit(SERVICE)["Service"]
    assert service["SystemCallFilter"][0] == "@system-service"
    assert set(" ".join(service["SystemCallFilter"][1:]).lstrip("~").split()) >= {"@privileged", "@resources"}


def test_exposure_score_is_recorded_and_current():
    """`systemd-analyze security` agrees with the score written in the unit (and README)."""
    analyze = _systemd_analyze()
    done = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(SERVICE)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", done.stdout)
    assert m, done.stdout + done.stderr
    score = float(m.group(1))
    assert score <= 2.0, f"exposure {score} {m.group(2)}: the hardening regressed"
    recorded = re.search(r"systemd-analyze security waiting-room: (\d+\.\d+)", SERVICE.read_text())
    assert recorded and float(recorded.group(1)) == score, (
        f"the unit's comment says {recorded and recorded.group(1)}, systemd-analyze says {score}"
    )
