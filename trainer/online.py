"""Online learning on a stream of feedback events: the ONE code path the Kafka worker and replay both drive.

Pure PyTorch, no I/O. The caller owns the user histories (a dict in replay, a Faust table in the worker) and
passes them in; the learner owns the model, its optimiser and its random state.

    learner = OnlineLearner(SparcConfig(num_items=0, num_attributes=...), TrainConfig(seed=0), catalogue=...)
    learner.observe_items([{"item_id": "sku-7", "attributes": [3, 12]}])  # new items -> rows of the item table
    metrics = learner.learn(events, histories)                            # one Trainer.step
    advance_histories(histories, events, learner.max_len)                 # the caller moves histories on
    learner.restore(snapshot.config, snapshot.weights, 120, snapshot.item_ids)  # warm start from a snapshot

Items are named by external ids (int or str); the learner's vocabulary (`vocab`, trainer.vocab.ItemVocab) maps
them to rows of the item table, one row per item, at most CatalogueConfig.max_items (a full table refuses new
items or evicts the least recently seen, per CatalogueConfig.on_full; an evicted item's row is reset for the new
one). Events and histories carry external ids; rows never leave the learner except in LearnerState, which
carries the vocabulary beside them.

Events are mappings with at least "user_id" and "item_id". `histories[user]` is the user's items (oldest
first) as of the START of the batch; an event's training input is that history followed by the items of the
same user's earlier events in the batch, and its target is the event's item (next-item prediction at the last
position only: earlier positions were trained when their own events arrived). A user's first event has no
history and gives no example. History items the vocabulary does not hold (never admitted, or evicted since) are
left out of the input. An event whose item cannot be admitted (CatalogueConfig.item_sources "items" and an
unknown item; or a full table that refuses) is not learnt; `learn` names it. Same seed + same batches in the same
order -> the same weights and snapshots.

Random state: the learner draws dropout from a torch RNG state of its own (seeded by TrainConfig.seed), swapped
into torch's process-wide generator only for the length of a step. Every use of that generator here (building a
model, a step, `load_model`) holds GLOBAL_RNG_LOCK, so a serving model built in another thread (the worker
rebuilds its index in a publisher thread) neither draws from nor disturbs a step that runs meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from trainer.batches import Batch, pad_histories
from trainer.config import TRAINING_ONLY_FIELDS, CatalogueConfig, SparcConfig, TrainConfig
from trainer.model import Catalogue, SparcModel
from trainer.rq import code_health
from trainer.step import Trainer
from trainer.vocab import ItemId, ItemVocab

GLOBAL_RNG_LOCK = threading.Lock()  # held by everything here that touches torch's process-wide generator


class RngState:
    """What `private_rng` leaves behind: the private generator's state when the block ended."""

    state: torch.Tensor | None = None


@contextmanager
def private_rng(state: torch.Tensor | None = None, seed: int | None = None) -> Iterator[RngState]:
    """Run a block on a private torch RNG: `state` (or a fresh one seeded with `seed`) is swapped into the
    process-wide generator under GLOBAL_RNG_LOCK, and the process's own state is put back afterwards. The
    yielded RngState holds the private state as the block left it (also when it raised)."""
    out = RngState()
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        if state is not None:
            torch.set_rng_state(state)
        elif seed is not None:
            torch.manual_seed(seed)
        try:
            yield out
        finally:
            out.state = torch.get_rng_state()


def restart_seed(seed: int, steps: int) -> int:
    """The seed of a learner restored at `steps` (a restart must not replay the random numbers of step 0)."""
    return (seed * 1_000_003 + steps) % (2**63)


def append_history(history: Sequence[ItemId], item: ItemId, max_len: int) -> list[ItemId]:
    """The history after `item`: the last `max_len` items, oldest first."""
    return [*history, item][-max_len:]


