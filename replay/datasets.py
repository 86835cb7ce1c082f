"""Sequence datasets in the S3-Rec folder format, and the leave-one-out split.

Format (any dataset name works; nothing is hard-coded):
  <Name>.txt                  `user item1 item2 ...`, one user per line, items in time order (ids >= 1)
  <Name>_timestamps.txt       optional, `user t1 t2 ...`, aligned position by position with <Name>.txt
  <Name>_item2attributes.json optional, `{"item": [attr, ...], ...}` (attribute ids >= 1)

Item id 0 is reserved for padding everywhere in the project.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A dataset file is missing or malformed. The message names `file:line: reason`."""


@dataclass(frozen=True)
class SequenceDataset:
    """Per-user item sequences in time order.

    sequences[u]  : int64 array of item ids (1..num_items), oldest first
    timestamps[u] : int64 array of unix seconds aligned with sequences[u], or None for the whole dataset
    item_attributes[i] : attribute ids (1..num_attributes) of item i; items without any are absent
    """

    name: str
    user_ids: np.ndarray
    sequences: list[np.ndarray]
    num_items: int
    timestamps: list[np.ndarray] | None = None
    item_attributes: dict[int, list[int]] = field(default_factory=dict)
    num_attributes: int = 0

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def summary(self) -> dict:
        return {
            "name": self.name,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
        }


COMPANION_SUFFIXES = ("_timestamps", "_sample", "_seq_original_ids")  # .txt files beside <Name>.txt


def _sequence_file(folder: Path) -> Path:
    """The one `<Name>.txt` of an S3-Rec folder; the name may contain underscores (`Toys_and_Games.txt`).

    Companions are not candidates: `<x>_timestamps.txt`, `<x>_sample.txt`, `<x>_seq_original_ids.txt`, and any
    `<Stem>_<more>.txt` beside another candidate `<Stem>.txt`. When several candidates remain, a name with an
    underscore counts only with its own `_timestamps.txt` or `_item2attributes.json` beside it (so side tables
    such as `sas_to_original_items.txt` do not make a folder ambiguous).
    """
    candidates = sorted(f for f in folder.glob("*.txt") if not f.stem.endswith(COMPANION_SUFFIXES))
    stems = {f.stem for f in candidates}
    candidates = [f for f in candidates if not any(f.stem.startswith(f"{s}_") for s in stems)]
    if len(candidates) > 1:
        candidates = [f for f in candidates if "_" not in f.stem
                      or (folder / f"{f.stem}_timestamps.txt").exists()
                      or (folder / f"{f.stem}_item2attributes.json").exists()]
    if len(candidates) != 1:
        names = ", ".join(f.name for f in candidates) or "none"
        raise DataError(
            f"{folder}: expected exactly one <Name>.txt sequence file in the folder, found {names}; "
            "pass the file itself with --data"
        )
    return candidates[0]


def _resolve(path: str | Path) -> tuple[Path, str]:
    p = Path(path)
    if p.is_dir():
        p = _sequence_file(p)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.suffix != ".txt":
        raise DataError(f"{p}: expected a <Name>.txt sequence file (S3-Rec format)")
    return p, p.stem


def _read_int_rows(path: Path) -> list[tuple[int, list[int]]]:
    rows = []
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            values = []
            for x in parts:
                try:
                    values.append(int(x))
                except ValueError:
                    raise DataError(f"{path}:{lineno}: not an integer: {x!r}") from None
            if len(values) < 2:
                raise DataError(f"{path}:{lineno}: a user with no items")
            rows.append((lineno, values))
    if not rows:
        raise DataError(f"{path}: the file holds no sequences")
    return rows


