"""Drift between two snapshots and the item remap behind it (pure tensor math, no I/O).

Per-snapshot health (utilisation, perplexity, collisions) is the trainer's (trainer.rq.code_health); it
travels in `Snapshot.health` and the store only carries it.

Conventions: item_codes is int64 (N+1, L) with row 0 as padding (never counted); items are 1..N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from codebook_store.errors import IncompatibleSnapshotError
from codebook_store.snapshot import Snapshot


@dataclass(frozen=True)
class CodeRemap:
    """How an item -> code table changed from an old to a new one.

    changed_items : int64 (K,)   ids present in both tables whose full code tuple differs, ascending
    old_codes     : int64 (K, L) their codes in the old table
    new_codes     : int64 (K, L) their codes in the new table
    added_items   : int64 (A,)   ids only in the new table (new items), ascending
    added_codes   : int64 (A, L) their codes
    removed_items : int64 (R,)   ids only in the old table, ascending
    """

    changed_items: torch.Tensor
    old_codes: torch.Tensor
    new_codes: torch.Tensor
    added_items: torch.Tensor
    added_codes: torch.Tensor
    removed_items: torch.Tensor


def code_remap(old_codes: torch.Tensor, new_codes: torch.Tensor) -> CodeRemap:
    """Compare two item -> code tables, old (N_old+1, L) and new (N_new+1, L), over items 1..min(N)."""
    _check_levels(old_codes, new_codes)
    common = min(old_codes.shape[0], new_codes.shape[0])  # rows 0..common-1 exist in both
    old, new = old_codes[1:common], new_codes[1:common]  # (M, L) each
    changed = torch.nonzero((old != new).any(dim=1)).flatten()  # (K,) positions in old/new
    ids = torch.arange(common, new_codes.shape[0], dtype=torch.int64)
    return CodeRemap(
        changed_items=changed + 1,
        old_codes=old[changed],
        new_codes=new[changed],
        added_items=ids,
        added_codes=new_codes[common:],
        removed_items=torch.arange(common, old_codes.shape[0], dtype=torch.int64),
    )


def codeword_movement(old_codebooks: torch.Tensor, new_codebooks: torch.Tensor) -> list[float]:
    """Mean L2 distance between matching codewords, per level; both codebooks (L, C, D) of equal shape."""
    if old_codebooks.shape != new_codebooks.shape:
        raise IncompatibleSnapshotError(
            f"codebook shapes differ: {tuple(old_codebooks.shape)} vs {tuple(new_codebooks.shape)}",
            [f"codebooks: {tuple(old_codebooks.shape)} != {tuple(new_codebooks.shape)}"],
        )
    dist = torch.linalg.vector_norm(new_codebooks.double() - old_codebooks.double(), dim=2)  # (L, C)
    return [float(x) for x in dist.mean(dim=1)]


def code_drift(
    old_codes: torch.Tensor, new_codes: torch.Tensor, old_codebooks: torch.Tensor, new_codebooks: torch.Tensor
) -> dict[str, Any]:
    """Drift between two assignments (see `drift`), from the tensors alone."""
    _check_levels(old_codes, new_codes)
    common = min(old_codes.shape[0], new_codes.shape[0]) - 1  # items present in both
    diff = old_codes[1 : common + 1] != new_codes[1 : common + 1]  # (M, L)
    changed = int(diff.any(dim=1).sum())
    per_level = diff.sum(dim=0).tolist()
    return {
        "common_items": common,
        "changed_items": changed,
        "changed_share": changed / common if common else 0.0,
        "level_changed_share": [n / common if common else 0.0 for n in per_level],
        "codeword_movement": codeword_movement(old_codebooks, new_codebooks),
        "new_items": max(0, new_codes.shape[0] - old_codes.shape[0]),
        "removed_items": max(0, old_codes.shape[0] - new_codes.shape[0]),
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


def _check_levels(old_codes: torch.Tensor, new_codes: torch.Tensor) -> None:
    if old_codes.dim() != 2 or new_codes.dim() != 2 or old_codes.shape[1] != new_codes.shape[1]:
        raise IncompatibleSnapshotError(
            f"item code tables differ in levels: {tuple(old_codes.shape)} vs {tuple(new_codes.shape)}",
            [f"item_codes levels: {old_codes.shape[-1]} != {new_codes.shape[-1]}"],
        )
