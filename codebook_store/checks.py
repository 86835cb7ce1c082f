"""The rules a snapshot's names and tables follow, without torch.

`Snapshot` (torch tensors) and the byte-level readers (numpy arrays: the store's `put_raw`, the codebook-updates
subscriber) check through the same functions, so a torch-free service refuses exactly what the trainer would.
Tables are anything with `.dtype`, `.shape`, `.min()` and `.max()` (torch tensors and numpy arrays both are).
"""

from __future__ import annotations

import math
import re
from typing import Any

from codebook_store.errors import InvalidSnapshotError

DEFAULT_MODEL = "sparc"

# Model names become directory names and key prefixes: keep them to a safe alphabet.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_model_name(model: str) -> str:
    """Return `model` if it is a valid model name (letters, digits, `_ . -`; not starting with `.`/`-`)."""
    if not isinstance(model, str) or not MODEL_NAME_RE.match(model):
        raise InvalidSnapshotError(f"invalid model name {model!r}: use letters, digits, '_', '.', '-'")
    return model


def check_lineage(version: Any, parent: Any) -> None:
    """version an int >= 0; parent None or an int in [0, version)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InvalidSnapshotError(f"version must be an int >= 0, got {version!r}")
    if parent is not None and (isinstance(parent, bool) or not isinstance(parent, int) or not 0 <= parent < version):
        raise InvalidSnapshotError(f"parent must be None or an int in [0, {version}), got {parent!r}")


def dtype_name(dtype: Any) -> str:
    """"float32", "int64", ... for a torch or a numpy dtype."""
    return str(dtype).removeprefix("torch.")


def check_tables(codebooks: Any, item_codes: Any) -> None:
    """codebooks float32 (L, C, D) with L, C >= 1; item_codes int64 (N+1, L) with every code of rows 1..N in
    [0, C) (row 0, padding, is exempt)."""
    levels, size = check_codebooks(codebooks)
    if dtype_name(item_codes.dtype) != "int64" or len(item_codes.shape) != 2:
        raise InvalidSnapshotError(f"item_codes must be an int64 (N+1, L) tensor, got {describe(item_codes)}")
    if item_codes.shape[0] < 1 or item_codes.shape[1] != levels:
        raise InvalidSnapshotError(
            f"item_codes shape {tuple(item_codes.shape)} does not match (N+1, L={levels}) with N >= 0"
        )
    check_code_range(item_codes[1:], size)


def check_codebooks(codebooks: Any) -> tuple[int, int]:
    """codebooks float32 (L, C, D) with L, C >= 1; returns (L, C)."""
    if dtype_name(codebooks.dtype) != "float32" or len(codebooks.shape) != 3:
        raise InvalidSnapshotError(f"codebooks must be a float32 (L, C, D) tensor, got {describe(codebooks)}")
    levels, size, _ = codebooks.shape
    if levels < 1 or size < 1:
        raise InvalidSnapshotError(f"codebooks need L >= 1 and C >= 1, got shape {tuple(codebooks.shape)}")
    return int(levels), int(size)


def check_code_range(codes: Any, size: int) -> None:
    """Every code of `codes` (items' rows, padding excluded) in [0, size)."""
    if math.prod(codes.shape) and (int(codes.min()) < 0 or int(codes.max()) >= size):
        raise InvalidSnapshotError(f"item codes must lie in [0, {size}) (row 0, padding, is exempt)")


def describe(value: Any) -> str:
    """"float64 tensor of shape (2, 4, 3)" for an array, else the type's name."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"{dtype_name(value.dtype)} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_ID_CHARS = 256  # the longest string id; the learner admits no longer one (trainer.vocab.MAX_ID_CHARS)


def check_item_ids(item_ids: Any, num_items: int) -> tuple[int | str, ...] | None:
    """A snapshot's vocabulary: None, or one external id per item row 1..N, each an int64 or a string of 1 to
    MAX_ID_CHARS characters, all distinct. Returns it as a tuple, or None when it is the identity (row i is item i)."""
    if item_ids is None:
        return None
    if isinstance(item_ids, str | bytes) or not hasattr(item_ids, "__iter__"):
        raise InvalidSnapshotError(f"item_ids must be a sequence of ids, got {type(item_ids).__name__}")
    ids = tuple(item_ids)
    if len(ids) != num_items:
        raise InvalidSnapshotError(f"item_ids names {len(ids)} items, item_codes has {num_items}")
    for item in ids:
        if isinstance(item, bool) or not (
            (isinstance(item, int) and INT64_MIN <= item <= INT64_MAX)
            or (isinstance(item, str) and 0 < len(item) <= MAX_ID_CHARS)
        ):
            raise InvalidSnapshotError(
                f"an item id is an int64 or a string of 1 to {MAX_ID_CHARS} characters, got {item!r}"[:200]
            )
    if len(set(ids)) != len(ids):
        raise InvalidSnapshotError("item_ids holds an id twice")
    if all(type(item) is int and item == row for row, item in enumerate(ids, start=1)):
        return None
    return ids