def load_s3rec(path: str | Path) -> SequenceDataset:
    """Load a dataset in the S3-Rec format from a folder or from its `<Name>.txt` file."""
    seq_path, name = _resolve(path)
    rows = _read_int_rows(seq_path)
    user_ids, sequences = [], []
    for lineno, values in rows:
        items = np.asarray(values[1:], dtype=np.int64)
        if (items < 1).any():
            raise DataError(f"{seq_path}:{lineno}: item ids must be >= 1 (0 is padding)")
        user_ids.append(values[0])
        sequences.append(items)
    if len(set(user_ids)) != len(user_ids):
        raise DataError(f"{seq_path}: a user id appears on more than one line")
    num_items = int(max(int(s.max()) for s in sequences))

    timestamps = None
    ts_path = seq_path.with_name(f"{name}_timestamps.txt")
    if ts_path.exists():
        ts_rows = _read_int_rows(ts_path)
        if len(ts_rows) != len(rows):
            raise DataError(f"{ts_path}: {len(ts_rows)} lines, but {seq_path.name} has {len(rows)}")
        timestamps = []
        for (lineno, values), uid, seq in zip(ts_rows, user_ids, sequences, strict=True):
            if values[0] != uid:
                raise DataError(f"{ts_path}:{lineno}: user {values[0]} where {seq_path.name} has {uid}")
            ts = np.asarray(values[1:], dtype=np.int64)
            if len(ts) != len(seq):
                raise DataError(f"{ts_path}:{lineno}: {len(ts)} timestamps for {len(seq)} items")
            timestamps.append(ts)

    attributes: dict[int, list[int]] = {}
    num_attributes = 0
    attr_path = seq_path.with_name(f"{name}_item2attributes.json")
    if attr_path.exists():
        try:
            raw = json.loads(attr_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{attr_path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(raw, dict):
            raise DataError(f"{attr_path}:1: expected an object {{item: [attribute, ...]}}")
        for key, attrs in raw.items():
            try:
                item = int(key)
                values = [int(a) for a in attrs]
            except (TypeError, ValueError):
                raise DataError(f"{attr_path}: item {key!r}: ids must be integers") from None
            if any(a < 1 for a in values):
                raise DataError(f"{attr_path}: item {key!r}: attribute ids must be >= 1")
            if values:
                attributes[item] = values
                num_attributes = max(num_attributes, max(values))
    return SequenceDataset(
        name=name,
        user_ids=np.asarray(user_ids, dtype=np.int64),
        sequences=sequences,
        num_items=num_items,
        timestamps=timestamps,
        item_attributes=attributes,
        num_attributes=num_attributes,
    )


@dataclass(frozen=True)
class LeaveOneOut:
    """Leave-one-out split: per user the last item is the test target, the second last the validation target.

    train[u]        : seq[:-2]  (what models learn from)
    valid_inputs[u] : seq[:-2] -> valid_targets[u] = seq[-2]
    test_inputs[u]  : seq[:-1] -> test_targets[u]  = seq[-1]
    Users with fewer than 3 items are kept in train only (Beauty 5-core has none).
    """

    num_items: int
    train: list[np.ndarray]
    valid_inputs: list[np.ndarray]
    valid_targets: np.ndarray
    test_inputs: list[np.ndarray]
    test_targets: np.ndarray
    test_lengths: np.ndarray  # full sequence length of each evaluated user (for the cold slice)


def leave_one_out(ds: SequenceDataset) -> LeaveOneOut:
    train, v_in, v_t, t_in, t_t, lengths = [], [], [], [], [], []
    for seq in ds.sequences:
        if len(seq) < 3:
            train.append(seq)
            continue
        train.append(seq[:-2])
        v_in.append(seq[:-2])
        v_t.append(seq[-2])
        t_in.append(seq[:-1])
        t_t.append(seq[-1])
        lengths.append(len(seq))
    return LeaveOneOut(
        num_items=ds.num_items,
        train=train,
        valid_inputs=v_in,
        valid_targets=np.asarray(v_t, dtype=np.int64),
        test_inputs=t_in,
        test_targets=np.asarray(t_t, dtype=np.int64),
        test_lengths=np.asarray(lengths, dtype=np.int64),
    )