def advance_histories(
    histories: MutableMapping[Hashable, list[ItemId]], events: Iterable[Mapping], max_len: int
) -> None:
    """Append each event's item to its user's history, in order (what the worker's ingest agent does)."""
    for event in events:
        user = event["user_id"]
        histories[user] = append_history(histories.get(user, ()), event["item_id"], max_len)


def event_histories(
    events: Sequence[Mapping], histories: Mapping[Hashable, Sequence[ItemId]], max_len: int
) -> list[list[ItemId]]:
    """The history before each event (its user's history followed by the user's earlier events in the batch;
    empty for a user's first event), in event order. `histories` is read, never written."""
    running: dict[Hashable, list[ItemId]] = {}
    out = []
    for event in events:
        user = event["user_id"]
        before = running.get(user)
        if before is None:
            before = list(histories.get(user, ()))[-max_len:]
        out.append(before)
        running[user] = append_history(before, event["item_id"], max_len)
    return out


def next_item_batch(examples: Sequence[tuple[Sequence[int], int]], max_len: int) -> Batch:
    """Examples -> a Batch whose only target per row is the example's item, at the row's last position.

    The rows' histories range from one item to max_len, so the batch is encoded in length buckets."""
    inputs, lengths = pad_histories([np.asarray(h, dtype=np.int64) for h, _ in examples], max_len)
    targets = torch.zeros_like(inputs)
    targets[torch.arange(len(examples)), lengths - 1] = torch.tensor(
        [t for _, t in examples], dtype=torch.long
    )
    return Batch(inputs=inputs, targets=targets, lengths=lengths, length_buckets=True)


@dataclass(frozen=True, eq=False)
class LearnerState:
    """What a snapshot needs, copied out of the live model (safe to use while the learner trains on).

    config       : SparcConfig JSON with num_items = the current catalogue size (what the weights fit)
    codebooks    : float32 (L, C, D)
    item_codes   : int64 (N+1, L); row 0 is padding
    item_vectors : float32 (N+1, D) the catalogue's z, what a retrieval index searches
    weights      : the model's state_dict (serving weights), cloned
    steps        : training steps taken so far
    item_ids     : the external id of rows 1..N (the vocabulary), or None when row i is item i
    """

    config: dict
    codebooks: torch.Tensor
    item_codes: torch.Tensor
    item_vectors: torch.Tensor
    weights: dict[str, torch.Tensor]
    steps: int
    item_ids: tuple[ItemId, ...] | None = None

    @property
    def num_items(self) -> int:
        return int(self.item_codes.shape[0]) - 1


@dataclass(frozen=True)
class Observed:
    """What `observe_items` did: items added (new rows or reused ones), items evicted to make room, items
    refused (a full table under on_full="refuse"; their events belong in the dead-letter topic), and the rows
    whose item or attributes changed (a cache of per-row results must recompute them)."""

    added: int = 0
    evicted: list[ItemId] = field(default_factory=list)
    refused: list[ItemId] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)


