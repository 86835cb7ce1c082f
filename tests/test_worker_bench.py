"""benchmarks/worker_bench.py: the pure parts (percentiles, Prometheus text, watermarks, freshness, rates, CPU per
event) on fake records. No broker, no timing asserted."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.worker_bench import (
    Announced,
    Produced,
    feedback_offsets,
    freshness,
    parse_metrics,
    percentiles,
    phase_cpu,
    rates,
)


def test_percentiles_and_empty():
    p = percentiles(range(101))
    assert p == {"p50": 50.0, "p99": 99.0, "max": 100.0, "n": 101}
    assert percentiles([]) == {"p50": None, "p99": None, "max": None, "n": 0}


def test_parse_metrics_sums_label_sets_and_skips_comments():
    text = (
        "# HELP sparc_events_total valid events\n# TYPE sparc_events_total counter\n"
        "sparc_events_total 1234.0\n"
        'sparc_snapshots_total{outcome="published"} 3.0\n'
        'sparc_snapshots_total{outcome="rejected"} 1.0\n'
        "sparc_events_created 1.7e9\n"
    )
    m = parse_metrics(text)
    assert m["sparc_events_total"] == 1234 and m["sparc_snapshots_total"] == 4
    assert m["sparc_events_created"] == 1.7e9


def test_feedback_offsets_keeps_only_the_feedback_topic():
    wm = {"fb:0": 10, "fb:3": 7, "app-train-examples:0": 17, "fb-other:1": 5}
    assert feedback_offsets(wm, "fb") == {0: 10, 3: 7}


def produced_two_partitions() -> Produced:
    # partition 0: offsets 0..4 produced at t = 100, 101, ..., 104; partition 1: offsets 0..2 at 100.5, 102.5, 104.5
    records = [(0, o, 100.0 + o) for o in range(5)] + [(1, o, 100.5 + 2 * o) for o in range(3)]
    return Produced.from_records(reversed(records))  # any order


def test_produced_newest_before():
    p = produced_two_partitions()
    assert p.total == 8
    assert p.newest_before({0: 2}) == 101.0
    assert p.newest_before({0: 2, 1: 2}) == 102.5
    assert p.newest_before({0: 0}) is None and p.newest_before({}) is None
    assert p.newest_before({0: 99}) == 104.0  # beyond what was produced: capped


def test_freshness_per_snapshot_and_per_event():
    p = produced_two_partitions()
    snaps = [  # announce order differs from list order on purpose
        Announced(version=2, announced_at=110.0, created_at=109.0, offsets={0: 4, 1: 3}, steps=4),
        Announced(version=1, announced_at=103.0, created_at=102.8, offsets={0: 2, 1: 1}, steps=2),
    ]
    f = freshness(snaps, p)
    rows = f["snapshots"]
    assert [r["version"] for r in rows] == [1, 2]
    assert rows[0]["newest_event_produced_at"] == 101.0 and rows[0]["lag_s"] == pytest.approx(2.0)
    assert rows[0]["capture_lag_s"] == pytest.approx(1.8) and rows[0]["events"] == 3
    assert rows[1]["newest_event_produced_at"] == 104.5 and rows[1]["lag_s"] == pytest.approx(5.5)
    # per event: p0 offsets 0,1 -> v1 at 103 (lags 3, 2); offsets 2,3 -> v2 at 110 (8, 7); offset 4 never covered
    #            p1 offset 0 -> v1 (2.5); offsets 1, 2 -> v2 (7.5, 5.5)
    lags = sorted([3.0, 2.0, 8.0, 7.0, 2.5, 7.5, 5.5])
    assert f["events_covered"] == 7 and f["events_not_covered"] == 1
    assert f["per_event_s"]["max"] == pytest.approx(8.0)
    assert f["per_event_s"]["p50"] == pytest.approx(float(np.percentile(lags, 50)))
    assert f["per_snapshot_newest_event_s"]["n"] == 2


def test_freshness_without_snapshots_counts_everything_uncovered():
    f = freshness([], produced_two_partitions())
    assert f["events_covered"] == 0 and f["events_not_covered"] == 8 and f["per_event_s"]["p50"] is None


def test_rates_whole_and_steady():
    # idle until t=10, then 100 events/s until 1000 events at t=20, flat afterwards
    timeline = [{"t": float(t), "trained": max(0, min(1000, 100 * (t - 10)))} for t in range(0, 31)]
    r = rates(timeline, total=1000)
    assert r["reached"] == 1000 and r["first_at_s"] == 10.0 and r["last_at_s"] == 20.0
    assert r["whole"] == pytest.approx(100.0) and r["steady"] == pytest.approx(100.0)
    assert rates([{"t": 0.0, "trained": 0}], total=10)["whole"] is None
    partial = rates([{"t": 0.0, "trained": 0}, {"t": 5.0, "trained": 50}], total=1000)
    assert partial["steady"] is None and partial["whole"] == pytest.approx(10.0)


def test_phase_cpu_per_event_skips_the_catalogue():
    timeline = [
        {"t": 0.0, "ingested": 0, "items": 0, "cpu_main_s": 1.0},
        {"t": 1.0, "ingested": 200, "items": 50, "cpu_main_s": 1.5},  # >= 10% but the catalogue is not in
        {"t": 2.0, "ingested": 400, "items": 100, "cpu_main_s": 2.0},
        {"t": 4.0, "ingested": 950, "items": 100, "cpu_main_s": 2.11},
    ]
    out = phase_cpu(timeline, 1000, "ingested", ["cpu_main_s", "missing"], items=100)
    assert out["cpu_main_s"] == pytest.approx(1e6 * 0.11 / 550) and out["window_s"] == 2.0
    assert out["missing"] is None
    assert phase_cpu(timeline[:2], 1000, "ingested", ["cpu_main_s"])["cpu_main_s"] is None


def test_drain_rate_counts_from_the_first_ingest_to_the_last_trained():
    from benchmarks.worker_bench import drain_rate

    timeline = [
        {"t": 1.0, "ingested": 0, "trained": 0},
        {"t": 2.0, "ingested": 500, "trained": 0},
        {"t": 6.0, "ingested": 1000, "trained": 1000},
    ]
    assert drain_rate(timeline, 1000) == pytest.approx(200.0)
    assert drain_rate(timeline[:2], 1000) is None


def test_outage_bench_counts_lines_per_level_in_text_and_json_logs():
    from benchmarks.outage_bench import line_level, summarise

    text = "\n".join([
        "[2026-12-07 09:26:56,793] [19544] [ERROR] Unable connect to node with id 1: refused",
        "[2026-12-07 09:26:56,794] [19544] [ERROR] Unable connect to node with id 1: refused",
        "Traceback (most recent call last):",
        '{"time": "2026-12-07T09:26:57.000Z", "level": "WARNING", "logger": "x", "message": "m 3", "pid": 1}',
        "[2026-12-07 09:26:58,000] [19544] [INFO] back",
    ])
    assert line_level("  File x, line 3") is None
    result = summarise(text)
    assert result["lines"] == 5 and result["bytes"] == len(text.encode())
    assert result["levels"] == {"ERROR": 2, "continuation": 1, "WARNING": 1, "INFO": 1}
    assert result["top_lines"][0]["count"] == 2 and "Unable connect" in result["top_lines"][0]["line"]
