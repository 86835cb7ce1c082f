"""Drift between two snapshots and the item remap behind it (pure numpy math, no I/O, no torch).

Per-snapshot health (utilisation, perplexity, collisions) is the trainer's (trainer.rq.code_health); it
travels in `Snapshot.health` and the store only carries it.

Conventions: item_codes is int64 (N+1, L) with row 0 as padding; items are rows 1..N. A remap (`code_remap`)
compares ROWS and covers every row, the padding row included (the model codes its padding embedding too, and a
table rebuilt from a remap must equal the publisher's byte for byte). Rows are not items: a vocabulary (the
external id of rows 1..N; None: row i is item i) may hand an evicted item's row to another item. So what a
cache keyed by item migrates is read by ids (`id_remap`), the vocabulary travels as a row diff (`ids_delta`),
and drift compares an item's code with its own earlier code, wherever its row is. Inputs may be numpy arrays or
CPU torch tensors (read through `np.asarray`); outputs are numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from codebook_store.errors import IncompatibleSnapshotError

if TYPE_CHECKING:
    from codebook_store.snapshot import Snapshot

ItemId = int | str


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


def vocabulary(item_ids: Sequence[ItemId] | None, num_items: int) -> tuple[ItemId, ...]:
    """The external ids of rows 1..N: `item_ids` as a tuple, or (1, ..., N) when it is None (row i is item i)."""
    return tuple(range(1, num_items + 1)) if item_ids is None else tuple(item_ids)


@dataclass(frozen=True)
class RowMatch:
    """Where the items of an old and a new vocabulary sit (numpy int64 arrays of rows, each in 1..N).

    old_rows, new_rows : (M,) the rows of the M items present in both, ordered by new row
    added_rows         : (A,) new rows of items only in the new vocabulary, ascending
    removed_rows       : (R,) old rows of items only in the old vocabulary, ascending
    reused_rows        : (U,) rows 1..min(N_old, N_new) holding another item in the new vocabulary, ascending
    """

    old_rows: np.ndarray
    new_rows: np.ndarray
    added_rows: np.ndarray
    removed_rows: np.ndarray
    reused_rows: np.ndarray


def match_items(old_ids: Sequence[ItemId] | None, old_items: int, new_ids: Sequence[ItemId] | None,
                new_items: int) -> RowMatch:
    """Match the items of two vocabularies of `old_items` and `new_items` rows (None: row i is item i). Rows
    that keep their item are compared in one vectorised pass; only rows whose item differs are looked up."""
    old, new = _ids_array(old_ids, old_items), _ids_array(new_ids, new_items)
    common = min(old_items, new_items)
    same = old[:common] == new[:common]  # (common,) elementwise over objects: 7 != "7"
    kept = np.flatnonzero(same)  # 0-based rows - 1
    reused = np.flatnonzero(~same)
    where = {old[i]: i for i in [*reused.tolist(), *range(common, old_items)]}
    moved_old, moved_new, added = [], [], []
    for j in [*reused.tolist(), *range(common, new_items)]:
        i = where.pop(new[j], None)
        if i is None:
            added.append(j)
        else:  # the item sits at another row now: evicted and admitted again since the old version
            moved_old.append(i)
            moved_new.append(j)
    new_rows = np.concatenate([kept, np.asarray(moved_new, dtype=np.int64)])
    old_rows = np.concatenate([kept, np.asarray(moved_old, dtype=np.int64)])
    order = np.argsort(new_rows, kind="stable")
    return RowMatch(
        old_rows=old_rows[order] + 1,
        new_rows=new_rows[order] + 1,
        added_rows=np.asarray(added, dtype=np.int64) + 1,
        removed_rows=np.asarray(sorted(where.values()), dtype=np.int64) + 1,
        reused_rows=reused.astype(np.int64) + 1,
    )


@dataclass(frozen=True)
class IdRemap:
    """A remap read by external ids: what a cache keyed by item id migrates.

    changed     : ids in both versions whose code tuple changed, in the order of their new rows (wherever their
                  rows are: an item evicted and admitted again since the base sits at another row)
    added       : ids only in the new version (new items, items that took an evicted item's row), by new row
    removed     : ids only in the base (evicted items, items whose rows were dropped), by base row
    reused_rows : int64 (U,) rows that hold another item than in the base, ascending: a cache keyed by ROW must
                  forget what it holds for them (their old item is among `removed`, their new one among `added`)
    """

    changed: tuple[ItemId, ...]
    added: tuple[ItemId, ...]
    removed: tuple[ItemId, ...]
    reused_rows: np.ndarray


def id_remap(old_codes: Any, old_ids: Sequence[ItemId] | None, new_codes: Any,
             new_ids: Sequence[ItemId] | None) -> IdRemap:
    """How the items moved from an old table and vocabulary to a new one (None: row i is item i)."""
    old, new = _tables(old_codes, new_codes)
    old_vocab, new_vocab = _ids_array(old_ids, old.shape[0] - 1), _ids_array(new_ids, new.shape[0] - 1)
    match = match_items(old_ids, old.shape[0] - 1, new_ids, new.shape[0] - 1)
    moved = (old[match.old_rows] != new[match.new_rows]).any(axis=1)
    return IdRemap(
        changed=tuple(new_vocab[match.new_rows[moved] - 1].tolist()),
        added=tuple(new_vocab[match.added_rows - 1].tolist()),
        removed=tuple(old_vocab[match.removed_rows - 1].tolist()),
        reused_rows=match.reused_rows,
    )


@dataclass(frozen=True)
class IdsDelta:
    """How a vocabulary changed, row by row, against a base vocabulary.

    rows : int64 (K,) ascending rows in 1..N whose id differs from the base's at that row (an evicted item's
           row handed on) or that the base lacks (rows N_base+1..N: items added); rows beyond N are dropped
    ids  : (K,) the new ids of those rows
    """

    rows: np.ndarray
    ids: tuple[ItemId, ...]


def ids_delta(old_ids: Sequence[ItemId] | None, old_items: int, new_ids: Sequence[ItemId] | None,
              new_items: int) -> IdsDelta:
    """The rows of the new vocabulary (`new_items` rows; None: row i is item i) that differ from the old one."""
    old, new = _ids_array(old_ids, old_items), _ids_array(new_ids, new_items)
    common = min(old_items, new_items)
    rows = np.concatenate([np.flatnonzero(old[:common] != new[:common]), np.arange(common, new_items)])
    return IdsDelta(rows=rows.astype(np.int64) + 1, ids=tuple(new[rows].tolist()))


def apply_ids_delta(base_ids: Sequence[ItemId] | None, base_items: int, delta: IdsDelta,
                    num_items: int) -> tuple[ItemId, ...]:
    """The vocabulary of `num_items` rows from the base's (`base_items` rows; None: row i is item i) and a delta
    taken against it. Raises IncompatibleSnapshotError when the delta leaves a row without an id (it was taken
    against a base of another size)."""
    ids = list(vocabulary(base_ids, base_items)[:num_items])
    rows = delta.rows.tolist()
    if rows and (rows[0] < 1 or rows[-1] > num_items or len(rows) != len(delta.ids)):
        raise ValueError(f"a vocabulary delta names rows 1..{num_items}, one id each")
    missing = num_items - len(ids)
    if missing > 0 and rows[-missing:] != list(range(len(ids) + 1, num_items + 1)):
        raise IncompatibleSnapshotError(
            f"the vocabulary delta does not name rows {len(ids) + 1}..{num_items}, which the base of "
            f"{base_items} items lacks: it was taken against another base",
            [f"item_ids delta against a base of {base_items} items"],
        )
    ids.extend([None] * max(missing, 0))
    for row, item in zip(rows, delta.ids, strict=True):
        ids[row - 1] = item
    return tuple(ids)


def codeword_movement(old_codebooks: Any, new_codebooks: Any) -> list[float]:
    """Mean L2 distance between matching codewords, per level; both codebooks (L, C, D) of equal shape."""
    old, new = np.asarray(old_codebooks, dtype=np.float64), np.asarray(new_codebooks, dtype=np.float64)
    if old.shape != new.shape:
        raise IncompatibleSnapshotError(
            f"codebook shapes differ: {old.shape} vs {new.shape}", [f"codebooks: {old.shape} != {new.shape}"]
        )
    dist = np.linalg.norm(new - old, axis=2)  # (L, C)
    return [float(x) for x in dist.mean(axis=1)]


def code_drift(old_codes: Any, new_codes: Any, old_codebooks: Any, new_codebooks: Any,
               old_ids: Sequence[ItemId] | None = None, new_ids: Sequence[ItemId] | None = None) -> dict[str, Any]:
    """Drift between two assignments (see `drift`), from the tables and their vocabularies (None: row i is
    item i)."""
    old, new = _tables(old_codes, new_codes)
    match = match_items(old_ids, old.shape[0] - 1, new_ids, new.shape[0] - 1)
    common = match.old_rows.size  # items present in both
    diff = old[match.old_rows] != new[match.new_rows]  # (M, L)
    changed = int(diff.any(axis=1).sum())
    per_level = diff.sum(axis=0).tolist()
    return {
        "common_items": common,
        "changed_items": changed,
        "changed_share": changed / common if common else 0.0,
        "level_changed_share": [n / common if common else 0.0 for n in per_level],
        "codeword_movement": codeword_movement(old_codebooks, new_codebooks),
        "new_items": int(match.added_rows.size),
        "removed_items": int(match.removed_rows.size),
        "reused_rows": int(match.reused_rows.size),
    }


def drift(parent: Snapshot, child: Snapshot) -> dict[str, Any]:
    """How far `child` moved from `parent`.

    Returns a JSON dict:
      parent_version      : parent.version
      common_items        : M, items (external ids) present in both, wherever their rows are
      changed_items       : items among those M whose full code tuple changed
      changed_share       : changed_items / M (0.0 when M = 0)
      level_changed_share : per level l, share of the M items whose level-l code changed (length L)
      codeword_movement   : per level, mean over the C codewords of ||child_c - parent_c||_2 (length L)
      new_items           : items in the child only; not in any share
      removed_items       : items in the parent only (evicted, or their rows dropped)
      reused_rows         : rows that hold another item in the child than in the parent (evictions)
    Without vocabularies (row i is item i) items are rows: M = min(N_parent, N_child).
    Raises IncompatibleSnapshotError when the codebook shapes (L, C, D) differ.
    """
    out = {"parent_version": parent.version}
    out.update(code_drift(parent.item_codes, child.item_codes, parent.codebooks, child.codebooks,
                          parent.item_ids, child.item_ids))
    return out


def _tables(old_codes: Any, new_codes: Any) -> tuple[np.ndarray, np.ndarray]:
    old, new = np.asarray(old_codes), np.asarray(new_codes)
    if old.ndim != 2 or new.ndim != 2 or old.shape[1] != new.shape[1]:
        raise IncompatibleSnapshotError(
            f"item code tables differ in levels: {old.shape} vs {new.shape}",
            [f"item_codes levels: {old.shape[-1]} != {new.shape[-1]}"],
        )
    return old, new


def _ids_array(item_ids: Sequence[ItemId] | None, num_items: int) -> np.ndarray:
    """The ids of rows 1..N as a numpy object array (N,), so rows compare in one pass."""
    if item_ids is not None and len(item_ids) != num_items:
        raise IncompatibleSnapshotError(f"a vocabulary of {len(item_ids)} ids for {num_items} items",
                                        [f"item_ids: {len(item_ids)} != {num_items}"])
    out = np.empty(num_items, dtype=object)
    out[:] = range(1, num_items + 1) if item_ids is None else list(item_ids)
    return out