class OnlineLearner:
    """A SparcModel and its Trainer, fed one micro-batch of events at a time, and the vocabulary of its items."""

    def __init__(
        self,
        model_cfg: SparcConfig,
        train_cfg: TrainConfig,
        device: str | torch.device = "cpu",
        catalogue: CatalogueConfig | None = None,
    ):
        """A learner built with num_items = N knows items 1..N at rows 1..N (an offline model's table)."""
        self.train_cfg = train_cfg
        self.catalogue_cfg = catalogue = catalogue or CatalogueConfig()
        self.vocab = ItemVocab.identity(model_cfg.num_items, catalogue.max_items, catalogue.on_full)
        with private_rng(seed=train_cfg.seed) as rng:
            self.model = SparcModel(model_cfg)  # built on the CPU: the same initial weights on any device
        self._rng_state = rng.state  # dropout etc. draw from this, not the process's RNG (CUDA's own on a GPU)
        self.trainer = Trainer(self.model, train_cfg, device)

    def restore(
        self,
        config: Mapping,
        weights: Mapping[str, torch.Tensor],
        steps: int = 0,
        item_ids: Sequence[ItemId] | None = None,
    ) -> list[str]:
        """Continue from a snapshot (a warm start): its model (config and weights; the item table has the
        snapshot's size), `steps` as the step count, `item_ids` as the vocabulary (the external id of rows
        1..N; None: row i is item i, as in snapshots written before vocabularies). A snapshot carries no
        optimiser state, so Adam starts afresh, nor when items were last seen, so eviction order starts as the
        rows' order; the random state is seeded from (TrainConfig.seed, steps). Learning goes on under this
        learner's own training options (TRAINING_ONLY_FIELDS); returns those in which the snapshot differs.
        Raises ValueError when the config differs in anything else but num_items, the weights do not fit it,
        or the vocabulary does not fit the table or this learner's max_items (nothing changes)."""
        differ = config_differences(config, self.model.cfg)
        if differ:
            raise ValueError(f"the snapshot's model differs from this learner's in {', '.join(differ)}")
        bridged = config_differences(config, self.model.cfg, training_only=True)
        continued = {**dict(config), **{k: getattr(self.model.cfg, k) for k in TRAINING_ONLY_FIELDS}}
        with private_rng(seed=restart_seed(self.train_cfg.seed, steps)) as rng:
            model = _build_model(continued, weights)
        vocab = restored_vocab(model.items.num_items, item_ids, self.catalogue_cfg)
        model.train()
        trainer = Trainer(model, self.train_cfg, self.trainer.device)
        trainer.steps = int(steps)
        trainer.generator.manual_seed(restart_seed(self.train_cfg.seed, steps))
        self.model, self.trainer, self._rng_state, self.vocab = model, trainer, rng.state, vocab
        return bridged

    @property
    def max_len(self) -> int:
        return self.model.cfg.encoder.max_len

    @property
    def num_items(self) -> int:
        return self.model.items.num_items

    @property
    def steps(self) -> int:
        return self.trainer.steps

    def observe_items(self, item_events: Iterable[Mapping]) -> Observed:
        """Admit the items of item events (new ones get a row, known ones are seen again) and set their
        attributes. Item events: {"item_id": int | str, "attributes": [int, ...] (optional)}."""
        events = list(item_events)
        admitted, evicted, added = self._admit([e["item_id"] for e in events])
        rows = [self.vocab.row(e["item_id"]) for e in events]  # after every admission (one may evict another)
        attributes = {
            row: [int(a) for a in e["attributes"]]
            for e, row in zip(events, rows, strict=True)
            if row is not None and e.get("attributes") is not None
        }
        if attributes:
            self.trainer.grow_items(self.num_items, attributes)
        return Observed(
            added=added,
            evicted=evicted,
            refused=[e["item_id"] for e, row in zip(events, admitted, strict=True) if row is None],
            rows=sorted({r for r in admitted if r is not None}),
        )

    def learn(self, events: Sequence[Mapping], histories: Mapping[Hashable, Sequence[ItemId]]) -> dict:
        """One training step on the events that have a history (see module doc). Returns the step's metrics
        plus "examples", "skipped" (events that gave no example), "unlearnt" ([(event index, reason)] for the
        events whose item is not in the vocabulary: "catalogue_full" or "unknown_item"), "evicted" (items evicted
        to admit the batch's) and "history_dropped" (history items left out of inputs, not in the vocabulary);
        no step is taken when there is no example."""
        evicted = self._admit_targets([e["item_id"] for e in events])
        examples, out = self._examples(events, histories)
        out["evicted"] = len(evicted)
        if not examples:
            return {**out, "step": self.steps}
        return {**self._step(next_item_batch(examples, self.max_len)), **out}

    def _admit_targets(self, targets: Sequence[ItemId]) -> list[ItemId]:
        """Feedback targets, in order: admitted (item_sources "items_and_feedback": feedback may outrun its item's
        catalogue event) or only seen again ("items"). Returns the items evicted to make room."""
        if self.catalogue_cfg.item_sources == "items_and_feedback":
            return self._admit(targets)[1]
        for item in targets:
            self.vocab.touch(item)
        return []

    def _examples(
        self, events: Sequence[Mapping], histories: Mapping[Hashable, Sequence[ItemId]]
    ) -> tuple[list[tuple[list[int], int]], dict]:
        """(history rows, target row) of every event that can be learnt now (its targets admitted), and what
        `learn` reports about the events: "examples", "skipped", "unlearnt", "history_dropped"."""
        reason = "catalogue_full" if self.catalogue_cfg.item_sources == "items_and_feedback" else "unknown_item"
        examples, unlearnt, dropped = [], [], 0
        for i, before in enumerate(event_histories(events, histories, self.max_len)):
            row = self.vocab.row(events[i]["item_id"])  # after every admission of the batch (one may evict another)
            if row is None:
                unlearnt.append((i, reason))
                continue
            known = self.vocab.known_rows(before)
            dropped += len(before) - len(known)
            if known:
                examples.append((known, row))
        out = {"examples": len(examples), "skipped": len(events) - len(examples), "unlearnt": unlearnt,
               "history_dropped": dropped}
        return examples, out

    def _step(self, batch: Batch | None) -> dict:
        """Trainer.step on the learner's private RNG (batch None: a data-parallel rank without examples)."""
        with private_rng(self._rng_state) as rng:
            metrics = self.trainer.step(batch)
        self._rng_state = rng.state
        return metrics

    def _admit(self, items: Sequence[ItemId]) -> tuple[list[int | None], list[ItemId], int]:
        """Admit `items` in order (ItemVocab.admit): their rows (None: refused), the items evicted and the number
        of new items. The item table grows to the vocabulary's size; rows handed to new items are reset."""
        table = self.num_items
        rows: list[int | None] = []
        evicted: list[ItemId] = []
        reused: list[int] = []
        added = 0
        for item in items:
            admission = self.vocab.admit(item)
            if admission is None:
                rows.append(None)
                continue
            rows.append(admission.row)
            added += admission.new
            if admission.evicted is not None:
                evicted.append(admission.evicted)
            if admission.new and admission.row <= table:
                reused.append(admission.row)
        if len(self.vocab) > table:
            self.trainer.grow_items(len(self.vocab))
        self.trainer.reset_items(reused)
        return rows, evicted, added

    @torch.no_grad()
    def health(self) -> dict:
        """`model_health` of the live model plus "steps"."""
        return {**model_health(self.model), "steps": self.steps}

    @torch.no_grad()
    def snapshot_state(self) -> LearnerState:
        """Copies of everything a snapshot and a serving index need (see LearnerState)."""
        return capture_state(self.model, self.steps, item_ids=self.item_ids())

    @torch.no_grad()
    def capture(self) -> tuple[LearnerState, dict]:
        """snapshot_state() and health() together, from one pass of the item tower and codebooks over the
        catalogue (each alone makes that pass; the worker takes both for every snapshot)."""
        cat = self.model.catalogue()
        state = capture_state(self.model, self.steps, cat, self.item_ids())
        return state, {**model_health(self.model, cat), "steps": self.steps}

    def item_ids(self) -> tuple[ItemId, ...] | None:
        """The external id of rows 1..N, or None when row i is item i (LearnerState.item_ids)."""
        return None if self.vocab.is_identity() else tuple(self.vocab.ids()[1:])


