"""Leave-one-out evaluation of SPARC and the baselines, side by side, on one split with one metric code.

`run_evaluation(dataset, models, ...)` returns the report that `sparc evaluate` writes as JSON:
{"dataset": {...}, "protocol": "leave-one-out/full-ranking", "results": {MODEL: {...}}}
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from replay.datasets import LeaveOneOut, SequenceDataset, leave_one_out
from replay.metrics import coverage_and_tail, evaluate_ranking, interests_per_list, ranking_metrics
from trainer.baselines import ComiRecSA, Popularity, SASRec
from trainer.batches import pad_histories
from trainer.config import EXPLORATION, EncoderConfig, SparcConfig, TrainConfig
from trainer.device import model_device
from trainer.fit import FitResult, fit
from trainer.model import SparcModel
from trainer.towers import pad_attributes

MODELS = ("sparc", "sparc-hard", "sasrec", "comirec-sa", "popularity")
COLD_MAX_LEN = 10  # users with 5-10 interactions form the cold slice


@dataclass(frozen=True)
class EvalSettings:
    seed: int = 0
    encoder: EncoderConfig = EncoderConfig()
    train: TrainConfig = TrainConfig()
    sparc: dict = field(default_factory=dict)  # SparcConfig overrides (e.g. {"codes": 256})
    top_codes: int = 4  # codes drawn by soft search
    # weight of an extra single-vector component in the soft mixture, chosen on validation NDCG@10 (< 1: codes
    # always count). The factorised model already falls back to h outside its top codes; 0 is usually chosen.
    global_mix_grid: tuple[float, ...] = (0.0, 0.5, 0.9)
    valid_users: int = 8000  # users checked for early stopping (all users are reported at the end)
    # > 0: also score sparc and sparc-hard by the lists serving returns with this many slots (SparcModel.score's
    # `served`: soft_search's quotas over the top codes, hard_search's one list), reported under "served"
    served: int = 0
    # exploration slots of the sparc row (trainer.search, step 5; trainer.config.ExplorationConfig, on by default):
    # the first `exploit` slots by probability, the rest by p(i | u) / q(i)^lift (None: off). Training and the
    # global-mix choice on validation NDCG@10 do not see them when exploit >= 10
    exploit: int | None = EXPLORATION.exploit
    lift: float = EXPLORATION.lift
    progress: bool = True
    device: str = "cpu"  # where the torch models train and score (trainer.device: auto, cpu, cuda)


def _metrics_block(score_fn, split: LeaveOneOut, max_len: int, train_counts: np.ndarray) -> dict:
    test = evaluate_ranking(score_fn, split.test_inputs, split.test_targets, max_len)
    valid = evaluate_ranking(score_fn, split.valid_inputs, split.valid_targets, max_len)
    cold = split.test_lengths <= COLD_MAX_LEN
    out = {
        "test": ranking_metrics(test["raw"]),
        "test_masked": ranking_metrics(test["masked"]),
        "valid": ranking_metrics(valid["raw"]),
        "cold_test": ranking_metrics(test["raw"][cold]),
        "cold_users": int(cold.sum()),
    }
    out.update(coverage_and_tail(test["top"], train_counts, split.num_items))
    out.update({f"valid_{k}": v for k, v in coverage_and_tail(valid["top"], train_counts, split.num_items).items()})
    out["_top"] = test["top"]  # the test lists, for interests_per_list once a SPARC model gives codes (not in JSON)
    return out


def _add_interests(results: dict, item_codes: np.ndarray | None) -> None:
    """Add interests@n to every block (served ones too) from its test lists under `item_codes` (the level-1
    codes of the SPARC model of the same run), and drop the lists."""
    for block in results.values():
        for b in (block, block.get("served", {})):
            top = b.pop("_top", None)
            if top is not None and item_codes is not None:
                b.update(interests_per_list(top, item_codes))


def valid_ndcg10(score_fn, split: LeaveOneOut, idx: np.ndarray, max_len: int) -> float:
    """Raw NDCG@10 on the validation targets of the users `idx` (the early-stopping signal)."""
    ranks = evaluate_ranking(score_fn, [split.valid_inputs[i] for i in idx], split.valid_targets[idx], max_len)
    return ranking_metrics(ranks["raw"], ks=(10,))["ndcg@10"]


def validation_subset(split: LeaveOneOut, seed: int, size: int) -> np.ndarray:
    """The sorted, seeded sample of users whose validation targets drive early stopping."""
    n_valid = len(split.valid_targets)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_valid, size=min(size, n_valid), replace=False))


def build_sparc(ds: SequenceDataset, settings: EvalSettings, num_attributes: int | None = None) -> SparcModel:
    """A fresh SPARC model for `ds` (attributes from the dataset; `num_attributes` may reserve more ids)."""
    n_attr = ds.num_attributes if num_attributes is None else num_attributes
    cfg = SparcConfig(num_items=ds.num_items, num_attributes=n_attr, encoder=settings.encoder, **settings.sparc)
    attrs = pad_attributes(ds.item_attributes, ds.num_items) if n_attr else None
    return SparcModel(cfg, attrs)


@torch.no_grad()
def interest_hit_rates(model: SparcModel, split: LeaveOneOut, max_len: int, ks=(1, 4, 8), batch_size: int = 1024):
    """Share of test targets whose level-1 code is among the interest module's top-k codes (the ceiling of soft
    search: a target outside every searched code can only be found through the single-vector component)."""
    model.eval()
    cat = model.catalogue()
    hits = {k: 0 for k in ks}
    device = model_device(model)
    for start in range(0, len(split.test_inputs), batch_size):
        inputs, lengths = pad_histories(split.test_inputs[start : start + batch_size], max_len)
        state = model.encode(inputs.to(device), lengths.to(device), cat.z)
        logits = model.interest_logits(state.h, cat.z, cat.codes)
        target_code = cat.codes[torch.from_numpy(split.test_targets[start : start + batch_size]), 0]
        order = logits.argsort(dim=-1, descending=True)
        for k in ks:
            hits[k] += int((order[:, :k] == target_code[:, None]).any(dim=1).sum())
    return {f"interest_hit@{k}": hits[k] / len(split.test_targets) for k in ks}


def model_scorer(model: torch.nn.Module, **score_kwargs):
    """model.score(inputs, lengths, **score_kwargs) as a ScoreFn: the inputs go to the model's device (where it
    trained), the scores come back to the CPU."""

    def score(inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        device = model_device(model)
        return model.score(inputs.to(device), lengths.to(device), **score_kwargs).cpu()

    return score


def soft_scorer(model: SparcModel, top_codes: int, global_mix: float, exploit: int | None = None,
                lift: float = 0.0):
    """Full-catalogue soft-search scores of `model` (with exploration slots when `exploit` is set), as a ScoreFn."""
    return model_scorer(model, search="soft", top_codes=top_codes, global_mix=global_mix, exploit=exploit, lift=lift)


def fit_sparc(ds: SequenceDataset, split: LeaveOneOut, settings: EvalSettings, valid_idx: np.ndarray,
              num_attributes: int | None = None) -> tuple[SparcModel, FitResult]:
    """A fresh SPARC model trained on split.train as `sparc evaluate` trains it (also `sparc train` and the
    ablation benchmark): early stopping on validation NDCG@10 of the users `valid_idx`, scored by soft search at
    the grid's first global mix. The model is returned in eval mode."""
    torch.manual_seed(settings.seed)
    model = build_sparc(ds, settings, num_attributes)
    score = soft_scorer(model, settings.top_codes, settings.global_mix_grid[0])  # the model's lists, no slots
    max_len = settings.encoder.max_len
    result = fit(model, split.train, max_len, replace(settings.train, seed=settings.seed),
                 validate=lambda: valid_ndcg10(score, split, valid_idx, max_len), desc="sparc",
                 progress=settings.progress, device=settings.device)
    return model, result


