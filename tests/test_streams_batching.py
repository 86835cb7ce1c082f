"""streams.history + streams.batching: the worker's way of feeding the learner (one train message per micro-batch)
equals replay's (no broker)."""

from __future__ import annotations

import torch

from replay.synthetic import SyntheticConfig, generate
from streams.batching import (
    encode_train_batches,
    learner_input,
    merge_watermarks,
    read_train_batch,
    train_batch,
)
from streams.history import apply_feedback, history_of
from streams.records import Feedback, Source, TrainExample
from trainer.config import EncoderConfig, SparcConfig, TrainConfig
from trainer.online import OnlineLearner, advance_histories

MAX_LEN, WINDOW = 5, 8


def example(user: str, item: int, history: list[int], offset: int, partition: int = 0) -> TrainExample:
    event = Feedback(event_id=f"e{offset}", user_id=user, item_id=item, timestamp=1.7e9, event_type="view")
    return TrainExample(
        event=event, history=history, source=Source(topic="fb", partition=partition, offset=offset)
    )


def test_apply_feedback_dedups_within_the_window_and_returns_the_history_before():
    first = apply_feedback(None, "a", 3, MAX_LEN, WINDOW)
    assert first.history == [] and first.state == {"items": [3], "recent": ["a"]}
    assert apply_feedback(first.state, "a", 3, MAX_LEN, WINDOW) is None
    second = apply_feedback(first.state, "b", 4, MAX_LEN, WINDOW)
    assert second.history == [3] and history_of(second.state) == [3, 4]
    assert history_of(None) == []


def test_a_train_batch_keeps_each_users_first_history_and_the_highest_offsets():
    batch = [example("u", 3, [1, 2], 10), example("v", 7, [], 4, partition=1), example("u", 4, [1, 2, 3], 11)]
    read_at = [Source(topic="train", partition=0, offset=o) for o in (40, 41, 42)]
    inp = learner_input([train_batch(batch)], read_at=read_at)
    assert [e["item_id"] for e in inp.events] == [3, 7, 4]
    assert inp.histories == {"u": [1, 2], "v": []}
    assert inp.watermark == {"fb:0": 12, "fb:1": 5, "train:0": 43}
    into = {"fb:0": 20}
    merge_watermarks(into, inp.watermark)
    assert into == {"fb:0": 20, "fb:1": 5, "train:0": 43}


def test_worker_feeding_equals_replay_feeding():
    """The ingest agent's per-event histories, re-assembled per micro-batch, train the learner exactly as
    replay's dict of histories does (same seed, same batches): same weights bit for bit."""
    stream = generate(SyntheticConfig(n_users=30, n_events=700, n_initial_items=80, n_new_items=8, seed=2))
    items = [e for e in stream.iter_events() if "event_id" not in e]
    feedback = [e for e in stream.iter_events() if "event_id" in e]
    cfg = SparcConfig(
        num_items=0, num_attributes=100, codes=8, encoder=EncoderConfig(dim=16, max_len=MAX_LEN, layers=1)
    )
    worker, replay = OnlineLearner(cfg, TrainConfig(seed=4)), OnlineLearner(cfg, TrainConfig(seed=4))
    worker.observe_items(items)
    replay.observe_items(items)

    table: dict = {}  # what the ingest agent keeps
    examples = []
    for offset, e in enumerate(feedback):
        user = str(e["user_id"])
        applied = apply_feedback(table.get(user), e["event_id"], e["item_id"], MAX_LEN, WINDOW)
        table[user] = applied.state
        examples.append(
            TrainExample(
                event=Feedback.model_validate({**e, "user_id": user}),
                history=applied.history,
                source=Source(topic="fb", partition=0, offset=offset),
            )
        )
    histories: dict = {}
    for start in range(0, len(feedback), 32):
        [message] = encode_train_batches(examples[start : start + 32], 900_000)  # what ingest sends
        inp = learner_input([read_train_batch(message)])  # what the train agent learns
        worker.learn(inp.events, inp.histories)
        chunk = [{**e, "user_id": str(e["user_id"])} for e in feedback[start : start + 32]]
        replay.learn(chunk, histories)
        advance_histories(histories, chunk, MAX_LEN)

    assert worker.steps == replay.steps > 0
    a, b = worker.snapshot_state(), replay.snapshot_state()
    for name in a.weights:
        assert torch.equal(a.weights[name], b.weights[name]), name
    assert {u: s["items"] for u, s in table.items()} == histories


def test_a_train_message_round_trips_and_a_large_batch_is_split_in_order():
    batch = [example("u", 3, [1, 2], 10), example("v", 7, [], 4, partition=1), example("u", 4, [1, 2, 3], 11),
             example("w", 5, [9] * 5, 12)]
    [message] = encode_train_batches(batch, 10_000)
    assert read_train_batch(message) == train_batch(batch)
    inp = learner_input([read_train_batch(message)], read_at=[Source(topic="train", partition=0, offset=7)])
    assert inp == learner_input([train_batch(batch)], read_at=[Source(topic="train", partition=0, offset=7)])
    assert inp.watermark == {"fb:0": 13, "fb:1": 5, "train:0": 8}

    parts = [read_train_batch(m) for m in encode_train_batches(batch, len(message) - 1)]  # too large: halved
    assert [[e.event_id for e in p.events] for p in parts] == [["e10", "e4"], ["e11", "e12"]]
    assert [p.histories for p in parts] == [{"u": [1, 2], "v": []}, {"u": [1, 2, 3], "w": [9] * 5}]
    assert len(encode_train_batches(batch[:1], 10)) == 1  # a single event is never split


def test_messages_of_several_train_partitions_joined_give_every_event_the_history_one_message_gives():
    """Ingest splits a micro-batch by train partition (streams.routing: a user's examples in one of them) and the
    learner joins the messages it reads into one step: every event keeps the history it had in one message."""
    from streams.routing import home_partition, train_partition
    from trainer.online import event_histories

    users = [f"u{n}" for n in range(12)]
    rows, table = [], {}
    for n in range(90):
        user = users[(n * 7) % len(users)]
        applied = apply_feedback(table.get(user), f"e{n}", n % 17 + 1, MAX_LEN, WINDOW)
        table[user] = applied.state
        rows.append(example(user, n % 17 + 1, applied.history, n, partition=home_partition(user, 4)))
    whole = learner_input([train_batch(rows)])
    by_partition: dict[int, list] = {}
    for ex in rows:
        by_partition.setdefault(train_partition(ex.source.partition, 2), []).append(ex)
    assert len(by_partition) == 2  # the users spread over both train partitions
    messages = [read_train_batch(m) for p in sorted(by_partition) for m in encode_train_batches(by_partition[p], 600)]
    assert len(messages) > 2  # some partitions' parts were split by size too
    joined = learner_input(messages)
    assert sorted(e["event_id"] for e in joined.events) == sorted(e["event_id"] for e in whole.events)
    assert joined.watermark == whole.watermark

    def before(inp):
        return {e["event_id"]: h for e, h in zip(inp.events, event_histories(inp.events, inp.histories, MAX_LEN),
                                                 strict=True)}

    assert before(joined) == before(whole)