def restored_vocab(num_items: int, item_ids: Sequence[ItemId] | None, catalogue: CatalogueConfig) -> ItemVocab:
    """The vocabulary of a snapshot's item table of `num_items` rows (item_ids None: row i is item i); raises
    ValueError when it does not fit the table or `catalogue.max_items`."""
    if item_ids is not None and len(item_ids) != num_items:
        raise ValueError(f"the snapshot names {len(item_ids)} items for an item table of {num_items}")
    if item_ids is None:
        return ItemVocab.identity(num_items, catalogue.max_items, catalogue.on_full)
    return ItemVocab(catalogue.max_items, catalogue.on_full, item_ids)


def config_differences(config: Mapping, cfg: SparcConfig, *, training_only: bool = False) -> list[str]:
    """The SparcConfig fields (encoder fields as "encoder.<name>") in which a snapshot's config differs from
    `cfg` that a warm start cannot bridge: all but num_items (the item table grows on a stream) and the
    TRAINING_ONLY_FIELDS (the learner's own apply); training_only=True: the differing training-only fields
    instead. Keys the snapshot lacks take their defaults."""
    a, b = _flat(SparcConfig.from_json(dict(config)).to_json()), _flat(cfg.to_json())
    differ = sorted(k for k in a.keys() | b.keys() if k != "num_items" and a.get(k) != b.get(k))
    return [k for k in differ if (k in TRAINING_ONLY_FIELDS) == training_only]