def run_evaluation(
    ds: SequenceDataset,
    models: Sequence[str],
    settings: EvalSettings = EvalSettings(),
    log: Callable[[str], None] = print,
) -> dict:
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    started = time.perf_counter()
    split = leave_one_out(ds)
    max_len = settings.encoder.max_len
    train_counts = np.bincount(np.concatenate(split.train), minlength=ds.num_items + 1).astype(np.float64)
    valid_idx = validation_subset(split, settings.seed, settings.valid_users)
    train_cfg = replace(settings.train, seed=settings.seed)
    results: dict[str, dict] = {}

    def trained(name: str, res: FitResult) -> tuple[float, int, dict]:
        log(f"{name}: {res.epochs} epochs (best {res.best_epoch}, {res.stopped}), {res.seconds:.0f} s")
        return res.seconds, res.epochs, {"best_epoch": res.best_epoch, "stopped": res.stopped}

    def run_torch(name: str, model: torch.nn.Module, score_fn) -> tuple[float, int, dict]:
        torch.manual_seed(settings.seed)
        res = fit(
            model, split.train, max_len, train_cfg,
            validate=lambda: valid_ndcg10(score_fn, split, valid_idx, max_len),
            desc=name, progress=settings.progress, device=settings.device,
        )
        return trained(name, res)

    if "popularity" in models:
        start = time.perf_counter()
        pop = Popularity(ds.num_items)
        pop.fit(split.train)
        results["popularity"] = _metrics_block(pop.score, split, max_len, train_counts)
        results["popularity"].update(train_seconds=time.perf_counter() - start, epochs=0)

    if "sasrec" in models:
        torch.manual_seed(settings.seed)
        m = SASRec(ds.num_items, settings.encoder)
        secs, epochs, info = run_torch("sasrec", m, model_scorer(m))
        results["sasrec"] = _metrics_block(model_scorer(m), split, max_len, train_counts)
        results["sasrec"].update(train_seconds=secs, epochs=epochs, **info)

    if "comirec-sa" in models:
        torch.manual_seed(settings.seed)
        m = ComiRecSA(ds.num_items, settings.encoder)
        secs, epochs, info = run_torch("comirec-sa", m, model_scorer(m))
        results["comirec-sa"] = _metrics_block(model_scorer(m), split, max_len, train_counts)
        results["comirec-sa"].update(train_seconds=secs, epochs=epochs, **info)

    has_sparc = "sparc" in models or "sparc-hard" in models
    if has_sparc:
        m, res = fit_sparc(ds, split, settings, valid_idx)
        secs, epochs, info = trained("sparc", res)

        def soft(mix: float):
            return soft_scorer(m, settings.top_codes, mix, settings.exploit, settings.lift)

        # serving calibration on validation: the weight of the single-vector component in the mixture
        tried = {mix: valid_ndcg10(soft(mix), split, valid_idx, max_len) for mix in settings.global_mix_grid}
        mix = max(tried, key=tried.get)
        log(f"sparc: global_mix chosen on validation {mix} ({', '.join(f'{k}: {v:.4f}' for k, v in tried.items())})")
        shared = {"train_seconds": secs, "epochs": epochs, **info}

        def served(search: str) -> dict:
            explore = {"exploit": settings.exploit, "lift": settings.lift} if search == "soft" else {}
            fn = model_scorer(m, search=search, top_codes=settings.top_codes, served=settings.served, **explore)
            return {"served": {**_metrics_block(fn, split, max_len, train_counts), "slots": settings.served}}

        if "sparc" in models:
            results["sparc"] = _metrics_block(soft(mix), split, max_len, train_counts)
            results["sparc"].update(shared, global_mix=mix, top_codes=settings.top_codes, exploit=settings.exploit,
                                    lift=settings.lift,
                                    valid_by_global_mix=tried, **interest_hit_rates(m, split, max_len))
            if settings.served:
                results["sparc"].update(served("soft"))
        if "sparc-hard" in models:
            hard = model_scorer(m, search="hard")
            results["sparc-hard"] = _metrics_block(hard, split, max_len, train_counts)
            results["sparc-hard"].update(shared, note="same trained model as sparc; argmax-code search")
            if settings.served:
                results["sparc-hard"].update(served("hard"))

    # how many interests a top-20 list spans, every model's lists measured by the one SPARC model's level-1 codes
    _add_interests(results, m.catalogue().level1().cpu().numpy() if has_sparc else None)
    return {
        "dataset": ds.summary(),
        "protocol": "leave-one-out/full-ranking",
        "seed": settings.seed,
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "results": {name: results[name] for name in models},
    }
