"""Prequential (test-then-train) replay: logged events, in time order, through the worker's own step functions.

    engine = Prequential(ReplaySettings(...), total=source.feedback)
    for windows in engine.run(source.records()):     # {variant: metrics} each time a window closes
        ...
    report = engine.report()                          # or replay(records, settings, total) for both at once

Per micro-batch of B feedback events (the worker's train-agent batch):
  1. catalogue  the item events read among them -> OnlineLearner.observe_items on every live model (an item
                is rankable only for the feedback events read after its item event);
  2. ingest     streams.history.apply_feedback per event (the worker's ingest: de-duplication by event id and
                the user's history BEFORE the event, which already holds the user's earlier events in the batch);
  3. test       every live model scores the batch's events (at most `eval_per_batch` of them, the same seeded
                sample for every variant) against its whole catalogue with SparcModel.score, and the rank of
                the event's item is recorded; nothing of this batch has been learnt yet;
  4. train      events at least `delay_events` events and `delay_seconds` seconds older than the newest event
                read are released to OnlineLearner.learn in micro-batches of exactly B (streams.batching's
                TrainBatch view: each user's history before its first event in the batch), so with delay 0
                the model learns each batch right after testing it; at the end of the stream the rest is learnt;
  5. schedule   the freeze point (the first batch boundary at or after `freeze_at` events) and periodic
                retrains (below); a window closes when it holds `window_events` events (or spans
                `window_seconds`) -- windows, the freeze point and retrains fall on batch boundaries.

Items: events name items by external ids (int or str). Replay numbers them 1, 2, ... in the order it first
reads them (its item index: every per-item array here is indexed by it, so an id's value costs nothing) and the
models learn and are told of items by that index; each model's vocabulary (trainer.vocab, bounded by
`catalogue`, the worker's) maps it to rows of its item table, and scoring translates between the two. `Scored`
names items by their external ids again.

What a model knows (no future): an item is in the catalogue from its item event on, or from the feedback event
after the one that first names it (a target never seen before is a miss: it cannot be ranked); items a model
was never told of (or has evicted) are masked from its rankings and left out of its inputs. Users' first events
have no history and are not scored ("cold").

Variants = regimes x scoring modes, all over the same events and the same scored sample:
  regimes  evolving  the online learner (the product), learning every released micro-batch.
           frozen    the online learner as it is at the freeze point, then fixed (eval, codebooks frozen; new
                     items still enter its catalogue through their attributes).
           periodic  retrained from scratch at the freeze point and every `retrain_every` events after it, on
                     every event released to learning so far (per-user sequences, every position predicts,
                     `retrain_epochs` epochs of trainer.Trainer.step), fixed in between.
           Before the freeze point the three are ONE model: the online learner (learnt once, scored once).
  modes    ScoreMode: soft search (top_codes, temperature, global_mix) or hard (argmax code); a sweep over
           temperature / top_codes is a list of soft modes. By default a mode ranks the whole catalogue (the
           model's factorised probabilities); with served=N it ranks only what serving returns with N slots
           (trainer.search.soft_search's per-code quotas over the top codes' lists, or hard_search's one list),
           and a target outside that list is a miss. Modes share the regime's model: only scoring repeats
           (one catalogue and one encoder pass per model and micro-batch; fixed models keep their catalogue
           between batches, see CatalogueCache). `extra_variants` adds (regime, mode) pairs beyond
           regimes x modes, e.g. hard search and an exploration sweep on the evolving model only.
  names    "evolving" when every variant uses one mode, else "evolving/soft", "evolving/hard",
           "evolving/soft:k=8:t=2", ...

Per window and variant: Recall/NDCG@{10,20,50}; coverage@20 (distinct items in the window's top-20 lists over
the items known at the window's end); tail_share@20 (share of top-20 slots given to items outside the 20% most
interacted-with known items, counted at the window's end); new_share@20 (share of slots given to items first
seen at most one window length before the scored event; the catalogue known before the first event is not
new); new_items_reached@N (items that reached N top-20 retrievals while still new); first_interactions and
recall@20_first / recall@20_rest (Recall@20 apart on events that are their item's first interaction, and on
the others); codebook health of the model at the window's end over the known items (trainer.rq.code_health)
and its drift from the regime's previous window (codebook_store.drift.code_drift: code_changed_share, and
level1_changed_share, the share of items whose level-1 code -- their interest -- changed); the interest churn
of users (`top_interests`: the argmax of each user's interest distribution at the window's end, for every user
seen so far): top_interest_changed_share over the users seen at both ends of the window, and
top_interest_changed_share_idle over those of them without an event in the window (their history is unchanged:
a change is the model's alone).
"overall" pools every scored event (windows add up to it: rank metrics are scored-weighted means, shares are
slot-weighted means, reach counts sum; coverage is the union); "after_freeze" pools the events scored after the
freeze point, where the regimes differ. The overall churn figures are the mean and the largest value over the
windows that have a previous one (level1_churn, level1_churn_max, top_interest_churn, top_interest_churn_idle).
With `eval_per_batch`, retrieval counts come from the scored sample.

Finer than windows: `windowed_recall` (Recall@k over any event windows, from an observer's positions and ranks)
and `recovery` (after a shift in the stream: the pre-shift level and the events until a model is back at a share
of it; benchmarks/drift_bench.py).
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, NamedTuple

import numpy as np
import torch

from codebook_store.drift import code_drift
from replay.metrics import ranking_metrics, target_ranks
from replay.sources import is_feedback
from streams.history import apply_feedback, history_of
from trainer.batches import bucketed_batches, pad_histories
from trainer.config import EXPLORATION, ONLINE_TRAINING, CatalogueConfig, SparcConfig, TrainConfig
from trainer.device import model_device
from trainer.online import OnlineLearner
from trainer.rq import code_health
from trainer.vocab import ItemId

REGIMES = ("evolving", "frozen", "periodic")
KS = (10, 20, 50)
NEVER = np.iinfo(np.int64).max  # known_at of an item not known yet


def worker_model_config(**overrides) -> SparcConfig:
    """The worker's model defaults (streams.settings.WorkerSettings), without reading the environment: SparcConfig's
    with the online training options (trainer.config.ONLINE_TRAINING)."""
    return SparcConfig(**{"num_items": 0, "num_attributes": 1024, **ONLINE_TRAINING, **overrides})


@dataclass(frozen=True)
class ScoreMode:
    """How a model ranks the catalogue (SparcModel.score's arguments)."""

    search: Literal["soft", "hard"] = "soft"
    top_codes: int = 4
    temperature: float = 1.0
    global_mix: float = 0.0
    # > 0: rank within what serving returns with this many slots (trainer.search.soft_search's quotas over the
    # top codes' lists, or hard_search's one list); every other item is a miss. 0: rank the whole catalogue.
    served: int = 0
    # exploration slots (soft search): the first `exploit` slots by probability, the rest by p(i|u) / q(i)^lift
    exploit: int | None = None
    lift: float = 0.0

    def __post_init__(self) -> None:
        if self.search not in ("soft", "hard"):
            raise ValueError(f"search must be soft or hard, got {self.search!r}")
        if self.top_codes < 1 or not self.temperature > 0 or not 0 <= self.global_mix < 1:
            raise ValueError("a score mode needs top_codes >= 1, temperature > 0 and 0 <= global_mix < 1")
        if self.served < 0 or (self.served and self.search == "soft" and self.served < self.top_codes):
            raise ValueError("served lists need served >= top_codes (a slot per code), or 0 for full ranking")
        if self.served and self.global_mix:
            raise ValueError("served lists have no global mix")
        if self.exploit is not None and (self.search != "soft" or self.exploit < self.top_codes):
            raise ValueError("exploration slots are soft search's, with exploit >= top_codes (a slot per code)")

    @property
    def name(self) -> str:
        suffix = f":served={self.served}" if self.served else ""
        if self.exploit is not None:
            suffix += f":x={self.exploit}:lift={self.lift:g}"
        if self.search == "hard":
            return "hard" + suffix
        default = ScoreMode()
        parts = ["soft"]
        if self.top_codes != default.top_codes:
            parts.append(f"k={self.top_codes}")
        if self.temperature != default.temperature:
            parts.append(f"t={self.temperature:g}")
        if self.global_mix != default.global_mix:
            parts.append(f"mix={self.global_mix:g}")
        return ":".join(parts) + suffix

    @classmethod
    def parse(cls, text: str) -> ScoreMode:
        """"soft", "hard", "soft:k=8:t=2:mix=0.25", "hard:served=50", "soft:served=20:x=10:lift=1" (k = top_codes,
        t = temperature, mix = global_mix, served = served list length, x = exploit slots or "off", lift = their
        lift). Served soft lists are what /retrieve serves: with the worker's exploration slots
        (trainer.config.EXPLORATION) unless x= says otherwise ("soft:served=20:x=off": plain); ranked modes have
        none unless x= is given."""
        head, *opts = text.strip().split(":")
        keys = {"k": ("top_codes", int), "t": ("temperature", float), "mix": ("global_mix", float),
                "served": ("served", int), "x": ("exploit", int), "lift": ("lift", float)}
        kwargs: dict = {"search": head}
        if head == "hard" and any(not o.startswith("served=") for o in opts):
            raise ValueError(f"{text!r}: hard search takes only served= (it uses the single most probable code)")
        for opt in opts:
            key, _, value = opt.partition("=")
            if key not in keys:
                raise ValueError(f"{text!r}: unknown option {key!r}; expected k=, t=, mix=, served=, x= or lift=")
            name, kind = keys[key]
            try:
                kwargs[name] = None if opt == "x=off" else kind(value)
            except ValueError:
                raise ValueError(f"{text!r}: {key}={value!r} is not a number") from None
        if head == "soft" and kwargs.get("served") and "exploit" not in kwargs:  # as /retrieve serves by default
            first = max(EXPLORATION.exploit, kwargs.get("top_codes", cls.top_codes))  # a slot per code searched
            kwargs.update(exploit=first if kwargs["served"] > first else None,
                          lift=kwargs.get("lift", EXPLORATION.lift))
        return cls(**kwargs)


@dataclass(frozen=True)
class ReplaySettings:
    """Everything a replay depends on besides its events (the defaults are the worker's where it has one)."""

    model: SparcConfig = field(default_factory=worker_model_config)
    train: TrainConfig = TrainConfig(batch_size=64)
    catalogue: CatalogueConfig = CatalogueConfig()  # every model's item vocabulary (the worker's defaults)
    regimes: tuple[str, ...] = REGIMES
    modes: tuple[ScoreMode, ...] = (ScoreMode(),)
    # variants beyond regimes x modes, e.g. (("evolving", ScoreMode(search="hard")),): a soft/hard comparison or an
    # exploration sweep on one regime without scoring every regime in every mode
    extra_variants: tuple[tuple[str, ScoreMode], ...] = ()
    batch_size: int = 64  # B: micro-batch of the test and of the online learning step
    delay_events: int = 0  # a model learns an event only once this many newer events were read ...
    delay_seconds: float = 0.0  # ... and the newest event read is at least this much later
    window_events: int | None = None  # events per window; None: windows of about a tenth of the stream
    window_seconds: float | None = None  # windows by event time instead
    freeze_at: float = 0.2  # freeze point: a share of the stream (< 1) or a number of events (>= 1)
    retrain_every: int | None = None  # periodic retrain interval in events; None: the window length in events
    retrain_epochs: int = 5
    retrain_batch_size: int = 64
    eval_per_batch: int | None = None  # score at most this many events per micro-batch (None: all)
    reach_n: int = 10  # new_items_reached@N
    top_n: int = 20
    dedup_window: int = 256  # recent event ids remembered per user (the worker's default)
    seed: int = 0  # the scored sample; the models' seed is train.seed
    device: str = "cpu"  # where the models learn and score (trainer.device: auto, cpu, cuda)

    def __post_init__(self) -> None:
        unknown = [r for r in (*self.regimes, *(r for r, _ in self.extra_variants)) if r not in REGIMES]
        if unknown or not (self.regimes or self.extra_variants):
            raise ValueError(
                f"unknown regime(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(REGIMES)}"
            )
        if len(set(self.regimes)) != len(self.regimes) or not self.modes:
            raise ValueError("regimes must be distinct and at least one score mode is needed")
        if len({m.name for m in self.modes}) != len(self.modes):
            raise ValueError("score modes must be distinct")
        if not all(isinstance(m, ScoreMode) for _, m in self.extra_variants):
            raise ValueError("extra_variants must be (regime, ScoreMode) pairs")
        names = [n for n, _, _ in self.variant_names()]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate variant(s): {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
        if self.batch_size < 1 or self.delay_events < 0 or self.delay_seconds < 0 or self.freeze_at < 0:
            raise ValueError("batch_size must be >= 1; delays and freeze_at >= 0")
        if self.window_events is not None and self.window_events < 1:
            raise ValueError("window_events must be >= 1")
        if self.window_seconds is not None and not self.window_seconds > 0:
            raise ValueError("window_seconds must be > 0")
        if self.retrain_every is not None and self.retrain_every < 1:
            raise ValueError("retrain_every must be >= 1")
        if self.eval_per_batch is not None and self.eval_per_batch < 1:
            raise ValueError("eval_per_batch must be >= 1")
        if self.retrain_epochs < 1 or self.retrain_batch_size < 1 or self.reach_n < 1 or self.top_n < 1:
            raise ValueError("retrain_epochs, retrain_batch_size, reach_n and top_n must be >= 1")

    @property
    def all_regimes(self) -> tuple[str, ...]:
        """Every regime a variant uses (`regimes`, then those only `extra_variants` name), each once."""
        return tuple(dict.fromkeys([*self.regimes, *(r for r, _ in self.extra_variants)]))

    def variant_names(self) -> list[tuple[str, str, ScoreMode]]:
        """(variant name, regime, mode) for every variant: regimes x modes (regimes first), then the extra ones.
        Names are the regime alone when every variant uses the same mode, else REGIME/MODE."""
        pairs = [(r, m) for r in self.regimes for m in self.modes] + list(self.extra_variants)
        if len({m.name for _, m in pairs}) == 1:
            return [(r, r, m) for r, m in pairs]
        return [(f"{r}/{m.name}", r, m) for r, m in pairs]

    def to_json(self) -> dict:
        out = asdict(self)
        out["modes"] = [m.name for m in self.modes]
        out["extra_variants"] = [f"{r}/{m.name}" for r, m in self.extra_variants]
        return out


def parse_variants(text: str, modes: Sequence[ScoreMode] = (ScoreMode(),)) -> dict:
    """`--variants` text -> ReplaySettings keyword arguments {"regimes", "modes", "extra_variants"}.

    "evolving,frozen,periodic" -> the regimes (each scored in every mode of `modes`); "REGIME/MODE" entries
    (e.g. "evolving/hard", "evolving/soft:t=2") are extra variants, scored in that mode only. Raises ValueError."""
    regimes, extra = [], []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        regime, slash, mode = entry.partition("/")
        if slash:
            extra.append((regime.strip(), ScoreMode.parse(mode)))
        else:
            regimes.append(regime)
    return {"regimes": tuple(regimes), "modes": tuple(modes), "extra_variants": tuple(extra)}


class Scored(NamedTuple):
    """What one variant made of one micro-batch (given to `run`'s observer; arrays over the scored events)."""

    variant: str
    event_ids: list[str]
    positions: np.ndarray  # (S,) index of each event in the replay (feedback events, duplicates excluded)
    ranks: np.ndarray  # (S,) 0-based rank of the event's item; a miss (item unknown to the model) ranks >= N
    top: np.ndarray  # (S, top_n) external item ids best first (object dtype for string ids); 0 where the model
    #                 knows fewer items


class CatalogueCache:
    """The no-grad catalogue (z and codes of every item) of each live model, reused while its weights are unchanged.

    Scoring needs the whole catalogue; recomputing it (the item tower and residual quantisation of every item) on
    every scoring call was most of a replay's scoring time. A model's catalogue stays valid until its optimiser
    takes a step (OnlineLearner.steps moves), a row changes hands (an eviction) or it is replaced (the frozen
    copy, a periodic retrain: another learner; a restored snapshot: another model). Item events only touch their
    own rows (z_i depends on item i's ID row and attributes alone; its codes on z_i and the codebooks), so
    `touched(learner, rows)` marks those rows and `get` recomputes just them and the rows of a grown table --
    row for row the same numbers as a full recomputation (tests/test_replay_prequential.py checks it).
    """

    MIN_ROWS = 64

    def __init__(self) -> None:
        # id(learner) -> [learner, steps, Catalogue, dirty rows, model, evictions]
        self._entries: dict[int, list] = {}
        self.full = 0  # full computations and incremental updates so far (for the benchmarks)
        self.partial = 0

    @torch.no_grad()
    def get(self, learner: OnlineLearner):
        model = learner.model
        entry = self._entries.get(id(learner))
        if (entry is None or entry[0] is not learner or entry[4] is not model or entry[1] != learner.steps
                or entry[5] != learner.vocab.evictions):
            cat = model.catalogue()
            self._entries[id(learner)] = [learner, learner.steps, cat, set(), model, learner.vocab.evictions]
            self.full += 1
            return cat
        cat, dirty = entry[2], entry[3]
        rows = model.items.num_items + 1
        held = cat.z.shape[0]
        todo = sorted(i for i in dirty if i < held) + list(range(held, rows))
        if not todo:
            return cat
        idx = torch.as_tensor(todo, dtype=torch.long, device=cat.z.device)
        # at least MIN_ROWS rows (padded with rows 1, 2, ... whose results are dropped): BLAS takes other code
        # paths for a matrix of very few rows, whose rounding differs from the full catalogue's
        pad = torch.arange(1, max(0, self.MIN_ROWS - len(todo)) + 1, device=cat.z.device).clamp(max=rows - 1)
        z_new = model.items(torch.cat([idx, pad]))
        codes_new = model.codes_of(z_new, torch.cat([idx, pad]))[: len(todo)]
        z_new = z_new[: len(todo)]
        z, codes = cat.z, cat.codes
        if rows > held:  # out of place: a catalogue handed out earlier never changes under its holder
            z = torch.cat([z, z.new_zeros(rows - held, z.shape[1])])
            codes = torch.cat([codes, codes.new_zeros(rows - held, codes.shape[1])])
        cat = type(cat)(z=z.index_copy(0, idx, z_new), codes=codes.index_copy(0, idx, codes_new))
        entry[2], entry[3] = cat, set()
        self.partial += 1
        return cat

    def touched(self, learner: OnlineLearner, rows: Iterable[int]) -> None:
        """Item events were applied to `learner` (OnlineLearner.observe_items): these rows must be recomputed."""
        entry = self._entries.get(id(learner))
        if entry is not None and entry[0] is learner:
            entry[3].update(rows)

    def retain(self, learners: Iterable[OnlineLearner]) -> None:
        """Forget every model but these (models no longer in use)."""
        keep = {id(x) for x in learners}
        self._entries = {k: v for k, v in self._entries.items() if k in keep}


@torch.no_grad()
def score_modes(
    learner: OnlineLearner,
    histories: Sequence[Sequence[int]],
    targets: np.ndarray,
    positions: np.ndarray,
    known_at: np.ndarray,
    modes: Sequence[ScoreMode],
    top_n: int,
    catalogue=None,
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """For each mode: ranks (S,) of `targets`, top-n lists (S, top_n) from the model's whole catalogue, seconds.

    Items are rows of the model's table: histories hold rows, targets are rows (0: an item the model does not
    hold), top lists are rows. The item of row r is rankable for the event at replay index p when
    known_at[r] <= p; every other item scores -inf, and a target that is not rankable gets rank N + 1 (a miss at
    any k).
    The modes share one catalogue (`catalogue`, the model's current one if None) and one encoder pass; each
    mode's scores are SparcModel.score's. The first mode's seconds include the shared work.
    """
    start = time.perf_counter()
    model = learner.model
    n = model.items.num_items
    max_len = model.cfg.encoder.max_len
    hist = [np.asarray([i for i in h if i <= n], dtype=np.int64) for h in histories]
    device = model_device(model)
    inputs, lengths = (t.to(device) for t in pad_histories(hist, max_len))
    model.eval()
    known = known_at[: n + 1]
    if len(known) < n + 1:  # rows the model holds that the caller never marked known
        known = np.concatenate([known, np.full(n + 1 - len(known), NEVER, dtype=np.int64)])
    hidden = torch.from_numpy(known[None, :] > positions[:, None]).to(device)  # (S, N+1)
    hidden[:, 0] = True
    t = torch.from_numpy(np.minimum(targets, n))
    k = min(top_n, n)
    out = []
    cat = model.catalogue() if catalogue is None else catalogue
    state = model.encode(inputs, lengths, cat.z)  # one encoder pass for every mode
    for mode in modes:
        scores = model.score_encoded(state, cat, search=mode.search, top_codes=mode.top_codes,
                                     temperature=mode.temperature, global_mix=mode.global_mix,
                                     served=mode.served, exclude=hidden, exploit=mode.exploit,
                                     lift=mode.lift).float().cpu()  # (S, N+1)
        ranks = target_ranks(scores, t).numpy().copy()
        rankable = (targets <= n) & torch.isfinite(scores.gather(1, t[:, None]))[:, 0].numpy()
        ranks[~rankable] = n + 1
        values, ids = scores.topk(k, dim=1) if k else (scores[:, :0], scores[:, :0].long())
        ids = torch.where(torch.isfinite(values), ids, torch.zeros_like(ids)).numpy()
        top = np.zeros((len(targets), top_n), dtype=np.int64)
        top[:, :k] = ids
        now = time.perf_counter()
        out.append((ranks, top, now - start))
        start = now
    return out


def score_events(
    learner: OnlineLearner,
    histories: Sequence[Sequence[int]],
    targets: np.ndarray,
    positions: np.ndarray,
    known_at: np.ndarray,
    mode: ScoreMode,
    top_n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """score_modes for one mode, without timing: (ranks (S,), top-n lists (S, top_n))."""
    ranks, top, _ = score_modes(learner, histories, targets, positions, known_at, (mode,), top_n)[0]
    return ranks, top


def first_interaction_split(ranks: np.ndarray, firsts: np.ndarray) -> dict:
    """Recall@20 apart on the events that are their item's first interaction (a brand-new item: only its
    attributes can place it) and on the rest; None where there is no such event."""
    out: dict = {"first_interactions": int(firsts.sum())}
    for key, sel in (("recall@20_first", firsts), ("recall@20_rest", ~firsts)):
        out[key] = float((ranks[sel] < 20).mean()) if sel.any() else None
    return out


@torch.no_grad()
def top_interests(model, histories: Sequence[Sequence[int]], catalogue, batch_size: int = 1024) -> np.ndarray:
    """The most probable level-1 code under `model`'s interest distribution for each history (items the model's
    table does not hold are left out, as in scoring); -1 for a history left empty."""
    model.eval()
    n = model.items.num_items
    out = np.full(len(histories), -1, dtype=np.int64)
    kept = [np.asarray([i for i in h if i <= n], dtype=np.int64) for h in histories]
    rows = [r for r, h in enumerate(kept) if len(h)]
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        inputs, lengths = pad_histories([kept[r] for r in part], model.cfg.encoder.max_len)
        device = catalogue.z.device
        state = model.encode(inputs.to(device), lengths.to(device), catalogue.z)
        out[part] = model.interest_logits(state.h, catalogue.z, catalogue.codes).argmax(-1).cpu().numpy()
    return out


def interest_churn(before: Mapping | None, after: Mapping) -> dict:
    """Users' top interests at two moments, {user: (top interest, last event id)} each -> the share of the users
    in both whose top interest changed, and the same over those without an event in between (_idle). None where
    there is nothing to compare."""
    both = [u for u in after if before is not None and u in before]
    idle = [u for u in both if before[u][1] == after[u][1]]

    def share(users: list) -> float | None:
        return sum(before[u][0] != after[u][0] for u in users) / len(users) if users else None

    return {"top_interest_changed_share": share(both), "top_interest_changed_share_idle": share(idle),
            "churn_users": len(both), "churn_users_idle": len(idle)}


def churn_summary(windows: Sequence[Mapping]) -> dict:
    """A variant's churn over its windows: the mean and the largest level-1 churn, and the mean top-interest
    churn (all users, idle users), over the windows that have a previous one (None without any)."""
    out: dict = {}
    for name, key in (("level1_churn", "level1_changed_share"), ("top_interest_churn", "top_interest_changed_share"),
                      ("top_interest_churn_idle", "top_interest_changed_share_idle")):
        values = [w[key] for w in windows if w.get(key) is not None]
        out[name] = float(np.mean(values)) if values else None
        if name == "level1_churn":
            out["level1_churn_max"] = float(max(values)) if values else None
    return out


class _Pending(NamedTuple):
    position: int
    timestamp: float
    event: dict
    history: list[int]
    first: bool  # no earlier feedback named the event's item (its first interaction)


@dataclass
class _Window:
    start_event: int
    start_ts: float | None = None
    end_ts: float | None = None
    events: int = 0
    scored: int = 0
    cold: int = 0
    duplicates: int = 0
    new_items: int = 0


@dataclass
class _Track:
    """One variant's accumulators: the current window and the whole run."""

    ranks: list = field(default_factory=list)
    firsts: list = field(default_factory=list)
    tops: list = field(default_factory=list)
    new_slots: int = 0
    reached: int = 0
    retrievals: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    all_ranks: list = field(default_factory=list)
    all_firsts: list = field(default_factory=list)
    after_freeze: list = field(default_factory=list)
    covered: set = field(default_factory=set)
    slots: int = 0
    tail_slots: float = 0.0
    all_new_slots: int = 0
    all_reached: int = 0
    windows: list = field(default_factory=list)
    score_seconds: float = 0.0


class Prequential:
    """The replay engine. `run(records)` yields one {variant: window metrics} per closed window; `report()`
    gives the whole result after it. `total` (feedback events, if known) sizes the default windows and a
    fractional freeze point."""

    def __init__(self, settings: ReplaySettings, total: int | None = None):
        s = self.s = settings
        if s.freeze_at < 1 and total is None:
            raise ValueError("a fractional freeze_at needs the stream's length (total)")
        if s.window_events is None and s.window_seconds is None and total is None:
            raise ValueError("windows need window_events, window_seconds or the stream's length (total)")
        if "periodic" in s.all_regimes and s.retrain_every is None and s.window_events is None and total is None:
            raise ValueError("periodic retrains need retrain_every, window_events or the stream's length (total)")
        self.freeze_at = int(math.ceil(s.freeze_at * total)) if s.freeze_at < 1 else int(s.freeze_at)
        default_window = max(s.batch_size, int(math.ceil((total or 0) / 10 / s.batch_size)) * s.batch_size)
        self.window_events = s.window_events or (None if s.window_seconds else default_window)
        self.retrain_every = s.retrain_every or self.window_events or default_window
        self.variants = s.variant_names()
        self.max_len = s.model.encoder.max_len

        self.online: OnlineLearner | None = OnlineLearner(s.model, s.train, s.device, s.catalogue)
        self.models: dict[str, OnlineLearner] = dict.fromkeys(s.all_regimes, self.online)
        self.frozen_event: int | None = None
        self.next_retrain: int | None = None
        self.retrains = 0
        self.train_errors = 0
        self.unlearnt = 0  # events the online learner could not admit the item of (a full catalogue)
        self.learn_seconds = 0.0
        self.retrain_seconds = 0.0

        self.ingest: dict[str, dict] = {}  # user -> streams.history table value
        self.pending: deque[_Pending] = deque()
        self.learned: dict[str, list[int]] = {}  # user -> items released to learning (periodic retrains)
        self.index: dict[ItemId, int] = {}  # external id -> item index (module doc)
        self.external: list[ItemId | None] = [None]  # item index -> external id
        self._maps: dict[int, tuple] = {}  # id(learner) -> (learner, vocab state, index -> row, row -> index)
        self._external_table = np.zeros(0, dtype=np.int64)  # item index -> external id (Scored)
        self.catalogue: dict[int, list[int]] = {}  # item index -> attributes, from item events
        self.known_at = np.full(1, NEVER, dtype=np.int64)  # item index -> first replay index it is rankable at
        self.first_ts = np.zeros(1)  # item -> timestamp it became known
        self.counts = np.zeros(1, dtype=np.int64)  # item -> feedback events so far (long-tail split)
        self.n = 0  # feedback events ingested (duplicates excluded) = replay index of the next one
        self.last_ts: float | None = None
        self.rng = np.random.default_rng(s.seed)
        self.tracks = {name: _Track() for name, _, _ in self.variants}
        self.window = _Window(start_event=0)
        self.duplicates = 0
        self.cold = 0
        self._prev_codes: dict[str, tuple[np.ndarray, torch.Tensor, torch.Tensor]] = {}
        self._prev_interests: dict[str, dict] = {}  # regime -> {user: (top interest, last event id)}
        self.catalogues = CatalogueCache()
        # False: every (model, mode) is scored on its own with a catalogue computed afresh, as before the shared
        # scoring existed (the same results, slower: the benchmarks' baseline and the tests' reference)
        self.share_scoring = True

    # ------------------------------------------------------------------ driving
    def run(
        self,
        records: Iterable[Mapping],
        progress: Callable[[int], None] | None = None,
        observer: Callable[[Scored], None] | None = None,
    ) -> Iterator[dict[str, dict]]:
        """Replay `records` (replay.sources order); yields each closed window's {variant: metrics}.

        progress(k) is called with the number of feedback events each micro-batch consumed; observer gets
        every variant's `Scored` of every micro-batch."""
        batch: list[dict] = []
        feedback = 0
        for record in records:
            batch.append(dict(record))
            if is_feedback(record):
                feedback += 1
                if feedback == self.s.batch_size:
                    yield from self._batch(batch, observer)
                    if progress:
                        progress(feedback)
                    batch, feedback = [], 0
        if batch:
            yield from self._batch(batch, observer)
            if progress and feedback:
                progress(feedback)
        self._learn_ready(final=True)
        if self.window.events:
            yield self._close_window()

    def report(self) -> dict:
        """The result so far: {"variants": {name: {"overall", "after_freeze", "windows"}}, "events", ...}."""
        variants = {}
        known = self._known_count()
        for name, regime, mode in self.variants:
            t = self.tracks[name]
            ranks = np.concatenate(t.all_ranks) if t.all_ranks else np.zeros(0, dtype=np.int64)
            firsts = np.concatenate(t.all_firsts) if t.all_firsts else np.zeros(0, dtype=bool)
            after = np.concatenate(t.after_freeze) if t.after_freeze else np.zeros(0, dtype=np.int64)
            overall = {
                "scored": int(len(ranks)),
                **ranking_metrics(ranks, KS),
                **first_interaction_split(ranks, firsts),
                f"coverage@{self.s.top_n}": len(t.covered) / known if known else 0.0,
                f"tail_share@{self.s.top_n}": t.tail_slots / t.slots if t.slots else 0.0,
                f"new_share@{self.s.top_n}": t.all_new_slots / t.slots if t.slots else 0.0,
                f"new_items_reached@{self.s.reach_n}": t.all_reached,
                **churn_summary(t.windows),
            }
            variants[name] = {
                "regime": regime,
                "mode": asdict(mode),
                "overall": overall,
                "after_freeze": {"scored": int(len(after)), **ranking_metrics(after, KS)},
                "windows": t.windows,
                "score_seconds": t.score_seconds,
            }
        return {
            "variants": variants,
            "events": self.n,
            "items": known,
            "duplicates": self.duplicates,
            "cold": self.cold,
            "freeze_event": self.frozen_event,
            "retrains": self.retrains,
            "train_errors": self.train_errors,
            "unlearnt": self.unlearnt,
            "window_events": self.window_events,
            "window_seconds": self.s.window_seconds,
            "retrain_every": self.retrain_every,
            "learn_seconds": self.learn_seconds,
            "retrain_seconds": self.retrain_seconds,
            "settings": self.s.to_json(),
        }

    # ------------------------------------------------------------------ one micro-batch
    def _batch(self, batch: list[dict], observer) -> Iterator[dict[str, dict]]:
        """One micro-batch: B feedback records (fewer at the end) and the item records read among them."""
        items: list[dict] = []
        rows: list[_Pending] = []
        for r in batch:
            item = r["item_id"] = self._item_index(r["item_id"])  # (a copy, run's) models learn item indices
            if not is_feedback(r):  # rankable from the next feedback event on, not for the ones read before it
                items.append(r)
                if r.get("attributes") is not None:
                    self.catalogue[item] = [int(a) for a in r["attributes"]]
                if self.known_at[item] == NEVER:
                    self._mark_known(item, self.n, r["timestamp"])
                continue
            user = r["user_id"]
            applied = apply_feedback(self.ingest.get(user), r["event_id"], item, self.max_len, self.s.dedup_window)
            if applied is None:
                self.duplicates += 1
                self.window.duplicates += 1
                continue
            self.ingest[user] = applied.state
            rows.append(_Pending(self.n, r["timestamp"], r, applied.history, bool(self.counts[item] == 0)))
            self.counts[item] += 1
            if self.known_at[item] == NEVER:  # first seen in feedback: rankable from the next event on
                self._mark_known(item, self.n + 1, r["timestamp"])
            self.n += 1
        if items:
            for learner in self._live():
                self.catalogues.touched(learner, learner.observe_items(items).rows)
        if not rows:
            return
        self.last_ts = rows[-1].timestamp if self.last_ts is None else max(self.last_ts, rows[-1].timestamp)
        if self.window.start_ts is None:
            self.window.start_ts = rows[0].timestamp
        self.window.end_ts = self.last_ts
        self.window.events += len(rows)

        self._test(rows, observer)
        self.pending.extend(rows)
        self._learn_ready()
        self._schedule()
        if self._window_full():
            yield self._close_window()

    def _test(self, rows: list[_Pending], observer) -> None:
        warm = [r for r in rows if r.history]
        self.cold += len(rows) - len(warm)
        self.window.cold += len(rows) - len(warm)
        m = self.s.eval_per_batch
        if m is not None and len(warm) > m:
            warm = [warm[i] for i in np.sort(self.rng.choice(len(warm), m, replace=False))]
        if not warm:
            return
        self.window.scored += len(warm)
        histories = [r.history for r in warm]
        targets = np.array([int(r.event["item_id"]) for r in warm], dtype=np.int64)
        positions = np.array([r.position for r in warm], dtype=np.int64)
        firsts = np.array([r.first for r in warm], dtype=bool)
        ids = [r.event["event_id"] for r in warm]
        now = positions[-1]
        if self.window_events is not None:
            new_item = self.known_at > now - self.window_events
        else:
            new_item = self.first_ts > self.last_ts - self.s.window_seconds
        new_item &= (self.known_at != NEVER) & (self.known_at > 0)  # the initial catalogue is not new
        after_freeze = self.frozen_event is not None
        # every distinct model scores once in each mode it is asked for (regimes share one model before the freeze
        # point); its modes share one catalogue and one encoder pass
        wanted: dict[int, tuple[OnlineLearner, dict[str, ScoreMode]]] = {}
        for _, regime, mode in self.variants:
            learner = self.models[regime]
            wanted.setdefault(id(learner), (learner, {}))[1].setdefault(mode.name, mode)
        done: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, float]] = {}
        for key, (learner, modes) in wanted.items():
            row_of, index_of = self._rows(learner)
            rows = [row_of[h][row_of[h] > 0] for h in map(np.asarray, histories)]
            known = self.known_at[index_of]  # per row of this model's table
            if not self.share_scoring:  # the reference path: every (model, mode) on its own, catalogue afresh
                for mode_name, mode in modes.items():
                    ranks, top, seconds = score_modes(learner, rows, row_of[targets], positions, known, [mode],
                                                      self.s.top_n)[0]
                    done[(key, mode_name)] = (ranks, index_of[top], seconds)
                continue
            start = time.perf_counter()
            cat = self.catalogues.get(learner)
            shared = time.perf_counter() - start
            results = score_modes(learner, rows, row_of[targets], positions, known, list(modes.values()),
                                  self.s.top_n, cat)
            for i, (mode_name, (ranks, top, seconds)) in enumerate(zip(modes, results, strict=True)):
                done[(key, mode_name)] = (ranks, index_of[top], seconds + (shared if i == 0 else 0.0))
        counted: set[tuple[int, str]] = set()
        for name, regime, mode in self.variants:
            key = (id(self.models[regime]), mode.name)
            ranks, top, seconds = done[key]
            t = self.tracks[name]
            if key not in counted:  # shared work is counted once, on the first variant that used it
                t.score_seconds += seconds
                counted.add(key)
            t.ranks.append(ranks)
            t.all_ranks.append(ranks)
            t.firsts.append(firsts)
            t.all_firsts.append(firsts)
            if after_freeze:
                t.after_freeze.append(ranks)
            t.tops.append(top)
            slots = top[top > 0]
            t.new_slots += int(new_item[slots].sum())
            if len(t.retrievals) < len(self.known_at):
                grow = np.zeros(len(self.known_at) - len(t.retrievals), dtype=np.int64)
                t.retrievals = np.concatenate([t.retrievals, grow])
            items, times = np.unique(slots, return_counts=True)
            before = t.retrievals[items]
            t.retrievals[items] = before + times
            crossed = (before < self.s.reach_n) & (before + times >= self.s.reach_n) & new_item[items]
            t.reached += int(crossed.sum())
            if observer is not None:
                observer(Scored(name, ids, positions, ranks, self._external_ids(top)))

    # ------------------------------------------------------------------ catalogue
    def _item_index(self, item: ItemId) -> int:
        """The item index of an external id (a new one gets the next)."""
        index = self.index.get(item)
        if index is None:
            index = self.index[item] = len(self.external)
            self.external.append(item)
            self._grow_arrays(index)
        return index

    def _rows(self, learner: OnlineLearner) -> tuple[np.ndarray, np.ndarray]:
        """(item index -> row of the learner's table, 0: not held; row -> item index), kept while its
        vocabulary is unchanged."""
        vocab = learner.vocab
        state = (len(vocab), vocab.evictions, len(self.known_at))
        cached = self._maps.get(id(learner))
        if cached is not None and cached[0] is learner and cached[1] == state:
            return cached[2], cached[3]
        index_of = np.asarray([0, *vocab.ids()[1:]], dtype=np.int64)  # the models hold item indices
        row_of = np.zeros(len(self.known_at), dtype=np.int64)
        row_of[index_of[1:]] = np.arange(1, len(index_of))
        self._maps[id(learner)] = (learner, state, row_of, index_of)
        return row_of, index_of

    def _external_ids(self, indices: np.ndarray) -> np.ndarray:
        """Item indices -> external ids (index 0 stays 0)."""
        if len(self._external_table) != len(self.external):
            table = np.asarray([0, *self.external[1:]], dtype=object)
            ints = all(type(i) is int for i in self.external[1:])
            self._external_table = table.astype(np.int64) if ints else table
        return self._external_table[indices]

    def _grow_arrays(self, item: int) -> None:
        if item >= len(self.known_at):
            size = max(item + 1, 2 * len(self.known_at))
            extra = size - len(self.known_at)
            self.known_at = np.concatenate([self.known_at, np.full(extra, NEVER, dtype=np.int64)])
            self.first_ts = np.concatenate([self.first_ts, np.zeros(extra)])
            self.counts = np.concatenate([self.counts, np.zeros(extra, dtype=np.int64)])

    def _mark_known(self, item: int, at: int, ts: float) -> None:
        self.known_at[item] = at
        self.first_ts[item] = ts
        if at > 0:
            self.window.new_items += 1

    def _known_count(self) -> int:
        return int((self.known_at[1:] <= self.n).sum())

    def _live(self) -> list[OnlineLearner]:
        """Every distinct model in use (the online learner while it still learns)."""
        out = {id(m): m for m in self.models.values()}
        if self.online is not None:
            out[id(self.online)] = self.online
        return list(out.values())

    # ------------------------------------------------------------------ learning
    def _learn_ready(self, final: bool = False) -> None:
        b, s = self.s.batch_size, self.s
        while self.pending:
            if len(self.pending) < b and not final:
                return
            last = self.pending[min(b, len(self.pending)) - 1]
            old_enough = last.position < self.n - s.delay_events and last.timestamp + s.delay_seconds <= self.last_ts
            if not (old_enough or final):
                return
            chunk = [self.pending.popleft() for _ in range(min(b, len(self.pending)))]
            self._learn(chunk)

    def _learn(self, chunk: list[_Pending]) -> None:
        events = [p.event for p in chunk]
        histories: dict[str, list[int]] = {}
        for p in chunk:  # the history before each user's first event in the batch (streams.batching)
            histories.setdefault(p.event["user_id"], p.history)
            self.learned.setdefault(p.event["user_id"], []).append(int(p.event["item_id"]))
        if self.online is None:
            return
        start = time.perf_counter()
        try:
            self.unlearnt += len(self.online.learn(events, histories)["unlearnt"])
        except FloatingPointError:  # the learner skips such a step too (streams.learning.Learning.learn_step)
            self.train_errors += 1
        self.learn_seconds += time.perf_counter() - start

    def _schedule(self) -> None:
        self._schedule_models()
        live = self._live()
        self.catalogues.retain(live)
        self._maps = {id(x): self._maps[id(x)] for x in live if id(x) in self._maps}

    def _schedule_models(self) -> None:
        if self.frozen_event is None and self.n >= self.freeze_at:
            self.frozen_event = self.n
            if "frozen" in self.models:
                frozen = copy.deepcopy(self.online)
                frozen.model.eval()
                frozen.model.rq.freeze_()
                self.models["frozen"] = frozen
            if "periodic" in self.models:
                self.models["periodic"] = self._retrain()
                self.next_retrain = self.n + self.retrain_every
            if "evolving" not in self.models:
                self.online = None  # nothing serves it any more: stop learning
        elif self.next_retrain is not None and self.n >= self.next_retrain:
            self.models["periodic"] = self._retrain()
            while self.next_retrain <= self.n:
                self.next_retrain += self.retrain_every

    def _retrain(self) -> OnlineLearner:
        """A fresh model trained on every event released to learning so far (see the module doc)."""
        start = time.perf_counter()
        s = self.s
        learner = OnlineLearner(s.model, s.train, s.device, s.catalogue)
        known = np.nonzero(self.known_at != NEVER)[0]
        learner.observe_items([{"item_id": int(i), "attributes": self.catalogue.get(int(i))} for i in known])
        row_of, _ = self._rows(learner)
        sequences = [row_of[np.asarray(seq)][row_of[np.asarray(seq)] > 0] for seq in self.learned.values()]
        sequences = [seq for seq in sequences if len(seq) >= 2]
        rng = np.random.default_rng(s.train.seed + self.retrains)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.train.seed + self.retrains)
            for _ in range(s.retrain_epochs):
                for batch in bucketed_batches(sequences, s.retrain_batch_size, self.max_len, rng):
                    try:
                        learner.trainer.step(batch)
                    except FloatingPointError:
                        self.train_errors += 1
        learner.model.eval()
        learner.model.rq.freeze_()
        self.retrains += 1
        self.retrain_seconds += time.perf_counter() - start
        return learner

    # ------------------------------------------------------------------ windows
    def _window_full(self) -> bool:
        w = self.window
        if self.s.window_seconds is not None:
            return w.start_ts is not None and self.last_ts - w.start_ts >= self.s.window_seconds
        return w.events >= self.window_events

    def _close_window(self) -> dict[str, dict]:
        w = self.window
        top_n = self.s.top_n
        known_ids = np.nonzero(self.known_at[: len(self.known_at)] <= self.n)[0]
        known_ids = known_ids[known_ids > 0]
        head = np.zeros(len(self.known_at), dtype=bool)  # the 20% most interacted-with known items
        by_count = known_ids[np.lexsort((known_ids, -self.counts[known_ids]))]
        head[by_count[: int(round(0.2 * len(by_count)))]] = True
        health = self._health(known_ids)
        base = {
            "start_ts": w.start_ts, "end_ts": w.end_ts, "start_event": w.start_event, "end_event": self.n,
            "events": w.events, "scored": w.scored, "cold": w.cold, "duplicates": w.duplicates,
            "new_items": w.new_items, "known_items": int(len(known_ids)),
        }
        out = {}
        for name, regime, _ in self.variants:
            t = self.tracks[name]
            ranks = np.concatenate(t.ranks) if t.ranks else np.zeros(0, dtype=np.int64)
            firsts = np.concatenate(t.firsts) if t.firsts else np.zeros(0, dtype=bool)
            tops = np.concatenate(t.tops) if t.tops else np.zeros((0, top_n), dtype=np.int64)
            slots = tops[tops > 0]
            tail = int((~head[slots]).sum())
            t.covered.update(np.unique(slots).tolist())
            t.slots += len(slots)
            t.tail_slots += tail
            t.all_new_slots += t.new_slots
            t.all_reached += t.reached
            row = {
                **base,
                **ranking_metrics(ranks, KS),
                **first_interaction_split(ranks, firsts),
                f"coverage@{top_n}": len(np.unique(slots)) / len(known_ids) if len(known_ids) else 0.0,
                f"tail_share@{top_n}": tail / len(slots) if len(slots) else 0.0,
                f"new_share@{top_n}": t.new_slots / len(slots) if len(slots) else 0.0,
                f"new_items_reached@{self.s.reach_n}": t.reached,
                "slots": int(len(slots)),
                **health[regime],
                "retrains": self.retrains if regime == "periodic" else 0,
                "online": self.frozen_event is None or regime == "evolving",  # its model learns online
            }
            t.windows.append(row)
            out[name] = row
            t.ranks, t.firsts, t.tops, t.new_slots, t.reached = [], [], [], 0, 0
        self.window = _Window(start_event=self.n)
        return out

    @torch.no_grad()
    def _health(self, known_ids: np.ndarray) -> dict[str, dict]:
        """Per regime: code health over the known items its model holds, drift from its previous window, and the
        churn of users' top interests since then."""
        by_model: dict[int, tuple] = {}
        out = {}
        for regime in self.s.all_regimes:
            learner = self.models[regime]
            if id(learner) not in by_model:
                model = learner.model
                row_of, _ = self._rows(learner)
                held = row_of[known_ids] > 0
                ids = known_ids[held]  # item indices, and their codes aligned with them
                cat = model.catalogue()
                codes = cat.codes.cpu()[torch.from_numpy(row_of[known_ids][held])]  # (K, L)
                h = code_health(codes, model.cfg.codes)
                users = list(self.ingest)
                seqs = [np.asarray(history_of(self.ingest[u]), dtype=np.int64) for u in users]
                tops = top_interests(model, [row_of[h][row_of[h] > 0] for h in seqs], cat).tolist()
                last = [self.ingest[u]["recent"][-1] for u in users]  # changes with every event of the user
                interests = dict(zip(users, zip(tops, last, strict=True), strict=True))
                by_model[id(learner)] = (ids, codes, model.rq.codebooks.detach().cpu().clone(), h, interests)
            ids, codes, codebooks, h, interests = by_model[id(learner)]
            row = {k: v for k, v in h.items() if k != "items"}
            prev = self._prev_codes.get(regime)
            if prev is not None:
                _, before, now = np.intersect1d(prev[0], ids, assume_unique=True, return_indices=True)
                pad = torch.zeros(1, codes.shape[1], dtype=codes.dtype)
                d = code_drift(torch.cat([pad, prev[1][torch.from_numpy(before)]]),
                               torch.cat([pad, codes[torch.from_numpy(now)]]), prev[2], codebooks)
                row["code_changed_share"] = d["changed_share"]
                row["level1_changed_share"] = d["level_changed_share"][0]
                row["level1_codeword_movement"] = d["codeword_movement"][0]
            else:
                row.update(code_changed_share=None, level1_changed_share=None, level1_codeword_movement=None)
            row.update(interest_churn(self._prev_interests.get(regime), interests))
            self._prev_codes[regime] = (ids, codes, codebooks)
            self._prev_interests[regime] = interests
            out[regime] = row
        return out


def replay(
    records: Iterable[Mapping],
    settings: ReplaySettings,
    total: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Run a whole replay and return its report (Prequential.report plus "seconds")."""
    start = time.perf_counter()
    engine = Prequential(settings, total)
    for _ in engine.run(records, progress):
        pass
    return {**engine.report(), "seconds": time.perf_counter() - start}


def with_seed(settings: ReplaySettings, seed: int) -> ReplaySettings:
    """The same settings with one seed for the scored sample and the models."""
    return replace(settings, seed=seed, train=replace(settings.train, seed=seed))


# ------------------------------------------------------------------ recall over event windows, recovery after shifts
def windowed_recall(
    positions: np.ndarray, ranks: np.ndarray, starts: np.ndarray | Sequence[int], width: int, k: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Recall@k over the scored events in each window [start, start + width) of replay positions.

    positions (S,) and ranks (S,): every scored event of one variant (e.g. gathered from `Scored`), any order.
    Returns (recall (W,), scored (W,)); recall is NaN where a window holds no scored event."""
    positions, ranks = np.asarray(positions), np.asarray(ranks)
    order = np.argsort(positions, kind="stable")
    pos, hits = positions[order], (ranks[order] < k).astype(np.int64)
    cum = np.concatenate([[0], np.cumsum(hits)])
    starts = np.asarray(starts, dtype=np.int64)
    lo = np.searchsorted(pos, starts, side="left")
    hi = np.searchsorted(pos, starts + width, side="left")
    scored = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(scored > 0, (cum[hi] - cum[lo]) / np.maximum(scored, 1), np.nan)
    return recall, scored


def recovery(
    positions: np.ndarray,
    ranks: np.ndarray,
    shift: int,
    *,
    pre_events: int,
    width: int,
    step: int,
    until: int,
    fraction: float = 0.9,
    k: int = 20,
    target: float | None = None,
) -> dict:
    """How a variant fares after a shift at replay position `shift`.

    pre_recall   Recall@k over the scored events in [shift - pre_events, shift);
    target       `fraction` * pre_recall (or the `target` given, e.g. another variant's);
    curve        Recall@k over the windows [shift + j * step, shift + j * step + width), j = 0, 1, ..., for every
                 window that ends at or before `until` (the next shift or the end of the stream); each point is
                 {"end": events after the shift at the window's end, "recall", "scored"};
    recovered_after  events after the shift at the end of the first window whose recall is >= target: by then the
                 last `width` events were served at >= target again (None: not before `until`; a model that never
                 dropped recovers after `width`);
    dip          the lowest window recall and the end of its window; final: the last window's recall.
    """
    if pre_events < 1 or width < 1 or step < 1 or not 0 < fraction <= 1:
        raise ValueError("recovery needs pre_events, width, step >= 1 and 0 < fraction <= 1")
    pre, pre_scored = windowed_recall(positions, ranks, [shift - pre_events], pre_events, k)
    pre_recall = None if pre_scored[0] == 0 else float(pre[0])
    goal = target if target is not None else (None if pre_recall is None else fraction * pre_recall)
    starts = shift + step * np.arange(max(0, (until - shift - width) // step + 1))
    recall, scored = windowed_recall(positions, ranks, starts, width, k)
    curve = [{"end": int(s - shift + width), "recall": None if n == 0 else float(r), "scored": int(n)}
             for s, r, n in zip(starts.tolist(), recall.tolist(), scored.tolist(), strict=True)]
    valid = [c for c in curve if c["recall"] is not None]
    recovered = None
    if goal is not None:
        recovered = next((c["end"] for c in valid if c["recall"] >= goal), None)
    low = min(valid, key=lambda c: c["recall"]) if valid else None
    return {
        "shift": int(shift),
        "pre_recall": pre_recall,
        "pre_scored": int(pre_scored[0]),
        "target": goal,
        "recovered_after": recovered,
        "dip": None if low is None else low["recall"],
        "dip_at": None if low is None else low["end"],
        "final": valid[-1]["recall"] if valid else None,
        "curve": curve,
    }
