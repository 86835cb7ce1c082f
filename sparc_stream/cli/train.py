"""`sparc train`: train SPARC offline on an S3-Rec dataset and store it as a new snapshot version.

The training is `sparc evaluate`'s for SPARC (replay.evaluate's settings and validation; trainer.fit with early
stopping on validation NDCG@10 of a seeded user subset, soft search), on the leave-one-out train part. The
snapshot holds what the worker's snapshots hold (streams.publisher / trainer.online.LearnerState): the config
with num_items = the item table's size, the codebooks, every item's codes, the model's state_dict as weights,
and trainer.rq.code_health plus "finite" and "initialised" as health, so trainer.online.load_model (and a worker
warm start) reads it like any other. Its version is one above the highest stored (0 in an empty store), its
parent None (trained from scratch), its watermark {"offline": dataset name}. The worker's health gate decides
whether latest moves to it; a held-back snapshot is kept for inspection and the command exits 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from sparc_stream.cli.device import add_device_flag, check_device
from sparc_stream.cli.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train SPARC offline on a dataset and store it as a new snapshot version",
        description=(
            "Train SPARC on the leave-one-out train part of an S3-Rec dataset (early stopping on validation "
            "NDCG@10) and put the result into a codebook store as a new version: one above the highest stored, "
            "watermark {\"offline\": <dataset name>}. Latest moves to it if it passes the worker's health gate."
        ),
    )
    p.add_argument("--data", required=True, type=Path,
                   help="dataset folder or its <Name>.txt (S3-Rec format; _item2attributes.json beside it is used "
                        "when present)")
    p.add_argument("--store", required=True, metavar="URL", help="the store: rocksdb://PATH, file://DIR or memory://")
    p.add_argument("--model", default="sparc", help="model name in the store (default: sparc)")
    p.add_argument("--epochs", type=int, default=None,
                   help="cap on epochs (default 200; early stopping may stop sooner)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, batching and validation users")
    p.add_argument("--max-seconds", type=float, default=None, help="training time budget (default 900)")
    p.add_argument("--codes", type=int, default=None, help="codes per RQ level (default 64, as the worker)")
    p.add_argument("--num-attributes", type=int, default=None,
                   help="attribute vocabulary of the model (default: the dataset's largest attribute id); set it "
                        "to the worker's (SPARC_NUM_ATTRIBUTES, 1024) for a snapshot the worker can start from")
    p.add_argument("--min-utilisation", type=float, default=None,
                   help="health gate: level-1 codebook utilisation floor (default: the worker's); the gate's other "
                        "thresholds are the worker's defaults too (streams.gate.GateThresholds)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_flag(p)
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise UserError(f"--max-seconds must be > 0, got {args.max_seconds}")
    if args.codes is not None and args.codes < 2:
        raise UserError(f"--codes must be >= 2, got {args.codes}")
    if args.num_attributes is not None and args.num_attributes < 0:
        raise UserError(f"--num-attributes must be >= 0, got {args.num_attributes}")
    if args.min_utilisation is not None and not 0 <= args.min_utilisation <= 1:
        raise UserError(f"--min-utilisation must lie in [0, 1], got {args.min_utilisation}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    device = str(check_device(args.device))
    from codebook_store import CodebookStoreError, open_store
    from codebook_store.snapshot import check_model_name
    from replay.datasets import DataError, load_s3rec
    from replay.metrics import TOP_N

    try:
        check_model_name(args.model)
        ds = load_s3rec(args.data)
        store = open_store(args.store)  # before training: a bad URL or a locked database fails fast
    except (DataError, CodebookStoreError) as exc:
        raise UserError(str(exc)) from None
    num_attributes = ds.num_attributes if args.num_attributes is None else args.num_attributes
    with store:
        if ds.num_items < TOP_N:
            raise UserError(f"{args.data}: {ds.num_items} items; validation ranks top-{TOP_N} lists and needs at "
                            f"least {TOP_N} items")
        if num_attributes < ds.num_attributes:
            raise UserError(f"--num-attributes {num_attributes} is below the dataset's largest attribute id "
                            f"{ds.num_attributes}")
        summary = ds.summary()
        print(f"{summary['name']}: {summary['users']} users, {summary['items']} items, "
              f"{summary['interactions']} interactions")
        snapshot_fields = train_sparc(ds, args, num_attributes, device)
        try:
            version, accepted, reasons = store_snapshot(store, args.model, args.min_utilisation, snapshot_fields)
        except CodebookStoreError as exc:
            raise UserError(f"{args.store}: {exc}") from None
    offline = snapshot_fields["health"]["offline"]
    print(f"{args.model} v{version} stored in {args.store}: {offline['epochs']} epochs (best {offline['best_epoch']}, "
          f"{offline['stopped']}), valid NDCG@10 {offline['valid_ndcg@10']:.4f}, {ds.num_items} items")
    if not accepted:
        print(f"sparc train: {args.model} v{version} held back, latest did not move: {'; '.join(reasons)}",
              file=sys.stderr)
        return 1
    print(f"latest -> v{version}")
    return 0


def train_sparc(ds, args: argparse.Namespace, num_attributes: int, device: str = "cpu") -> dict:
    """Train on the leave-one-out train part; returns the snapshot's fields (all but model and version)."""

    from replay.datasets import leave_one_out
    from replay.evaluate import EvalSettings, fit_sparc, validation_subset
    from trainer.online import capture_state, model_health

    settings = EvalSettings(seed=args.seed, progress=not args.quiet, sparc={"codes": args.codes} if args.codes else {},
                            device=device)
    train_cfg = replace(settings.train, seed=args.seed)
    if args.epochs is not None:
        train_cfg = replace(train_cfg, max_epochs=args.epochs)
    if args.max_seconds is not None:
        train_cfg = replace(train_cfg, max_seconds=args.max_seconds)
    split = leave_one_out(ds)
    if not len(split.valid_targets):
        raise UserError(f"{args.data}: no user has 3 or more items, so there is nothing to validate on")
    valid_idx = validation_subset(split, args.seed, settings.valid_users)
    model, result = fit_sparc(ds, split, replace(settings, train=train_cfg), valid_idx, num_attributes)
    state = capture_state(model)
    health = model_health(model)
    health["offline"] = {
        "dataset": ds.name, "epochs": result.epochs, "best_epoch": result.best_epoch, "stopped": result.stopped,
        "valid_ndcg@10": result.best_valid, "valid_users": len(valid_idx), "seconds": result.seconds,
        "seed": args.seed,
    }
    return {
        "created_at": time.time(),
        "watermark": {"offline": ds.name},
        "config": state.config,
        "codebooks": state.codebooks,
        "item_codes": state.item_codes,
        "weights": state.weights,
        "health": health,
    }


def store_snapshot(store, model: str, min_utilisation: float | None, fields: dict) -> tuple[int, bool, list[str]]:
    """Put the snapshot as the next free version, gated like the worker's; returns (version, latest moved,
    gate reasons). The next version is one above the highest stored, not above latest: after a rollback latest
    is lower and latest+1 may already exist."""
    from codebook_store import Snapshot, VersionExistsError
    from streams.gate import GateThresholds, gate, verdict

    thresholds = GateThresholds() if min_utilisation is None else GateThresholds(min_utilisation=min_utilisation)
    refusals = gate(fields["health"], thresholds, int(fields["config"]["codes"]))
    reasons = [r.detail for r in refusals]
    health = {**fields["health"], "gate": verdict(refusals)}
    for _ in range(3):  # a worker writing to the same store may take a version meanwhile
        versions = store.versions(model=model)
        version = versions[-1] + 1 if versions else 0
        snapshot = Snapshot(model=model, version=version, parent=None, **{**fields, "health": health})
        try:
            return version, store.put(snapshot, move_latest=not reasons), reasons
        except VersionExistsError:
            continue
    raise VersionExistsError(f"{model}: no free version after 3 tries in {store.url}")
