"""benchmarks/soak.py on a tiny stream: both allocator variants side by side, RSS series, snapshot health."""

from __future__ import annotations

import json

from benchmarks import soak


def test_soak_runs_both_variants_and_records_rss_and_health(tmp_path):
    out = tmp_path / "soak.json"
    rc = soak.main(["--out", str(out), "--events", "synthetic:0?users=60&events=900&items=80", "--batch-size", "32",
                    "--snapshot-every", "10", "--sample-every", "4", "--retrievals", "5", "--variants", "tuned,glibc"])
    assert rc == 0
    result = json.loads(out.read_text())
    tuned, glibc = result["variants"]["tuned"], result["variants"]["glibc"]
    assert tuned["allocator"] == "trimming" and glibc["allocator"] == "glibc default"
    for r in (tuned, glibc):
        assert r["events"] == 900 and r["series"][0]["events"] == 0 and r["series"][-1]["events"] == 900
        assert r["peak_rss_mb"] >= r["final_rss_mb"] > 0 and r["cpu_user_seconds"] > 0 and r["minor_page_faults"] > 0
    steps = [h["steps"] for h in result["health"]]
    assert steps[:5] == [1, 2, 5, 10, 20] and result["health_identical_across_variants"]
    assert {"level1_perplexity", "level3_utilisation", "collision_rate", "gate_passed"} <= set(result["health"][0])
