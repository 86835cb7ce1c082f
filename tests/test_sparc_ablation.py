"""benchmarks.sparc_ablation on a tiny dataset: one trained model scored several ways, the chosen scoring is the
best on validation among `sparc evaluate`'s grid, and bad input is one line."""

from __future__ import annotations

import json

import pytest

from benchmarks.sparc_ablation import main
from replay.evaluate import EvalSettings
from tests.test_cli_evaluate import write_dataset


def test_scores_one_model_every_way_and_chooses_on_validation(tmp_path):
    data = write_dataset(tmp_path / "tiny")
    out = tmp_path / "ablation.json"
    rc = main(["--data", str(data), "--set", "attribute_dropout=0.5", "--set", "conditioned_detach=false",
               "--max-epochs", "4", "--threads", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["set"] == {"attribute_dropout": 0.5, "conditioned_detach": False}
    assert report["sparc_fit"]["epochs"] == 4 and report["threads"] == 1
    assert set(report["scorings"]) == {"soft/mix=0.0", "soft/mix=0.5", "soft/mix=0.9", "soft/mix=1.0", "hard",
                                       "soft/x=10:lift=0.5", "soft/x=10:lift=1"}
    plain, explored = report["scorings"]["soft/mix=0.0"], report["scorings"]["soft/x=10:lift=1"]
    assert (explored["recall@10"], explored["valid_ndcg@10"]) == (plain["recall@10"], plain["valid_ndcg@10"])
    grid = [f"soft/mix={mix}" for mix in EvalSettings().global_mix_grid]
    best = max(report["scorings"][name]["valid_ndcg@10"] for name in grid)
    assert report["chosen"] in grid and report["scorings"][report["chosen"]]["valid_ndcg@10"] == best
    for scoring in report["scorings"].values():
        assert 0 < scoring["coverage@20"] <= 1
        assert 0 <= scoring["ndcg@10"] <= scoring["recall@10"] <= scoring["recall@20"] <= 1


def test_saved_models_are_scored_again_and_exploration_is_chosen_on_validation(tmp_path):
    """--models-dir: the first run trains and saves SPARC and SASRec, the second loads them and scores the same
    numbers; the exploration setting chosen is the smallest lift that reaches SASRec's validation discovery."""
    data = write_dataset(tmp_path / "tiny")
    runs = []
    for name in ("first", "again"):
        out = tmp_path / f"{name}.json"
        assert main(["--data", str(data), "--max-epochs", "2", "--threads", "1", "--sasrec", "--models-dir",
                     str(tmp_path / "models"), "--exploit-grid", "4,10", "--lift-grid", "0,4", "--out", str(out)]) == 0
        runs.append(json.loads(out.read_text()))
    first, again = runs
    assert "loaded_from" not in first["sparc_fit"] and again["sparc_fit"]["loaded_from"].endswith("sparc.safetensors")
    assert again["sasrec_fit"]["epochs"] == first["sasrec_fit"]["epochs"] == 2
    assert again["scorings"] == first["scorings"]
    scorings, sasrec = first["scorings"], first["scorings"]["sasrec"]
    assert set(scorings) >= {"sasrec", "soft/x=4:lift=0", "soft/x=4:lift=4", "soft/x=10:lift=0", "soft/x=10:lift=4"}

    def reaches(r):
        return (r["valid_coverage@20"] >= 0.95 * sasrec["valid_coverage@20"]
                and r["valid_tail_share@20"] >= sasrec["valid_tail_share@20"]
                and r["valid_recall@10"] >= sasrec["valid_recall@10"] and r["valid_ndcg@10"] >= sasrec["valid_ndcg@10"])

    ok = sorted((r["lift"], -r["exploit"], name) for name, r in scorings.items() if "lift" in r and reaches(r))
    assert first["chosen_explore"] == (ok[0][2] if ok else None)
    # --resume: the scorings of the first result are kept, the new ones scored
    out = tmp_path / "more.json"
    assert main(["--data", str(data), "--max-epochs", "2", "--threads", "1", "--models-dir", str(tmp_path / "models"),
                 "--exploit-grid", "4", "--lift-grid", "0,2", "--resume", str(tmp_path / "first.json"),
                 "--out", str(out)]) == 0
    more = json.loads(out.read_text())["scorings"]
    assert more["soft/x=4:lift=0"] == scorings["soft/x=4:lift=0"] and more["hard"] == scorings["hard"]
    assert more["soft/x=4:lift=2"]["lift"] == 2 and "sasrec" not in more
    # a saved model is not loaded under other settings
    with pytest.raises(SystemExit) as exc:
        main(["--data", str(data), "--max-epochs", "2", "--seed", "1", "--models-dir", str(tmp_path / "models"),
              "--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2 and not (tmp_path / "x.json").exists()


def test_bad_input_is_one_line(tmp_path, capsys):
    rc = None
    try:
        main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]


def test_means_over_seeds_choose_the_exploration_on_validation_means(tmp_path):
    """--means: every metric averaged over the seeds' results, and choose_exploration applied to the validation
    means (here a setting that qualifies in one seed only is not chosen; the one that qualifies on the means is)."""
    def scoring(cov, tail, **extra):
        return {"valid_coverage@20": cov, "valid_tail_share@20": tail, "valid_recall@10": 0.1,
                "valid_ndcg@10": 0.05, "coverage@20": cov, **extra}

    seeds = [{"seed": s, "scorings": {"sasrec": scoring(0.9, 0.3),
                                      "soft/x=10:lift=0.5": scoring(c05, 0.35, exploit=10, lift=0.5),
                                      "soft/x=10:lift=1": scoring(0.9, 0.5, exploit=10, lift=1.0)}}
             for s, c05 in ((0, 0.9), (1, 0.7))]
    paths = []
    for r in seeds:
        paths.append(tmp_path / f"s{r['seed']}.json")
        paths[-1].write_text(json.dumps(r))
    out = tmp_path / "means.json"
    assert main(["--means", *map(str, paths), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["seeds"] == [0, 1] and result["scorings"]["soft/x=10:lift=0.5"]["valid_coverage@20"] == 0.8
    assert result["chosen_explore"] == "soft/x=10:lift=1"  # lift 0.5 reaches 0.95 x 0.9 in seed 0, not on the mean
    paths[1].write_text(json.dumps({"seed": 1, "scorings": {"soft/x=10:lift=1": {}}}))
    with pytest.raises(SystemExit) as exc:
        main(["--means", *map(str, paths), "--out", str(out)])
    assert exc.value.code == 2
