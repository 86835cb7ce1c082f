"""`sparc demo`: the main job on the embedded default — no broker, no downloaded data.

Generates the project's seeded synthetic stream (drifting interests, new items), trains SPARC and baselines on
it and prints the leave-one-out table. The same code paths as `sparc evaluate`. Every model trains for at most
`--max-epochs` epochs with early stopping on validation and no time budget, so the table is the same on any
machine, busy or not; the time each model took is reported beside it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

DEMO_EPOCHS = 30


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train and evaluate SPARC on the built-in synthetic stream (no broker, no data needed)",
        description="Train SPARC and baselines on the project's seeded synthetic interaction stream and print "
                    "a leave-one-out comparison table.",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the stream and of training")
    p.add_argument("--users", type=int, default=2000, help="synthetic users")
    p.add_argument("--events", type=int, default=60_000, help="synthetic events")
    p.add_argument("--max-epochs", type=int, default=DEMO_EPOCHS,
                   help=f"epochs per model at most (default {DEMO_EPOCHS}; early stopping on validation may stop "
                        "sooner). No time budget: the table does not depend on the machine's load")
    p.add_argument("--models", default="sparc,sparc-hard,sasrec,popularity", help="models to compare")
    p.add_argument("--no-exploration", dest="exploration", action="store_false",
                   help="SPARC's plain soft-search ranking; by default its lists have exploration slots (the first "
                        "15 by probability, the rest by p(i|u) / q(i)^0.5: trainer.config.EXPLORATION, README "
                        "'Discovery'), as `sparc evaluate`")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replay.evaluate import EvalSettings, run_evaluation
    from replay.report import results_table
    from replay.synthetic import SyntheticConfig, generate
    from sparc_stream.cli.errors import UserError
    from sparc_stream.cli.evaluate import parse_models

    models = parse_models(args.models)
    if args.max_epochs < 1:
        raise UserError(f"--max-epochs must be >= 1, got {args.max_epochs}")
    try:
        cfg = SyntheticConfig(n_users=args.users, n_events=args.events, seed=args.seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    stream = generate(cfg)
    ds = stream.to_dataset()
    print(f"synthetic stream (seed {args.seed}): {ds.num_users} users, {ds.num_items} items "
          f"({cfg.n_new_items} appear mid-stream), {ds.num_interactions} events, "
          f"{len(stream.drift_points)} interest shifts")
    settings = EvalSettings(seed=args.seed, progress=not args.quiet)
    settings = replace(settings, train=replace(settings.train, max_epochs=args.max_epochs), sparc={"codes": 16},
                       exploit=settings.exploit if args.exploration else None)
    report = run_evaluation(ds, models, settings)
    print(results_table(report))
    print(f"{report['seconds']:.0f} s in all (times depend on the machine; the metrics do not)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.out}")
    return 0
