"""One SPARC variant on a dataset: train it once (as `sparc evaluate` does), then score it several ways on ALL
validation and test users, so variants can be compared on validation before any default changes.

    python -m benchmarks.sparc_ablation --data ../shared/datasets/amazon_beauty \
        --set attribute_dropout=0.3 --set conditioned_detach=true --out runs/ablation/ad03_detach.json

Scorings of the one trained model: soft search at each global mix of the grid (the weight of the single-vector
softmax in the mixture; `sparc evaluate` picks one on 8,000 validation users) and hard search. Each gets raw
validation and test Recall/NDCG@10, R@20, masked test NDCG@10, coverage@20 and tail share. The variant chosen on
validation is the soft scoring with the highest validation NDCG@10 among `sparc evaluate`'s grid (0, 0.5, 0.9),
reported as "chosen"; mix 1.0 (the single vector alone) is scored for comparison.

Training is `sparc evaluate`'s: early stopping on validation NDCG@10 of 8,000 users (soft search, global mix 0),
with a larger time budget by default (--max-seconds 3000) so that runs sharing the machine are not cut short.
Two variants can run side by side with --threads 1 each; say so when quoting their times.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_json
from replay.datasets import DataError, leave_one_out, load_s3rec
from replay.evaluate import EvalSettings, _metrics_block, fit_sparc, soft_scorer, validation_subset
from replay.metrics import interests_per_list
from sparc_stream.cli.allocator import tune_allocator
from sparc_stream.cli.errors import UserError
from sparc_stream.cli.evaluate import parse_sparc_set

MIX_GRID = (0.0, 0.5, 0.9, 1.0)


def summary(block: dict, item_codes: np.ndarray) -> dict:
    return {
        "valid_ndcg@10": block["valid"]["ndcg@10"], "valid_recall@10": block["valid"]["recall@10"],
        "recall@10": block["test"]["recall@10"], "ndcg@10": block["test"]["ndcg@10"],
        "recall@20": block["test"]["recall@20"], "ndcg@10_masked": block["test_masked"]["ndcg@10"],
        "coverage@20": block["coverage@20"], "tail_share@20": block["tail_share@20"],
        **interests_per_list(block["_top"], item_codes),
    }


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as every entry point does (sparc_stream/cli/allocator.py)
    p = argparse.ArgumentParser(prog="python -m benchmarks.sparc_ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="S3-Rec dataset folder (e.g. amazon_beauty)")
    p.add_argument("--set", dest="sparc_set", action="append", default=[], metavar="FIELD=VALUE",
                   help="SparcConfig override, as `sparc evaluate --set` (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=3000.0, help="training time budget (default 3000)")
    p.add_argument("--max-epochs", type=int, default=None, help="cap on epochs (default: TrainConfig's 200)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--top-codes", type=int, default=4, help="codes soft search draws (default 4)")
    p.add_argument("--out", type=Path, required=True, help="write the JSON result here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        ds = load_s3rec(args.data)
        settings = EvalSettings(seed=args.seed, progress=False, sparc=parse_sparc_set(args.sparc_set))
    except (DataError, UserError) as exc:
        p.exit(2, f"sparc_ablation: {exc}\n")
    train = replace(settings.train, max_seconds=args.max_seconds,
                    max_epochs=args.max_epochs or settings.train.max_epochs)
    settings = replace(settings, train=train, top_codes=args.top_codes)
    split = leave_one_out(ds)
    max_len = settings.encoder.max_len
    counts = np.bincount(np.concatenate(split.train), minlength=ds.num_items + 1).astype(np.float64)
    valid_idx = validation_subset(split, args.seed, settings.valid_users)

    started = time.perf_counter()
    model, res = fit_sparc(ds, split, settings, valid_idx)
    print(f"trained: {res.epochs} epochs (best {res.best_epoch}, {res.stopped}), {res.seconds:.0f} s", flush=True)

    scorings = {f"soft/mix={mix}": soft_scorer(model, args.top_codes, mix) for mix in MIX_GRID}
    scorings["hard"] = lambda inputs, lengths: model.score(inputs, lengths, search="hard")
    results, codes = {}, model.catalogue().level1().numpy()
    for name, fn in scorings.items():
        results[name] = summary(_metrics_block(fn, split, max_len, counts), codes)
        print(name, " ".join(f"{k} {v:.4f}" for k, v in results[name].items()), flush=True)
    grid = [f"soft/mix={mix}" for mix in settings.global_mix_grid]  # the grid `sparc evaluate` chooses from
    chosen = max(grid, key=lambda name: results[name]["valid_ndcg@10"])
    write_json(args.out, {
        "dataset": ds.summary(), "seed": args.seed, "set": settings.sparc, "threads": torch.get_num_threads(),
        "epochs": res.epochs, "best_epoch": res.best_epoch, "stopped": res.stopped, "train_seconds": res.seconds,
        "seconds": time.perf_counter() - started, "chosen": chosen, "scorings": results,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
