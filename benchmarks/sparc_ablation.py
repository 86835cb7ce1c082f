"""One SPARC variant on a dataset: train it once (as `sparc evaluate` does), then score it several ways on ALL
validation and test users, so variants can be compared on validation before any default changes.

    python -m benchmarks.sparc_ablation --data ../shared/datasets/amazon_beauty \
        --set attribute_dropout=0.3 --set conditioned_detach=true --out runs/ablation/ad03_detach.json

Scorings of the one trained model: soft search at each global mix of the grid (the weight of the single-vector
softmax in the mixture; `sparc evaluate` picks one on 8,000 validation users), soft search with exploration slots
(the first E by probability, the rest by p(i|u) / q(i)^lift, at each --exploit-grid E and --lift-grid L) and hard
search; with --sasrec, SASRec of the same seed beside them. Each gets raw validation and test Recall/NDCG@10, R@20,
masked test NDCG@10, coverage@20 and tail share (test and validation lists) and interests@20. The variant chosen on
validation is the soft scoring with the highest validation NDCG@10 among `sparc evaluate`'s grid (0, 0.5, 0.9),
reported as "chosen"; mix 1.0 (the single vector alone) is scored for comparison. With --sasrec, "chosen_explore"
is the exploration setting chosen on VALIDATION lists only: the smallest lift (then the largest E) whose validation
coverage@20 is at least 0.95 x SASRec's and tail share at least SASRec's, with validation R@10 and N@10 at least
SASRec's (none: no setting qualifies).

--models-dir DIR keeps the trained models (DIR/sparc.safetensors, DIR/sasrec.safetensors, each with a JSON of its
seed, --set and fit) and loads one found there instead of training it again (its seed and --set must match), so
serving-time variants are scored on one trained model without retraining (and --resume JSON keeps the scorings of
an earlier result on the same saved model):

    python -m benchmarks.sparc_ablation --data ../shared/datasets/amazon_beauty --threads 1 --sasrec \
        --models-dir runs/ablation/beauty_s0 --exploit-grid 10,15 --lift-grid 0.5,1,1.5 --out runs/ablation/s0.json

The seeds' means, and the exploration setting the same rule picks on their validation means (how the default
exploration slots, trainer.config.ExplorationConfig, were chosen):

    python -m benchmarks.sparc_ablation --means runs/ablation/beauty_s0.json runs/ablation/beauty_s1.json \
        runs/ablation/beauty_s2.json --out runs/ablation/beauty_means.json

Training is `sparc evaluate`'s: early stopping on validation NDCG@10 of 8,000 users (soft search, global mix 0),
no time budget (the result never depends on the machine's load). Two variants can run side by side with
--threads 1 each; say so when quoting their times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from benchmarks.common import write_json
from replay.datasets import DataError, leave_one_out, load_s3rec
from replay.evaluate import (
    EvalSettings,
    _metrics_block,
    build_sparc,
    fit_sparc,
    model_scorer,
    soft_scorer,
    valid_ndcg10,
    validation_subset,
)
from replay.metrics import interests_per_list
from sparc_stream.cli.allocator import tune_allocator
from sparc_stream.cli.errors import UserError
from sparc_stream.cli.evaluate import parse_sparc_set
from trainer.baselines import SASRec
from trainer.fit import fit

MIX_GRID = (0.0, 0.5, 0.9, 1.0)
COVERAGE_SHARE = 0.95  # the exploration setting must reach this share of SASRec's validation coverage@20


def summary(block: dict, item_codes: np.ndarray) -> dict:
    return {
        "valid_ndcg@10": block["valid"]["ndcg@10"], "valid_recall@10": block["valid"]["recall@10"],
        "valid_recall@20": block["valid"]["recall@20"],
        "valid_coverage@20": block["valid_coverage@20"], "valid_tail_share@20": block["valid_tail_share@20"],
        "recall@10": block["test"]["recall@10"], "ndcg@10": block["test"]["ndcg@10"],
        "recall@20": block["test"]["recall@20"], "ndcg@10_masked": block["test_masked"]["ndcg@10"],
        "coverage@20": block["coverage@20"], "tail_share@20": block["tail_share@20"],
        **interests_per_list(block["_top"], item_codes),
    }


def choose_exploration(results: dict, names: list[str], baseline: dict) -> str | None:
    """The exploration scoring chosen on validation (module doc): the smallest lift, then the largest E, among
    `names` whose validation coverage, tail share, R@10 and N@10 reach the baseline's (coverage: 0.95x)."""
    def qualifies(r: dict) -> bool:
        return (r["valid_coverage@20"] >= COVERAGE_SHARE * baseline["valid_coverage@20"]
                and r["valid_tail_share@20"] >= baseline["valid_tail_share@20"]
                and r["valid_recall@10"] >= baseline["valid_recall@10"]
                and r["valid_ndcg@10"] >= baseline["valid_ndcg@10"])

    ok = [n for n in names if qualifies(results[n])]
    return min(ok, key=lambda n: (results[n]["lift"], -results[n]["exploit"])) if ok else None


