"""Benchmark: how stable SPARC's interests stay, against how well it serves and how fast it follows a shift.

One model configuration per run (`--set FIELD=VALUE`, as `sparc replay --set`, on top of the worker's online
defaults), replayed twice through the prequential engine (test-then-train, the worker's learning step):

  Beauty   `--data` (an S3-Rec folder with timestamps) in time order, the evolving model, scored as served soft
           search with 20 slots (what /retrieve returns: the worker's exploration slots, the first E by
           probability, the rest by p(i|u) / q(i)^lift; --exploit E --lift L others, --no-exploration none) and
           ranked over the whole catalogue (no slots), 16 events per
           micro-batch, windows of 20,000 events (the README's replay): level-1 churn per window (items whose
           level-1 code changed since the previous window), users' top-interest churn, Recall@20, new items that
           reached 10 retrievals, codebook health at the end;
  shifts   the drift benchmark's synthetic stream (benchmarks.drift_bench.STREAM: three shifts into topics
           nobody consumed before), every event scored, windows of 2,000 events: events until the evolving model is
           back at 90% of its pre-shift Recall@20 (drift_bench's recovery), and level-1 churn per window apart in
           the windows that hold a shift and the stationary ones.

    python -m benchmarks.churn_bench --data ../shared/datasets/amazon_beauty --label "EMA 0.99" \
        --set ema_decay=0.99 --out runs/churn/ema099.json
    python -m benchmarks.churn_bench --plot benchmarks/churn_tradeoff.png runs/churn/*.json

The second form draws the trade-off (replay.plots.plot_churn_tradeoff) from the JSON of several runs: level-1
churn against served Recall@20 on Beauty and against the recovery time after the shifts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_json
from benchmarks.drift_bench import parse_overrides, replay_ranks, stream_config
from replay.plots import plot_churn_tradeoff
from replay.prequential import ReplaySettings, ScoreMode, recovery, replay, worker_model_config
from replay.sources import SourceError, open_source, take_feedback
from replay.synthetic import generate
from sparc_stream.cli.allocator import tune_allocator
from sparc_stream.cli.errors import UserError
from sparc_stream.cli.evaluate import parse_sparc_set
from trainer.config import SparcConfig, TrainConfig

SERVED, RANKED = ScoreMode.parse("soft:served=20"), ScoreMode()  # served: with the worker's exploration slots


def served_mode(exploit: int | None = None, lift: float | None = None, exploration: bool = True) -> ScoreMode:
    """What the Beauty replay scores as served: 20 slots of soft search as /retrieve serves them (the worker's
    exploration slots; `exploit`/`lift`: others; exploration=False: none)."""
    if not exploration:
        return ScoreMode(served=SERVED.served)
    return ScoreMode(served=SERVED.served, exploit=SERVED.exploit if exploit is None else exploit,
                     lift=SERVED.lift if lift is None else lift)


def beauty(data: str, overrides: dict, limit: int | None, window: int, per_batch: int,
           served: ScoreMode = SERVED) -> dict:
    """The evolving model over the dataset in time order: served / ranked accuracy, reach, churn, health."""
    source = open_source(data)
    total = source.feedback if limit is None else min(source.feedback or limit, limit)
    settings = ReplaySettings(model=worker_model_config(**overrides), train=TrainConfig(batch_size=64),
                              regimes=("evolving",), modes=(served, RANKED), window_events=window,
                              eval_per_batch=per_batch)
    return summarise(replay(take_feedback(source.records(), limit), settings, total), served)


def summarise(report: dict, served_as: ScoreMode = SERVED) -> dict:
    """What the trade-off needs from a replay report with the evolving variants soft:served=20 and soft (the
    `sparc replay --variants evolving --modes soft,soft:served=20` report of the same model is one)."""
    served, ranked = (report["variants"][f"evolving/{m.name}"] for m in (served_as, RANKED))
    o = served["overall"]
    last = served["windows"][-1]
    churn = [w["level1_changed_share"] for w in served["windows"] if w["level1_changed_share"] is not None]
    return {
        "events": report["events"],
        "served_recall@20": o["recall@20"], "served_ndcg@20": o["ndcg@20"],
        "ranked_recall@20": ranked["overall"]["recall@20"],
        "new_items_reached@10": o["new_items_reached@10"], "served_coverage@20": o["coverage@20"],
        **{k: o[k] for k in ("level1_churn", "level1_churn_max", "top_interest_churn", "top_interest_churn_idle")},
        "level1_churn_per_window": churn,
        "code_changed_share": float(np.mean([w["code_changed_share"] for w in served["windows"][1:]]))
        if len(served["windows"]) > 1 else None,
        "final_level1_perplexity": last["level1_perplexity"], "final_collision_rate": last["collision_rate"],
        "seconds": report["seconds"],
    }


def reported(path: Path, overrides: dict, served: ScoreMode = SERVED) -> dict:
    """`summarise` of an earlier replay report, after checking that it replayed the same model."""
    report = json.loads(path.read_text())
    model = SparcConfig.from_json(report["settings"]["model"]).to_json()  # fields added since: their defaults
    expected = worker_model_config(**overrides).to_json()
    differs = sorted(k for k in expected if k != "num_items" and model[k] != expected[k])
    if differs:
        raise ValueError(f"{path}: its model differs from this configuration in {', '.join(differs)}")
    return summarise(report, served)


def shifts(seed: int, overrides: dict, stream_overrides: dict, pre: int, width: int, step: int) -> dict:
    """The evolving model over drift_bench's stream: recovery after each shift (drift_bench's definition: back at
    90% of the pre-shift Recall@20 over the last `width` events), level-1 churn per window of `width` events in the
    windows that hold a shift and in the stationary ones."""
    stream = generate(stream_config(seed, stream_overrides))
    points = stream.drift_event_indices.tolist()
    settings = ReplaySettings(model=worker_model_config(**overrides), train=TrainConfig(batch_size=64, seed=seed),
                              regimes=("evolving",), window_events=width, seed=seed)
    ranks, report, seconds = replay_ranks(stream, settings)
    ends = [*points[1:], stream.num_events]
    recovered = [recovery(*ranks["evolving"], at, until=until, pre_events=pre, width=width,
                          step=step)["recovered_after"] for at, until in zip(points, ends, strict=True)]
    windows = report["variants"]["evolving"]["windows"][1:]  # the first has no previous window
    holds_shift = [any(w["start_event"] <= p < w["end_event"] for p in points) for w in windows]
    churn = np.array([w["level1_changed_share"] for w in windows])
    flags = np.array(holds_shift, dtype=bool)
    return {
        "shifts": points,
        "recovered_after": recovered,
        # a shift not recovered from before the next one counts as the whole segment
        "mean_recovery_events": float(np.mean([r if r is not None else e - p
                                               for r, p, e in zip(recovered, points, ends, strict=True)])),
        "recall@20": report["variants"]["evolving"]["overall"]["recall@20"],
        "level1_churn_stationary": float(churn[~flags].mean()) if (~flags).any() else None,
        "level1_churn_at_shifts": float(churn[flags].mean()) if flags.any() else None,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as every entry point does (cli/allocator.py)
    p = argparse.ArgumentParser(prog="python -m benchmarks.churn_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="S3-Rec dataset folder replayed in time order (e.g. amazon_beauty)")
    p.add_argument("--data-report", type=Path, metavar="JSON",
                   help="instead of replaying --data: the report.json of `sparc replay --variants evolving --modes "
                        "soft,soft:served=20` run with the same --set (its settings must match: checked)")
    p.add_argument("--label", help="name of this configuration in the plot (default: its --set values)")
    p.add_argument("--set", dest="sparc_set", action="append", default=[], metavar="FIELD=VALUE",
                   help="SparcConfig override on top of the worker's online defaults (repeatable)")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic stream and its model (default 0)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N events of --data")
    p.add_argument("--window", type=int, default=20_000, help="events per window of the --data replay")
    p.add_argument("--eval-per-batch", type=int, default=16, help="scored events per micro-batch of --data")
    p.add_argument("--stream", nargs="*", default=[], metavar="KEY=VALUE",
                   help="SyntheticConfig overrides of the shift stream, as drift_bench's --stream")
    p.add_argument("--pre", type=int, default=3000, help="shift stream: events before a shift for its level")
    p.add_argument("--width", type=int, default=2000, help="shift stream: events per window (recovery, churn)")
    p.add_argument("--step", type=int, default=500, help="shift stream: events between recovery windows")
    p.add_argument("--exploit", type=int, default=None, metavar="E",
                   help=f"served lists' exploration slots: the first E by probability (default: the worker's, "
                        f"{SERVED.exploit})")
    p.add_argument("--lift", type=float, default=None,
                   help=f"the other served slots by p(i|u) / q(i)^lift (default: the worker's, {SERVED.lift:g})")
    p.add_argument("--no-exploration", dest="exploration", action="store_false",
                   help="served lists without exploration slots (plain soft search, the worker's before 2026-12-07)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="draw the trade-off from the JSON files given")
    p.add_argument("results", nargs="*", type=Path, help="with --plot: JSON results of earlier runs")
    args = p.parse_args(argv)

    if args.plot:
        if not args.results:
            p.exit(2, "churn_bench: --plot needs the JSON results to draw\n")
        points = [json.loads(path.read_text()) for path in args.results]
        print(f"written to {plot_churn_tradeoff(points, args.plot)}")
        return 0
    if not (args.data or args.data_report) or not args.out:
        p.exit(2, "churn_bench: --data (or --data-report) and --out are required (or --plot PNG FILES)\n")
    try:
        overrides = parse_sparc_set(args.sparc_set)
        worker_model_config(**overrides)
        served = served_mode(args.exploit, args.lift, args.exploration)
        stream_overrides = parse_overrides(args.stream)
    except (UserError, ValueError, TypeError) as exc:
        p.exit(2, f"churn_bench: {exc}\n")
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        on_data = (reported(args.data_report, overrides, served) if args.data_report
                   else beauty(args.data, overrides, args.limit, args.window, args.eval_per_batch, served))
    except (SourceError, ValueError) as exc:
        p.exit(2, f"churn_bench: {exc}\n")
    print(f"{args.data or args.data_report}: served R@20 {on_data['served_recall@20']:.4f}, "
          f"reached@10 {on_data['new_items_reached@10']}, "
          f"level-1 churn {on_data['level1_churn']:.3f} (max {on_data['level1_churn_max']:.3f}), top-interest churn "
          f"{on_data['top_interest_churn']:.3f}", flush=True)
    on_shifts = shifts(args.seed, overrides, stream_overrides, args.pre, args.width, args.step)
    print(f"shifts: recovered after {on_shifts['recovered_after']} events, level-1 churn stationary "
          f"{on_shifts['level1_churn_stationary']:.3f} / at shifts {on_shifts['level1_churn_at_shifts']:.3f}")
    write_json(args.out, {
        "benchmark": "interest churn against accuracy and recovery",
        "command": " ".join(["python -m benchmarks.churn_bench", *(sys.argv[1:] if argv is None else argv)]),
        "label": args.label or (", ".join(args.sparc_set) or "worker defaults"),
        "set": overrides, "served": served.name, "model": worker_model_config(**overrides).to_json(),
        "torch_threads": 1,
        "data": on_data, "shift_stream": on_shifts, "seconds": time.perf_counter() - started,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
