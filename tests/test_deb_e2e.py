"""The Debian package end to end, under a real systemd: the Debian 12 container of
tests/nspawn.py, the package built by `scripts/build-deb` on the host, the simulator and a
mosquitto on the host's loopback (shared with the container), as in tests/test_systemd_e2e.py.

What an administrator would check, in order: `apt install ./waiting-room_….deb` (user through
sysusers.d, config a conffile 0640 root:waiting-room, empty token 0600 root, the unit from
systemd/ in /lib/systemd/system, enabled but not started, and a message saying what is left);
configure and `systemctl start` (a live STATUS line, MQTT); an upgrade to a rebuilt package
with another version (config and token kept, the service restarted on the new version, one
user); `apt remove` (stopped, config and state kept, /opt/waiting-room gone); installing again
with the config in place starts it by itself; `apt purge` (no user, group, /etc/waiting-room,
/var/lib/waiting-room, unit links, statoverrides or file of that user left anywhere). And
`lintian` on the package: no error or warning that debian/waiting-room.lintian-overrides does
not explain.

The two packages (the version of pyproject.toml and `<that>.post1`) are built once and cached
beside the Debian root by a fingerprint of what goes into them, from the same wheels as the
other container test (no index; WAITING_ROOM_E2E_FROM_PYPI=1: from PyPI). Needs root, Linux,
systemd-nspawn, debootstrap, debhelper, dpkg-dev, python3-venv and lintian
(scripts/install-systemd-test-deps); anything missing skips with the reason, or fails under
CI=true.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

import nspawn
from conftest import ROOT, free_port
from test_systemd_e2e import (  # noqa: F401  (fixtures, shared with the scripts/install test)
    TOKEN, UNIT, _unavailable, config_text, debian_root, dependency_wheels,
    host_services, journal, mqtt_retained, wait_for,
)

pytestmark = pytest.mark.timeout(900)

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
UPGRADE = f"{VERSION}.post1"
# What scripts/build-deb puts into the package (it copies the checkout without these).
INPUTS = ("pyproject.toml", "README.md", "config", "daemon", "debian", "systemd", "scripts/build-deb")


def fingerprint(extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for top in INPUTS:
        path = ROOT / top
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            and not p.name.endswith((".pyc", ".egg-info")) and ".egg-info" not in str(p))
        for f in files:
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _build_tools() -> str | None:
    missing = [t for t in ("dpkg-buildpackage", "dh", "dpkg-architecture", "lintian") if not shutil.which(t)]
    if not missing and subprocess.run(["/usr/bin/python3", "-c", "import venv, ensurepip"],
                                      capture_output=True).returncode == 0:
        return None
    return f"{', '.join(missing) or 'python3-venv'} not installed (run scripts/install-systemd-test-deps as root)"


@pytest.fixture(scope="session")
def debs(dependency_wheels: Path | None) -> dict[str, Path]:  # noqa: F811
    """version -> .deb: the version of pyproject.toml and the one the upgrade goes to."""
    why = _build_tools()
    if why and os.geteuid() == 0:
        subprocess.run([str(ROOT / "scripts" / "install-systemd-test-deps")], check=False,
                       stdout=subprocess.DEVNULL, timeout=900)
        why = _build_tools()
    if why:
        _unavailable(f"cannot build the package: {why}")
    arch = subprocess.run(["dpkg-architecture", "-qDEB_HOST_ARCH"], capture_output=True, text=True,
                          check=True).stdout.strip()
    key = fingerprint(f"{arch} {dependency_wheels or 'pypi'}")
    dest = nspawn.CACHE / f"debs-{key}"
    wanted = {v: dest / f"waiting-room_{v}_{arch}.deb" for v in (VERSION, UPGRADE)}
    if all(p.is_file() for p in wanted.values()):
        return wanted
    nspawn.CACHE.mkdir(parents=True, exist_ok=True)
    for stale in nspawn.CACHE.glob("debs-*"):
        shutil.rmtree(stale, ignore_errors=True)
    build = Path(tempfile.mkdtemp(prefix=".debs-", dir=nspawn.CACHE))
    try:
        env = {**os.environ, "WAITING_ROOM_WHEELS": str(dependency_wheels)} if dependency_wheels else dict(os.environ)
        env.pop("WAITING_ROOM_DEB_VERSION", None)
        for version in wanted:
            done = subprocess.run([str(ROOT / "scripts" / "build-deb"), "--version", version, "--out", str(build)],
                                  capture_output=True, text=True, timeout=900, env=env)
            assert done.returncode == 0, f"scripts/build-deb --version {version}:\n{done.stdout}{done.stderr}"
        os.rename(build, dest)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return wanted


def test_lintian_is_clean(debs: dict[str, Path]):
    """No error or warning but those debian/waiting-room.lintian-overrides explains."""
    done = subprocess.run(["lintian", "--fail-on", "error,warning", str(debs[VERSION])],
                          capture_output=True, text=True, timeout=300)
    tags = [line for line in done.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert done.returncode == 0 and not tags, done.stdout + done.stderr


def test_package_contents(debs: dict[str, Path]):
    deb = str(debs[VERSION])
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    paths = {line.split()[5].lstrip(".") for line in listing.splitlines()}
    for path in ("/lib/systemd/system/waiting-room.service", "/lib/systemd/system/waiting-room-kiosk.service",
                 "/usr/lib/sysusers.d/waiting-room.conf", "/etc/waiting-room/config.yaml",
                 "/opt/waiting-room/venv/bin/waiting-room", "/usr/bin/waiting-room"):
        assert path in paths, path
    assert not [p for p in paths if "__pycache__" in p or p.endswith(".pyc")], "byte-code shipped"
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True).stdout
    assert version.strip() == VERSION
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
        # The same unit files as scripts/install uses, and the example config.
        for shipped, source in (("lib/systemd/system/waiting-room.service", "systemd/waiting-room.service"),
                                ("lib/systemd/system/waiting-room-kiosk.service",
                                 "systemd/waiting-room-kiosk.service"),
                                ("etc/waiting-room/config.yaml", "config/example.yaml")):
            assert Path(tmp, shipped).read_bytes() == (ROOT / source).read_bytes(), shipped
        # Nothing names the directory the venv was built in.
        bad = subprocess.run(["grep", "-rlI", "debian/waiting-room/opt", f"{tmp}/opt"], capture_output=True, text=True)
        assert not bad.stdout.strip(), bad.stdout


def test_install_upgrade_remove_purge(debian_root: Path, debs: dict[str, Path], tmp_path: Path):  # noqa: F811
    started = time.monotonic()
    folder = debs[VERSION].parent
    binds = [(str(folder), "/debs"), (str(ROOT), "/src")]
    first, second = (f"/debs/{debs[v].name}" for v in (VERSION, UPGRADE))
    display_port = free_port()
    apt_env = {"DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> str:
        done = c.run(["apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0", *args], env=apt_env, timeout=300)
        return done.stdout + done.stderr

    def owners(name: str) -> list[str]:
        return [line for line in c.run(["cat", "/etc/passwd", "/etc/group"]).stdout.splitlines()
                if line.split(":", 1)[0] == name]

    def connected() -> bool:
        return "upstream connected" in c.show(UNIT, "StatusText")["StatusText"]

    with host_services(tmp_path) as (sim, broker), nspawn.Container(
        debian_root, name=f"wr-deb-{os.getpid()}", binds=binds, log=tmp_path / "container.log",
    ) as c, nspawn.reporting(c, UNIT, started) as timings:
        # -- install: enabled, not started, and told what is left to do -----------------
        t = time.monotonic()
        out = apt("install", first)
        timings["install"] = time.monotonic() - t
        assert "not started" in out and "upstream-token is empty" in out, out
        assert "systemctl start waiting-room" in out, out
        uid = c.run(["id", "-u", "waiting-room"]).stdout.strip()
        gid = c.run(["id", "-g", "waiting-room"]).stdout.strip()
        assert 0 < int(uid) < 1000, uid
        entry = c.run(["getent", "passwd", "waiting-room"]).stdout.strip().split(":")
        assert entry[5:] == ["/var/lib/waiting-room", "/usr/sbin/nologin"], entry
        stat = c.run(["stat", "-c", "%a %U:%G", "/etc/waiting-room/config.yaml",
                      "/etc/waiting-room/upstream-token", "/etc/waiting-room"]).stdout.split("\n")
        assert stat[:3] == ["640 root:waiting-room", "600 root:root", "750 root:waiting-room"], stat
        conffiles = c.run(["dpkg-query", "-W", "-f=${Conffiles}", "waiting-room"]).stdout
        assert "/etc/waiting-room/config.yaml" in conffiles, conffiles
        assert c.run(["cat", f"/lib/systemd/system/{UNIT}"]).stdout == (ROOT / "systemd" / UNIT).read_text()
        assert c.run(["systemctl", "is-enabled", UNIT]).stdout.strip() == "enabled"
        assert c.run(["systemctl", "is-enabled", "waiting-room-kiosk.service"], check=False).stdout.strip() \
            == "disabled"
        assert c.run(["systemctl", "is-active", UNIT], check=False).stdout.strip() == "inactive"
        assert c.run(["waiting-room", "--version"]).stdout.strip() == f"waiting-room {VERSION}"
        assert c.run(["/opt/waiting-room/venv/bin/python", "-c", "import systemd.journal"]).returncode == 0
        # One install path per box: scripts/install refuses to run over the package.
        refused = c.run(["/src/scripts/install"], check=False)
        assert refused.returncode != 0 and "Debian package" in refused.stderr, refused.stdout + refused.stderr

        # -- configure and start, as the postinst's message says -------------------------
        rooms = [{"id": "opd-1", "name": "OPD 1"}, {"id": "lab", "name": "Laboratory"}]
        config = config_text(sim, broker, display_port, rooms)
        c.write("/etc/waiting-room/config.yaml", config, mode="0640", owner="root:waiting-room")
        c.write("/etc/waiting-room/upstream-token", TOKEN + "\n", mode="0600")
        c.run(["waiting-room", "check", "--config", "/etc/waiting-room/config.yaml"])
        t = time.monotonic()
        c.run(["systemctl", "start", UNIT], timeout=60)
        wait_for("STATUS upstream connected", connected)
        timings["start"] = time.monotonic() - t
        status = c.run(["systemctl", "status", UNIT, "--no-pager", "-l"]).stdout
        assert "Active: active (running)" in status and 'Status: "upstream connected' in status, status
        pid = c.show(UNIT, "MainPID")["MainPID"]
        assert c.run(["ps", "-o", "user=", "-p", pid]).stdout.strip() == "waiting-room"
        wait_for("opd-1 on MQTT", lambda: mqtt_retained(broker, "waiting-room/opd-1/patients"))
        wait_for("a state file", lambda: c.run(["ls", "/var/lib/waiting-room"]).stdout.strip())

        # -- upgrade: config and token kept, restarted on the new version, one user ------
        t = time.monotonic()
        out = apt("install", second)
        timings["upgrade"] = time.monotonic() - t
        assert "not started" not in out, out
        assert c.run(["dpkg-query", "-W", "-f=${Version}", "waiting-room"]).stdout == UPGRADE
        assert c.run(["cat", "/etc/waiting-room/config.yaml"]).stdout == config
        assert c.run(["cat", "/etc/waiting-room/upstream-token"]).stdout == TOKEN + "\n"
        assert c.run(["stat", "-c", "%a %U:%G", "/etc/waiting-room/config.yaml", "/etc/waiting-room/upstream-token",
                      "/etc/waiting-room"]).stdout.split("\n")[:3] == stat[:3]
        assert c.run(["ls", "/etc/waiting-room"]).stdout.split() == ["config.yaml", "upstream-token"]
        new = wait_for("a new main PID after the upgrade", lambda: (
            p := c.show(UNIT, "MainPID", "ActiveState"))["MainPID"] not in ("0", pid)
            and p["ActiveState"] == "active" and p)
        wait_for("STATUS upstream connected after the upgrade", connected)
        cmdline = c.run(["cat", f"/proc/{new['MainPID']}/cmdline"]).stdout.replace("\0", " ")
        assert "/opt/waiting-room/venv/bin/waiting-room run" in cmdline, cmdline
        assert c.run(["waiting-room", "--version"]).stdout.strip() == f"waiting-room {UPGRADE}"
        assert len(owners("waiting-room")) == 2, owners("waiting-room")  # one user, one group
        assert c.run(["id", "-u", "waiting-room"]).stdout.strip() == uid
        assert c.run(["systemctl", "is-enabled", UNIT]).stdout.strip() == "enabled"

        # -- remove: stopped and disabled, config and state kept --------------------------
        t = time.monotonic()
        apt("remove", "waiting-room")
        timings["remove"] = time.monotonic() - t
        props = c.show(UNIT, "ActiveState", "LoadState")
        assert props == {"ActiveState": "inactive", "LoadState": "not-found"}, props
        assert c.run(["pgrep", "-u", "waiting-room"], check=False).stdout.strip() == ""
        assert mqtt_retained(broker, "waiting-room/status") == "offline"  # a clean stop
        assert c.run(["systemctl", "is-enabled", UNIT], check=False).stdout.strip() != "enabled"
        assert c.run(["cat", "/etc/waiting-room/config.yaml"]).stdout == config
        assert c.run(["cat", "/etc/waiting-room/upstream-token"]).stdout == TOKEN + "\n"
        assert c.run(["ls", "/var/lib/waiting-room"]).stdout.strip()
        gone = c.run(["ls", "-d", "/opt/waiting-room", "/usr/bin/waiting-room"], check=False)
        assert gone.returncode != 0 and not gone.stdout.strip(), gone.stdout  # no byte-code left

        # -- installed again with the config in place: started by the postinst -----------
        out = apt("install", second)
        assert "not started" not in out, out
        wait_for("STATUS upstream connected after the reinstall", connected)
        assert c.run(["systemctl", "is-enabled", UNIT]).stdout.strip() == "enabled"

        # -- purge: nothing left behind --------------------------------------------------
        t = time.monotonic()
        apt("purge", "waiting-room")
        timings["purge"] = time.monotonic() - t
        assert c.run(["dpkg-query", "-W", "-f=${Status}", "waiting-room"], check=False).stdout \
            in ("", "unknown ok not-installed")
        assert c.run(["pgrep", "-u", uid], check=False).stdout.strip() == ""
        assert owners("waiting-room") == []
        left = c.sh("ls -d /etc/waiting-room /var/lib/waiting-room /var/lib/private/waiting-room "
                    "/opt/waiting-room /usr/lib/sysusers.d/waiting-room.conf /lib/systemd/system/waiting-room* "
                    "/etc/systemd/system/*/waiting-room* /etc/systemd/system/waiting-room* "
                    "/var/lib/systemd/deb-systemd-helper-enabled/*waiting-room* "
                    "/var/lib/systemd/deb-systemd-helper-enabled/*/waiting-room* 2>/dev/null || true").stdout
        assert left.strip() == "", left
        assert "waiting-room" not in c.run(["dpkg-statoverride", "--list"]).stdout
        owned = c.sh(f"find / -xdev \\( -uid {uid} -o -gid {gid} \\) -print 2>/dev/null | head").stdout
        assert owned.strip() == "", owned
        assert not any(TOKEN in str(e) for e in journal(c)), "the token reached the journal"
