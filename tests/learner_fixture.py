"""A small seeded stream and learner shared by the data-parallel and device tests (no broker, no GPU).

`rounds(...)` cuts the stream into the rounds a K-rank learner takes: per round, each rank's item events and its
micro-batch of the feedback events whose user it owns (users split by a hash, as Kafka partitions by key). One
learner fed, per round, all item events and the ranks' feedback concatenated in rank order takes the same steps.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Sequence

from test_online import drive  # items first, then micro-batches of feedback (what replay does)

from replay.synthetic import SyntheticConfig, generate
from trainer.config import EncoderConfig, SparcConfig, TrainConfig
from trainer.online import OnlineLearner


def stream_events(n_events: int = 640, seed: int = 5) -> list[dict]:
    """A small synthetic stream: item events ({"item_id", "attributes"}) and feedback events, in time order."""
    stream = generate(SyntheticConfig(n_users=48, n_events=n_events, n_initial_items=90, n_new_items=10,
                                      seed=seed, min_events_per_user=3))
    return list(stream.iter_events())


def split(events: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(item events, feedback events)."""
    return [e for e in events if "event_id" not in e], [e for e in events if "event_id" in e]


def small_config(**over) -> SparcConfig:
    base = dict(num_items=0, num_attributes=64, codes=8,
                encoder=EncoderConfig(dim=16, max_len=8, layers=1, dropout=0.2))
    return SparcConfig(**{**base, **over})


def reference_learner(**learner_kwargs) -> OnlineLearner:
    """The single-process learner after 20 steps on the stream (dropout on: the private RNG is exercised)."""
    items, feedback = split(stream_events())
    learner = OnlineLearner(small_config(), TrainConfig(seed=0), **learner_kwargs)
    drive(learner, items, feedback)
    return learner


def owner(user: Hashable, ranks: int) -> int:
    return zlib.crc32(str(user).encode()) % ranks


def rounds(events: Sequence[dict], ranks: int, feedback_per_round: int = 64, held_back: tuple[int, int] = (2, 1),
           unannounced: int = 3) -> list[list[tuple[list[dict], list[dict]]]]:
    """Per round, per rank: (item events, feedback events) of a K-rank learner.

    A round reads the stream up to its next `feedback_per_round` feedback events; the item events among them go
    to rank round % K (every rank applies every rank's). Feedback goes to the rank that owns its user; in round
    held_back[0], rank held_back[1] gets none (its events wait for the next round: a rank without examples still
    takes part in the step). The item events of the last `unannounced` items are dropped: their rows come from
    the feedback that names them (the table grows on whichever rank reads it, and every rank follows)."""
    last = max(e["item_id"] for e in events if "event_id" not in e)
    out: list = []
    items: list[dict] = []
    waiting: list[list[dict]] = [[] for _ in range(ranks)]
    read = 0

    def close() -> None:
        r = len(out)
        per_rank = []
        for k in range(ranks):
            mine = items if k == r % ranks else []
            if (r, k) == held_back:
                per_rank.append((mine, []))
            else:
                per_rank.append((mine, waiting[k]))
                waiting[k] = []
        out.append(per_rank)

    for e in events:
        if "event_id" not in e:
            if e["item_id"] <= last - unannounced:
                items.append(e)
            continue
        waiting[owner(e["user_id"], ranks)].append(e)
        read += 1
        if read % feedback_per_round == 0:
            close()
            items = []
    if read % feedback_per_round:
        close()
    return out
