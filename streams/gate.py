"""The health gate: whether a snapshot may become latest (be served and announced), and why not.

A snapshot's health is trainer.online.model_health over its whole catalogue: "finite", "initialised", "items",
and per level l "level<l>_utilisation" (share of the codewords some item uses) and "level<l>_perplexity" (exp of
the entropy of code usage: the effective number of codewords in use), plus "collision_rate" (share of items whose
full code another item also has). A collapsed codebook (every item on a few codewords) shows as low utilisation
and perplexity and a collision rate near 1; the gate refuses it, so serving keeps the last good snapshot.

Utilisation and perplexity are judged against the codewords the catalogue could fill, min(codes, items): a
catalogue of 12 items cannot use more than 12 of 64 codewords.

Defaults (GateThresholds), from the health of every snapshot of two runs of the worker's learner at its defaults
(64 codes, 3 levels; benchmarks/soak.py, a snapshot at steps 1, 2, 5, 10, 20, 50, 100 and every 200 steps):
the full Beauty stream and the default synthetic stream. Worst values per measure, healthy snapshots (Beauty all
22; synthetic from step 20 on) against the collapsed ones (synthetic steps 1-10: its 3,000 initial items start with
near-identical vectors, and the first k-means puts them on a few codewords):

    measure                       healthy worst      collapsed             threshold
    level-1 utilisation           0.594 / 0.562      0.094 - 0.141         >= 0.25
    deeper levels' utilisation    0.234 / 0.250      0.062 - 0.172         >= 0.1
    level-1 perplexity / codes    0.376 / 0.212      0.027 - 0.054         >= 0.1
    collision rate                0.587 / 0.948      0.992 - 0.997         <= 0.97

(README, "Health gate", has the commands.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LEVEL_UTILISATION = re.compile(r"level(\d+)_utilisation")


@dataclass(frozen=True)
class GateThresholds:
    """Floors on level 1's utilisation, every deeper level's and level 1's perplexity, as shares of the
    codewords the catalogue could fill (module doc), and the ceiling on the collision rate."""

    min_utilisation: float = 0.25
    min_deep_utilisation: float = 0.1
    min_perplexity: float = 0.1
    max_collision_rate: float = 0.97


@dataclass(frozen=True)
class Refusal:
    """Why the gate refused: `reason` is a short label (the metrics' label), `detail` one readable line."""

    reason: str  # non_finite | not_initialised | empty | utilisation | perplexity | collisions
    detail: str


def gate(health: dict, thresholds: GateThresholds, codes: int) -> list[Refusal]:
    """Every reason the snapshot with this health must not become latest (empty: it may). `codes`: codewords
    per level. A missing measure counts as the worst value."""
    t, out = thresholds, []
    possible = max(1, min(codes, int(health.get("items", 0))))  # codewords the catalogue could fill
    if not health.get("finite", False):
        out.append(Refusal("non_finite", "non-finite values in the codebooks or item vectors"))
    if not health.get("initialised", False):
        out.append(Refusal("not_initialised", "codebooks not initialised (no training step yet)"))
    if health.get("items", 0) == 0:
        out.append(Refusal("empty", "empty catalogue"))
    levels = sorted(int(m.group(1)) for key in health if (m := _LEVEL_UTILISATION.fullmatch(key))) or [1]
    for level in levels:
        floor = (t.min_utilisation if level == 1 else t.min_deep_utilisation) * possible / codes
        value = health.get(f"level{level}_utilisation", 0.0)
        if value < floor:
            out.append(Refusal("utilisation", f"level-{level} utilisation {value:.3f} is below the floor "
                                              f"{floor:.3f}"))
    perplexity, floor = health.get("level1_perplexity", 0.0), t.min_perplexity * possible
    if perplexity < floor:
        out.append(Refusal("perplexity", f"level-1 perplexity {perplexity:.2f} is below the floor {floor:.2f}"))
    collisions = health.get("collision_rate", 1.0)
    if collisions > t.max_collision_rate:
        out.append(Refusal("collisions", f"collision rate {collisions:.3f} is above the ceiling "
                                         f"{t.max_collision_rate}"))
    return out


def verdict(refusals: list[Refusal]) -> dict:
    """The gate's verdict as a snapshot's health records it ("gate")."""
    return {"passed": not refusals, "reasons": [r.detail for r in refusals], "refused": [r.reason for r in refusals]}
