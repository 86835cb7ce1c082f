"""Online learning on a stream of feedback events: the ONE code path the Kafka worker and replay both drive.

Pure PyTorch, no I/O. The caller owns the user histories (a dict in replay, a Faust table in the worker) and
passes them in; the learner owns the model, its optimiser and its random state.

    learner = OnlineLearner(SparcConfig(num_items=0, num_attributes=...), TrainConfig(seed=0))
    learner.observe_items([{"item_id": 7, "attributes": [3, 12]}])       # new items -> grown item table
    metrics = learner.learn(events, histories)                            # one Trainer.step
    advance_histories(histories, events, learner.max_len)                 # the caller moves histories on
    learner.restore(snapshot.config, snapshot.weights, steps=120)         # warm start from a snapshot

Events are mappings with at least "user_id" and "item_id". `histories[user]` is the user's items (oldest
first) as of the START of the batch; an event's training input is that history followed by the items of the
same user's earlier events in the batch, and its target is the event's item (next-item prediction at the last
position only: earlier positions were trained when their own events arrived). A user's first event has no
history and gives no example. Same seed + same batches in the same order -> the same weights and snapshots.

Random state: the learner draws dropout from a torch RNG state of its own (seeded by TrainConfig.seed), swapped
into torch's process-wide generator only for the length of a step. Every use of that generator here (building a
model, a step, `load_model`) holds GLOBAL_RNG_LOCK, so a serving model built in another thread (the worker
rebuilds its index in a publisher thread) neither draws from nor disturbs a step that runs meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

from trainer.batches import Batch, pad_histories
from trainer.config import TRAINING_ONLY_FIELDS, SparcConfig, TrainConfig
from trainer.model import Catalogue, SparcModel
from trainer.rq import code_health
from trainer.step import Trainer

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


def append_history(history: Sequence[int], item: int, max_len: int) -> list[int]:
    """The history after `item`: the last `max_len` items, oldest first."""
    return [*history, int(item)][-max_len:]


def advance_histories(
    histories: MutableMapping[Hashable, list[int]], events: Iterable[Mapping], max_len: int
) -> None:
    """Append each event's item to its user's history, in order (what the worker's ingest agent does)."""
    for event in events:
        user = event["user_id"]
        histories[user] = append_history(histories.get(user, ()), event["item_id"], max_len)


def batch_examples(
    events: Sequence[Mapping], histories: Mapping[Hashable, Sequence[int]], max_len: int
) -> list[tuple[list[int], int]]:
    """(history before the event, target item) for every event that has a history, in event order.

    `histories` is read, never written: in-batch predecessors are tracked locally.
    """
    running: dict[Hashable, list[int]] = {}
    examples = []
    for event in events:
        user, item = event["user_id"], int(event["item_id"])
        before = running.get(user)
        if before is None:
            before = list(histories.get(user, ()))[-max_len:]
        if before:
            examples.append((before, item))
        running[user] = append_history(before, item, max_len)
    return examples


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
    """

    config: dict
    codebooks: torch.Tensor
    item_codes: torch.Tensor
    item_vectors: torch.Tensor
    weights: dict[str, torch.Tensor]
    steps: int

    @property
    def num_items(self) -> int:
        return int(self.item_codes.shape[0]) - 1


class OnlineLearner:
    """A SparcModel and its Trainer, fed one micro-batch of events at a time."""

    def __init__(self, model_cfg: SparcConfig, train_cfg: TrainConfig, device: str | torch.device = "cpu"):
        self.train_cfg = train_cfg
        with private_rng(seed=train_cfg.seed) as rng:
            self.model = SparcModel(model_cfg)  # built on the CPU: the same initial weights on any device
        self._rng_state = rng.state  # dropout etc. draw from this, not the process's RNG (CUDA's own on a GPU)
        self.trainer = Trainer(self.model, train_cfg, device)

    def restore(self, config: Mapping, weights: Mapping[str, torch.Tensor], steps: int = 0) -> list[str]:
        """Continue from a snapshot (a warm start): its model (config and weights; the item table has the
        snapshot's size), `steps` as the step count. A snapshot carries no optimiser state, so Adam starts
        afresh; the random state is seeded from (TrainConfig.seed, steps). Learning goes on under this learner's
        own training options (TRAINING_ONLY_FIELDS); returns those in which the snapshot differs. Raises
        ValueError when the config differs in anything else but num_items, or the weights do not fit it
        (nothing changes)."""
        differ = config_differences(config, self.model.cfg)
        if differ:
            raise ValueError(f"the snapshot's model differs from this learner's in {', '.join(differ)}")
        bridged = config_differences(config, self.model.cfg, training_only=True)
        continued = {**dict(config), **{k: getattr(self.model.cfg, k) for k in TRAINING_ONLY_FIELDS}}
        with private_rng(seed=restart_seed(self.train_cfg.seed, steps)) as rng:
            model = _build_model(continued, weights)
        model.train()
        trainer = Trainer(model, self.train_cfg, self.trainer.device)
        trainer.steps = int(steps)
        trainer.generator.manual_seed(restart_seed(self.train_cfg.seed, steps))
        self.model, self.trainer, self._rng_state = model, trainer, rng.state
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

    def observe_items(self, item_events: Iterable[Mapping]) -> int:
        """Grow the item table to the largest id seen and set the listed items' attributes.

        Item events: {"item_id": int >= 1, "attributes": [int, ...] (optional)}. Returns the rows added.
        """
        attributes: dict[int, list[int]] = {}
        largest = 0
        for event in item_events:
            item = int(event["item_id"])
            largest = max(largest, item)
            if event.get("attributes") is not None:
                attributes[item] = [int(a) for a in event["attributes"]]
        before = self.num_items
        if largest or attributes:
            self.trainer.grow_items(max(largest, before), attributes or None)
        return self.num_items - before

    def learn(self, events: Sequence[Mapping], histories: Mapping[Hashable, Sequence[int]]) -> dict:
        """One training step on the events that have a history (see module doc). Returns the step's metrics
        plus "examples" and "skipped" (events without history); no step is taken when there is no example."""
        largest = max((int(e["item_id"]) for e in events), default=0)
        if largest > self.num_items:  # feedback can outrun the item's catalogue event
            self.trainer.grow_items(largest)
        examples = batch_examples(events, histories, self.max_len)
        out = {"examples": len(examples), "skipped": len(events) - len(examples)}
        if not examples:
            return {**out, "step": self.steps}
        grow_to = max(max(h) for h, _ in examples)
        if grow_to > self.num_items:  # histories given by the caller may name items we were never told of
            self.trainer.grow_items(grow_to)
        return {**self._step(next_item_batch(examples, self.max_len)), **out}

    def _step(self, batch: Batch | None) -> dict:
        """Trainer.step on the learner's private RNG (batch None: a data-parallel rank without examples)."""
        with private_rng(self._rng_state) as rng:
            metrics = self.trainer.step(batch)
        self._rng_state = rng.state
        return metrics

    @torch.no_grad()
    def health(self) -> dict:
        """`model_health` of the live model plus "steps"."""
        return {**model_health(self.model), "steps": self.steps}

    @torch.no_grad()
    def snapshot_state(self) -> LearnerState:
        """Copies of everything a snapshot and a serving index need (see LearnerState)."""
        return capture_state(self.model, self.steps)

    @torch.no_grad()
    def capture(self) -> tuple[LearnerState, dict]:
        """snapshot_state() and health() together, from one pass of the item tower and codebooks over the
        catalogue (each alone makes that pass; the worker takes both for every snapshot)."""
        cat = self.model.catalogue()
        return capture_state(self.model, self.steps, cat), {**model_health(self.model, cat), "steps": self.steps}


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
    try:
        model.load_state_dict(dict(weights), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the weights do not fit the config: {exc}") from None
    return model


@torch.no_grad()
def model_health(model: SparcModel, cat: Catalogue | None = None) -> dict:
    """trainer.rq.code_health over the catalogue's codes, plus "finite" (codebooks and item vectors) and
    "initialised" (every level has had its k-means initialisation). `cat`: model.catalogue(), if at hand."""
    cat = model.catalogue() if cat is None else cat
    out = code_health(cat.codes[1:], model.cfg.codes)
    out["finite"] = bool(torch.isfinite(cat.z).all() and torch.isfinite(model.rq.codebooks).all())
    out["initialised"] = all(bool(q.initialised) for q in model.rq.levels)
    return out


@torch.no_grad()
def capture_state(model: SparcModel, steps: int = 0, cat: Catalogue | None = None) -> LearnerState:
    """CPU copies of everything a snapshot and a serving index need, taken from `model` (offline or online, on
    any device). `cat`: model.catalogue(), if at hand."""
    cat = model.catalogue() if cat is None else cat
    return LearnerState(
        config=replace(model.cfg, num_items=model.items.num_items).to_json(),
        codebooks=_cpu_copy(model.rq.codebooks).float(),
        item_codes=_cpu_copy(cat.codes).long(),
        item_vectors=_cpu_copy(cat.z).float(),
        weights={k: _cpu_copy(v) for k, v in model.state_dict().items()},
        steps=steps,
    )


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)
