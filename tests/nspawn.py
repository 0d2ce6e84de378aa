"""A real systemd, booted in a container, for the end-to-end tests of the service unit.

The machines the tests run on have no systemd as PID 1, but a Debian 12 root booted with
``systemd-nspawn`` has one in well under a second. What this module does, and why:

- ``requirements()`` says what is missing (root, Linux, the tools) in one sentence, so the
  test can skip with that reason (or fail, when ``CI=true``). ``scripts/install-systemd-test-deps``
  installs the tools.
- ``ensure_root()`` builds the Debian root once with ``debootstrap --variant=minbase`` and keeps
  it outside the repository (``/var/cache/waiting-room-tests/bookworm-<hash of the recipe>``).
  It is built in a temporary directory and renamed into place, under a lock, so an interrupted
  or concurrent build never leaves a half-made root behind.
- ``Container`` boots it with ``--volatile=overlay`` (the cached root is never written:
  everything a test does lands in a tmpfs and vanishes at power-off), ``--register=no
  --keep-unit`` (there is no host D-Bus or machined to register with), and the host's network
  (no ``--private-network``), so the host's loopback simulator and broker are reachable.
  Commands run inside through ``nsenter`` into the namespaces of the container's PID 1
  (``machinectl`` and ``systemd-run --machine`` need a host systemd). Each container gets a
  cgroup of its own when the host offers cgroup v2 that no host systemd manages (a stale one,
  left by a killed test run, is reaped the next time), and is torn down by PID: ``systemctl
  poweroff`` inside, then SIGTERM and SIGKILL to nspawn and the container's PID 1, then
  ``cgroup.kill``, whatever happened in the test.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

SUITE = "bookworm"
VARIANT = "minbase"
# python3-venv and python3-systemd are what scripts/install would apt-get: having them in the
# cached root keeps each test run off the network (the script checks and skips them).
INCLUDE = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "python3-systemd", "procps")
# Background jobs of a stock Debian that would hit the network or hold apt's lock at boot.
MASK = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer",
        "systemd-tmpfiles-clean.timer", "getty@tty1.service", "console-getty.service")
RECIPE_VERSION = 1
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CACHE = Path(os.environ.get("WAITING_ROOM_TEST_CACHE", "/var/cache/waiting-room-tests"))
CGROUP_PREFIX = "waiting-room-test-"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ContainerError(RuntimeError):
    pass


def requirements() -> str | None:
    """None when a container can be booted here, else why not (one sentence)."""
    if not os.uname().sysname == "Linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn and debootstrap)"
    missing = [tool for tool in ("systemd-nspawn", "debootstrap", "nsenter") if not _which(tool)]
    if missing:
        return f"{', '.join(missing)} not installed (run scripts/install-systemd-test-deps as root)"
    return None


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def apt_mirror() -> str:
    """The Debian mirror apt already uses (deb822 or one-line sources), else deb.debian.org."""
    candidates: list[str] = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in path.read_text().split("\n\n"):
                fields = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (line.partition(":") for line in stanza.splitlines()
                                    if ":" in line and not line.lstrip().startswith("#"))
                )
                if SUITE in fields.get("suites", "").split() and "main" in fields.get("components", ""):
                    candidates += fields.get("uris", "").split()
    with contextlib.suppress(OSError):
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            m = re.match(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+" + SUITE + r"\s+.*\bmain\b", line)
            if m:
                candidates.append(m.group(1))
    for uri in candidates:
        if uri.startswith(("http://", "https://")) and uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def root_key() -> str:
    recipe = f"{RECIPE_VERSION} {SUITE} {VARIANT} {','.join(INCLUDE)} {','.join(MASK)}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def ensure_root(log: Path | None = None) -> Path:
    """The cached Debian root, built first if needed (about 45 s and 300 MB)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    dest = CACHE / f"{SUITE}-{root_key()}"
    if (dest / "usr/lib/systemd/systemd").exists():
        return dest
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building the same root
        if (dest / "usr/lib/systemd/systemd").exists():
            return dest
        for stale in CACHE.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE))
        try:
            out = open(log, "ab") if log else subprocess.DEVNULL
            try:
                done = subprocess.run(
                    [_which("debootstrap") or "debootstrap", f"--variant={VARIANT}",
                     f"--include={','.join(INCLUDE)}", SUITE, str(build), apt_mirror()],
                    stdout=out, stderr=subprocess.STDOUT, timeout=900,
                    env={"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"},
                )
            finally:
                if log:
                    out.close()  # type: ignore[union-attr]
            if done.returncode != 0:
                tail = log.read_text(errors="replace")[-2000:] if log else ""
                raise ContainerError(f"debootstrap failed with status {done.returncode}: {tail}")
            for unit in MASK:
                link = build / "etc/systemd/system" / unit
                link.unlink(missing_ok=True)
                link.symlink_to("/dev/null")
            subprocess.run(["chroot", str(build), "apt-get", "clean"], check=False,
                           env={"PATH": CLEAN_PATH}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            os.rename(build, dest)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    return dest


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                kids += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return kids


def _ns_pid(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return []


def _cgroup2_root() -> Path | None:
    """Where cgroup v2 is mounted (unified, or the hybrid layout's ``unified``), if anywhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split()[4])
    return None


def _remove_cgroup(group: Path) -> None:
    """Kills what is left in ``group`` and removes it, and the copy nspawn makes of it in a
    hybrid host's v1 ``name=systemd`` hierarchy, depth first."""
    base = _cgroup2_root()
    trees = [group]
    if base is not None:
        v1 = Path("/sys/fs/cgroup/systemd") / group.relative_to(base)
        if v1 != group:
            trees.append(v1)
    for tree in trees:
        if not tree.is_dir():
            continue
        with contextlib.suppress(OSError):
            (tree / "cgroup.kill").write_text("1")
        for _ in range(100):
            pids = [int(p) for d in tree.rglob("cgroup.procs") for p in _read(d).split()]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            dirs = sorted((d for d in tree.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts))
            for d in [*dirs, tree]:
                with contextlib.suppress(OSError):
                    d.rmdir()
            if not tree.exists():
                break
            time.sleep(0.05)


def reap_stale(parent: Path) -> None:
    """Containers left by a test run that was killed (its PID ends the cgroup's name)."""
    for group in parent.glob(f"{CGROUP_PREFIX}*"):
        owner = group.name.rsplit("-", 1)[-1]
        if owner.isdigit() and int(owner) != os.getpid() and not Path(f"/proc/{owner}").exists():
            _remove_cgroup(group)
            with contextlib.suppress(OSError):
                Path("/run/systemd/nspawn/propagate", group.name[len(CGROUP_PREFIX):]).rmdir()


def _read(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text()
    return ""


class Container:
    """One booted container; use as a context manager (teardown even when the test fails)."""

    def __init__(self, root: Path, *, name: str, binds: Sequence[tuple[str, str]] = (),
                 log: Path, extra_args: Sequence[str] = ()) -> None:
        self.root = root
        self.name = name
        self.binds = list(binds)
        self.log = log
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self.cgroup: Path | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Container":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _make_cgroup(self) -> None:
        base = _cgroup2_root()
        if base is None or Path("/run/systemd/system").is_dir():
            return  # a host systemd owns the tree: nspawn --keep-unit stays in the caller's unit
        with contextlib.suppress(OSError):
            own = Path("/proc/self/cgroup").read_text()
            rel = next((line[3:] for line in own.splitlines() if line.startswith("0::")), "/")
            # A cgroup with processes cannot have children that take processes ("no internal
            # processes"), except at the root; a sibling of our own cgroup is always fine.
            parent = base / rel.lstrip("/")
            parent = parent if parent == base else parent.parent
            reap_stale(parent)
            group = parent / f"{CGROUP_PREFIX}{self.name}"
            group.mkdir(exist_ok=True)
            self.cgroup = group

    def start(self, timeout: float = 60.0) -> None:
        self._make_cgroup()
        cmd = [
            _which("systemd-nspawn") or "systemd-nspawn", "-D", str(self.root), "--machine", self.name,
            "--register=no", "--keep-unit", "--boot", "--volatile=overlay", "--console=passive",
            *(f"--bind-ro={host}:{inside}" for host, inside in self.binds),
            *self.extra_args,
        ]
        cgroup = self.cgroup

        def enter_cgroup() -> None:  # in the child, before exec: nspawn and all it starts
            if cgroup is not None:
                with contextlib.suppress(OSError):
                    (cgroup / "cgroup.procs").write_text("0")

        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=enter_cgroup,
                env={"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "SYSTEMD_LOG_LEVEL": "info"},
            )
        deadline = time.monotonic() + timeout
        while self.pid1 is None:
            if self.proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited with {self.proc.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise ContainerError(f"no container PID 1 under nspawn {self.proc.pid}: {self._log_tail()}")
            for child in _children(self.proc.pid):
                ns = _ns_pid(child)
                if len(ns) >= 2 and ns[-1] == 1:
                    self.pid1 = child
            time.sleep(0.02)
        # Booted: the manager has finished its start-up transaction ("degraded" is fine here).
        while True:
            done = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                            timeout=max(1.0, deadline - time.monotonic()))
            state = done.stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise ContainerError(f"container did not boot (state {state!r}): {self._log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            if self.pid1 is not None:
                with contextlib.suppress(Exception):
                    self.run(["systemctl", "--no-block", "poweroff"], check=False, timeout=5)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)  # nspawn asks the container to halt
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    for pid in (self.pid1, proc.pid):
                        if pid is not None:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGKILL)  # PID 1 takes its namespace along
                    proc.wait(5)
        self.pid1 = None
        group, self.cgroup = self.cgroup, None
        if group is not None:
            _remove_cgroup(group)
        with contextlib.suppress(OSError):  # left behind when nspawn itself was killed
            Path("/run/systemd/nspawn/propagate", self.name).rmdir()

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-3000:]
        return ""

    # ------------------------------------------------------------------ commands

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True,
            timeout: float = 60.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Runs ``argv`` inside the container as root, with a clean environment."""
        if self.pid1 is None:
            raise ContainerError("container is not running")
        environment = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "TERM": "dumb", "SYSTEMD_PAGER": "",
                       "SYSTEMD_COLORS": "0", **(env or {})}
        cmd = [_which("nsenter") or "nsenter", "-t", str(self.pid1), "-a", "-r", "-w",
               "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in environment.items()), *argv]
        done = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
        if check and done.returncode != 0:
            raise ContainerError(
                f"{' '.join(argv)} exited with {done.returncode}\n"
                f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
            )
        return done

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run(["/bin/sh", "-ec", script], **kwargs)  # type: ignore[arg-type]

    def write(self, path: str, text: str, mode: str = "0644", owner: str = "root:root") -> None:
        self.run(["/bin/sh", "-ec", 'mkdir -p "$(dirname "$1")"; umask 077; cat > "$1"; chown "$2" "$1"; '
                  'chmod "$3" "$1"', "sh",
                  path, owner, mode], input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def diagnostics(c: Container, unit: str) -> str:
    """The unit's status and journal, and what else failed: printed when a test fails."""
    parts = []
    for argv in (["systemctl", "status", unit, "--no-pager", "-l"],
                 ["journalctl", "-u", unit, "--no-pager", "-n", "60"],
                 ["systemctl", "--failed", "--no-pager"]):
        with contextlib.suppress(Exception):
            done = c.run(argv, check=False, timeout=10)
            parts.append(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}")
    return "\n".join(parts)


@contextlib.contextmanager
def reporting(c: Container, unit: str, started: float) -> Iterator[dict[str, float]]:
    """Around a test's phases in ``c``: a dict for their timings, printed at the end (the
    container tests are the slow part of CI), and ``diagnostics`` printed on a failure."""
    timings: dict[str, float] = {"boot": time.monotonic() - started}
    try:
        yield timings
    except BaseException:
        print(diagnostics(c, unit))
        raise
    finally:
        timings["total"] = time.monotonic() - started
        print("timings:", {k: round(v, 1) for k, v in timings.items()})
