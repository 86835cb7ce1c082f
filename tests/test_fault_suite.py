"""The fault suite end to end at small counts (`--quick`): its own broker (deploy/kafka/broker.sh on free loopback
ports), every scenario but the per-role kills (fault_suite.NOT_QUICK: too long for every run; tests/test_fault_roles.py
checks their parts), the JSON, the Markdown table and the figures. Asserts what the report says was survived
(nothing lost, no repeated version, every malformed event dead-lettered with its reason and bytes, no non-finite
version published, the previous latest served while the store's disk is full, ...), never a time or a rate.

The suite's broker takes free ports, or SPARC_FAULTS_BROKER_PORT (and the next one) when set.
The disk-full scenario mounts a tmpfs, so this test needs root (CAP_SYS_ADMIN), as `make test` has here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from worker_harness import ROOT

from benchmarks.fault_suite import NOT_QUICK, SCENARIOS
from streams.settings import WorkerSettings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_the_fault_suite_runs_every_fault_and_reports_each_as_survived(tmp_path):
    out = tmp_path / "faults.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.fault_suite", "--quick", "--max-minutes", "40",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=45 * 60)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["skipped"] == {} and set(result["scenarios"]) == set(SCENARIOS) - set(NOT_QUICK)
    failed = {name: s["figures"].get("error", s["status"]) for name, s in result["scenarios"].items()
              if s["status"] != "ok"}
    assert not failed, failed
    assert done.returncode == 0
    f = {name: s["figures"] for name, s in result["scenarios"].items()}

    kill = f["sigkill"]
    assert len(kill["kills"]) == 2 and kill["crashes"] == []
    assert kill["lost"] == 0 and kill["events"] == kill["events_acknowledged"] > 0
    assert kill["repeated_versions"] == kill["versions_out_of_order"] == kill["announced_not_stored"] == 0
    assert kill["seconds_to_training"]["never"] == 0

    outage = f["outage"]
    assert outage["lost"] == 0 and outage["events"] > 0 and outage["worker_alive"] and outage["caught_up"]
    assert outage["training_resumed_after_s"] is not None and outage["lines"] >= 0

    bad = f["malformed"]
    letters = bad["dead_letters"]
    assert letters["kinds"] >= 16 and letters["sent"] == 360
    assert letters["with_reason_and_bytes"] == letters["reason_as_expected"] == 360  # every one, the right reason
    assert not bad["exited"] and bad["livez_not_200"] == 0
    assert bad["adversarial_dead_lettered"] == 0 and bad["adversarial_learnt"] == 100
    assert bad["heavy_user_history_length"] == WorkerSettings().max_len  # bounded, whatever the user sent
    assert all(p["drained"] for p in bad["phases"].values())

    nan = f["nan"]
    assert nan["published_non_finite"] == 0 and nan["versions_announced"] > 0
    assert all(i["recovered"] and i["train_errors"] >= 1 for i in nan["injections"].values())
    assert nan["dead_lettered_train_error"] >= 2  # the poisoned batches' events, each one there
    assert nan["events_lost"] == 0

    for kind in ("rocksdb", "file"):
        disk = f["disk_full"][kind]
        assert disk["previous_latest_still_served"] and disk["alarm_set"], disk
        assert disk["failed_publishes_while_full"] >= 1 and disk["retrieve_while_full"] == [200]
        assert disk["recovered_after_s"] is not None and disk["served_after"] > disk["served_before"]
        assert disk["warm_start"]["started"] and disk["verify"]["verify"] == disk["verify"]["versions"]

    soak = f["soak"]
    assert soak["worker_alive"] and soak["rss_start_mb"] and soak["rss_end_mb"] and soak["windows"]
    assert all(w["p99_s"] is not None for w in soak["windows"])

    table = out.with_suffix(".md").read_text()
    from benchmarks.faults.report import ROWS

    assert all(ROWS[name][0] in table for name in result["scenarios"])
    assert all(out.with_name(f"faults-{name}.png").exists() for name in ("sigkill", "malformed", "nan", "soak"))
