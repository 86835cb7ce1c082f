"""The pure parts of the fault suite's per-role SIGKILL scenario (benchmarks/faults/sigkill_roles.py), without a
broker: the kill phases, the version counts, the pass rules, the report's rows and the options. The scenario itself
runs with `python -m benchmarks.fault_suite --quick --only sigkill_roles` (not in `make test`: NOT_QUICK)."""

from __future__ import annotations

import random

import pytest

from benchmarks.fault_suite import NOT_QUICK, SCENARIOS, option_flags, options_of, parse_args
from benchmarks.faults.report import table
from benchmarks.faults.sigkill import kill_phases
from benchmarks.faults.sigkill_roles import RULES, check, summary, version_figures


def test_kill_phases_are_seeded_and_a_running_process_is_first_killed_once_it_works():
    fresh = kill_phases(20, "training", random.Random(0), started_before=False)
    assert fresh == kill_phases(20, "training", random.Random(0), started_before=False)
    assert fresh.count("starting") == 5 and fresh.count("training") == 15
    for seed in range(30):
        phases = kill_phases(4, "serving", random.Random(seed), started_before=True)
        assert phases[0] == "serving" and sorted(phases) == ["serving"] * 3 + ["starting"]


def test_version_figures_count_repeats_and_disorder_from_the_phase_on():
    versions = [1, 2, 3, 3, 2, 4]
    assert version_figures(versions, 0, {1, 2, 3, 4}) == {
        "versions_announced": 6, "repeated_versions": 2, "versions_out_of_order": 2, "announced_not_stored": 0}
    assert version_figures(versions, 4, {1, 2, 3}) == {
        "versions_announced": 2, "repeated_versions": 1, "versions_out_of_order": 1, "announced_not_stored": 1}
    assert version_figures([5, 6], 2, set())["versions_announced"] == 0


def test_the_rules_fail_on_a_lost_event_a_repeated_version_a_role_that_never_recovers_or_a_client_error():
    good = {"lost": 0, "repeated_versions": 0, "versions_out_of_order": 0, "announced_not_stored": 0,
            "seconds_to_training": {"never": 0}, "seconds_to_forwarding": {"never": 0}, "crashes": []}
    assert check("learn", good)["passed"] and check("ingest", good)["passed"]
    for bad in ({"lost": 3}, {"repeated_versions": 1}, {"versions_out_of_order": 1}, {"announced_not_stored": 1},
                {"seconds_to_training": {"never": 1}, "seconds_to_forwarding": {"never": 1}}, {"crashes": [{}]}):
        assert not check("learn", {**good, **bad})["passed"] and not check("ingest", {**good, **bad})["passed"]
    serve = {"seconds_to_serving": {"never": 0}, "other_replica": {"requests": 40, "errors": 0}, "crashes": []}
    assert check("serve", serve)["passed"] and check("serve", serve)["rule"] == RULES["serve"][0]
    assert not check("serve", {**serve, "other_replica": {"requests": 40, "errors": 1}})["passed"]
    assert not check("serve", {**serve, "other_replica": {"requests": 0, "errors": 0}})["passed"]
    assert not check("serve", {**serve, "seconds_to_serving": {"never": 2}})["passed"]


def test_summary_and_the_report_rows():
    kills = [{"kill": 1, "phase": "starting", "seconds_to_serving": 4.0},
             {"kill": 2, "phase": "serving", "seconds_to_serving": None},
             {"kill": 3, "phase": "serving", "seconds_to_serving": 6.5}]
    assert summary(kills, "seconds_to_serving") == {"max": 6.5, "median": 6.5, "never": 1}
    learn = {"kills": [{"kill": 1, "phase": "training", "seconds_to_training": 7.0}], "lost": 2, "events": 900,
             "learnt_twice": 0, "repeated_versions": 0, "versions_out_of_order": 0, "announced_not_stored": 0,
             "versions_announced": 5, "seconds_to_training": {"max": 7.0, "median": 7.0, "never": 0}, "crashes": []}
    serve = {"kills": kills, "seconds_to_serving": summary(kills, "seconds_to_serving"), "crashes": [],
             "other_replica": {"requests": 40, "errors": 0}}
    figures = {"learn": check("learn", learn), "serve": check("serve", serve)}
    md = table({"scenarios": {"sigkill_roles": {"status": "ok", "figures": figures}}})
    assert "SIGKILL of each role under load" in md and "ingest-0" not in md
    assert "| the learner: events lost (of those sent in its phase) / learnt twice | 2 of 900 / 0 |" in md
    assert "| serve-0: seconds until answering /retrieve with a version: median / max (never) | 6.50 / 6.50 (1) |" in md
    assert md.count("passed its rule (sigkill_roles.RULES) | 0 / 0; no |") == 2  # 2 lost; one kill never served


def test_quick_leaves_the_role_kills_out_unless_named_and_roles_are_checked():


    assert "sigkill_roles" in NOT_QUICK and "sigkill_roles" not in parse_args(["--quick", "--out", "x"]).scenarios
    assert parse_args(["--out", "x"]).scenarios == list(SCENARIOS)
    named = parse_args(["--quick", "--only", "sigkill_roles", "--roles", "serve", "--out", "x"])
    assert named.scenarios == ["sigkill_roles"] and options_of(named).kills == 2
    assert options_of(named).roles == "serve" and options_of(named).kill_window_s == 3.0
    again = parse_args(["--child", "sigkill_roles", *option_flags(options_of(named))])
    assert options_of(again) == options_of(named)  # what a scenario's process is given
    with pytest.raises(SystemExit):
        parse_args(["--roles", "learn,worker", "--out", "x"])
