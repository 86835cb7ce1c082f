"""`sparc evaluate`, called in-process through `sparc`'s main: errors as one line, the JSON report's keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparc_stream.cli.main import main

METRIC_KEYS = {f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 20)}


def write_dataset(folder: Path, users: int = 30, items: int = 40, seed: int = 0) -> Path:
    """A seeded S3-Rec dataset with timestamps and attributes; lengths 5..12 (some cold users)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    seq_lines, ts_lines = [], []
    for u in range(1, users + 1):
        n = int(rng.integers(5, 13))
        seq = rng.integers(1, items + 1, size=n)
        if u == 1:
            seq[-1] = items  # the largest id is exactly `items`
        seq_lines.append(" ".join(map(str, [u, *seq])))
        ts_lines.append(" ".join(map(str, [u, *range(1_600_000_000, 1_600_000_000 + n)])))
    (folder / "Tiny.txt").write_text("\n".join(seq_lines) + "\n")
    (folder / "Tiny_timestamps.txt").write_text("\n".join(ts_lines) + "\n")
    attrs = {str(i): [int(a) for a in rng.integers(1, 6, size=2)] for i in range(1, items + 1)}
    (folder / "Tiny_item2attributes.json").write_text(json.dumps(attrs))
    return folder


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sparc evaluate: error:"), err
    return lines[0]


def test_missing_folder_is_a_one_line_error(tmp_path, capsys):
    rc = main(["evaluate", "--data", str(tmp_path / "nowhere"), "--models", "popularity", "--quiet"])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "nowhere") in line


def test_unknown_model_is_a_one_line_error(tmp_path, capsys):
    data = write_dataset(tmp_path / "tiny")
    rc = main(["evaluate", "--data", str(data), "--models", "popularity,bogus", "--quiet"])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert "bogus" in line and "sasrec" in line  # names the culprit and the choices


def test_malformed_dataset_names_file_and_line(tmp_path, capsys):
    data = write_dataset(tmp_path / "tiny")
    lines = (data / "Tiny.txt").read_text().splitlines()
    lines[2] = lines[2] + " seven"
    (data / "Tiny.txt").write_text("\n".join(lines) + "\n")
    rc = main(["evaluate", "--data", str(data), "--models", "popularity", "--quiet"])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{data / 'Tiny.txt'}:3: not an integer: 'seven'" in line


def test_evaluate_writes_the_documented_report(tmp_path, capsys):
    data = write_dataset(tmp_path / "tiny")
    out = tmp_path / "reports" / "eval.json"
    rc = main(["evaluate", "--data", str(data), "--models", "popularity,sasrec", "--max-epochs", "2",
               "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Tiny: 30 users, 40 items" in captured.out
    assert f"report written to {out}" in captured.out

    report = json.loads(out.read_text())
    assert set(report["dataset"]) >= {"name", "users", "items", "interactions"}
    assert report["dataset"]["name"] == "Tiny"
    assert report["dataset"]["users"] == 30 and report["dataset"]["items"] == 40
    assert report["protocol"] == "leave-one-out/full-ranking"
    assert list(report["results"]) == ["popularity", "sasrec"]
    for name, result in report["results"].items():
        assert {"test", "test_masked", "valid", "cold_test", "coverage@20", "tail_share@20", "train_seconds",
                "epochs"} <= set(result), name
        for block in ("test", "test_masked", "valid", "cold_test"):
            assert set(result[block]) == METRIC_KEYS, (name, block)
            assert all(0.0 <= v <= 1.0 for v in result[block].values()), (name, block)
            r = result[block]
            assert r["recall@5"] <= r["recall@10"] <= r["recall@20"], (name, block)
        assert 0.0 < result["coverage@20"] <= 1.0
        assert 0.0 <= result["tail_share@20"] <= 1.0
        assert result["train_seconds"] >= 0.0
    assert report["results"]["popularity"]["epochs"] == 0
    assert report["results"]["sasrec"]["epochs"] == 2
    # popularity gives everyone the same list: its coverage is exactly 20 of 40 items
    assert report["results"]["popularity"]["coverage@20"] == pytest.approx(20 / 40)


def test_small_catalogue_is_refused_or_evaluated(tmp_path, capsys):
    data = tmp_path / "small"
    data.mkdir()
    (data / "Small.txt").write_text("1 1 2 3 4 5\n2 2 3 4 5 6\n3 3 4 5 6 7\n")
    rc = main(["evaluate", "--data", str(data), "--models", "popularity", "--quiet",
               "--out", str(tmp_path / "o.json")])
    assert rc in (0, 2)
    if rc == 2:
        one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv", [["--help"], ["evaluate", "--help"]])
def test_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sparc")
    assert ("evaluate" in out) if argv == ["--help"] else ("--data" in out and "--models" in out)


def test_set_overrides_sparc_config_fields():
    from sparc_stream.cli.evaluate import parse_sparc_set

    got = parse_sparc_set(["tower_attention=false", "interest=head", "codes=16", "global_weight=0.5"])
    assert got == {"tower_attention": False, "interest": "head", "codes": 16, "global_weight": 0.5}


@pytest.mark.parametrize("bad", ["tower_attention", "no_such_field=1", "encoder=3"])
def test_set_with_an_unknown_field_is_a_one_line_error(tmp_path, capsys, bad):
    data = write_dataset(tmp_path / "tiny")
    rc = main(["evaluate", "--data", str(data), "--models", "sparc", "--set", bad, "--quiet"])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--set" in line and "tower_attention" in line  # names the option and the valid fields


def test_served_needs_twenty_slots_and_one_per_code(tmp_path, capsys):
    data = write_dataset(tmp_path / "tiny")
    rc = main(["evaluate", "--data", str(data), "--models", "sparc", "--served", "10", "--quiet"])
    assert rc == 2
    assert "--served 10" in one_error_line(capsys.readouterr().err)


def test_exploration_slots_leave_the_top_ten_alone(tmp_path, capsys):
    """--exploit 10: the 10 most probable items keep their ranks (Recall/NDCG@10 and validation are the plain
    model's), the slots after them rank by lift, and the report says so. Exploration slots are the default
    (exploit 15, lift 0.5: README 'Discovery'); --no-exploration gives the plain ranking."""
    data = write_dataset(tmp_path / "tiny", users=40, items=60)
    reports = []
    for extra in (["--no-exploration"], ["--exploit", "10", "--lift", "2"], []):
        out = tmp_path / f"{len(reports)}.json"
        args = ["evaluate", "--data", str(data), "--models", "sparc", "--max-epochs", "2", "--quiet", "--out",
                str(out), "--served", "20", *extra]
        assert main(args) == 0, capsys.readouterr().err
        reports.append(json.loads(out.read_text())["results"]["sparc"])
    plain, explored, default = reports
    assert (explored["exploit"], explored["lift"]) == (10, 2.0) and plain["exploit"] is None
    assert (default["exploit"], default["lift"]) == (15, 0.5)
    for key in ("recall@10", "ndcg@10", "recall@5", "ndcg@5"):
        for other in (explored, default):
            assert other["test"][key] == plain["test"][key] and other["valid"][key] == plain["valid"][key]
    for other in (explored, default):
        assert other["test"]["recall@20"] != plain["test"]["recall@20"] or other["coverage@20"] != \
            plain["coverage@20"]  # the slots after the tenth (the fifteenth) moved
    assert explored["tail_share@20"] >= plain["tail_share@20"]
    capsys.readouterr()
    assert main(["evaluate", "--data", str(data), "--models", "sparc", "--exploit", "3", "--quiet"]) == 2
    assert "--exploit 3" in one_error_line(capsys.readouterr().err)
