"""Benchmark `sparc replay`: throughput (feedback events per second) per variant, on the synthetic stream and on
a time-ordered slice of Amazon Beauty.

    python -m benchmarks.replay_bench --out runs/replay_bench.json

Each variant (regime x score mode) runs ALONE over the same events, so its events/s is what a replay of that
variant costs end to end: ingest, testing (full-catalogue scoring of every scored event), online learning (the
shared warm-up for frozen and periodic), periodic retrains. The split of the time (learn / retrain / score) comes
from the engine's own counters. The model is the worker's (dim 64, 2 layers, 3 x 64 codes) unless told
otherwise; torch runs on one thread. Quality numbers (Recall@20 after the freeze point) are reported beside the
speed so a faster setting that breaks the model shows.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from replay.prequential import ReplaySettings, ScoreMode, replay, worker_model_config
from replay.sources import open_source, take_feedback
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replay_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="write the JSON result here")
    p.add_argument("--synthetic-events", type=int, default=10_000,
                   help="events of the synthetic stream (seed 0; users = events / 10, at most 2000)")
    p.add_argument("--beauty", type=Path, default=BEAUTY, help="Beauty S3-Rec folder (skipped if absent)")
    p.add_argument("--beauty-events", type=int, default=20_000, help="first N Beauty events in time order")
    p.add_argument("--variants", default="evolving,frozen,periodic,evolving/hard",
                   help="REGIME or REGIME/MODE, comma-separated (default: the three regimes + evolving/hard)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-per-batch", type=int, default=None, help="scored events per micro-batch (default all)")
    p.add_argument("--retrain-epochs", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--codes", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    users = min(2000, args.synthetic_events // 10)  # the default stream's 2000 users at 60k events, fewer below
    sources = [(open_source(f"synthetic:0?events={args.synthetic_events}&users={users}"), args.synthetic_events)]
    if args.beauty.exists():
        sources.append((open_source(str(args.beauty)), args.beauty_events))
    model = worker_model_config(codes=args.codes, encoder=EncoderConfig(dim=args.dim, layers=args.layers))
    runs = []
    for source, limit in sources:
        for variant in args.variants.split(","):
            regime, _, mode = variant.partition("/")
            settings = ReplaySettings(
                model=model, train=TrainConfig(batch_size=args.batch_size), regimes=(regime,),
                modes=(ScoreMode.parse(mode or "soft"),), batch_size=args.batch_size,
                eval_per_batch=args.eval_per_batch, retrain_epochs=args.retrain_epochs,
            )
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
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
