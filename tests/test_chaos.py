"""CI's short chaos run: bench/chaos with a fixed seed, every invariant checked after each round.

The long run and the soak are run by hand (docs/chaos/README.md); this one keeps the runner
and the daemon's fault handling from rotting. A failing seed replays the same faults.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from testsupport import ROOT

SEED = 7
FAULTS = 40


@pytest.mark.timeout(300)
def test_a_short_seeded_chaos_run_breaks_no_invariant(tmp_path):
    out = tmp_path / "chaos.json"
    done = subprocess.run(
        [str(ROOT / "bench" / "chaos"), "--seed", str(SEED), "--faults", str(FAULTS), "--out", str(out),
         "--keep-log", str(tmp_path / "daemon.log")],
        capture_output=True, text=True, timeout=280, cwd=ROOT, check=False,
    )
    assert out.exists(), f"the runner failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert report["violations"] == [], "\n".join(report["violations"]) + "\n" + done.stdout[-3000:]
    assert done.returncode == 0
    assert report["faults"] >= FAULTS
    assert report["rounds_with_overlapping_faults"] > 0
    assert len(report["by_kind"]) >= 10  # the seed reaches most kinds of fault
