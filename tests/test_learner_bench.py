"""benchmarks/learner_bench.py's timing loop on a tiny learner (the benchmark itself needs Beauty)."""

from __future__ import annotations

from learner_fixture import small_config, split, stream_events

from benchmarks.learner_bench import batches, owner, time_rounds
from trainer.config import TrainConfig
from trainer.online import OnlineLearner


def test_time_rounds_times_all_but_the_warmup_rounds_and_counts_steps():
    items, feedback = split(stream_events(n_events=160))
    learner = OnlineLearner(small_config(), TrainConfig(seed=0))
    learner.observe_items(items)
    rounds = [(len(b), b) for b in batches(feedback, 32)]
    assert [n for n, _ in rounds] == [32] * 5 and [e for _, b in rounds for e in b] == feedback
    starts = []
    out = time_rounds(learner, rounds, warmup=2, start_clock=lambda: starts.append(learner.steps))
    assert out["events_timed"] == 96 and out["steps_timed"] == 3 and out["seconds"] > 0
    assert starts == [2]  # the clock started after the two warm-up steps
    assert out["events_per_second"] == 96 / out["seconds"]


def test_owner_splits_users_stably():
    assert {owner(u, 2) for u in range(100)} == {0, 1}
    assert owner("A1B2", 3) == owner("A1B2", 3)
