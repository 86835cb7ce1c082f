"""replay.evaluate on a tiny dataset: SPARC's extra report fields and the interest hit rates."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import replay.evaluate as evaluate_module
from replay.datasets import SequenceDataset, leave_one_out
from replay.evaluate import EvalSettings, build_sparc, fit_sparc, interest_hit_rates, run_evaluation
from replay.metrics import evaluate_ranking
from trainer.baselines import Popularity
from trainer.config import EncoderConfig


def tiny_dataset(users: int = 40, items: int = 30, seed: int = 0) -> SequenceDataset:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, items + 1, size=int(rng.integers(5, 12))) for _ in range(users)]
    attrs = {i: [1 + i % 4] for i in range(1, items + 1)}
    return SequenceDataset(name="tiny", user_ids=np.arange(1, users + 1), sequences=seqs, num_items=items,
                           item_attributes=attrs, num_attributes=4)


SETTINGS = EvalSettings(encoder=EncoderConfig(dim=16, layers=1), sparc={"codes": 4, "levels": 2}, top_codes=2,
                        valid_users=20, progress=False)


def test_sparc_report_has_mixture_choice_and_interest_hit_rates():
    settings = replace(SETTINGS, train=replace(SETTINGS.train, max_epochs=2))
    report = run_evaluation(tiny_dataset(), ["sparc", "sparc-hard"], settings, log=lambda _: None)
    sparc = report["results"]["sparc"]
    assert sparc["global_mix"] in settings.global_mix_grid
    assert set(sparc["valid_by_global_mix"]) == set(settings.global_mix_grid)
    assert sparc["valid_by_global_mix"][sparc["global_mix"]] == max(sparc["valid_by_global_mix"].values())
    hits = [sparc[f"interest_hit@{k}"] for k in (1, 4, 8)]
    assert 0.0 <= hits[0] <= hits[1] <= hits[2] == 1.0  # 4 codes: the top 4 (and 8) hold every code
    assert report["results"]["sparc-hard"]["train_seconds"] == sparc["train_seconds"]  # one trained model


def test_every_models_lists_are_measured_in_the_sparc_models_interests(monkeypatch):
    """interests@20: distinct level-1 codes of the run's SPARC model per test list, for every model of the run
    (popularity's one list by hand); the lists themselves stay out of the report."""
    settings = replace(SETTINGS, train=replace(SETTINGS.train, max_epochs=2), served=20)
    trained = {}

    def keep_model(*args, **kwargs):
        trained["model"], res = fit_sparc(*args, **kwargs)
        return trained["model"], res

    monkeypatch.setattr(evaluate_module, "fit_sparc", keep_model)
    ds = tiny_dataset()
    report = run_evaluation(ds, ["popularity", "sparc", "sparc-hard"], settings, log=lambda _: None)
    results = report["results"]
    codes = trained["model"].catalogue().level1().numpy()
    split = leave_one_out(ds)
    pop = Popularity(ds.num_items)
    pop.fit(split.train)
    lists = evaluate_ranking(pop.score, split.test_inputs, split.test_targets, settings.encoder.max_len)["top"]
    assert (lists == lists[0]).all()  # one list for everyone
    assert results["popularity"]["interests@20"] == len(set(codes[lists[0]].tolist()))
    for name in ("sparc", "sparc-hard"):
        for block in (results[name], results[name]["served"]):
            assert 1.0 <= block["interests@20"] <= 4  # 4 codes
    assert results["sparc-hard"]["served"]["interests@20"] == 1.0  # the argmax code's list only
    assert "_top" not in json.dumps(report)


def test_served_lists_are_reported_beside_the_full_ranking():
    settings = replace(SETTINGS, train=replace(SETTINGS.train, max_epochs=2), served=20)
    results = run_evaluation(tiny_dataset(), ["sparc", "sparc-hard"], settings, log=lambda _: None)["results"]
    for name in ("sparc", "sparc-hard"):
        served = results[name]["served"]
        assert served["slots"] == 20 and {"test", "test_masked", "valid", "cold_test", "coverage@20"} <= set(served)
        r = served["test"]
        assert 0.0 <= r["recall@5"] <= r["recall@10"] <= r["recall@20"] <= 1.0
    # hard search serves the argmax code's list, the head of hard's full ranking (that code's items come first;
    # 30 items in 4 codes: every list is shorter than 20), so serving it finds no target the ranking misses
    hard = results["sparc-hard"]
    for k in (5, 10, 20):
        assert hard["served"]["test"][f"recall@{k}"] <= hard["test"][f"recall@{k}"] + 1e-12
    assert hard["served"]["test"]["recall@20"] < hard["test"]["recall@20"]  # ... and misses what other codes hold


def test_interest_hit_rates_count_target_codes_by_hand(monkeypatch):
    ds = tiny_dataset()
    split = leave_one_out(ds)
    model = build_sparc(ds, SETTINGS)
    model.rq.update_(model.items()[1:].detach())  # k-means init: items spread over the 4 codes
    model.eval()
    codes = model.catalogue().codes[:, 0].numpy()
    preference = torch.tensor([0.0, 2.0, 3.0, -1.0])  # every user ranks codes 2, 1, 0, 3

    def fixed_logits(h, z, c):
        return preference.expand(h.shape[0], -1)

    monkeypatch.setattr(model, "interest_logits", fixed_logits)
    target_codes = codes[split.test_targets]
    rates = interest_hit_rates(model, split, max_len=50, ks=(1, 2, 4))
    assert rates["interest_hit@1"] == pytest.approx(np.mean(target_codes == 2))
    assert rates["interest_hit@2"] == pytest.approx(np.mean(np.isin(target_codes, [2, 1])))
    assert rates["interest_hit@4"] == 1.0
    assert len(set(codes[1:].tolist())) > 1  # the check above is not vacuous


def test_results_table_shows_interests_where_the_run_measured_them():
    from replay.report import results_table

    block = {"recall@10": 0.1, "ndcg@10": 0.05, "recall@20": 0.2, "ndcg@20": 0.07}
    row = {"test": block, "test_masked": block, "cold_test": block, "coverage@20": 0.5, "tail_share@20": 0.25,
           "train_seconds": 3.0, "epochs": 7}
    lines = results_table({"results": {"sasrec": row, "sparc": {**row, "interests@20": 3.456}}}).splitlines()
    assert "intr@20" in lines[0]
    assert "epochs" in lines[0]
    assert lines[2].split()[-3:] == ["-", "3", "7"] and lines[3].split()[-3:] == ["3.46", "3", "7"]
