"""`sparc replay`: prequential evaluation of logged events through the worker's own learning step."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from pathlib import Path

from sparc_stream.cli.device import add_device_flag, check_device
from sparc_stream.cli.errors import UserError
from sparc_stream.cli.worker import add_config_argument, build_settings

ALL_VARIANTS = (
    "evolving,frozen,periodic,evolving/hard,evolving/soft:t=2,evolving/soft:served=20,evolving/hard:served=20"
)
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

_DESCRIPTION = """\
Replay logged events in time order through the SAME functions the Kafka worker runs (history ingest,
OnlineLearner.learn), testing before training: for each micro-batch every model first ranks the whole catalogue
for each event's user (history before the event) and the rank of the event's item is recorded, then it learns.
A model never sees the future: it learns only events older than --delay, and an item is rankable only once its
item event (or an earlier feedback on it) was read.

Variants = regimes x score modes:
  evolving  online learning all along (the product)
  frozen    the online model as it is at --freeze-at, then fixed (eval mode, codebooks frozen)
  periodic  retrained from scratch at --freeze-at and every --retrain-every events after it, on everything
            learnable so far (--retrain-epochs epochs), fixed in between
Before the freeze point the three are one model. Each regime is scored in every --modes entry; a
REGIME/MODE entry in --variants adds that one variant (names become REGIME/MODE when several modes are used).
Score modes: soft (SPARC's soft search over the top-k codes), hard (the argmax code, SPARC-Hard), and the
exploration knob soft:k=TOP_CODES:t=TEMPERATURE (more codes / a flatter code distribution). A mode ranks the
whole catalogue by the model's probabilities; MODE:served=N ranks only the N items serving returns (soft: per-code
quotas over the top codes' lists; hard: the argmax code's list), i.e. what /retrieve?k=N gives a user (soft: with
the worker's exploration slots, :x=off without). For a
soft/hard comparison (ranked and served) and an exploration knob on the evolving model only:
  --variants evolving,frozen,periodic,evolving/hard,evolving/soft:t=2,evolving/soft:served=20,evolving/hard:served=20
(--variants all is this set). Every variant reports new-item reach: new_share@20 (top-20 slots given to new
items) and new_items_reached@N (new items that got N top-20 retrievals while new, --reach).

Sources (--events):
  FILE.jsonl                 one event per line: feedback {event_id, user_id, item_id, timestamp, event_type}
                             or item {item_id, attributes, timestamp}; a bad line stops with file:line: reason
  FOLDER | <Name>.txt        S3-Rec format; global time order (ties: user, then position); without
                             _timestamps.txt the users' lines are interleaved round-robin by position; an
                             item event (attributes) is emitted when an item is first seen
  synthetic[:SEED][?users=U&events=E&items=I&new_items=J&drifts=D&topics=T]
                             the project's seeded stream with drifting interests and new items
  kafka://HOST:PORT/TOPIC[?from=TS&to=TS&from_offset=N&to_offset=N]
                             a topic between two Kafka record times (unix seconds or ISO-8601, looked up with
                             offsets_for_times; to is exclusive) or offsets (N, or P:N,P:N per partition);
                             invalid messages are skipped and counted, as the worker dead-letters them

Writes DIR/report.json ({"variants": {NAME: {"overall", "after_freeze", "windows": [...]}}, "events",
"seconds", ...}), DIR/report.md and DIR/metrics.png, DIR/health.png."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="prequential evaluation of logged events (JSONL, S3-Rec, synthetic, a Kafka range)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--events", required=True, metavar="SRC",
                   help="FILE.jsonl, an S3-Rec folder or <Name>.txt, synthetic[:SEED][?...] or "
                        "kafka://HOST:PORT/TOPIC?from=TS&to=TS (see above)")
    p.add_argument("--report", required=True, type=Path, metavar="DIR",
                   help="folder for report.json, report.md, metrics.png and health.png (created)")
    p.add_argument("--variants", default="evolving,frozen,periodic",
                   help="comma-separated REGIME (evolving, frozen, periodic; scored in every --modes entry) or "
                        "REGIME/MODE (that mode only, e.g. evolving/hard, evolving/soft:t=2), or 'all' "
                        f"(= {ALL_VARIANTS}) (default: evolving,frozen,periodic)")
    p.add_argument("--modes", default="soft",
                   help="comma-separated score modes: soft[:k=TOP_CODES][:t=TEMPERATURE][:mix=GLOBAL_MIX]"
                        "[:served=N] or hard[:served=N], e.g. soft,hard,soft:t=2,soft:t=5 for an exploration "
                        "sweep (default: soft = soft:k=4:t=1:mix=0). A mode ranks the whole catalogue; served=N "
                        "ranks only the N items serving returns (per-code quotas), the rest are misses; a served "
                        "soft list has the worker's exploration slots (x=15:lift=0.5) unless :x=E:lift=L or :x=off "
                        "(plain, as before 2026-12-07) says otherwise")
    p.add_argument("--batch-size", type=int, default=64,
                   help="micro-batch B: events tested together and then learnt in one step (default 64, the "
                        "worker's)")
    p.add_argument("--delay", default="0", metavar="N|DURATION",
                   help="a model learns an event only once N newer events were read (e.g. 500), or once the "
                        "newest event is DURATION later (e.g. 30s, 15m, 6h, 2d) (default 0)")
    p.add_argument("--window", default=None, metavar="N|DURATION",
                   help="report window: N events or a DURATION of event time (default: a tenth of the stream)")
    p.add_argument("--freeze-at", type=float, default=0.2,
                   help="freeze point: a share of the stream (< 1) or a number of events (default 0.2)")
    p.add_argument("--retrain-every", type=int, default=None, metavar="N",
                   help="periodic: retrain every N events after the freeze point (default: the window length)")
    p.add_argument("--retrain-epochs", type=int, default=5, help="periodic: epochs per retrain (default 5)")
    p.add_argument("--eval-per-batch", type=int, default=None, metavar="M",
                   help="score at most M events per micro-batch, the same seeded sample for every variant "
                        "(default: all)")
    p.add_argument("--reach", type=int, default=10, metavar="N",
                   help="new_items_reached@N: new items that got N top-20 retrievals while new (default 10)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="replay only the first N feedback events")
    p.add_argument("--seed", type=int, default=0, help="seed of the models and of the scored sample")
    p.add_argument("--codes", type=int, default=64, help="codes per RQ level (default 64)")
    p.add_argument("--dim", type=int, default=64, help="embedding size (default 64)")
    p.add_argument("--max-len", type=int, default=50, help="history length the encoder sees (default 50)")
    p.add_argument("--layers", type=int, default=2, help="encoder layers (default 2)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--attributes", type=int, default=1024,
                   help="attribute vocabulary; larger attribute ids are ignored (default 1024, the worker's)")
    p.add_argument("--set", dest="sparc_set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a SparcConfig field of the replayed models (repeatable), as for sparc evaluate, "
                        "e.g. --set retrieval_loss=sampled")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_flag(p)
    add_config_argument(p, "Kafka security settings of a kafka:// source ([kafka] section); SPARC_* variables "
                        "override it")
    p.set_defaults(func=run)


def parse_amount(text: str, what: str) -> tuple[int | None, float | None]:
    """"500" -> (500, None) events; "30s" / "15m" / "6h" / "2d" -> (None, seconds)."""
    text = text.strip()
    if text.isdigit():
        return int(text), None
    m = DURATION.match(text)
    if not m:
        raise UserError(f"{what} {text!r}: expected a number of events (500) or a duration (30s, 15m, 6h, 2d)")
    return None, float(m.group(1)) * SECONDS[m.group(2)]


def settings_from_args(args: argparse.Namespace):
    from replay.prequential import ReplaySettings, ScoreMode, parse_variants, with_seed, worker_model_config
    from sparc_stream.cli.evaluate import parse_sparc_set
    from trainer.config import EncoderConfig, TrainConfig

    overrides = {"codes": args.codes, **parse_sparc_set(args.sparc_set)}

    delay_events, delay_seconds = parse_amount(args.delay, "--delay")
    window_events, window_seconds = parse_amount(args.window, "--window") if args.window else (None, None)
    try:
        modes = tuple(ScoreMode.parse(m) for m in args.modes.split(",") if m.strip())
        variants = parse_variants(ALL_VARIANTS if args.variants.strip() == "all" else args.variants, modes)
        encoder = EncoderConfig(dim=args.dim, max_len=args.max_len, layers=args.layers)
        settings = ReplaySettings(
            model=worker_model_config(num_attributes=args.attributes, encoder=encoder, **overrides),
            train=TrainConfig(batch_size=args.batch_size, lr=args.lr),
            **variants,
            batch_size=args.batch_size,
            delay_events=delay_events or 0,
            delay_seconds=delay_seconds or 0.0,
            window_events=window_events,
            window_seconds=window_seconds,
            freeze_at=args.freeze_at,
            retrain_every=args.retrain_every,
            retrain_epochs=args.retrain_epochs,
            eval_per_batch=args.eval_per_batch,
            reach_n=args.reach,
            device=str(check_device(args.device)),
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return with_seed(settings, args.seed)


def kafka_security(config: Path | None) -> dict:
    """The kafka-python security settings of a kafka:// source: the config file's and SPARC_* variables'."""
    from streams.kafka_connection import KafkaConfigError

    try:
        client = build_settings(config).kafka_connection().kafka_python()
    except KafkaConfigError as exc:
        raise UserError(str(exc)) from None
    client.pop("bootstrap_servers")  # the source URL names the servers
    return client


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from replay.plots import markdown, plot_exploration, plot_health, plot_metrics
    from replay.prequential import Prequential
    from replay.sources import SourceError, open_source, take_feedback

    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    if args.threads < 1:
        raise UserError("--threads must be >= 1")
    settings = settings_from_args(args)
    try:
        source = open_source(args.events, kafka_security(args.config) if args.events.startswith("kafka://") else None)
    except SourceError as exc:
        raise UserError(str(exc)) from None
    total = source.feedback if args.limit is None else min(source.feedback or args.limit, args.limit)
    if not total:
        raise UserError(f"{args.events}: no feedback events to replay")
    try:
        engine = Prequential(settings, total)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    torch.set_num_threads(args.threads)
    print(f"{source.name}: replaying {total} feedback events, variants "
          f"{', '.join(name for name, _, _ in settings.variant_names())}")

    start = time.perf_counter()
    bar = tqdm(total=total, desc="replay", unit="event", disable=args.quiet)
    try:
        for windows in engine.run(take_feedback(source.records(), args.limit), progress=bar.update):
            bar.set_postfix({n: f"R@20 {w['recall@20']:.3f}" for n, w in itertools.islice(windows.items(), 3)})
    finally:
        bar.close()
    report = {"source": source.name, "source_info": source.info,
              "markers": [list(m) for m in source.markers if m[0] <= engine.n],
              **engine.report(), "seconds": time.perf_counter() - start}

    out: Path = args.report
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    markers = [tuple(m) for m in report["markers"]]
    figures = [plot_metrics(report, out / "metrics.png", markers), plot_health(report, out / "health.png", markers)]
    figures += [f for f in [plot_exploration(report, out / "exploration.png")] if f is not None]
    (out / "report.md").write_text(markdown(report, [str(f) for f in figures]))
    reach = f"new_items_reached@{settings.reach_n}"
    for name, v in report["variants"].items():
        o, a = v["overall"], v["after_freeze"]
        print(f"{name:<24} R@20 {o['recall@20']:.4f}  N@20 {o['ndcg@20']:.4f}  after freeze R@20 "
              f"{a['recall@20']:.4f}  cov@20 {o['coverage@20']:.3f}  tail@20 {o['tail_share@20']:.3f}  "
              f"new@20 {o['new_share@20']:.3f}  reached@{settings.reach_n} {o[reach]}")
    print(f"report written to {out} ({report['events']} events, {report['seconds']:.1f} s)")
    return 0
