"""benchmarks.sparc_ablation on a tiny dataset: one trained model scored several ways, the chosen scoring is the
best on validation among `sparc evaluate`'s grid, and bad input is one line."""

from __future__ import annotations

import json

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
    assert report["epochs"] == 4 and report["threads"] == 1
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


def test_bad_input_is_one_line(tmp_path, capsys):
    rc = None
    try:
        main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]
