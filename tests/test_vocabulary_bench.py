"""benchmarks/vocabulary_bench.py on small vocabularies: the part the publisher chooses and its bytes."""

from __future__ import annotations

import json

from benchmarks.vocabulary_bench import main, vocabularies


def test_vocabularies_hand_the_asked_share_of_rows_to_new_ids():
    base, new = vocabularies(200, "sku", 0.1)
    assert len(set(base)) == len(set(new)) == 200 and sum(a != b for a, b in zip(base, new, strict=True)) == 20
    assert len(set(new) - set(base)) == 20  # the new ids are fresh


def test_the_delta_is_sent_while_it_is_fewer_bytes_than_the_whole_vocabulary(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--items", "300", "--reps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 12 and {r["ids"] for r in rows} == {"int", "sku"}
    for r in rows:
        assert r["vocabulary_part_bytes"] <= r["baseline_whole_bytes"] and r["ids_removed"] == r["rows_handed_on"]
        if r["rows_handed_on"] == 0:
            assert (r["vocabulary_part"], r["vocabulary_part_bytes"]) == ("item_ids_delta.safetensors", 122)
    assert rows[-1]["vocabulary_part"] == "item_ids.safetensors"  # 90% of the rows handed on: whole is fewer bytes
