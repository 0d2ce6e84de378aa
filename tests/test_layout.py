"""Dependencies point one way: pure modules import no I/O; consumers never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "daemon" / "waiting_room"

PURE = {"protocol", "policy", "config", "model", "discovery", "snapshot"}
CONSUMERS = {"mqtt", "display", "systemd", "statefile", "metrics"}
IO_MODULES = {"asyncio", "socket", "websockets", "aiomqtt", "subprocess"}


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(project modules, third-party/stdlib top-level modules) imported by a file."""
    tree = ast.parse(path.read_text())
    ours, theirs = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x
                if node.module:
                    ours.add(node.module.split(".")[0])
                else:
                    ours.update(a.name for a in node.names)
            elif node.module and node.module.startswith("waiting_room"):
                parts = node.module.split(".")
                ours.add(parts[1] if len(parts) > 1 else "__init__")
            elif node.module:
                theirs.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            theirs.update(a.name.split(".")[0] for a in node.names)
    return ours, theirs


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def test_pure_modules_do_no_io():
    for name in PURE:
        ours, theirs = imports_of(PACKAGE / f"{name}.py")
        assert not theirs & IO_MODULES, f"{name} imports {theirs & IO_MODULES}"


def test_config_and_protocol_import_nothing_of_the_project_but_protocol():
    assert imports_of(PACKAGE / "protocol.py")[0] == set()
    assert imports_of(PACKAGE / "config.py")[0] <= {"protocol"}


def test_snapshot_imports_only_protocol_and_model_types():
    assert imports_of(PACKAGE / "snapshot.py")[0] <= {"protocol", "model"}


def test_store_imports_only_the_model():
    assert imports_of(PACKAGE / "store.py")[0] <= {"model", "protocol"}


def test_consumers_never_import_each_other_nor_the_upstream():
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name not in CONSUMERS:
            continue
        ours, _ = imports_of(path)
        assert not ours & (CONSUMERS - {name}), f"{path} imports {ours & CONSUMERS}"
        assert not ours & {"upstream", "poller", "app", "cli"}, path


def test_the_poller_is_a_transport_like_the_upstream_socket():
    """It fetches the snapshot and knows nothing of the store, the consumers or the policy."""
    assert imports_of(PACKAGE / "poller.py")[0] <= {"snapshot"}


def test_tls_builds_contexts_from_the_config_alone():
    """One module makes every TLS context; it reads files but runs no I/O loop or socket, and
    the adapters (upstream, poller, mqtt, display) and the command line are its callers."""
    ours, theirs = imports_of(PACKAGE / "tls.py")
    assert ours <= {"config"}
    assert not theirs & IO_MODULES, theirs & IO_MODULES
    for name in PURE:
        assert "tls" not in imports_of(PACKAGE / f"{name}.py")[0], name


def test_secretfiles_reads_only_the_config_and_file_modes():
    ours, theirs = imports_of(PACKAGE / "secretfiles.py")
    assert ours <= {"config"}
    assert not theirs & IO_MODULES, theirs & IO_MODULES


def test_metrics_read_the_store_and_are_wired_by_the_composition_root_alone():
    """metrics.py is a consumer of the store (plus the counters app.py hands it); the display
    serves /metrics through a callable, without importing it, and so does everything else."""
    assert imports_of(PACKAGE / "metrics.py")[0] <= {"store", "model", "__version__"}
    for path in PACKAGE.rglob("*.py"):
        if module_name(path) in ("app", "metrics"):
            continue
        assert "metrics" not in imports_of(path)[0], path
    assert "metrics" in imports_of(PACKAGE / "app.py")[0]


def test_only_the_composition_root_wires_things():
    for path in PACKAGE.rglob("*.py"):
        if module_name(path) in ("app", "cli", "__main__"):
            continue
        assert "app" not in imports_of(path)[0], path


def test_the_daemon_does_not_load_httpx_until_it_polls_a_snapshot():
    # 1.6 MB at rest for every daemon otherwise (bench: RSS at rest); the poller imports it.
    import subprocess
    import sys

    code = "import sys, waiting_room.cli, waiting_room.app; print('httpx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
