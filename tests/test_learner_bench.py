"""benchmarks/learner_bench.py's timing loop and benchmarks/stage_profile.py on a tiny learner (the benchmarks
need Beauty)."""

from __future__ import annotations

import pytest
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


def test_the_stage_profile_runs_every_stage_of_ingest_and_learn_over_every_event():
    from benchmarks.stage_profile import profile
    from streams.settings import WorkerSettings

    items, feedback = split(stream_events(n_events=160))
    s = WorkerSettings(batch_size=32, dim=16, max_len=5, layers=1, codes=8, num_attributes=200)
    out = profile(items, feedback, s, snapshot_every=2)
    stages = out["cpu_seconds_per_1000_events"]
    assert out["events"] == len(feedback) and out["train_messages"] == -(-len(feedback) // 32)
    assert out["steps"] > 0 and out["snapshots"] == out["train_messages"] // 2
    ingest = ["validate", "source", "route", "history", "example", "encode"]
    learn = ["decode", "input", "step", "capture", "publish"]
    assert set(stages) == {f"ingest.{k}" for k in ingest} | {f"learn.{k}" for k in learn} | {
        "ingest.total", "learn.total"}
    assert stages["learn.total"] == pytest.approx(sum(stages[f"learn.{k}"] for k in learn)) and stages["learn.step"] > 0
