"""`sparc replay`, called in-process through `sparc`'s main: the report's files and schema, one-line errors."""

from __future__ import annotations

import argparse
import json

import pytest

from replay.sources import open_source
from sparc_stream.cli.main import main
from sparc_stream.cli.replay import ALL_VARIANTS, register, settings_from_args

SMALL = ["--codes", "8", "--dim", "16", "--max-len", "10", "--layers", "1", "--batch-size", "32", "--quiet"]
SYNTHETIC = "synthetic:2?users=40&events=640&items=60&topics=4"
METRICS = {f"{m}@{k}" for m in ("recall", "ndcg") for k in (10, 20, 50)}


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sparc replay: error:"), err
    return lines[0]


def test_replay_writes_the_documented_report(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(["replay", "--events", SYNTHETIC, "--report", str(out), "--modes", "soft,hard",
               "--variants", "evolving,frozen,periodic", "--window", "160", "--retrain-epochs", "1", *SMALL])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"report written to {out}" in captured.out

    report = json.loads((out / "report.json").read_text())
    assert report["events"] == 640 and report["seconds"] > 0
    assert report["source"] == "synthetic:2"
    names = [f"{r}/{m}" for r in ("evolving", "frozen", "periodic") for m in ("soft", "hard")]
    assert list(report["variants"]) == names
    for name, v in report["variants"].items():
        assert set(v["overall"]) >= METRICS, name
        assert {"coverage@20", "tail_share@20", "new_share@20", "new_items_reached@10", "level1_churn",
                "level1_churn_max", "top_interest_churn", "top_interest_churn_idle"} <= set(v["overall"])
        assert set(v["after_freeze"]) >= METRICS
        assert len(v["windows"]) == 4
        for w in v["windows"]:
            assert {"end_ts", "end_event", "events", "scored", *METRICS, "coverage@20", "tail_share@20",
                    "new_share@20", "level1_utilisation", "level1_perplexity", "collision_rate",
                    "code_changed_share", "level1_changed_share", "top_interest_changed_share",
                    "top_interest_changed_share_idle"} <= set(w), name
            assert all(0.0 <= w[k] <= 1.0 for k in METRICS)
            assert isinstance(w["end_ts"], int | float)
    assert report["markers"] and all(at <= 640 for at, _ in report["markers"])

    md = (out / "report.md").read_text()
    assert md.startswith("# Prequential replay: synthetic:2")
    assert "| evolving/soft |" in md and "![metrics](metrics.png)" in md and "![exploration](exploration.png)" in md
    churn = md[md.index("## Churn of interests per window"):]
    assert "| evolving level-1 | evolving users | evolving idle users |" in churn
    assert f"| evolving | {report['variants']['evolving/soft']['overall']['level1_churn']:.4f} |" in churn
    for png in ("metrics.png", "health.png", "exploration.png"):  # two score modes: the trade-off figure too
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_of_a_jsonl_file_with_a_limit(tmp_path, capsys):
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in open_source(SYNTHETIC).records()))
    out = tmp_path / "rep"
    rc = main(["replay", "--events", str(path), "--report", str(out), "--variants", "evolving",
               "--limit", "200", "--delay", "64", "--eval-per-batch", "8", *SMALL])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["events"] == 200 and report["source"] == "jsonl:events.jsonl"
    assert report["variants"]["evolving"]["overall"]["scored"] <= 8 * 7
    assert report["settings"]["delay_events"] == 64 and report["settings"]["eval_per_batch"] == 8


@pytest.mark.parametrize(("argv", "needle"), [
    (["--events", "{tmp}/absent.jsonl"], "absent.jsonl: no such file"),
    (["--events", "{tmp}/nowhere"], "nowhere: no such file or folder"),
    (["--events", "{tmp}/bad.jsonl"], "bad.jsonl:2: bad_json"),
    (["--events", SYNTHETIC, "--variants", "evolving,sometimes"], "unknown regime(s) sometimes"),
    (["--events", SYNTHETIC, "--modes", "soft,medium"], "search must be soft or hard"),
    (["--events", SYNTHETIC, "--delay", "soon"], "--delay 'soon'"),
    (["--events", SYNTHETIC, "--window", "0"], "window_events must be >= 1"),
    (["--events", "synthetic:1?colour=red"], "unknown parameter(s) colour"),
    (["--events", "kafka://127.0.0.1:1/"], "expected kafka://HOST:PORT/TOPIC"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    (tmp_path / "bad.jsonl").write_text(
        json.dumps({"event_id": "a", "user_id": 1, "item_id": 2, "timestamp": 1_700_000_000,
                    "event_type": "view"}) + "\n{oops\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = main(["replay", *argv, "--report", str(tmp_path / "rep"), *SMALL])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert needle in line, line
    assert not (tmp_path / "rep").exists()


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["replay", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--events", "--report", "--variants", "--modes", "--batch-size", "--delay", "--window",
                   "--freeze-at", "--retrain-every", "--retrain-epochs", "--eval-per-batch", "--reach", "--limit",
                   "--seed", "kafka://", "synthetic[:SEED]", "evolving", "frozen", "periodic"):
        assert option in out, option


def test_soft_hard_comparison_and_exploration_sweep_as_variants(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(["replay", "--events", SYNTHETIC, "--report", str(out), "--window", "320", "--retrain-epochs", "1",
               "--variants", "evolving,frozen,evolving/hard,evolving/soft:t=2,evolving/soft:k=8", *SMALL])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    names = ["evolving/soft", "frozen/soft", "evolving/hard", "evolving/soft:t=2", "evolving/soft:k=8"]
    assert list(report["variants"]) == names
    assert report["settings"]["extra_variants"] == names[2:]
    for name in names:  # new-item reach is reported for every variant, on the command line too
        o = report["variants"][name]["overall"]
        assert {"new_share@20", "new_items_reached@10", "tail_share@20", "coverage@20"} <= set(o)
        assert f"{name} " in captured.out
    assert "reached@10" in captured.out
    md = (out / "report.md").read_text()
    assert "## Score modes: soft vs hard search, exploration sweep" in md
    assert "| evolving/soft:k=8 |" in md and "R@20 vs soft" in md


def test_all_variants_preset(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["replay", "--events", SYNTHETIC, "--report", str(tmp_path), "--variants", "all"])
    names = [n for n, _, _ in settings_from_args(args).variant_names()]
    assert names == ["evolving/soft", "frozen/soft", "periodic/soft", "evolving/hard", "evolving/soft:t=2",
                     "evolving/soft:served=20:x=15:lift=0.5", "evolving/hard:served=20"]  # served as the worker
    assert ALL_VARIANTS.count(",") == len(names) - 1


def test_set_overrides_the_replayed_models_config(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["replay", "--events", SYNTHETIC, "--report", str(tmp_path),
                              "--set", "retrieval_loss=sampled", "--set", "codes=16"])
    model = settings_from_args(args).model
    assert model.retrieval_loss == "sampled" and model.codes == 16
    rc = main(["replay", "--events", SYNTHETIC, "--report", str(tmp_path), "--set", "no_such_field=1"])
    assert rc == 2 and "--set" in capsys.readouterr().err
