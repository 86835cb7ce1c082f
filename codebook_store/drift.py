"""Drift between two snapshots and the item remap behind it (pure numpy math, no I/O, no torch).

Per-snapshot health (utilisation, perplexity, collisions) is the trainer's (trainer.rq.code_health); it
travels in `Snapshot.health` and the store only carries it.

Conventions: item_codes is int64 (N+1, L) with row 0 as padding; items are 1..N. Drift counts items only;
a remap covers every row, the padding row included (the model codes its padding embedding too, and a table
rebuilt from a remap must equal the publisher's byte for byte). Inputs may be numpy arrays or CPU torch tensors
(read through `np.asarray`); outputs are numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from codebook_store.errors import IncompatibleSnapshotError

if TYPE_CHECKING:
    from codebook_store.snapshot import Snapshot


@dataclass(frozen=True)
class CodeRemap:
    """How an item -> code table changed from an old to a new one (numpy int64 arrays).

    changed_items : (K,)   rows present in both tables whose code tuple differs, ascending; row 0 (padding)
                           among them when its codes changed
    old_codes     : (K, L) their codes in the old table
    new_codes     : (K, L) their codes in the new table
    added_items   : (A,)   ids only in the new table (new items), ascending
    added_codes   : (A, L) their codes
    removed_items : (R,)   ids only in the old table, ascending
    """

    changed_items: np.ndarray
    old_codes: np.ndarray
    new_codes: np.ndarray
    added_items: np.ndarray
    added_codes: np.ndarray
    removed_items: np.ndarray


def code_remap(old_codes: Any, new_codes: Any) -> CodeRemap:
    """Compare two item -> code tables, old (N_old+1, L) and new (N_new+1, L), over rows 0..min(N)."""
    old_all, new_all = _tables(old_codes, new_codes)
    common = min(old_all.shape[0], new_all.shape[0])  # rows 0..common-1 exist in both
    old, new = old_all[:common], new_all[:common]  # (M+1, L) each
    changed = np.flatnonzero((old != new).any(axis=1)).astype(np.int64)  # (K,)
    return CodeRemap(
        changed_items=changed,
        old_codes=old[changed],
        new_codes=new[changed],
        added_items=np.arange(common, new_all.shape[0], dtype=np.int64),
        added_codes=new_all[common:].copy(),
        removed_items=np.arange(common, old_all.shape[0], dtype=np.int64),
    )


def apply_remap(base_codes: Any, remap: CodeRemap) -> np.ndarray:
    """The new item -> code table (N+1, L) from the base table (N_base+1, L) and the remap taken against it.
    Raises IncompatibleSnapshotError when the remap was not taken against this base (levels, sizes, or the
    old codes of changed rows differ)."""
    base = np.asarray(base_codes)
    levels = remap.old_codes.shape[1]
    removed, added = remap.removed_items.size, remap.added_items.size
    common = base.shape[0] - removed  # rows 0..common-1 are in both tables
    changed = remap.changed_items
    problems = []
    if base.ndim != 2 or base.shape[1] != levels:
        problems.append(f"base has shape {tuple(base.shape)}, the remap has {levels} levels")
    elif common < 1 or not np.array_equal(remap.removed_items, np.arange(common, base.shape[0])):
        problems.append(f"removed items do not match the base's {base.shape[0] - 1} items")
    elif not np.array_equal(remap.added_items, np.arange(common, common + added)):
        problems.append(f"added items do not follow the base's {common - 1} items")
    elif changed.size and (int(changed.min()) < 0 or int(changed.max()) >= common):
        problems.append("changed rows lie outside the base")
    elif not np.array_equal(base[changed], remap.old_codes):
        problems.append("old codes of changed rows differ from the base")
    if problems:
        raise IncompatibleSnapshotError("the remap does not apply to this base: " + "; ".join(problems), problems)
    new = base[:common].copy()
    new[changed] = remap.new_codes
    return np.ascontiguousarray(np.concatenate([new, remap.added_codes]))


def codeword_movement(old_codebooks: Any, new_codebooks: Any) -> list[float]:
    """Mean L2 distance between matching codewords, per level; both codebooks (L, C, D) of equal shape."""
    old, new = np.asarray(old_codebooks, dtype=np.float64), np.asarray(new_codebooks, dtype=np.float64)
    if old.shape != new.shape:
        raise IncompatibleSnapshotError(
            f"codebook shapes differ: {old.shape} vs {new.shape}", [f"codebooks: {old.shape} != {new.shape}"]
        )
    dist = np.linalg.norm(new - old, axis=2)  # (L, C)
    return [float(x) for x in dist.mean(axis=1)]


def code_drift(old_codes: Any, new_codes: Any, old_codebooks: Any, new_codebooks: Any) -> dict[str, Any]:
    """Drift between two assignments (see `drift`), from the tables alone."""
    old, new = _tables(old_codes, new_codes)
    common = min(old.shape[0], new.shape[0]) - 1  # items present in both
    diff = old[1 : common + 1] != new[1 : common + 1]  # (M, L)
    changed = int(diff.any(axis=1).sum())
    per_level = diff.sum(axis=0).tolist()
    return {
        "common_items": common,
        "changed_items": changed,
        "changed_share": changed / common if common else 0.0,
        "level_changed_share": [n / common if common else 0.0 for n in per_level],
        "codeword_movement": codeword_movement(old_codebooks, new_codebooks),
        "new_items": max(0, new.shape[0] - old.shape[0]),
        "removed_items": max(0, old.shape[0] - new.shape[0]),
    }


def drift(parent: Snapshot, child: Snapshot) -> dict[str, Any]:
    """How far `child` moved from `parent`.

    Returns a JSON dict:
      parent_version      : parent.version
      common_items        : M, items present in both (1..min(N_parent, N_child))
      changed_items       : items among those M whose full code tuple changed
      changed_share       : changed_items / M (0.0 when M = 0)
      level_changed_share : per level l, share of the M items whose level-l code changed (length L)
      codeword_movement   : per level, mean over the C codewords of ||child_c - parent_c||_2 (length L)
      new_items           : items in the child only (N_child - N_parent when positive); not in any share
      removed_items       : items in the parent only
    Raises IncompatibleSnapshotError when the codebook shapes (L, C, D) differ.
    """
    out = {"parent_version": parent.version}
    out.update(code_drift(parent.item_codes, child.item_codes, parent.codebooks, child.codebooks))
    return out


def _tables(old_codes: Any, new_codes: Any) -> tuple[np.ndarray, np.ndarray]:
    old, new = np.asarray(old_codes), np.asarray(new_codes)
    if old.ndim != 2 or new.ndim != 2 or old.shape[1] != new.shape[1]:
        raise IncompatibleSnapshotError(
            f"item code tables differ in levels: {old.shape} vs {new.shape}",
            [f"item_codes levels: {old.shape[-1]} != {new.shape[-1]}"],
        )
    return old, new
