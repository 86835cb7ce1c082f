"""Does a snapshot fit a model? The trainer asks before loading a snapshot's tensors into its modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from codebook_store.errors import IncompatibleSnapshotError
from codebook_store.snapshot import Snapshot, normalise_json

_MISSING = object()

# Config keys that size a table which grows while the model runs, not a choice of architecture. On a stream the
# item table grows with the catalogue (ItemTower.grow_), so SparcConfig.num_items is the size at the moment a
# snapshot was taken: a snapshot with more (or fewer) items than the model asking for it is the same model.
# Whether its tensors fit is the shape check's question (item-sized weights appear there when the caller
# names them), so capacities are left out of the config comparison only.
CAPACITY_KEYS = ("num_items",)


def config_differences(
    stored: Mapping[str, Any], wanted: Mapping[str, Any], *, ignore: tuple[str, ...] = ()
) -> list[str]:
    """One line per top-level key whose value differs (a key absent on one side counts), sorted by key;
    keys in `ignore` are not compared. Both sides are compared after a JSON round trip, so a tuple equals the
    list it is stored as."""
    a, b = normalise_json(dict(stored), "stored config"), normalise_json(dict(wanted), "config")
    out = []
    for key in sorted((set(a) | set(b)) - set(ignore)):
        left, right = a.get(key, _MISSING), b.get(key, _MISSING)
        if left != right:
            out.append(f"config[{key!r}]: snapshot has {_show(left)}, model has {_show(right)}")
    return out


def shape_differences(
    stored: Mapping[str, tuple[int, ...]],
    wanted: Mapping[str, tuple[int, ...]],
    *,
    optional: tuple[str, ...] = (),
) -> list[str]:
    """One line per tensor name whose shape differs or that exists on one side only, sorted by name.
    Names in `optional` are compared only when `wanted` names them."""
    out = []
    for name in sorted(set(stored) | set(wanted)):
        if name in optional and name not in wanted:
            continue
        left, right = stored.get(name), wanted.get(name)
        if left is None:
            out.append(f"tensor {name!r}: missing in snapshot, model expects {tuple(right)}")
        elif right is None:
            out.append(f"tensor {name!r}: snapshot has {tuple(left)}, model does not expect it")
        elif tuple(left) != tuple(right):
            out.append(f"tensor {name!r}: snapshot has {tuple(left)}, model expects {tuple(right)}")
    return out


def check_compatible(snapshot: Snapshot, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise IncompatibleSnapshotError listing every difference between the snapshot and a model.

    config : the model's config dict; every top-level key must be equal (missing on one side = different),
             except the capacities in CAPACITY_KEYS (num_items: the item table grows on a stream)
    shapes : tensor name -> shape the model expects. Weight names are matched strictly both ways, like
             `load_state_dict(strict=True)`. "codebooks" (L, C, D) and "item_codes" (N+1, L) are checked only
             when present in `shapes` (item_codes grows with the catalogue, so callers usually leave it out).
    """
    differences = config_differences(snapshot.config, config, ignore=CAPACITY_KEYS)
    differences += shape_differences(snapshot.tensor_shapes(), shapes, optional=("codebooks", "item_codes"))
    if differences:
        raise IncompatibleSnapshotError(
            f"snapshot {snapshot.model} v{snapshot.version} does not fit the model: " + "; ".join(differences),
            differences,
        )


def _show(value: Any) -> str:
    return "no such key" if value is _MISSING else repr(value)
