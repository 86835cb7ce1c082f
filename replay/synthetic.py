"""The project's seeded synthetic interaction stream, with its ground truth (the embedded default data).

What the generator builds (all driven by one seed):
  topics       `n_topics` latent interests; every item belongs to exactly one (item_topic, 0-based).
  catalogue    items 1..n_initial_items exist from the start; items n_initial_items+1..num_items appear one by
               one over the stream, ids in order of appearance (the item table must grow).
  attributes   per item [topic + 1, brand]; brands split each topic's ring into `brands_per_topic` arcs, and
               with probability `brand_noise` an item carries a random brand instead. Attribute ids >= 1.
  users        every user holds 2-3 active interests (topics) with Dirichlet weights; at each drift point a
               fraction of users swap one active interest for a topic they did not hold (ground truth kept).
  dormant      with `dormant_topics` = D > 0, the last D topics are held and explored by nobody until their drift
               point: drift point k opens the dormant topics k, k + n_drifts, ... (round robin), and its drifting
               users swap into one of those (by topic weight), so a shift leads to an interest that nothing before
               it showed (a model frozen before it never saw one of its items consumed). D = 0 (the default) is
               the stream without dormant topics, draw for draw.
  sequences    per event: keep the previous event's interest (p_stay) or draw one by weight, or explore a
               random topic (p_explore). Within the topic, either continue from the user's last item of that
               topic along the topic's item ring (p_sequential; step 1 + Geometric(p_longer_step)), or draw
               by popularity: Zipf over a rank that rotates slowly round the topic; new items enter near its
               head. Topics themselves are skewed (topic_skew), so global popularity has a head and a tail.
  time         events share one clock: unix seconds, exponential gaps, non-decreasing.

`generate(config)` returns a `SyntheticStream`; `to_dataset()` gives the per-user `SequenceDataset` for the
leave-one-out harness and `iter_events()` the plain-dict event stream for the Kafka producer and the replay.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from replay.datasets import SequenceDataset


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything `generate` draws from; the defaults are the project's embedded stream (seed 0)."""

    n_users: int = 2000
    n_topics: int = 16  # latent interests
    n_initial_items: int = 3000
    n_new_items: int = 600  # appear one by one over the stream
    n_events: int = 60_000
    min_interests: int = 2  # active interests per user at any time
    max_interests: int = 3
    n_drifts: int = 3  # drift points, evenly spaced over the stream
    drift_fraction: float = 0.5  # share of users that swap one interest at each drift point
    dormant_topics: int = 0  # topics nobody holds or explores before their drift point opens them (module doc)
    min_events_per_user: int = 5
    activity_sigma: float = 1.0  # lognormal spread of user activity beyond the minimum
    interest_concentration: float = 2.0  # Dirichlet alpha of a user's interest weights
    topic_skew: float = 1.0  # users pick topics with probability ~ 1 / (topic + 1) ** topic_skew
    p_stay: float = 0.75  # keep the previous event's interest
    p_explore: float = 0.02  # a uniformly random topic instead
    p_sequential: float = 0.6  # continue along the topic ring from the user's last item of that topic
    p_longer_step: float = 0.5  # ring step = 1 + Geometric(p_longer_step)
    zipf_exponent: float = 1.2  # popularity within a topic ~ 1 / (rank + 1) ** zipf_exponent
    popularity_rotations: float = 0.2  # turns of the popularity head round each topic over the whole stream
    new_item_head_window: float = 0.05  # a new item enters at most this fraction of a turn ahead of the head
    brands_per_topic: int = 8
    brand_noise: float = 0.1
    start_time: int = 1_700_000_000  # unix seconds of the first event
    mean_gap_seconds: float = 45.0
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("n_users", "n_topics", "n_initial_items", "n_events", "min_interests", "brands_per_topic")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_new_items < 0 or self.n_drifts < 0 or self.min_events_per_user < 1 or self.dormant_topics < 0:
            raise ValueError(
                "SyntheticConfig: n_new_items, n_drifts and dormant_topics must be >= 0, min_events_per_user >= 1"
            )
        if not self.min_interests <= self.max_interests < self.n_topics:
            raise ValueError(
                "SyntheticConfig: need min_interests <= max_interests < n_topics (a drift needs a free "
                f"topic), got {self.min_interests}, {self.max_interests}, {self.n_topics}"
            )
        if self.dormant_topics and not (
            self.n_drifts <= self.dormant_topics and self.max_interests < self.n_topics - self.dormant_topics
        ):
            raise ValueError(
                "SyntheticConfig: dormant_topics needs n_drifts <= dormant_topics (each drift point opens one) "
                f"and max_interests < n_topics - dormant_topics, got dormant_topics={self.dormant_topics}, "
                f"n_drifts={self.n_drifts}, max_interests={self.max_interests}, n_topics={self.n_topics}"
            )
        if self.n_initial_items < self.n_topics:
            raise ValueError(
                "SyntheticConfig: every topic needs an initial item (n_initial_items >= n_topics)"
            )
        if self.n_events < self.min_events_per_user * self.n_users:
            raise ValueError(
                f"SyntheticConfig: n_events={self.n_events} < min_events_per_user * n_users "
                f"= {self.min_events_per_user * self.n_users}"
            )
        probabilities = ("drift_fraction", "p_stay", "p_explore", "p_sequential", "brand_noise")
        for name in probabilities:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SyntheticConfig.{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.p_longer_step < 1.0 or not 0.0 <= self.new_item_head_window <= 1.0:
            raise ValueError(
                "SyntheticConfig: p_longer_step must lie in [0, 1), new_item_head_window in [0, 1]"
            )
        if self.mean_gap_seconds < 0 or self.interest_concentration <= 0:
            raise ValueError("SyntheticConfig: mean_gap_seconds must be >= 0, interest_concentration > 0")


@dataclass(frozen=True, eq=False)
class DriftPoint:
    """Users who swapped one active interest at `event_index` (they hold new_topic from that event on)."""

    event_index: int
    timestamp: int
    users: np.ndarray  # (M,) user ids, ascending
    old_topic: np.ndarray  # (M,) the interest given up
    new_topic: np.ndarray  # (M,) the interest taken up


@dataclass(frozen=True, eq=False)
class SyntheticStream:
    """A generated stream and its ground truth. Arrays are read-only.

    Events, in time order (E = n_events):
      user_id, item_id, timestamp, event_index : (E,) int64; users 1..num_users, items 1..num_items
    Items, indexed by item id (row 0 = padding, -1 / absent):
      item_topic (N+1,), item_first_seen_event (N+1,), item_first_seen_time (N+1,); an item may take part only
      in events with event_index >= item_first_seen_event[item] (0 for the initial catalogue)
    Users, indexed by user id (row 0 unused, -1):
      user_interests (n_drifts + 1, U+1, max_interests): topics held in each period between drift points,
      -1 padded; period p covers events [drift p-1, drift p)
    """

    config: SyntheticConfig
    user_id: np.ndarray
    item_id: np.ndarray
    timestamp: np.ndarray
    event_index: np.ndarray
    item_topic: np.ndarray
    item_first_seen_event: np.ndarray
    item_first_seen_time: np.ndarray
    item_attributes: dict[int, list[int]]
    num_attributes: int
    user_interests: np.ndarray
    drift_points: tuple[DriftPoint, ...]

    @property
    def num_users(self) -> int:
        return self.config.n_users

    @property
    def num_items(self) -> int:
        return len(self.item_topic) - 1

    @property
    def num_events(self) -> int:
        return len(self.item_id)

    @property
    def drift_event_indices(self) -> np.ndarray:
        return np.asarray([d.event_index for d in self.drift_points], dtype=np.int64)

    def active_interests(self, user: int, event_index: int) -> tuple[int, ...]:
        """Topics `user` holds at `event_index` (ground truth)."""
        period = int(np.searchsorted(self.drift_event_indices, event_index, side="right"))
        return tuple(int(t) for t in self.user_interests[period, user] if t >= 0)

    def to_dataset(self, name: str = "synthetic") -> SequenceDataset:
        """Per-user sequences in time order (users 1..num_users), with timestamps and attributes."""
        order = np.argsort(self.user_id, kind="stable")  # stable: keeps time order within a user
        bounds = np.cumsum(np.bincount(self.user_id, minlength=self.num_users + 1)[1:])[:-1]
        return SequenceDataset(
            name=name,
            user_ids=np.arange(1, self.num_users + 1, dtype=np.int64),
            sequences=np.split(self.item_id[order], bounds),
            num_items=self.num_items,
            timestamps=np.split(self.timestamp[order], bounds),
            item_attributes={i: list(a) for i, a in self.item_attributes.items()},
            num_attributes=self.num_attributes,
        )

    def iter_events(self) -> Iterator[dict]:
        """Plain dicts in time order.

        Item events {"item_id", "attributes", "timestamp"}: every item once, when it first appears (the
        initial catalogue before the first feedback), always before its first feedback event.
        Feedback events {"event_id", "user_id", "item_id", "timestamp", "event_type": "view"}, with event ids
        "syn-<seed>-<event index>". All values are plain Python ints / strings / lists.
        """
        first_seen = self.item_first_seen_event.tolist()  # item ids are in order of first appearance
        seen_time = self.item_first_seen_time.tolist()
        next_item = 1
        prefix = f"syn-{self.config.seed}-"
        users, items, times = self.user_id.tolist(), self.item_id.tolist(), self.timestamp.tolist()
        for e in range(self.num_events):
            while next_item <= self.num_items and first_seen[next_item] <= e:
                yield {
                    "item_id": next_item,
                    "attributes": list(self.item_attributes[next_item]),
                    "timestamp": seen_time[next_item],
                }
                next_item += 1
            yield {
                "event_id": f"{prefix}{e}",
                "user_id": users[e],
                "item_id": items[e],
                "timestamp": times[e],
                "event_type": "view",
            }


def _read_only(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.flags.writeable = False


def _event_users(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """(E,) user id of every event: each user gets the minimum, the rest follows lognormal activity; users
    are spread uniformly over the stream."""
    activity = rng.lognormal(0.0, cfg.activity_sigma, cfg.n_users)
    extra = rng.multinomial(cfg.n_events - cfg.min_events_per_user * cfg.n_users, activity / activity.sum())
    counts = cfg.min_events_per_user + extra
    return rng.permutation(np.repeat(np.arange(1, cfg.n_users + 1, dtype=np.int64), counts))


def topic_opens(cfg: SyntheticConfig) -> np.ndarray:
    """(T,) the period from which each topic may be held or explored: 0, or k + 1 for a dormant topic that drift
    point k opens (dormant topics are the last `dormant_topics`, given to the drift points round robin)."""
    opens = np.zeros(cfg.n_topics, dtype=np.int64)
    dormant = np.arange(cfg.dormant_topics)
    opens[cfg.n_topics - cfg.dormant_topics :] = dormant % max(cfg.n_drifts, 1) + 1
    return opens


def _user_interests(cfg: SyntheticConfig, rng: np.random.Generator, drift_at: np.ndarray):
    """Interest slots per period (a swapped-in topic keeps the slot's weight), the cumulative slot weights
    per user, and the drift ground truth."""
    U, T, K = cfg.n_users, cfg.n_topics, cfg.max_interests
    opens = topic_opens(cfg)
    n_held = rng.integers(cfg.min_interests, cfg.max_interests + 1, U)
    # Distinct topics per user, drawn with topic weights w (Gumbel top-k: a draw without replacement).
    log_w = -cfg.topic_skew * np.log(np.arange(1, T + 1))
    keys = log_w[None, :] - np.log(-np.log(rng.random((U, T))))
    keys[:, opens > 0] = -np.inf  # dormant topics are not held before their drift point
    slots = np.argsort(-keys, axis=1)[:, :K].astype(np.int64)
    slots[np.arange(K)[None, :] >= n_held[:, None]] = -1
    weights = rng.gamma(cfg.interest_concentration, 1.0, (U, K)) * (slots >= 0)
    slot_cdf = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    slot_cdf[np.arange(K)[None, :] >= n_held[:, None] - 1] = 1.0  # exact: a draw in [0, 1) skips padding

    periods = [slots.copy()]
    swaps = []
    n_swap = int(round(cfg.drift_fraction * U))
    for d in range(len(drift_at)):
        cur = periods[-1].copy()
        rows = np.sort(rng.choice(U, n_swap, replace=False))
        slot = np.floor(rng.random(n_swap) * n_held[rows]).astype(np.int64)
        held = np.zeros((n_swap, T), dtype=bool)
        for k in range(K):
            valid = cur[rows, k] >= 0
            held[np.nonzero(valid)[0], cur[rows[valid], k]] = True
        if cfg.dormant_topics:  # drift point d moves users into the dormant topics it opens
            held |= (opens != d + 1)[None, :]
        keys = np.where(held, -np.inf, log_w[None, :] - np.log(-np.log(rng.random((n_swap, T)))))
        new = np.argmax(keys, axis=1).astype(np.int64)
        old = cur[rows, slot]
        cur[rows, slot] = new
        periods.append(cur)
        swaps.append((rows + 1, old, new))
    pad = np.full((len(periods), 1, K), -1, dtype=np.int64)
    user_interests = np.concatenate([pad, np.stack(periods)], axis=1)  # (P, U+1, K), row 0 unused
    return user_interests, slot_cdf, swaps


def _items(cfg: SyntheticConfig, rng: np.random.Generator):
    """Topics, first-seen event, ring position, popularity angle and attributes of items 1..N."""
    T, n0, n1, E = cfg.n_topics, cfg.n_initial_items, cfg.n_new_items, cfg.n_events
    topic = np.concatenate([rng.permutation(np.arange(n0) % T), rng.permutation(np.arange(n1) % T)])
    first_seen = np.concatenate([np.zeros(n0, np.int64), np.sort(rng.integers(1, E, n1))])
    ring_pos = rng.random(n0 + n1)
    head = (cfg.popularity_rotations * first_seen[n0:] / E) % 1.0
    angle = np.concatenate([rng.random(n0), (head + cfg.new_item_head_window * rng.random(n1)) % 1.0])

    B = cfg.brands_per_topic
    brand = np.minimum((ring_pos * B).astype(np.int64), B - 1) + topic * B
    noisy = rng.random(n0 + n1) < cfg.brand_noise
    brand[noisy] = rng.integers(0, T * B, int(noisy.sum()))
    attrs = np.stack([topic + 1, T + 1 + brand], axis=1).tolist()
    attributes = {i + 1: a for i, a in enumerate(attrs)}
    return topic, first_seen, ring_pos, angle, attributes, T + T * B


def generate(config: SyntheticConfig | None = None) -> SyntheticStream:
    """Generate the stream for `config` (defaults if None). Same config -> identical arrays."""
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    E, T = cfg.n_events, cfg.n_topics
    n_items = cfg.n_initial_items + cfg.n_new_items

    drift_at = (np.arange(1, cfg.n_drifts + 1, dtype=np.int64) * E) // (cfg.n_drifts + 1)
    user_interests, slot_cdf, swaps = _user_interests(cfg, rng, drift_at)
    topic, first_seen, ring_pos, angle, attributes, num_attributes = _items(cfg, rng)
    users = _event_users(cfg, rng)
    gaps = np.rint(rng.exponential(cfg.mean_gap_seconds, E)).astype(np.int64)
    gaps[0] = 0
    timestamp = cfg.start_time + np.cumsum(gaps)

    # Per topic: items in ring order and in popularity-angle order, as Python lists for the event loop.
    rings, pop_orders, pop_angles = [], [], []
    for t in range(T):
        members = np.nonzero(topic == t)[0]
        rings.append((members[np.argsort(ring_pos[members], kind="stable")] + 1).tolist())
        by_angle = members[np.argsort(angle[members], kind="stable")]
        pop_orders.append((by_angle + 1).tolist())
        pop_angles.append(angle[by_angle].tolist())
    ring_index = np.zeros(n_items + 1, dtype=np.int64)
    for ring in rings:
        ring_index[ring] = np.arange(len(ring))
    ring_index_l = ring_index.tolist()
    zipf_cdfs = {}
    for n in {len(r) for r in rings}:
        w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** cfg.zipf_exponent
        zipf_cdfs[n] = (np.cumsum(w) / w.sum()).tolist()
    first_seen_l = [0] + first_seen.tolist()

    def next_available(order: list[int], start: int, e: int) -> int:
        n = len(order)
        for k in range(n):
            item = order[(start + k) % n]
            if first_seen_l[item] <= e:
                return item
        raise AssertionError("a topic without any available item")  # excluded by config validation

    slot_cdfs = slot_cdf.tolist()
    period_interests = [p.tolist() for p in user_interests]
    period_of = np.searchsorted(drift_at, np.arange(E), side="right").tolist()
    opens = topic_opens(cfg)
    explorable = [np.nonzero(opens <= p)[0].tolist() for p in range(len(drift_at) + 1)]  # open topics per period
    head_phase = ((cfg.popularity_rotations * np.arange(E) / E) % 1.0).tolist()
    users_l = users.tolist()
    prng = random.Random(int(rng.integers(0, 2**63)))
    rnd = prng.random
    current = [-1] * (cfg.n_users + 1)  # topic of the user's previous event (-1: none yet)
    last_item: list[dict[int, int]] = [{} for _ in range(cfg.n_users + 1)]
    items_out = [0] * E
    for e in range(E):
        u = users_l[e]
        period = period_of[e]
        held = period_interests[period][u]
        if rnd() < cfg.p_explore:
            topics = explorable[period]
            t = topics[prng.randrange(len(topics))]
        elif current[u] >= 0 and current[u] in held and rnd() < cfg.p_stay:
            t = current[u]
        else:
            t = held[bisect_right(slot_cdfs[u - 1], rnd())]
        prev = last_item[u].get(t)
        if prev is not None and rnd() < cfg.p_sequential:
            step = 1
            while rnd() < cfg.p_longer_step:
                step += 1
            item = next_available(rings[t], ring_index_l[prev] + step, e)
        else:
            order = pop_orders[t]
            rank = bisect_right(zipf_cdfs[len(order)], rnd())
            offset = bisect_right(pop_angles[t], head_phase[e])
            item = next_available(order, offset + rank, e)
        last_item[u][t] = item
        current[u] = t
        items_out[e] = item

    item_id = np.asarray(items_out, dtype=np.int64)
    item_topic = np.concatenate([[-1], topic]).astype(np.int64)
    first_seen_event = np.concatenate([[-1], first_seen]).astype(np.int64)
    first_seen_time = np.concatenate([[-1], timestamp[first_seen]]).astype(np.int64)
    event_index = np.arange(E, dtype=np.int64)
    drift_points = tuple(
        DriftPoint(int(at), int(timestamp[at]), rows, old, new)
        for at, (rows, old, new) in zip(drift_at.tolist(), swaps, strict=True)
    )
    for d in drift_points:
        _read_only(d.users, d.old_topic, d.new_topic)
    _read_only(users, item_id, timestamp, event_index, item_topic, first_seen_event, first_seen_time)
    _read_only(user_interests)
    return SyntheticStream(
        config=cfg,
        user_id=users,
        item_id=item_id,
        timestamp=timestamp,
        event_index=event_index,
        item_topic=item_topic,
        item_first_seen_event=first_seen_event,
        item_first_seen_time=first_seen_time,
        item_attributes=attributes,
        num_attributes=num_attributes,
        user_interests=user_interests,
        drift_points=drift_points,
    )