def _flat(cfg: dict) -> dict:
    encoder = {f"encoder.{k}": v for k, v in cfg["encoder"].items()}
    return {**{k: v for k, v in cfg.items() if k != "encoder"}, **encoder}


def load_model(config: Mapping, weights: Mapping[str, torch.Tensor]) -> SparcModel:
    """A SparcModel in eval mode from a snapshot's config and weights (strict: every weight must fit; ValueError
    otherwise). Building it does not touch torch's process-wide random state (see the module doc)."""
    with private_rng(seed=0):
        model = _build_model(config, weights)
    return model.eval()


def _build_model(config: Mapping, weights: Mapping[str, torch.Tensor]) -> SparcModel:
    cfg = SparcConfig.from_json(dict(config))
    model = SparcModel(cfg, attributes=weights.get("items.attributes"))
    weights = dict(weights)
    if cfg.code_hysteresis > 0 and "held_codes" not in weights:  # a snapshot without hysteresis: nothing held
        weights["held_codes"] = model.held_codes
    if cfg.code_hysteresis <= 0:  # a snapshot with hysteresis continued without: the held codes go unused
        weights.pop("held_codes", None)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the weights do not fit the config: {exc}") from None
    return model


@torch.no_grad()
def model_health(model: SparcModel, cat: Catalogue | None = None) -> dict:
    """trainer.rq.code_health over the catalogue's codes, plus "finite" (codebooks and item vectors) and
    "initialised" (every level has had its k-means initialisation). `cat`: model.catalogue(), if at hand.
    With code_hysteresis the codes are the nearest codewords' (as without it, where the health gate's thresholds
    come from), not the held ones: an item keeps its held code when every codeword is as near, so held codes would
    hide a codebook collapsed onto one codeword."""
    cat = model.catalogue() if cat is None else cat
    codes = cat.codes if model.cfg.code_hysteresis <= 0 else model.rq.encode(cat.z.detach())[0]
    out = code_health(codes[1:], model.cfg.codes)
    out["finite"] = bool(torch.isfinite(cat.z).all() and torch.isfinite(model.rq.codebooks).all())
    out["initialised"] = all(bool(q.initialised) for q in model.rq.levels)
    return out


@torch.no_grad()
def capture_state(
    model: SparcModel, steps: int = 0, cat: Catalogue | None = None, item_ids: tuple[ItemId, ...] | None = None
) -> LearnerState:
    """CPU copies of everything a snapshot and a serving index need, taken from `model` (offline or online, on
    any device). `cat`: model.catalogue(), if at hand; `item_ids`: the vocabulary (None: row i is item i)."""
    cat = model.catalogue() if cat is None else cat
    return LearnerState(
        config=replace(model.cfg, num_items=model.items.num_items).to_json(),
        codebooks=_cpu_copy(model.rq.codebooks).float(),
        item_codes=_cpu_copy(cat.codes).long(),
        item_vectors=_cpu_copy(cat.z).float(),
        weights={k: _cpu_copy(v) for k, v in model.state_dict().items()},
        steps=steps,
        item_ids=item_ids,
    )


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)