def seed_means(results: list[dict]) -> dict:
    """The scorings that every result (one seed each, with --sasrec) has, each metric averaged over them, and the
    exploration setting `choose_exploration` picks on those VALIDATION means: the rule that chose the default
    exploration slots (trainer.config.ExplorationConfig)."""
    names = [n for n in results[0]["scorings"] if all(n in r["scorings"] for r in results)]
    if "sasrec" not in names:
        raise UserError("every result needs the SASRec scoring (--sasrec)")
    means = {n: {k: float(np.mean([r["scorings"][n][k] for r in results])) for k in results[0]["scorings"][n]}
             for n in names}
    explored = [n for n in names if "lift" in means[n]]
    return {"seeds": [r["seed"] for r in results], "scorings": means,
            "chosen_explore": choose_exploration(means, explored, means["sasrec"])}


def trained_model(path: Path | None, meta: dict, build, train) -> tuple[torch.nn.Module, dict]:
    """The model saved at `path` when it is there (`build()` a fresh one, the weights loaded; its JSON must name
    the same `meta`: model, seed, set), else `train()` -> (model, FitResult), saved there (when `path`).
    Returns (model in eval mode, fit info)."""
    side = None if path is None else path.with_suffix(".json")
    if path is not None and path.exists():
        saved = json.loads(side.read_text())
        differs = {k: saved.get(k) for k in meta if saved.get(k) != meta[k]}
        if differs:
            raise UserError(f"{path}: saved with other settings {differs}, not {meta}")
        model = build()
        model.load_state_dict(load_file(str(path)))
        model.eval()
        return model, {**saved["fit"], "loaded_from": str(path)}
    model, res = train()
    info = {"epochs": res.epochs, "best_epoch": res.best_epoch, "stopped": res.stopped, "train_seconds": res.seconds}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
        side.write_text(json.dumps({**meta, "fit": info}, indent=2) + "\n")
    model.eval()
    return model, info


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as every entry point does (sparc_stream/cli/allocator.py)
    p = argparse.ArgumentParser(prog="python -m benchmarks.sparc_ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--means"]:  # --means JSON... --out JSON: the seeds' means and the setting chosen on them
        p.add_argument("--means", type=Path, nargs="+", required=True, metavar="JSON",
                       help="results of several seeds (with --sasrec): their means, the exploration chosen on them")
        p.add_argument("--out", type=Path, required=True)
        args = p.parse_args(argv)
        try:
            result = seed_means([json.loads(path.read_text()) for path in args.means])
        except (OSError, ValueError, KeyError, UserError) as exc:
            p.exit(2, f"sparc_ablation: --means: {exc}\n")
        print(f"seeds {result['seeds']}: chosen on the validation means: {result['chosen_explore']}")
        write_json(args.out, result)
        return 0
    p.add_argument("--data", type=Path, required=True, help="S3-Rec dataset folder (e.g. amazon_beauty)")
    p.add_argument("--set", dest="sparc_set", action="append", default=[], metavar="FIELD=VALUE",
                   help="SparcConfig override, as `sparc evaluate --set` (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=None, help="training time budget (default: none)")
    p.add_argument("--max-epochs", type=int, default=None, help="cap on epochs (default: TrainConfig's 200)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--top-codes", type=int, default=4, help="codes soft search draws (default 4)")
    p.add_argument("--exploit-grid", default="10",
                   help="E of the exploration-slot scorings: the first E slots by probability (default 10)")
    p.add_argument("--lift-grid", default="0.5,1.0", help="lifts of the exploration-slot scorings (default 0.5,1.0)")
    p.add_argument("--sasrec", action="store_true", help="score SASRec of the same seed beside SPARC")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="save the trained models here, or load them from here when saved with this seed and --set")
    p.add_argument("--resume", type=Path, default=None, metavar="JSON",
                   help="an earlier result of this benchmark on the same saved SPARC model (--models-dir): its "
                        "scorings are kept, only the others are scored")
    p.add_argument("--out", type=Path, required=True, help="write the JSON result here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        ds = load_s3rec(args.data)
        settings = EvalSettings(seed=args.seed, progress=False, sparc=parse_sparc_set(args.sparc_set))
        grid = [(int(e), float(lift)) for e in args.exploit_grid.split(",") if e.strip()
                for lift in args.lift_grid.split(",") if lift.strip()]
        if any(e < args.top_codes or lift < 0 for e, lift in grid):
            raise UserError(f"--exploit-grid needs E >= --top-codes ({args.top_codes}), --lift-grid lifts >= 0")
    except (DataError, UserError, ValueError) as exc:
        p.exit(2, f"sparc_ablation: {exc}\n")
    train = replace(settings.train, max_seconds=args.max_seconds or settings.train.max_seconds,
                    max_epochs=args.max_epochs or settings.train.max_epochs)
    settings = replace(settings, train=train, top_codes=args.top_codes)
    split = leave_one_out(ds)
    max_len = settings.encoder.max_len
    counts = np.bincount(np.concatenate(split.train), minlength=ds.num_items + 1).astype(np.float64)
    valid_idx = validation_subset(split, args.seed, settings.valid_users)

    started = time.perf_counter()
    where = args.models_dir
    meta = {"seed": args.seed, "set": settings.sparc,
            "train": {"max_epochs": settings.train.max_epochs,
                      "max_seconds": settings.train.max_seconds if np.isfinite(settings.train.max_seconds) else None}}
    try:
        model, fitted = trained_model(where and where / "sparc.safetensors", {"model": "sparc", **meta},
                                      lambda: build_sparc(ds, settings),
                                      lambda: fit_sparc(ds, split, settings, valid_idx))
    except UserError as exc:
        p.exit(2, f"sparc_ablation: {exc}\n")
    print(f"sparc: {fitted}", flush=True)

    scorings = {f"soft/mix={mix}": soft_scorer(model, args.top_codes, mix) for mix in MIX_GRID}
    explored = {f"soft/x={e}:lift={lift:g}": (e, lift) for e, lift in grid}
    for name, (e, lift) in explored.items():
        scorings[name] = soft_scorer(model, args.top_codes, 0.0, e, lift)
    scorings["hard"] = model_scorer(model, search="hard")
    baseline = None
    if args.sasrec:
        def train_sasrec():  # as `sparc evaluate` trains it
            torch.manual_seed(args.seed)
            sas = SASRec(ds.num_items, settings.encoder)
            score = model_scorer(sas)
            return sas, fit(sas, split.train, max_len, replace(settings.train, seed=args.seed), desc="sasrec",
                            validate=lambda: valid_ndcg10(score, split, valid_idx, max_len), progress=False)

        try:
            sas, baseline = trained_model(
                where and where / "sasrec.safetensors", {"model": "sasrec", "seed": args.seed, "train": meta["train"]},
                lambda: SASRec(ds.num_items, settings.encoder), train_sasrec)
        except UserError as exc:
            p.exit(2, f"sparc_ablation: {exc}\n")
        print(f"sasrec: {baseline}", flush=True)
        scorings["sasrec"] = model_scorer(sas)
    kept = {}
    if args.resume:
        prev = json.loads(args.resume.read_text())
        def fit_info(info: dict) -> dict:  # the saved model's fit, whether that run trained it or loaded it
            return {k: v for k, v in info.items() if k != "loaded_from"}

        if "loaded_from" not in fitted or (prev["seed"], prev["set"], fit_info(prev["sparc_fit"])) != (
                args.seed, settings.sparc, fit_info(fitted)):
            p.exit(2, f"sparc_ablation: --resume {args.resume}: not a result of the same saved model\n")
        kept = prev["scorings"]
    results, codes = {}, model.catalogue().level1().cpu().numpy()
    for name, fn in scorings.items():
        if name in kept:
            results[name] = kept[name]
            continue
        results[name] = summary(_metrics_block(fn, split, max_len, counts), codes)
        if name in explored:
            results[name].update(exploit=explored[name][0], lift=explored[name][1])
        print(name, " ".join(f"{k} {v:.4f}" for k, v in results[name].items()), flush=True)
    mixes = [f"soft/mix={mix}" for mix in settings.global_mix_grid]  # the grid `sparc evaluate` chooses from
    chosen = max(mixes, key=lambda name: results[name]["valid_ndcg@10"])
    write_json(args.out, {
        "dataset": ds.summary(), "seed": args.seed, "set": settings.sparc, "threads": torch.get_num_threads(),
        "sparc_fit": fitted, "sasrec_fit": baseline, "seconds": time.perf_counter() - started, "chosen": chosen,
        "chosen_explore": choose_exploration(results, list(explored), results["sasrec"]) if args.sasrec else None,
        "scorings": results,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
