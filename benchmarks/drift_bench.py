"""Benchmark: recovery after interest shifts. Replays the seeded synthetic stream (whose generator keeps the
ground-truth shift times) through the prequential engine with the `evolving` and `frozen` variants, and measures,
for every injected shift:

  pre-shift Recall@20    over the scored events in the `--pre` events before the shift;
  post-shift curve       Recall@20 over windows of `--width` events starting every `--step` events after it;
  recovery               events after the shift until a window's Recall@20 is back at >= 90% (`--fraction`) of
                         the variant's own pre-shift level (None: not before the next shift / the stream's end);
                         for frozen also against evolving's 90% level;
  ground truth           users who swapped an interest, the share of the following events spent in a swapped-in
                         topic, and how much of the pre-freeze stream those topics had (what the frozen model
                         could learn about them).

    python -m benchmarks.drift_bench --out runs/drift_bench.json

writes the JSON (stream parameters, settings, per-shift results with curves), a PNG of Recall@20 over event time
with the shifts and the freeze point marked (`--plot`, default: the JSON's path with .png), and prints a table.
The freeze point is `--pre` events before the first shift, so frozen's pre-shift level is its own, frozen.
Stream parameters: STREAM below (the benchmark's, not the generator's defaults), `--stream key=value` overrides.

Measured on this 2-core machine (worker model: dim 64, 2 layers, 3 x 64 codes; every event scored; 90-100 s a
run), windows of 2,000 events every 500: evolving is back at 90% of its pre-shift Recall@20 5,500 / 4,000 /
4,500 events after the three shifts (seed 0; seed 1: 4,000 / 3,500 / 6,000; seed 2: 4,000 / 4,500 / 4,000),
after dipping ~30%; frozen never recovers (seed 0: 0.437 -> 0.27, 0.265 -> 0.14, 0.137 -> 0.08 by the next
shift), nor reaches evolving's level.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from replay.plots import plot_recovery
from replay.prequential import Prequential, ReplaySettings, Scored, recovery, windowed_recall, worker_model_config
from replay.synthetic import SyntheticConfig, SyntheticStream, generate
from sparc_stream.cli.allocator import tune_allocator
from trainer.config import EncoderConfig, TrainConfig

# The benchmark's stream (replay.synthetic.SyntheticConfig fields; every other field keeps its default): 60,000
# events of 2,000 users, 3 shifts; at each shift EVERY user swaps one interest for a topic nobody held or explored
# before (a dormant topic; ~36% of the following events go to it), and nothing else moves (no rotating
# popularity, no new items), so a drop is the shifts' doing. Controls measured with this benchmark (seed 0):
#   the generator's defaults (`--stream dormant_topics=0 drift_fraction=0.5 popularity_rotations=0.2
#   n_new_items=600`): half the users swap to topics everybody knows; the frozen model decays from the freeze
#   point on (rotating popularity, new items), with or without a shift, and evolving hardly dips at a shift;
#   shifts to known topics alone (`--stream dormant_topics=0 min_interests=1 max_interests=2`): both dip deeply
#   and the frozen model recovers too (to 90% of its own level in 6,000-10,000 events; evolving in ~5,000),
#   since it knows the items it is shifted to.
STREAM: dict = {
    "n_users": 2000,
    "n_events": 60_000,
    "n_drifts": 3,
    "dormant_topics": 3,
    "drift_fraction": 1.0,
    "popularity_rotations": 0.0,
    "n_new_items": 0,
}
VARIANTS = ("evolving", "frozen")


def stream_config(seed: int, overrides: dict) -> SyntheticConfig:
    return SyntheticConfig(seed=seed, **{**STREAM, **overrides})


def records(stream: SyntheticStream):
    """The stream as replay records (user ids as strings, as replay.sources.synthetic_source gives them)."""
    for r in stream.iter_events():
        yield {**r, "user_id": str(r["user_id"])} if "event_id" in r else r


def ground_truth(stream: SyntheticStream, freeze: int) -> list[dict]:
    """Per shift: who shifted, how much of the next segment goes to swapped-in topics, how familiar those were."""
    topic = stream.item_topic[stream.item_id]
    shifts = stream.drift_event_indices.tolist()
    bounds = [*shifts, stream.num_events]
    pre_freeze = np.bincount(topic[:freeze], minlength=stream.config.n_topics) / max(freeze, 1)
    out = []
    for k, d in enumerate(stream.drift_points):
        new = np.full(stream.num_users + 1, -1)
        old = np.full(stream.num_users + 1, -1)
        new[d.users], old[d.users] = d.new_topic, d.old_topic
        seg = slice(bounds[k], bounds[k + 1])
        users, topics = stream.user_id[seg], topic[seg]
        in_new = (new[users] == topics).mean()
        before = slice(max(0, bounds[k] - (bounds[k + 1] - bounds[k])), bounds[k])
        in_old_before = (old[stream.user_id[before]] == topic[before]).mean()
        out.append({
            "shift": int(d.event_index),
            "timestamp": int(d.timestamp),
            "users_shifted": len(d.users),
            "share_of_next_segment_in_swapped_in_topics": float(in_new),
            "share_of_previous_segment_in_given_up_topics": float(in_old_before),
            "swapped_in_topics_pre_freeze_share_mean": float(pre_freeze[d.new_topic].mean()),
            "swapped_in_topics_never_seen_before_freeze": int((pre_freeze[d.new_topic] == 0).sum()),
        })
    return out


def replay_ranks(stream: SyntheticStream, settings: ReplaySettings) -> tuple[dict, dict, float]:
    """Run the replay; returns ({variant: (positions, ranks)} over every scored event, the report, seconds)."""
    got: dict[str, tuple[list, list]] = {}

    def observe(s: Scored) -> None:
        pos, rk = got.setdefault(s.variant, ([], []))
        pos.append(s.positions)
        rk.append(s.ranks)

    start = time.perf_counter()
    engine = Prequential(settings, stream.num_events)
    for _ in engine.run(records(stream), observer=observe):
        pass
    seconds = time.perf_counter() - start
    ranks = {v: (np.concatenate(p), np.concatenate(r)) for v, (p, r) in got.items()}
    return ranks, engine.report(), seconds


def shift_results(ranks: dict, shifts: list[int], end: int, args) -> list[dict]:
    out = []
    for i, shift in enumerate(shifts):
        until = shifts[i + 1] if i + 1 < len(shifts) else end
        kw = dict(pre_events=args.pre, width=args.width, step=args.step, until=until, fraction=args.fraction,
                  k=args.k)
        row = {"shift": shift, "until": until}
        for v in VARIANTS:
            row[v] = recovery(*ranks[v], shift, **kw)
        target = row["evolving"]["target"]
        vs = recovery(*ranks["frozen"], shift, target=target, **kw)
        row["frozen"]["reaches_evolving_target_after"] = vs["recovered_after"]
        out.append(row)
    return out


def curves(ranks: dict, end: int, args) -> dict:
    """{variant: (window ends, Recall@k over the last `width` events)} every `step` events over the stream."""
    starts = np.arange(0, end - args.width + 1, args.step)
    return {v: (starts + args.width, windowed_recall(*ranks[v], starts, args.width, args.k)[0]) for v in VARIANTS}


def table(results: list[dict]) -> str:
    def f(x, spec=".4f"):
        return "-" if x is None else format(x, spec)

    head = (f"{'shift':>7} {'variant':<9} {'pre R@20':>9} {'90% of it':>9} {'dip':>8} {'dip at':>7} {'final':>8} "
            f"{'recovered after':>16} {'vs evolving 90%':>16}")
    lines = [head, "-" * len(head)]
    for r in results:
        for v in VARIANTS:
            x = r[v]
            vs = f(x.get("reaches_evolving_target_after"), "d") if v == "frozen" else ""
            rec = f(x["recovered_after"], "d") if x["recovered_after"] is not None else "not recovered"
            lines.append(f"{r['shift']:>7} {v:<9} {f(x['pre_recall']):>9} {f(x['target']):>9} {f(x['dip']):>8} "
                         f"{f(x['dip_at'], 'd'):>7} {f(x['final']):>8} {rec:>16} {vs:>16}")
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict:
    fields = {k: type(v) for k, v in asdict(SyntheticConfig()).items()}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--stream {item!r}: unknown SyntheticConfig field {key!r}")
        out[key] = fields[key](value)
    return out


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as every entry point does (sparc_stream/cli/allocator.py)
    p = argparse.ArgumentParser(prog="python -m benchmarks.drift_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="write the JSON result here")
    p.add_argument("--plot", type=Path, default=None, help="PNG of Recall@20 over time (default: OUT with .png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stream and the models")
    p.add_argument("--stream", nargs="*", default=[], metavar="KEY=VALUE",
                   help="SyntheticConfig overrides on top of the benchmark's STREAM")
    p.add_argument("--pre", type=int, default=3000, help="events before a shift for its pre-shift level")
    p.add_argument("--width", type=int, default=2000, help="events per post-shift window")
    p.add_argument("--step", type=int, default=500, help="events between post-shift window starts")
    p.add_argument("--fraction", type=float, default=0.9, help="recovered = back at this share of the pre level")
    p.add_argument("--k", type=int, default=20, help="Recall@k")
    p.add_argument("--eval-per-batch", type=int, default=None, help="scored events per micro-batch (default all)")
    p.add_argument("--save-ranks", type=Path, default=None, help="also save every scored event's rank (.npz)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--codes", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    cfg = stream_config(args.seed, parse_overrides(args.stream))
    stream = generate(cfg)
    shifts = stream.drift_event_indices.tolist()
    if not shifts:
        raise SystemExit("the stream has no shifts (n_drifts = 0)")
    freeze = max(1, shifts[0] - args.pre)
    settings = ReplaySettings(
        model=worker_model_config(codes=args.codes, encoder=EncoderConfig(dim=args.dim, layers=args.layers)),
        train=TrainConfig(batch_size=64, seed=args.seed), regimes=VARIANTS, batch_size=64, freeze_at=freeze,
        eval_per_batch=args.eval_per_batch, seed=args.seed,
    )
    ranks, report, seconds = replay_ranks(stream, settings)
    results = shift_results(ranks, shifts, stream.num_events, args)
    if args.save_ranks:
        np.savez_compressed(args.save_ranks, **{f"{v}_{x}": a for v, arrs in ranks.items()
                                                for x, a in zip(("positions", "ranks"), arrs, strict=True)})
    plot_path = args.plot or args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_recovery(curves(ranks, stream.num_events, args), shifts, report["freeze_event"], results, plot_path,
                  k=args.k, width=args.width, fraction=args.fraction)

    evolving_ok = [r["evolving"]["recovered_after"] is not None for r in results]
    frozen_ok = [r["frozen"]["recovered_after"] is not None for r in results]
    result = {
        "benchmark": "recovery after interest shifts (synthetic stream)",
        "command": " ".join(["python -m benchmarks.drift_bench", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": 1},
        "stream": asdict(cfg),
        "stream_overrides_of_the_generator_defaults": {k: v for k, v in asdict(cfg).items()
                                                        if v != getattr(SyntheticConfig(), k)},
        "settings": {"pre": args.pre, "width": args.width, "step": args.step, "fraction": args.fraction, "k": args.k,
                     "freeze_event": report["freeze_event"], "replay": settings.to_json()},
        "ground_truth": ground_truth(stream, report["freeze_event"]),
        "summary": {
            "evolving_recovered": evolving_ok,
            "evolving_recovered_after": [r["evolving"]["recovered_after"] for r in results],
            "frozen_recovered": frozen_ok,
            "frozen_recovered_after": [r["frozen"]["recovered_after"] for r in results],
            "frozen_reaches_evolving_target_after": [r["frozen"]["reaches_evolving_target_after"] for r in results],
            "after_freeze_recall@20": {v: report["variants"][v]["after_freeze"]["recall@20"] for v in VARIANTS},
        },
        "shifts": results,
        "seconds": seconds,
        "plot": str(plot_path),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(results))
    print(f"evolving recovered after {result['summary']['evolving_recovered_after']} events; frozen "
          f"{result['summary']['frozen_recovered_after']} (own level), "
          f"{result['summary']['frozen_reaches_evolving_target_after']} (evolving's level); {seconds:.0f} s")
    print(f"written to {args.out} and {plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
