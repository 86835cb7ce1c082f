"""`Snapshot`: one published state of a SPARC model, the unit the store versions.

A snapshot is plain data (tensors + JSON-able dicts); it does no I/O. Its bytes form lives in format.py.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from codebook_store.errors import InvalidSnapshotError

DEFAULT_MODEL = "sparc"

# Model names become directory names and key prefixes: keep them to a safe alphabet.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# Names of the fixed tensors (and of the vocabulary's, format.py); weights may not take them.
RESERVED_TENSOR_NAMES = ("codebooks", "item_codes", "item_ids")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_model_name(model: str) -> str:
    """Return `model` if it is a valid model name (letters, digits, `_ . -`; not starting with `.`/`-`)."""
    if not isinstance(model, str) or not MODEL_NAME_RE.match(model):
        raise InvalidSnapshotError(f"invalid model name {model!r}: use letters, digits, '_', '.', '-'")
    return model


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
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise InvalidSnapshotError(f"version must be an int >= 0, got {self.version!r}")
        if self.parent is not None and (
            isinstance(self.parent, bool) or not isinstance(self.parent, int) or not 0 <= self.parent < self.version
        ):
            raise InvalidSnapshotError(f"parent must be None or an int in [0, {self.version}), got {self.parent!r}")
        if not isinstance(self.created_at, int | float) or not math.isfinite(self.created_at):
            raise InvalidSnapshotError(f"created_at must be finite unix seconds, got {self.created_at!r}")
        object.__setattr__(self, "created_at", float(self.created_at))
        for name in ("watermark", "config", "health"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise InvalidSnapshotError(f"{name} must be a dict, got {type(value).__name__}")
            object.__setattr__(self, name, normalise_json(value, name))
        _check_tensors(self.codebooks, self.item_codes, self.weights)
        object.__setattr__(self, "item_ids", _check_item_ids(self.item_ids, self.num_items))

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
    if not isinstance(codebooks, torch.Tensor) or codebooks.dtype != torch.float32 or codebooks.dim() != 3:
        raise InvalidSnapshotError(f"codebooks must be a float32 (L, C, D) tensor, got {_describe(codebooks)}")
    levels, size, _ = codebooks.shape
    if levels < 1 or size < 1:
        raise InvalidSnapshotError(f"codebooks need L >= 1 and C >= 1, got shape {tuple(codebooks.shape)}")
    if not isinstance(item_codes, torch.Tensor) or item_codes.dtype != torch.int64 or item_codes.dim() != 2:
        raise InvalidSnapshotError(f"item_codes must be an int64 (N+1, L) tensor, got {_describe(item_codes)}")
    if item_codes.shape[0] < 1 or item_codes.shape[1] != levels:
        raise InvalidSnapshotError(
            f"item_codes shape {tuple(item_codes.shape)} does not match (N+1, L={levels}) with N >= 0"
        )
    real = item_codes[1:]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= size):
        raise InvalidSnapshotError(f"item codes must lie in [0, {size}) (row 0, padding, is exempt)")
    if not isinstance(weights, dict):
        raise InvalidSnapshotError(f"weights must be a dict of tensors, got {type(weights).__name__}")
    for name, tensor in weights.items():
        if not isinstance(name, str) or not name or name in RESERVED_TENSOR_NAMES or name == "__metadata__":
            raise InvalidSnapshotError(
                f"invalid weight name {name!r} (reserved: {', '.join(RESERVED_TENSOR_NAMES)}, __metadata__)"
            )
        if not isinstance(tensor, torch.Tensor):
            raise InvalidSnapshotError(f"weight {name!r} must be a tensor, got {type(tensor).__name__}")


def _check_item_ids(item_ids: Any, num_items: int) -> tuple[int | str, ...] | None:
    if item_ids is None:
        return None
    if isinstance(item_ids, str | bytes) or not hasattr(item_ids, "__iter__"):
        raise InvalidSnapshotError(f"item_ids must be a sequence of ids, got {type(item_ids).__name__}")
    ids = tuple(item_ids)
    if len(ids) != num_items:
        raise InvalidSnapshotError(f"item_ids names {len(ids)} items, item_codes has {num_items}")
    for item in ids:
        if isinstance(item, bool) or not (
            (isinstance(item, int) and INT64_MIN <= item <= INT64_MAX) or (isinstance(item, str) and item)
        ):
            raise InvalidSnapshotError(f"an item id is an int64 or a non-empty string, got {item!r}")
    if len(set(ids)) != len(ids):
        raise InvalidSnapshotError("item_ids holds an id twice")
    if all(type(item) is int and item == row for row, item in enumerate(ids, start=1)):
        return None
    return ids


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
