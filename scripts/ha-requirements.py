"""The Python requirements of some Home Assistant integrations, one a line (run with the Home
Assistant venv's python; scripts/install-ha-test-deps uses it).

Walks each integration's manifest: its requirements, then its dependencies and
after_dependencies, as Home Assistant's own pip step does; the integrations Home Assistant sets
up by itself (bootstrap's core and default ones) are always included.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import homeassistant
from homeassistant import bootstrap


def requirements(domains: list[str]) -> set[str]:
    root = Path(homeassistant.__file__).parent / "components"
    wanted = [*domains, *bootstrap.CORE_INTEGRATIONS, *bootstrap.DEFAULT_INTEGRATIONS]
    seen: set[str] = set()
    found: set[str] = set()
    while wanted:
        domain = wanted.pop()
        manifest_file = root / domain / "manifest.json"
        if domain in seen or not manifest_file.exists():
            continue
        seen.add(domain)
        manifest = json.loads(manifest_file.read_text())
        found.update(manifest.get("requirements", []))
        wanted += manifest.get("dependencies", []) + manifest.get("after_dependencies", [])
    return found


if __name__ == "__main__":
    print("\n".join(sorted(requirements(sys.argv[1:]))))
