"""`Snapshot`: one published state of a SPARC model, the unit the store versions.

A snapshot is plain data (tensors + JSON-able dicts); it does no I/O. Its bytes form lives in format.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from codebook_store.checks import check_item_ids, check_lineage, check_model_name, check_tables, describe
from codebook_store.errors import InvalidSnapshotError

# Names of the fixed tensors (and of the vocabulary's, format.py); weights may not take them.
RESERVED_TENSOR_NAMES = ("codebooks", "item_codes", "item_ids")


def normalise_json(value: Any, what: str) -> Any:
    """`value` after a JSON round trip (tuples become lists, keys become strings); rejects NaN/Inf and
    anything JSON cannot hold, so a snapshot's metadata equals itself after encode/decode."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidSnapshotError(f"{what} is not strict JSON: {exc}") from exc


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One version of a model's codebooks, item codes and serving weights.

    model      : model name, e.g. "sparc"; one store may hold several
    version    : monotonic integer >= 0, unique per model
    parent     : the version this one was trained from, or None (must be < version)
    created_at : unix seconds (UTC) when the snapshot was made
    watermark  : input seen so far, e.g. {"kafka": {"feedback-events:0": 123}} or {"replay": 5000}
    config     : the model config (JSON dict)
    codebooks  : float32 (L, C, D): L levels of C codewords of dimension D
    item_codes : int64 (N+1, L): row i holds item i's code per level, each in [0, C); row 0 is padding
    weights    : name -> tensor, the model weights serving needs (e.g. an item-embedding table (N+1, D))
    health     : JSON dict of health metrics (trainer.rq.code_health; drift.drift for the drift part)
    item_ids   : the external item id (an int64 or a non-empty string, all distinct) of rows 1..N of every
                 per-item tensor, or None when row i is item i; an identity tuple (1, 2, ..., N) is kept as None.
                 Rows are not ids: a learner with a bounded catalogue reuses an evicted item's row.

    Equality is by value via `same_as` (bit-for-bit tensors); `==` is identity because tensors are involved.
    """

    model: str
    version: int
    parent: int | None
    created_at: float
    watermark: dict[str, Any]
    config: dict[str, Any]
    codebooks: torch.Tensor
    item_codes: torch.Tensor
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    item_ids: tuple[int | str, ...] | None = None

    def __post_init__(self) -> None:
        check_model_name(self.model)
        check_lineage(self.version, self.parent)
        if not isinstance(self.created_at, int | float) or not math.isfinite(self.created_at):
            raise InvalidSnapshotError(f"created_at must be finite unix seconds, got {self.created_at!r}")
        object.__setattr__(self, "created_at", float(self.created_at))
        for name in ("watermark", "config", "health"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise InvalidSnapshotError(f"{name} must be a dict, got {type(value).__name__}")
            object.__setattr__(self, name, normalise_json(value, name))
        _check_tensors(self.codebooks, self.item_codes, self.weights)
        object.__setattr__(self, "item_ids", check_item_ids(self.item_ids, self.num_items))

    @property
    def num_levels(self) -> int:
        """L, the number of residual levels."""
        return int(self.codebooks.shape[0])

    @property
    def codebook_size(self) -> int:
        """C, the number of codewords per level."""
        return int(self.codebooks.shape[1])

    @property
    def num_items(self) -> int:
        """N, the number of items (item_codes has N+1 rows; row 0 is padding)."""
        return int(self.item_codes.shape[0]) - 1

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes by name: "codebooks", "item_codes" and each weight's own name."""
        shapes = {"codebooks": tuple(self.codebooks.shape), "item_codes": tuple(self.item_codes.shape)}
        shapes.update({name: tuple(t.shape) for name, t in self.weights.items()})
        return shapes

    def same_as(self, other: Snapshot) -> bool:
        """True when every field is equal and every tensor is equal bit for bit (dtype and shape included)."""
        meta = ("model", "version", "parent", "created_at", "watermark", "config", "health", "item_ids")
        if any(getattr(self, k) != getattr(other, k) for k in meta):
            return False
        if sorted(self.weights) != sorted(other.weights):
            return False
        pairs = [(self.codebooks, other.codebooks), (self.item_codes, other.item_codes)]
        pairs += [(self.weights[k], other.weights[k]) for k in self.weights]
        return all(_bit_equal(a, b) for a, b in pairs)


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():  # compare bits, so NaN payloads and -0.0 count
        width = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[a.element_size()]
        a, b = a.contiguous().view(width), b.contiguous().view(width)
    return bool(torch.equal(a, b))


def _check_tensors(codebooks: torch.Tensor, item_codes: torch.Tensor, weights: dict[str, torch.Tensor]) -> None:
    for name, value in (("codebooks", codebooks), ("item_codes", item_codes)):
        if not isinstance(value, torch.Tensor):
            raise InvalidSnapshotError(f"{name} must be a tensor, got {describe(value)}")
    check_tables(codebooks, item_codes)
    if not isinstance(weights, dict):
        raise InvalidSnapshotError(f"weights must be a dict of tensors, got {type(weights).__name__}")
    for name, tensor in weights.items():
        if not isinstance(name, str) or not name or name in RESERVED_TENSOR_NAMES or name == "__metadata__":
            raise InvalidSnapshotError(
                f"invalid weight name {name!r} (reserved: {', '.join(RESERVED_TENSOR_NAMES)}, __metadata__)"
            )
        if not isinstance(tensor, torch.Tensor):
            raise InvalidSnapshotError(f"weight {name!r} must be a tensor, got {type(tensor).__name__}")
