"""External item ids -> dense rows of the item table: the online learner's vocabulary (pure Python, no I/O).

Items are named by external ids: integers (dataset ids, 2**62) or strings (SKUs). The model's item table is
indexed by dense rows 1..N (row 0 is padding), so the value of an id never decides the size of anything: a new
item costs one row, whatever its id.

    vocab = ItemVocab(max_items=100_000, on_full="evict")
    vocab.admit("sku-17")        # Admission(row=1, new=True, evicted=None)
    vocab.row("sku-17"), vocab.ids()[1]

Normalisation: 7 and "7" name the same item. `canonical_id` turns a string of ASCII decimal digits in canonical
form ("7"; not "07", "+7", " 7") that fits int64 into that integer; every other string stays itself. So an id
sent once as a JSON number and once as a JSON string is one item, and answers name it as the number.

Bound: at most `max_items` items. A new item when the vocabulary is full is refused (policy "refuse": `admit`
returns None) or takes the row of the least recently seen item (policy "evict"; that item leaves, and the caller
resets the row's parameters). An item is seen when it is admitted or touched (the learner touches the items of
item events and of feedback targets; mentions in a history do not count).

Every lookup, admission, touch and eviction is O(1): one OrderedDict (id -> row) kept in least-recently-seen
order, and a list (row -> id).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

ItemId = int | str
OnFull = Literal["refuse", "evict"]

MAX_ID_CHARS = 256  # the longest string id (streams.records bounds ids on the wire to this)
INT64_MAX = 2**63 - 1
_CANONICAL_INT = re.compile(r"0|[1-9][0-9]{0,18}")  # ASCII only (str.isdigit accepts other scripts' digits)


def canonical_id(item: object) -> ItemId:
    """The canonical form of an external id (module doc); raises TypeError for other types (bool included)
    and ValueError for an int outside int64 or a string that is empty or longer than MAX_ID_CHARS."""
    if isinstance(item, bool) or not isinstance(item, int | str):
        raise TypeError(f"an item id is an int or a str, got {type(item).__name__}")
    if isinstance(item, int):
        if not -INT64_MAX - 1 <= item <= INT64_MAX:
            raise ValueError(f"item id {item} does not fit int64")
        return item
    if not 0 < len(item) <= MAX_ID_CHARS:
        raise ValueError(f"a string item id has 1 to {MAX_ID_CHARS} characters, got {len(item)}")
    if _CANONICAL_INT.fullmatch(item) and int(item) <= INT64_MAX:
        return int(item)
    return item


class Admission(NamedTuple):
    """What `admit` did: the item's row; `new`: it was not known (its row is a new one or a reused one);
    `evicted`: the item that left to free that row (policy "evict"), else None."""

    row: int
    new: bool
    evicted: ItemId | None


class ItemVocab:
    """External ids <-> rows 1..N, at most `max_items`, with a policy for a full vocabulary (module doc)."""

    def __init__(self, max_items: int, on_full: OnFull = "refuse", ids: Iterable[object] = ()):
        """`ids`: the ids of rows 1, 2, ... in order (a restored vocabulary; least recently seen first)."""
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if on_full not in ("refuse", "evict"):
            raise ValueError(f"on_full must be 'refuse' or 'evict', got {on_full!r}")
        self.max_items, self.on_full = max_items, on_full
        self._rows: OrderedDict[ItemId, int] = OrderedDict()  # least recently seen first
        self._ids: list[ItemId | None] = [None]  # row -> id; row 0 is padding
        self.evictions = 0  # rows handed to another item so far (a cache of per-row results must redo those)
        for item in ids:
            key = canonical_id(item)
            if key in self._rows:
                raise ValueError(f"item id {key!r} appears twice")
            self._rows[key] = len(self._ids)
            self._ids.append(key)
        if len(self._rows) > max_items:
            raise ValueError(f"{len(self._rows)} items are more than max_items={max_items}")

    @classmethod
    def identity(cls, n: int, max_items: int, on_full: OnFull = "refuse") -> ItemVocab:
        """Items 1..n at rows 1..n: the vocabulary of a table indexed by its ids (a snapshot without one)."""
        return cls(max_items, on_full, range(1, n + 1))

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, item: object) -> int | None:
        """The item's row, or None when it is not known (no admission, no touch)."""
        return self._rows.get(canonical_id(item))

    def known_rows(self, items: Sequence[ItemId]) -> list[int]:
        """The rows of the known items among `items` (canonical ids, as validated records carry them), in order;
        unknown ones are left out. One dict lookup per item: this runs for every item of every history."""
        rows, out = self._rows, []
        for item in items:
            row = rows.get(item)
            if row is None and isinstance(item, str):  # "7" names the item 7
                row = rows.get(canonical_id(item))
            if row is not None:
                out.append(row)
        return out

    def ids(self) -> list[ItemId | None]:
        """Row -> id for rows 0..N (a copy; row 0, padding, is None)."""
        return list(self._ids)

    def is_identity(self) -> bool:
        """True when row i holds item i for every row (a table indexed by its ids)."""
        return all(item == row and type(item) is int for row, item in enumerate(self._ids[1:], start=1))

    def touch(self, item: object) -> int | None:
        """Mark a known item seen now; its row, or None when it is not known."""
        key = canonical_id(item)
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def admit(self, item: object) -> Admission | None:
        """Touch a known item, or give a new one a row: a new row while there is room, else by the policy
        (None: refused)."""
        key = canonical_id(item)
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
            return Admission(row, False, None)
        evicted = None
        if len(self._rows) < self.max_items:
            row = len(self._ids)
            self._ids.append(key)
        elif self.on_full == "evict":
            evicted, row = self._rows.popitem(last=False)
            self._ids[row] = key
            self.evictions += 1
        else:
            return None
        self._rows[key] = row
        return Admission(row, True, evicted)
