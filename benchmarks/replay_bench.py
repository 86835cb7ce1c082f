"""Benchmark `sparc replay`: throughput (feedback events per second) per variant, on the synthetic stream and on
a time-ordered slice of Amazon Beauty.

    python -m benchmarks.replay_bench --out runs/replay_bench.json

Alone: each variant (regime x score mode) runs ALONE over the same events, so its events/s is what a replay of
that variant costs end to end: ingest, testing (full-catalogue scoring of every scored event), online learning
(the shared warm-up for frozen and periodic), periodic retrains.
Together (`--together`, default every variant of `sparc replay --variants all`): ONE replay of all of them, as
`sparc replay` runs it, twice back to back in this process: the baseline scores every (model, mode) on its own
with a catalogue computed afresh (Prequential.share_scoring = False, the engine before shared scoring), then the
shared scoring (one catalogue and one encoder pass per model and micro-batch; fixed models keep their catalogue
between batches). Both must give identical results ("same_results").
The split of the time (learn / retrain / score) comes from the engine's own counters. The model is the worker's
(dim 64, 2 layers, 3 x 64 codes) unless told otherwise; torch runs on one thread. Quality numbers (Recall@20
after the freeze point) are reported beside the speed so a faster setting that breaks the model shows.

The slice measured for the shared-scoring change (before/after on the same events, back to back):
    python -m benchmarks.replay_bench --out runs/replay_bench_30k.json --synthetic-events 0 --beauty-events 30000 \
        --variants '' --eval-per-batch 16 --retrain-every 50000 --window 20000
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from benchmarks.common import write_json
from replay.prequential import Prequential, ReplaySettings, ScoreMode, parse_variants, replay, worker_model_config
from replay.sources import open_source, take_feedback
from sparc_stream.cli.allocator import tune_allocator
from sparc_stream.cli.replay import ALL_VARIANTS  # `sparc replay --variants all`
from trainer.config import EncoderConfig, TrainConfig

BEAUTY = Path("/work/shared/datasets/amazon_beauty")


def one_run(source, limit: int, settings: ReplaySettings, variant: str) -> dict:
    total = min(source.feedback, limit)
    start = time.perf_counter()
    report = replay(take_feedback(source.records(), limit), settings, total=total)
    seconds = time.perf_counter() - start
    (name, v), = report["variants"].items()
    return {
        "source": source.name,
        "variant": variant,
        "events": report["events"],
        "scored": v["overall"]["scored"],
        "seconds": seconds,
        "events_per_second": report["events"] / seconds,
        "learn_seconds": report["learn_seconds"],
        "retrain_seconds": report["retrain_seconds"],
        "score_seconds": v["score_seconds"],
        "retrains": report["retrains"],
        "recall@20_after_freeze": v["after_freeze"]["recall@20"],
        "ndcg@20_after_freeze": v["after_freeze"]["ndcg@20"],
        "items": report["items"],
    }


def together(source, limit: int, settings: ReplaySettings, share: bool) -> tuple[dict, dict]:
    """One replay of every variant in `settings`; returns (timings, the report without timings)."""
    total = min(source.feedback, limit)
    start = time.perf_counter()
    engine = Prequential(settings, total)
    engine.share_scoring = share
    for _ in engine.run(take_feedback(source.records(), limit)):
        pass
    seconds = time.perf_counter() - start
    report = engine.report()
    timing = {
        "share_scoring": share,
        "seconds": seconds,
        "events_per_second": report["events"] / seconds,
        "learn_seconds": report["learn_seconds"],
        "retrain_seconds": report["retrain_seconds"],
        "score_seconds": sum(v["score_seconds"] for v in report["variants"].values()),
        "catalogues_computed": engine.catalogues.full,
        "catalogues_updated": engine.catalogues.partial,
    }
    results = {n: {"overall": v["overall"], "after_freeze": v["after_freeze"],
                   "windows": [{k: x for k, x in w.items()} for w in v["windows"]]}
               for n, v in report["variants"].items()}
    return timing, results


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as every entry point does (sparc_stream/cli/allocator.py)
    p = argparse.ArgumentParser(prog="python -m benchmarks.replay_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="write the JSON result here")
    p.add_argument("--synthetic-events", type=int, default=10_000,
                   help="events of the synthetic stream (seed 0; users = events / 10, at most 2000)")
    p.add_argument("--beauty", type=Path, default=BEAUTY, help="Beauty S3-Rec folder (skipped if absent)")
    p.add_argument("--beauty-events", type=int, default=20_000, help="first N Beauty events in time order")
    p.add_argument("--variants", default="evolving,frozen,periodic,evolving/hard",
                   help="each run alone: REGIME or REGIME/MODE, comma-separated (default: the three regimes + "
                        "evolving/hard; '' for none)")
    p.add_argument("--together", default=ALL_VARIANTS,
                   help="one replay of all these variants (as `sparc replay --variants`), baseline then shared "
                        f"scoring (default: {ALL_VARIANTS}; '' for none)")
    p.add_argument("--retrain-every", type=int, default=None, help="periodic retrain interval (default: window)")
    p.add_argument("--window", type=int, default=None, help="window in events (default: a tenth of the events)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-per-batch", type=int, default=None, help="scored events per micro-batch (default all)")
    p.add_argument("--retrain-epochs", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--codes", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    users = min(2000, args.synthetic_events // 10)  # the default stream's 2000 users at 60k events, fewer below
    sources = []
    if args.synthetic_events:
        sources.append((open_source(f"synthetic:0?events={args.synthetic_events}&users={users}"),
                        args.synthetic_events))
    if args.beauty.exists() and args.beauty_events:
        sources.append((open_source(str(args.beauty)), args.beauty_events))
    model = worker_model_config(codes=args.codes, encoder=EncoderConfig(dim=args.dim, layers=args.layers))
    runs, shared = [], []
    common = dict(model=model, train=TrainConfig(batch_size=args.batch_size), batch_size=args.batch_size,
                  eval_per_batch=args.eval_per_batch, retrain_epochs=args.retrain_epochs,
                  retrain_every=args.retrain_every, window_events=args.window)
    for source, limit in sources:
        if args.together:
            settings = ReplaySettings(**common, **parse_variants(args.together))
            base, base_results = together(source, limit, settings, share=False)
            fast, fast_results = together(source, limit, settings, share=True)
            row = {"source": source.name, "events": min(source.feedback, limit), "variants": args.together,
                   "baseline": base, "shared": fast, "speedup": base["seconds"] / fast["seconds"],
                   "same_results": base_results == fast_results,
                   "recall@20_after_freeze": {n: v["after_freeze"]["recall@20"] for n, v in fast_results.items()},
                   "new_items_reached@10": {n: v["overall"]["new_items_reached@10"] for n, v in fast_results.items()},
                   "new_share@20": {n: v["overall"]["new_share@20"] for n, v in fast_results.items()}}
            shared.append(row)
            for key in ("baseline", "shared"):
                r = row[key]
                print(f"{source.name:<14} together/{key:<8} {row['events']:>7} events {r['seconds']:7.1f} s "
                      f"{r['events_per_second']:8.1f} events/s (learn {r['learn_seconds']:.1f} s, retrain "
                      f"{r['retrain_seconds']:.1f} s, score {r['score_seconds']:.1f} s)", flush=True)
            print(f"{source.name:<14} speedup {row['speedup']:.2f}x, same results: {row['same_results']}", flush=True)
        for variant in [v for v in args.variants.split(",") if v.strip()]:
            regime, _, mode = variant.partition("/")
            settings = ReplaySettings(**common, regimes=(regime,), modes=(ScoreMode.parse(mode or "soft"),))
            run = one_run(source, limit, settings, variant)
            runs.append(run)
            print(f"{run['source']:<14} {variant:<16} {run['events']:>7} events {run['seconds']:7.1f} s "
                  f"{run['events_per_second']:8.1f} events/s (learn {run['learn_seconds']:.1f} s, retrain "
                  f"{run['retrain_seconds']:.1f} s, score {run['score_seconds']:.1f} s)  R@20 after freeze "
                  f"{run['recall@20_after_freeze']:.4f}", flush=True)
    result = {
        "benchmark": "replay throughput per variant",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__, "torch_threads": 1},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": runs,
        "together": shared,
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
