"""`sparc train`, called in-process: a tiny dataset, one epoch, the snapshot it stores (loadable like a worker's,
compatible with a model whose item table has grown), the next version, and bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from codebook_store import IncompatibleSnapshotError, check_compatible, open_store
from sparc_stream.cli.main import main
from trainer.config import SparcConfig
from trainer.model import SparcModel
from trainer.online import load_model

FAST = ["--epochs", "1", "--codes", "8", "--quiet"]


def write_dataset(folder: Path, users: int = 30, items: int = 40, seed: int = 0) -> Path:
    """A seeded S3-Rec dataset with attributes; every item appears, lengths 5..12."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    lines = []
    for u in range(1, users + 1):
        seq = rng.integers(1, items + 1, size=int(rng.integers(5, 13)))
        seq[0] = (u - 1) % items + 1
        seq[1] = (u + users - 1) % items + 1
        lines.append(" ".join(map(str, [u, *seq])))
    (folder / "Tiny.txt").write_text("\n".join(lines) + "\n")
    attrs = {str(i): [int(a) for a in rng.integers(1, 6, size=2)] for i in range(1, items + 1)}
    (folder / "Tiny_item2attributes.json").write_text(json.dumps(attrs))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two runs into one file:// store; returns (store URL, captured stdout of the first run)."""
    root = tmp_path_factory.mktemp("train")
    data, url = write_dataset(root / "tiny"), f"file://{root}/store"
    assert main(["train", "--data", str(data), "--store", url, *FAST]) == 0
    assert main(["train", "--data", str(data), "--store", url, "--seed", "1", *FAST]) == 0
    return url


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sparc train: error:"), err
    return lines[0]


def test_train_stores_a_snapshot_a_worker_can_load(trained):
    with open_store(trained, read_only=True) as store:
        assert store.versions() == [0, 1] and store.latest_version() == 1
        snap = store.get(0)
    assert (snap.parent, snap.watermark, snap.num_items) == (None, {"offline": "Tiny"}, 40)
    assert snap.config["num_items"] == 40 and snap.config["codes"] == 8 and snap.config["num_attributes"] == 5
    assert snap.health["gate"] == {"passed": True, "reasons": [], "refused": []} and snap.health["finite"]
    assert snap.health["offline"]["dataset"] == "Tiny" and snap.health["offline"]["epochs"] == 1
    assert {"items", "level1_utilisation", "collision_rate"} <= set(snap.health)
    model = load_model(snap.config, snap.weights)  # strict: every weight fits the stored config
    with torch.no_grad():
        cat = model.catalogue()
    assert torch.equal(cat.codes, snap.item_codes) and torch.equal(model.rq.codebooks, snap.codebooks)


def test_a_grown_item_table_is_the_same_model_config(trained):
    """compat: num_items is a capacity (the item table grows on a stream), so it is not a config difference;
    the tensors that depend on it still are, when the caller names their shapes."""
    with open_store(trained, read_only=True) as store:
        snap = store.get(1)
    grown = {**snap.config, "num_items": 100}  # a worker whose catalogue has 100 items by now
    check_compatible(snap, grown, {k: tuple(v.shape) for k, v in snap.weights.items()})  # item-sized shapes fit
    item_sized = {"items.id_embedding", "items.attributes", "items.counts"}
    model = SparcModel(SparcConfig.from_json(grown))
    with pytest.raises(IncompatibleSnapshotError) as info:
        check_compatible(snap, grown, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert {d.split("'")[1] for d in info.value.differences} == item_sized
    with pytest.raises(IncompatibleSnapshotError, match="config\\['codes'\\]"):
        check_compatible(snap, {**grown, "codes": 16}, {})


def test_memory_store_and_the_summary(tmp_path, capsys):
    data = write_dataset(tmp_path / "tiny")
    assert main(["train", "--data", str(data / "Tiny.txt"), "--store", "memory://", *FAST]) == 0
    out = capsys.readouterr().out
    assert "Tiny: 30 users, 40 items" in out and "sparc v0 stored in memory://" in out and "latest -> v0" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--store", "memory://", "--epochs", "0"], "--epochs must be >= 1"),
        (["--store", "memory://", "--max-seconds", "-1"], "--max-seconds must be > 0"),
        (["--store", "nope://x"], "unknown store scheme 'nope'"),
        (["--store", "memory://", "--num-attributes", "2"], "below the dataset's largest attribute id 5"),
        (["--store", "memory://", "--model", "../x"], "invalid model name"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, args, expected):
    data = write_dataset(tmp_path / "tiny")
    assert main(["train", "--data", str(data), *args, "--quiet"]) == 2
    assert expected in one_error_line(capsys.readouterr().err)


def test_missing_or_tiny_data_is_one_line(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--store", "memory://"]) == 2
    assert str(tmp_path / "nowhere") in one_error_line(capsys.readouterr().err)
    small = write_dataset(tmp_path / "small", users=5, items=8)
    assert main(["train", "--data", str(small), "--store", "memory://"]) == 2
    assert "8 items" in one_error_line(capsys.readouterr().err)
