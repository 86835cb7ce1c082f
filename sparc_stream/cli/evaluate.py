"""`sparc evaluate`: leave-one-out, full-ranking evaluation of SPARC and baselines on an S3-Rec-format dataset."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from sparc_stream.cli.device import add_device_flag, check_device
from sparc_stream.cli.errors import UserError

DEFAULT_MODELS = "sparc,sparc-hard,sasrec,comirec-sa,popularity"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="train and evaluate models side by side (leave-one-out, ranking all items)",
        description=(
            "Leave-one-out evaluation: per user the last item is the test target and the second last the "
            "validation target; every model ranks the WHOLE catalogue. Reports Recall/NDCG@{5,10,20} raw and "
            "with the user's own history masked, the cold slice (users with 5-10 interactions), coverage@20 "
            "and long-tail share, as JSON."
        ),
    )
    p.add_argument("--data", required=True, type=Path,
                   help="dataset folder or its <Name>.txt (S3-Rec format; _timestamps.txt and "
                        "_item2attributes.json beside it are used when present)")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma-separated models (default: {DEFAULT_MODELS})")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, batching and sampling")
    p.add_argument("--out", type=Path, help="write the JSON report here (default: print it)")
    p.add_argument("--max-epochs", type=int, default=None, help="cap on epochs per model (default 200)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="training time budget per model (default: none; a budget makes the results "
                        "depend on the machine's load)")
    p.add_argument("--codes", type=int, default=None, help="codes per RQ level for SPARC (default 64)")
    p.add_argument("--top-codes", type=int, default=None, help="codes soft search draws (default 4)")
    p.add_argument("--served", type=int, default=0, metavar="SLOTS",
                   help="also score sparc and sparc-hard by the lists serving returns with SLOTS slots (soft search's "
                        "per-code quotas over the top codes; hard search's single code list; items not served are "
                        "misses), reported under \"served\" in each model's results (default 0: off; 20 matches "
                        "the top-20 metrics)")
    p.add_argument("--exploit", type=int, default=None, metavar="E",
                   help="exploration slots of SPARC's soft search (on by default): the first E slots by the model's "
                        "probability, the rest by p(i|u) / q(i)^LIFT, q the item's popularity; chosen on validation "
                        "(README 'Discovery'; default 15: trainer.config.EXPLORATION)")
    p.add_argument("--lift", type=float, default=None,
                   help="the popularity exponent of the exploration slots (default 0.5)")
    p.add_argument("--no-exploration", dest="exploration", action="store_false",
                   help="SPARC's plain soft-search ranking, without exploration slots (the default before "
                        "2026-12-07)")
    p.add_argument("--set", dest="sparc_set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a SparcConfig field for sparc/sparc-hard, VALUE as JSON or a bare word "
                        "(repeatable), e.g. --set tower_attention=false --set interest=head")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_flag(p)
    p.set_defaults(func=run)


def parse_models(text: str) -> list[str]:
    from replay.evaluate import MODELS

    models = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise UserError(f"unknown model {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODELS)}")
    return models


def parse_sparc_set(items: list[str]) -> dict:
    """["tower_attention=false", ...] -> {"tower_attention": False, ...}, checked against SparcConfig's fields."""
    from dataclasses import fields

    from trainer.config import SparcConfig

    known = {f.name for f in fields(SparcConfig)} - {"num_items", "num_attributes", "encoder"}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise UserError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(known))}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # a bare word: a string value (e.g. interest=head)
    return out


def settings_from_args(args: argparse.Namespace):
    from replay.evaluate import EvalSettings

    s = EvalSettings(seed=args.seed, progress=not args.quiet)
    train = s.train
    if args.max_epochs is not None:
        train = replace(train, max_epochs=args.max_epochs)
    if args.max_seconds is not None:
        train = replace(train, max_seconds=args.max_seconds)
    sparc = {"codes": args.codes} if args.codes else {}
    sparc.update(parse_sparc_set(args.sparc_set))
    top_codes = args.top_codes or s.top_codes
    if args.served and args.served < max(top_codes, 20):
        raise UserError(f"--served {args.served}: needs at least 20 slots (the top-20 metrics) and one per code "
                        f"searched ({top_codes})")
    exploit = s.exploit if args.exploit is None else args.exploit
    lift = s.lift if args.lift is None else args.lift
    if args.exploration and (exploit < top_codes or not lift >= 0):
        raise UserError(f"--exploit {exploit} --lift {lift}: needs at least one slot per code searched "
                        f"({top_codes}) and a lift >= 0")
    explore = {"exploit": exploit, "lift": lift} if args.exploration else {"exploit": None}
    return replace(s, train=train, sparc=sparc, top_codes=top_codes, served=args.served,
                   device=str(check_device(args.device)), **explore)


def run(args: argparse.Namespace) -> int:
    models = parse_models(args.models)
    settings = settings_from_args(args)
    from replay.datasets import DataError, load_s3rec
    from replay.evaluate import run_evaluation
    from replay.metrics import TOP_N
    from replay.report import results_table

    try:
        ds = load_s3rec(args.data)
    except DataError as exc:
        raise UserError(str(exc)) from None
    if ds.num_items < TOP_N:
        raise UserError(f"{args.data}: {ds.num_items} items; the evaluation ranks top-{TOP_N} lists and needs "
                        f"at least {TOP_N} items")
    summary = ds.summary()
    print(f"{summary['name']}: {summary['users']} users, {summary['items']} items, "
          f"{summary['interactions']} interactions")
    report = run_evaluation(ds, models, settings)
    print(results_table(report))
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"report written to {args.out}")
    else:
        print(text)
    return 0
