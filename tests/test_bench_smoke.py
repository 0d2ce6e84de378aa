"""The benchmark suite, at toy sizes, so that it cannot rot (issue 5).

``python -m bench --smoke`` starts its own upstream, mosquitto and daemon exactly like the full
run. Only completion, the shape of the results and correctness are asserted: never a timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCENARIOS = {"footprint", "latency", "display", "recovery", "flood", "scale", "fleet"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "daemon"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, f"bench --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    files = sorted(out.glob("bench-*-smoke.json"))
    assert len(files) == 1, files
    doc = json.loads(files[0].read_text())
    doc["_stdout"] = done.stdout
    return doc


@pytest.mark.timeout(300)
def test_completes_and_describes_the_machine(smoke: dict) -> None:
    assert smoke["complete"] is True, smoke.get("error")
    machine = smoke["machine"]
    for key in ("cpu_model", "cores", "python", "packages", "date", "mosquitto"):
        assert machine[key], key
    assert machine["packages"]["websockets"] and machine["packages"]["aiomqtt"]
    assert "-m bench --smoke" in smoke["command"]
    assert set(smoke["results"]) >= SCENARIOS
    assert "JSON:" in smoke["_stdout"] and "scenario" in smoke["_stdout"]


@pytest.mark.timeout(300)
def test_table_rows_are_well_formed(smoke: dict) -> None:
    rows = smoke["table"]
    assert {r["scenario"] for r in rows} >= SCENARIOS
    for r in rows:
        assert set(r) >= {"scenario", "metric", "value", "unit", "floor", "ratio", "target", "status"}
        assert r["status"] in ("met", "MISSED", ""), r
        assert r["value"] is None or isinstance(r["value"], (int, float)), r
        if r["target"]:
            assert r["status"], r  # every target is judged


@pytest.mark.timeout(300)
def test_every_figure_has_its_floor(smoke: dict) -> None:
    results = smoke["results"]
    for rate in results["latency"]["rates"].values():
        for part in ("ws_hop", "mqtt_hop", "end_to_end"):
            assert rate[part]["n"] > 0 and rate[part]["p99"] is not None, part
        assert rate["added"]["p99"] is not None
    for case in results["flood"]["cases"].values():
        assert case["median_bare_drain_ms"] is not None and case["median_completion_ms"] is not None
    assert results["display"]["floor_last_client"]["n"] > 0


@pytest.mark.timeout(300)
def test_values_are_correct(smoke: dict) -> None:
    results = smoke["results"]
    for rate in results["latency"]["rates"].values():
        assert rate["final_values_correct"], rate
    for case in results["flood"]["cases"].values():
        assert case["all_correct"], case
        for run in case["runs"]:
            assert run["missing_or_wrong"] == 0 and run["state_topics"]["ok"], run
    display = results["display"]
    assert display["clients_reached_per_change"]["min"] == display["clients"]
    assert display["upstream_connections"] == 1 and display["upstream_handshakes_during"] == 0
    assert results["scale"]["joins_answered"] == results["scale"]["rooms"]
    assert results["recovery"]["return_to_fresh_data_ms"] is not None
    fleet = results["fleet"]["cases"][0]
    assert fleet["jittered"]["attempts"] >= results["fleet"]["daemons"]


@pytest.mark.timeout(300)
def test_the_seed_stack_runs_beside_the_daemon_or_says_why_not(smoke: dict) -> None:
    results = smoke["results"]
    seed = results["seed"]
    if seed.get("skipped"):  # e.g. no node on this machine: said, not silently dropped
        assert "node" in seed["skipped"] or "npm" in seed["skipped"], seed
        return
    assert seed["rss_at_rest_kb"] > 0 and seed["node"].startswith("v")
    for rate in results["latency"]["rates"].values():
        assert rate["seed"]["n"] > 0 and rate["seed_final_values_correct"], rate
    for case in results["flood"]["cases"].values():
        assert case["seed_all_correct"] and case["median_seed_completion_ms"] is not None, case
    assert any(r["metric"].endswith("daemon vs seed stack") for r in smoke["table"])


@pytest.mark.timeout(300)
def test_the_fleet_is_measured_at_the_returning_server_and_on_real_sockets(smoke: dict) -> None:
    fleet = smoke["results"]["fleet"]
    cases = {(c["code"], c["downtime_s"]) for c in fleet["cases"]}
    assert {(1006, 10.0), (1012, 1.0), (1001, 10.0)} <= cases
    real = smoke["results"]["fleet_real"]
    assert real["all_back"] and real["reconnected"] == real["clients"], real


@pytest.mark.timeout(120)
def test_the_capacity_scenario_runs_at_toy_size(tmp_path: Path) -> None:
    """``bench/run capacity --smoke`` (issue 14): 3 sites x 4 rooms on a 3-node NATS cluster
    (when nats-server is installed) and on mosquitto, every figure present, every value right.
    About 15 s; never part of ``bench --smoke``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "daemon"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-m", "bench", "capacity", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, f"capacity --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    (path,) = tmp_path.glob("capacity-*-smoke.json")
    doc = json.loads(path.read_text())
    assert doc["complete"] and doc["machine"]["cores"], doc.get("runs")
    assert {r["broker"] for r in doc["runs"]} >= {"mosquitto"}
    for run in doc["runs"]:
        assert run["ready"]["all_online_with_values_s"] is not None and run["ready"]["discovery_missing"] == 0
        assert run["latency"]["n"] > 0 and run["latency"]["p99"] is not None
        assert run["latency"]["never_received"] == 0
        assert run["finals"]["live_wrong"] == 0 and run["finals"]["retained_wrong_any_node"] == 0
        for role in ("daemons", "broker", "sender", "subscribers"):
            assert run["steady"]["cpu"][role]["per_process"], role
        assert run["steady"]["memory"]["daemons"]["rss_median"] > 0
    assert "p50 / p99" in done.stdout
