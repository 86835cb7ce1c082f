"""Typed configuration for the models and the training loop (plain dataclasses with defaults).

Model hyperparameters travel inside snapshots as JSON (`asdict`), so every field is a JSON scalar.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from types import MappingProxyType
from typing import Literal


@dataclass(frozen=True)
class EncoderConfig:
    """A SASRec-style causal transformer over the behaviour sequence."""

    dim: int = 64
    max_len: int = 50
    layers: int = 2
    heads: int = 1
    ffn_mult: int = 4
    dropout: float = 0.5


@dataclass(frozen=True)
class SparcConfig:
    """The SPARC model: item tower, RQ codebooks over z, sequence encoder, interest module, code-conditioned tower.

    num_items / num_attributes are capacities at construction; the item table grows when new items arrive.
    """

    num_items: int
    num_attributes: int = 0
    encoder: EncoderConfig = EncoderConfig()
    # RQ-VAE over item embeddings z
    levels: int = 3
    codes: int = 64
    ema_decay: float = 0.95
    # level-1 hysteresis (trainer.rq.VectorQuantizer.assign): an item keeps its interest (level-1 code) until
    # another codeword is closer by this relative margin in squared distance (0: always the nearest codeword)
    code_hysteresis: float = 0.0
    commitment: float = 0.05  # weight of ||z - sg(quantised)||^2 (pulls items towards their codewords)
    dead_code_threshold: float = 0.5  # EMA cluster size under which a codeword is revived
    # interest module: "head" = a tower trained with CE on the target's level-1 code;
    # "marginal" = p(c|u) = sum of the global softmax over the items whose level-1 code is c
    interest: Literal["head", "marginal"] = "marginal"
    interest_weight: float = 1.0
    # code-conditioned user tower: u_c = h + W e_c (+ target attention over the sequence with e_c as query)
    tower_attention: bool = True
    global_weight: float = 1.0  # weight of the unconditioned (single-vector) CE term h . z
    # what u_c is trained to rank: "code" = only the items whose level-1 code is c (a factorised likelihood
    # p(i) = p(c(i)) * p(i | c(i), u_c), the per-code retrieval of soft search); "catalogue" = every item
    conditioned_scope: Literal["code", "catalogue"] = "code"
    # True: the conditioned loss trains only the tower's own weights (W, attention), not h or z (stop-gradient;
    # h and z learn from the global CE alone). Chosen on Beauty validation NDCG@10 (README, Results)
    conditioned_detach: bool = True
    shuffle_bpr_weight: float = 0.0  # "shuffle BPR" of the paper (u from the true code must beat u from another)
    use_attributes: bool = True
    attribute_dropout: float = 0.3  # dropout on the item tower's attribute term while training (0: none)
    # main retrieval loss: exact softmax over the catalogue, or in-batch sampled softmax with logQ correction
    retrieval_loss: Literal["full", "sampled"] = "full"
    # logit adjustment (Menon et al. 2021): the training losses score u . z + t log q(i), q(i) the item's share of
    # the interactions learnt so far (items.counts); scores are u . z alone, i.e. ~ p(i | u) / q(i)^t: the
    # popularity the training signal carries is taken out of what is served (0: none)
    popularity_adjustment: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SparcConfig:
        data = dict(data)
        enc = EncoderConfig(**data.pop("encoder", {}))
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SparcConfig keys: {sorted(unknown)}")
        return cls(encoder=enc, **data)


# SparcConfig fields that change how a model learns, not what a trained model computes (scores, codes, serving):
# a snapshot may be continued under other values of these (a worker warm-starting from an offline `sparc train`
# snapshot keeps its own online settings); every other field, num_items aside, must match.
TRAINING_ONLY_FIELDS = (
    "ema_decay",
    "code_hysteresis",
    "commitment",
    "dead_code_threshold",
    "interest_weight",
    "global_weight",
    "conditioned_detach",
    "shuffle_bpr_weight",
    "attribute_dropout",
    "retrieval_loss",
    "popularity_adjustment",
)


# The online defaults of those (the worker, and replay reproducing it): one pass over a stream learns best without
# the offline defaults' attribute dropout and conditioned stop-gradient (README, Replay: "Training options online").
# Stable interests (ema_decay 0.99, code_hysteresis 3: README, "Stable interests") are opt-in: EMA 0.99 holds a fresh
# worker's snapshots under the health gate for longer (step 75 instead of 20 on the fault suite's stream).
ONLINE_TRAINING = MappingProxyType({"attribute_dropout": 0.0, "conditioned_detach": False})


@dataclass(frozen=True)
class ExplorationConfig:
    """Soft search's exploration slots (trainer.search, step 5), what lists are served with by default.

    exploit : the first `exploit` slots of a list are plain soft search's (a list of k <= exploit is unchanged)
    lift    : the other slots go to the searched items by p(i | u) / q(i)^lift, q(i) the item's popularity

    The defaults were chosen on VALIDATION lists (README, "Discovery"): the rule `chosen_explore` of
    benchmarks/sparc_ablation (the smallest lift, then the largest E, whose validation coverage@20 is at least 0.95x
    SASRec's and tail share at least SASRec's with validation R@10 and N@10 at least SASRec's) applied to the means of
    Beauty seeds 0, 1 and 2 over E in {10, 15} x lift in {0.5, 0.75, 1, 1.5}.
    """

    exploit: int = 15
    lift: float = 0.5

    def __post_init__(self) -> None:
        if self.exploit < 1 or not (math.isfinite(self.lift) and self.lift >= 0):
            raise ValueError(f"exploration slots need exploit >= 1 and a lift >= 0, got {self.exploit}, {self.lift}")

    def slots(self, k: int) -> int | None:
        """The `exploit` argument of soft search for a list of k items: None (plain) when k <= exploit."""
        return self.exploit if k > self.exploit else None


EXPLORATION = ExplorationConfig()


@dataclass(frozen=True)
class TrainConfig:
    """The offline/online training loop."""

    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_epochs: int = 200
    eval_every: int = 2  # epochs between validation checks
    patience: int = 5  # validation checks without improvement before stopping
    # wall-clock budget for one model's training; none by default: a budget makes the trained model (and every
    # quality number) depend on the machine's load. Opt-in for long exploratory runs only
    max_seconds: float = math.inf
    seed: int = 0


@dataclass(frozen=True)
class CatalogueConfig:
    """The online learner's item vocabulary (trainer.vocab): external ids -> rows of the item table.

    max_items    : the most items the table holds (its rows; the full softmax costs O(max_items) per step)
    on_full      : a new item when the table is full: "refuse" it (item events go to the dead-letter topic with
                   reason catalogue_full, feedback on it is not learnt) or "evict" the least recently seen item
                   and reuse its row
    item_sources : what may add an item: "items" (item events only; feedback naming an unknown item is not
                   learnt) or "items_and_feedback" (feedback may name an item before its catalogue event)
    """

    max_items: int = 100_000
    on_full: Literal["refuse", "evict"] = "refuse"
    item_sources: Literal["items", "items_and_feedback"] = "items_and_feedback"

    def __post_init__(self) -> None:
        if self.max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {self.max_items}")
        if self.on_full not in ("refuse", "evict"):
            raise ValueError(f"on_full must be refuse or evict, got {self.on_full!r}")
        if self.item_sources not in ("items", "items_and_feedback"):
            raise ValueError(f"item_sources must be items or items_and_feedback, got {self.item_sources!r}")
