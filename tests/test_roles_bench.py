"""benchmarks/roles_bench.py: the pure parts (an ingest replica's partitions from its metrics, when partitions
train again after a kill, the serve replicas' spread) on fake samples. No broker, no timing asserted."""

from __future__ import annotations

from benchmarks.roles_bench import partitions_of, replica_spread, train_again


def test_partitions_of_reads_the_consumer_lag_labels_of_one_topic():
    text = ("# TYPE sparc_consumer_lag gauge\n"
            'sparc_consumer_lag{partition="2",topic="fb"} 3.0\n'
            'sparc_consumer_lag{partition="0",topic="fb"} 0.0\n'
            'sparc_consumer_lag{partition="1",topic="app-feedback-by-user"} 0.0\n'
            "sparc_events_total 10.0\n")
    assert partitions_of(text, "fb") == [0, 2]
    assert partitions_of(text, "other") == []


def test_train_again_waits_for_the_first_event_produced_after_the_kill():
    # partition 0 advances every second until the kill at t=10.5, then once more at t=12 (what the dead replica
    # had forwarded), then from t=23 on (the take-over); partition 1 never stops
    def offset0(t: int) -> int:
        return t if t <= 10 else 11 if t < 23 else t

    timeline = [(float(t), {0: offset0(t), 1: t}) for t in range(0, 30)]
    out = train_again(timeline, killed_at=10.5, first_after={0: 11, 1: 11})
    assert out[0] == {"trains_again_after_s": 12.5, "longest_gap_before_kill_s": 1.0}
    assert out[1]["trains_again_after_s"] == 1.5  # offset 11 learnt once the next offset is 12, at t=12
    never = train_again([(0.0, {0: 1}), (1.0, {0: 2}), (5.0, {0: 2})], killed_at=2.0, first_after={0: 2})
    assert never[0] == {"trains_again_after_s": None, "longest_gap_before_kill_s": None}


def test_replica_spread_counts_only_versions_every_replica_answered():
    seen = {"a": {1: 10.0, 2: 12.0, 3: 14.0}, "b": {1: 10.4, 2: 12.1}}
    out = replica_spread(seen)
    assert out["versions_answered_by_every_replica"] == 2
    assert abs(out["per_version_s"][1] - 0.4) < 1e-9 and abs(out["per_version_s"][2] - 0.1) < 1e-9
    assert replica_spread({})["versions_answered_by_every_replica"] == 0
